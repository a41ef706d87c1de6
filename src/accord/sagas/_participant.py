"""Participants: a decorator that turns a function into an idempotent saga command handler."""

from __future__ import annotations

import functools
import logging
import uuid
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from accord.db.schema_sagas import participations
from accord.errors import AccordError, DecodeError
from accord.inbox import Consumer, HandlerContext
from accord.messages import Message
from accord.observability import as_current
from accord.outbox import add as add_to_outbox
from accord.sagas._store import ACTION, COMPENSATION
from accord.transports.base import topic_matches

__all__ = ["CommandContext", "StepFailed", "participant"]

log = logging.getLogger("accord.sagas.participant")

_REFUSED = "refused: this step was compensated before its command arrived"
_REPLY_IDS = uuid.UUID("0b8f3c52-8f0e-4a57-b3b1-7d1f6f0f9a44")


class StepFailed(AccordError):
    """Raise from a participant's handler to refuse a command (no seats left, card
    declined): the handler's writes are rolled back and the saga gets a failure reply."""


@dataclass
class CommandContext:
    """What a participant's handler gets: its transaction and the saga step it serves."""

    conn: AsyncConnection
    message: Message
    saga_id: str
    step: int
    phase: str
    attempt: int

    @property
    def compensating(self) -> bool:
        """Whether this command undoes an earlier one."""
        return self.phase == COMPENSATION


CommandFunc = Callable[[CommandContext, Any], Awaitable[Any]]


def participant(
    consumer: Consumer, type: str, *, schema: Any = None
) -> Callable[[CommandFunc], CommandFunc]:
    """Register ``async def f(ctx: CommandContext, data) -> result`` on ``consumer`` as the
    handler of saga command ``type``; it replies to the orchestrator by itself.

    * Returning means success: the result (JSON) goes back in the reply and, if a
      dict, into the saga's data. Raising (:class:`StepFailed` for a business
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
    * With a consumer in batch mode (``Consumer(batch_size=...)``) the commands of
      a batch share their bookkeeping: one lock statement, one read of the records,
      one write of records and one of replies. Functions run without a savepoint
      there, so one that raises fails the batch, which the consumer then handles
      one command at a time as above — the functions before it run again (keep
      effects outside the transaction idempotent). After such a failure the next
      batches give each function a savepoint for a while, so a run of refusals
      costs two round trips a command instead of replayed batches.
    """

    def register(func: CommandFunc) -> CommandFunc:
        batch = _Participant.of(consumer)

        async def handle(ctx: HandlerContext, data: Any) -> None:
            await batch.handle_one(ctx, data)

        consumer.add_handler(type, handle, schema=schema, batch=batch.handle_batch)
        batch.funcs[type] = func  # after add_handler: a refused duplicate changes nothing
        return func

    return register


@dataclass(frozen=True)
class _Command:
    """The saga step a command message is for (its ``saga*`` extensions)."""

    saga_id: str
    step: int
    phase: str
    attempt: int
    reply_type: str

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
            )
        except (KeyError, ValueError) as exc:
            raise DecodeError(
                f"{message.type} {message.id} is not a saga command (missing or bad extension "
                f"{exc}); send it from an Orchestrator"
            ) from None

    @property
    def lock_key(self) -> tuple[str, int]:
        return self.saga_id, self.step


_Records = dict[str, dict[str, Any]]  # phase -> the participant's record of it


