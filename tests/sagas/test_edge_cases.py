"""Edge cases driven straight through the consumers (real database, no broker): a
participant registered for a topic pattern, a late reply while a step waits out its
retry backoff, a refusal inside a participant's batch, and a choreographed step event
that arrives after its flow was compensated."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, cast

import pytest
import sqlalchemy as sa

from accord.db import Database
from accord.db.schema import outbox
from accord.inbox import Consumer, HandlerContext
from accord.messages import Message
from accord.sagas import (
    Choreography,
    CommandContext,
    Orchestrator,
    Retry,
    Saga,
    StepFailed,
    command,
)
from accord.sagas import participant as participant_of
from accord.sagas._definition import Command
from accord.sagas._engine import command_message
from accord.sagas._store import SagaState, load
from accord.testing import CapturedDelivery
from accord.transports.sql import SqlTransport


def commands(saga: Saga, step: int, count: int) -> list[CapturedDelivery]:
    """``count`` commands for step ``step`` of new instances of ``saga``, as an
    orchestrator sends them."""
    made = []
    for _ in range(count):
        now = datetime.now(UTC)
        state = SagaState(
            str(uuid.uuid4()), saga.name, "RUNNING", "action", step, 1, True, {}, None, 1, now, now
        )
        action = cast(Command, saga.steps[step].action)
        made.append(CapturedDelivery(command_message(saga, state, action)))
    return made


async def replies(database: Database) -> list[dict[str, Any]]:
    async with database.connect() as conn:
        rows = (await conn.execute(sa.select(outbox.c.payload))).all()
    return [row[0] for row in rows]


def transport(database: Database) -> SqlTransport:
    return SqlTransport(database.url, channel=f"edge-{uuid.uuid4().hex[:8]}")


BOOKING = (
    Saga("booking")
    .step("reserve", command("booking.reserve"), compensate=command("booking.release"))
    .pivot("confirm", command("booking.confirm"))
)


@pytest.mark.parametrize("batch_size", [1, 8])
async def test_a_participant_registered_for_a_pattern_handles_every_matching_command(
    database: Database, batch_size: int
) -> None:
    await database.upgrade()
    consumer = Consumer("hotel", database, transport(database), batch_size=batch_size)
    calls: list[str] = []

    @participant_of(consumer, "booking.*")
    async def any_booking(ctx: CommandContext, data: Any) -> dict[str, str]:
        calls.append(ctx.message.type)
        return {"seen": ctx.message.type}

    reserve = commands(BOOKING, 0, 3)
    confirm = commands(BOOKING, 1, 2)
    await consumer.handle_batch([*reserve, *confirm])

    assert sorted(calls) == ["booking.confirm"] * 2 + ["booking.reserve"] * 3
    sent = await replies(database)
    assert len(sent) == 5 and all(r["ok"] for r in sent)
    assert {r["result"]["seen"] for r in sent} == {"booking.reserve", "booking.confirm"}
    assert all(d.outcome in (None, "ack") for d in [*reserve, *confirm])


async def test_a_refusal_in_a_batch_fails_only_its_saga_and_later_batches_use_savepoints(
    database: Database,
) -> None:
    await database.upgrade()
    async with database.transaction() as conn:
        await conn.execute(sa.text("CREATE TABLE edge_effects (saga_id varchar(64))"))
    consumer = Consumer("hotel", database, transport(database), batch_size=16)
    calls: list[int] = []

    @participant_of(consumer, "booking.reserve")
    async def reserve(ctx: CommandContext, data: Any) -> None:
        calls.append(ctx.step)
        await ctx.conn.execute(sa.text("INSERT INTO edge_effects VALUES (:s)"), {"s": ctx.saga_id})
        if ctx.saga_id == refused:
            raise StepFailed("no rooms left")

    batch = commands(BOOKING, 0, 6)
    refused = batch[3].message.extensions["sagaid"]  # type: ignore[union-attr]
    await consumer.handle_batch(batch)

    # The batch rolled back and was handled one at a time: 4 calls, then 6.
    assert len(calls) == 4 + 6
    by_saga = {r["saga_id"]: r for r in await replies(database)}
    assert len(by_saga) == 6
    assert by_saga[refused]["ok"] is False and "no rooms left" in by_saga[refused]["error"]
    assert all(r["ok"] for saga_id, r in by_saga.items() if saga_id != refused)
    async with database.connect() as conn:
        effects = await conn.scalar(sa.text("SELECT count(*) FROM edge_effects"))
    assert effects == 5  # the refused one's write was rolled back

    # The next batch, with another refusal, is not replayed: savepoints isolate it.
    calls.clear()
    again = commands(BOOKING, 0, 6)
    refused = again[0].message.extensions["sagaid"]  # type: ignore[union-attr]
    await consumer.handle_batch(again)
    assert len(calls) == 6
    by_saga = {r["saga_id"]: r for r in await replies(database)}
    assert by_saga[refused]["ok"] is False
    assert sum(1 for r in by_saga.values() if r["ok"]) == 10


async def test_a_late_reply_while_a_step_waits_out_its_retry_backoff_changes_nothing(
    database: Database,
) -> None:
    await database.upgrade()
    saga = Saga("flaky").step(
        "call", command("flaky.call"), retry=Retry(max_attempts=3, base=600, cap=600)
    )
    orchestrator = Orchestrator(database, transport(database), [saga], name="orch")
    saga_id = await orchestrator.start("flaky", {})

    def reply(attempt: int, ok: bool) -> Message:
        return Message(
            type=saga.reply_type,
            data={
                "saga_id": saga_id,
                "step": 0,
                "phase": "action",
                "attempt": attempt,
                "ok": ok,
                "result": None,
                "error": None if ok else "busy",
            },
        )

    await orchestrator.consumer.handle(CapturedDelivery(reply(1, False)))  # -> backoff
    async with database.connect() as conn:
        state = await load(conn, saga_id)
    assert state is not None and (state.attempt, state.waiting) == (1, False)
    sent_before = len(await replies(database))

    await orchestrator.consumer.handle(CapturedDelivery(reply(1, True)))  # late, ignored

    async with database.connect() as conn:
        state = await load(conn, saga_id)
    assert state is not None
    assert (state.status, state.attempt, state.waiting) == ("RUNNING", 1, False)
    assert len(await replies(database)) == sent_before  # no second attempt sent early


async def test_a_step_event_that_reaches_a_service_after_it_compensated_the_flow_is_not_applied(
    database: Database,
) -> None:
    await database.upgrade()
    trip = Choreography("trip", completed="trip.booked", compensated="trip.cancelled")
    hotels = Consumer("hotels", database, transport(database))
    applied: list[str] = []

    @trip.on(hotels, "trip.requested", emits="hotel.reserved", fails="trip.cancelled")
    async def reserve_hotel(ctx: HandlerContext, data: Any) -> None:
        applied.append("reserve")

    @trip.compensate(hotels, "car.failed", emits="trip.cancelled")
    async def cancel_hotel(ctx: HandlerContext, data: Any) -> None:
        applied.append("cancel")

    def event(type: str, flow: str) -> CapturedDelivery:
        return CapturedDelivery(Message(type=type, data={}, key=flow, correlationid=flow))

    # The compensation overtakes the step event (parallel branch, delayed redelivery).
    await hotels.handle(event("car.failed", "flow-1"))
    await hotels.handle(event("trip.requested", "flow-1"))
    # Another flow is not affected.
    await hotels.handle(event("trip.requested", "flow-2"))

    assert applied == ["cancel", "reserve"]
    emitted = [m["type"] for m in await emitted_types(database)]
    assert emitted == ["trip.cancelled", "hotel.reserved"]


async def emitted_types(database: Database) -> list[dict[str, Any]]:
    async with database.connect() as conn:
        rows = (await conn.execute(sa.select(outbox.c.event_type).order_by(outbox.c.seq))).all()
    return [{"type": row[0]} for row in rows]


async def test_starting_a_choreographed_flow_twice_with_one_correlation_id_starts_it_once(
    database: Database,
) -> None:
    await database.upgrade()
    trip = Choreography("trip", completed="trip.booked", compensated="trip.cancelled")
    for _ in range(2):  # the client retries its request
        async with database.transaction() as conn:
            flow = await trip.start(conn, "trip.requested", {}, correlation_id="trip-42")
    assert flow == "trip-42"
    assert [m["type"] for m in await emitted_types(database)] == ["trip.requested"]


@pytest.mark.postgres
async def test_a_start_in_one_statement_writes_what_the_statement_by_statement_start_writes(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On PostgreSQL a start whose first step is remote is one statement sent to asyncpg;
    # the other path (SQLite, or no driver at hand) is SQLAlchemy statement by statement.
    database = Database(pg_url)
    await database.upgrade()
    saga = Saga("pair").step(
        "reserve", command("pair.reserve"), compensate=command("pair.cancel"), timeout=60
    )
    orchestrator = Orchestrator(database, transport(database), [saga], name="orch")
    data = {"who": "ada", "seats": [1, 2], "note": "é"}
    fast = await orchestrator.start("pair", data)
    assert await orchestrator.start("pair", data, saga_id=fast) == fast  # idempotent
    monkeypatch.setattr("accord.sagas._store.driver_in_transaction", _no_driver)
    slow = await orchestrator.start("pair", data)

    async def written(saga_id: str) -> list[Any]:
        async with database.transaction() as conn:
            row = (
                await conn.execute(
                    sa.text(
                        "SELECT name, status, phase, step, attempt, waiting, data, version "
                        "FROM accord_sagas WHERE id = :id"
                    ),
                    {"id": saga_id},
                )
            ).all()
            logs = (
                await conn.execute(
                    sa.text(
                        "SELECT step, step_name, phase, event, attempt, detail "
                        "FROM accord_saga_steps WHERE saga_id = :id ORDER BY id"
                    ),
                    {"id": saga_id},
                )
            ).all()
            due = (
                await conn.execute(
                    sa.text(
                        "SELECT kind, phase, step, attempt, due_at > now() + interval '50 seconds' "
                        "FROM accord_deadlines WHERE saga_id = :id"
                    ),
                    {"id": saga_id},
                )
            ).all()
            sent = (
                await conn.execute(
                    sa.select(
                        outbox.c.event_type, outbox.c.key, outbox.c.payload, outbox.c.status
                    ).where(outbox.c.key == saga_id)
                )
            ).all()
        return [row, logs, due, sent]

    fast_rows, slow_rows = await written(fast), await written(slow)
    assert fast_rows[0] and fast_rows[1] and fast_rows[2] and fast_rows[3]
    assert [len(rows) for rows in fast_rows] == [1, len(slow_rows[1]), 1, 1]
    assert fast_rows[:3] == slow_rows[:3]
    # The command of each is keyed by its saga id (the query) and otherwise alike.
    assert [(t, p, st) for t, _, p, st in fast_rows[3]] == [
        (t, p, st) for t, _, p, st in slow_rows[3]
    ]
    await database.dispose()


async def _no_driver(_conn: Any) -> None:
    return None


@pytest.mark.parametrize(("batch_size", "batch"), [(1, False), (8, False), (8, True)])
async def test_a_participant_result_that_is_not_json_fails_the_step_at_once(
    database: Database, batch_size: int, batch: bool
) -> None:
    """Its reply could not be sent: before, the command was retried and dead-lettered
    and the saga waited out the step's timeout (ten minutes by default). Values JSON
    has no type for travel as text, as in any message."""
    await database.upgrade()
    consumer = Consumer("hotel", database, transport(database), batch_size=batch_size)
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

    def result(saga_id: str) -> Any:
        return {"rate": float("nan")} if saga_id == broken else {"at": when}

    if batch:

        @participant_of(consumer, "booking.reserve", batch=True)
        async def reserve_all(calls: Any) -> list[Any]:
            return [result(ctx.saga_id) for ctx, _ in calls]

    else:

        @participant_of(consumer, "booking.reserve")
        async def reserve(ctx: CommandContext, data: Any) -> Any:
            return result(ctx.saga_id)

    sent = commands(BOOKING, 0, 3)
    broken = sent[1].message.extensions["sagaid"]  # type: ignore[union-attr]
    await consumer.handle_batch(sent)

    assert all(d.outcome in (None, "ack") for d in sent)
    by_saga = {r["saga_id"]: r for r in await replies(database)}
    assert len(by_saga) == 3
    assert by_saga[broken]["ok"] is False
    assert "returned a result that is not JSON: Out of range float" in by_saga[broken]["error"]
    others = [r for saga_id, r in by_saga.items() if saga_id != broken]
    assert [r["ok"] for r in others] == [True, True]
    assert all(r["result"] == {"at": str(when)} for r in others)
