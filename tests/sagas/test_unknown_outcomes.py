"""Steps whose outcome is unknown (a pivot that timed out, an abort while its command
was out), an operator's abort racing a transition, saga data after a failed local
attempt, the flow tracker on orchestrated sagas, and the isolation participants need.

Messages are carried by hand from the outbox to the consumers (real database, SQLite
and PostgreSQL), so that the interleaving is exact."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from accord.db import Database
from accord.db.schema import outbox
from accord.errors import ConcurrencyError, ConfigurationError
from accord.inbox import Consumer
from accord.messages import Message
from accord.outbox.writer import message_from_row
from accord.sagas import Orchestrator, Saga, SagaAdmin, StepContext, command
from accord.testing import CapturedDelivery, wait_for
from accord.transports.sql import SqlTransport
from tests.sagas import app


class Pump:
    """A relay and broker by hand: delivers what the outbox holds, in order, to the
    consumer that handles its type; ``held`` messages stay back until released."""

    def __init__(self, database: Database, consumers: list[Consumer]) -> None:
        self.database = database
        self.consumers = consumers
        self.seen = 0
        self.held: list[Message] = []

    def _consumer(self, message: Message) -> Consumer:
        for consumer in self.consumers:
            if consumer._lookup(message.type) is not None:
                return consumer
        raise AssertionError(f"no consumer for {message.type}")

    async def _fresh(self) -> list[Message]:
        query = (
            sa.select(outbox.c.seq, outbox.c.headers, outbox.c.payload)
            .where(outbox.c.seq > self.seen)
            .order_by(outbox.c.seq)
        )
        async with self.database.connect() as conn:
            rows = (await conn.execute(query)).all()
        if rows:
            self.seen = rows[-1][0]
        return [message_from_row(r[1], r[2]) for r in rows]

    async def run(self, hold: Callable[[Message], bool] = lambda m: False) -> None:
        """Deliver until the outbox has nothing new (holding back what ``hold`` says)."""
        while True:
            fresh = await self._fresh()
            if not fresh:
                return
            for message in fresh:
                if hold(message):
                    self.held.append(message)
                    continue
                await self.deliver(message)

    async def deliver(self, message: Message) -> None:
        delivery = CapturedDelivery(message)
        await self._consumer(message).handle(delivery)
        assert delivery.outcome == "ack", (message.type, delivery.outcome)


def channel() -> str:
    return f"review-{uuid.uuid4().hex[:8]}"


async def trip_system(database: Database) -> tuple[Orchestrator, Pump]:
    await app.create_tables(database)
    transport = SqlTransport(database.url, channel=channel())
    orchestrator = Orchestrator(database, transport, [app.make_trip()], name="orch")
    hotels, cars = app.participant_consumers(database, transport, "rv")
    return orchestrator, Pump(database, [orchestrator.consumer, hotels, cars])


async def ops(database: Database, saga_id: str) -> list[tuple[int, str]]:
    return [(step, op) for sid, step, op in await app.ledger_rows(database) if sid == saga_id]


LATER = timedelta(minutes=5)


async def abort_while_out(
    orchestrator: Orchestrator, pump: Pump, saga_id: str, command_type: str
) -> tuple[Any, list[tuple[int, str]]]:
    """An operator aborts while the saga's ``command_type`` command is out; its reply is
    the next input, before any timer round; then everything runs to its end. The
    saga's state and ledger."""
    database = pump.database
    await pump.run(hold=lambda m: m.type == command_type)
    await SagaAdmin(database).abort(saga_id, "customer cancelled")
    await pump.deliver(pump.held.pop())  # applied or refused: its reply is in the outbox
    await pump.run()
    await orchestrator.fire_due(datetime.now(UTC) + LATER)
    await pump.run()
    return await SagaAdmin(database).get(saga_id), await ops(database, saga_id)


# -- a pivot whose outcome is unknown is asked about (void), never skipped ----------------


