"""Participants: a decorator that turns a function into an idempotent saga command handler."""

from __future__ import annotations

import functools
import json
import logging
import uuid
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import sqlalchemy as sa
from opentelemetry.trace import Span
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from accord._retention import Pruning, checked_batch
from accord.db import Database
from accord.db.schema_sagas import participations
from accord.db.types import rows_of_each
from accord.errors import AccordError, ConfigurationError, DecodeError
from accord.inbox import Consumer, HandlerContext
from accord.messages import Message
from accord.observability._tracing import as_current
from accord.outbox import add as add_to_outbox
from accord.sagas._store import ACTION, COMPENSATION, VOID
from accord.transports.base import topic_matches

__all__ = [
    "PRUNE_BATCH",
    "CommandContext",
    "RecordsPruned",
    "StepFailed",
    "participant",
    "participants",
    "prune_participations",
]

log = logging.getLogger("accord.sagas.participant")

_REFUSED = "refused: this step was compensated before its command arrived"
_REPLY_IDS = uuid.UUID("0b8f3c52-8f0e-4a57-b3b1-7d1f6f0f9a44")
#: Participants' records deleted a transaction while pruning.
PRUNE_BATCH = 5000
# How far the orchestrator's clock (a saga's start) may be from the pruner's (the
# time records were pruned up to) without a pruned record going unnoticed.
_CLOCK_MARGIN = timedelta(hours=1)
_MIN_RETENTION = timedelta(days=1)
# The row noting the time a participant's records were pruned up to: a record of
# no saga, read with every command's records (no round trip of its own).
_PRUNED_SAGA, _PRUNED_STEP = "", -1


class StepFailed(AccordError):
    """Raise from a participant's handler to refuse a command (no seats left, card
    declined): the handler's writes are rolled back and the saga gets a failure reply."""


class RecordsPruned(AccordError):
    """A participant got a saga command it cannot answer: the saga started before the
    time the participant's records were pruned up to (``records_retention``, or a
    prune by hand) and there is no record of the step here, so whether the step was
    applied (then pruned) is unknown. Raised for a re-sent
    action, which is left undone and, once its attempts are spent, dead-lettered:
    the orchestrator's timeout then asks for a compensation, which is refused for
    the same reason, and the saga ends STUCK for an operator."""


@dataclass
class CommandContext:
    """What a participant's handler gets: its transaction and the saga step it serves."""

    conn: AsyncConnection
    message: Message
    saga_id: str
    step: int
    phase: str
    attempt: int
    #: This command's CONSUMER span when it is not the current one: in a batch
    #: function, which serves many commands in one call (see ``HandlerContext.span``).
    span: Span | None = field(default=None, repr=False)

    @property
    def compensating(self) -> bool:
        """Whether this command undoes an earlier one."""
        return self.phase == COMPENSATION


# ``async def f(ctx: CommandContext, data) -> result``, or with ``batch=True``
# ``async def f(commands: Sequence[tuple[CommandContext, Any]]) -> results | None``
_Func = Callable[..., Awaitable[Any]]
_F = TypeVar("_F", bound=_Func)


