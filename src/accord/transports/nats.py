"""NATS JetStream transport (nats-py): one file-backed stream per channel, durable pull
consumers per group, publishes confirmed by JetStream's PubAck and pipelined.

Layout on the server, for ``channel="accord"``:

* stream ``ACCORD_accord`` (see :func:`stream_name`) with subjects ``accord.>``, file
  storage, a duplicate window: each message is published on ``accord.<type>`` with the
  header ``Nats-Msg-Id`` = message id, so a re-publish within the window (a relay that
  crashed between publish and mark-SENT) is stored once;
* one durable pull consumer per group (see :func:`durable_name`), explicit ack,
  ``ack_wait`` seconds before an unsettled delivery of a dead consumer is redelivered;
* rejected messages are copied to ``accord._dead.<group>`` with the reason in the
  ``accord-dead-reason`` header, then terminated.

Messages travel in CloudEvents binary mode: the ``ce-*`` headers are NATS headers.
The stream keeps messages by its limits (``max_age`` / ``max_bytes``, unlimited by
default), not by interest, so dead letters stay readable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Sequence

try:
    import nats
    import nats.errors
    import nats.js.errors
    from nats.aio.client import Client as _NatsClient
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext
    from nats.js.api import (
        AckPolicy,
        ConsumerConfig,
        DeliverPolicy,
        RetentionPolicy,
        StorageType,
        StreamConfig,
    )
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    from accord.errors import MissingExtraError

    raise MissingExtraError("The NATS transport", "nats", "nats-py") from exc

from accord.errors import (
    ConfigurationError,
    MessageTooLarge,
    TransportError,
    TransportUnavailable,
)
from accord.messages import Message
from accord.transports._naming import safe_name
from accord.transports._nats_consume import (
    MAX_HEADER_BYTES,
    NatsSubscription,
    header_size,
    translate_nats_error,
)
from accord.transports.base import (
    BatchHandler,
    Envelope,
    Subscription,
    Transport,
    check_batching,
    check_counts,
    check_group,
    check_seconds,
    raise_unconfirmed,
)

__all__ = ["NatsTransport", "durable_name", "stream_name", "subject_filter"]

log = logging.getLogger("accord.transports.nats")

_SUBJECT_WORD = re.compile(r"[^\s.*>]+")


def stream_name(channel: str) -> str:
    """The JetStream stream that holds ``channel``'s messages."""
    return "ACCORD_" + safe_name(channel)


def durable_name(group: str) -> str:
    """The durable consumer name of a consumer group (unique per distinct group name)."""
    return safe_name(group)


def _valid_subject_words(text: str) -> bool:
    return all(_SUBJECT_WORD.fullmatch(word) for word in text.split("."))


def subject_filter(channel: str, topics: Sequence[str]) -> tuple[str, bool]:
    """The consumer's filter subject for ``topics`` and whether it is exact.

    ``*`` maps to ``*`` and a lone ``#`` to ``>``. What one NATS subject cannot express
    (several topics, a ``#`` next to other words since ``#`` also matches zero words)
    falls back to the whole channel ``<channel>.>``; the subscription then skips
    non-matching messages client-side (acking them).
    """
    if len(topics) == 1:
        (topic,) = topics
        if topic == "#":
            return f"{channel}.>", True
        words = topic.split(".")
        if "#" not in words and all(w == "*" or _valid_subject_words(w) for w in words):
            return f"{channel}.{topic}", True
    return f"{channel}.>", False


class _PubAcks:
    """The PubAcks of one connection: replies to ``<inbox>.<n>``, one subscription."""

    def __init__(self, nc: _NatsClient) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox()
        self._next = 0
        self._waiting: dict[str, asyncio.Future[None]] = {}

    async def start(self) -> None:
        # The client subscribes again by itself after a reconnect.
        await self._nc.subscribe(f"{self._prefix}.*", cb=self._on_reply)

    def expect(self) -> tuple[str, asyncio.Future[None]]:
        """A fresh reply subject and the future its PubAck settles."""
        self._next += 1
        reply = f"{self._prefix}.{self._next}"
        pub_ack = self._waiting[reply] = asyncio.get_running_loop().create_future()
        return reply, pub_ack

    def forget(self, reply: str) -> None:
        self._waiting.pop(reply, None)

    def fail_waiting(self, error: Exception) -> None:
        """Fail every publish still waiting for its PubAck (the connection closed)."""
        waiting, self._waiting = self._waiting, {}
        for pub_ack in waiting.values():
            if not pub_ack.done():
                pub_ack.set_exception(error)

    async def _on_reply(self, msg: Msg) -> None:
        pub_ack = self._waiting.pop(msg.subject, None)
        if pub_ack is None or pub_ack.done():
            return  # late: its publish gave up waiting
        problem = _pub_ack_problem(msg)
        if problem is None:
            pub_ack.set_result(None)
        else:
            pub_ack.set_exception(problem)


