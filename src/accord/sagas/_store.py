"""Saga rows: loading an instance, saving a transition under a version check, the step
log and the deadline of an instance."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from accord.db.database import (
    driver_in_transaction,
    driver_outside_transaction,
    translate_errors,
)
from accord.db.schema_sagas import deadlines, saga_steps, sagas
from accord.db.types import one_of, rows_of_each, tuple_ids_of_each
from accord.errors import ConcurrencyError
from accord.messages import Message
from accord.outbox.writer import NOTIFY_CHANNEL, driver_row, row_from_message

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
    "VOID",
    "SagaState",
    "Transition",
    "insert_instance",
    "load",
    "load_locked",
    "save_locked",
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
#: Compensating a remote step whose outcome is unknown (it timed out, or an abort came
#: while its command was out) and which has no compensating command: its participant
#: is asked, with the action's own command, whether it applied it; if not, it refuses
#: the command from then on. The reply says which.
VOID = "void"


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
    lock = for_update and conn.dialect.name == "postgresql"
    row = (await conn.execute(_LOAD_FOR_UPDATE if lock else _LOAD, {"id": saga_id})).first()
    return None if row is None else SagaState.from_row(row)


async def load_locked(conn: AsyncConnection, saga_ids: Sequence[str]) -> dict[str, SagaState]:
    """The sagas ``saga_ids`` (those that exist), each row locked until the transaction
    ends, taken in id order so that two such transactions cannot deadlock. Save their
    transitions with :func:`save_locked`."""
    query = _statements(conn.dialect.name).load_locked
    rows = (await conn.execute(query, {"ids": sorted(set(saga_ids))})).all()
    return {row.id: SagaState.from_row(row) for row in rows}


async def insert_instance(conn: AsyncConnection, state: SagaState) -> bool:
    """Insert a new instance; False if one with that id exists already."""
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
    statement = _statements(conn.dialect.name).insert_instance
    return (await conn.execute(statement, values)).first() is not None


_NO_CHANGE = object()


@dataclass
class Transition:
    """What one transition of an instance writes, all in the caller's transaction:
    the new row (only if the version read is unchanged), step-log entries and the
    deadline change."""

    state: SagaState
    read_version: int
    #: The time its rows are written with: the database server's, on PostgreSQL
    #: (``Database.clock.now``), so that orchestrators on hosts whose clocks differ
    #: fire each other's deadlines on time.
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC), repr=False)
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
                "at": self.clock(),
            }
        )

    def set_deadline(self, kind: str, seconds: float) -> None:
        """Fire ``kind`` ("timeout"/"retry"/"abort") for the current step and attempt
        in ``seconds``."""
        self.deadline = {
            "saga_id": self.state.id,
            "kind": kind,
            "phase": self.state.phase,
            "step": self.state.step,
            "attempt": self.state.attempt,
            "due_at": self.clock() + timedelta(seconds=seconds),
            "saga_name": self.state.name,
        }

    def clear_deadline(self) -> None:
        """Drop the instance's deadline."""
        self.deadline = None

    async def save(self, conn: AsyncConnection) -> None:
        """Write the transition. Raises :class:`ConcurrencyError` if another transaction
        changed the instance since it was read: retry from a fresh read."""
        state = self.state
        now = self.clock()
        result = await conn.execute(_UPDATE, self._params(now))
        if result.rowcount != 1:
            raise ConcurrencyError(
                f"saga {state.id} changed while this transition was computed; "
                "the transition is retried from a fresh read",
                expected=self.read_version,
                actual=None,
            )
        await _write_logs_and_deadlines(conn, [self])

    async def insert_with(
        self, conn: AsyncConnection, messages: Sequence[Message], *, alone: bool = False
    ) -> bool | None:
        """:meth:`insert` and ``add_to_outbox(conn, *messages)`` in one statement sent
        straight to asyncpg (one round trip); None, having done nothing, where that
        path is not available (SQLite, or data the driver path cannot encode).
        ``alone``: ``conn`` is the caller's own and in no transaction; the statement
        commits on its own (no ``BEGIN``, no ``COMMIT``: one round trip in all)."""
        driver = await (driver_outside_transaction(conn) if alone else driver_in_transaction(conn))
        if driver is None:
            return None
        s = self.state
        try:
            data = json.dumps(s.data, separators=(",", ":"))
        except (TypeError, ValueError):
            return None  # the SQLAlchemy path reports it
        now = self.clock()
        self._advance(now)
        logs = self.logs
        deadline = self.deadline if isinstance(self.deadline, dict) else None
        rows = [driver_row(row_from_message(m, now)) for m in messages]
        with translate_errors(f"starting saga {s.id}"):
            inserted = await driver.fetchval(
                _INSERT_NEW,
                s.id,
                s.name,
                s.status,
                s.phase,
                s.step,
                s.attempt,
                s.attempt_base,
                s.waiting,
                data,
                s.error,
                s.abort_reason,
                s.version,
                s.created_at,
                s.updated_at,
                s.ended_at,
                *([entry[column] for entry in logs] for column in _LOG_COLUMNS),
                *(deadline[c] if deadline else None for c in _DEADLINE_COLUMNS),
                *([row[i] for row in rows] for i in range(5)),
            )
        return bool(inserted)

    async def insert(self, conn: AsyncConnection) -> bool:
        """Write the transition of an instance not stored yet: its row as the transition
        leaves it. False, writing nothing, if an instance with that id exists."""
        self._advance(self.clock())
        if not await insert_instance(conn, self.state):
            return False
        await _write_logs_and_deadlines(conn, [self])
        return True

    def _advance(self, now: datetime) -> None:
        self.state.updated_at = now
        self.state.version = self.read_version + 1

    def _params(self, now: datetime) -> dict[str, Any]:
        """Parameters of ``_UPDATE``, once the state is advanced to its next version."""
        self._advance(now)
        state = self.state
        return {
            "b_id": state.id,
            "b_read_version": self.read_version,
            **{f"b_{column}": getattr(state, column) for column in _CHANGED},
        }


