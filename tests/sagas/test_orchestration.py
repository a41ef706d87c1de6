"""Orchestrated sagas end to end on a real database and broker: the happy path, a
failure at each step, compensations that fail, timeouts, STUCK and the operator; many
sagas at once, one message per transaction and in batch mode."""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter, defaultdict
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY

from accord.db import Database
from accord.errors import NotFoundError
from accord.runtime import Worker
from accord.sagas import Orchestrator, SagaAdmin
from accord.testing import wait_for
from accord.transports.sql import SqlTransport
from tests.brokers import SlowToSubscribe
from tests.sagas import app
from tests.sagas.conftest import World


async def saga_ledger(world: World, saga_id: str) -> list[tuple[int, str]]:
    return [(step, op) for sid, step, op in await app.ledger_rows(world.database) if sid == saga_id]


async def test_happy_path_completes_every_step_once(world: World) -> None:
    await world.start()
    saga_id = await world.begin(traveller="ada")
    assert await world.wait_status(saga_id) == "COMPLETED"
    assert await saga_ledger(world, saga_id) == app.expected_ops("COMPLETED", 5)
    state = await world.admin.get(saga_id)
    assert state.data["seat"] == "12A" and state.data["ref1"].startswith("hotels.reserve")
    assert state.ended_at is not None


async def test_sagas_started_before_the_first_worker_ran_complete(world: World) -> None:
    """The first deploy: sagas start (their first commands wait in the outbox) before
    any participant ever subscribed, then one worker runs the relay, the orchestrator
    and the participants. The worker declares their groups before its relay publishes,
    so no command goes to no one (the saga would time out and compensate)."""
    await app.create_tables(world.database)
    started: dict[str, dict[str, Any]] = {}
    for i in range(10):
        started[await world.begin(traveller=f"t{i}")] = {}
    slow = SlowToSubscribe(world.transport)  # the relay surely publishes before they subscribe
    parts = app.components(world.database, slow, prefix=world.prefix, trip=world.trip)
    worker = Worker(parts)
    running = asyncio.create_task(worker.run(handle_signals=False))
    try:
        await wait_for(lambda: world.ended(len(started)), 30)
        await world.check_outcomes(started)
    finally:
        await worker.stop()
        assert await asyncio.wait_for(running, 20) == 0


async def test_failure_at_each_step_compensates_exactly_the_completed_steps_in_reverse(
    world: World,
) -> None:
    await world.start()
    ids = {k: await world.begin(fail_at=k) for k in range(4)}
    for k, saga_id in ids.items():
        assert await world.wait_status(saga_id) == "COMPENSATED", k
        assert await saga_ledger(world, saga_id) == app.expected_ops("COMPENSATED", k), k
        state = await world.admin.get(saga_id)
        assert f"step {app.STEPS[k]!r} failed" in (state.error or "")
        events = await world.events(saga_id)
        assert (k, "action", "failed") in events
        # The failed step itself is never compensated.
        assert (k, "compensation", "compensated") not in events


async def test_retriable_step_after_the_pivot_is_retried_until_it_succeeds(world: World) -> None:
    await world.start()
    saga_id = await world.begin(flaky_ticket=2)
    assert await world.wait_status(saga_id) == "COMPLETED"
    events = await world.events(saga_id)
    assert events.count((4, "action", "failed")) == 2
    assert events.count((4, "action", "retrying")) == 2
    assert await saga_ledger(world, saga_id) == app.expected_ops("COMPLETED", 5)


async def test_transiently_failing_compensations_are_retried_until_done(world: World) -> None:
    await world.start()
    saga_id = await world.begin(fail_at=3, comp_fail={"2": 1, "1": 2, "0": 3})
    assert await world.wait_status(saga_id) == "COMPENSATED"
    events = await world.events(saga_id)
    for step, failures in ((2, 1), (1, 2), (0, 3)):
        assert events.count((step, "compensation", "failed")) == failures
        assert events.count((step, "compensation", "compensated")) == 1
    assert await saga_ledger(world, saga_id) == app.expected_ops("COMPENSATED", 3)


def saga_metric(name: str, **labels: str) -> float:
    """The counter ``accord_sagas_<name>_total`` of the test saga."""
    sample = REGISTRY.get_sample_value(f"accord_sagas_{name}_total", {"saga": "trip", **labels})
    return sample or 0.0


def stuck_count() -> float:
    return saga_metric("stuck")