async def test_a_timed_out_pivot_is_not_applied_after_its_saga_compensated(
    database: Database,
) -> None:
    """The pivot (payments.charge, no compensation) times out while its command is late
    in the broker. Its participant is sent a void: not applied yet, it refuses the
    charge from then on; the steps before are undone (COMPENSATED), and the late charge
    is refused, not applied. (Skipping the pivot, as before, let the late charge
    through: a card charged for a cancelled trip.)"""
    orchestrator, pump = await trip_system(database)
    saga_id = await orchestrator.start("trip", {})
    await pump.run(hold=lambda m: m.type == "payments.charge")  # the payments queue is slow
    assert [m.type for m in pump.held] == ["payments.charge"]

    assert await orchestrator.fire_due(datetime.now(UTC) + LATER) == 1  # the pivot times out
    await pump.run()
    state = await SagaAdmin(database).get(saga_id)
    assert state.status == "COMPENSATED"

    await pump.deliver(pump.held.pop())  # the charge arrives after all
    await pump.run()
    done = await ops(database, saga_id)
    assert (3, "do") not in done, f"COMPENSATED saga, yet its pivot was applied: {done}"


async def test_a_timed_out_pivot_that_was_applied_after_all_completes_its_saga(
    database: Database,
) -> None:
    """The pivot times out, but its command reaches the participant before the void
    does: the charge is applied, the void's answer says so, and the saga goes on past
    its pivot to COMPLETED; nothing before the pivot is undone."""
    orchestrator, pump = await trip_system(database)
    saga_id = await orchestrator.start("trip", {})
    await pump.run(hold=lambda m: m.type == "payments.charge")
    charge = pump.held.pop()
    assert await orchestrator.fire_due(datetime.now(UTC) + LATER) == 1  # the pivot times out
    await pump.run(hold=lambda m: m.type == "payments.charge")  # the void waits too
    void = pump.held.pop()
    assert void.extensions["sagaphase"] == "void"
    await pump.deliver(charge)  # the charge gets there first
    await pump.deliver(void)
    await pump.run()
    await orchestrator.fire_due(datetime.now(UTC) + LATER)  # the retriable step's timer
    await pump.run()
    state = await SagaAdmin(database).get(saga_id)
    done = await ops(database, saga_id)
    assert state.status == "COMPLETED", (state.status, state.error, done)
    assert (3, "do") in done and (4, "do") in done
    assert not [op for op in done if op[1] == "undo"], done


async def test_an_abort_that_meets_the_pivots_success_does_not_undo_the_steps_before_it(
    database: Database,
) -> None:
    """An operator aborts while the pivot's command is out, and the pivot's success reply
    is the next input: the reply is applied first, so the saga is past its pivot and
    the abort ends it ABORTED without undoing the steps before the pivot."""
    orchestrator, pump = await trip_system(database)
    saga_id = await orchestrator.start("trip", {})
    state, done = await abort_while_out(orchestrator, pump, saga_id, "payments.charge")
    assert (3, "do") in done  # the pivot was applied, and the orchestrator was told so
    assert (0, "undo") not in done, f"{state.status}: pivot applied, yet undone before: {done}"


# -- a failing local step leaves no change in nested saga data ----------------------------


async def test_a_failed_local_attempt_leaves_no_trace_in_nested_saga_data(
    database: Database,
) -> None:
    """A local action that changes a list inside the saga data and then raises: its
    database writes roll back and so does the change to the data (the action gets a
    deep copy), so a retry does not see what the failed attempt left."""
    from accord.sagas import Retry, Saga

    async def collect(ctx: StepContext) -> None:
        ctx.data["seen"].append(ctx.attempt)
        if ctx.attempt < 3:
            raise RuntimeError("flaky")

    saga = Saga("nested").step("collect", collect, retry=Retry(max_attempts=5, base=600))
    orchestrator = Orchestrator(database, SqlTransport(database.url, channel=channel()), [saga])
    await database.upgrade()
    saga_id = await orchestrator.start("nested", {"seen": []})
    state = await SagaAdmin(database).get(saga_id)
    assert (state.status, state.attempt) == ("RUNNING", 1)
    assert state.data == {"seen": []}, f"failed attempt 1 left {state.data}"