_LOG_COLUMNS = ("step", "step_name", "phase", "event", "attempt", "detail", "at")
_DEADLINE_COLUMNS = ("kind", "phase", "step", "attempt", "due_at")

# A new instance as its first transition leaves it: the row, its step log, its
# deadline and its commands (with the relays' wake-up), in one statement. Nothing
# but the row's conflict check runs if the id exists (the other inserts read ``s``).
_INSERT_NEW = f"""
WITH s AS (
    INSERT INTO accord_sagas (id, name, status, phase, step, attempt, attempt_base, waiting,
                              data, error, abort_reason, version, created_at, updated_at,
                              ended_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10, $11, $12, $13, $14, $15)
    ON CONFLICT (id) DO NOTHING
    RETURNING id
), logged AS (
    INSERT INTO accord_saga_steps (saga_id, step, step_name, phase, event, attempt, detail, at)
    SELECT s.id, x.step, x.step_name, x.phase, x.event, x.attempt, x.detail, x.at
    FROM s, unnest($16::int[], $17::text[], $18::text[], $19::text[], $20::int[],
                   $21::text[], $22::timestamptz[])
         WITH ORDINALITY AS x(step, step_name, phase, event, attempt, detail, at, n)
    ORDER BY x.n
), due AS (
    INSERT INTO accord_deadlines (saga_id, kind, phase, step, attempt, due_at, saga_name)
    SELECT s.id, $23::text, $24::text, $25::int, $26::int, $27::timestamptz, $2
    FROM s WHERE $23::text IS NOT NULL
    ON CONFLICT (saga_id) DO UPDATE SET kind = excluded.kind, phase = excluded.phase,
        step = excluded.step, attempt = excluded.attempt, due_at = excluded.due_at,
        saga_name = excluded.saga_name
), sent AS (
    INSERT INTO accord_outbox (id, event_type, key, payload, headers, status, retry_count,
                               available_at, created_at)
    SELECT x.id, x.event_type, x.key, x.payload::jsonb, x.headers::jsonb, 'PENDING', 0,
           now(), now()
    FROM s, unnest($28::uuid[], $29::text[], $30::text[], $31::text[], $32::text[])
         WITH ORDINALITY AS x(id, event_type, key, payload, headers, n)
    ORDER BY x.n
    ON CONFLICT (id) DO NOTHING
)
SELECT (SELECT count(*) FROM s), pg_notify('{NOTIFY_CHANNEL}', '')
"""