class _Participant:
    """The participant handlers of one consumer: their functions by command type."""

    #: Commands given a savepoint each after a function raised inside a batch.
    CAREFUL_FOR = 256

    def __init__(self, name: str) -> None:
        self.name = name
        self.funcs: dict[str, CommandFunc] = {}  # by registered type or pattern
        self._careful = 0

    def _func(self, message_type: str) -> CommandFunc:
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
        done = (await _records(conn, self.name, [command.lock_key])).get(command.lock_key, {})
        ok, result, error, record = await self._outcome(ctx, data, command, done, savepoint=True)
        if record is not None:
            await _write_records(conn, [record])
        await add_to_outbox(conn, _reply(ctx, command, ok, result, error))

    async def handle_batch(self, items: Sequence[tuple[HandlerContext, Any]]) -> None:
        commands = [_Command.of(ctx.message) for ctx, _ in items]
        conn = items[0][0].conn
        keys = sorted({c.lock_key for c in commands})
        await _lock(conn, self.name, keys)
        done = await _records(conn, self.name, keys)
        records: dict[tuple[str, int, str], dict[str, Any]] = {}
        replies = []
        careful = self._careful > 0
        self._careful = max(0, self._careful - len(items))
        for (ctx, data), command in zip(items, commands, strict=True):
            mine = done.setdefault(command.lock_key, {})
            try:
                with as_current(ctx.span):
                    ok, result, error, record = await self._outcome(
                        ctx, data, command, mine, savepoint=careful
                    )
            except Exception:
                self._careful = self.CAREFUL_FOR
                raise
            if record is not None:
                mine[command.phase] = records[(*command.lock_key, command.phase)] = record
            replies.append(_reply(ctx, command, ok, result, error))
        await _write_records(conn, list(records.values()))
        await add_to_outbox(conn, *replies)

    async def _outcome(
        self,
        ctx: HandlerContext,
        data: Any,
        command: _Command,
        done: _Records,
        *,
        savepoint: bool,
    ) -> tuple[bool, Any, str | None, dict[str, Any] | None]:
        """(ok, result, error, the record to write or None) of ``command``, given what
        was ``done`` for its step here. Without ``savepoint`` a failing function raises."""
        phase = command.phase
        mine = done.get(phase)
        if phase == ACTION and COMPENSATION in done:
            log.info(
                "saga %s step %d: late command %s refused",
                command.saga_id,
                command.step,
                ctx.message.type,
            )
            return False, None, _REFUSED, None
        if mine is not None and (mine["ok"] or mine["attempt"] == command.attempt):
            return mine["ok"], mine["result"], mine["error"], None
        action = done.get(ACTION)
        ok, result, error = True, None, None
        if phase == ACTION or (action is not None and action["ok"]):
            func = self._func(ctx.message.type)
            cctx = CommandContext(
                ctx.conn, ctx.message, command.saga_id, command.step, phase, command.attempt
            )
            if not savepoint:
                result = await func(cctx, data)
            else:
                nested = await ctx.conn.begin_nested()
                try:
                    result = await func(cctx, data)
                except Exception as exc:
                    await nested.rollback()
                    ok, error = False, f"{type(exc).__name__}: {exc}"
                else:
                    await nested.commit()
        # else: a compensation of a step never applied here: nothing to undo.
        record = {
            "participant": self.name,
            "saga_id": command.saga_id,
            "step": command.step,
            "phase": phase,
            "attempt": command.attempt,
            "ok": ok,
            "result": result,
            "error": error,
            "at": datetime.now(UTC),
        }
        return ok, result, error, record


_PARTICIPANTS: weakref.WeakKeyDictionary[Consumer, _Participant] = weakref.WeakKeyDictionary()


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
) -> dict[tuple[str, int], _Records]:
    wanted = set(keys)
    params = {"name": name, "ids": sorted({saga_id for saga_id, _ in keys})}
    found: dict[tuple[str, int], _Records] = {}
    for row in (await conn.execute(_RECORDS, params)).all():
        if (row.saga_id, row.step) in wanted:
            found.setdefault((row.saga_id, row.step), {})[row.phase] = dict(row._mapping)
    return found


async def _write_records(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    # One key per row (the batch keeps the last record of each): an upsert of many
    # rows never meets itself.
    await conn.execute(_upsert_record(conn.dialect.name), rows)


_RECORDS = sa.select(participations).where(
    participations.c.participant == sa.bindparam("name"),
    participations.c.saga_id.in_(sa.bindparam("ids", expanding=True)),
)


@functools.cache
def _upsert_record(dialect: str) -> Any:
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    statement = insert(participations)
    return statement.on_conflict_do_update(
        index_elements=[
            participations.c.participant,
            participations.c.saga_id,
            participations.c.step,
            participations.c.phase,
        ],
        set_={k: statement.excluded[k] for k in ("attempt", "ok", "result", "error", "at")},
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