def participant(
    consumer: Consumer,
    type: str,
    *,
    schema: Any = None,
    batch: bool = False,
    records_retention: timedelta | None = timedelta(days=30),
) -> Callable[[_F], _F]:
    """Register ``async def f(ctx: CommandContext, data) -> result`` on ``consumer`` as the
    handler of saga command ``type``; it replies to the orchestrator by itself.

    * Returning means success: the result (JSON) goes back in the reply and, if a
      dict, into the saga's data. Values JSON has no type for (a datetime, a UUID)
      travel as their text, as in any message; a result JSON cannot hold (NaN, a
      cycle) fails the step as a raise does. Raising (:class:`StepFailed` for a business
      refusal, or any exception) means failure: the function's writes are rolled
      back (a savepoint) and the reply says why.
    * It runs in the consumer's transaction, so its writes, the inbox row, the
      participant's record of the step and the reply (outbox) commit together.
    * Idempotent per (saga id, step, phase): once a step succeeded here, the same
      command again — a redelivery, or the orchestrator retrying after a lost
      reply — re-sends the recorded reply without running the function.
    * A compensation for a step never applied here (its command was lost, or is
      still on its way after a timeout) succeeds without calling the function,
      and the late command, if it comes, is refused: nothing is left half-done.
    * A void (the step's own command with ``sagaphase`` ``void``, sent for a step
      without a compensating command whose outcome the orchestrator lost) never
      calls the function: the reply says whether the step was applied here, and
      if it was not, the command is refused from then on.
    * With a consumer in batch mode (``Consumer(batch_size=...)``) the commands of
      a batch share their bookkeeping: one lock statement, one read of the records,
      one write of records and one of replies. Functions run without a savepoint
      there, so one that raises fails the batch, which the consumer then handles
      one command at a time as above — the functions before it run again (keep
      effects outside the transaction idempotent). After such a failure the next
      batches give each function a savepoint for a while, so a run of refusals
      costs two round trips a command instead of replayed batches.
    * ``batch=True`` registers ``async def f(commands) -> results`` instead: it gets
      the ``(ctx, data)`` of every command of a batch that needs it to run, in
      order, and returns one result per command, so that it can write set-wise (one
      statement for a batch, not one round trip a command). It cannot refuse one
      command alone: raising fails the batch, and in the one-at-a-time handling that
      follows, and in the careful batches after it, it gets one command at a time in
      a savepoint, where raising refuses that command. A command already done,
      refused or with nothing to compensate never reaches it, as above. A saga's
      commands keep their order (one whose saga already has a command in the pending
      call waits for that call, so a compensation sees what it undoes); commands of
      different sagas may run in another order than they came, batch functions after
      per-command ones.
    * The consumer deletes the participant's records of steps older than
      ``records_retention`` (30 days by default, at least a day; ``None`` keeps
      them), as its inbox rows; ``accord sagas prune-participations`` deletes them
      by hand. Keep it above the life of your longest saga, STUCK time included:
      a prune leaves the time it pruned up to, and for a saga that started before
      then (an hour's margin for clocks), a command whose step has no record here
      cannot tell a step never applied from one whose record was pruned, so it is
      not guessed. A compensation or a void is refused (a failure reply that says
      so), and a re-sent action raises :class:`RecordsPruned` (not run,
      dead-lettered once its attempts are spent); the saga ends STUCK for an
      operator. Every participant of one consumer shares its records: give them
      one retention.
    """

    refuse_snapshot_isolation(consumer.database, f"participant {type!r}")
    if records_retention is not None and records_retention < _MIN_RETENTION:
        raise ConfigurationError(
            f"records_retention must be at least a day (or None), got {records_retention}: "
            "a step's record must outlive its saga"
        )

    def register(func: _F) -> _F:
        handlers = _Participant.of(consumer)
        handlers.check_retention(records_retention)

        async def handle(ctx: HandlerContext, data: Any) -> None:
            await handlers.handle_one(ctx, data)

        consumer.add_handler(type, handle, schema=schema, batch=handlers.handle_batch)
        handlers.keep_records(consumer, records_retention)
        # After add_handler: a refused duplicate changes nothing.
        handlers.funcs[type] = _Registered(func, batch)
        return func

    return register


@dataclass(frozen=True)
class _Registered:
    func: _Func
    batch: bool  # takes every command of a batch at once


@dataclass
class _Call:
    """A command whose function must run, and what it needs."""

    index: int  # in the batch
    ctx: HandlerContext
    cctx: CommandContext
    data: Any
    command: _Command


@dataclass(frozen=True)
class _Command:
    """The saga step a command message is for (its ``saga*`` extensions)."""

    saga_id: str
    step: int
    phase: str
    attempt: int
    reply_type: str
    #: When the saga started (the orchestrator's clock); None from an Accord before it.
    started: datetime | None = None

    @classmethod
    def of(cls, message: Message) -> _Command:
        ext = message.extensions
        try:
            return cls(
                ext["sagaid"],
                int(ext["sagastep"]),
                ext["sagaphase"],
                int(ext["sagaattempt"]),
                ext["sagareply"],
                _started(ext.get("sagastarted")),
            )
        except (KeyError, ValueError) as exc:
            raise DecodeError(
                f"{message.type} {message.id} is not a saga command (missing or bad extension "
                f"{exc}); send it from an Orchestrator"
            ) from None

    @property
    def lock_key(self) -> tuple[str, int]:
        return self.saga_id, self.step


def _started(text: str | None) -> datetime | None:
    if text is None:
        return None
    started = datetime.fromisoformat(text)
    return started.astimezone(UTC) if started.tzinfo else started.replace(tzinfo=UTC)


_Records = dict[str, dict[str, Any]]  # phase -> the participant's record of it


