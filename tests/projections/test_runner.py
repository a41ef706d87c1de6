"""The projection runner on SQLite and PostgreSQL: catch-up, read-your-writes, lag, poison."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from accord.db import Database
from accord.eventstore import EventStore, NewEvent
from accord.projections import (
    ProjectionRunner,
    ProjectionStopped,
    WaitTimeout,
    list_parked,
    projection_status,
    replay_parked,
)
from accord.testing import wait_for
from tests.projections import app
from tests.projections.helpers import append_scores, expected_totals, read_model, visible


@pytest.fixture
async def store(database: Database) -> AsyncIterator[EventStore]:
    s = EventStore(database)
    yield s
    await s.close()


async def test_catch_up_then_read_your_writes(database: Database, store: EventStore) -> None:
    await append_scores(store, 230)
    scores = app.make_scores()
    runner = ProjectionRunner(database, [scores], store=store, lease_ttl=5)
    await runner.start()
    try:
        head = await store.head()
        await runner.wait_until(head, timeout=20)
        model = await read_model(database, scores)
        assert model["totals"] == expected_totals(230)
        assert len(model["log"]) == len(set(model["log"])) == 230
        # Read-your-writes: the position an append returns is what a reader waits for.
        result = await store.append(
            "rw", [NewEvent("score.changed", {"player": "new", "points": 5})]
        )
        await runner.wait_until(result.position, timeout=10)
        assert (await read_model(database, scores))["totals"]["new"] == (5, 1)
        # Events the projection does not handle need no work to be "reached".
        other = await store.append("x", [NewEvent("unrelated.thing", {})])
        await runner.wait_until(other.position, timeout=10)
    finally:
        await runner.stop()


async def test_wait_until_times_out_when_nobody_runs(database: Database, store: EventStore) -> None:
    position = await append_scores(store, 5)
    runner = ProjectionRunner(database, [app.make_scores()], store=store)
    with pytest.raises(WaitTimeout, match="did not reach position"):
        await runner.wait_until(position, timeout=0.3)


async def test_lag_is_measured(database: Database, store: EventStore) -> None:
    old = datetime.now(UTC) - timedelta(seconds=120)
    await store.append(
        "lag",
        [NewEvent("score.changed", {"player": "a", "points": 1}, time=old) for _ in range(30)],
    )
    other = await store.append("lag-other", [NewEvent("not.handled", {}) for _ in range(4)])
    await visible(store, other.position)
    scores = app.make_scores(batch_size=10)
    runner = ProjectionRunner(database, [scores], store=store)
    [before] = await projection_status(database, [scores], store=store)
    assert (before.state, before.events_behind, before.position) == ("new", 30, 0)
    assert 119 < before.seconds_behind < 140
    assert await runner.run_once() == 10
    [mid] = await runner.status()
    assert mid.events_behind == 20 and mid.state == "running" and mid.position > 0
    assert mid.lease_owner == runner.owner
    while await runner.run_once():
        pass
    [after] = await runner.status()
    assert (after.events_behind, after.seconds_behind, after.handled) == (0, 0.0, 30)
    # Without definitions (names only), every event counts.
    [by_name] = await projection_status(database, ["scores"], store=store)
    assert by_name.events_behind == 4


async def test_poison_event_is_parked_then_replayed(database: Database, store: EventStore) -> None:
    app.POISON["on"] = True
    await append_scores(store, 20)
    bad = await store.append("bad", [NewEvent("score.poison", {"player": "x"})])
    last = await append_scores(store, 20, start=20)
    scores = app.make_scores(batch_size=15)
    runner = ProjectionRunner(database, [scores], store=store)
    await runner.start()
    try:
        await runner.wait_until(last, timeout=20)
    finally:
        await runner.stop()
    model = await read_model(database, scores)
    assert model["totals"] == expected_totals(40)
    assert bad.position not in model["log"]
    [status] = await projection_status(database, [scores], store=store)
    assert status.parked == 1 and status.events_behind == 0 and status.state == "running"
    [parked] = await list_parked(database, "scores")
    assert parked.position == bad.position and parked.attempts == 3
    assert "ValueError: cannot score" in parked.error
    # Still broken: replay keeps it parked with the new error.
    [again] = await replay_parked(database, scores, store=store)
    assert not again.ok and "cannot score" in (again.error or "")
    app.POISON["on"] = False
    try:
        [fixed] = await replay_parked(database, scores, [parked.id], store=store)
    finally:
        app.POISON["on"] = True
    assert fixed.ok
    assert bad.position in (await read_model(database, scores))["log"]
    assert await list_parked(database, "scores") == []
    [status] = await projection_status(database, [scores], store=store)
    assert status.parked == 0


async def test_poison_event_stops_when_configured(database: Database, store: EventStore) -> None:
    app.POISON["on"] = True
    await append_scores(store, 12)
    bad = await store.append("bad", [NewEvent("score.poison", {"player": "x"})])
    last = await append_scores(store, 5, start=12)
    scores = app.make_scores(batch_size=5, on_poison="stop")
    runner = ProjectionRunner(database, [scores], store=store)
    await runner.start()
    try:
        with pytest.raises(ProjectionStopped, match="position"):
            await runner.wait_until(last, timeout=20)
        assert "scores" in runner.errors
    finally:
        await runner.stop()
    [status] = await projection_status(database, [scores], store=store)
    assert status.state == "stopped"
    assert f"position {bad.position}" in (status.error or "")
    assert status.events_behind == 6  # the poison event and the 5 after it: nothing skipped
    model = await read_model(database, scores)
    assert model["totals"] == expected_totals(12)
    assert await list_parked(database, "scores") == []
    # Fixed code + restart: it retries the event it stopped on and carries on.
    app.POISON["on"] = False
    runner = ProjectionRunner(database, [scores], store=store)
    await runner.start()

    async def resumed() -> bool:
        [status] = await runner.status()
        return status.state == "running"

    try:
        await wait_for(resumed, 10)
        await runner.wait_until(last, timeout=20)
    finally:
        await runner.stop()
        app.POISON["on"] = True
    assert (await read_model(database, scores))["totals"] == expected_totals(17)


async def test_cancelling_run_stops_the_loops_and_gives_the_leases_up(
    database: Database, store: EventStore
) -> None:
    """As stop() does: a runner cancelled (a TaskGroup sibling failed, Ctrl-C in a
    script) must not go on applying events in its loops, holding the leases."""
    scores = app.make_scores()
    runner = ProjectionRunner(database, [scores], store=store, lease_ttl=30, poll_interval=0.02)
    first = await append_scores(store, 5)
    task = asyncio.create_task(runner.run())
    await runner.wait_until(first, timeout=20)
    loops = list(runner._tasks)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert loops and all(loop.done() for loop in loops)
    [status] = await projection_status(database, [scores], store=store)
    assert status.lease_owner is None
    late = await store.append("late", [NewEvent("score.changed", {"player": "late", "points": 1})])
    await visible(store, late.position)
    await asyncio.sleep(0.2)  # ten polls of a loop, had one survived
    assert "late" not in (await read_model(database, scores))["totals"]
