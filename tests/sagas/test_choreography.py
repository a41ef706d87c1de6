"""Choreographed sagas on a real database and broker, and the flow tracker."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from accord.sagas import Flows, FlowTracker
from accord.testing import wait_for
from tests.sagas import app, choreo_app
from tests.sagas.conftest import World


async def start_choreography(world: World) -> FlowTracker:
    await world.start(orchestrator=False, participants=False)  # the relay
    tracker = FlowTracker(
        world.database,
        world.transport,
        name=f"{world.prefix}-tracker",
        stalled_after=timedelta(seconds=1),
        check_interval=0.2,
    )
    await world.run_parts(
        [*choreo_app.services(world.database, world.transport, world.prefix), tracker]
    )
    return tracker


async def begin(world: World, **data: Any) -> str:
    async with world.database.transaction() as conn:
        return await choreo_app.trip.start(conn, "trip.requested", data, source="test")


async def ended(world: World, correlation_id: str) -> str | None:
    for entry in await Flows(world.database).timeline(correlation_id):
        if entry.outcome in ("completed", "compensated"):
            return entry.type
    return None


async def ledger(world: World, correlation_id: str) -> list[tuple[int, str]]:
    return [(s, op) for c, s, op in await app.ledger_rows(world.database) if c == correlation_id]


async def test_choreography_happy_path_and_failure_at_each_step(world: World) -> None:
    await start_choreography(world)
    flows = {fail_at: await begin(world, fail_at=fail_at) for fail_at in (None, 1, 2, 3)}
    for fail_at, correlation_id in flows.items():
        end = await wait_for(lambda c=correlation_id: ended(world, c), 20)
        assert end == ("trip.booked" if fail_at is None else "trip.cancelled")
        assert await ledger(world, correlation_id) == choreo_app.expected(fail_at), fail_at

    timeline = await Flows(world.database).timeline(flows[3])
    assert [(e.type, e.outcome) for e in timeline] == [
        ("trip.requested", "next"),
        ("hotel.reserved", "next"),
        ("car.rented", "next"),
        ("payment.failed", "failed"),
        ("car.returned", "compensating"),
        ("trip.cancelled", "compensated"),
    ]
    assert timeline[3].source == f"{world.prefix}-cars" and timeline[3].step == "charge_card"
    assert "step 3 refused" in (timeline[3].error or "")


async def test_choreography_compensation_retried_until_done_and_a_stuck_one_is_stalled(
    world: World,
) -> None:
    tracker = await start_choreography(world)
    flaky = await begin(world, fail_at=3, comp_fail={"2": 2, "1": 1})
    assert await wait_for(lambda: ended(world, flaky), 20) == "trip.cancelled"
    assert await ledger(world, flaky) == choreo_app.expected(3)
    await app.set_outage(world.database, 1, True)  # hotel cancellations are down
    stuck = await begin(world, fail_at=2)

    async def reported() -> list[str]:
        return [f.correlation_id for f in await tracker.check()]

    assert await wait_for(reported, 20) == [stuck]
    (stalled,) = await Flows(world.database).stalled(timedelta(seconds=1))
    assert stalled.last_type == "car.failed"
    assert await Flows(world.database).stalled(timedelta(hours=1)) == []
