"""Rebuilding a projection beside the live read model, then swapping it in atomically.

How the swap works (the same on SQLite and PostgreSQL): readers resolve the
read model's tables through the pointer row ``accord_projection_versions``
(:meth:`Projection.live_tables`). A rebuild creates the tables of a new version
(``<projection>_<table>_v<n>``) and replays every event into them from position 0,
with ``ctx.replaying`` True, while the live runner keeps the current version up to
date. It never replays past the live checkpoint: events after it have not been
seen yet, so their side effects must fire once, live.

Then the handoff: the rebuild sets ``handoff_until`` on the pointer row (this
waits for the live batch in flight, which holds a shared lock on the row); live
batches then pause. The rebuild applies the few events up to the live checkpoint
``P``, and in one transaction flips the pointer and sets the new version's
checkpoint to ``P``. Readers switch at their next transaction; the live runner
carries on from ``P`` in the new version. Readers never wait; the read model only
stops moving for the short final catch-up. If the rebuild dies during the handoff,
live batches resume at ``handoff_until`` (``handoff_timeout`` seconds).

The previous version's tables stay (a fallback) until the next rebuild drops them.

A rebuild whose handlers failed on events parks them in the new version, which then
lacks their data: it is not swapped in unless the caller allows it
(``allow_parked=True``; the parked events can be replayed there later).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from accord._checks import is_count
from accord.db.database import Database
from accord.db.schema_events import projection_checkpoints as checkpoints
from accord.db.schema_events import projection_parked as parked
from accord.db.schema_events import projection_versions as versions
from accord.errors import AccordError, ConcurrencyError, ConfigurationError
from accord.eventstore import EventStore
from accord.projections import _state
from accord.projections._driver import BatchDriver
from accord.projections._projection import Projection
from accord.projections._runner import default_owner

__all__ = ["Progress", "RebuildRefused", "RebuildResult", "rebuild"]

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
    """A finished rebuild: the version now live, the one it replaced, events replayed
    (parked ones included), and how many of them were ``parked`` (their handler
    failed: the new version lacks them until they are replayed)."""

    projection: str
    version: int
    previous: int
    events: int
    seconds: float
    parked: int = 0


class RebuildRefused(AccordError):
    """A rebuild parked events, so its version was not swapped in: the live read model
    is unchanged. ``parked`` is how many; ``version`` the version that was built."""

    def __init__(self, message: str, *, projection: str, version: int, parked: int) -> None:
        super().__init__(message)
        self.projection = projection
        self.version = version
        self.parked = parked


async def rebuild(
    database: Database,
    projection: Projection,
    *,
    store: EventStore | None = None,
    batch_size: int | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    lease_ttl: float = 30.0,
    handoff_timeout: float = 30.0,
    owner: str | None = None,
    allow_parked: bool = False,
) -> RebuildResult:
    """Build a new version of ``projection``'s read model from position 0 and swap it in.

    Runs while writers append and the live runner keeps working; handlers see
    ``ctx.replaying == True``. Only one rebuild of a projection runs at a time
    (a lease named ``<projection>#rebuild``; a second one raises
    :class:`~accord.errors.ConcurrencyError`). A rebuild that was interrupted is
    started again from scratch by the next one.

    If handlers failed on events and the projection parked them (``on_poison="park"``),
    the new version lacks their data: it is not swapped in and :class:`RebuildRefused`
    says how many were parked (list them with ``accord projections parked list``).
    With ``allow_parked=True`` it is swapped in anyway and
    :attr:`RebuildResult.parked` says how many to replay there.
    """
    if batch_size is not None and not is_count(batch_size):
        raise ConfigurationError(f"batch_size must be an int of at least 1, not {batch_size!r}")
    own_store = store is None
    store = store or EventStore(database)
    owner = owner or default_owner()
    lease = f"{projection.name}#rebuild"
    size = batch_size if batch_size is not None else max(projection.batch_size, 1000)
    started = time.monotonic()
    handoff = timedelta(seconds=handoff_timeout)
    building: int | None = None  # the version being built, until it is swapped in
    try:
        async with database.transaction() as conn:
            if not await _state.acquire_lease(conn, lease, owner, lease_ttl):
                raise ConcurrencyError(
                    f"a rebuild of projection {projection.name!r} is already running "
                    f"(lease {lease!r}); wait for it or for its lease to expire"
                )
        previous, version = await _prepare(database, projection)
        building = version
        total = await store.count(0, types=projection.event_types)
        driver = BatchDriver(database, projection, version, 0, replaying=True, live=False)
        types = projection.event_types
        done = 0
        renew_at = time.monotonic() + lease_ttl / 3

        def report() -> None:
            if on_progress is not None:
                on_progress(
                    Progress(done, max(total, done), driver.position, time.monotonic() - started)
                )

        # 1. Replay history up to where the live runner is (never past it: events
        #    after the live checkpoint have not fired their side effects yet).
        while True:
            async with database.read() as conn:
                live_at = await _live_position(conn, projection.name, previous)
            events = await store.read_all(driver.position, limit=size, types=types)
            behind = [e for e in events if e.position <= live_at]
            if behind:
                await driver.apply_safely(behind)
                done += len(behind)
                report()
            if len(behind) < size:
                break
            if time.monotonic() >= renew_at:
                async with database.transaction() as conn:
                    await _state.acquire_lease(conn, lease, owner, lease_ttl)
                renew_at = time.monotonic() + lease_ttl / 3
        # 2. Hand over: pause the live runner (its batch in flight commits first),
        #    catch up to its now-still checkpoint, then flip the pointer.
        try:
            async with database.transaction() as conn:
                await _set_handoff(conn, projection.name, previous, _state.now() + handoff)
            async with database.read() as conn:
                live_at = await _live_position(conn, projection.name, previous)
            while True:
                events = await store.read_all(driver.position, limit=size, types=types)
                behind = [e for e in events if e.position <= live_at]
                if behind:
                    await driver.apply_safely(behind)
                    done += len(behind)
                    report()
                elif await store.head() >= live_at:
                    break  # everything up to the live checkpoint is visible and applied
                else:
                    await asyncio.sleep(0.02)
            # Only this rebuild writes the new version: every event it parked is counted.
            async with database.read() as conn:
                parked_count = await _parked(conn, projection.name, version)
            if parked_count and not allow_parked:
                raise RebuildRefused(
                    f"projection {projection.name!r}: the rebuild parked {parked_count} "
                    f"event(s) its handlers failed on, so v{version} lacks their data and "
                    f"was not swapped in (v{previous} stays live). See them with `accord "
                    f"projections parked list {projection.name}`; fix the handler and "
                    "rebuild again, or allow it (--allow-parked) and replay them after "
                    "the swap",
                    projection=projection.name,
                    version=version,
                    parked=parked_count,
                )
            await driver.apply(
                [], final=_swap(projection, previous, version, driver.position, live_at)
            )
            building = None
        finally:
            async with database.transaction() as conn:
                await _set_handoff(conn, projection.name, previous, None)
        report()
        elapsed = time.monotonic() - started
        if on_progress is not None:
            on_progress(Progress(done, max(total, done), driver.position, elapsed))
        log.info(
            "projection %s: v%d rebuilt from %d events (%d parked) in %.1fs and swapped "
            "in (was v%d)",
            projection.name,
            version,
            done,
            parked_count,
            elapsed,
            previous,
        )
        return RebuildResult(projection.name, version, previous, done, elapsed, parked_count)
    finally:
        async with database.transaction() as conn:
            if building is not None:
                # Failed or stopped: no longer "rebuilding" (the next rebuild drops
                # this version's tables, by its checkpoint).
                await conn.execute(
                    versions.update()
                    .where(
                        versions.c.projection == projection.name,
                        versions.c.building_version == building,
                    )
                    .values(building_version=None)
                )
            await _state.release_lease(conn, lease, owner)
        if own_store:
            await store.close()


async def _prepare(database: Database, projection: Projection) -> tuple[int, int]:
    """Drop leftovers of older versions, create the new version's tables and a zero
    checkpoint; return (live version, new version)."""
    name = projection.name
    async with database.transaction() as conn:
        existing = await _state.read_versions(conn, name)
        if existing is not None and await _state.read_checkpoint(conn, name, existing.live) is None:
            # Runners keep a checkpoint beside their version pointer; a projection
            # with none is fed by a transport (TransportProjector), whose broker
            # holds no history: the new version would be swapped in empty.
            raise ConfigurationError(
                f"projection {name!r} is fed by a transport (it keeps no checkpoint in "
                "the event store's log): there is no history to rebuild it from"
            )
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
            # Its parked events go with its tables: they could be replayed nowhere.
            await conn.execute(
                parked.delete().where(parked.c.projection == name, parked.c.version == old)
            )
        version = max([live, *(v for v in stale if v is not None)]) + 1
        await projection.drop_tables(conn, version)
        await projection.create_tables(conn, version)
        await _state.ensure_checkpoint(conn, name, version)
        await conn.execute(
            versions.update().where(versions.c.projection == name).values(building_version=version)
        )
    return live, version


async def _parked(conn: AsyncConnection, name: str, version: int) -> int:
    """How many events ``version`` of ``name`` parked and has not replayed."""
    count = await conn.scalar(
        sa.select(sa.func.count()).where(
            parked.c.projection == name,
            parked.c.version == version,
            parked.c.replayed_at.is_(None),
        )
    )
    return int(count or 0)


async def _live_position(conn: AsyncConnection, name: str, live: int) -> int:
    checkpoint = await _state.read_checkpoint(conn, name, live)
    return checkpoint.position if checkpoint else 0


async def _set_handoff(conn: AsyncConnection, name: str, live: int, until: datetime | None) -> None:
    await conn.execute(
        versions.update()
        .where(versions.c.projection == name, versions.c.live_version == live)
        .values(handoff_until=until)
    )


def _swap(
    projection: Projection, previous: int, version: int, at: int, live_at: int
) -> Callable[[AsyncConnection], Awaitable[None]]:
    name = projection.name

    async def swap(conn: AsyncConnection) -> None:
        result = await conn.execute(
            versions.update()
            .where(versions.c.projection == name, versions.c.live_version == previous)
            .values(
                live_version=version,
                building_version=None,
                handoff_until=None,
                swapped_at=_state.now(),
            )
        )
        if result.rowcount != 1:
            raise ConcurrencyError(
                f"projection {name!r}: the live version changed during the rebuild "
                f"(another rebuild swapped?); v{version} was not swapped in"
            )
        # The new version continues exactly where the old one stopped (events of
        # other types in between need nothing).
        if not await _state.advance(conn, name, version, at, max(at, live_at), 0):
            raise ConcurrencyError(f"projection {name!r}: the v{version} checkpoint moved")
        if await _live_position(conn, name, previous) != live_at:
            raise ConcurrencyError(
                f"projection {name!r}: the live runner moved during the handoff "
                "(it outlived the handoff deadline); run the rebuild again"
            )

    return swap