class _Participant:
    """The participant handlers of one consumer: their functions by command type."""

    #: Commands given a savepoint each after a function raised inside a batch.
    CAREFUL_FOR = 256

    def __init__(self, name: str) -> None:
        self.name = name
        self.funcs: dict[str, _Registered] = {}  # by registered type or pattern
        self.retention: timedelta | None = None
        self._kept = False  # whether a registration set the retention
        self._careful = 0

    def check_retention(self, retention: timedelta | None) -> None:
        """Refuse a retention other than the one an earlier registration set."""
        if self._kept and retention != self.retention:
            raise ConfigurationError(
                f"participants of consumer {self.name!r} share their records, kept "
                f"records_retention={self.retention!r} by an earlier registration; "
                f"pass that, not {retention!r}"
            )

    def keep_records(self, consumer: Consumer, retention: timedelta | None) -> None:
        """Keep the records for ``retention``, pruned from ``consumer``'s loop (once
        a registration went through: the first sets it)."""
        if self._kept:
            return
        self._kept, self.retention = True, retention
        if retention is None:
            return
        database, name = consumer.database, self.name
        consumer.add_pruning(
            Pruning(
                f"saga step records of {name}",
                retention,
                lambda cutoff, limit: prune_participations(database, name, cutoff, limit),
                PRUNE_BATCH,
            )
        )

    @staticmethod
    def _unknown(command: _Command, done: _Records, pruned: datetime | None) -> str | None:
        """Why the step's outcome here cannot be known, if it cannot: no record of it
        says whether it was applied, and the saga started before the time records
        were ``pruned`` up to (they may have gone). None when what is here can be
        trusted."""
        if ACTION in done or VOID in done or command.started is None or pruned is None:
            return None
        if command.started >= pruned + _CLOCK_MARGIN:
            return None
        return (
            f"cannot tell whether step {command.step} of saga {command.saga_id} was applied "
            f"here: the saga started {command.started:%Y-%m-%d %H:%M} UTC, before this "
            f"participant's records were pruned up to {pruned:%Y-%m-%d %H:%M} UTC "
            "(records_retention), and no record of the step is left (pruned, or its "
            "command never came); check by hand, then abort the saga or retry it"
        )

    def _func(self, message_type: str) -> _Registered:
        found = self.funcs.get(message_type)
        if found is None:
            found = next(f for t, f in self.funcs.items() if topic_matches(t, message_type))
        return found

    @classmethod
    def of(cls, consumer: Consumer) -> _Participant:
        found = _PARTICIPANTS.get(consumer)
        if found is None:
            found = _PARTICIPANTS[consumer] = cls(consumer.name)
        return found

    async def handle_one(self, ctx: HandlerContext, data: Any) -> None:
        command = _Command.of(ctx.message)
        conn = ctx.conn
        await _lock(conn, self.name, [command.lock_key])
        found, pruned = await _records(conn, self.name, [command.lock_key])
        outcome = self._settled(ctx, command, found.get(command.lock_key, {}), pruned)
        if outcome is None:
            call = _Call(0, ctx, _command_context(ctx, command), data, command)
            outcome = await self._run_careful(call)
        ok, result, error, write = outcome
        if write:
            await _write_records(conn, [self._record(command, ok, result, error)])
        await add_to_outbox(conn, _reply(ctx, command, ok, result, error))

    async def handle_batch(self, items: Sequence[tuple[HandlerContext, Any]]) -> None:
        commands = [_Command.of(ctx.message) for ctx, _ in items]
        conn = items[0][0].conn
        keys = sorted({c.lock_key for c in commands})
        await _lock(conn, self.name, keys)
        done, pruned = await _records(conn, self.name, keys)
        records: dict[tuple[str, int, str], dict[str, Any]] = {}
        outcomes: list[_Outcome | None] = [None] * len(items)
        careful = self._careful > 0
        self._careful = max(0, self._careful - len(items))
        pending: list[_Call] = []

        def settle(command: _Command, index: int, outcome: _Outcome) -> None:
            outcomes[index] = outcome
            ok, result, error, write = outcome
            if write:
                record = self._record(command, ok, result, error)
                done.setdefault(command.lock_key, {})[command.phase] = record
                records[(*command.lock_key, command.phase)] = record

        async def run_pending() -> None:
            try:
                for call, outcome in await self._run(pending, careful):
                    settle(call.command, call.index, outcome)
            except Exception:
                self._careful = self.CAREFUL_FOR
                raise
            pending.clear()

        for index, ((ctx, data), command) in enumerate(zip(items, commands, strict=True)):
            if any(call.command.saga_id == command.saga_id for call in pending):
                # A saga's commands run in the order they came: what an earlier one
                # does decides what this one does (a compensation, a late command).
                await run_pending()
            outcome = self._settled(ctx, command, done.get(command.lock_key, {}), pruned)
            if outcome is None:
                pending.append(_Call(index, ctx, _command_context(ctx, command), data, command))
            else:
                settle(command, index, outcome)
        await run_pending()
        await _write_records(conn, list(records.values()))
        replies = []
        for (ctx, _), command, outcome in zip(items, commands, outcomes, strict=True):
            assert outcome is not None
            ok, result, error, _ = outcome
            replies.append(_reply(ctx, command, ok, result, error))
        await add_to_outbox(conn, *replies)

    def _settled(
        self, ctx: HandlerContext, command: _Command, done: _Records, pruned: datetime | None
    ) -> _Outcome | None:
        """The outcome of ``command`` that needs no function call, given what was
        ``done`` for its step here and the time records were ``pruned`` up to; None
        if its function must run."""
        phase = command.phase
        mine = done.get(phase)
        unknown = self._unknown(command, done, pruned)
        if phase == VOID:
            return _refused(unknown) if unknown else self._void(command, done)
        if phase == ACTION and (COMPENSATION in done or VOID in done):
            log.info(
                "saga %s step %d: late command %s refused",
                command.saga_id,
                command.step,
                ctx.message.type,
            )
            return False, None, _REFUSED, False
        if mine is not None and (mine["ok"] or mine["attempt"] == command.attempt):
            return mine["ok"], mine["result"], mine["error"], False
        action = done.get(ACTION)
        if phase == ACTION and unknown and command.attempt > 1:
            # An earlier attempt may have been applied: never run it twice.
            raise RecordsPruned(unknown)
        if phase == ACTION or (action is not None and action["ok"]):
            return None
        if unknown:
            return _refused(unknown)
        return True, None, None, True  # a compensation of a step never applied here

    def _void(self, command: _Command, done: _Records) -> _Outcome:
        """The orchestrator lost track of a step with no compensating command and asks
        whether it was applied here: if so it says so (with the step's result); if
        not, its record refuses the command from now on. The function never runs."""
        action = done.get(ACTION)
        if action is not None and action["ok"]:
            return True, {"applied": True, "result": action["result"]}, None, False
        voided = done.get(VOID)
        if voided is not None:
            return True, voided["result"], None, False
        log.info("saga %s step %d: voided before its command came", command.saga_id, command.step)
        return True, {"applied": False}, None, True

    async def _run(self, calls: Sequence[_Call], careful: bool) -> list[tuple[_Call, _Outcome]]:
        """Run the functions of ``calls``, each of another saga: a batch function once
        for all of its commands, after the per-command functions; a function that
        raises fails the batch. When ``careful``, every command runs alone in a
        savepoint instead, where raising refuses it."""
        done: list[tuple[_Call, _Outcome]] = []
        by_func: dict[int, tuple[_Registered, list[_Call]]] = {}
        for call in calls:
            registered = self._func(call.ctx.message.type)
            if registered.batch and not careful:
                by_func.setdefault(id(registered), (registered, []))[1].append(call)
                continue
            with as_current(call.ctx.span):
                if careful:
                    outcome = await self._run_careful(call)
                else:
                    result = await registered.func(call.cctx, call.data)
                    outcome = True, _as_reply(registered, result), None, True
            done.append((call, outcome))
        for registered, group in by_func.values():
            results = [_as_reply(registered, r) for r in await _call_batch(registered, group)]
            done.extend(
                (call, (True, result, None, True))
                for call, result in zip(group, results, strict=True)
            )
        return done

    async def _run_careful(self, call: _Call) -> _Outcome:
        """Run one command's function in a savepoint: raising refuses the command."""
        registered = self._func(call.ctx.message.type)
        nested = await call.ctx.conn.begin_nested()
        try:
            if registered.batch:
                (result,) = await _call_batch(registered, [call])
            else:
                result = await registered.func(call.cctx, call.data)
            result = _as_reply(registered, result)
        except Exception as exc:
            await nested.rollback()
            return False, None, f"{type(exc).__name__}: {exc}", True
        await nested.commit()
        return True, result, None, True

    def _record(
        self, command: _Command, ok: bool, result: Any, error: str | None
    ) -> dict[str, Any]:
        return {
            "participant": self.name,
            "saga_id": command.saga_id,
            "step": command.step,
            "phase": command.phase,
            "attempt": command.attempt,
            "ok": ok,
            "result": result,
            "error": error,
            "at": datetime.now(UTC),
        }


