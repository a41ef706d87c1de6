"""Fault test: the PostgreSQL server restarts while orchestrated sagas are in flight.

The trip saga's relay, orchestrator and participants run in one worker process
(``tests/sagas/worker.py``) on PostgreSQL and RabbitMQ; the server is restarted (every
session cut off, open transactions rolled back) while sagas move. The worker is not
restarted: every saga still ends as its data says, each step applied once and each
compensation once, in reverse, and the worker has nothing left to log."""

from __future__ import annotations

import asyncio
import random
import signal
from pathlib import Path
from typing import Any

import pytest

from accord.db import Database
from accord.testing import wait_for
from tests.brokers import restart_postgres
from tests.processes import Processes
from tests.sagas import app
from tests.sagas.conftest import World, broker_url
from tests.sagas.test_faults import scenario

pytestmark = [
    pytest.mark.fault,
    pytest.mark.slow,
    pytest.mark.serial,
    pytest.mark.postgres,
    pytest.mark.rabbitmq,
]


@pytest.mark.timeout(120)
async def test_database_restart_mid_flow_ends_every_saga_as_its_data_says(
    pg_url: str, tmp_path: Path
) -> None:
    database = Database(pg_url)
    world = World(database, "rabbitmq")
    await app.create_tables(database)
    # Generous step timeouts, as in the randomized kill test: a timeout that fires is
    # correct but makes a saga's outcome depend on timing, not on its data.
    world.trip = app.make_trip(timeout=300, comp_timeout=300)
    orchestrator = world.orchestrator()
    rng = random.Random("database outage")
    log = tmp_path / "worker.log"
    started: dict[str, dict[str, Any]] = {}
    try:
        async with Processes() as processes:
            with log.open("w") as stderr:
                worker = await processes.spawn(
                    "tests.sagas.worker",
                    pg_url,
                    broker_url(world.kind, pg_url),
                    world.channel,
                    world.prefix,
                    "--timeout",
                    "300",
                    stderr=stderr,
                )

            async def start(count: int) -> None:
                for _ in range(count):
                    data = scenario(rng)
                    started[await orchestrator.start(world.trip, data)] = data

            async def ended_more_than(count: int) -> bool:
                counts = await world.admin.counts()
                return (
                    sum(n for s, n in counts.items() if s not in ("RUNNING", "COMPENSATING"))
                    > count
                )

            await start(150)
            await wait_for(lambda: ended_more_than(20), 30, interval=0.05)
            assert not await world.ended(len(started)), "the restart came too late"
            await restart_postgres()
            await start(50)  # and sagas started after it run as well

            await wait_for(lambda: world.ended(len(started)), 60, interval=0.2)
            await world.check_outcomes(started)
            size = log.stat().st_size
            await asyncio.sleep(1.5)  # nothing left to do: nothing more to log
            assert log.stat().st_size == size, log.read_text()[-3000:]
            assert worker.poll() is None, f"the worker died: {log.read_text()[-3000:]}"
            worker.send_signal(signal.SIGTERM)
            assert await processes.exited(worker, 30) == 0, log.read_text()[-3000:]
    finally:
        await world.close()
        await database.dispose()
