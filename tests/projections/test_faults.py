"""Runner processes killed with SIGKILL: mid-batch (nothing applied twice) and lease takeover."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from accord.db import Database
from accord.eventstore import EventStore
from accord.projections import ProjectionRunner, projection_status
from accord.testing import wait_for
from tests.projections import app
from tests.projections.helpers import append_scores, expected_totals, read_model

pytestmark = pytest.mark.fault
ROOT = Path(__file__).parents[2]


@pytest.fixture
def spawn() -> Iterator[object]:
    """Start runner processes; every one still alive is killed at teardown."""
    procs: list[subprocess.Popen[str]] = []

    def start(db_url: str, *, kill_at: int = 0, lease_ttl: float = 1.0) -> subprocess.Popen[str]:
        env = dict(os.environ, ACCORD_TEST_KILL_AT=str(kill_at), PYTHONPATH=str(ROOT))
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.projections.runner_process",
                db_url,
                "--lease-ttl",
                str(lease_ttl),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()


async def _owner(database: Database, store: EventStore) -> str | None:
    [status] = await projection_status(database, [app.make_scores()], store=store)
    return status.lease_owner


async def test_sigkill_mid_batch_applies_nothing_twice(database: Database, spawn) -> None:  # type: ignore[no-untyped-def]
    store = EventStore(database)
    try:
        last = await append_scores(store, 400)
        # Dies inside the 3rd batch (50 per batch): 2 batches committed, the 3rd half done.
        victim = spawn(database.url, kill_at=125)
        assert victim.wait(timeout=60) == -signal.SIGKILL
        [status] = await projection_status(database, [app.make_scores()], store=store)
        assert status.handled == 100 and status.events_behind == 300
        model = await read_model(database, app.make_scores())
        assert len(model["log"]) == 100 and len(set(model["log"])) == 100
        # A fresh runner (in this process) picks up at the checkpoint.
        scores = app.make_scores()
        runner = ProjectionRunner(
            database, [scores], store=store, lease_ttl=1.0, poll_interval=0.05
        )
        await runner.start()
        try:
            await runner.wait_until(last, timeout=30)
        finally:
            await runner.stop()
        model = await read_model(database, scores)
        assert len(model["log"]) == len(set(model["log"])) == 400
        assert model["totals"] == expected_totals(400)
    finally:
        await store.close()


async def test_lease_takeover_after_holder_is_killed(database: Database, spawn) -> None:  # type: ignore[no-untyped-def]
    store = EventStore(database)
    try:
        first = await append_scores(store, 100)
        a = spawn(database.url)
        a_owner = a.stdout.readline().split()[1]
        b = spawn(database.url)
        b_owner = b.stdout.readline().split()[1]
        scores = app.make_scores()
        watcher = ProjectionRunner(database, [scores], store=store)
        await watcher.wait_until(first, timeout=30)
        holder = await _owner(database, store)
        assert holder in (a_owner, b_owner)
        active, standby, standby_owner = (a, b, b_owner) if holder == a_owner else (b, a, a_owner)
        active.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        active.wait(timeout=10)
        last = await append_scores(store, 100, start=100)

        async def taken_over() -> bool:
            return await _owner(database, store) == standby_owner

        await wait_for(taken_over, 10)
        took = time.monotonic() - killed_at
        assert took < 5, f"takeover took {took:.1f}s with a 1s lease"
        await watcher.wait_until(last, timeout=30)
        assert standby.poll() is None
        model = await read_model(database, scores)
        assert len(model["log"]) == len(set(model["log"])) == 200
        assert model["totals"] == expected_totals(200)
    finally:
        await store.close()
