"""RabbitMQ transport (aio-pika): topic exchange, durable queue per group, publisher confirms.

What it declares (see :class:`RabbitTopology`): a durable topic exchange named by
``channel``, routed by message ``type`` (AMQP ``*``/``#`` patterns are the group's
topics, unchanged); a durable queue ``{channel}.{group}`` per consumer group; a
dead-letter exchange ``{channel}.dead`` with a queue ``{channel}.{group}.dead`` per
group; and delay queues ``{channel}.{group}.retry.*`` for ``nack(delay)``.

* Messages are persistent and travel in CloudEvents binary mode: ``ce-*`` AMQP
  headers, ``content_type`` = ``datacontenttype``, ``message_id`` = ``id`` (the
  CloudEvents RabbitMQ binding).
* :meth:`RabbitTransport.subscribe_batches` hands the handler what has arrived (up
  to ``max_batch``) and acks what it left unsettled with one ``basic.ack`` covering
  the highest delivery tag (``multiple``), falling back to one ack each when a lower
  tag of the channel might still be unsettled.
* :meth:`RabbitTransport.publish` sends a whole batch on one channel with publisher
  confirms, all messages in flight at once (so the broker keeps batch order), then
  waits for every confirm.
* ``nack(delay)``: RabbitMQ has no delayed redelivery without a plugin. The message
  is copied to a delay queue with a per-message expiration; on expiry RabbitMQ
  dead-letters it back into the group queue. Per-message TTL only expires at the head
  of a queue, so delays are split over buckets (0.25 s, 0.5 s, 1 s ... about 12
  days, past the week a nack waits at most): a message waits at most its bucket's
  bound, i.e. at most twice the delay asked for, never behind a much longer delay.
* ``attempt`` is carried in the ``x-accord-attempt`` header of redelivered copies;
  a broker redelivery (a consumer went away without settling) adds one.
* ``reject(reason)``: the message is copied to ``{channel}.dead`` (routing key = group)
  with the reason in the ``x-accord-reason`` header, then acked. Group queues also
  dead-letter natively to that exchange, the fallback when the copy cannot be made.
* The connection is robust: after a broker restart or network loss aio-pika
  reconnects, redeclares and resumes every subscription; publishing raises
  :class:`~accord.errors.TransportUnavailable` within ``publish_timeout`` meanwhile.
* Changing a group's topics adds bindings but never removes old ones (RabbitMQ
  cannot list them without the management plugin): unbind by hand if you narrow them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, Literal

from accord.errors import MissingExtraError

try:
    import aio_pika
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise MissingExtraError("RabbitMQ", "rabbitmq", "aio-pika") from exc

import aiormq
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustQueue,
)
from pamqp.commands import Basic

from accord.errors import (
    ConfigurationError,
    MessageTooLarge,
    TransportError,
    TransportUnavailable,
)
from accord.messages import Message
from accord.transports._rabbitmq_consume import RabbitSubscription
from accord.transports._rabbitmq_support import (
    ATTEMPT_HEADER,
    GROUP_HEADER,
    REASON_HEADER,
    RabbitTopology,
    check_names,
    encode_publish,
    envelope_properties,
    fit_header_frame,
    redact,
    refused_size,
    republish_properties,
    send_confirmed,
    translate,
    translated,
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

__all__ = ["RabbitTopology", "RabbitTransport"]

log = logging.getLogger("accord.transports.rabbitmq")

# How long a publish waits, in 10 ms polls, for a channel the broker closed to reopen.
_REOPEN_POLLS = 100


class RabbitTransport(Transport):
    """A :class:`~accord.transports.base.Transport` on RabbitMQ (see the module doc).

    ``url`` is an AMQP URL (``amqp://user:password@host:5672/vhost``); ``channel``
    names the exchange that publishers and consumers share. ``publish_timeout``
    bounds how long :meth:`publish` waits for the broker (reconnection included)
    before it raises; ``connect_timeout`` bounds :meth:`connect`;
    ``reconnect_interval`` is the pause between reconnection attempts;
    ``stop_timeout`` bounds how long stopping waits for a running handler.
    ``max_message_size`` is the broker's (16 MiB, RabbitMQ 4's default; 3.x allows
    128 MiB: raise it to match yours): a larger message fails alone with
    :class:`~accord.errors.MessageTooLarge` before it is sent, since RabbitMQ would
    close the channel on it and fail the rest of the batch. Should the broker's be
    smaller, its refusal is a ``MessageTooLarge`` too, the messages sent after it
    in the batch fail as an outage (``TransportUnavailable``: tried again), and the
    transport keeps to the broker's limit until it connects again
    (:attr:`message_size_limit`).
    """

    name = "rabbitmq"

    def __init__(
        self,
        url: str,
        *,
        channel: str = "accord",
        publish_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        reconnect_interval: float = 1.0,
        stop_timeout: float = 30.0,
        max_message_size: int = 16 * 1024 * 1024,
        queue_type: Literal["classic", "quorum"] = "classic",
    ) -> None:
        check_names(channel)
        check_seconds(
            "RabbitTransport", publish_timeout=publish_timeout, connect_timeout=connect_timeout
        )
        check_seconds(
            "RabbitTransport",
            zero_ok=True,
            reconnect_interval=reconnect_interval,
            stop_timeout=stop_timeout,
        )
        check_counts("RabbitTransport", max_message_size=max_message_size)
        if queue_type not in ("classic", "quorum"):
            raise ConfigurationError(
                f"RabbitTransport: queue_type must be 'classic' or 'quorum', not {queue_type!r}"
            )
        self.url = url
        self.channel = channel
        self.topology = RabbitTopology(channel)
        self.publish_timeout = publish_timeout
        self.connect_timeout = connect_timeout
        self.reconnect_interval = reconnect_interval
        self.stop_timeout = stop_timeout
        self.max_message_size = max_message_size
        # The broker's own limit, learned from its refusal (a channel reads it when it
        # opens): forgotten with the connection, since a restart may raise it.
        self._broker_limit: int | None = None
        self.queue_type = queue_type
        self._connection: AbstractRobustConnection | None = None
        self._publisher: AbstractRobustChannel | None = None
        self._subscriptions: list[RabbitSubscription] = []
        # One close() at a time: a second one, finding the subscriptions gone, would
        # close the connection under the handlers the first is waiting for.
        self._closing = asyncio.Lock()
        self._groups: set[str] = set()
        self._declared: set[str] = set()
        self._connect_lock = asyncio.Lock()
        self._declare_lock = asyncio.Lock()
        self._closed = False

    @property
    def groups(self) -> frozenset[str]:
        """The consumer groups this transport declared or subscribed to."""
        return frozenset(self._groups)

    async def connect(self) -> None:
        """Connect (robustly) and declare the exchange. Idempotent; raises
        TransportUnavailable if RabbitMQ cannot be reached within ``connect_timeout``."""
        async with self._connect_lock:
            self._closed = False
            if self._connection is not None:
                return
            connection: AbstractRobustConnection | None = None
            try:
                async with asyncio.timeout(self.connect_timeout):
                    connection = await aio_pika.connect_robust(
                        self.url,
                        timeout=self.connect_timeout,
                        reconnect_interval=self.reconnect_interval,
                        client_properties={"connection_name": f"accord:{self.channel}"},
                    )
                    publisher = await connection.channel(publisher_confirms=True)
                    await publisher.declare_exchange(
                        self.topology.exchange, aio_pika.ExchangeType.TOPIC, durable=True
                    )
            except BaseException as exc:  # also on cancellation: never leak a connection
                if connection is not None:
                    await _close_quietly(connection)
                if not isinstance(exc, Exception):
                    raise
                raise translate(exc, f"connecting to RabbitMQ at {redact(self.url)}") from exc
            connection.reconnect_callbacks.add(self._forget_broker_limit)
            self._connection, self._publisher = connection, publisher
            self._broker_limit = None

    def _forget_broker_limit(self, *_: Any) -> None:
        self._broker_limit = None

    @property
    def message_size_limit(self) -> int:
        """The largest body sent: ``max_message_size``, or the broker's own limit if it
        refused a message under it on this connection."""
        if self._broker_limit is None:
            return self.max_message_size
        return min(self.max_message_size, self._broker_limit)

    async def publish(self, messages: Sequence[Message]) -> None:
        """Publish a batch with confirms, pipelined; see :meth:`publish_envelopes`."""
        await self.publish_envelopes([Envelope.of(message) for message in messages])

    async def publish_envelopes(self, envelopes: Sequence[Envelope]) -> None:
        """Publish a batch with confirms, pipelined; see the class contract.

        Raises :class:`~accord.errors.TransportUnavailable` if RabbitMQ cannot be
        reached (nothing confirmed) within ``publish_timeout``, and
        :class:`~accord.errors.PublishError` naming exactly the messages the broker
        did not confirm otherwise.
        """
        if not envelopes:
            return
        if self._closed:
            raise TransportUnavailable("this RabbitTransport is closed; call connect() again")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.publish_timeout
        if self._connection is None:
            try:
                async with asyncio.timeout(self.publish_timeout):
                    await self.connect()
            except TimeoutError as exc:
                raise TransportUnavailable(
                    f"could not connect to RabbitMQ at {redact(self.url)} within "
                    f"publish_timeout={self.publish_timeout}s; nothing was published"
                ) from exc
        channel = await self._underlay(deadline, f"publishing {len(envelopes)} message(s)")
        # Encoded one by one: a message that cannot be encoded fails alone.
        encoded: list[bytes | Exception] = []
        for envelope in envelopes:
            if len(envelope.body) > self.message_size_limit:
                # RabbitMQ would close the channel on it, failing every message sent
                # after it in this batch: it never leaves.
                encoded.append(self._too_large(envelope))
                continue
            try:
                properties, body = envelope_properties(envelope)
                encoded.append(
                    encode_publish(channel, self.topology.exchange, envelope.type, properties, body)
                )
            except Exception as exc:
                encoded.append(exc)
        publishes = [e for e in encoded if isinstance(e, bytes)]
        confirms: list[asyncio.Future[Any]] = []
        try:
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                async with channel.lock:
                    if publishes:
                        await send_confirmed(channel, publishes, confirms)
                if confirms:
                    await asyncio.wait(confirms, timeout=max(0.0, deadline - loop.time()))
        except TimeoutError as exc:
            if not confirms:
                raise TransportUnavailable(
                    f"RabbitMQ did not take {len(envelopes)} message(s) within "
                    f"publish_timeout={self.publish_timeout}s; nothing was published"
                ) from exc
        except Exception as exc:
            if not confirms:
                raise translate(exc, f"publishing {len(envelopes)} message(s)") from exc
            # Sent: the channel closed under them, and their futures say so.
        finally:
            for confirm in confirms:
                confirm.cancel()  # unconfirmed by the deadline (aiormq ignores a late ack)
        failed: dict[str, BaseException] = {}
        settled = iter(confirms)
        for envelope, sent in zip(envelopes, encoded, strict=True):
            if isinstance(sent, Exception):
                failed[envelope.id] = translate(sent, "publishing")
                continue
            problem = _publish_problem(next(settled), self.publish_timeout)
            if problem is not None:
                failed[envelope.id] = problem
        self._sort_out_refused_sizes(envelopes, failed)
        raise_unconfirmed(failed, len(envelopes), "RabbitMQ")

    def _typed(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """Queue ``arguments``, with the queue type when it is not RabbitMQ's default
        (a classic queue is declared as before, so existing ones stay equivalent)."""
        if self.queue_type == "quorum":
            return {**arguments, "x-queue-type": "quorum"}
        return arguments

    def _too_large(self, envelope: Envelope) -> MessageTooLarge:
        return MessageTooLarge(
            f"message {envelope.id} is {len(envelope.body):,} bytes; RabbitMQ takes at most "
            f"max_message_size={self.message_size_limit:,} (set it in rabbitmq.conf, at most "
            "512 MiB, and on RabbitTransport alike)"
        )

    def _sort_out_refused_sizes(
        self, envelopes: Sequence[Envelope], failed: dict[str, BaseException]
    ) -> None:
        """RabbitMQ closed the channel on a message over a ``max_message_size`` smaller
        than this transport's: the messages sent after it failed with it. Only those
        over the broker's limit are too large; the others go back as an outage (tried
        again, no attempt spent). The broker's limit is this transport's until it
        connects again, so such a message no longer leaves meanwhile."""
        limit = next(filter(None, map(refused_size, failed.values())), None)
        if limit is None:
            return
        if limit < self.message_size_limit:
            log.warning(
                "RabbitMQ takes messages of at most %d bytes; keeping to that on this "
                "connection instead of max_message_size=%d (set "
                "RabbitTransport(max_message_size=...) to match)",
                limit,
                self.max_message_size,
            )
            self._broker_limit = limit
        for envelope in envelopes:
            if refused_size(failed.get(envelope.id)) is None:
                continue
            if len(envelope.body) > limit:
                failed[envelope.id] = self._too_large(envelope)
            else:
                failed[envelope.id] = TransportUnavailable(
                    f"the channel closed on a message of this batch larger than RabbitMQ "
                    f"takes ({limit:,} bytes) before this one was confirmed; retry"
                )

    async def declare(self, group: str, *, topics: Sequence[str] = ("#",)) -> None:
        """Declare the group's durable queue (bound to ``topics``) and its dead-letter
        queue, without consuming. The queue is declared on a channel of its own, closed
        after: a refusal (an existing queue with other arguments) never closes the
        channel the relays publish on."""
        _queue, channel = await self._declare_group(group, topics)
        await _close_quietly(channel)

    async def _declare_group(
        self, group: str, topics: Sequence[str], *, prefetch: int | None = None
    ) -> tuple[AbstractRobustQueue, AbstractRobustChannel]:
        """Declare the group's dead-letter queue, its queue and the queue's bindings.
        The queue is declared on a new channel (with ``basic_qos(prefetch)`` if given),
        returned to the caller with it; closed here if the declaration fails."""
        check_group(group, topics)
        check_names(self.channel, group)
        if self._closed:
            raise TransportUnavailable("this RabbitTransport is closed; call connect() again")
        await self.connect()
        assert self._connection is not None and self._publisher is not None
        channel: AbstractRobustChannel | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                dead = await self._publisher.declare_exchange(
                    self.topology.dead_exchange, aio_pika.ExchangeType.DIRECT, durable=True
                )
                dead_queue = await self._publisher.declare_queue(
                    self.topology.dead_queue(group), durable=True, arguments=self._typed({})
                )
                await dead_queue.bind(dead, routing_key=group)
                channel = await self._connection.channel(publisher_confirms=False)
                if prefetch is not None:
                    await channel.set_qos(prefetch_count=prefetch)
                queue = await channel.declare_queue(
                    self.topology.queue(group),
                    durable=True,
                    arguments=self._typed(
                        {
                            "x-dead-letter-exchange": self.topology.dead_exchange,
                            "x-dead-letter-routing-key": group,
                        }
                    ),
                )
                for topic in dict.fromkeys(topics):
                    await queue.bind(self.topology.exchange, routing_key=topic)
        except BaseException as exc:
            if channel is not None:
                await _close_quietly(channel)
            if isinstance(exc, Exception):
                raise translate(exc, f"declaring consumer group {group!r}") from exc
            raise
        self._groups.add(group)
        return queue, channel

    async def subscribe_batches(
        self,
        group: str,
        handler: BatchHandler,
        *,
        topics: Sequence[str] = ("#",),
        prefetch: int = 64,
        max_batch: int = 64,
    ) -> Subscription:
        """Declare the group's queues and bindings durably, then consume on a channel of
        its own with ``basic_qos(prefetch)``; each handler call gets what has arrived, up
        to ``max_batch``, and the deliveries it leaves unsettled are acked in one
        ``basic.ack`` (``multiple``) where that is safe."""
        check_batching(prefetch, max_batch)
        queue, channel = await self._declare_group(group, topics, prefetch=prefetch)
        subscription = RabbitSubscription(
            self,
            group,
            handler,
            channel,
            queue,
            self.stop_timeout,
            max_batch=max_batch if prefetch < 1 else min(max_batch, prefetch),
        )
        await subscription.start()
        self._subscriptions.append(subscription)
        return subscription

    async def close(self) -> None:
        """Stop every subscription (unsettled deliveries go back to their queues) and
        close the connection. Idempotent; a close() while one runs waits for it."""
        self._closed = True
        async with self._closing:
            subscriptions, self._subscriptions = self._subscriptions, []
            for subscription in subscriptions:
                await subscription.stop()
            connection, self._connection, self._publisher = self._connection, None, None
            self._declared.clear()
            if connection is not None:
                await _close_quietly(connection)

    # -- used by deliveries ---------------------------------------------------------

    async def redeliver_later(
        self, group: str, incoming: AbstractIncomingMessage, attempt: int, delay: float
    ) -> None:
        """Put a copy of ``incoming`` back for ``group`` after ``delay`` seconds, with
        ``attempt``; returns once the broker confirmed the copy."""
        target = self.topology.queue(group)
        expiration: int | None = None
        if delay > 0:
            target = await self._declare_retry_queue(group, delay)
            expiration = max(1, round(delay * 1000))
        properties = republish_properties(
            incoming.properties, incoming.headers, {ATTEMPT_HEADER: attempt}, expiration
        )
        # The default exchange routes by queue name.
        await self._republish("", target, properties, incoming.body)

    async def dead_letter(
        self, group: str, incoming: AbstractIncomingMessage, attempt: int, reason: str
    ) -> None:
        """Copy ``incoming`` to the dead-letter exchange with its reason; returns once
        the broker confirmed the copy."""
        properties = republish_properties(
            incoming.properties,
            incoming.headers,
            {REASON_HEADER: reason, GROUP_HEADER: group, ATTEMPT_HEADER: attempt},
        )
        await self._republish(self.topology.dead_exchange, group, properties, incoming.body)

    async def _declare_retry_queue(self, group: str, delay: float) -> str:
        name = self.topology.retry_queue(group, delay)
        if name in self._declared:
            return name
        async with self._declare_lock:
            if name not in self._declared:
                publisher = self._require_publisher()
                with translated(f"declaring the delay queue {name!r}"):
                    async with asyncio.timeout(self.publish_timeout):
                        await publisher.declare_queue(
                            name,
                            durable=True,
                            arguments=self._typed(
                                {
                                    "x-dead-letter-exchange": "",
                                    "x-dead-letter-routing-key": self.topology.queue(group),
                                }
                            ),
                        )
                self._declared.add(name)
        return name

    async def _republish(
        self, exchange: str, routing_key: str, properties: Basic.Properties, body: bytes
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.publish_timeout
        channel = await self._underlay(deadline, f"republishing to {routing_key!r}")
        with translated(f"republishing to {routing_key!r}"):
            # A dead letter's reason may be long: cut to fit one frame, since RabbitMQ
            # closes the connection on a larger one (and the delivery came back).
            properties = fit_header_frame(channel, properties, len(body))
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                # mandatory: a copy no queue takes (a delay queue deleted under us) comes
                # back instead of being confirmed and dropped; the original stays unacked.
                result = await channel.basic_publish(
                    body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=properties,
                    mandatory=True,
                )
        if not isinstance(result, Basic.Ack):
            self._declared.discard(routing_key)  # declared again by the next copy
            raise TransportError(
                f"RabbitMQ did not take the copy sent to {routing_key!r} (no queue for it, "
                "or not confirmed); the original delivery is left unsettled and comes back"
            )

    def _require_publisher(self) -> AbstractRobustChannel:
        if self._publisher is None:
            raise TransportUnavailable("this RabbitTransport is closed; call connect() again")
        return self._publisher

    async def _underlay(self, deadline: float, what: str) -> aiormq.Channel:
        """The live aiormq channel under the publisher channel, waiting (up to the
        deadline) while the robust connection reconnects."""
        publisher = self._require_publisher()
        remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        try:
            async with asyncio.timeout(remaining):
                channel = await publisher.get_underlay_channel()
                for _ in range(_REOPEN_POLLS):
                    if not channel.is_closed:
                        break
                    # The broker closed it (a message over its size): the robust
                    # channel opens another at once, in the background. (Over a
                    # lost connection this ends soon; the publish then says so.)
                    await asyncio.sleep(0.01)
                    channel = await publisher.get_underlay_channel()
                assert isinstance(channel, aiormq.Channel)
                return channel
        except TimeoutError as exc:
            raise TransportUnavailable(
                f"{what}: RabbitMQ at {redact(self.url)} is not reachable; gave up after "
                f"publish_timeout={self.publish_timeout}s with nothing published"
            ) from exc
        except Exception as exc:
            raise translate(exc, what) from exc


def _publish_problem(confirm: asyncio.Future[Any], timeout: float) -> TransportError | None:
    """Why a publish did not end with a broker ack, or None if it did."""
    if confirm.cancelled():
        return TransportUnavailable(f"no confirm from RabbitMQ within {timeout}s")
    exc = confirm.exception()
    if isinstance(exc, asyncio.CancelledError):  # aiormq closing the channel on its own
        return TransportUnavailable(f"the channel closed before RabbitMQ confirmed: {exc!r}")
    if exc is not None:
        return translate(exc, "publishing")
    result = confirm.result()
    if isinstance(result, Basic.Ack):
        return None
    return TransportError(f"RabbitMQ did not accept the message ({result!r})")


async def _close_quietly(closable: AbstractRobustConnection | AbstractRobustChannel) -> None:
    try:
        async with asyncio.timeout(5.0):
            await closable.close()
    except Exception:  # closing after a failure: the first error is the one to report
        pass