# -- an operator's abort that races a transition waits for it ------------------------------


@pytest.mark.postgres
async def test_an_abort_racing_a_reply_is_carried_out_not_dropped(pg_url: str) -> None:
    """``SagaAdmin.abort`` while a transition of the instance (a reply, the timer) is in
    progress: it waits for the row's lock and then records the abort on the state that
    transition left. (Read without a lock, the abort failed its version check with a
    ConcurrencyError that nothing retried.)"""
    import asyncio

    database = Database(pg_url)
    try:
        orchestrator, _ = await trip_system(database)
        saga_id = await orchestrator.start("trip", {})
        async with database.engine.connect() as other:
            await other.begin()
            # A transition in progress: the row is changed and locked, not committed yet.
            await other.execute(
                sa.text("UPDATE accord_sagas SET version = version + 1 WHERE id = :id"),
                {"id": saga_id},
            )
            abort = asyncio.create_task(SagaAdmin(database).abort(saga_id, "customer cancelled"))

            async def blocked() -> bool:
                async with database.connect() as conn:
                    waiting = await conn.scalar(
                        sa.text(
                            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                            " AND datname = current_database() AND query LIKE '%accord_sagas%'"
                        )
                    )
                return bool(waiting)

            await wait_for(blocked, 10, interval=0.02)
            await other.commit()  # the transition commits; the abort's UPDATE finds 0 rows
        try:
            await abort
        except ConcurrencyError as exc:
            pytest.fail(f"the abort was dropped: {exc}")
        assert (await SagaAdmin(database).get(saga_id)).abort_reason == "customer cancelled"
    finally:
        await database.dispose()


# -- the flow tracker does not report orchestrated sagas as stalled ------------------------


async def test_a_completed_orchestrated_saga_is_not_reported_stalled(database: Database) -> None:
    """A FlowTracker (default topics "#") records an orchestrated saga's commands and
    replies for its timeline, but no message of such a saga says that it ended: its
    orchestrator ends it or marks it STUCK. So it is never listed as stalled (before,
    every COMPLETED saga was, for ever)."""
    from accord.sagas import Flows, FlowTracker

    orchestrator, pump = await trip_system(database)
    saga_id = await orchestrator.start("trip", {})
    await pump.run()
    assert (await SagaAdmin(database).get(saga_id)).status == "COMPLETED"

    tracker = FlowTracker(database, SqlTransport(database.url, channel=channel()))
    query = sa.select(outbox.c.headers, outbox.c.payload).order_by(outbox.c.seq)
    async with database.connect() as conn:
        rows = (await conn.execute(query)).all()
    for headers, payload in rows:  # the tracker sees every message of the saga
        await tracker.consumer.handle(CapturedDelivery(message_from_row(headers, payload)))
    assert len(await Flows(database).timeline(saga_id)) == len(rows)

    later = datetime.now(UTC) + timedelta(hours=1)
    stalled = await Flows(database).stalled(timedelta(minutes=5), now=later)
    assert saga_id not in [f.correlation_id for f in stalled], "a COMPLETED saga is 'stalled'"


# -- participants refuse REPEATABLE READ -------------------------------------------------


