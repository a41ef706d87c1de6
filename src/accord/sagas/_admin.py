"""Operators' view of saga instances: list, show the timeline, retry a STUCK one, abort."""

from __future__ import annotations

import builtins
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from accord._retention import checked_batch, prune_each, prune_in_batches
from accord.db import Database
from accord.db.database import translate_errors
from accord.db.schema_sagas import deadlines, saga_steps, sagas
from accord.errors import ConfigurationError, NotFoundError
from accord.sagas import _participant
from accord.sagas._store import (
    ACTION,
    COMPENSATING,
    ENDED,
    RUNNING,
    STUCK,
    SagaState,
    Transition,
    load,
)

__all__ = ["PRUNE_BATCH", "SagaAdmin", "StepLogEntry", "prune_ended"]

#: Ended instances a prune deletes in one transaction.
PRUNE_BATCH = 1000


@dataclass(frozen=True)
class StepLogEntry:
    """One line of a saga's timeline."""

    at: datetime
    step: int
    step_name: str
    phase: str
    event: str
    attempt: int
    detail: str | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        return {
            "at": self.at.isoformat(),
            "step": self.step,
            "step_name": self.step_name,
            "phase": self.phase,
            "event": self.event,
            "attempt": self.attempt,
            "detail": self.detail,
        }