# (ok, result, error, whether to write the participant's record of it)
_Outcome = tuple[bool, Any, str | None, bool]


def _refused(why: str) -> _Outcome:
    """A failure reply, recorded nowhere (the next attempt asks again), for a command
    whose step's outcome here is unknown."""
    log.warning("saga command refused: %s", why)
    return False, None, why, False


def _as_reply(registered: _Registered, result: Any) -> Any:
    """``result`` as its reply carries it (JSON, written as the outbox writes data), or
    a ValueError, which fails the step at once: a reply that cannot be sent would
    leave the saga waiting for its timeout."""
    if result is None:
        return None
    try:
        text = json.dumps(result, separators=(",", ":"), default=str, allow_nan=False)
    except (TypeError, ValueError) as exc:  # NaN, a cycle; keys that are not text
        name = getattr(registered.func, "__qualname__", registered.func)
        raise ValueError(f"participant {name} returned a result that is not JSON: {exc}") from None
    return json.loads(text)


async def _call_batch(registered: _Registered, calls: Sequence[_Call]) -> list[Any]:
    """A batch function's results for ``calls``, one per command."""
    results = await registered.func([(call.cctx, call.data) for call in calls])
    if results is None:
        return [None] * len(calls)
    results = list(results)
    if len(results) != len(calls):
        raise TypeError(
            f"batch participant {getattr(registered.func, '__qualname__', registered.func)}"
            f" returned {len(results)} result(s) for {len(calls)} command(s); return one "
            "per command, in order, or None"
        )
    return results


