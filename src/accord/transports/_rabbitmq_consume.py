"""RabbitMQ consuming: one subscription = one channel, one consumer, one handler call at a time.

Imported only by :mod:`accord.transports.rabbitmq`, after it checked that aio-pika is
installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Iterator, Sequence
from typing import Protocol

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustQueue
from aiormq.exceptions import ChannelInvalidStateError

from accord.errors import TransportError
from accord.transports._rabbitmq_support import (
    attempt_of,
    delivery_headers,
    translated,
)
from accord.transports.base import (
    DEFAULT_REDELIVERY_DELAY,
    BatchHandler,
    Delivery,
    Subscription,
)

__all__ = ["RabbitSubscription"]

log = logging.getLogger("accord.transports.rabbitmq")

#: Seconds to wait for the broker while cancelling a consumer or closing its channel.
_CLOSE_TIMEOUT = 5.0


class _Requeuer(Protocol):
    """What a delivery needs from its transport to put a message back or dead-letter it."""

    @property
    def queue_type(self) -> str: ...

    async def redeliver_later(
        self, group: str, incoming: AbstractIncomingMessage, attempt: int, delay: float
    ) -> None: ...

    async def dead_letter(
        self, group: str, incoming: AbstractIncomingMessage, attempt: int, reason: str
    ) -> None: ...


class _InFlight:
    """Counts settlements that have started but may not have reached the broker yet.

    A ``basic.ack`` with ``multiple`` also settles every lower delivery tag of the
    channel still outstanding; sent while another delivery's ack, nack or dead-letter
    copy is under way (a handler may settle from a task of its own), it could settle
    that one first and make its own settlement a double ack, which closes the channel.
    """

    def __init__(self) -> None:
        self.count = 0

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        self.count += 1
        try:
            yield
        finally:
            self.count -= 1


class _RabbitDelivery(Delivery):
    """A delivery from a group queue; settles on the channel it arrived on."""

    def __init__(
        self,
        requeuer: _Requeuer,
        group: str,
        incoming: AbstractIncomingMessage,
        in_flight: _InFlight,
    ) -> None:
        super().__init__(
            delivery_headers(incoming.headers, incoming.content_type),
            incoming.body,
            attempt_of(
                incoming.headers,
                bool(incoming.redelivered),
                quorum=requeuer.queue_type == "quorum",
            ),
        )
        self._requeuer = requeuer
        self._group = group
        self._incoming = incoming
        self._in_flight = in_flight

    async def _ack(self) -> None:
        with self._in_flight(), translated("acknowledging a delivery"):
            await self._incoming.ack()

    async def _nack(self, delay: float) -> None:
        # RabbitMQ cannot delay a redelivery by itself: a copy goes to a delay queue
        # (confirmed) and only then is the original acked, so a crash in between
        # duplicates the message rather than losing it.
        with self._in_flight():
            try:
                await self._requeuer.redeliver_later(
                    self._group, self._incoming, self.attempt + 1, delay
                )
            except TransportError as exc:
                log.warning("could not schedule a delayed redelivery (%s); requeueing at once", exc)
                with translated("requeueing a delivery"):
                    await self._incoming.nack(requeue=True)
                return
            await self._ack()

    async def _reject(self, reason: str) -> None:
        with self._in_flight():
            try:
                await self._requeuer.dead_letter(self._group, self._incoming, self.attempt, reason)
            except TransportError as exc:
                # The group queue dead-letters to the same exchange natively (without the
                # reason header, but with RabbitMQ's x-death): the message is not lost.
                log.warning("could not publish a dead letter with its reason (%s); rejecting", exc)
                with translated("rejecting a delivery"):
                    await self._incoming.reject(requeue=False)
                return
            await self._ack()


class RabbitSubscription(Subscription):
    """A consumer of one group queue on its own channel (prefetch = basic_qos).

    aio-pika calls consumer callbacks concurrently, so the callback only buffers the
    delivery; one task takes a batch (the first delivery it waits for, then whatever
    else is buffered, up to ``max_batch``), runs the handler on it and settles what
    the handler left, in arrival order. After a reconnect, buffered deliveries of the
    old channel are dropped: the broker redelivers them (flagged ``redelivered``) on
    the restored consumer.
    """

    def __init__(
        self,
        requeuer: _Requeuer,
        group: str,
        handler: BatchHandler,
        channel: AbstractRobustChannel,
        queue: AbstractRobustQueue,
        stop_timeout: float,
        *,
        max_batch: int = 1,
    ) -> None:
        self._requeuer = requeuer
        self._group = group
        self._handler = handler
        self._channel = channel
        self._queue = queue
        self._stop_timeout = stop_timeout
        self._max_batch = max(1, max_batch)
        self._buffer: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._in_flight = _InFlight()
        self._consumer_tag: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._busy = False
        self._stopping = False

    async def start(self) -> None:
        """Start consuming. Raises TransportError if the broker refuses."""
        self._task = asyncio.create_task(self._run(), name=f"accord-rabbitmq-{self._group}")
        try:
            with translated(f"consuming group {self._group!r}"):
                self._consumer_tag = await self._queue.consume(self._received, no_ack=False)
        except TransportError:
            await self.stop()
            raise

    async def _received(self, incoming: AbstractIncomingMessage) -> None:
        self._buffer.put_nowait(incoming)

    async def _run(self) -> None:
        while not self._stopping:
            batch = [await self._buffer.get()]
            while len(batch) < self._max_batch and not self._buffer.empty():
                batch.append(self._buffer.get_nowait())
            if self._stopping:
                break  # left unsettled: closing the channel requeues them
            deliveries = await self._deliveries(batch)
            if not deliveries:
                continue
            self._busy = True
            try:
                await self._handler(deliveries)
            except Exception:
                log.warning(
                    "handler of group %r failed; redelivering %d delivery(ies) later",
                    self._group,
                    len(deliveries),
                    exc_info=True,
                )
                if not self._stopping:
                    for delivery in deliveries:
                        await self._settle(delivery.nack(DEFAULT_REDELIVERY_DELAY))
            else:
                # Also while stopping: the handler finished with them (a consumer's
                # batch has committed), so requeueing them would only deliver them again.
                await self._ack_rest(deliveries)
            finally:
                self._busy = False

    async def _deliveries(self, batch: Sequence[AbstractIncomingMessage]) -> list[_RabbitDelivery]:
        """The deliveries of a batch, leaving out those that cannot be settled."""
        deliveries: list[_RabbitDelivery] = []
        for incoming in batch:
            try:
                incoming.channel  # noqa: B018 - raises once the channel it came on is gone
            except ChannelInvalidStateError:
                continue  # the broker redelivers it on the restored channel
            try:
                deliveries.append(
                    _RabbitDelivery(self._requeuer, self._group, incoming, self._in_flight)
                )
            except Exception:
                # Decoding failures become Delivery.decode_error; anything else is a bug
                # that must not stop the consumer: dead-letter natively and carry on.
                log.exception("could not read a delivery of group %r; dead-lettering", self._group)
                await self._settle(incoming.reject(requeue=False))
        return deliveries

    async def _ack_rest(self, deliveries: Sequence[_RabbitDelivery]) -> None:
        """Ack the deliveries the handler left unsettled: one ``basic.ack`` with
        ``multiple`` per channel when that is safe, one ack each otherwise.

        ``multiple`` settles every outstanding tag up to the one named. Deliveries reach
        this loop in tag order per channel and every earlier batch is settled, so the
        outstanding lower tags of a channel are exactly this batch's unsettled ones,
        unless a settlement is still under way (``_InFlight``). Deliveries of another
        channel (an old one, before a reconnect) are grouped apart: tags restart per
        channel.
        """
        rest = [d for d in deliveries if not d.settled]
        if not rest:
            return
        if len(rest) == 1 or self._in_flight.count:
            for delivery in rest:
                await self._settle(delivery.ack())
            return
        by_channel: dict[int, list[_RabbitDelivery]] = {}
        for delivery in rest:
            try:
                channel = delivery._incoming.channel
            except ChannelInvalidStateError:
                # Its channel is gone; the broker redelivers it. The ack fails and says so.
                await self._settle(delivery.ack())
                continue
            by_channel.setdefault(id(channel), []).append(delivery)
        for same_channel in by_channel.values():
            if len(same_channel) == 1 or any(
                d._incoming.delivery_tag is None for d in same_channel
            ):
                for delivery in same_channel:
                    await self._settle(delivery.ack())
                continue
            last = max(same_channel, key=lambda d: d._incoming.delivery_tag or 0)
            for delivery in same_channel:
                delivery.settled = True
            await self._settle(self._ack_up_to(last, len(same_channel)))

    async def _ack_up_to(self, last: _RabbitDelivery, count: int) -> None:
        with translated(f"acknowledging {count} deliveries"):
            await last._incoming.ack(multiple=True)

    async def _settle(self, settling: Awaitable[None]) -> None:
        try:
            await settling
        except Exception as exc:
            log.warning(
                "could not settle a delivery of group %r (%s); the broker will redeliver it",
                self._group,
                exc,
            )

    async def stop(self) -> None:
        """Stop consuming. The handler call in progress finishes (up to ``stop_timeout``
        seconds, then it is cancelled); every delivery not settled by then is requeued."""
        if self._stopping:
            return
        self._stopping = True
        if self._consumer_tag is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_CLOSE_TIMEOUT):
                    await self._queue.cancel(self._consumer_tag)
        task = self._task
        if task is not None:
            if not self._busy:
                task.cancel()
            done, _ = await asyncio.wait({task}, timeout=self._stop_timeout)
            if not done:
                log.warning("handler of group %r did not finish in time; cancelling", self._group)
                task.cancel()
                await asyncio.wait({task})
            if not task.cancelled() and task.exception() is not None:
                log.error("consumer of group %r crashed", self._group, exc_info=task.exception())
        # Closing the channel hands every unacked delivery back to the broker.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await self._channel.close()