@pytest.mark.postgres
async def test_participants_refuse_a_repeatable_read_database(pg_url: str) -> None:
    """A participant's transaction takes its snapshot at its first statement (the inbox
    row), before it waits for the step's lock. Under REPEATABLE READ a compensation
    that committed during that wait would stay invisible and the late command would be
    applied: such a Database is refused when the participant (or a choreography step)
    is registered, naming the isolation levels that work."""
    from accord.sagas import Choreography

    database = Database(pg_url, isolation_level="REPEATABLE READ")
    try:
        transport = SqlTransport(database.url, channel=channel())
        with pytest.raises(ConfigurationError, match="READ COMMITTED"):
            app.participant_consumers(database, transport, "rr")
        flow = Choreography("rr-flow", completed="rr.done", compensated="rr.undone")
        consumer = Consumer("rr-flow", database, transport)
        with pytest.raises(ConfigurationError, match="REPEATABLE READ"):
            flow.on(consumer, "rr.started", emits="rr.done", fails="rr.failed")
    finally:
        await database.dispose()


async def system(database: Database, saga: Saga) -> tuple[Orchestrator, Pump]:
    await app.create_tables(database)
    transport = SqlTransport(database.url, channel=channel())
    orchestrator = Orchestrator(database, transport, [saga], name="orch")
    hotels, cars = app.participant_consumers(database, transport, "vr")
    return orchestrator, Pump(database, [orchestrator.consumer, hotels, cars])


# -- an abort that meets a reply: the reply first, then what is left of the abort --------


async def test_an_abort_that_meets_the_pivots_failure_still_compensates_the_steps_before(
    database: Database,
) -> None:
    """An operator aborts while the pivot's command is out; the pivot then fails. The
    failure, applied first, begins the compensation the abort asks for: steps 2, 1
    and 0 are undone and the saga ends COMPENSATED (not ABORTED with them applied)."""
    orchestrator, pump = await trip_system(database)
    saga_id = await orchestrator.start("trip", {"fail_at": 3})
    state, done = await abort_while_out(orchestrator, pump, saga_id, "payments.charge")
    assert (3, "do") not in done
    assert state.status == "COMPENSATED", (state.status, state.error, done)
    assert [op for op in done if op[1] == "undo"] == [(2, "undo"), (1, "undo"), (0, "undo")]


async def test_an_abort_that_meets_a_compensatable_steps_final_failure_compensates(
    database: Database,
) -> None:
    """The same with a compensatable step (rent car, step 2) whose command is out when
    the abort comes, and which then fails: steps 1 and 0 are undone, COMPENSATED."""
    orchestrator, pump = await trip_system(database)
    saga_id = await orchestrator.start("trip", {"fail_at": 2})
    state, done = await abort_while_out(orchestrator, pump, saga_id, "cars.rent")
    assert state.status == "COMPENSATED", (state.status, state.error, done)
    assert [op for op in done if op[1] == "undo"] == [(1, "undo"), (0, "undo")]


def no_pivot() -> Saga:
    """Compensatable steps only: an abort before the end is always compensated."""
    return (
        Saga("nopivot", compensation_timeout=10)
        .step("hold seat", app.hold_seat, compensate=app.release_seat)
        .step(
            "reserve hotel",
            command("hotels.reserve"),
            compensate=command("hotels.cancel"),
            timeout=10,
        )
    )


async def test_an_abort_that_meets_the_last_steps_success_without_a_pivot_is_not_aborted(
    database: Database,
) -> None:
    """A saga with no pivot; the abort comes while its last step's command is out, and
    that step's success reply is the next input: the abort is too late, the saga ends
    COMPLETED (never ABORTED with every step applied and nothing undone)."""
    orchestrator, pump = await system(database, no_pivot())
    saga_id = await orchestrator.start("nopivot", {})
    state, done = await abort_while_out(orchestrator, pump, saga_id, "hotels.reserve")
    undone = [op for op in done if op[1] == "undo"]
    assert (state.status, undone) in (
        ("COMPLETED", []),
        ("COMPENSATED", [(1, "undo"), (0, "undo")]),
    ), (state.status, state.error, done)


# -- a void whose answer is "applied" for a step with a local compensation ----------------


seen_by_compensation: list[dict[str, Any]] = []


