"""One consumer of a group on the SQL transport: claim, handle in batches in order, settle."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta

from accord._aio import wait_event
from accord.db import Database
from accord.errors import TransportError
from accord.transports._sql import _queries as q
from accord.transports._sql._errors import reading, transaction
from accord.transports.base import (
    DEFAULT_REDELIVERY_DELAY,
    BatchHandler,
    Delivery,
    Subscription,
)

__all__ = ["SqlDelivery", "SqlSubscription"]

log = logging.getLogger("accord.transports.sql")

#: Pause after a failed claim before trying again, in seconds.
_CLAIM_RETRY_DELAY = 1.0


def _describe(batch: Sequence[Delivery]) -> str:
    def name(delivery: Delivery) -> str:
        if delivery.message is not None:
            return delivery.message.id
        return delivery.headers.get("ce-id", "<undecodable>")

    if len(batch) == 1:
        return f"message {name(batch[0])} (attempt {batch[0].attempt})"
    return f"a batch of {len(batch)} messages ({name(batch[0])} .. {name(batch[-1])})"


def consumer_id() -> str:
    """A name for one subscription that says where it runs (stored as ``locked_by``)."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class SqlDelivery(Delivery):
    """A delivery leased from ``accord_queue_deliveries``."""

    def __init__(self, subscription: SqlSubscription, claimed: q.Claimed) -> None:
        super().__init__(claimed.headers, claimed.body, claimed.attempt)
        self.seq = claimed.seq
        self.key = claimed.key
        self.nacked = False
        self._subscription = subscription

    async def _ack(self) -> None:
        self._subscription.ack_later(self.seq)

    async def _nack(self, delay: float) -> None:
        self.nacked = True
        await self._subscription.nack([self], delay)

    async def _reject(self, reason: str) -> None:
        await self._subscription.reject(self, reason)