def _command_context(ctx: HandlerContext, command: _Command) -> CommandContext:
    return CommandContext(
        ctx.conn,
        ctx.message,
        command.saga_id,
        command.step,
        command.phase,
        command.attempt,
        span=ctx.span,
    )


_PARTICIPANTS: weakref.WeakKeyDictionary[Consumer, _Participant] = weakref.WeakKeyDictionary()


def refuse_snapshot_isolation(database: Database, what: str) -> None:
    """A step's handler waits for the step's lock after its transaction's first
    statement (the inbox row). Under REPEATABLE READ it would then read from the
    snapshot taken before the wait and miss a compensation that committed during it."""
    level = (database.isolation_level or "").upper().replace("_", " ")
    if level == "REPEATABLE READ":
        raise ConfigurationError(
            f"{what} cannot run on a Database with isolation_level={database.isolation_level!r}: "
            "its handler would read from a snapshot older than the lock it waits for, and "
            "apply a command whose compensation already ran; use READ COMMITTED (the "
            "default) or SERIALIZABLE for the participant's Database"
        )


async def _lock(conn: AsyncConnection, name: str, keys: Sequence[tuple[str, int]]) -> None:
    # A compensation and a late command of one step may be handled at the same time
    # by two consumers: serialise them, so one sees the other's record. Keys are
    # taken in sorted order, so two batches cannot deadlock. (SQLite transactions
    # are serial already.)
    if conn.dialect.name == "postgresql":
        await conn.execute(
            _LOCK, {"keys": [f"accord-saga/{name}/{saga_id}/{step}" for saga_id, step in keys]}
        )


_LOCK = sa.text("SELECT pg_advisory_xact_lock(hashtext(k)) FROM unnest(CAST(:keys AS text[])) k")


async def _records(
    conn: AsyncConnection, name: str, keys: Sequence[tuple[str, int]]
) -> tuple[dict[tuple[str, int], _Records], datetime | None]:
    """The participant's records of the steps ``keys``, and the time its records were
    pruned up to (None if never), in one statement."""
    wanted = set(keys)
    ids = sorted({saga_id for saga_id, _ in keys})
    params = {"name": name, "ids": [_PRUNED_SAGA, *ids]}
    found: dict[tuple[str, int], _Records] = {}
    pruned: datetime | None = None
    for row in (await conn.execute(_records_statement(conn.dialect.name), params)).all():
        if (row.saga_id, row.step) in wanted:
            found.setdefault((row.saga_id, row.step), {})[row.phase] = dict(row._mapping)
        elif (row.saga_id, row.step) == (_PRUNED_SAGA, _PRUNED_STEP):
            pruned = row.at
    return found, pruned


