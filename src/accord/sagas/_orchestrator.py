"""The orchestrator: starts saga instances, applies participants' replies (through an
idempotent inbox consumer) and fires durable deadlines (a timer), as one worker component."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from accord._aio import wait_event
from accord._checks import is_count
from accord._retention import Pruning
from accord.db import Database
from accord.db.database import log_retried_failure, on_commit
from accord.db.schema_sagas import deadlines
from accord.db.schema_sagas import sagas as sagas_table
from accord.errors import AccordError, ConcurrencyError, ConfigurationError, DuplicateError
from accord.inbox import Consumer, HandlerContext
from accord.inbox._context import run_after_commit
from accord.messages import CONTROL_CHARACTERS, Message
from accord.observability import current_traceparent
from accord.observability._tracing import as_current
from accord.outbox import add as add_to_outbox
from accord.sagas._admin import PRUNE_BATCH, prune_ended
from accord.sagas._definition import Command, Saga, registry, seconds
from accord.sagas._engine import Engine, Reply, ReplyData
from accord.sagas._metrics import SAGAS_STARTED
from accord.sagas._store import (
    ACTION,
    ACTIVE,
    ENDED,
    RUNNING,
    SagaState,
    insert_instance,
    load,
    load_locked,
    save_locked,
)
from accord.transports.base import GroupDeclaration, Transport

#: Seconds a deadline whose transition failed waits before it is fired again.
FAILED_DEADLINE_DELAY = 30.0

__all__ = ["Orchestrator"]

log = logging.getLogger("accord.sagas")


#: The widest saga id (the column's).
MAX_SAGA_ID_LENGTH = 100


def _check_saga_id(saga_id: Any) -> None:
    if not isinstance(saga_id, str) or not saga_id:
        raise ConfigurationError(
            f"saga_id must be a non-empty string (or None for a new random id), not {saga_id!r}"
        )
    if len(saga_id) > MAX_SAGA_ID_LENGTH:
        raise ConfigurationError(
            f"saga_id {saga_id[:40]!r}... is {len(saga_id)} characters long; at most "
            f"{MAX_SAGA_ID_LENGTH} (derive a shorter one, e.g. uuid.uuid5 of the long key)"
        )
    if CONTROL_CHARACTERS.search(saga_id):
        raise ConfigurationError(f"saga_id {saga_id!r} holds a control character")


def _checked_data(saga: Saga, data: Any) -> dict[str, Any]:
    """A copy of the saga's starting data, refused at once if the saga could not store
    it (rather than as a database error, or a saga that fails later)."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ValueError(
            f"the data of saga {saga.name!r} must be a dict (a JSON object), "
            f"not {type(data).__name__}"
        )
    try:
        json.dumps(data, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the data of saga {saga.name!r} is not JSON: {exc}") from None
    return dict(data)


async def _existing(conn: AsyncConnection, saga_id: str, name: str) -> str:
    """The id of the instance that was there already, if it is one of saga ``name``."""
    query = sa.select(sagas_table.c.name).where(sagas_table.c.id == saga_id)
    found = (await conn.execute(query)).scalar_one_or_none()
    if found is not None and found != name:
        raise DuplicateError(
            f"saga id {saga_id!r} is an instance of saga {found!r} already, so it cannot "
            f"start {name!r}: give each saga ids of its own (e.g. prefixed with its name)"
        )
    return saga_id


class Orchestrator:
    """Runs the sagas ``sagas`` on ``database``; a worker component.

    * :meth:`start` creates an instance and runs it up to its first remote command,
      in one transaction (yours, if you pass ``conn``): the instance, its step log
      and the command in the outbox commit together.
    * Replies arrive through a :class:`~accord.inbox.Consumer` named ``name``
      (deduplicated by message id). A reply that is not the one the instance waits
      for — late, duplicate, for a step that timed out — is logged and ignored.
      Each transition saves only if the instance's version is still the one it
      read, so two racing replies cannot both win; the loser is retried.
    * A timer fires due rows of ``accord_deadlines`` every ``timer_interval``
      seconds: step timeouts, retries after backoff, and operators' retry/abort
      requests. Deadlines are rows, so they fire after any restart.
    * The same loop deletes, every ten minutes, its sagas that ended (COMPLETED,
      COMPENSATED, ABORTED) more than ``retention`` ago (30 days; ``None`` keeps
      them), with their step logs. A STUCK saga is never pruned. A reply for a
      pruned saga is ignored, and :meth:`start` with the id of a pruned saga
      starts a new instance. ``inbox_retention`` is the reply consumers'.

    ``concurrency`` runs that many competing consumers of the reply group, and
    ``batch_size`` > 1 lets each apply up to that many replies per transaction (the
    instances locked and saved set-wise: a few statements per batch), for
    throughput. The outbox relay that publishes the commands is a separate component.
    """

    def __init__(
        self,
        database: Database,
        transport: Transport,
        sagas: Sequence[Saga],
        *,
        name: str = "orchestrator",
        timer_interval: float = 1.0,
        timer_batch: int = 200,
        max_attempts: int = 50,
        backoff_base: float = 0.02,
        backoff_cap: float = 2.0,
        prefetch: int = 64,
        concurrency: int = 1,
        batch_size: int = 1,
        retention: timedelta | None = timedelta(days=30),
        inbox_retention: timedelta | None = timedelta(days=7),
    ) -> None:
        self.database = database
        self.name = name
        self.sagas = registry(list(sagas))
        if not self.sagas:
            raise ConfigurationError(
                f"orchestrator {name!r} was given no sagas: Orchestrator(db, transport, [saga])"
            )
        if not is_count(timer_batch):
            raise ConfigurationError(
                f"timer_batch must be an int of at least 1, not {timer_batch!r}"
            )
        if not is_count(concurrency):
            raise ConfigurationError(
                f"concurrency must be an int of at least 1, not {concurrency!r}"
            )
        seconds("timer_interval", timer_interval)
        names = list(self.sagas)
        self._pruning = Pruning(
            f"ended sagas of {name}",
            retention,
            lambda cutoff, limit: prune_ended(database, names, cutoff, limit),
            PRUNE_BATCH,
        )
        self.timer_interval = timer_interval
        self.timer_batch = timer_batch
        # A version conflict is retried through the consumer: hence many quick attempts.
        # ``concurrency`` competing consumers of one group handle replies in parallel
        # (a transport subscription handles one delivery at a time).
        self.consumers = [
            Consumer(
                name,
                database,
                transport,
                max_attempts=max_attempts,
                backoff_base=backoff_base,
                backoff_cap=backoff_cap,
                prefetch=prefetch,
                batch_size=batch_size,
                inbox_retention=inbox_retention,
            )
            for _ in range(concurrency)
        ]
        for consumer in self.consumers:
            for saga in self.sagas.values():
                consumer.add_handler(
                    saga.reply_type, self._on_reply, schema=ReplyData, batch=self._on_replies
                )
        self.consumer = self.consumers[0]
        self._stop = asyncio.Event()
        self._timer: asyncio.Task[None] | None = None

    def definition(self, name: str) -> Saga:
        """The saga definition called ``name``."""
        try:
            return self.sagas[name]
        except KeyError:
            raise ConfigurationError(
                f"orchestrator {self.name!r} does not know saga {name!r}; it runs "
                f"{', '.join(self.sagas)}: pass the definition to Orchestrator(sagas=[...])"
            ) from None

    # -- starting -----------------------------------------------------------------

    async def start(
        self,
        saga: Saga | str,
        data: dict[str, Any] | None = None,
        *,
        saga_id: str | None = None,
        conn: AsyncConnection | None = None,
    ) -> str:
        """Start an instance of ``saga`` with ``data``; return its id.

        Idempotent per ``saga_id``: starting an id that exists returns it and does
        nothing (a retried request cannot create a second instance); an id that is
        an instance of another saga raises :class:`~accord.errors.DuplicateError`.
        ``data`` is a JSON object (``ValueError`` if not). With ``conn`` the start
        commits with the caller's transaction.
        """
        definition = self.definition(saga if isinstance(saga, str) else saga.name)
        data = _checked_data(definition, data)
        if saga_id is not None:
            _check_saga_id(saga_id)
        committed: list[Callable[[], None]] = []
        # Its first deadline is in server time: measured on the caller's connection
        # inside its transaction (another one of the pool might never come).
        await self.database.clock.sync_if_due(conn)
        if conn is None:
            # On PostgreSQL a saga whose first step is a command starts in one
            # statement that commits on its own; otherwise the first statement sent
            # begins a transaction, committed here.
            async with self.database.connect() as own:
                started = await self._start(own, definition, data, saga_id, committed, alone=True)
                if own.in_transaction():
                    await own.commit()
            run_after_commit(committed)
        else:  # counted when the caller commits, not if it rolls back
            started = await self._start(conn, definition, data, saga_id, committed)
            if committed:
                on_commit(conn, functools.partial(run_after_commit, committed))
        return started

    async def _start(
        self,
        conn: AsyncConnection,
        saga: Saga,
        data: dict[str, Any],
        saga_id: str | None,
        committed: list[Callable[[], None]],
        *,
        alone: bool = False,
    ) -> str:
        now = self.database.clock.now()
        state = SagaState(
            id=saga_id or str(uuid.uuid4()),
            name=saga.name,
            status=RUNNING,
            phase=ACTION,
            step=0,
            attempt=0,
            waiting=False,
            data=data,  # start()'s copy (_checked_data)
            error=None,
            version=0,
            created_at=now,
            updated_at=now,
        )
        engine = Engine(saga, conn, state, self.database.clock.now)
        if saga.steps and isinstance(saga.steps[0].action, Command):
            # Nothing runs here before the first command: the row goes in as that
            # transition leaves it (one INSERT rather than an INSERT and an UPDATE).
            await engine.start()
            _continue_trace(engine.outbox, 0, current_traceparent())
            if not await engine.save_new(alone=alone):
                return await _existing(conn, state.id, saga.name)
        else:
            if not await insert_instance(conn, state):
                return await _existing(conn, state.id, saga.name)
            await engine.start()
            _continue_trace(engine.outbox, 0, current_traceparent())
            await engine.save()
        committed.append(SAGAS_STARTED.labels(saga.name).inc)
        committed.extend(engine.committed)
        return state.id

    # -- replies ------------------------------------------------------------------

    async def _on_reply(self, ctx: HandlerContext, data: Any) -> None:
        reply = Reply(data)
        state = await load(ctx.conn, reply.saga_id)
        if state is None:
            log.warning("reply for unknown saga %s ignored", reply.saga_id)
            return
        engine = Engine(self.definition(state.name), ctx.conn, state, self.database.clock.now)
        await engine.on_reply(reply)
        _continue_trace(engine.outbox, 0, ctx.traceparent)
        # A ConcurrencyError here rolls the handler back; the consumer retries it.
        await engine.save()
        for callback in engine.committed:
            ctx.after_commit(callback)

    async def _on_replies(self, items: Sequence[tuple[HandlerContext, Any]]) -> None:
        # Locked up front (in id order), so the versions cannot move under the batch;
        # several replies to one instance go through one engine in arrival order.
        conn = items[0][0].conn
        replies = [Reply(data) for _, data in items]
        states = await load_locked(conn, [reply.saga_id for reply in replies])
        engines: dict[str, Engine] = {}
        for (ctx, _), reply in zip(items, replies, strict=True):
            engine = engines.get(reply.saga_id)
            if engine is None:
                state = states.get(reply.saga_id)
                if state is None:
                    log.warning("reply for unknown saga %s ignored", reply.saga_id)
                    continue
                engine = engines[reply.saga_id] = Engine(
                    self.definition(state.name), conn, state, self.database.clock.now
                )
            sent = len(engine.outbox)
            with as_current(ctx.span):
                await engine.on_reply(reply)
            _continue_trace(engine.outbox, sent, ctx.traceparent)
        await save_locked(conn, [engine.tx for engine in engines.values()])
        await add_to_outbox(conn, *(m for engine in engines.values() for m in engine.outbox))
        for engine in engines.values():
            for callback in engine.committed:
                items[0][0].after_commit(callback)

    # -- the timer ----------------------------------------------------------------

    async def fire_due(self, now: datetime | None = None) -> int:
        """Fire every deadline due at ``now``; return how many changed an instance."""
        await self.database.clock.sync_if_due()
        moment = now or self.database.clock.now()
        # Only deadlines of the sagas this orchestrator runs (another service's may
        # share the database, its due rows piling up while its orchestrator is down):
        # ranges of (saga_name, due_at). A row without a name was written by an
        # Accord older than the column (one still running in a rolling upgrade, or
        # before migration 6 found its instance gone): it is this orchestrator's if
        # its instance is, or if there is none (firing it then only deletes it).
        names = list(self.sagas)
        name = deadlines.c.saga_name
        someone_elses = sa.exists().where(
            sagas_table.c.id == deadlines.c.saga_id, sagas_table.c.name.not_in(names)
        )
        query = (
            sa.select(deadlines.c.saga_id)
            .where(
                deadlines.c.due_at <= moment,
                sa.or_(name.in_(names), sa.and_(name.is_(None), ~someone_elses)),
            )
            .order_by(deadlines.c.due_at)
            .limit(self.timer_batch)
        )
        async with self.database.read() as conn:
            due = [row[0] for row in (await conn.execute(query)).all()]
        fired = 0
        for saga_id in due:
            try:
                fired += await self._fire(saga_id, moment)
            except ConcurrencyError:
                log.debug("deadline of saga %s raced with another transition", saga_id)
            except Exception:
                log.exception(
                    "firing the deadline of saga %s failed; will retry in %.0fs",
                    saga_id,
                    FAILED_DEADLINE_DELAY,
                )
                await self._put_off(saga_id, moment)
        return fired

    async def _put_off(self, saga_id: str, moment: datetime) -> None:
        """A deadline whose transition fails stays due: put it back, or it heads every
        round (they go by due time) and, ``timer_batch`` of them, starve every other
        saga's timeouts, retries and operator commands."""
        later = self.database.clock.now() + timedelta(seconds=FAILED_DEADLINE_DELAY)
        with contextlib.suppress(AccordError):  # the database may be what failed
            async with self.database.transaction() as conn:
                # The saga first, as every other writer of its deadline: a batch that
                # clears the deadline meanwhile (by tuple id) must not find it moved.
                await load(conn, saga_id, for_update=True)
                await conn.execute(
                    deadlines.update()
                    .where(deadlines.c.saga_id == saga_id, deadlines.c.due_at <= moment)
                    .values(due_at=later)
                )

    async def _fire(self, saga_id: str, moment: datetime) -> int:
        async with self.database.transaction() as conn:
            # Lock the instance before its deadline, in the order a reply's transition
            # takes them (saga row, then deadline): a timer and a reply racing on one
            # saga queue up instead of deadlocking. A second orchestrator's timer waits
            # here, then finds the deadline gone or superseded.
            state = await load(conn, saga_id, for_update=True)
            query = sa.select(deadlines).where(
                deadlines.c.saga_id == saga_id, deadlines.c.due_at <= moment
            )
            deadline = (await conn.execute(query)).first()
            if deadline is None:
                return 0
            d = deadline._mapping
            if state is None or not _matches(state, d):
                await conn.execute(deadlines.delete().where(deadlines.c.saga_id == saga_id))
                return 0
            engine = Engine(self.definition(state.name), conn, state, self.database.clock.now)
            await engine.on_deadline(d["kind"])
            await engine.save()
        run_after_commit(engine.committed)
        return 1

    async def _timer_loop(self) -> None:
        while not self._stop.is_set():
            fired = 0
            try:
                fired = await self.fire_due()
            except Exception as exc:
                log_retried_failure(log, exc, "saga timer round failed; will retry")
            pruned = await self._pruning.when_due()
            if fired < self.timer_batch and not self._pruning.full(pruned):
                await wait_event(self._stop, self.timer_interval)

    # -- lifecycle ----------------------------------------------------------------

    async def declare(self) -> list[GroupDeclaration]:
        """Declare the reply group without consuming (see
        :meth:`accord.inbox.Consumer.declare`); its consumers share it."""
        return await self.consumer.declare()

    async def connect(self) -> None:
        """Subscribe the reply group now; idempotent (:meth:`run` does it too).

        A group only receives what is published after it exists, so call this (or
        :meth:`declare`) before starting sagas when :meth:`run` may not have begun yet.
        """
        # Replies set deadlines in server time: measure before the first one comes.
        await self.database.clock.sync_if_due()
        for consumer in self.consumers:
            await consumer.start()

    async def run(self) -> None:
        """Consume replies and fire deadlines until :meth:`stop`."""
        await self.connect()
        self._timer = asyncio.create_task(self._timer_loop(), name=f"accord-timer-{self.name}")
        try:
            await self._stop.wait()
        finally:
            for consumer in self.consumers:
                await consumer.stop()
            timer, self._timer = self._timer, None
            if timer is not None:
                await timer
            # Reset here, not at the start: a stop() that came before run() must hold.
            self._stop.clear()

    async def stop(self) -> None:
        """Stop consuming and firing; what is in flight finishes."""
        self._stop.set()


def _continue_trace(outbox: list[Message], sent: int, traceparent: str | None) -> None:
    """Give the commands from ``outbox[sent]`` on, emitted for one reply, the trace of that
    reply (each reply of a batch has its own)."""
    if traceparent is not None:
        outbox[sent:] = [m.with_(traceparent=m.traceparent or traceparent) for m in outbox[sent:]]


def _matches(state: SagaState, deadline: Any) -> bool:
    """Whether a deadline still applies to the instance (not superseded by a transition)."""
    if deadline["kind"] == "abort":
        return state.status not in ENDED
    return state.status in ACTIVE and (state.phase, state.step, state.attempt) == (
        deadline["phase"],
        deadline["step"],
        deadline["attempt"],
    )
