"""An in-process transport for users' unit tests. Not durable; not for production.

Transports made with the same :class:`MemoryBroker` see each other's messages,
the way several processes share one real broker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from accord.errors import TransportUnavailable
from accord.messages import Message, encode
from accord.transports.base import (
    DEFAULT_REDELIVERY_DELAY,
    BatchHandler,
    Delivery,
    Subscription,
    Transport,
    check_batching,
    check_group,
    topic_matches,
)

__all__ = ["MemoryBroker", "MemoryTransport"]

_Item = tuple[dict[str, str], bytes, int]


@dataclass
class _Group:
    topics: tuple[str, ...]
    queue: asyncio.Queue[_Item] = field(default_factory=asyncio.Queue)
    dead: list[tuple[dict[str, str], bytes, str]] = field(default_factory=list)


@dataclass
class MemoryBroker:
    """The shared state of in-memory transports: one queue per consumer group."""

    groups: dict[str, _Group] = field(default_factory=dict)

    def dead(self, group: str) -> list[tuple[dict[str, str], bytes, str]]:
        """The messages ``group`` rejected: (headers, body, reason)."""
        return list(self.groups[group].dead)


class _MemoryDelivery(Delivery):
    def __init__(self, group: _Group, item: _Item) -> None:
        headers, body, attempt = item
        super().__init__(headers, body, attempt)
        self._group = group

    async def _ack(self) -> None:
        pass

    async def _nack(self, delay: float) -> None:
        item = (self.headers, self.body, self.attempt + 1)
        if delay <= 0:
            self._group.queue.put_nowait(item)
        else:
            asyncio.get_running_loop().call_later(delay, self._group.queue.put_nowait, item)

    async def _reject(self, reason: str) -> None:
        self._group.dead.append((self.headers, self.body, reason))


class _MemorySubscription(Subscription):
    def __init__(self, group: _Group, handler: BatchHandler, max_batch: int) -> None:
        self._group = group
        self._handler = handler
        self._max_batch = max_batch
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        queue = self._group.queue
        while True:
            # Wait for one message, then take what else is already queued: a batch
            # never waits to fill up.
            items = [await queue.get()]
            while len(items) < self._max_batch and not queue.empty():
                items.append(queue.get_nowait())
            batch = [_MemoryDelivery(self._group, item) for item in items]
            try:
                await self._handler(batch)
            except asyncio.CancelledError:
                # The consumer went away mid-call: give the messages back at once.
                for delivery in batch:
                    await delivery.nack(0)
                raise
            except Exception:
                for delivery in batch:
                    await delivery.nack(DEFAULT_REDELIVERY_DELAY)
            else:
                for delivery in batch:
                    await delivery.ack()

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class MemoryTransport(Transport):
    """A transport on a :class:`MemoryBroker` (a private one unless one is given)."""

    name = "memory"

    def __init__(self, broker: MemoryBroker | None = None) -> None:
        self.broker = broker or MemoryBroker()
        self._subscriptions: list[_MemorySubscription] = []
        self._closed = False

    async def connect(self) -> None:
        self._closed = False

    async def publish(self, messages: Sequence[Message]) -> None:
        if self._closed:
            raise TransportUnavailable("the memory transport is closed")
        for message in messages:
            headers, body = encode(message)
            for group in self.broker.groups.values():
                if any(topic_matches(t, message.type) for t in group.topics):
                    group.queue.put_nowait((headers, body, 1))

    async def publish_raw(self, headers: dict[str, str], body: bytes) -> None:
        """Put arbitrary bytes on every group's queue (for tests of bad input)."""
        for group in self.broker.groups.values():
            group.queue.put_nowait((dict(headers), body, 1))

    async def declare(self, group: str, *, topics: Sequence[str] = ("#",)) -> None:
        """Create ``group`` (with ``topics``, if it is new) without consuming it."""
        self._group(group, topics)

    def _group(self, group: str, topics: Sequence[str]) -> _Group:
        check_group(group, topics)
        if self._closed:
            raise TransportUnavailable("the memory transport is closed")
        return self.broker.groups.setdefault(group, _Group(tuple(topics)))

    async def subscribe_batches(
        self,
        group: str,
        handler: BatchHandler,
        *,
        topics: Sequence[str] = ("#",),
        prefetch: int = 64,
        max_batch: int = 64,
    ) -> Subscription:
        """Consume ``group`` in batches (see :class:`~accord.transports.base.Transport`).

        A group's topics are those of its first subscribe. Each call gets what is
        queued, up to ``max_batch`` and ``prefetch``.
        """
        check_batching(prefetch, max_batch)
        state = self._group(group, topics)
        subscription = _MemorySubscription(state, handler, max(1, min(max_batch, prefetch)))
        self._subscriptions.append(subscription)
        return subscription

    async def close(self) -> None:
        self._closed = True
        for subscription in self._subscriptions:
            await subscription.stop()
        self._subscriptions.clear()