def _pub_ack_problem(msg: Msg) -> Exception | None:
    """Why a reply to a JetStream publish is not a PubAck, or None if it is one."""
    status = msg.headers.get("Status") if msg.headers else None
    if status == "503":  # no responders: no stream captures the subject
        return nats.js.errors.NoStreamResponseError()
    if status is not None:
        return nats.js.errors.APIError(
            code=int(status) if status.isdigit() else None,
            description=msg.headers.get("Description") if msg.headers else None,
        )
    if msg.data.startswith(b'{"stream":') and b'"error"' not in msg.data:
        return None  # the common case, without parsing it
    try:
        reply = json.loads(msg.data)
    except ValueError:
        reply = None
    if isinstance(reply, dict) and isinstance(reply.get("error"), dict):
        try:
            nats.js.errors.APIError.from_error(reply["error"])
        except Exception as exc:  # from_error raises the error it describes
            return exc
    if isinstance(reply, dict) and "stream" in reply:
        return None
    return nats.js.errors.APIError(description=f"not a PubAck: {msg.data[:200]!r}")


class NatsTransport(Transport):
    """A :class:`~accord.transports.base.Transport` on NATS JetStream.

    ``url`` may list several servers separated by commas. The client reconnects on its
    own after a server restart; publishes attempted while disconnected fail at once with
    :class:`~accord.errors.TransportUnavailable` (the relay retries them). ``ack_wait``:
    seconds before a delivery held by a consumer that died is redelivered (a live
    consumer keeps its deliveries alive while it works). ``publish_timeout``: longest
    wait for a batch's confirms. ``duplicate_window``: seconds within which a re-publish
    of the same message id is dropped by the server.
    """

    name = "nats"

    def __init__(
        self,
        url: str,
        *,
        channel: str = "accord",
        ack_wait: float = 30.0,
        publish_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        duplicate_window: float = 120.0,
        max_age: float | None = None,
        max_bytes: int | None = None,
    ) -> None:
        if not channel or not _valid_subject_words(channel):
            raise ConfigurationError(
                f"NATS channel {channel!r} is not a valid subject prefix: use letters, digits, "
                "'-' and '_' (dots separate words; no spaces, '*' or '>')"
            )
        check_seconds(
            "NatsTransport",
            ack_wait=ack_wait,
            publish_timeout=publish_timeout,
            connect_timeout=connect_timeout,
            duplicate_window=duplicate_window,
        )
        # JetStream reads a max_age of 0 and a max_bytes of -1 as "no limit", like None.
        check_seconds("NatsTransport", zero_ok=True, max_age=max_age)
        if not (type(max_bytes) is int and max_bytes in (0, -1)):
            check_counts("NatsTransport", max_bytes=max_bytes)
        self.url = url
        self.channel = channel
        self.stream = stream_name(channel)
        self.ack_wait = ack_wait
        self.publish_timeout = publish_timeout
        self.connect_timeout = connect_timeout
        self.duplicate_window = duplicate_window
        self.max_age = max_age
        self.max_bytes = max_bytes
        self._nc: _NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._subscriptions: list[NatsSubscription] = []
        self._acks: _PubAcks | None = None
        self._lock = asyncio.Lock()

    # -- connection ---------------------------------------------------------------

    async def connect(self) -> None:
        """Connect and declare the channel's stream. Idempotent."""
        async with self._lock:
            if self._nc is not None and not self._nc.is_closed:
                return
            servers = [s.strip() for s in self.url.split(",") if s.strip()]
            try:
                async with asyncio.timeout(self.connect_timeout * max(1, len(servers)) + 1):
                    nc = await nats.connect(
                        servers,
                        connect_timeout=self.connect_timeout,
                        allow_reconnect=True,
                        max_reconnect_attempts=-1,
                        reconnect_time_wait=0.25,
                        error_cb=self._on_error,
                        disconnected_cb=self._on_disconnected,
                        reconnected_cb=self._on_reconnected,
                    )
            except Exception as exc:
                raise TransportUnavailable(
                    f"cannot connect to NATS at {self.url}: {exc!r}; is nats-server running "
                    "with JetStream enabled (-js)?"
                ) from exc
            js = nc.jetstream(timeout=self.publish_timeout)
            acks = _PubAcks(nc)
            try:
                await self._declare_stream(js)
                await acks.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await nc.close()
                raise
            self._nc, self._js, self._acks = nc, js, acks

    async def _declare_stream(self, js: JetStreamContext) -> None:
        try:
            await js.stream_info(self.stream)
            return
        except nats.js.errors.NotFoundError:
            pass
        except Exception as exc:
            raise translate_nats_error(exc, f"looking up stream {self.stream}") from exc
        config = StreamConfig(
            name=self.stream,
            subjects=[f"{self.channel}.>"],
            storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS,
            duplicate_window=self.duplicate_window,
            max_age=self.max_age,
            max_bytes=self.max_bytes,
        )
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            raise TransportError(
                f"JetStream refused to create stream {self.stream} for subjects "
                f"'{self.channel}.>': {exc.description}. Another stream may already capture "
                "these subjects; use another channel or delete that stream."
            ) from exc
        except Exception as exc:
            raise translate_nats_error(exc, f"creating stream {self.stream}") from exc

    async def _on_error(self, exc: Exception) -> None:
        log.debug("NATS client error: %r", exc)

    async def _on_disconnected(self) -> None:
        if self._nc is not None and not self._nc.is_closed:
            log.warning("disconnected from NATS at %s; reconnecting", self.url)

    async def _on_reconnected(self) -> None:
        log.info("reconnected to NATS at %s", self.url)

    def _connected(self) -> tuple[_NatsClient, JetStreamContext]:
        nc, js = self._nc, self._js
        if nc is None or js is None or nc.is_closed:
            raise TransportUnavailable("the NATS transport is not connected: call connect() first")
        if not nc.is_connected:
            raise TransportUnavailable(f"NATS at {self.url} is unreachable (reconnecting)")
        return nc, js

    # -- publishing ---------------------------------------------------------------

    async def publish(self, messages: Sequence[Message]) -> None:
        """Publish a batch with confirms; see :meth:`publish_envelopes`."""
        await self.publish_envelopes([Envelope.of(message) for message in messages])

    async def publish_envelopes(self, envelopes: Sequence[Envelope]) -> None:
        """Send every message of the batch at once and wait for each one's PubAck; raise
        PublishError naming those without one.

        Pipelined: each message is a plain publish whose reply subject is unique under
        one inbox this transport subscribed to once, so the whole batch is written in
        order and the PubAcks are matched as they come. Measured on nats-py 2.16 this
        costs about 40 % of the CPU of a ``js.publish`` request per message, each with a
        future and a timer of its own.
        """
        nc, _ = self._connected()
        if not envelopes:
            return
        acks = self._acks
        assert acks is not None  # set up with the connection
        failed: dict[str, BaseException] = {}
        waiting: list[tuple[str, str, asyncio.Future[None]]] = []  # (id, reply, PubAck)
        try:
            for envelope in envelopes:
                if envelope.type == "_dead" or envelope.type.startswith("_dead."):
                    failed[envelope.id] = ConfigurationError(
                        f"message type {envelope.type!r}: '_dead.' starts the subjects of "
                        "this transport's dead letters on NATS; name the type otherwise"
                    )
                    continue
                if not _valid_subject_words(envelope.type):
                    failed[envelope.id] = ConfigurationError(
                        f"message type {envelope.type!r} cannot be a NATS subject: no spaces, "
                        "'*', '>' or empty words"
                    )
                    continue
                headers = dict(envelope.headers)
                headers["Nats-Msg-Id"] = envelope.id
                if header_size(headers) > MAX_HEADER_BYTES:
                    failed[envelope.id] = MessageTooLarge(
                        f"message {envelope.id} has {header_size(headers):,} bytes of "
                        f"headers; JetStream stores at most {MAX_HEADER_BYTES:,} (keep long "
                        "values in the data)"
                    )
                    continue
                size = len(envelope.body) + header_size(headers)
                if size > nc.max_payload:
                    # The server would refuse it by closing the connection, failing
                    # every other message in flight: it never leaves.
                    failed[envelope.id] = MessageTooLarge(
                        f"message {envelope.id} is {size:,} bytes with its headers; NATS "
                        f"at {self.url} takes at most {nc.max_payload:,} (max_payload in "
                        "nats-server.conf, up to 64 MB)"
                    )
                    continue
                reply, pub_ack = acks.expect()
                waiting.append((envelope.id, reply, pub_ack))
                try:
                    await nc.publish(
                        f"{self.channel}.{envelope.type}",
                        envelope.body,
                        reply=reply,
                        headers=headers,
                    )
                except Exception as exc:
                    pub_ack.set_exception(exc)
            if waiting:
                await asyncio.wait([w[2] for w in waiting], timeout=self.publish_timeout)
        finally:
            for _, reply, pub_ack in waiting:
                acks.forget(reply)
                pub_ack.cancel()  # no-op once settled
        for message_id, _, pub_ack in waiting:
            if pub_ack.cancelled():
                failed[message_id] = TransportUnavailable(
                    f"no PubAck from JetStream within publish_timeout={self.publish_timeout}s"
                )
            elif (error := pub_ack.exception()) is not None:
                failed[message_id] = translate_nats_error(error, "publishing")
        raise_unconfirmed(failed, len(envelopes), "NATS")

    # -- consuming ----------------------------------------------------------------

    async def subscribe_batches(
        self,
        group: str,
        handler: BatchHandler,
        *,
        topics: Sequence[str] = ("#",),
        prefetch: int = 64,
        max_batch: int = 64,
    ) -> Subscription:
        """Create (or reuse) the group's durable pull consumer and start pulling from it:
        each pull of up to ``prefetch`` messages is handed over in chunks of at most
        ``max_batch``."""
        check_batching(prefetch, max_batch)
        nc, js = self._connected()
        exact = await self._declare(js, group, topics)
        try:
            psub = await js.pull_subscribe_bind(durable=durable_name(group), stream=self.stream)
        except TransportError:
            raise
        except Exception as exc:
            raise translate_nats_error(exc, f"subscribing group {group!r}") from exc
        subscription = NatsSubscription(
            nc,
            js,
            psub,
            handler,
            channel=self.channel,
            group=group,
            topics=tuple(topics),
            exact=exact,
            prefetch=max(1, prefetch),
            max_batch=max(1, min(max_batch, prefetch)),
            ack_wait=self.ack_wait,
            publish_timeout=self.publish_timeout,
        )
        self._subscriptions.append(subscription)
        return subscription

    async def declare(self, group: str, *, topics: Sequence[str] = ("#",)) -> None:
        """Create the group's durable pull consumer (new messages from now on, filtered
        to ``topics``) without pulling from it."""
        _, js = self._connected()
        await self._declare(js, group, topics)

    async def _declare(self, js: JetStreamContext, group: str, topics: Sequence[str]) -> bool:
        """Declare the group's consumer; return whether its filter selects exactly
        ``topics`` (else the subscription filters what it pulls)."""
        check_group(group, topics)
        filter_subject, exact = subject_filter(self.channel, topics)
        config = ConsumerConfig(
            durable_name=durable_name(group),
            description=f"accord group {group!r}",
            deliver_policy=DeliverPolicy.NEW,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_deliver=-1,
            filter_subject=filter_subject,
        )
        try:
            await self._declare_consumer(js, config)
        except TransportError:
            raise
        except Exception as exc:
            raise translate_nats_error(exc, f"declaring group {group!r}") from exc
        return exact

    async def _declare_consumer(self, js: JetStreamContext, config: ConsumerConfig) -> None:
        assert config.durable_name is not None
        try:
            info = await js.consumer_info(self.stream, config.durable_name)
        except nats.js.errors.NotFoundError:
            info = None
        if info is not None and (
            info.config.filter_subject == config.filter_subject
            and info.config.ack_wait == config.ack_wait
        ):
            return  # durable from its first subscribe on; nothing to change
        try:
            await js.add_consumer(self.stream, config)
        except nats.js.errors.BadRequestError as exc:
            raise TransportError(
                f"JetStream refused consumer {config.durable_name!r} on stream {self.stream} "
                f"(filter {config.filter_subject!r}): {exc.description}. A group's topics or "
                "ack_wait cannot change on this server version; use a new group name or "
                "delete the consumer."
            ) from exc

    async def close(self) -> None:
        """Stop every subscription (giving unsettled deliveries back), then drain and
        close the connection. Idempotent."""
        async with self._lock:
            subscriptions, self._subscriptions = self._subscriptions, []
            for subscription in subscriptions:
                with contextlib.suppress(Exception):
                    await subscription.stop()
            nc, self._nc, self._js = self._nc, None, None
            acks, self._acks = self._acks, None
            if nc is not None and not nc.is_closed:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.connect_timeout):
                        await nc.close()
            if acks is not None:
                # No PubAck can come now: a publish in flight fails at once, not after
                # publish_timeout (its messages may be stored: a retry is deduplicated).
                acks.fail_waiting(
                    TransportUnavailable(
                        "the NATS transport was closed before JetStream confirmed the message"
                    )
                )

    # -- administration -----------------------------------------------------------

    async def delete_stream(self) -> None:
        """Delete the channel's stream with every message and consumer (tests, teardown)."""
        _, js = self._connected()
        try:
            await js.delete_stream(self.stream)
        except nats.js.errors.NotFoundError:
            pass
        except Exception as exc:
            raise translate_nats_error(exc, f"deleting stream {self.stream}") from exc
