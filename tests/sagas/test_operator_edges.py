"""Transitions at the edges of an operator's work, driven straight through the
orchestrator (real database, no broker): an abort that meets the last compensation,
a retried compensation's reason, and a definition that lost the step a saga is at."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest

from accord.db import Database
from accord.messages import Message
from accord.sagas import Orchestrator, Saga, SagaAdmin, command
from accord.testing import CapturedDelivery
from accord.transports.sql import SqlTransport


async def _noop(_ctx: Any) -> None:
    return None


def _orchestrator(database: Database, saga: Saga) -> Orchestrator:
    return Orchestrator(database, SqlTransport(database.url, channel="edges"), [saga])


async def _reply(
    orchestrator: Orchestrator, saga: Saga, saga_id: str, ok: bool, error: str | None = None
) -> None:
    """The participant's reply to the command the instance waits for."""
    state = await SagaAdmin(orchestrator.database).get(saga_id)
    data = {
        "saga_id": saga_id,
        "step": state.step,
        "phase": state.phase,
        "attempt": state.attempt,
        "ok": ok,
        "error": error,
    }
    delivery = CapturedDelivery(Message(type=saga.reply_type, data=data, id=str(uuid.uuid4())))
    await orchestrator.consumer.handle_batch([delivery])
    assert delivery.outcome == "ack"


def _charged() -> Saga:
    return (
        Saga("charged", stuck_after=1)
        .step("reserve", command("t.reserve"), compensate=command("t.release"))
        .pivot("charge", command("t.charge"))
    )


async def _compensating(database: Database) -> tuple[Orchestrator, Saga, str]:
    """A saga whose pivot was declined: the compensation of 'reserve' is out."""
    await database.upgrade()
    saga = _charged()
    orchestrator = _orchestrator(database, saga)
    saga_id = await orchestrator.start(saga, {})
    await _reply(orchestrator, saga, saga_id, True)
    await _reply(orchestrator, saga, saga_id, False, "declined")
    state = await SagaAdmin(database).get(saga_id)
    assert (state.status, state.phase, state.step) == ("COMPENSATING", "compensation", 0)
    return orchestrator, saga, saga_id


async def test_an_abort_that_meets_the_last_compensation_leaves_the_saga_compensated(
    database: Database,
) -> None:
    """ABORTED says "what is left to undo is the operator's"; nothing was left."""
    orchestrator, saga, saga_id = await _compensating(database)
    admin = SagaAdmin(database)
    await admin.abort(saga_id, "operator says no")
    await _reply(orchestrator, saga, saga_id, True)  # before the abort's deadline fired
    await orchestrator.fire_due()
    state = await admin.get(saga_id)
    assert state.status == "COMPENSATED"
    assert state.error == "step 'charge' failed: declined"
    events = [(e.step_name, e.event) for e in await admin.history(saga_id)]
    assert ("reserve", "abort_requested") in events
    assert ("reserve", "abort_too_late") in events
    assert "aborted" not in {event for _, event in events}


async def test_a_retried_compensation_ends_with_the_reason_the_saga_compensated(
    database: Database,
) -> None:
    orchestrator, saga, saga_id = await _compensating(database)
    admin = SagaAdmin(database)
    await _reply(orchestrator, saga, saga_id, False, "release broken")
    stuck = await admin.get(saga_id)
    assert stuck.status == "STUCK"
    assert "release broken" in (stuck.error or "")

    await admin.retry(saga_id)
    assert (await admin.get(saga_id)).error == "step 'charge' failed: declined"
    await orchestrator.fire_due()  # sends the compensation again
    await _reply(orchestrator, saga, saga_id, True)
    state = await admin.get(saga_id)
    assert (state.status, state.error) == ("COMPENSATED", "step 'charge' failed: declined")
    events = [(e.step_name, e.event) for e in await admin.history(saga_id)]
    assert ("reserve", "operator_retry") in events


@pytest.mark.parametrize("arrives", ["reply", "timeout"])
async def test_a_saga_at_a_step_its_new_definition_lacks_is_stuck_and_can_be_aborted(
    database: Database, arrives: str
) -> None:
    """Before, every deadline of it failed with an IndexError (retried every 30 s for
    ever) while it showed RUNNING; a reply was retried and dead-lettered."""
    await database.upgrade()
    longer = (
        Saga("shrunk")
        .step("a", _noop, compensate=_noop)
        .step("b", _noop, compensate=_noop)
        .step("c", command("t.c"), compensate=command("t.c-undo"), timeout=1)
    )
    saga_id = await _orchestrator(database, longer).start(longer, {})
    shorter = Saga("shrunk").step("a", _noop, compensate=_noop)
    orchestrator = _orchestrator(database, shorter)
    admin = SagaAdmin(database)
    if arrives == "reply":
        await _reply(orchestrator, shorter, saga_id, True)
    else:
        later = orchestrator.database.clock.now() + timedelta(seconds=5)
        assert await orchestrator.fire_due(later) == 1
    state = await admin.get(saga_id)
    assert state.status == "STUCK"
    assert "its definition has 1 step(s) now" in (state.error or "")

    await admin.abort(saga_id, "settled by hand")
    await orchestrator.fire_due()
    assert (await admin.get(saga_id)).status == "ABORTED"


async def test_an_abort_waiting_for_the_timer_is_not_lost_to_a_changed_definition(
    database: Database,
) -> None:
    """The reply came before the timer fired the abort: going STUCK cleared the abort's
    deadline, and the saga stayed STUCK instead of ABORTED."""
    await database.upgrade()
    longer = Saga("cut").step("a", _noop).step("b", command("t.b"), timeout=60)
    saga_id = await _orchestrator(database, longer).start(longer, {})
    shorter = Saga("cut").step("a", _noop)
    orchestrator = _orchestrator(database, shorter)
    admin = SagaAdmin(database)
    await admin.abort(saga_id, "operator says no")
    await _reply(orchestrator, shorter, saga_id, True)
    await orchestrator.fire_due()
    state = await admin.get(saga_id)
    assert (state.status, state.error) == ("ABORTED", "operator says no")