class SqlSubscription(Subscription):
    """Claims up to ``prefetch`` deliveries at a time and hands them to ``handler`` in
    order, up to ``max_batch`` per call.

    Acks are committed in the background, many per transaction (a consumer that
    dies before the commit gets the delivery again: at-least-once), but always
    before the next claim and before :meth:`stop` returns. While deliveries are
    held their lease is extended, so a slow handler keeps its delivery; a
    process that dies stops extending and its deliveries return after the lease.
    """

    def __init__(
        self,
        *,
        database: Database,
        channel: str,
        group: str,
        handler: BatchHandler,
        prefetch: int,
        max_batch: int,
        poll_interval: float,
        lease: float,
        on_settle: Callable[[SqlSubscription], None],
        on_stop: Callable[[SqlSubscription], None],
    ) -> None:
        self.channel = channel
        self.group = group
        self.consumer = consumer_id()
        self._db = database
        self._handler = handler
        self._prefetch = max(1, prefetch)
        self._max_batch = max(1, min(max_batch, self._prefetch))
        self._poll_interval = poll_interval
        self._lease = lease
        self._on_settle = on_settle
        self._on_stop = on_stop
        self._wake = asyncio.Event()
        self._buffer: collections.deque[SqlDelivery] = collections.deque()
        self._batch: list[SqlDelivery] = []  # handed to the handler, call in progress
        self._pending_acks: list[int] = []
        self._flusher: asyncio.Task[None] | None = None
        self._idle = False
        self._stopped = False
        self._task = asyncio.create_task(self._run(), name=f"accord-sql-{group}")
        self._heartbeat = asyncio.create_task(self._extend_leases(), name=f"accord-sql-{group}-hb")

    @property
    def idle(self) -> bool:
        """True while this subscription has nothing to handle and waits for messages."""
        return self._idle

    def wake(self) -> None:
        """Look for deliveries now instead of at the next poll."""
        self._wake.set()

    # -- the consuming loop ---------------------------------------------------

    async def _run(self) -> None:
        idle = True  # whether the last claim found nothing
        while True:
            try:
                # Earlier acks must be visible before claiming: a later delivery with
                # the same key is held back while an earlier one still exists.
                await self._flush_acks()
                self._wake.clear()
                await self._db.clock.sync_if_due()
                claimed: list[q.Claimed] = []
                # After an empty claim, SQLite looks without the write lock first.
                if not (idle and self._db.is_sqlite) or await self._any_ready():
                    claimed = await self._claim()
                idle = not claimed
            except TransportError as exc:
                log.warning("group %r: %s; retrying in %ss", self.group, exc, _CLAIM_RETRY_DELAY)
                await self._sleep(_CLAIM_RETRY_DELAY)
                continue
            except Exception:
                # Whatever it was, a consumer must not stop consuming without a word;
                # unsettled deliveries come back when their lease runs out.
                log.exception("group %r: claim round failed; retrying", self.group)
                await self._sleep(_CLAIM_RETRY_DELAY)
                continue
            if not claimed:
                self._idle = True
                try:
                    await self._sleep(self._poll_interval)
                finally:
                    self._idle = False
                continue
            self._buffer.extend(SqlDelivery(self, item) for item in claimed)
            while self._buffer:
                size = min(self._max_batch, len(self._buffer))
                self._batch = [self._buffer.popleft() for _ in range(size)]
                await self._handle(self._batch)
                self._batch = []

    async def _any_ready(self) -> bool:
        """SQLite: look for a ready delivery without the file's write lock (a claim
        takes it even when it finds nothing: an idle consumer polling would hold up
        every writer of the file at each poll)."""
        async with reading(self._db, "looking for deliveries") as conn:
            return await q.any_ready(conn, self.channel, self.group, self._db.clock.now())

    async def _claim(self) -> list[q.Claimed]:
        async with transaction(self._db, "claiming deliveries") as conn:
            now = self._db.clock.now()
            return await q.claim(
                conn,
                self.channel,
                self.group,
                self.consumer,
                self._prefetch,
                now,
                now + timedelta(seconds=self._lease),
                is_postgres=self._db.is_postgres,
            )

    async def _sleep(self, seconds: float) -> None:
        await wait_event(self._wake, seconds)

    async def _handle(self, batch: list[SqlDelivery]) -> None:
        try:
            # A copy: whatever the handler does to its list, the whole batch is settled after.
            await self._handler(list(batch))
        except Exception:
            unsettled = [d for d in batch if not d.settled]
            log.exception(
                "group %r: handler failed on %s; redelivering %d unsettled in %ss",
                self.group,
                _describe(batch),
                len(unsettled),
                DEFAULT_REDELIVERY_DELAY,
            )
            for delivery in unsettled:
                # Settled here and nacked below in one transaction, not one each.
                delivery.settled = delivery.nacked = True
            await self._settle_safely(self.nack(unsettled, DEFAULT_REDELIVERY_DELAY))
        else:
            for delivery in batch:
                await delivery.ack()  # only queued: committed with others in the background
        nacked_keys = {d.key for d in batch if d.nacked and d.key is not None}
        if nacked_keys:
            await self._give_back_keys(nacked_keys)

    async def _settle_safely(self, settling: Awaitable[None]) -> None:
        try:
            await settling
        except TransportError as exc:
            # Not settled: the lease runs out (we stop extending it) and the
            # delivery is offered again, so nothing is lost.
            log.warning("group %r: settling deliveries failed: %s", self.group, exc)

    async def _give_back_keys(self, keys: set[str]) -> None:
        """A nacked delivery must not be overtaken by the later ones with its key that
        this consumer already holds: hand those back until it is done."""
        later = [d for d in self._buffer if d.key in keys]
        if not later:
            return
        self._buffer = collections.deque(d for d in self._buffer if d.key not in keys)
        try:
            async with transaction(self._db, "releasing deliveries") as conn:
                await q.release_unstarted(
                    conn, self.channel, self.group, self.consumer, [d.seq for d in later]
                )
        except TransportError as exc:
            log.warning("group %r: %s (they return after the lease)", self.group, exc)
        self._on_settle(self)

    # -- settling -------------------------------------------------------------

    def ack_later(self, seq: int) -> None:
        """Queue an ack; a background task commits queued acks together."""
        self._pending_acks.append(seq)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        while self._pending_acks:
            seqs = list(self._pending_acks)
            try:
                async with transaction(self._db, "acknowledging deliveries") as conn:
                    await q.delete_deliveries(conn, self.group, seqs, self.consumer)
            except TransportError as exc:
                log.warning("group %r: %s; will retry", self.group, exc)
                return
            del self._pending_acks[: len(seqs)]
            self._on_settle(self)

    async def _flush_acks(self) -> None:
        flusher = self._flusher
        if flusher is not None and not flusher.done():
            # Shielded: cancelling the consuming loop must not cancel a commit of acks.
            await asyncio.shield(flusher)
        if self._pending_acks:
            await self._flush_loop()

    async def nack(self, deliveries: Sequence[SqlDelivery], delay: float) -> None:
        """Offer ``deliveries`` again after ``delay`` seconds."""
        if not deliveries:
            return
        async with transaction(self._db, "nacking deliveries") as conn:
            available_at = self._db.clock.now() + timedelta(seconds=max(0.0, delay))
            await q.nack(conn, self.group, [d.seq for d in deliveries], self.consumer, available_at)
        # A little late rather than early: the claim compares against available_at.
        asyncio.get_running_loop().call_later(max(0.0, delay) + 0.01, self._wake.set)
        self._on_settle(self)

    async def reject(self, delivery: SqlDelivery, reason: str) -> None:
        """Remove ``delivery`` from the group for good."""
        async with transaction(self._db, "rejecting a delivery") as conn:
            await q.delete_deliveries(conn, self.group, [delivery.seq], self.consumer)
        log.warning(
            "group %r rejected message %s (type %s, attempt %d): %s",
            self.group,
            delivery.message.id if delivery.message else delivery.headers.get("ce-id", "?"),
            delivery.message.type if delivery.message else delivery.headers.get("ce-type", "?"),
            delivery.attempt,
            reason,
        )
        self._on_settle(self)

    # -- leases -----------------------------------------------------------------

    def _held(self) -> list[int]:
        # The whole batch in the handler's hands is held, not only the one it is at.
        held = [d.seq for d in self._batch if not d.settled]
        return held + [d.seq for d in self._buffer] + list(self._pending_acks)

    async def _extend_leases(self) -> None:
        while True:
            await asyncio.sleep(self._lease / 3)
            held = self._held()
            if not held:
                continue
            try:
                async with transaction(self._db, "extending leases") as conn:
                    until = self._db.clock.now() + timedelta(seconds=self._lease)
                    await q.extend_leases(
                        conn, self.channel, self.group, self.consumer, held, until
                    )
            except TransportError as exc:
                log.warning("group %r: %s", self.group, exc)

    # -- stopping ---------------------------------------------------------------

    async def stop(self) -> None:
        """Stop consuming. A handler in progress is cancelled; every delivery this
        subscription holds and has not settled is offered to the group again at once
        (queued acks are committed first)."""
        if self._stopped:
            return
        self._stopped = True
        for task in (self._task, self._heartbeat):
            task.cancel()
        for task in (self._task, self._heartbeat):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._flush_acks()
        unstarted = [d.seq for d in self._buffer]
        self._buffer.clear()
        self._batch = []
        try:
            async with transaction(self._db, "releasing deliveries") as conn:
                await q.delete_deliveries(conn, self.group, self._pending_acks, self.consumer)
                await q.release(conn, self.channel, self.group, self.consumer, unstarted=unstarted)
            self._pending_acks.clear()
        except TransportError as exc:
            log.warning("group %r: %s (they return after the lease)", self.group, exc)
        self._on_settle(self)
        self._on_stop(self)
