"""The projection bookkeeping rows: version pointer, checkpoints, leases, parked events."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from accord.db.schema_events import (
    projection_checkpoints as checkpoints,
)
from accord.db.schema_events import (
    projection_leases as leases,
)
from accord.db.schema_events import (
    projection_parked as parked,
)
from accord.db.schema_events import (
    projection_versions as versions,
)
from accord.eventstore import RecordedEvent

__all__ = [
    "Checkpoint",
    "ParkedEvent",
    "Versions",
    "acquire_lease",
    "advance",
    "ensure_checkpoint",
    "ensure_versions",
    "lock_pointer",
    "park",
    "read_checkpoint",
    "read_versions",
    "release_lease",
    "set_state",
]


def now() -> datetime:
    """The current UTC time (leases assume the runners' clocks roughly agree)."""
    return datetime.now(UTC)


def _insert(conn: AsyncConnection, table: sa.Table) -> Any:
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    return insert(table)


@dataclass(frozen=True, slots=True)
class Versions:
    """The live read-model version of a projection and the one a rebuild is filling."""

    live: int
    building: int | None
    swapped_at: datetime | None


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """How far one version of a projection got: ``position`` is the last event applied
    (0 = none); ``state`` is ``running`` or ``stopped`` (then ``error`` says why)."""

    projection: str
    version: int
    position: int
    handled: int
    state: str
    error: str | None
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class ParkedEvent:
    """A poison event a projection stepped over after its retries; replayable."""

    id: int
    projection: str
    version: int
    position: int
    event_id: str
    stream_id: str
    type: str
    error: str
    attempts: int
    parked_at: datetime
    replayed_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict."""
        return {
            "id": self.id,
            "projection": self.projection,
            "version": self.version,
            "position": self.position,
            "event_id": self.event_id,
            "stream_id": self.stream_id,
            "type": self.type,
            "error": self.error,
            "attempts": self.attempts,
            "parked_at": self.parked_at.isoformat(),
            "replayed_at": self.replayed_at.isoformat() if self.replayed_at else None,
        }


def parked_from_row(row: Any) -> ParkedEvent:
    """A :class:`ParkedEvent` from an ``accord_projection_parked`` row."""
    return ParkedEvent(
        id=row.id,
        projection=row.projection,
        version=row.version,
        position=row.position,
        event_id=str(row.event_id),
        stream_id=row.stream_id,
        type=row.type,
        error=row.error,
        attempts=row.attempts,
        parked_at=row.parked_at,
        replayed_at=row.replayed_at,
    )


async def read_versions(conn: AsyncConnection, name: str) -> Versions | None:
    """The version pointer row of projection ``name`` (None before its first run)."""
    row = (await conn.execute(sa.select(versions).where(versions.c.projection == name))).first()
    if row is None:
        return None
    return Versions(row.live_version, row.building_version, row.swapped_at)


async def lock_pointer(conn: AsyncConnection, name: str) -> tuple[int, datetime | None]:
    """The live version and handoff deadline, with a shared row lock (PostgreSQL)
    held to the end of the transaction."""
    query = sa.select(versions.c.live_version, versions.c.handoff_until).where(
        versions.c.projection == name
    )
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(read=True)
    row = (await conn.execute(query)).first()
    return (1, None) if row is None else (int(row[0]), row[1])


async def ensure_versions(conn: AsyncConnection, name: str) -> Versions:
    """The pointer row, created (live version 1) if missing."""
    stmt = _insert(conn, versions).values(projection=name, live_version=1)
    await conn.execute(stmt.on_conflict_do_nothing(index_elements=[versions.c.projection]))
    found = await read_versions(conn, name)
    assert found is not None
    return found


async def read_checkpoint(conn: AsyncConnection, name: str, version: int) -> Checkpoint | None:
    """The checkpoint of ``name`` version ``version``, or None."""
    row = (
        await conn.execute(
            sa.select(checkpoints).where(
                checkpoints.c.projection == name, checkpoints.c.version == version
            )
        )
    ).first()
    if row is None:
        return None
    return Checkpoint(
        row.projection, row.version, row.position, row.handled, row.state, row.error, row.updated_at
    )


async def ensure_checkpoint(conn: AsyncConnection, name: str, version: int) -> Checkpoint:
    """The checkpoint row, created at position 0 if missing."""
    stmt = _insert(conn, checkpoints).values(
        projection=name, version=version, position=0, handled=0, state="running", updated_at=now()
    )
    await conn.execute(
        stmt.on_conflict_do_nothing(
            index_elements=[checkpoints.c.projection, checkpoints.c.version]
        )
    )
    found = await read_checkpoint(conn, name, version)
    assert found is not None
    return found


async def advance(
    conn: AsyncConnection, name: str, version: int, expected: int, position: int, handled: int
) -> bool:
    """Move the checkpoint from ``expected`` to ``position`` (compare-and-set).

    False if the checkpoint is no longer at ``expected``: another runner moved it,
    so this batch must be rolled back (that is what keeps an event from being
    applied twice even when two runners briefly both think they hold the lease).
    """
    result = await conn.execute(
        checkpoints.update()
        .where(
            checkpoints.c.projection == name,
            checkpoints.c.version == version,
            checkpoints.c.position == expected,
        )
        .values(
            position=position,
            handled=checkpoints.c.handled + handled,
            state="running",
            error=None,
            updated_at=now(),
        )
    )
    return bool(result.rowcount == 1)


async def set_state(
    conn: AsyncConnection, name: str, version: int, state: str, error: str | None
) -> None:
    """Record ``state`` (``running``/``stopped``) and its ``error`` on the checkpoint."""
    await conn.execute(
        checkpoints.update()
        .where(checkpoints.c.projection == name, checkpoints.c.version == version)
        .values(state=state, error=error, updated_at=now())
    )


async def park(
    conn: AsyncConnection,
    name: str,
    version: int,
    event: RecordedEvent,
    error: str,
    attempts: int,
) -> None:
    """Record ``event`` as parked for ``name`` version ``version``."""
    await conn.execute(
        parked.insert().values(
            projection=name,
            version=version,
            position=event.position,
            event_id=event.id,
            stream_id=event.stream_id,
            type=event.type,
            error=error,
            attempts=attempts,
            parked_at=now(),
        )
    )


async def acquire_lease(conn: AsyncConnection, name: str, owner: str, ttl: float) -> bool:
    """Take or renew the lease ``name`` for ``owner`` for ``ttl`` seconds.

    True if ``owner`` holds it now: it was free, expired, or already ours.
    """
    at = now()
    until = at + timedelta(seconds=ttl)
    result = await conn.execute(
        leases.update()
        .where(leases.c.name == name, (leases.c.owner == owner) | (leases.c.expires_at < at))
        .values(
            owner=owner,
            expires_at=until,
            acquired_at=sa.case(
                (leases.c.owner == owner, leases.c.acquired_at),
                else_=sa.literal(at, leases.c.acquired_at.type),
            ),
        )
    )
    if result.rowcount == 1:
        return True
    stmt = _insert(conn, leases).values(name=name, owner=owner, expires_at=until, acquired_at=at)
    inserted = await conn.execute(stmt.on_conflict_do_nothing(index_elements=[leases.c.name]))
    return bool(inserted.rowcount == 1)


async def release_lease(conn: AsyncConnection, name: str, owner: str) -> None:
    """Give the lease up at once (if ``owner`` holds it), so another runner takes over."""
    await conn.execute(leases.delete().where(leases.c.name == name, leases.c.owner == owner))
