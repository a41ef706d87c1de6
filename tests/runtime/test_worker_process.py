"""``accord worker`` as a real process: SIGTERM exits 0, SIGKILL mid-handler is
redelivered and applied once, a bad --app fails with a clear error."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from accord.db import Database
from accord.inbox import Consumer, HandlerContext, Inbox
from accord.messages import Message
from accord.testing import wait_for
from tests.inbox.conftest import Broker, create_business_tables, effect_counts, effects
from tests.runtime.conftest import ROOT, Workers


@pytest.fixture(params=["sql", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
async def broker(request: pytest.FixtureRequest, db_url: str) -> AsyncIterator[Broker]:
    made = Broker(request.param, db_url)
    yield made
    await made.close()


async def _exited(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is not None


def _worker_args(db_url: str, broker: Broker, service: str) -> list[str]:
    return [
        "--app",
        "tests.runtime.apps:effect_consumer",
        "--db",
        db_url,
        "--broker",
        broker.url,
        "--service",
        service,
    ]


@pytest.mark.slow
async def test_worker_handles_messages_and_exits_0_on_sigterm(
    database: Database, broker: Broker, workers: Workers
) -> None:
    await create_business_tables(database)
    service = f"svc-{uuid.uuid4().hex[:8]}"
    broker.groups.add(service)  # the worker process declares its queue
    proc = workers.start(
        *_worker_args(database.url, broker, service), env={"ACCORD_CHANNEL": broker.channel}
    )
    # The consumer's group exists once the worker subscribed; publish after that.
    await wait_for(lambda: "consumer " + service + " started" in workers.log(proc), 20)
    messages = [Message(type="test.work", data={"n": i}, correlationid="corr-42") for i in range(3)]
    await broker.publish(*messages)
    await wait_for(lambda: _all_applied(database, messages), 20)

    proc.send_signal(signal.SIGTERM)
    await wait_for(lambda: _exited(proc), 20)
    assert proc.returncode == 0, workers.log(proc)
    lines = [json.loads(line) for line in workers.log(proc).splitlines() if line.startswith("{")]
    working = [line for line in lines if line["message"].startswith("working on")]
    assert len(working) == 3
    assert {line["correlation_id"] for line in working} == {"corr-42"}
    assert {line["message_id"] for line in working} == {m.id for m in messages}
    assert all(line["service"] == service and line["consumer"] == service for line in working)
    assert any(line["message"] == "worker stopped" for line in lines)


async def _all_applied(database: Database, messages: list[Message]) -> bool:
    return await effect_counts(database) == {m.id: 1 for m in messages}


@pytest.mark.fault
@pytest.mark.slow
async def test_sigkill_mid_handler_is_redelivered_and_applied_exactly_once(
    database: Database, broker: Broker, workers: Workers, tmp_path: Path
) -> None:
    await create_business_tables(database)
    service = f"svc-{uuid.uuid4().hex[:8]}"
    broker.groups.add(service)  # the worker process declares its queue
    marker = tmp_path / "hanging"
    proc = workers.start(
        *_worker_args(database.url, broker, service),
        env={"ACCORD_CHANNEL": broker.channel, "TEST_HANG_MARKER": str(marker)},
    )
    await wait_for(lambda: "consumer " + service + " started" in workers.log(proc), 20)
    message = Message(type="test.work", data={"n": 1})
    await broker.publish(message)
    # The handler wrote its effect and hangs before the commit: kill it there.
    await wait_for(marker.exists, 20)
    proc.send_signal(signal.SIGKILL)
    await wait_for(lambda: _exited(proc), 10)
    assert await effect_counts(database) == {}

    survivor = Consumer(service, database, broker.transport(), backoff_base=0.05)
    attempts: list[int] = []

    @survivor.handler("test.work")
    async def on_work(ctx: HandlerContext, data: dict[str, int]) -> None:
        attempts.append(ctx.attempt)
        await ctx.conn.execute(effects.insert().values(message_id=ctx.message.id, value=data["n"]))

    await survivor.start()
    try:
        await wait_for(lambda: Inbox(database).processed(service, message.id), 20)
    finally:
        await survivor.stop()
    assert await effect_counts(database) == {message.id: 1}
    assert attempts and attempts[0] >= 2  # it came back as a redelivery


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_while_the_worker_starts_stops_it_with_exit_0(
    sqlite_url: str, workers: Workers, tmp_path: Path, sig: signal.Signals
) -> None:
    """SIGTERM or SIGINT while the app is being built (after the database upgrade,
    before any component runs) stops the worker as it stops a running one."""
    marker = tmp_path / "starting"
    proc = workers.start(
        "--app",
        "tests.runtime.apps:slow_start",
        "--db",
        sqlite_url,
        "--broker",
        sqlite_url,
        env={"TEST_STARTING_MARKER": str(marker)},
    )
    await wait_for(marker.exists, 30)
    proc.send_signal(sig)
    await wait_for(lambda: _exited(proc), 10)
    assert proc.returncode == 0, workers.log(proc)
    assert f"stopped by {sig.name} while starting" in workers.log(proc)


def test_a_bad_app_fails_with_a_clear_error(sqlite_url: str) -> None:
    base = [
        sys.executable,
        "-c",
        "from accord.cli import main; main()",
        "worker",
        "--db",
        sqlite_url,
    ]
    cases = {
        "no.such.module:build": "cannot import app module 'no.such.module'",
        "tests.runtime.apps:missing": "has no attribute 'missing'",
        "tests.runtime.apps": "must look like module:attribute",
        "tests.runtime.apps:not_a_component": "is not a component",
    }
    for spec, expected in cases.items():
        done = subprocess.run([*base, "--app", spec], cwd=ROOT, capture_output=True, timeout=60)
        assert done.returncode == 1, (spec, done.stderr)
        assert expected in " ".join(done.stderr.decode().split()), (spec, done.stderr)
