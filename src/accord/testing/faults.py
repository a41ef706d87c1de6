"""Fault injection around a real transport: failed confirms and process death on cue."""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Collection, Sequence

from accord.errors import PublishError, TransportError, TransportUnavailable
from accord.messages import Message
from accord.transports.base import BatchHandler, Envelope, Subscription, Transport

__all__ = ["FaultyTransport"]


class FaultyTransport(Transport):
    """Wraps a real transport and makes some publishes fail, as a broker would.

    ``fail_rate``: each message of a batch is, with this probability, not sent
    and reported unconfirmed. ``fail_ids``: these ids always fail (a poison
    message). ``unavailable_ids``: these are reported unconfirmed because the broker
    became unreachable mid-batch (``TransportUnavailable`` in ``PublishError``).
    ``kill_after``: SIGKILL this process right after the n-th
    successful publish call returns (the broker confirmed, the caller has not
    yet recorded it), standing in for a crash at the worst moment.
    """

    def __init__(
        self,
        inner: Transport,
        *,
        fail_rate: float = 0.0,
        fail_ids: Collection[str] = (),
        unavailable_ids: Collection[str] = (),
        kill_after: int | None = None,
        seed: int | None = None,
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self.fail_rate = fail_rate
        self.fail_ids = set(fail_ids)
        self.unavailable_ids = set(unavailable_ids)
        self.kill_after = kill_after
        self.publishes = 0
        self._random = random.Random(seed)

    async def connect(self) -> None:
        await self.inner.connect()

    async def publish(self, messages: Sequence[Message]) -> None:
        failed: dict[str, BaseException] = {}
        passing = []
        for message in messages:
            if message.id in self.fail_ids or self._random.random() < self.fail_rate:
                failed[message.id] = TransportError("broker refused the message (injected)")
            else:
                passing.append(message)
        try:
            if passing:
                await self.inner.publish(passing)
        except PublishError as exc:
            failed.update(exc.failed)
        self._after_publish()
        if failed:
            raise PublishError(failed)

    async def publish_envelopes(self, envelopes: Sequence[Envelope]) -> None:
        failed: dict[str, BaseException] = {}
        passing = []
        for envelope in envelopes:
            if envelope.id in self.unavailable_ids:
                failed[envelope.id] = TransportUnavailable("connection lost (injected)")
            elif envelope.id in self.fail_ids or self._random.random() < self.fail_rate:
                failed[envelope.id] = TransportError("broker refused the message (injected)")
            else:
                passing.append(envelope)
        try:
            if passing:
                await self.inner.publish_envelopes(passing)
        except PublishError as exc:
            failed.update(exc.failed)
        self._after_publish()
        if failed:
            raise PublishError(failed)

    def _after_publish(self) -> None:
        self.publishes += 1
        if self.kill_after is not None and self.publishes >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    async def declare(self, group: str, *, topics: Sequence[str] = ("#",)) -> None:
        await self.inner.declare(group, topics=topics)

    async def subscribe_batches(
        self,
        group: str,
        handler: BatchHandler,
        *,
        topics: Sequence[str] = ("#",),
        prefetch: int = 64,
        max_batch: int = 64,
    ) -> Subscription:
        return await self.inner.subscribe_batches(
            group, handler, topics=topics, prefetch=prefetch, max_batch=max_batch
        )

    async def close(self) -> None:
        await self.inner.close()