async def test_permanently_failing_compensation_is_stuck_then_operator_retry_completes_it(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    await world.start()
    await app.set_outage(world.database, 1, True)
    before = stuck_count()
    saga_id = await world.begin(fail_at=2)
    assert await world.wait_status(saga_id) == "STUCK"
    state = await world.admin.get(saga_id)
    assert state.phase == "compensation" and state.step == 1
    assert "compensation of step 'reserve hotel' failed 4 times" in (state.error or "")
    assert "hotels.cancel failed (injected)" in (state.error or "")
    # Counted and logged once the STUCK transition has committed.
    await wait_for(lambda: stuck_count() == before + 1, 5)
    await wait_for(lambda: any("is STUCK" in r.getMessage() for r in caplog.records), 5)
    assert [s.id for s in await world.admin.list(status="STUCK")] == [saga_id]
    # Step 0 was not compensated while step 1 is stuck: reverse order holds.
    assert await saga_ledger(world, saga_id) == [(0, "do"), (1, "do")]

    await app.set_outage(world.database, 1, False)
    await world.admin.retry(saga_id)
    assert await world.wait_status(saga_id, "COMPENSATED") == "COMPENSATED"
    assert await saga_ledger(world, saga_id) == app.expected_ops("COMPENSATED", 2)
    assert (1, "compensation", "operator_retry") in await world.events(saga_id)


async def test_timed_out_step_is_compensated_and_its_late_reply_ignored(world: World) -> None:
    # The participants are down: the hotel reservation goes unanswered and times out.
    await world.start(trip=app.make_trip(timeout=0.3))
    await world.stop_participants()
    saga_id = await world.begin()
    assert await world.wait_status(saga_id, "COMPENSATING") == "COMPENSATING"
    await world.start_participants()  # the command and the compensation arrive now
    assert await world.wait_status(saga_id) == "COMPENSATED"

    async def late_reply_ignored() -> bool:
        return (1, "action", "ignored") in await world.events(saga_id)

    await wait_for(late_reply_ignored, 10)
    events = await world.events(saga_id)
    assert (1, "action", "timed_out") in events
    assert (1, "action", "succeeded") not in events
    ops = await saga_ledger(world, saga_id)
    # Whichever reached the hotel first, nothing is left applied.
    assert ops in (
        [(0, "do"), (1, "do"), (1, "undo"), (0, "undo")],
        [(0, "do"), (0, "undo")],
    )


async def test_operator_abort_compensates_a_running_saga(world: World) -> None:
    await world.start()
    await world.stop_participants()
    saga_id = await world.begin()
    await world.wait_status(saga_id, "RUNNING")
    await world.admin.abort(saga_id, "customer cancelled")
    await world.start_participants()
    try:
        status = await world.wait_status(saga_id)
    except TimeoutError:
        status = "timeout"
    assert status == "COMPENSATED", "\n".join(
        f"{e.at.time()} {e.step} {e.phase} {e.event} {e.attempt} {e.detail}"
        for e in await world.admin.history(saga_id)
    )
    state = await world.admin.get(saga_id)
    assert state.error == "customer cancelled"
    assert await saga_ledger(world, saga_id) in (
        [(0, "do"), (1, "do"), (1, "undo"), (0, "undo")],
        [(0, "do"), (0, "undo")],
    )


async def test_starting_the_same_saga_id_twice_makes_one_instance(world: World) -> None:
    await world.start()
    orchestrator = world.orchestrator()
    first = await orchestrator.start(world.trip, {}, saga_id="trip-42")
    second = await orchestrator.start(world.trip, {"other": 1}, saga_id="trip-42")
    assert first == second == "trip-42"
    assert await world.wait_status("trip-42") == "COMPLETED"
    assert await saga_ledger(world, "trip-42") == app.expected_ops("COMPLETED", 5)
    assert len(await world.admin.list()) == 1


async def test_a_start_in_the_callers_transaction_is_counted_only_when_that_commits(
    world: World,
) -> None:
    orchestrator = world.orchestrator()
    before = saga_metric("started")
    with pytest.raises(RuntimeError, match="changed its mind"):
        async with world.database.transaction() as conn:
            await orchestrator.start(world.trip, {}, saga_id="rolled-back", conn=conn)
            raise RuntimeError("the caller changed its mind")
    assert saga_metric("started") == before
    assert await world.admin.list() == []

    async with world.database.transaction() as conn:
        await orchestrator.start(world.trip, {}, saga_id="committed", conn=conn)
        assert saga_metric("started") == before  # not before the caller commits
    assert saga_metric("started") == before + 1
    # The rolled-back start left nothing behind to count later.
    async with world.database.transaction() as conn:
        await conn.execute(sa.text("SELECT 1"))
    assert saga_metric("started") == before + 1
    assert [s.id for s in await world.admin.list()] == ["committed"]


async def test_unknown_saga_gives_a_clear_error(world: World) -> None:
    with pytest.raises(NotFoundError, match="no saga 'nope'"):
        await SagaAdmin(world.database).get("nope")


async def test_orchestrator_stop_before_run_is_not_forgotten(sqlite_url: str) -> None:
    database = Database(sqlite_url)
    orchestrator = Orchestrator(database, SqlTransport(database=database), [app.make_trip()])
    await orchestrator.stop()
    await asyncio.wait_for(orchestrator.run(), 5)
    await database.dispose()


# -- many sagas at once, one message per transaction and in batches ---------------------


def mixed(i: int) -> dict[str, Any]:
    """Saga ``i``'s data: a third refused at some step (0 to 3 in turn), a sixth refused at
    step 3 with compensations failing once, a sixth with a flaky ticket, the rest plain."""
    if i % 3 == 0:
        return {"fail_at": (i // 3) % 4}
    if i % 6 == 1:
        return {"fail_at": 3, "comp_fail": {"2": 1, "1": 1}}
    if i % 6 == 5:
        return {"flaky_ticket": 1}
    return {}


def fallbacks(caplog: pytest.LogCaptureFixture, error: str) -> list[int]:
    """The sizes of the batches that failed with ``error`` and were then handled one
    message at a time (the consumer reports each)."""
    found = (re.match(r"batch of (\d+) failed \((.*)\)", r.getMessage()) for r in caplog.records)
    return [int(m[1]) for m in found if m and m[2] == error]


@pytest.mark.parametrize("batch_size", [1, 16])
async def test_fifty_sagas_at_once_each_end_as_their_data_says(
    world: World, batch_size: int, caplog: pytest.LogCaptureFixture
) -> None:
    """The participants start on a backlog of commands, so in batch mode their batches
    hold refusals (StepFailed) and failing compensations: the first such batch rolls back
    and is handled one message at a time (later ones give each command a savepoint);
    only the sagas that were refused compensate, the others of their batches complete."""
    caplog.set_level(logging.INFO, logger="accord.inbox")
    ended_before = {s: saga_metric("ended", status=s) for s in ("COMPLETED", "COMPENSATED")}
    started_before = saga_metric("started")
    await world.start()
    await world.stop_participants()
    # Those that fail first, then plain ones: batches of the backlog's tail commit whole.
    datas = [mixed(i) for i in range(24)] + [{} for _ in range(26)]
    ids = await asyncio.gather(*(world.begin(**data) for data in datas[:24]))
    ids += await asyncio.gather(*(world.begin(**data) for data in datas[24:]))
    started = dict(zip(ids, datas, strict=True))
    await wait_for(world.published, 20)
    await world.start_participants()
    await wait_for(lambda: world.ended(len(started)), 60, interval=0.1)
    await world.check_outcomes(started)
    # Every start and every end is counted once, batches replayed or not.
    statuses = Counter([(await world.admin.get(saga_id)).status for saga_id in ids])
    await wait_for(
        lambda: {s: saga_metric("ended", status=s) - ended_before[s] for s in statuses} == statuses,
        5,
    )
    assert saga_metric("started") - started_before == len(ids)

    sizes = {s: await world.transaction_sizes(s) for s in ("orch", "hotels", "cars")}
    refused = fallbacks(caplog, "StepFailed: hotels.reserve refused")
    if batch_size == 1:
        assert all(size == 1 for found in sizes.values() for size in found), sizes
        assert refused == []
    else:
        assert max(sizes["orch"]) > 1 and max(sizes["hotels"]) > 1, sizes
        assert refused and min(refused) > 1


@pytest.mark.parametrize("batch_size", [1, 16])
async def test_timed_out_steps_of_many_sagas_are_compensated_and_late_replies_ignored(
    world: World, batch_size: int
) -> None:
    # The participants are down: every hotel reservation times out, then the late
    # command and its compensation reach the hotel together (in one batch, often).
    await world.start(trip=app.make_trip(timeout=0.3))
    await world.stop_participants()
    ids = await asyncio.gather(*(world.begin() for _ in range(20)))
    for saga_id in ids:
        await world.wait_status(saga_id, "COMPENSATING")
    await wait_for(world.published, 20)
    await world.start_participants()
    for saga_id in ids:
        assert await world.wait_status(saga_id) == "COMPENSATED"

    async def late_replies_ignored() -> bool:
        for saga_id in ids:
            if (1, "action", "ignored") not in await world.events(saga_id):
                return False
        return True

    await wait_for(late_replies_ignored, 20)
    ops: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for saga_id, step, op in await app.ledger_rows(world.database):
        ops[saga_id].append((step, op))
    for saga_id in ids:
        events = await world.events(saga_id)
        assert (1, "action", "timed_out") in events
        assert (1, "action", "succeeded") not in events
        assert ops[saga_id] in (
            [(0, "do"), (1, "do"), (1, "undo"), (0, "undo")],
            [(0, "do"), (0, "undo")],
        )
    hotels = await world.transaction_sizes("hotels")
    assert max(hotels) > 1 if batch_size > 1 else set(hotels) == {1}
