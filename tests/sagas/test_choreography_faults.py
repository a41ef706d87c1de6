"""SIGKILL in choreography style: the hotels and cars services run as processes of their
own, each with its own PostgreSQL database and relay; one of them is killed mid-flow and
restarted. Every flow still ends (completed or compensated), no local step is applied
twice, and each service's state agrees with its flow's outcome."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from accord.db import Database
from accord.db.schema_sagas import flows
from accord.sagas import Flows, FlowTracker
from accord.testing import wait_for
from tests.brokers import delete_everything
from tests.conftest import RABBIT_URL, fresh_pg_database
from tests.processes import Processes
from tests.sagas import choreo_app
from tests.sagas.choreo_worker import transport_for

pytestmark = [pytest.mark.fault, pytest.mark.postgres]

FLOWS = 30


@pytest.fixture
async def cars_url(pg_template: str) -> AsyncIterator[str]:
    async with fresh_pg_database(pg_template) as url:
        yield url


class Services(Processes):
    """The two services' processes: ``python -m tests.sagas.choreo_worker``."""

    def __init__(self, hotels_url: str, cars_url: str, broker: str) -> None:
        super().__init__()
        self.urls = {choreo_app.HOTELS: hotels_url, choreo_app.CARS: cars_url}
        self.broker = broker
        self.prefix = f"t{uuid.uuid4().hex[:8]}"
        self.channel = f"choreo-{self.prefix}"

    async def start(self, service: str, *extra: str) -> subprocess.Popen[str]:
        return await self.spawn(
            "tests.sagas.choreo_worker",
            service,
            self.urls[service],
            self.broker,
            self.channel,
            self.prefix,
            *extra,
        )


@pytest.fixture
def broker(request: pytest.FixtureRequest, pg_url: str) -> str:
    """RabbitMQ, or the SQL transport with its queue in the hotels database."""
    return RABBIT_URL if request.param == "rabbitmq" else pg_url


@pytest.fixture
async def services(pg_url: str, cars_url: str, broker: str) -> AsyncIterator[Services]:
    made = Services(pg_url, cars_url, broker)
    try:
        async with made:  # kills what is still running before the queues are deleted
            yield made
    finally:
        if broker == RABBIT_URL:
            groups = {f"{made.prefix}-{g}" for g in (choreo_app.HOTELS, choreo_app.CARS, "tracker")}
            await delete_everything({made.channel: groups})


@pytest.fixture
async def hotels_db(pg_url: str) -> AsyncIterator[Database]:
    database = Database(pg_url, pool_size=3, max_overflow=3)
    yield database
    await database.dispose()


@pytest.fixture
async def cars_db(cars_url: str) -> AsyncIterator[Database]:
    database = Database(cars_url, pool_size=3, max_overflow=3)
    yield database
    await database.dispose()


@contextlib.asynccontextmanager
async def tracking(database: Database, services: Services) -> AsyncIterator[Flows]:
    """A flow tracker (in this process) recording into ``database``."""
    transport = transport_for(services.broker, services.channel)
    tracker = FlowTracker(database, transport, name=f"{services.prefix}-tracker")
    task = asyncio.create_task(tracker.run())
    try:
        await wait_for(lambda: tracker.consumer._subscription is not None, 10)
        yield Flows(database)
    finally:
        await tracker.stop()
        await asyncio.wait_for(task, 10)
        await transport.close()


SCENARIOS: list[dict[str, Any]] = [
    {},
    {"fail_at": 1},
    {"fail_at": 2},
    {"fail_at": 3},
    {"fail_at": 3, "comp_fail": {"2": 1, "1": 1}},
    {"fail_at": 2, "comp_fail": {"1": 2}},
]


async def ends(database: Database) -> dict[str, list[str]]:
    """The end events the tracker recorded, by flow."""
    found: dict[str, list[str]] = {}
    async with database.connect() as conn:
        rows = await conn.execute(
            flows.select()
            .with_only_columns(flows.c.correlation_id, flows.c.type)
            .where(flows.c.outcome.in_(("completed", "compensated")))
        )
        for flow_id, type in rows:
            found.setdefault(flow_id, []).append(type)
    return found


def case(broker: str, doomed: str, point: str, after: int) -> Any:
    marks = [pytest.mark.rabbitmq] if broker == "rabbitmq" else []
    return pytest.param(broker, doomed, point, after, marks=marks, id=f"{broker}-{doomed}-{point}")


# Killed at the N-th passage through the point: well inside the run of FLOWS flows.
CASES = [
    case("rabbitmq", choreo_app.CARS, "after_commit", 12),
    case("rabbitmq", choreo_app.HOTELS, "after_commit", 10),
    case("rabbitmq", choreo_app.HOTELS, "relay_after_publish", 4),
    # The SQL transport gives a dead consumer's deliveries back when their lease ends.
    case("sql", choreo_app.CARS, "after_commit", 12),
    case("sql", choreo_app.HOTELS, "relay_after_publish", 4),
]


@pytest.mark.parametrize(("broker", "doomed", "point", "after"), CASES, indirect=["broker"])
async def test_a_service_killed_mid_flow_and_restarted_leaves_every_flow_consistent(
    services: Services,
    hotels_db: Database,
    cars_db: Database,
    doomed: str,
    point: str,
    after: int,
) -> None:
    for database in (hotels_db, cars_db):
        await choreo_app.create_state(database)
    healthy = choreo_app.CARS if doomed == choreo_app.HOTELS else choreo_app.HOTELS
    async with tracking(hotels_db, services):
        survivor = await services.start(healthy)
        victim = await services.start(doomed, "--kill-at", point, "--kill-after", str(after))
        started = {
            await choreo_app.start(hotels_db, SCENARIOS[i % len(SCENARIOS)]): SCENARIOS[
                i % len(SCENARIOS)
            ]
            for i in range(FLOWS)
        }
        assert await services.exited(victim, 20) == -signal.SIGKILL
        assert len(await ends(hotels_db)) < FLOWS, "every flow ended before the kill"

        restarted = await services.start(doomed)

        async def all_ended() -> bool:
            return len(await ends(hotels_db)) == FLOWS

        await wait_for(all_ended, 30, interval=0.1)

        # Each flow ended once, as its data says it must.
        assert await ends(hotels_db) == {
            flow_id: ["trip.cancelled" if data else "trip.booked"]
            for flow_id, data in started.items()
        }
        # Each service applied each of its steps once (undone once) and holds what the
        # outcome leaves: nothing lost to the kill, nothing applied again after it.
        for service, database in ((choreo_app.HOTELS, hotels_db), (choreo_app.CARS, cars_db)):
            want = {
                flow_id: choreo_app.expected_at(service, data.get("fail_at"))
                for flow_id, data in started.items()
            }
            effects = await choreo_app.effects_of(database)
            assert effects == {f: e for f, (e, _) in want.items() if e}, service
            holdings = await choreo_app.holdings_of(database)
            assert holdings == {f: h for f, (_, h) in want.items() if h}, service

    for proc in (survivor, restarted):
        proc.send_signal(signal.SIGTERM)
        assert await services.exited(proc, 30) == 0
