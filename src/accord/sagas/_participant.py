"""Participants: a decorator that turns a function into an idempotent saga command handler."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
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
from accord.outbox import add as add_to_outbox
from accord.sagas._store import ACTION, COMPENSATION

__all__ = ["CommandContext", "StepFailed", "participant"]

log = logging.getLogger("accord.sagas.participant")

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
    """

    def register(func: CommandFunc) -> CommandFunc:
        async def handle(ctx: HandlerContext, data: Any) -> None:
            await _handle(consumer.name, func, ctx, data)

        consumer.add_handler(type, handle, schema=schema)
        return func

    return register


async def _handle(name: str, func: CommandFunc, ctx: HandlerContext, data: Any) -> None:
    message = ctx.message
    ext = message.extensions
    try:
        saga_id = ext["sagaid"]
        step = int(ext["sagastep"])
        phase = ext["sagaphase"]
        attempt = int(ext["sagaattempt"])
        reply_type = ext["sagareply"]
    except (KeyError, ValueError) as exc:
        raise DecodeError(
            f"{message.type} {message.id} is not a saga command (missing or bad extension "
            f"{exc}); send it from an Orchestrator"
        ) from None
    conn = ctx.conn
    await _lock(conn, name, saga_id, step)
    done = await _records(conn, name, saga_id, step)
    mine = done.get(phase)
    ok: bool
    result: Any = None
    error: str | None = None
    if phase == ACTION and COMPENSATION in done:
        ok, error = False, "refused: this step was compensated before its command arrived"
        log.info("saga %s step %d: late command %s refused", saga_id, step, message.type)
        await _reply(ctx, reply_type, saga_id, step, phase, attempt, ok, None, error)
        return
    if mine is not None and (mine["ok"] or mine["attempt"] == attempt):
        await _reply(
            ctx,
            reply_type,
            saga_id,
            step,
            phase,
            attempt,
            mine["ok"],
            mine["result"],
            mine["error"],
        )
        return
    action = done.get(ACTION)
    if phase == COMPENSATION and (action is None or not action["ok"]):
        ok, result = True, None  # nothing was applied here: nothing to undo
    else:
        cctx = CommandContext(conn, message, saga_id, step, phase, attempt)
        nested = await conn.begin_nested()
        try:
            result = await func(cctx, data)
        except Exception as exc:
            await nested.rollback()
            ok, error = False, f"{type(exc).__name__}: {exc}"
        else:
            await nested.commit()
            ok = True
    await _record(conn, name, saga_id, step, phase, attempt, ok, result, error)
    await _reply(ctx, reply_type, saga_id, step, phase, attempt, ok, result, error)


async def _lock(conn: AsyncConnection, name: str, saga_id: str, step: int) -> None:
    # A compensation and a late command of one step may be handled at the same time
    # by two consumers: serialise them, so one sees the other's record. (SQLite
    # transactions are serial already.)
    if conn.dialect.name == "postgresql":
        await conn.execute(
            sa.text("SELECT pg_advisory_xact_lock(hashtext(:k))"),
            {"k": f"accord-saga/{name}/{saga_id}/{step}"},
        )


async def _records(
    conn: AsyncConnection, name: str, saga_id: str, step: int
) -> dict[str, dict[str, Any]]:
    query = sa.select(participations).where(
        participations.c.participant == name,
        participations.c.saga_id == saga_id,
        participations.c.step == step,
    )
    return {r.phase: dict(r._mapping) for r in (await conn.execute(query)).all()}


async def _record(
    conn: AsyncConnection,
    name: str,
    saga_id: str,
    step: int,
    phase: str,
    attempt: int,
    ok: bool,
    result: Any,
    error: str | None,
) -> None:
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    values = {
        "participant": name,
        "saga_id": saga_id,
        "step": step,
        "phase": phase,
        "attempt": attempt,
        "ok": ok,
        "result": result,
        "error": error,
        "at": datetime.now(UTC),
    }
    statement = insert(participations).values(**values)
    statement = statement.on_conflict_do_update(
        index_elements=[
            participations.c.participant,
            participations.c.saga_id,
            participations.c.step,
            participations.c.phase,
        ],
        set_={k: statement.excluded[k] for k in ("attempt", "ok", "result", "error", "at")},
    )
    await conn.execute(statement)


async def _reply(
    ctx: HandlerContext,
    reply_type: str,
    saga_id: str,
    step: int,
    phase: str,
    attempt: int,
    ok: bool,
    result: Any,
    error: str | None,
) -> None:
    command = ctx.message
    reply = Message(
        type=reply_type,
        # The same command always gets a reply with the same id: the orchestrator's
        # inbox drops the copies a redelivered command makes.
        id=str(uuid.uuid5(_REPLY_IDS, f"{command.id}/{ok}")),
        source=ctx.consumer,
        key=saga_id,
        data={
            "saga_id": saga_id,
            "step": step,
            "phase": phase,
            "attempt": attempt,
            "ok": ok,
            "result": result,
            "error": error,
        },
        correlationid=command.correlationid or saga_id,
        causationid=command.id,
        subject=command.subject,
    )
    await add_to_outbox(ctx.conn, reply)