async def cancel_locally(ctx: StepContext) -> None:
    seen_by_compensation.append(dict(ctx.data))


def local_compensation() -> Saga:
    """A remote step undone by a local compensation, which needs the step's result
    (the reservation reference ``ref1`` the participant returned) to undo it."""
    return (
        Saga("localcomp", compensation_timeout=10)
        .step("reserve hotel", command("hotels.reserve"), compensate=cancel_locally, timeout=10)
        .pivot("charge card", command("payments.charge"), timeout=10)
    )


async def test_a_voided_step_that_was_applied_is_compensated_with_its_result(
    database: Database,
) -> None:
    """A remote step undone by a local compensation times out; its late command is
    applied, then the void is answered "applied", with the step's result: the local
    compensation runs with that result (the reference it must cancel)."""
    seen_by_compensation.clear()
    orchestrator, pump = await system(database, local_compensation())
    saga_id = await orchestrator.start("localcomp", {})
    await pump.run(hold=lambda m: m.type == "hotels.reserve")
    reserve = pump.held.pop()
    assert await orchestrator.fire_due(datetime.now(UTC) + LATER) == 1  # it times out
    await pump.run(hold=lambda m: m.type == "hotels.reserve")
    void = pump.held.pop()
    assert void.extensions["sagaphase"] == "void"
    await pump.deliver(reserve)  # applied after all
    await pump.deliver(void)  # "applied", with {"ref1": ...}
    await pump.run()
    state = await SagaAdmin(database).get(saga_id)
    assert state.status == "COMPENSATED", (state.status, state.error)
    assert len(seen_by_compensation) == 1
    assert "ref1" in seen_by_compensation[0], (
        f"the local compensation of an applied step got no result: {seen_by_compensation}"
    )


async def test_an_answer_to_a_void_that_does_not_say_applied_or_not_is_a_failure(
    database: Database,
) -> None:
    """A hand-written participant that does not know voids replies ok with no answer:
    nothing can be concluded (it may just have applied the step), so the void counts
    as failed, is sent again, and the saga ends STUCK for an operator, never
    COMPENSATED as if the step had been refused."""
    from accord.testing import CapturedDelivery

    orchestrator, pump = await trip_system(database)
    saga_id = await orchestrator.start("trip", {})
    await pump.run(hold=lambda m: m.type == "payments.charge")
    for _ in range(8):  # each void is answered "ok" with nothing in it
        await orchestrator.fire_due(datetime.now(UTC) + LATER)
        await pump.run(hold=lambda m: m.type == "payments.charge")
        voids = [m for m in pump.held if m.extensions.get("sagaphase") == "void"]
        pump.held = [m for m in pump.held if m not in voids]
        for void in voids:
            ext = void.extensions
            answer = Message(
                type=ext["sagareply"],
                data={
                    "saga_id": saga_id,
                    "step": int(ext["sagastep"]),
                    "phase": "void",
                    "attempt": int(ext["sagaattempt"]),
                    "ok": True,
                    "result": None,
                    "error": None,
                },
            )
            await orchestrator.consumer.handle(CapturedDelivery(answer))
        if (await SagaAdmin(database).get(saga_id)).status == "STUCK":
            break
    state = await SagaAdmin(database).get(saga_id)
    assert (state.status, state.phase) == ("STUCK", "void"), (state.status, state.error)
    assert "sagaphase=void" in (state.error or "")
    assert not [op for op in await ops(database, saga_id) if op[1] == "undo"]


# -- the timer fires only the deadlines of the sagas its orchestrator runs ------------------