class SagaAdmin:
    """Read and steer the saga instances stored in ``database``.

    :meth:`retry` and :meth:`abort` need no saga definitions: they record the
    operator's request as a deadline due now, which the running orchestrator
    (the one that knows the definition) carries out on its next timer round.
    """

    def __init__(self, database: Database) -> None:
        self.database = database

    async def list(
        self, *, status: str | None = None, name: str | None = None, limit: int = 100
    ) -> list[SagaState]:
        """Instances, most recently changed first, optionally of one status / saga name."""
        query = sa.select(sagas).order_by(sagas.c.updated_at.desc()).limit(limit)
        if status:
            query = query.where(sagas.c.status == status.upper())
        if name:
            query = query.where(sagas.c.name == name)
        with translate_errors("listing sagas"):
            async with self.database.read() as conn:
                return [SagaState.from_row(r) for r in (await conn.execute(query)).all()]

    async def counts(self) -> dict[str, int]:
        """How many instances are in each status."""
        query = sa.select(sagas.c.status, sa.func.count()).group_by(sagas.c.status)
        with translate_errors("counting sagas"):
            async with self.database.read() as conn:
                return {str(s): int(n) for s, n in (await conn.execute(query)).all()}

    async def get(self, saga_id: str) -> SagaState:
        """The instance ``saga_id``; :class:`NotFoundError` if there is none."""
        with translate_errors("reading a saga"):
            async with self.database.read() as conn:
                state = await load(conn, saga_id)
        if state is None:
            raise NotFoundError(f"no saga {saga_id!r} in {self.database!r}")
        return state

    async def history(self, saga_id: str) -> builtins.list[StepLogEntry]:
        """The instance's step log, oldest first."""
        query = (
            sa.select(saga_steps).where(saga_steps.c.saga_id == saga_id).order_by(saga_steps.c.id)
        )
        with translate_errors("reading a saga's step log"):
            async with self.database.read() as conn:
                rows = (await conn.execute(query)).all()
        return [
            StepLogEntry(
                at=r.at,
                step=r.step,
                step_name=r.step_name,
                phase=r.phase,
                event=r.event,
                attempt=r.attempt,
                detail=r.detail,
            )
            for r in rows
        ]

    async def prune(
        self,
        older_than: timedelta,
        *,
        name: str | None = None,
        batch: int = PRUNE_BATCH,
        on_batch: Callable[[int], None] | None = None,
    ) -> int:
        """Delete the instances that ended (COMPLETED, COMPENSATED, ABORTED) more than
        ``older_than`` ago, with their step logs; only saga ``name``'s if given.
        Returns how many; ``batch`` instances a transaction, ``on_batch(pruned so
        far)`` called after each. STUCK and running ones
        are never pruned. A reply for a pruned instance is logged and ignored, as
        for any unknown saga; an :class:`~accord.sagas.Orchestrator` prunes its
        own sagas (``retention``)."""
        batch = checked_batch(batch)
        cutoff = datetime.now(UTC) - older_than
        one = functools.partial(prune_ended, self.database, [name] if name else None, cutoff)
        with translate_errors("pruning sagas"):
            return await prune_in_batches(one, batch, on_batch)

    async def prune_participations(
        self,
        older_than: timedelta,
        *,
        participant: str | None = None,
        batch: int = _participant.PRUNE_BATCH,
        on_batch: Callable[[int], None] | None = None,
    ) -> int:
        """Delete participants' records of saga steps (what makes a re-sent command
        idempotent) written more than ``older_than`` ago; only ``participant``'s (its
        consumer's name) if given. Returns how many; ``batch`` records a transaction,
        oldest first, ``on_batch(pruned so far)`` called after each. A consumer with
        participant handlers prunes its own (``records_retention``); see
        :func:`~accord.sagas.participant` for what a saga older than that meets."""
        batch = checked_batch(batch)
        cutoff = datetime.now(UTC) - older_than
        with translate_errors("pruning participants' records"):
            names = [participant] if participant else await _participant.participants(self.database)
            return await prune_each(
                names,
                lambda name, n: _participant.prune_participations(self.database, name, cutoff, n),
                batch,
                on_batch,
            )

    async def retry(self, saga_id: str) -> SagaState:
        """Resume a STUCK instance where it stopped, with fresh attempts."""
        await self.database.clock.sync_if_due()
        with translate_errors("retrying a saga"):
            async with self.database.transaction() as conn:
                state = await self._load(conn, saga_id, for_update=True)
                if state.status != STUCK:
                    raise ConfigurationError(
                        f"saga {saga_id} is {state.status}: only a STUCK saga can be retried"
                    )
                await self._resume(conn, state)
        return state

    async def retry_stuck(
        self,
        *,
        name: str | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> builtins.list[SagaState]:
        """Resume every STUCK instance (only those of saga ``name``, if given), oldest
        first, each in its own transaction, as :meth:`retry` does; returns them.

        The set is taken when the call starts; an instance that stops being STUCK
        before its turn (another operator retried or aborted it) is left alone.
        ``on_progress(done, total)`` is called after each instance. A database
        error stops the run; the instances resumed before it stay resumed, so
        running it again carries on.
        """
        query = (
            sa.select(sagas.c.id)
            .where(sagas.c.status == STUCK)
            .order_by(sagas.c.updated_at, sagas.c.id)
        )
        if name:
            query = query.where(sagas.c.name == name)
        await self.database.clock.sync_if_due()
        with translate_errors("listing STUCK sagas"):
            async with self.database.read() as conn:
                ids = [str(i) for i in (await conn.scalars(query)).all()]
        resumed: builtins.list[SagaState] = []
        for done, saga_id in enumerate(ids, 1):
            with translate_errors("retrying a saga"):
                async with self.database.transaction() as conn:
                    state = await load(conn, saga_id, for_update=True)
                    if state is not None and state.status == STUCK:
                        await self._resume(conn, state)
                        resumed.append(state)
            if on_progress is not None:
                on_progress(done, len(ids))
        return resumed

    async def _resume(self, conn: Any, state: SagaState) -> None:
        """Put a STUCK ``state`` back to work with fresh attempts; the orchestrator's
        next timer round carries it on."""
        tx = Transition(state, state.version, self.database.clock.now)
        state.status = RUNNING if state.phase == ACTION else COMPENSATING
        state.attempt_base = state.attempt
        state.waiting = False
        tx.log(
            state.step, await _step_name(conn, state), state.phase, "operator_retry", state.error
        )
        if state.phase != ACTION:
            # Compensating again: the saga's error is once more why it compensates,
            # not why it was STUCK (that stays in the step log).
            state.error = await _compensating_because(conn, state.id) or state.error
        tx.set_deadline("retry", 0)
        await tx.save(conn)

    async def abort(self, saga_id: str, reason: str = "aborted by an operator") -> SagaState:
        """Ask the orchestrator to abort an instance: one still running its steps is
        compensated; one compensating, STUCK, or past its pivot ends ABORTED (what
        is left to undo is the operator's)."""
        await self.database.clock.sync_if_due()
        with translate_errors("aborting a saga"):
            async with self.database.transaction() as conn:
                # Locked, like retry(): a transition committing meanwhile must not make
                # the abort's save fail its version check.
                state = await self._load(conn, saga_id, for_update=True)
                if state.status in ENDED:
                    raise ConfigurationError(f"saga {saga_id} already ended {state.status}")
                tx = Transition(state, state.version, self.database.clock.now)
                state.abort_reason = reason
                step_name = await _step_name(conn, state)
                tx.log(state.step, step_name, state.phase, "abort_requested", reason)
                tx.set_deadline("abort", 0)
                await tx.save(conn)
        return state

    async def _load(self, conn: Any, saga_id: str, *, for_update: bool = False) -> SagaState:
        state = await load(conn, saga_id, for_update=for_update)
        if state is None:
            raise NotFoundError(f"no saga {saga_id!r} in {self.database!r}")
        return state


async def _step_name(conn: Any, state: SagaState) -> str:
    """The name of the instance's current step, as its step log has it (the admin has
    no definitions): "-" if the log never named it."""
    query = (
        sa.select(saga_steps.c.step_name)
        .where(
            saga_steps.c.saga_id == state.id,
            saga_steps.c.step == state.step,
            saga_steps.c.step_name != "-",
        )
        .order_by(saga_steps.c.id.desc())
        .limit(1)
    )
    return (await conn.scalar(query)) or "-"


async def _compensating_because(conn: Any, saga_id: str) -> str | None:
    """Why the instance began compensating, as its step log says."""
    query = (
        sa.select(saga_steps.c.detail)
        .where(saga_steps.c.saga_id == saga_id, saga_steps.c.event == "compensating")
        .order_by(saga_steps.c.id.desc())
        .limit(1)
    )
    return await conn.scalar(query)  # type: ignore[no-any-return]


async def prune_ended(
    database: Database, names: Sequence[str] | None, cutoff: datetime, limit: int
) -> int:
    """Delete up to ``limit`` instances (of the sagas ``names``, or any) that ended
    before ``cutoff``, oldest first, with their step logs (and a deadline, should
    one be left), in one transaction; return how many. Two prunes at once skip each
    other's instances on PostgreSQL."""
    oldest = (
        sa.select(sagas.c.id)
        .where(sagas.c.status.in_(ENDED), sagas.c.updated_at < cutoff)
        .order_by(sagas.c.updated_at)
        .limit(limit)
    )
    if names is not None:
        oldest = oldest.where(sagas.c.name.in_(list(names)))
    async with database.transaction() as conn:
        if conn.dialect.name == "postgresql":
            oldest = oldest.with_for_update(skip_locked=True)
        ids = (await conn.execute(oldest)).scalars().all()
        if ids:
            await conn.execute(saga_steps.delete().where(saga_steps.c.saga_id.in_(ids)))
            await conn.execute(deadlines.delete().where(deadlines.c.saga_id.in_(ids)))
            await conn.execute(sagas.delete().where(sagas.c.id.in_(ids)))
    return len(ids)
