"""The consuming side of the NATS transport: pull-subscription loop, deliveries, errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import nats.errors
import nats.js.errors
from nats.aio.client import Client as _NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from accord.errors import MessageTooLarge, TransportError, TransportUnavailable
from accord.transports._naming import safe_name
from accord.transports.base import (
    DEFAULT_REDELIVERY_DELAY,
    BatchHandler,
    Delivery,
    Subscription,
    topic_matches,
)

__all__ = ["MAX_HEADER_BYTES", "NatsSubscription", "header_size", "translate_nats_error"]

log = logging.getLogger("accord.transports.nats")

#: JetStream's error code for a message larger than the stream takes (max_msg_size).
_EXCEEDS_MAXIMUM = 10054
#: JetStream's error code for headers over :data:`MAX_HEADER_BYTES`.
_HEADERS_EXCEED_MAXIMUM = 10097
#: The most bytes of headers JetStream stores with a message (as :func:`header_size`
#: counts them), whatever max_payload allows.
MAX_HEADER_BYTES = 65_535

#: Longest a pull request waits on the server before the loop asks again (seconds).
FETCH_WAIT = 2.0


def translate_nats_error(exc: BaseException, doing: str) -> TransportError:
    """The Accord error for a nats-py exception raised while ``doing`` something."""
    if isinstance(exc, TransportError):
        return exc
    if isinstance(
        exc,
        nats.errors.ConnectionClosedError
        | nats.errors.ConnectionReconnectingError
        | nats.errors.NoServersError
        | nats.errors.StaleConnectionError
        | nats.errors.OutboundBufferLimitError
        | nats.errors.TimeoutError
        | nats.js.errors.NoStreamResponseError
        | nats.js.errors.ServiceUnavailableError
        | nats.js.errors.TooManyStalledMsgsError
        | asyncio.TimeoutError
        | OSError,
    ):
        error: TransportError = TransportUnavailable(f"NATS unavailable while {doing}: {exc!r}")
    elif isinstance(exc, nats.js.errors.APIError) and exc.err_code == _EXCEEDS_MAXIMUM:
        error = MessageTooLarge(
            f"JetStream refused {doing}: {exc.description} (the stream's max_msg_size)"
        )
    elif isinstance(exc, nats.js.errors.APIError) and exc.err_code == _HEADERS_EXCEED_MAXIMUM:
        error = MessageTooLarge(
            f"JetStream refused {doing}: {exc.description} (headers of at most "
            f"{MAX_HEADER_BYTES:,} bytes)"
        )
    elif isinstance(exc, nats.js.errors.APIError):
        error = TransportError(f"JetStream refused {doing}: {exc.description or exc!r}")
    else:
        error = TransportError(f"NATS error while {doing}: {exc!r}")
    error.__cause__ = exc
    return error


def header_size(headers: dict[str, str]) -> int:
    """The bytes of ``headers`` in a NATS message (``NATS/1.0`` status line, one
    ``key: value`` line each, a blank line), which count against max_payload."""
    lines = sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())
    return len("NATS/1.0\r\n") + lines + 2


def _one_line(text: str) -> str:
    # NATS header values end at CRLF; keep a multi-line reason in one header.
    return " ".join(text.split())


class _NatsDelivery(Delivery):
    def __init__(self, subscription: NatsSubscription, msg: Msg) -> None:
        metadata = msg.metadata
        super().__init__(dict(msg.headers or {}), msg.data, int(metadata.num_delivered or 1))
        self._subscription = subscription
        self._msg = msg
        self.stream_sequence = int(metadata.sequence.stream) if metadata.sequence else 0

    async def _ack(self) -> None:
        try:
            await self._msg.ack()
        except Exception as exc:
            raise translate_nats_error(exc, "acking a delivery") from exc

    async def _nack(self, delay: float) -> None:
        try:
            await self._msg.nak(delay=delay if delay > 0 else None)
        except Exception as exc:
            raise translate_nats_error(exc, "nacking a delivery") from exc

    async def _reject(self, reason: str) -> None:
        sub = self._subscription
        headers = {k: v for k, v in self.headers.items() if not k.startswith("Nats-")}
        headers["accord-dead-group"] = _one_line(sub.group)
        headers["accord-dead-attempt"] = str(self.attempt)
        origin = self.message.id if self.message else f"seq-{self.stream_sequence}"
        # A distinct Nats-Msg-Id: the original id would be dropped as a duplicate.
        headers["Nats-Msg-Id"] = f"{origin}:dead:{sub.durable}"
        said = _one_line(reason) or "rejected"
        try:
            try:
                await self._copy_dead(headers, self.body, said)
            except nats.js.errors.APIError as exc:
                if exc.err_code != _EXCEEDS_MAXIMUM:
                    raise
                await self._copy_dead(headers, b"", self._too_large(said, "max_msg_size"))
            await self._msg.term()
        except Exception as exc:
            raise translate_nats_error(exc, "dead-lettering a delivery") from exc

    async def _copy_dead(self, headers: dict[str, str], body: bytes, reason: str) -> None:
        """Store the dead copy: ``body`` with ``headers`` and the reason, cut to fit
        max_payload (headers count; the server closes the connection on a larger
        message, for good) and JetStream's 64 kB of headers. A body too large for that
        leaves the copy empty, the reason saying where the original is."""
        sub = self._subscription
        line = len("accord-dead-reason: \r\n")
        limit = sub.nc.max_payload - line
        if len(body) + header_size(headers) > limit:
            body, reason = b"", self._too_large(reason, "max_payload")
        # JetStream also refuses headers over 64 kB, whatever max_payload allows: a long
        # reason failed the copy, and the delivery came back after every ack_wait.
        room = min(limit - len(body), MAX_HEADER_BYTES - line) - header_size(headers)
        cut = reason.encode()[: max(0, room)].decode(errors="ignore")
        await sub.js.publish(
            f"{sub.channel}._dead.{sub.durable}",
            body,
            headers={**headers, "accord-dead-reason": cut},
            timeout=sub.publish_timeout,
        )

    def _too_large(self, reason: str, limit: str) -> str:
        return (
            f"{reason} [the message ({len(self.body):,} bytes) is too large to copy under "
            f"{limit}: it stays in stream sequence {self.stream_sequence}]"
        )

    async def keep_alive(self) -> None:
        await self._msg.in_progress()


class NatsSubscription(Subscription):
    """Pulls batches from a durable consumer and hands them to the handler in chunks of
    at most ``max_batch``, one call at a time."""

    def __init__(
        self,
        nc: _NatsClient,
        js: JetStreamContext,
        psub: JetStreamContext.PullSubscription,
        handler: BatchHandler,
        *,
        channel: str,
        group: str,
        topics: tuple[str, ...],
        exact: bool,
        prefetch: int,
        max_batch: int,
        ack_wait: float,
        publish_timeout: float,
    ) -> None:
        self.nc = nc
        self.js = js
        self.channel = channel
        self.group = group
        self.durable = safe_name(group)
        self.publish_timeout = publish_timeout
        self._psub = psub
        self._handler = handler
        self._topics = topics
        self._exact = exact
        self._prefetch = prefetch
        self._max_batch = max_batch
        self._ack_wait = ack_wait
        self._dead_prefix = f"{channel}._dead."
        self._held: list[_NatsDelivery] = []
        self._stopped = False
        self._task = asyncio.create_task(self._run(), name=f"accord-nats-{group}")
        self._keeper = asyncio.create_task(self._keep_alive(), name=f"accord-nats-keep-{group}")

    def _wanted(self, msg: Msg) -> bool:
        if msg.subject.startswith(self._dead_prefix):
            return False
        if self._exact:
            return True
        message_type = msg.subject[len(self.channel) + 1 :]
        return any(topic_matches(topic, message_type) for topic in self._topics)

    async def _run(self) -> None:
        backoff = 0.05
        # Checked as well as cancelled: asyncio.wait_for on Python 3.11 can swallow a
        # cancellation that races with its timeout, and the loop must still end.
        while not self._stopped:
            try:
                msgs = await self._psub.fetch(self._prefetch, timeout=FETCH_WAIT)
            except asyncio.CancelledError:
                raise
            except (TimeoutError, nats.errors.TimeoutError):
                continue  # nothing arrived (or the server was away): ask again
            except Exception as exc:
                log.warning("pulling for group %r failed (%r); retrying", self.group, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.05
            received = [_NatsDelivery(self, msg) for msg in msgs]
            self._held = received
            wanted: list[_NatsDelivery] = []
            unwanted: list[_NatsDelivery] = []
            for delivery in received:
                (wanted if self._wanted(delivery._msg) else unwanted).append(delivery)
            # Types the filter subject could not exclude are done: acked at once.
            await self._settle(unwanted, None)
            for start in range(0, len(wanted), self._max_batch):
                if self._stopped:
                    break  # stop() gives the rest back
                await self._dispatch(wanted[start : start + self._max_batch])
            if not self._stopped:
                self._held = []

    async def _dispatch(self, batch: Sequence[_NatsDelivery]) -> None:
        try:
            await self._handler(batch)
        except asyncio.CancelledError:
            raise  # stop() gives the deliveries back
        except Exception:
            log.exception("handler of group %r failed; redelivering", self.group)
            await self._settle(batch, DEFAULT_REDELIVERY_DELAY)
        else:
            await self._settle(batch, None)

    async def _settle(self, batch: Sequence[_NatsDelivery], nack_delay: float | None) -> None:
        """Ack (or nack after ``nack_delay``) what the handler left unsettled. Each is one
        buffered publish on the connection, no round trip: they leave together with the
        next pull request, in order before it."""
        failure: TransportError | None = None
        for delivery in batch:
            try:
                if nack_delay is None:
                    await delivery.ack()
                else:
                    await delivery.nack(nack_delay)
            except TransportError as exc:
                failure = exc
        if failure is not None:
            # Settling failed (connection lost): JetStream redelivers after ack_wait.
            log.warning("settling deliveries of group %r failed: %s", self.group, failure)

    async def _keep_alive(self) -> None:
        # Deliveries held longer than ack_wait (slow handler, large batch) would be
        # redelivered to another consumer meanwhile; "in progress" resets their timer.
        interval = max(self._ack_wait / 3, 0.2)
        while not self._stopped:
            await asyncio.sleep(interval)
            for delivery in list(self._held):
                if not delivery.settled:
                    with contextlib.suppress(Exception):
                        await delivery.keep_alive()

    async def stop(self) -> None:
        """Stop pulling; give every received, unsettled delivery back (``nak``) so it
        is redelivered at once. A running handler is cancelled."""
        if self._stopped:
            return
        self._stopped = True
        for task in (self._task, self._keeper):
            task.cancel()
        await asyncio.wait({self._task, self._keeper}, timeout=FETCH_WAIT + self.publish_timeout)
        with contextlib.suppress(Exception):
            await self._psub.unsubscribe()
        leftovers = list(self._held)
        # Messages that answered a pull request but were not taken yet.
        queue = getattr(getattr(self._psub, "_sub", None), "_pending_queue", None)
        while queue is not None and not queue.empty():
            msg = queue.get_nowait()
            if msg.reply and not (msg.headers or {}).get("Status"):
                with contextlib.suppress(Exception):
                    leftovers.append(_NatsDelivery(self, msg))
        for delivery in leftovers:
            with contextlib.suppress(Exception):
                await delivery.nack(0)
        self._held = []
        with contextlib.suppress(Exception):
            await self.nc.flush(timeout=max(1, int(self.publish_timeout)))
