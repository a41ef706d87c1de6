"""Replies and commands handed straight to the orchestrator's and participants' consumers
(real database, no broker): duplicates, reordering, late replies, racing replies, and a
compensation that overtakes its command; one at a time, and many in one batch."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from accord.db import Database
from accord.db.schema import outbox
from accord.errors import ConcurrencyError
from accord.messages import Message
from accord.sagas import Orchestrator, SagaAdmin
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


def command(
    saga_id: str, type: str, step: int, phase: str, attempt: int = 1, **data: Any
) -> Message:
    return Message(
        type=type,
        data=data,
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
    # The reply is applied first (step 1 succeeded), then the abort: step 1 is the
    # first to be compensated.
    assert await position(database, saga_id) == (1, "compensation", 1, True)
    log = await events(database, saga_id)
    assert log.index((1, "action", "succeeded")) < log.index((2, "action", "aborted"))
    assert await orchestrator.fire_due() == 0  # the abort deadline is gone with it


# -- many in one batch (Orchestrator / Consumer with batch_size > 1) ----------------------


@pytest.fixture
async def batched(database: Database) -> Orchestrator:
    await app.create_tables(database)
    transport = SqlTransport(database.url, channel=f"r-{uuid.uuid4().hex[:8]}")
    return Orchestrator(database, transport, [app.make_trip()], name="orch", batch_size=16)


async def commands_sent(database: Database, saga_id: str) -> list[str]:
    query = sa.select(outbox.c.event_type).where(
        outbox.c.key == saga_id, outbox.c.event_type != "accord.saga.trip.reply"
    )
    async with database.connect() as conn:
        return list((await conn.scalars(query.order_by(outbox.c.seq))).all())


async def outcomes(database: Database, saga_id: str) -> list[tuple[str, bool]]:
    """(phase, ok) of each reply the participant sent for ``saga_id``."""
    return [(r["phase"], r["ok"]) for r in await replies(database, saga_id)]


def unrefused(deliveries: list[Captured]) -> bool:
    """Whether every delivery was acked (or left for the transport to ack)."""
    return all(d.outcome in (None, "ack") for d in deliveries)


async def test_one_batch_of_duplicate_reordered_and_stale_replies_changes_nothing_twice(
    database: Database, batched: Orchestrator
) -> None:
    a = await batched.start("trip", {})
    b = await batched.start("trip", {})
    first = reply(a, 1)
    batch = [
        Captured(reply(b, 2)),  # ahead of B, which waits for step 1
        Captured(first),
        Captured(first),  # the same message twice in one batch
        Captured(reply(a, 1)),  # the same reply under another id
        Captured(reply(a, 2)),  # A's next step, in the same batch as its previous one
        Captured(reply(a, 3, attempt=2)),  # an attempt never sent
        Captured(reply(b, 1)),  # B's reply, after the one that overtook it
    ]
    await batched.consumer.handle_batch(batch)
    assert unrefused(batch)
    # One transaction for the six distinct messages.
    assert await app.transaction_sizes(database, "orch") == [6]
    assert await position(database, a) == (3, "action", 1, True)
    assert await position(database, b) == (2, "action", 1, True)
    log_a, log_b = await events(database, a), await events(database, b)
    assert log_a.count((1, "action", "succeeded")) == 1
    assert log_a.count((1, "action", "ignored")) == 1
    assert log_a.count((2, "action", "succeeded")) == 1
    assert log_a.count((3, "action", "ignored")) == 1
    assert log_b.count((2, "action", "ignored")) == 1
    assert log_b.count((1, "action", "succeeded")) == 1
    assert await commands_sent(database, a) == ["hotels.reserve", "cars.rent", "payments.charge"]
    assert await commands_sent(database, b) == ["hotels.reserve", "cars.rent"]

    again = [Captured(d.message, attempt=2) for d in batch]  # the broker redelivers it all
    await batched.consumer.handle_batch(again)
    assert unrefused(again)
    assert await position(database, a) == (3, "action", 1, True)
    assert await position(database, b) == (2, "action", 1, True)
    assert (await events(database, a), await events(database, b)) == (log_a, log_b)


async def test_a_late_reply_after_a_timeout_is_ignored_in_a_batch(
    database: Database, batched: Orchestrator
) -> None:
    late = await batched.start("trip", {})
    other = await batched.start("trip", {})
    assert await batched.fire_due(datetime.now(UTC) + timedelta(minutes=1)) == 2
    # Both timed out at step 1; the hotel is asked to cancel, in case it did reserve.
    assert await position(database, late) == (1, "compensation", 1, True)
    batch = [
        Captured(reply(late, 1, result={"ref1": "too late"})),
        Captured(reply(other, 1, result={"ref1": "too late"})),
        Captured(reply(late, 1, phase="compensation")),
    ]
    await batched.consumer.handle_batch(batch)
    assert unrefused(batch)
    state = await SagaAdmin(database).get(late)
    assert state.status == "COMPENSATED" and "ref1" not in state.data
    log = await events(database, late)
    assert (1, "action", "timed_out") in log and (1, "action", "ignored") in log
    assert (1, "action", "succeeded") not in log
    assert [r[1:] for r in await app.ledger_rows(database) if r[0] == late] == [
        (0, "do"),
        (0, "undo"),
    ]
    assert await position(database, other) == (1, "compensation", 1, True)
    assert (1, "action", "ignored") in await events(database, other)


@pytest.fixture
async def batched_hotels(database: Database) -> Any:
    await app.create_tables(database)
    transport = SqlTransport(database.url, channel=f"p-{uuid.uuid4().hex[:8]}")
    return app.participant_consumers(database, transport, "pb", batch_size=16)[0]


async def test_a_participant_batch_applies_each_step_once_and_refuses_an_overtaken_command(
    database: Database, batched_hotels: Any
) -> None:
    s1, s2, s3 = (str(uuid.uuid4()) for _ in range(3))
    original = command(s1, "hotels.reserve", 1, "action")
    batch = [
        Captured(original),
        Captured(original),  # the same message twice in one batch
        Captured(command(s1, "hotels.reserve", 1, "action")),  # re-sent under another id
        Captured(command(s2, "hotels.cancel", 1, "compensation")),
        Captured(command(s2, "hotels.reserve", 1, "action")),  # overtaken by its compensation
        Captured(command(s3, "hotels.reserve", 1, "action")),
    ]
    await batched_hotels.handle_batch(batch)
    assert unrefused(batch)
    assert await app.transaction_sizes(database, "pb-hotels") == [5]
    assert await app.ledger_rows(database) == [(s1, 1, "do"), (s3, 1, "do")]
    sent = await replies(database, s1)
    assert [r["ok"] for r in sent] == [True, True]
    assert sent[0]["result"] == sent[1]["result"] == {"ref1": f"hotels.reserve-{s1[:8]}"}
    sent = await replies(database, s2)
    assert [(r["phase"], r["ok"]) for r in sent] == [("compensation", True), ("action", False)]
    assert "compensated before" in sent[1]["error"]
    assert [r["ok"] for r in await replies(database, s3)] == [True]


async def test_a_refusal_inside_a_participant_batch_fails_only_its_own_step(
    database: Database, batched_hotels: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="accord.inbox")
    s1, s2, s3, s4, s5 = (str(uuid.uuid4()) for _ in range(5))
    cancel = command(s4, "hotels.cancel", 1, "compensation", comp_fail={"1": 1})
    batch = [
        Captured(command(s1, "hotels.reserve", 1, "action")),
        Captured(command(s2, "hotels.reserve", 1, "action", fail_at=1)),  # StepFailed
        Captured(command(s3, "hotels.reserve", 1, "action")),
        Captured(command(s4, "hotels.reserve", 1, "action")),
        Captured(cancel),  # its first attempt raises
    ]
    await batched_hotels.handle_batch(batch)
    # The batch rolled back and its commands were handled one at a time, each acked.
    assert any(
        r.getMessage().startswith("batch of 5 failed (StepFailed: hotels.reserve refused)")
        for r in caplog.records
    )
    assert [d.outcome for d in batch] == ["ack"] * 5
    assert await app.transaction_sizes(database, "pb-hotels") == [1] * 5
    assert await app.ledger_rows(database) == [(s1, 1, "do"), (s3, 1, "do"), (s4, 1, "do")]
    assert await outcomes(database, s1) == await outcomes(database, s3) == [("action", True)]
    [refused] = await replies(database, s2)
    assert not refused["ok"] and refused["error"] == "StepFailed: hotels.reserve refused"
    assert await outcomes(database, s4) == [("action", True), ("compensation", False)]

    # The orchestrator retries the compensation. The next batch, refusal and all, commits
    # whole: after a failed batch the participant gives each function a savepoint.
    caplog.clear()
    s6 = str(uuid.uuid4())
    retry = [
        Captured(command(s4, "hotels.cancel", 1, "compensation", attempt=2, comp_fail={"1": 1})),
        Captured(command(s5, "hotels.reserve", 1, "action")),
        Captured(command(s6, "hotels.reserve", 1, "action", fail_at=1)),
    ]
    await batched_hotels.handle_batch(retry)
    assert unrefused(retry)
    assert not any(r.getMessage().startswith("batch of") for r in caplog.records)
    assert await app.transaction_sizes(database, "pb-hotels") == [3] + [1] * 5
    rows = await app.ledger_rows(database)
    assert rows[3:] == [(s4, 1, "undo"), (s5, 1, "do")]
    assert (await outcomes(database, s4))[2:] == [("compensation", True)]
    assert await outcomes(database, s5) == [("action", True)]
    assert await outcomes(database, s6) == [("action", False)]
