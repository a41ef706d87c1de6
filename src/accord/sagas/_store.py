"""Saga rows: loading an instance, saving a transition under a version check, the step
log and the deadline of an instance."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from accord.db.schema_sagas import deadlines, saga_steps, sagas
from accord.errors import ConcurrencyError

__all__ = [
    "ABORTED",
    "ACTIVE",
    "COMPENSATED",
    "COMPENSATING",
    "COMPLETED",
    "ENDED",
    "RUNNING",
    "STATUSES",
    "STUCK",
    "SagaState",
    "Transition",
    "insert_instance",
    "load",
]

RUNNING = "RUNNING"
COMPENSATING = "COMPENSATING"
COMPLETED = "COMPLETED"
COMPENSATED = "COMPENSATED"
STUCK = "STUCK"
ABORTED = "ABORTED"
STATUSES = (RUNNING, COMPENSATING, COMPLETED, COMPENSATED, STUCK, ABORTED)
ACTIVE = (RUNNING, COMPENSATING)
ENDED = (COMPLETED, COMPENSATED, ABORTED)

ACTION = "action"
COMPENSATION = "compensation"


@dataclass
class SagaState:
    """One saga instance as stored in ``accord_sagas``."""

    id: str
    name: str
    status: str
    phase: str
    step: int
    attempt: int
    waiting: bool
    data: dict[str, Any]
    error: str | None
    version: int
    created_at: datetime
    updated_at: datetime
    ended_at: datetime | None = None
    attempt_base: int = 0
    abort_reason: str | None = None

    @property
    def tries(self) -> int:
        """Attempts of the current step and phase since the last operator retry."""
        return self.attempt - self.attempt_base

    @classmethod
    def from_row(cls, row: Any) -> SagaState:
        """The state of a ``accord_sagas`` row."""
        m = row._mapping
        return cls(
            id=m["id"],
            name=m["name"],
            status=m["status"],
            phase=m["phase"],
            step=m["step"],
            attempt=m["attempt"],
            waiting=bool(m["waiting"]),
            data=dict(m["data"] or {}),
            error=m["error"],
            version=m["version"],
            created_at=m["created_at"],
            updated_at=m["updated_at"],
            ended_at=m["ended_at"],
            attempt_base=m["attempt_base"],
            abort_reason=m["abort_reason"],
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        return {
            "id": self.id,
            "name": self.name,
            "status": self.status,
            "phase": self.phase,
            "step": self.step,
            "attempt": self.attempt,
            "waiting": self.waiting,
            "data": self.data,
            "error": self.error,
            "version": self.version,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "ended_at": self.ended_at.isoformat() if self.ended_at else None,
        }


async def load(
    conn: AsyncConnection, saga_id: str, *, for_update: bool = False
) -> SagaState | None:
    """The saga ``saga_id`` as of ``conn``'s transaction, or None. ``for_update`` locks
    the row until the transaction ends (PostgreSQL; SQLite transactions are serial)."""
    query = sa.select(sagas).where(sagas.c.id == saga_id)
    if for_update and conn.dialect.name == "postgresql":
        query = query.with_for_update()
    row = (await conn.execute(query)).first()
    return None if row is None else SagaState.from_row(row)


async def insert_instance(conn: AsyncConnection, state: SagaState) -> bool:
    """Insert a new instance; False if one with that id exists already."""
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    values = {
        "id": state.id,
        "name": state.name,
        "status": state.status,
        "phase": state.phase,
        "step": state.step,
        "attempt": state.attempt,
        "attempt_base": state.attempt_base,
        "waiting": state.waiting,
        "data": state.data,
        "error": state.error,
        "version": state.version,
        "created_at": state.created_at,
        "updated_at": state.updated_at,
    }
    statement = (
        insert(sagas).values(**values).on_conflict_do_nothing(index_elements=[sagas.c.id])
    ).returning(sagas.c.id)
    return (await conn.execute(statement)).first() is not None


_NO_CHANGE = object()


@dataclass
class Transition:
    """What one transition of an instance writes, all in the caller's transaction:
    the new row (only if the version read is unchanged), step-log entries and the
    deadline change."""

    state: SagaState
    read_version: int
    logs: list[dict[str, Any]] = field(default_factory=list)
    deadline: Any = _NO_CHANGE  # None: clear; a dict: set; _NO_CHANGE: leave

    def log(self, step: int, step_name: str, phase: str, event: str, detail: str | None) -> None:
        """Append an entry to the step log."""
        self.logs.append(
            {
                "saga_id": self.state.id,
                "step": step,
                "step_name": step_name,
                "phase": phase,
                "event": event,
                "attempt": self.state.attempt,
                "detail": detail[:4000] if detail else None,
                "at": datetime.now(UTC),
            }
        )

    def set_deadline(self, kind: str, seconds: float) -> None:
        """Fire ``kind`` ("timeout"/"retry") for the current step and attempt in ``seconds``."""
        self.deadline = {
            "saga_id": self.state.id,
            "kind": kind,
            "phase": self.state.phase,
            "step": self.state.step,
            "attempt": self.state.attempt,
            "due_at": datetime.now(UTC) + timedelta(seconds=seconds),
        }

    def clear_deadline(self) -> None:
        """Drop the instance's deadline."""
        self.deadline = None

    async def save(self, conn: AsyncConnection) -> None:
        """Write the transition. Raises :class:`ConcurrencyError` if another transaction
        changed the instance since it was read: retry from a fresh read."""
        state = self.state
        now = datetime.now(UTC)
        state.updated_at = now
        state.version = self.read_version + 1
        result = await conn.execute(
            sagas.update()
            .where(sagas.c.id == state.id, sagas.c.version == self.read_version)
            .values(
                status=state.status,
                phase=state.phase,
                step=state.step,
                attempt=state.attempt,
                attempt_base=state.attempt_base,
                waiting=state.waiting,
                data=state.data,
                error=state.error,
                abort_reason=state.abort_reason,
                version=state.version,
                updated_at=now,
                ended_at=state.ended_at,
            )
        )
        if result.rowcount != 1:
            raise ConcurrencyError(
                f"saga {state.id} changed while this transition was computed; "
                "the transition is retried from a fresh read",
                expected=self.read_version,
                actual=None,
            )
        if self.logs:
            await conn.execute(saga_steps.insert(), self.logs)
        if self.deadline is None:
            await conn.execute(deadlines.delete().where(deadlines.c.saga_id == state.id))
        elif self.deadline is not _NO_CHANGE:
            insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
            values = dict(self.deadline)
            statement = insert(deadlines).values(**values)
            statement = statement.on_conflict_do_update(
                index_elements=[deadlines.c.saga_id],
                set_={k: statement.excluded[k] for k in values if k != "saga_id"},
            )
            await conn.execute(statement)
