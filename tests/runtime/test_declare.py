"""Consumer groups declared before anything publishes: the worker declares its
components' groups before it starts them, and ``accord worker --declare-only`` does it
at deploy time. Without that, what a relay publishes before a group's first subscribe
never reaches the group."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from accord.db import Database
from accord.errors import ConfigurationError, TransportUnavailable
from accord.inbox import Consumer, HandlerContext
from accord.messages import Message
from accord.outbox import Relay
from accord.outbox import add as add_to_outbox
from accord.runtime import Worker
from accord.testing import wait_for
from accord.transports import GroupDeclaration
from tests.brokers import SlowToSubscribe
from tests.inbox.conftest import Broker, create_business_tables, effect_counts, effects
from tests.runtime.conftest import ROOT, Workers


class Recorder:
    """A component that notes, in a shared list, when it declares and when it runs;
    its declare() fails with the errors in ``failures`` first, one per call."""

    def __init__(self, name: str, events: list[str], failures: list[Exception] | None = None):
        self.name = name
        self.events = events
        self.failures = list(failures or [])
        self.stopped = asyncio.Event()

    async def declare(self) -> list[GroupDeclaration]:
        self.events.append(f"declare {self.name}")
        if self.failures:
            raise self.failures.pop(0)
        return [GroupDeclaration("test", self.name, ("#",))]

    async def run(self) -> None:
        self.events.append(f"run {self.name}")
        await self.stopped.wait()

    async def stop(self) -> None:
        self.stopped.set()


class Plain:
    """A component without declare(), like a relay."""

    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.stopped = asyncio.Event()

    async def run(self) -> None:
        self.events.append("run plain")
        await self.stopped.wait()

    async def stop(self) -> None:
        self.stopped.set()


async def _run_until(worker: Worker, ready: Any) -> None:
    running = asyncio.create_task(worker.run(handle_signals=False))
    await wait_for(ready, 10)
    await worker.stop()
    assert await asyncio.wait_for(running, 10) == 0


async def test_every_group_is_declared_before_any_component_runs() -> None:
    events: list[str] = []
    worker = Worker([Plain(events), Recorder("a", events), Recorder("b", events)])
    await _run_until(worker, lambda: len(events) == 5)
    assert events[:2] == ["declare a", "declare b"]
    assert sorted(events[2:]) == ["run a", "run b", "run plain"]


async def test_a_broker_out_of_reach_holds_every_component_until_it_declares(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events: list[str] = []
    down = [TransportUnavailable("connection refused"), TransportUnavailable("still refused")]
    worker = Worker([Plain(events), Recorder("a", events, down)], restart_base=0.05)
    await _run_until(worker, lambda: "run a" in events and "run plain" in events)
    assert events[:3] == ["declare a"] * 3
    assert "cannot declare its consumer group(s) yet: still refused" in caplog.text


async def test_a_declaration_that_fails_otherwise_is_logged_and_the_component_starts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events: list[str] = []
    bad = [ConfigurationError("topics cannot change on this server")]
    worker = Worker([Recorder("a", events, bad), Recorder("b", events)])
    await _run_until(worker, lambda: {"run a", "run b"} <= set(events))
    assert events[:2] == ["declare a", "declare b"]
    assert "Recorder(a) failed to declare" in caplog.text
    assert "topics cannot change on this server" in caplog.text


async def test_a_stop_while_declaring_starts_nothing_and_returns_0() -> None:
    events: list[str] = []
    forever = [TransportUnavailable("down")] * 1000
    worker = Worker([Plain(events), Recorder("a", events, forever)], restart_base=0.05)
    running = asyncio.create_task(worker.run(handle_signals=False))
    await wait_for(lambda: events.count("declare a") >= 2, 10)
    await worker.stop()
    assert await asyncio.wait_for(running, 10) == 0
    assert not [e for e in events if e.startswith("run")]


async def test_a_stop_is_kept_even_by_a_declaration_that_swallowed_its_cancellation() -> None:
    """A driver may lose a cancellation (asyncio.wait_for on Python 3.11) and raise its
    own error instead: the declaration loop must still see the stop."""
    declaring = asyncio.Event()

    class Swallower(Plain):
        async def declare(self) -> list[GroupDeclaration]:
            declaring.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                raise TransportUnavailable("the driver lost the cancellation") from None
            return []

    events: list[str] = []
    worker = Worker([Swallower(events)], restart_base=5.0)
    running = asyncio.create_task(worker.run(handle_signals=False))
    await asyncio.wait_for(declaring.wait(), 10)
    await worker.stop()
    assert await asyncio.wait_for(running, 3) == 0
    assert events == []


# -- on real brokers -------------------------------------------------------------------


@pytest.fixture(params=["sql", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
async def broker(request: pytest.FixtureRequest, db_url: str) -> AsyncIterator[Broker]:
    made = Broker(request.param, db_url)
    yield made
    await made.close()


async def test_a_relay_never_publishes_before_its_workers_groups_exist(
    database: Database, broker: Broker
) -> None:
    """A backlog in the outbox, then a worker whose relay and consumer start together,
    the consumer slow to subscribe: the consumer applies every message of it."""
    await database.upgrade()
    await create_business_tables(database)
    sent = [Message(type="test.work", data={"n": i}) for i in range(20)]
    async with database.transaction() as conn:
        for message in sent:
            await add_to_outbox(conn, message)
    relay = Relay(database, broker.transport(), poll_interval=0.05)
    slow = SlowToSubscribe(broker.transport())
    consumer = Consumer(f"svc-{uuid.uuid4().hex[:8]}", database, slow)

    @consumer.handler("test.work")
    async def on_work(ctx: HandlerContext, data: Any) -> None:
        await ctx.conn.execute(effects.insert().values(message_id=ctx.message.id, value=data["n"]))

    async def applied() -> bool:
        return await effect_counts(database) == {m.id: 1 for m in sent}

    await _run_until(Worker([relay, consumer]), applied)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    command = [sys.executable, "-c", "from accord.cli import main; main()", *args]
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, timeout=60, env=Workers.environment(env)
    )


@pytest.mark.slow
async def test_declare_only_at_deploy_keeps_what_is_published_before_the_worker_starts(
    database: Database, broker: Broker, workers: Workers
) -> None:
    await create_business_tables(database)
    service = f"svc-{uuid.uuid4().hex[:8]}"
    args = ["--app", "tests.runtime.apps:effect_consumer", "--db", database.url]
    args += ["--broker", broker.url, "--service", service]
    env = {"ACCORD_CHANNEL": broker.channel}

    declared = _cli("worker", *args, "--declare-only", "--json", env=env)
    assert declared.returncode == 0, declared.stderr.decode()
    kind = "sql" if broker.kind == "sql" else "rabbitmq"
    assert json.loads(declared.stdout) == [
        {"transport": kind, "group": service, "topics": ["test.work"]}
    ]

    sent = [Message(type="test.work", data={"n": i}) for i in range(5)]
    await broker.publish(*sent)  # no consumer has run yet
    proc = workers.start(*args, env=env)

    async def applied() -> bool:
        return await effect_counts(database) == {m.id: 1 for m in sent}

    await wait_for(applied, 30)
    proc.send_signal(signal.SIGTERM)
    await wait_for(lambda: proc.poll() is not None, 20)
    assert proc.returncode == 0, workers.log(proc)
    assert f"declared group {service} on {kind} for test.work" in workers.log(proc)


def test_declare_only_prints_the_groups_and_says_when_there_are_none(sqlite_url: str) -> None:
    base = ["worker", "--db", sqlite_url, "--broker", sqlite_url, "--service", "billing"]
    done = _cli(*base, "--app", "tests.runtime.apps:effect_consumer", "--declare-only")
    assert done.returncode == 0, done.stderr.decode()
    assert "declared group billing on sql for test.work" in " ".join(done.stdout.decode().split())

    done = _cli(*base, "--app", "tests.runtime.apps:relay_only", "--declare-only", "--json")
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout) == []
    done = _cli(*base, "--app", "tests.runtime.apps:relay_only", "--declare-only")
    assert "nothing to declare" in done.stdout.decode()

    done = _cli(*base, "--app", "tests.runtime.apps:relay_only", "--json")
    assert done.returncode == 2
    assert "--json goes with --declare-only" in " ".join(done.stderr.decode().split())
