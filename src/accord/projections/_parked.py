"""Parked (poison) events: list them, replay them into the live read model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from accord.db.database import Database, translate_errors
from accord.db.schema_events import projection_parked as parked
from accord.errors import NotFoundError
from accord.eventstore import EventStore
from accord.projections import _state
from accord.projections._driver import BatchDriver, HandlerFailed
from accord.projections._projection import Projection
from accord.projections._state import ParkedEvent, parked_from_row

__all__ = ["ReplayOutcome", "list_parked", "replay_parked"]


@dataclass(frozen=True, slots=True)
class ReplayOutcome:
    """What replaying one parked event did: ``ok``, or the ``error`` it failed with again."""

    id: int
    position: int
    ok: bool
    error: str | None


async def list_parked(
    database: Database, projection: str | None = None, *, include_replayed: bool = False
) -> list[ParkedEvent]:
    """Parked events (of one projection, or all), oldest first; replayed ones only on request."""
    query = sa.select(parked).order_by(parked.c.id)
    if projection is not None:
        query = query.where(parked.c.projection == projection)
    if not include_replayed:
        query = query.where(parked.c.replayed_at.is_(None))
    async with database.read() as conn:
        with translate_errors("listing parked events"):
            return [parked_from_row(r) for r in await conn.execute(query)]


async def replay_parked(
    database: Database,
    projection: Projection,
    ids: Sequence[int] | None = None,
    *,
    store: EventStore | None = None,
) -> list[ReplayOutcome]:
    """Apply parked events of ``projection`` (all, or those ``ids``) to its live version.

    Each event runs through its handler once, in its own transaction with the
    parked row's ``replayed_at`` (so a replay is itself applied exactly once); the
    checkpoint does not move. An event that fails again stays parked, with the new
    error. Events parked for an older version (before a rebuild) are not replayed.
    """
    own_store = store is None
    store = store or EventStore(database)
    try:
        async with database.read() as conn:
            live = await projection.live_version(conn)
        candidates = [
            p
            for p in await list_parked(database, projection.name)
            if p.version == live and (ids is None or p.id in ids)
        ]
        if ids is not None:
            missing = set(ids) - {p.id for p in candidates}
            if missing:
                raise NotFoundError(
                    f"no parked event {sorted(missing)} of projection {projection.name!r} "
                    f"(live v{live}); see `accord projections parked list`"
                )
        outcomes = []
        for item in candidates:
            found = await store.read_all(item.position - 1, limit=1)
            if not found or found[0].position != item.position:
                raise NotFoundError(f"event at position {item.position} is no longer in the store")
            event = found[0]
            driver = BatchDriver(database, projection, live, 0, replaying=False, live=False)
            try:
                async with database.transaction() as conn:
                    # Claimed first, in the handler's transaction: a replay running at
                    # the same time waits for this one and then finds it replayed.
                    claimed = await conn.execute(
                        parked.update()
                        .where(parked.c.id == item.id, parked.c.replayed_at.is_(None))
                        .values(replayed_at=_state.now())
                    )
                    if claimed.rowcount:
                        await driver._handle(conn, [event])
                outcomes.append(ReplayOutcome(item.id, item.position, True, None))
            except HandlerFailed as failure:
                error = f"{type(failure.cause).__name__}: {failure.cause}"
                async with database.transaction() as conn:
                    await conn.execute(
                        parked.update()
                        .where(parked.c.id == item.id)
                        .values(error=error, attempts=parked.c.attempts + 1)
                    )
                outcomes.append(ReplayOutcome(item.id, item.position, False, error))
        return outcomes
    finally:
        if own_store:
            await store.close()
