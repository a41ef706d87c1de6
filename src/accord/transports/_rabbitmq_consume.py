"""RabbitMQ consuming: one subscription = one channel, one consumer, one handler at a time.

Imported only by :mod:`accord.transports.rabbitmq`, after it checked that aio-pika is
installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import Protocol

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustQueue
from aiormq.exceptions import ChannelInvalidStateError

from accord.errors import TransportError
from accord.transports._rabbitmq_support import (
    attempt_of,
    delivery_headers,
    translated,
)
from accord.transports.base import DEFAULT_REDELIVERY_DELAY, Delivery, Handler, Subscription

__all__ = ["RabbitSubscription"]

log = logging.getLogger("accord.transports.rabbitmq")

#: Seconds to wait for the broker while cancelling a consumer or closing its channel.
_CLOSE_TIMEOUT = 5.0


class _Requeuer(Protocol):
    """What a delivery needs from its transport to put a message back or dead-letter it."""

    async def redeliver_later(
        self, group: str, incoming: AbstractIncomingMessage, attempt: int, delay: float
    ) -> None: ...

    async def dead_letter(
        self, group: str, incoming: AbstractIncomingMessage, attempt: int, reason: str
    ) -> None: ...


class _RabbitDelivery(Delivery):
    """A delivery from a group queue; settles on the channel it arrived on."""

    def __init__(self, requeuer: _Requeuer, group: str, incoming: AbstractIncomingMessage) -> None:
        super().__init__(
            delivery_headers(incoming.headers, incoming.content_type),
            incoming.body,
            attempt_of(incoming.headers, bool(incoming.redelivered)),
        )
        self._requeuer = requeuer
        self._group = group
        self._incoming = incoming

    async def _ack(self) -> None:
        with translated("acknowledging a delivery"):
            await self._incoming.ack()

    async def _nack(self, delay: float) -> None:
        # RabbitMQ cannot delay a redelivery by itself: a copy goes to a delay queue
        # (confirmed) and only then is the original acked, so a crash in between
        # duplicates the message rather than losing it.
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
    delivery; one task runs the handler, one delivery at a time, in arrival order.
    After a reconnect, buffered deliveries of the old channel are dropped: the broker
    redelivers them (flagged ``redelivered``) on the restored consumer.
    """

    def __init__(
        self,
        requeuer: _Requeuer,
        group: str,
        handler: Handler,
        channel: AbstractRobustChannel,
        queue: AbstractRobustQueue,
        stop_timeout: float,
    ) -> None:
        self._requeuer = requeuer
        self._group = group
        self._handler = handler
        self._channel = channel
        self._queue = queue
        self._stop_timeout = stop_timeout
        self._buffer: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
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
            incoming = await self._buffer.get()
            if self._stopping:
                break  # left unsettled: closing the channel requeues it
            try:
                incoming.channel  # noqa: B018 - raises once the channel it came on is gone
            except ChannelInvalidStateError:
                continue  # the broker redelivers it on the restored channel
            try:
                delivery = _RabbitDelivery(self._requeuer, self._group, incoming)
            except Exception:
                # Decoding failures become Delivery.decode_error; anything else is a bug
                # that must not stop the consumer: dead-letter natively and carry on.
                log.exception("could not read a delivery of group %r; dead-lettering", self._group)
                await self._settle(incoming.reject(requeue=False))
                continue
            self._busy = True
            try:
                await self._handler(delivery)
            except Exception:
                log.warning(
                    "handler of group %r failed; redelivering later", self._group, exc_info=True
                )
                if not self._stopping:
                    await self._settle(delivery.nack(DEFAULT_REDELIVERY_DELAY))
            else:
                # Stopping: a delivery the handler left unsettled goes back to the queue
                # (channel close requeues it), as the Subscription contract says.
                if not self._stopping:
                    await self._settle(delivery.ack())
            finally:
                self._busy = False

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
