"""What an operator asks of projections: how far behind, who runs them, what is parked."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from accord.db.database import Database, translate_errors
from accord.db.schema_events import events
from accord.db.schema_events import projection_leases as leases
from accord.db.schema_events import projection_parked as parked
from accord.db.schema_events import projection_versions as versions
from accord.eventstore import EventStore
from accord.projections import _state
from accord.projections._projection import Projection

__all__ = ["TRANSPORT", "ProjectionStatus", "caught_up", "projection_status"]

#: The ``state`` of a projection a TransportProjector feeds.
TRANSPORT = "transport"


@dataclass(frozen=True, slots=True)
class ProjectionStatus:
    """One projection as the database sees it now.

    ``events_behind`` counts the events it handles that come after its checkpoint
    (up to the head); ``seconds_behind`` is the age of the oldest of them (0 when
    caught up). ``state`` is ``running``, ``stopped`` (``error`` says why),
    ``new`` (never ran) or ``transport``: fed by a
    :class:`~accord.projections.TransportProjector`, which keeps no checkpoint in
    the event store's log, so its lag is not measured here (the broker's queue is
    its backlog): ``position``, ``events_behind`` and ``seconds_behind`` are then
    0, and None in :meth:`as_dict`. ``rebuilding`` is the version a rebuild is
    filling and ``rebuild_position`` how far it got.
    """

    name: str
    live_version: int
    state: str
    error: str | None
    position: int
    head: int
    events_behind: int
    seconds_behind: float
    handled: int
    parked: int
    lease_owner: str | None
    lease_expires_at: datetime | None
    updated_at: datetime | None
    rebuilding: int | None
    rebuild_position: int | None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (times in ISO-8601)."""
        out = asdict(self)
        for key in ("lease_expires_at", "updated_at"):
            if out[key] is not None:
                out[key] = out[key].isoformat()
        if self.transport_fed:
            out.update(position=None, events_behind=None, seconds_behind=None)
        return out

    @property
    def transport_fed(self) -> bool:
        """Whether a TransportProjector feeds it (its lag is not measured)."""
        return self.state == TRANSPORT


async def _names(database: Database) -> list[str]:
    async with database.read() as conn:
        with translate_errors("listing projections"):
            rows = await conn.execute(sa.select(versions.c.projection).order_by("projection"))
            return [r[0] for r in rows]


async def projection_status(
    database: Database,
    projections: Sequence[Projection | str] | None = None,
    *,
    store: EventStore | None = None,
) -> list[ProjectionStatus]:
    """The status of each projection given (definitions, or names), or of every
    projection the database knows. With definitions, lag counts only the event
    types they handle; with bare names, every event."""
    own_store = store is None
    store = store or EventStore(database)
    try:
        items: list[Projection | str] = (
            list(projections) if projections is not None else list(await _names(database))
        )
        head = await store.head()
        return [await _one(database, store, item, head) for item in items]
    finally:
        if own_store:
            await store.close()


async def _one(
    database: Database, store: EventStore, item: Projection | str, head: int
) -> ProjectionStatus:
    name = item if isinstance(item, str) else item.name
    types = None if isinstance(item, str) else item.event_types
    async with database.read() as conn:
        with translate_errors(f"reading the status of projection {name!r}"):
            found = await _state.read_versions(conn, name)
            live = found.live if found else 1
            checkpoint = await _state.read_checkpoint(conn, name, live)
            building = None
            if found is not None and found.building is not None:
                building = await _state.read_checkpoint(conn, name, found.building)
            lease = (await conn.execute(sa.select(leases).where(leases.c.name == name))).first()
            parked_count = await conn.scalar(
                sa.select(sa.func.count()).where(
                    parked.c.projection == name,
                    parked.c.version == live,
                    parked.c.replayed_at.is_(None),
                )
            )
    # Runners keep a checkpoint beside the version pointer; a TransportProjector
    # makes the pointer only (the same test as rebuild's).
    transport_fed = found is not None and checkpoint is None
    position = checkpoint.position if checkpoint else 0
    behind = 0 if transport_fed else await store.count(position, upto=head, types=types)
    seconds = 0.0
    if behind:
        # The row's time only: reading the event itself would upcast it, and fail on
        # the very event a projection is stuck on.
        query = sa.select(events.c.recorded_at).where(events.c.position > position)
        if types is not None:
            query = query.where(events.c.type.in_(types))
        async with database.read() as conn:
            with translate_errors(f"reading the status of projection {name!r}"):
                oldest = await conn.scalar(query.order_by(events.c.position).limit(1))
        if oldest is not None:
            seconds = max(0.0, (_state.now() - oldest).total_seconds())
    return ProjectionStatus(
        name=name,
        live_version=live,
        state=checkpoint.state if checkpoint else (TRANSPORT if transport_fed else "new"),
        error=checkpoint.error if checkpoint else None,
        position=position,
        head=head,
        events_behind=behind,
        seconds_behind=round(seconds, 3),
        handled=checkpoint.handled if checkpoint else 0,
        parked=int(parked_count or 0),
        lease_owner=lease.owner if lease is not None else None,
        lease_expires_at=lease.expires_at if lease is not None else None,
        updated_at=checkpoint.updated_at if checkpoint else None,
        rebuilding=found.building if found else None,
        rebuild_position=building.position if building else None,
    )


async def caught_up(
    database: Database, store: EventStore, projection: Projection, position: int
) -> tuple[bool, str | None]:
    """Whether ``projection``'s live version has applied every event it handles up
    to ``position``; and the stop error if it is stopped."""
    async with database.read() as conn:
        with translate_errors(f"reading the checkpoint of projection {projection.name!r}"):
            live = await projection.live_version(conn)
            checkpoint = await _state.read_checkpoint(conn, projection.name, live)
    if checkpoint is None:
        return False, None
    if checkpoint.position >= position or not projection.event_types:
        return True, None
    if checkpoint.state == "stopped":
        return False, checkpoint.error
    # The checkpoint only moves to events the projection handles; events of other
    # types up to ``position`` need nothing. ``position`` must be visible (gap-safe
    # head) for "nothing left below it" to be a fact rather than a not-yet.
    if await store.head() < position:
        return False, None
    left = await store.count(checkpoint.position, upto=position, types=projection.event_types)
    return left == 0, None
