"""Saga deadlines in the server's time, however a saga starts or a reply comes; and
the prune commands' output.

Hosts whose clocks differ are played as in ``tests/db/test_server_clock.py``: each
"host" has its own Database, whose ``ServerClock`` reads a local clock 30 s behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from accord.cli.app import _register_subcommands, app
from accord.db import Database
from accord.db.schema_sagas import deadlines
from accord.messages import Message
from accord.sagas import Orchestrator, Saga, command
from accord.testing import wait_for
from accord.transports.sql import SqlTransport
from tests.clocks import SKEW, clock_of, server_now

TIMEOUT = 10.0


async def due_in(database: Database, saga_id: str) -> float:
    """Seconds from the server's now to the saga's deadline."""
    async with database.connect() as conn:
        due = await conn.scalar(sa.select(deadlines.c.due_at).where(deadlines.c.saga_id == saga_id))
    assert isinstance(due, datetime)
    return (due - await server_now(database)).total_seconds()


def timed() -> Saga:
    return (
        Saga("timed")
        .step("ask", command("timed.ask"), timeout=TIMEOUT)
        .step("tell", command("timed.tell"), timeout=TIMEOUT)
    )


# -- the first deadline of a saga started in the caller's transaction -------------


@pytest.mark.postgres
async def test_a_saga_started_in_the_callers_transaction_on_a_host_behind_is_not_fired_early(
    host: Callable[[], Database],
) -> None:
    """The usual shape of a service: its API process starts sagas inside its own
    request transaction (``start(conn=...)``) and never runs an orchestrator loop;
    worker replicas fire the deadlines. The start measures the clock on the
    caller's connection: 30 s behind, a 10 s timeout is still 10 s away in server
    time (unmeasured, it was 20 s past, and a worker fired it at once)."""
    api_host, worker_host = host(), host()
    clock_of(api_host, -SKEW)
    saga = timed()
    channel = f"clock-{uuid.uuid4().hex[:8]}"
    api = Orchestrator(api_host, SqlTransport(channel=channel, database=api_host), [saga])
    worker = Orchestrator(worker_host, SqlTransport(channel=channel, database=worker_host), [saga])

    async with api_host.transaction() as conn:
        saga_id = await api.start("timed", {}, conn=conn)

    left = await due_in(worker_host, saga_id)
    assert left > TIMEOUT - 5, f"the step's {TIMEOUT:.0f} s timeout is due in {left:.1f} s"
    assert await worker.fire_due() == 0, "a worker fired the new saga's timeout at once"


# -- replies handled right after a restart ---------------------


@pytest.mark.postgres
async def test_replies_handled_before_the_first_measure_set_deadlines_in_server_time(
    host: Callable[[], Database], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica restarted on a host 30 s behind with replies queued for it: its
    ``connect()`` measures the clock before the reply consumers start, so the
    deadlines the replies set are in server time (applied with offset 0, each next
    step's timeout was 30 s early). The measure is held here so that a reply would
    come first if it could."""
    orchestrator_host, other_host = host(), host()
    clock_of(orchestrator_host, -SKEW)
    saga = timed()
    channel = f"clock-{uuid.uuid4().hex[:8]}"
    # Started by a replica with a right clock: step 0 waits for its reply.
    starter = Orchestrator(other_host, SqlTransport(channel=channel, database=other_host), [saga])
    saga_id = await starter.start("timed", {})

    async def at_step_one() -> bool:
        async with other_host.connect() as conn:
            step = await conn.scalar(
                sa.text("SELECT step FROM accord_sagas WHERE id = :id"), {"id": saga_id}
            )
        return bool(step == 1)

    # The replica's first measure is slow: it ends once the reply was applied, or
    # after 2 s (with a fix that waits for it, the reply is applied only after it).
    release = asyncio.Event()
    clock = orchestrator_host.clock
    measure = clock.sync

    async def slow_measure(*args: Any) -> timedelta:
        await release.wait()
        return await measure(*args)

    seen: list[float] = []

    async def release_when_applied() -> None:
        with contextlib.suppress(TimeoutError):
            await wait_for(at_step_one, 2, interval=0.05)
            # Read before the measure ends: the timer, corrected, would fire it.
            seen.append(await due_in(other_host, saga_id))
        release.set()

    monkeypatch.setattr(clock, "sync", slow_measure)
    transport = SqlTransport(orchestrator_host.url, channel=channel, poll_interval=0.05)
    replica = Orchestrator(orchestrator_host, transport, [saga], name="restarted")
    publisher = SqlTransport(other_host.url, channel=channel)
    releasing = asyncio.create_task(release_when_applied())
    running = asyncio.create_task(replica.run())
    try:
        await replica.connect()  # the reply group is subscribed (run() does it too)
        reply = Message(
            type=saga.reply_type,
            data={
                "saga_id": saga_id,
                "step": 0,
                "phase": "action",
                "attempt": 1,
                "ok": True,
                "result": None,
                "error": None,
            },
        )
        await publisher.publish([reply])
        await wait_for(at_step_one, 8, interval=0.05)
        await releasing
        left = seen[0] if seen else await due_in(other_host, saga_id)
        assert left > TIMEOUT - 5, f"step 1's {TIMEOUT:.0f} s timeout is due in {left:.1f} s"
    finally:
        release.set()
        await releasing
        await replica.stop()
        async with asyncio.timeout(10):
            await running
        await transport.close()
        await publisher.close()


# -- the prune commands' text output ---------------------------------------------

_register_subcommands()
runner = CliRunner()


def _pruned(count: int) -> Callable[..., Any]:
    async def prune(*args: Any, **kwargs: Any) -> int:
        return count

    return prune


@pytest.mark.parametrize(
    ("args", "target", "before"),
    [
        (["inbox", "prune"], "accord.inbox.Inbox.prune", "Pruned 1234 inbox row(s)."),
        (["sagas", "prune"], "accord.sagas.SagaAdmin.prune", "Pruned 1234 ended saga(s)."),
        (
            ["sagas", "prune-participations"],
            "accord.sagas.SagaAdmin.prune_participations",
            "Pruned 1234 participant record(s).",
        ),
        (["flows", "prune"], "accord.sagas._flows.Flows.prune", "Pruned 1234 flow(s)."),
    ],
)
def test_the_prune_commands_print_their_count_as_before_the_refactor(
    sqlite_url: str,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    target: str,
    before: str,
) -> None:
    """The four prune commands share one helper; their text output is as it was
    (a plain count a script can read, "Pruned 1234 ...", not "1,234")."""
    monkeypatch.setattr(target, _pruned(1234))
    result = runner.invoke(app, [*args, "--db", sqlite_url, "--older-than-days", "30"])
    assert result.exit_code == 0, result.output
    assert before in result.output, result.output