#: The columns a transition changes (see Transition._row).
_CHANGED = (
    "status",
    "phase",
    "step",
    "attempt",
    "attempt_base",
    "waiting",
    "data",
    "error",
    "abort_reason",
    "version",
    "updated_at",
    "ended_at",
)
_UPDATE = (
    sagas.update()
    .where(sagas.c.id == sa.bindparam("b_id"), sagas.c.version == sa.bindparam("b_read_version"))
    .values({column: sa.bindparam(f"b_{column}") for column in _CHANGED})
)


async def save_locked(conn: AsyncConnection, transitions: Sequence[Transition]) -> None:
    """Write transitions of instances read with :func:`load_locked` in this transaction:
    their rows are locked, so no version can have moved; a few statements for all."""
    if not transitions:
        return
    now = transitions[0].clock()
    params = [tx._params(now) for tx in transitions]
    result = await conn.execute(_UPDATE, params)
    if conn.dialect.supports_sane_multi_rowcount and result.rowcount != len(params):
        raise ConcurrencyError(
            f"{len(params) - result.rowcount} of {len(params)} sagas changed while locked",
            expected=None,
            actual=None,
        )
    await _write_logs_and_deadlines(conn, transitions)


async def _write_logs_and_deadlines(
    conn: AsyncConnection, transitions: Sequence[Transition]
) -> None:
    logs = [entry for tx in transitions for entry in tx.logs]
    if logs:
        await conn.execute(saga_steps.insert(), logs)
    cleared = [tx.state.id for tx in transitions if tx.deadline is None]
    if cleared:
        await conn.execute(_statements(conn.dialect.name).delete_deadlines, {"ids": cleared})
    rows = [tx.deadline for tx in transitions if isinstance(tx.deadline, dict)]
    if rows:
        await conn.execute(_statements(conn.dialect.name).upsert_deadline, rows)


_LOAD = sa.select(sagas).where(sagas.c.id == sa.bindparam("id"))
_LOAD_FOR_UPDATE = _LOAD.with_for_update()


class _Statements:
    """The dialect-specific hot statements, built once (SQLAlchemy caches their SQL)."""

    def __init__(self, dialect: str) -> None:
        insert = pg_insert if dialect == "postgresql" else sqlite_insert
        # Locked in the order of the ids (sorted) on PostgreSQL.
        self.load_locked = rows_of_each(
            sagas, sagas.c.id, "ids", dialect=dialect, lock=dialect == "postgresql"
        )
        self.delete_deadlines: Any
        if dialect == "postgresql":  # one probe of the key per saga (see rows_of_each)
            found = tuple_ids_of_each("accord_deadlines", "saga_id", "CAST(:ids AS text[])")
            self.delete_deadlines = sa.text(
                f"DELETE FROM accord_deadlines USING {found} AS found "
                "WHERE accord_deadlines.ctid = found.tid"
            )
        else:
            self.delete_deadlines = deadlines.delete().where(
                one_of(deadlines.c.saga_id, "ids", dialect)
            )
        self.insert_instance = (
            insert(sagas).on_conflict_do_nothing(index_elements=[sagas.c.id]).returning(sagas.c.id)
        )
        upsert = insert(deadlines)
        self.upsert_deadline = upsert.on_conflict_do_update(
            index_elements=[deadlines.c.saga_id],
            set_={
                c.name: upsert.excluded[c.name] for c in deadlines.columns if c.name != "saga_id"
            },
        )


@functools.cache
def _statements(dialect: str) -> _Statements:
    return _Statements(dialect)
