"""Rebuilding a projection beside the live read model, then swapping it in atomically.

How the swap works (the same on SQLite and PostgreSQL): readers resolve the
read model's tables through the pointer row ``accord_projection_versions``
(:meth:`Projection.live_tables`). A rebuild creates the tables of version
``live + 1`` (suffix ``_v<n>``), replays every event into them from position 0
while the live runner keeps the current version up to date, and when it has
caught up with the head it applies its last batch, moves its checkpoint and
flips the pointer **in one transaction**. Readers switch at their next
transaction; the live runner notices the new pointer at its next batch and
carries on from the new version's checkpoint. The previous version's tables stay
(a fallback) until the next rebuild drops them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from accord.db.database import Database
from accord.db.schema_events import projection_checkpoints as checkpoints
from accord.db.schema_events import projection_versions as versions
from accord.errors import ConcurrencyError
from accord.eventstore import EventStore
from accord.projections import _state
from accord.projections._driver import BatchDriver
from accord.projections._projection import Projection
from accord.projections._runner import default_owner

__all__ = ["Progress", "RebuildResult", "rebuild"]

log = logging.getLogger("accord.projections")


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a rebuild is: events applied so far and the current estimate of the total."""

    done: int
    total: int
    position: int
    elapsed: float


@dataclass(frozen=True, slots=True)
class RebuildResult:
    """A finished rebuild: the version now live, the one it replaced, events replayed."""

    projection: str
    version: int
    previous: int
    events: int
    seconds: float


async def rebuild(
    database: Database,
    projection: Projection,
    *,
    store: EventStore | None = None,
    batch_size: int | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    lease_ttl: float = 30.0,
    owner: str | None = None,
) -> RebuildResult:
    """Build a new version of ``projection``'s read model from position 0 and swap it in.

    Runs while writers append and the live runner keeps working; handlers see
    ``ctx.replaying == True``. Only one rebuild of a projection runs at a time
    (a lease named ``<projection>#rebuild``; a second one raises
    :class:`~accord.errors.ConcurrencyError`). A rebuild that was interrupted is
    started again from scratch by the next one.
    """
    own_store = store is None
    store = store or EventStore(database)
    owner = owner or default_owner()
    lease = f"{projection.name}#rebuild"
    size = batch_size or max(projection.batch_size, 1000)
    started = time.monotonic()
    try:
        async with database.transaction() as conn:
            if not await _state.acquire_lease(conn, lease, owner, lease_ttl):
                raise ConcurrencyError(
                    f"a rebuild of projection {projection.name!r} is already running "
                    f"(lease {lease!r}); wait for it or for its lease to expire"
                )
        previous, version = await _prepare(database, projection)
        total = await store.count(0, types=projection.event_types)
        driver = BatchDriver(database, projection, version, 0, replaying=True, live=False)
        done = 0
        renew_at = time.monotonic() + lease_ttl / 3
        while True:
            events = await store.read_all(driver.position, limit=size, types=projection.event_types)
            if len(events) < size:
                # Caught up. Whatever commits after this read, the live runner applies
                # once it follows the pointer to the new version's checkpoint.
                if events:
                    await driver.apply_safely(events)
                    done += len(events)
                await driver.apply([], final=_swap(projection.name, previous, version))
                break
            await driver.apply_safely(events)
            done += len(events)
            if on_progress is not None:
                total = max(total, done)
                on_progress(Progress(done, total, driver.position, time.monotonic() - started))
            if time.monotonic() >= renew_at:
                async with database.transaction() as conn:
                    await _state.acquire_lease(conn, lease, owner, lease_ttl)
                renew_at = time.monotonic() + lease_ttl / 3
        elapsed = time.monotonic() - started
        if on_progress is not None:
            on_progress(Progress(done, max(total, done), driver.position, elapsed))
        log.info(
            "projection %s: v%d rebuilt from %d events in %.1fs and swapped in (was v%d)",
            projection.name,
            version,
            done,
            elapsed,
            previous,
        )
        return RebuildResult(projection.name, version, previous, done, elapsed)
    finally:
        async with database.transaction() as conn:
            await _state.release_lease(conn, lease, owner)
        if own_store:
            await store.close()


async def _prepare(database: Database, projection: Projection) -> tuple[int, int]:
    """Drop leftovers of older versions, create the new version's tables and a zero
    checkpoint; return (live version, new version)."""
    name = projection.name
    async with database.transaction() as conn:
        found = await _state.ensure_versions(conn, name)
        live = found.live
        # The live tables exist even if no runner ever ran, so readers always resolve.
        await projection.create_tables(conn, live)
        await _state.ensure_checkpoint(conn, name, live)
        known = await conn.scalars(
            sa.select(checkpoints.c.version).where(checkpoints.c.projection == name)
        )
        stale = {v for v in known if v != live} | (
            {found.building} if found.building not in (None, live) else set()
        )
        for old in stale:
            assert old is not None
            await projection.drop_tables(conn, old)
            await conn.execute(
                checkpoints.delete().where(
                    checkpoints.c.projection == name, checkpoints.c.version == old
                )
            )
        version = max([live, *(v for v in stale if v is not None)]) + 1
        await projection.drop_tables(conn, version)
        await projection.create_tables(conn, version)
        await _state.ensure_checkpoint(conn, name, version)
        await conn.execute(
            versions.update().where(versions.c.projection == name).values(building_version=version)
        )
    return live, version


def _swap(name: str, previous: int, version: int) -> Callable[[AsyncConnection], object]:
    async def swap(conn: AsyncConnection) -> None:
        result = await conn.execute(
            versions.update()
            .where(versions.c.projection == name, versions.c.live_version == previous)
            .values(live_version=version, building_version=None, swapped_at=_state.now())
        )
        if result.rowcount != 1:
            raise ConcurrencyError(
                f"projection {name!r}: the live version changed during the rebuild "
                f"(another rebuild swapped?); v{version} was not swapped in"
            )

    return swap