async def _write_records(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    # One key per row (the batch keeps the last record of each): an upsert of many
    # rows never meets itself.
    await conn.execute(_upsert_record(conn.dialect.name), rows)


@functools.cache
def _records_statement(dialect: str) -> Any:
    """A participant's records of the sagas ``ids``: a service's records mostly share
    one participant, so the key must be the only index led by ``participant`` that
    these lookups can take (see :func:`rows_of_each`; the pruning index leaves out
    the pruning marks, which these lookups do not)."""
    c = participations.c
    return rows_of_each(
        participations, c.saga_id, "ids", c.participant == sa.bindparam("name"), dialect=dialect
    )


_RECORD_KEY = [
    participations.c.participant,
    participations.c.saga_id,
    participations.c.step,
    participations.c.phase,
]


@functools.cache
def _upsert_record(dialect: str) -> Any:
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    statement = insert(participations)
    return statement.on_conflict_do_update(
        index_elements=_RECORD_KEY,
        set_={k: statement.excluded[k] for k in ("attempt", "ok", "result", "error", "at")},
    )


def _oldest_records(participant: str, cutoff: datetime, limit: int) -> sa.Select[Any]:
    """Up to ``limit`` of ``participant``'s records written before ``cutoff``, oldest
    first, not its pruning marks: ``step <> -1`` is written as the index's predicate
    is, so that a generic plan can take the index."""
    c = participations.c
    return (
        sa.select(c.saga_id, c.step, c.phase)
        .where(c.participant == participant, c.at < cutoff)
        .where(c.step != sa.literal_column(str(_PRUNED_STEP)))
        .order_by(c.at)
        .limit(limit)
    )


async def prune_participations(
    database: Database, participant: str, cutoff: datetime, limit: int
) -> int:
    """Delete up to ``limit`` of ``participant``'s records written before ``cutoff``,
    oldest first (a range of its (participant, at) index of records), in one
    transaction, and note ``cutoff`` as the time its records were pruned up to (kept
    as the latest); return how many went. Two prunes at once skip each other's rows
    on PostgreSQL."""
    checked_batch(limit)
    c = participations.c
    oldest = _oldest_records(participant, cutoff, limit)
    async with database.transaction() as conn:
        dialect = conn.dialect.name
        if dialect == "postgresql":
            oldest = oldest.with_for_update(skip_locked=True)
        # Noted first: a command that reads the records after this commits knows
        # what may be gone.
        await conn.execute(
            _note_pruned(dialect),
            {
                "participant": participant,
                "saga_id": _PRUNED_SAGA,
                "step": _PRUNED_STEP,
                "phase": "pruned",
                "attempt": 0,
                "ok": True,
                "at": cutoff,
            },
        )
        picked = [tuple(row) for row in (await conn.execute(oldest)).all()]
        if not picked:
            return 0
        statement = participations.delete().where(
            c.participant == participant, sa.tuple_(c.saga_id, c.step, c.phase).in_(picked)
        )
        return int((await conn.execute(statement)).rowcount)


async def participants(database: Database) -> list[str]:
    """The participants that have records in ``database``."""
    async with database.read() as conn:
        found = await conn.scalars(sa.select(participations.c.participant).distinct())
        return sorted(found.all())


@functools.cache
def _note_pruned(dialect: str) -> Any:
    """Upsert a participant's pruned-up-to row, keeping the later time."""
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    statement = insert(participations)
    later = sa.case(
        (statement.excluded.at > participations.c.at, statement.excluded.at),
        else_=participations.c.at,
    )
    return statement.on_conflict_do_update(
        index_elements=_RECORD_KEY,
        set_={"at": later},
    )


def _reply(
    ctx: HandlerContext, command: _Command, ok: bool, result: Any, error: str | None
) -> Message:
    message = ctx.message
    return Message(
        type=command.reply_type,
        # The same command always gets a reply with the same id: the orchestrator's
        # inbox drops the copies a redelivered command makes.
        id=str(uuid.uuid5(_REPLY_IDS, f"{message.id}/{ok}")),
        source=ctx.consumer,
        key=command.saga_id,
        data={
            "saga_id": command.saga_id,
            "step": command.step,
            "phase": command.phase,
            "attempt": command.attempt,
            "ok": ok,
            "result": result,
            "error": error,
        },
        correlationid=message.correlationid or command.saga_id,
        causationid=message.id,
        traceparent=ctx.traceparent,
        subject=message.subject,
    )
