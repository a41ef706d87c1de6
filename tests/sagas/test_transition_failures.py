"""What a transition does when computing it raises
(a step whose command cannot be built, data that is not JSON), and what that does to
the durable timer. Real databases (SQLite and PostgreSQL), no broker: replies are
handed to the orchestrator's consumer and deadlines fired with ``fire_due``."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from accord.db import Database
from accord.db.schema import outbox
from accord.db.schema_sagas import deadlines
from accord.messages import Message
from accord.sagas import Orchestrator, Retry, Saga, StepContext, command
from accord.sagas._store import SagaState, load
from accord.testing import CapturedDelivery
from accord.transports.sql import SqlTransport


def _transport(database: Database) -> SqlTransport:
    return SqlTransport(database.url, channel=f"review-{uuid.uuid4().hex[:8]}")


async def _state(database: Database, saga_id: str) -> SagaState:
    async with database.connect() as conn:
        state = await load(conn, saga_id)
    assert state is not None
    return state


async def _sent(database: Database) -> list[str]:
    async with database.connect() as conn:
        rows = await conn.execute(sa.select(outbox.c.event_type).order_by(outbox.c.created_at))
        return [row[0] for row in rows.all()]


async def _step_0_succeeds_then_is_compensated(
    database: Database, orchestrator: Orchestrator, saga: Saga, saga_id: str
) -> None:
    """Reply "done" to step 0, whose successor cannot go out: the saga compensates 0."""
    delivery = CapturedDelivery(_reply(saga, saga_id, 0, 1))
    await orchestrator.consumer.handle(delivery)
    state = await _state(database, saga_id)
    assert (state.status, state.phase, state.step) == ("COMPENSATING", "compensation", 0), (
        state.status,
        state.phase,
        state.step,
        state.waiting,
        delivery.outcome,
    )


def _reply(saga: Saga, saga_id: str, step: int, attempt: int, ok: bool = True) -> Message:
    return Message(
        type=saga.reply_type,
        data={
            "saga_id": saga_id,
            "step": step,
            "phase": "action",
            "attempt": attempt,
            "ok": ok,
            "result": None,
            "error": None if ok else "refused",
        },
    )


def _needs_card(data: dict[str, Any]) -> Any:
    return {"card": data["card"]}  # KeyError: the saga has no card


async def _fails_once(ctx: StepContext) -> None:
    if ctx.attempt == 1:
        raise RuntimeError("transient")


async def _undo(ctx: StepContext) -> None:
    ctx.data["undone"] = True


_FAST = Retry(max_attempts=3, base=0.01, cap=0.01)


async def test_a_command_that_cannot_be_built_after_a_reply_fails_its_step(
    database: Database,
) -> None:
    """Step 1's command payload raises (the saga data lacks a key). Expected: like a
    local action that raises, the step counts as failed and the steps before it are
    compensated — the reply to step 0 is applied and the saga goes COMPENSATING,
    sending step 0's compensating command. Before the fix, the exception escapes
    ``Engine._send``/``command_message``, the reply's transaction rolls back and the
    reply is retried (then dead-lettered): the saga stays RUNNING, waiting at step 0
    for a reply it already got — for ever, since that step has no timeout."""
    await database.upgrade()
    saga = (
        Saga("build")
        .step("reserve", command("b.reserve"), compensate=command("b.release"), timeout=None)
        .step("charge", command("b.charge", payload=_needs_card))
    )
    orchestrator = Orchestrator(database, _transport(database), [saga], name="orch")
    saga_id = await orchestrator.start(saga, {})

    await _step_0_succeeds_then_is_compensated(database, orchestrator, saga, saga_id)
    assert "b.release" in await _sent(database)


async def test_a_command_that_cannot_be_built_after_a_retry_does_not_leave_the_saga_running(
    database: Database,
) -> None:
    """A local step fails once and is retried by the timer; the retry succeeds and the
    next step's command payload raises. Expected: that step fails and the saga is
    compensated (it ends COMPENSATED; 'every saga ends COMPLETED, COMPENSATED or
    STUCK'). Before the fix, ``Orchestrator._fire`` raises, ``fire_due`` logs it and leaves
    the deadline as it was: every timer round fires it again and fails, for ever,
    and the saga stays RUNNING at step 0 with a due deadline."""
    await database.upgrade()
    saga = (
        Saga("build2")
        .step("prepare", _fails_once, compensate=_undo, retry=_FAST)
        .step("charge", command("b2.charge", payload=_needs_card))
    )
    orchestrator = Orchestrator(database, _transport(database), [saga], name="orch")
    saga_id = await orchestrator.start(saga, {})
    assert (await _state(database, saga_id)).status == "RUNNING"

    later = datetime.now(UTC) + timedelta(minutes=1)
    for _ in range(3):
        await orchestrator.fire_due(later)

    state = await _state(database, saga_id)
    assert state.status == "COMPENSATED", (state.status, state.step, state.attempt)
    assert state.data.get("undone") is True


async def test_a_deadline_whose_transition_always_fails_does_not_starve_the_others(
    database: Database,
) -> None:
    """The timer takes the due deadlines oldest first, ``timer_batch`` at a time. One
    whose transition raises every time (here a local step that puts a datetime, not
    JSON, into the saga data on its retry) stays due with its old ``due_at``, so it
    heads every round. Expected: the other sagas' deadlines still fire (the failing
    transition fails its step, or its deadline is pushed back / the saga made
    STUCK). Before the fix, with ``timer_batch`` failing deadlines ahead (one here, with
    ``timer_batch=1``; 200 by default), no other saga's timeout or retry ever fires
    again."""
    await database.upgrade()

    async def stamps(ctx: StepContext) -> None:
        if ctx.attempt == 1:
            raise RuntimeError("transient")
        ctx.data["when"] = datetime.now(UTC)  # not JSON-serialisable

    poison = Saga("poison").step("stamp", stamps, retry=_FAST).step("send", command("p.send"))
    healthy = (
        Saga("healthy").step("prepare", _fails_once, retry=_FAST).step("send", command("h.send"))
    )
    orchestrator = Orchestrator(
        database, _transport(database), [poison, healthy], name="orch", timer_batch=1
    )
    poisoned = await orchestrator.start(poison, {})
    ok = await orchestrator.start(healthy, {})
    async with database.connect() as conn:
        dues = dict((await conn.execute(sa.select(deadlines.c.saga_id, deadlines.c.due_at))).all())
    assert dues[poisoned] <= dues[ok]  # the poisoned one is first in line

    later = datetime.now(UTC) + timedelta(minutes=1)
    for _ in range(5):
        await orchestrator.fire_due(later)

    state = await _state(database, ok)
    assert (state.status, state.step, state.waiting) == ("RUNNING", 1, True), (
        "the healthy saga's retry never fired",
        state.status,
        state.step,
        state.attempt,
    )
    assert "h.send" in await _sent(database)


async def test_a_local_step_that_leaves_data_not_json_fails_the_step(
    database: Database,
) -> None:
    """A local step after a remote one writes a value that is not JSON (a datetime)
    into ``ctx.data``. Expected: the step fails like one that raises (its change
    is not kept; the saga compensates step 0), as happens for any other exception
    of a local action. Before the fix, ``_local`` accepts the data, the transition's save
    raises, the reply's transaction rolls back and the reply is retried, then
    dead-lettered: the saga stays RUNNING waiting at step 0 for a reply it got."""
    await database.upgrade()

    async def stamp(ctx: StepContext) -> None:
        ctx.data["when"] = datetime.now(UTC)

    saga = (
        Saga("stamped")
        .step("reserve", command("s.reserve"), compensate=command("s.release"), timeout=None)
        .step("stamp", stamp)
        .step("send", command("s.send"))
    )
    orchestrator = Orchestrator(database, _transport(database), [saga], name="orch")
    saga_id = await orchestrator.start(saga, {})

    await _step_0_succeeds_then_is_compensated(database, orchestrator, saga, saga_id)
    assert "s.release" in await _sent(database)


async def test_a_compensating_command_that_cannot_be_built_makes_the_saga_stuck(
    database: Database,
) -> None:
    """Step 1 fails; step 0's compensating command's payload raises. Expected: a failed
    compensation like any other — retried per ``compensation_retry`` (here one attempt)
    and then STUCK, counted and listed for an operator. Before the fix, the exception escapes
    the transition: the failure reply is retried and dead-lettered, and the saga stays
    RUNNING, waiting at step 1 for the reply it got, never STUCK."""
    await database.upgrade()

    def broken(data: dict[str, Any]) -> Any:
        raise ValueError("cannot build the release")

    saga = (
        Saga("cbuild", compensation_retry=Retry(max_attempts=1))
        .step("reserve", command("c.reserve"), compensate=command("c.release", payload=broken))
        .step("charge", command("c.charge"), timeout=None)
    )
    orchestrator = Orchestrator(database, _transport(database), [saga], name="orch")
    saga_id = await orchestrator.start(saga, {})
    await orchestrator.consumer.handle(CapturedDelivery(_reply(saga, saga_id, 0, 1)))
    assert (await _state(database, saga_id)).step == 1

    delivery = CapturedDelivery(_reply(saga, saga_id, 1, 1, ok=False))
    await orchestrator.consumer.handle(delivery)

    state = await _state(database, saga_id)
    assert state.status == "STUCK", (state.status, state.phase, state.step, delivery.outcome)