async def test_another_services_deadlines_do_not_starve_the_timer(database: Database) -> None:
    """Two orchestrators share one database, each with its own saga. Deadlines of the
    other one's sagas, due first and more than a timer round takes, are not this
    timer's: it fires its own (before, it picked the others' every round, failed on
    each with 'does not know saga', and never reached its own)."""
    await app.create_tables(database)
    transport = SqlTransport(database.url, channel=channel())
    other = Saga("other").step("ask", command("others.ask"), timeout=1)
    theirs = Orchestrator(database, transport, [other], name="theirs")
    ours = Orchestrator(database, transport, [app.make_trip(timeout=1)], name="ours", timer_batch=2)
    for _ in range(3):
        await theirs.start("other", {})
    mine = await ours.start("trip", {})
    assert await ours.fire_due(datetime.now(UTC) + LATER) == 1
    events = [(e.step, e.event) for e in await SagaAdmin(database).history(mine)]
    assert (1, "timed_out") in events


async def test_unnamed_deadlines_go_to_the_orchestrator_of_their_saga(database: Database) -> None:
    """A deadline without a saga name, as an orchestrator of an Accord older than the
    column still writes during a rolling upgrade: another service's timer leaves it
    alone (before, it took it, failed with 'does not know saga' and put the owner's
    timeout off by 30 s every round); the owner's timer fires it."""
    from accord.db.schema_sagas import deadlines

    await app.create_tables(database)
    transport = SqlTransport(database.url, channel=channel())
    other = Saga("other").step("ask", command("others.ask"), timeout=1)
    theirs = Orchestrator(database, transport, [other], name="theirs")
    ours = Orchestrator(database, transport, [app.make_trip(timeout=1)], name="ours")
    their_saga = await theirs.start("other", {})
    async with database.transaction() as conn:
        await conn.execute(deadlines.update().values(saga_name=None))
        due = await conn.scalar(sa.select(deadlines.c.due_at))
    assert await ours.fire_due(datetime.now(UTC) + LATER) == 0
    async with database.connect() as conn:
        assert await conn.scalar(sa.select(deadlines.c.due_at)) == due  # not put off
    assert await theirs.fire_due(datetime.now(UTC) + LATER) == 1
    events = [(e.step, e.event) for e in await SagaAdmin(database).history(their_saga)]
    assert (0, "timed_out") in events


async def test_a_malformed_reply_is_dead_lettered_at_once_with_what_is_wrong(
    database: Database,
) -> None:
    """A reply without a step (a hand-written participant's mistake) is dead-lettered
    on its first delivery, naming the missing field; it is not retried as a handler
    failure (KeyError) for the orchestrator's 50 attempts."""
    from accord.inbox import DeadLetters
    from accord.testing import CapturedDelivery

    orchestrator, _ = await trip_system(database)
    saga_id = await orchestrator.start("trip", {})
    bad = Message(
        type="accord.saga.trip.reply",
        data={"saga_id": saga_id, "phase": "action", "attempt": 1, "ok": True},
    )
    delivery = CapturedDelivery(bad)
    await orchestrator.consumer.handle(delivery)
    assert delivery.outcome == "ack"
    (letter,) = await DeadLetters(database).list("orch")
    assert (letter.message_id, letter.kind) == (bad.id, "invalid_data")
    assert "step" in letter.reason


async def test_a_remote_step_given_no_timeout_still_times_out(database: Database) -> None:
    """A remote step defined without a timeout waits ten minutes for its reply, not for
    ever: a reply lost for good must not leave the saga RUNNING without end."""
    await database.upgrade()
    saga = Saga("plain").step("ask", command("plain.ask"), compensate=command("plain.undo"))
    orchestrator = Orchestrator(database, SqlTransport(database.url, channel=channel()), [saga])
    saga_id = await orchestrator.start("plain", {})
    assert await orchestrator.fire_due(datetime.now(UTC) + timedelta(minutes=9)) == 0
    assert await orchestrator.fire_due(datetime.now(UTC) + timedelta(minutes=11)) == 1
    state = await SagaAdmin(database).get(saga_id)
    assert (state.status, state.phase, state.step) == ("COMPENSATING", "compensation", 0)
