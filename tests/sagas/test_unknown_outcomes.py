"""Steps whose outcome is unknown (a pivot that timed out, an abort while its command
was out), an operator's abort racing a transition, saga data after a failed local
attempt, the flow tracker on orchestrated sagas, and the isolation participants need.

Messages are carried by hand from the outbox to the consumers (real database, SQLite
and PostgreSQL), so that the interleaving is exact."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from accord.db import Database
from accord.db.schema import outbox
from accord.errors import ConcurrencyError, ConfigurationError
from accord.inbox import Consumer
from accord.messages import Message
from accord.outbox.writer import message_from_row
from accord.sagas import Orchestrator, SagaAdmin
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
    await pump.run(hold=lambda m: m.type == "payments.charge")
    await SagaAdmin(database).abort(saga_id, "customer cancelled")
    await pump.deliver(pump.held.pop())  # charged; its success reply is in the outbox
    await pump.run()  # the reply reaches the orchestrator before any timer round
    await orchestrator.fire_due(datetime.now(UTC) + LATER)
    await pump.run()
    state = await SagaAdmin(database).get(saga_id)
    done = await ops(database, saga_id)
    assert (3, "do") in done  # the pivot was applied, and the orchestrator was told so
    assert (0, "undo") not in done, f"{state.status}: pivot applied, yet undone before: {done}"


# -- a failing local step leaves no change in nested saga data ----------------------------


async def test_a_failed_local_attempt_leaves_no_trace_in_nested_saga_data(
    database: Database,
) -> None:
    """A local action that changes a list inside the saga data and then raises: its
    database writes roll back and so does the change to the data (the action gets a
    deep copy), so a retry does not see what the failed attempt left."""
    from accord.sagas import Retry, Saga, StepContext

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
                            " AND query LIKE '%accord_sagas%'"
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
