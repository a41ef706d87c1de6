"""Replies and commands handed straight to the orchestrator's and participants' consumers
(real database, no broker): duplicates, reordering, late replies, racing replies, and a
compensation that overtakes its command."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from accord.db import Database
from accord.db.schema import outbox
from accord.errors import ConcurrencyError
from accord.messages import Message
from accord.sagas import Orchestrator
from accord.sagas._store import Transition, load
from accord.testing import CapturedDelivery
from accord.transports.sql import SqlTransport
from tests.sagas import app

Captured = CapturedDelivery  # the name these tests grew up with


def reply(saga_id: str, step: int, attempt: int = 1, ok: bool = True, **extra: Any) -> Message:
    return Message(
        type="accord.saga.trip.reply",
        data={
            "saga_id": saga_id,
            "step": step,
            "phase": extra.pop("phase", "action"),
            "attempt": attempt,
            "ok": ok,
            "result": extra.pop("result", None),
            "error": None if ok else "refused",
        },
        **extra,
    )


@pytest.fixture
async def orchestrator(database: Database) -> Orchestrator:
    await app.create_tables(database)
    transport = SqlTransport(database.url, channel=f"r-{uuid.uuid4().hex[:8]}")
    return Orchestrator(database, transport, [app.make_trip()], name="orch")


async def events(database: Database, saga_id: str) -> list[tuple[int, str, str]]:
    from accord.sagas import SagaAdmin

    return [(e.step, e.phase, e.event) for e in await SagaAdmin(database).history(saga_id)]


async def position(database: Database, saga_id: str) -> tuple[int, str, int, bool]:
    async with database.connect() as conn:
        state = await load(conn, saga_id)
    assert state is not None
    return state.step, state.phase, state.attempt, state.waiting


async def test_duplicate_late_and_reordered_replies_change_nothing(
    database: Database, orchestrator: Orchestrator
) -> None:
    saga_id = await orchestrator.start("trip", {})
    assert await position(database, saga_id) == (1, "action", 1, True)

    first = reply(saga_id, 1)
    delivery = Captured(first)
    await orchestrator.consumer.handle(delivery)
    assert delivery.outcome == "ack"
    assert await position(database, saga_id) == (2, "action", 1, True)

    again = Captured(first)  # the broker redelivers the same message
    await orchestrator.consumer.handle(again)
    assert again.outcome == "ack"
    copy = Captured(reply(saga_id, 1))  # the same reply under another id
    await orchestrator.consumer.handle(copy)
    ahead = Captured(reply(saga_id, 2, attempt=2))  # a reply to an attempt never sent
    await orchestrator.consumer.handle(ahead)
    wrong_phase = Captured(reply(saga_id, 2, phase="compensation"))
    await orchestrator.consumer.handle(wrong_phase)
    assert await position(database, saga_id) == (2, "action", 1, True)

    await orchestrator.consumer.handle(Captured(reply(saga_id, 2)))
    assert await position(database, saga_id) == (3, "action", 1, True)
    log = await events(database, saga_id)
    assert log.count((1, "action", "succeeded")) == 1
    assert log.count((1, "action", "ignored")) == 1
    assert log.count((2, "action", "ignored")) == 1
    assert log.count((2, "compensation", "ignored")) == 1
    assert log.count((2, "action", "succeeded")) == 1


async def test_concurrent_replies_to_one_instance_cannot_both_win(
    database: Database, orchestrator: Orchestrator
) -> None:
    saga_id = await orchestrator.start("trip", {})
    deliveries = [Captured(reply(saga_id, 1, result={"ref1": f"r{i}"})) for i in range(4)]
    await asyncio.gather(*(orchestrator.consumer.handle(d) for d in deliveries))
    for d in deliveries:  # the losers of a version race come back, as the broker would do
        if d.outcome == "nack":
            retry = Captured(d.message, attempt=2)  # type: ignore[arg-type]
            await orchestrator.consumer.handle(retry)
    log = await events(database, saga_id)
    assert log.count((1, "action", "succeeded")) == 1
    assert log.count((1, "action", "ignored")) == 3
    assert await position(database, saga_id) == (2, "action", 1, True)


@pytest.mark.postgres
async def test_a_transition_from_a_stale_read_is_refused(pg_url: str) -> None:
    database = Database(pg_url)
    orchestrator = Orchestrator(
        database, SqlTransport(pg_url, channel="stale"), [app.make_trip()], name="orch"
    )
    await app.create_tables(database)
    saga_id = await orchestrator.start("trip", {})
    async with database.engine.connect() as a, database.engine.connect() as b:
        await a.begin()
        await b.begin()
        state_a = await load(a, saga_id)
        state_b = await load(b, saga_id)
        assert state_a is not None and state_b is not None
        state_a.step = 2
        await Transition(state_a, state_a.version).save(a)
        await a.commit()
        state_b.step = 3
        with pytest.raises(ConcurrencyError, match="changed while this transition"):
            await Transition(state_b, state_b.version).save(b)
        await b.rollback()
    assert (await position(database, saga_id))[0] == 2
    await database.dispose()


def command(saga_id: str, type: str, step: int, phase: str, attempt: int = 1) -> Message:
    return Message(
        type=type,
        data={},
        key=saga_id,
        correlationid=saga_id,
        extensions={
            "sagaid": saga_id,
            "sagastep": str(step),
            "sagaphase": phase,
            "sagaattempt": str(attempt),
            "sagareply": "accord.saga.trip.reply",
        },
    )


async def replies(database: Database, saga_id: str) -> list[dict[str, Any]]:
    query = sa.select(outbox.c.payload, outbox.c.id).where(
        outbox.c.event_type == "accord.saga.trip.reply"
    )
    async with database.connect() as conn:
        rows = (await conn.execute(query.order_by(outbox.c.seq))).all()
    return [dict(r[0], id=str(r[1])) for r in rows if r[0]["saga_id"] == saga_id]


@pytest.fixture
async def hotels(database: Database) -> Any:
    await app.create_tables(database)
    transport = SqlTransport(database.url, channel=f"p-{uuid.uuid4().hex[:8]}")
    consumers = app.participant_consumers(database, transport, "p")
    return consumers[0]


async def test_participant_applies_a_step_once_and_replays_its_reply(
    database: Database, hotels: Any
) -> None:
    saga_id = str(uuid.uuid4())
    original = command(saga_id, "hotels.reserve", 1, "action")
    await hotels.handle(Captured(original))
    await hotels.handle(Captured(original))  # redelivered: the inbox drops it
    resent = command(saga_id, "hotels.reserve", 1, "action", attempt=1)
    await hotels.handle(Captured(resent))  # re-sent under another id: the reply is replayed
    assert [r[1:] for r in await app.ledger_rows(database)] == [(1, "do")]
    sent = await replies(database, saga_id)
    assert [r["ok"] for r in sent] == [True, True]
    assert sent[0]["result"] == sent[1]["result"] == {"ref1": f"hotels.reserve-{saga_id[:8]}"}


async def test_compensation_that_overtakes_its_command_makes_the_command_refused(
    database: Database, hotels: Any
) -> None:
    saga_id = str(uuid.uuid4())
    await hotels.handle(Captured(command(saga_id, "hotels.cancel", 1, "compensation")))
    await hotels.handle(Captured(command(saga_id, "hotels.reserve", 1, "action")))
    assert [r for r in await app.ledger_rows(database) if r[0] == saga_id] == []
    sent = await replies(database, saga_id)
    assert [(r["phase"], r["ok"]) for r in sent] == [("compensation", True), ("action", False)]
    assert "compensated before" in sent[1]["error"]


async def test_a_message_that_is_not_a_saga_command_is_dead_lettered(
    database: Database, hotels: Any
) -> None:
    from accord.inbox import DeadLetters

    stray = Message(type="hotels.reserve", data={})
    first = Captured(stray)
    await hotels.handle(first)
    assert first.outcome == "nack"
    last = Captured(stray, attempt=hotels.max_attempts)
    await hotels.handle(last)
    assert last.outcome == "ack"
    letters = await DeadLetters(database).list()
    assert any("is not a saga command" in letter.reason for letter in letters)


async def test_an_abort_is_not_lost_when_a_reply_beats_the_timer(
    database: Database, orchestrator: Orchestrator
) -> None:
    from accord.sagas import SagaAdmin

    saga_id = await orchestrator.start("trip", {})
    await SagaAdmin(database).abort(saga_id, "customer cancelled")
    await orchestrator.consumer.handle(Captured(reply(saga_id, 1)))  # before any timer round
    # Step 1 was applied (its reply says so) and is compensated first.
    assert await position(database, saga_id) == (1, "compensation", 1, True)
    log = await events(database, saga_id)
    assert (1, "action", "aborted") in log and (1, "action", "succeeded") not in log
    assert await orchestrator.fire_due() == 0  # the abort deadline is gone with it
