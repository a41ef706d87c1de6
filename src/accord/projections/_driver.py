"""Applying batches of events to one version of one projection, exactly once.

A batch is one transaction: the handlers' writes, then a compare-and-set of
the checkpoint from the position the batch started at to its last event. If
the process dies before the commit, nothing of the batch is kept and the next
runner starts again from the old checkpoint; if another runner moved the
checkpoint meanwhile, the compare-and-set fails and the batch is rolled back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from accord.db.database import Database, from_the_database_layer
from accord.errors import AccordError, DatabaseError
from accord.eventstore import RecordedEvent
from accord.projections import _state
from accord.projections._projection import Projection, ProjectionContext

__all__ = [
    "BatchDriver",
    "HandlerFailed",
    "LeaseLost",
    "Paused",
    "ProjectionStopped",
    "Swapped",
]

log = logging.getLogger("accord.projections")


class HandlerFailed(Exception):
    """A handler (or the flush of its deferred writes) raised for ``event``."""

    def __init__(self, event: RecordedEvent, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.event = event
        self.cause = cause


class LeaseLost(AccordError):
    """The checkpoint moved under this runner: another runner is active for the projection."""


class Swapped(Exception):
    """The live version changed (a rebuild swapped in a new one) before this batch."""


class Paused(Exception):
    """A rebuild is handing over: the live runner waits until it swaps (or times out)."""


class ProjectionStopped(AccordError):
    """A projection configured with ``on_poison="stop"`` stopped on a poison event."""


def _is_infrastructure(exc: BaseException) -> bool:
    """A lost connection or similar: retry for ever, never park an event over it. An
    OSError the handler's own code raised (a file not found, its asyncio.timeout) is
    the handler's failure, not the database's."""
    if isinstance(exc, OSError):
        return from_the_database_layer(exc)
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, sa.exc.InterfaceError | sa.exc.DisconnectionError)


class BatchDriver:
    """Applies events to ``projection`` version ``version`` from its checkpoint on.

    ``live=True`` (the runner) checks in each batch that ``version`` is still the
    live one and raises :class:`Swapped` if not; ``replaying`` is passed to the
    handlers (True during a rebuild).
    """

    def __init__(
        self,
        database: Database,
        projection: Projection,
        version: int,
        position: int,
        *,
        replaying: bool,
        live: bool,
    ) -> None:
        self.database = database
        self.projection = projection
        self.version = version
        self.position = position
        self.replaying = replaying
        self.live = live

    async def apply(
        self, events: Sequence[RecordedEvent], *, extra: Any = None, final: Any = None
    ) -> None:
        """Apply ``events`` in one transaction with the checkpoint; raise
        :class:`HandlerFailed` (nothing kept) if a handler raised.

        ``final(conn)``, if given, runs in the same transaction after the checkpoint
        moved (the rebuild uses it to swap the version pointer atomically).
        """
        p = self.projection
        last = events[-1].position if events else self.position
        if not events and final is None:
            if self.live:
                async with self.database.read() as conn:
                    if await p.live_version(conn) != self.version:
                        raise Swapped()
            return
        async with self.database.transaction() as conn:
            if self.live:
                # A shared lock on the pointer row: a rebuild's handoff/swap waits
                # for this batch to commit, and this batch sees any handoff committed
                # before it (SQLite serialises writers anyway).
                live, handoff = await _state.lock_pointer(conn, p.name)
                if live != self.version:
                    raise Swapped()
                if handoff is not None and handoff > _state.now():
                    raise Paused()
            if events:
                await self._handle(conn, events)
                moved = await _state.advance(
                    conn, p.name, self.version, self.position, last, len(events)
                )
                if not moved:
                    raise LeaseLost(
                        f"projection {p.name!r} v{self.version}: the checkpoint moved away from "
                        f"{self.position}; another runner is active, this one steps back"
                    )
            if final is not None:
                await final(conn)
        self.position = last

    async def _handle(self, conn: AsyncConnection, events: Sequence[RecordedEvent]) -> None:
        ctx = ProjectionContext(self.projection, conn, self.version, self.replaying)
        handlers = self.projection.handlers
        event = events[0]
        try:
            for event in events:
                entry = handlers.get(event.type)
                if entry is None:
                    continue
                fn, is_async = entry
                if is_async:
                    await fn(ctx, event)  # type: ignore[misc]
                else:
                    fn(ctx, event)
            await ctx.flush()
        except Exception as exc:
            if _is_infrastructure(exc):
                raise DatabaseError(
                    f"projection {self.projection.name!r}: database unavailable: {exc}"
                ) from exc
            # With deferred writes a flush failure cannot be pinned on one event:
            # the caller replays the batch one event at a time to find it.
            raise HandlerFailed(event if len(events) == 1 else events[0], exc) from exc

    async def apply_safely(self, events: Sequence[RecordedEvent]) -> None:
        """Apply ``events``; on a handler failure, fall back to one event per
        transaction with retries and then park or stop (see :meth:`apply_one`)."""
        try:
            await self.apply(events)
        except HandlerFailed:
            if len(events) == 1:
                await self.apply_one(events[0])
                return
            log.info(
                "projection %s: a batch of %d failed; applying it one event at a time",
                self.projection.name,
                len(events),
            )
            for event in events:
                await self.apply_one(event)

    async def apply_one(self, event: RecordedEvent) -> None:
        """Apply one event with retries and backoff; then park it (and step over it)
        or record the projection as stopped and raise :class:`ProjectionStopped`."""
        p = self.projection
        attempts = 0
        while True:
            attempts += 1
            try:
                await self.apply([event])
                return
            except HandlerFailed as failure:
                error = f"{type(failure.cause).__name__}: {failure.cause}"
                if attempts <= p.max_retries:
                    delay = min(p.retry_cap, p.retry_base * 2 ** (attempts - 1))
                    log.warning(
                        "projection %s: event %s (position %d) failed (attempt %d), "
                        "retrying in %.2fs: %s",
                        p.name,
                        event.type,
                        event.position,
                        attempts,
                        delay,
                        error,
                    )
                    await asyncio.sleep(delay)
                    continue
            break
        if p.on_poison == "park":
            log.error(
                "projection %s: parking event %s at position %d after %d attempts: %s",
                p.name,
                event.type,
                event.position,
                attempts,
                error,
            )
            await self._park(event, error, attempts)
            return
        message = (
            f"stopped at event {event.type} (id {event.id}, stream {event.stream_id!r}, "
            f"position {event.position}) after {attempts} attempts: {error}. Fix the handler "
            "and restart the runner; it will retry that event"
        )
        async with self.database.transaction() as conn:
            await _state.set_state(conn, p.name, self.version, "stopped", message)
        raise ProjectionStopped(f"projection {p.name!r} {message}")

    async def _park(self, event: RecordedEvent, error: str, attempts: int) -> None:
        p = self.projection
        async with self.database.transaction() as conn:
            await _state.park(conn, p.name, self.version, event, error, attempts)
            if not await _state.advance(
                conn, p.name, self.version, self.position, event.position, 0
            ):
                raise LeaseLost(
                    f"projection {p.name!r}: the checkpoint moved while parking an event"
                )
        self.position = event.position
