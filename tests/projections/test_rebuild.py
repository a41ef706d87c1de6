"""Rebuild beside the live read model while writes continue, then an atomic swap."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
import sqlalchemy as sa

from accord.db import Database
from accord.errors import ConfigurationError
from accord.eventstore import EventStore
from accord.projections import Progress, ProjectionRunner, projection_status, rebuild
from tests.projections import app
from tests.projections.helpers import append_scores, expected_totals, read_model


async def test_rebuild_during_writes_equals_a_fresh_build(database: Database) -> None:
    store = EventStore(database)
    app.SIDE_EFFECTS.clear()
    scores = app.make_scores(batch_size=100)
    runner = ProjectionRunner(database, [scores], store=store, lease_ttl=5, poll_interval=0.05)
    try:
        first = await append_scores(store, 1500, per_append=50)
        await runner.start()
        await runner.wait_until(first, timeout=30)
        writing = asyncio.Event()

        async def writer() -> int:
            last = 0
            for k in range(30):
                last = await append_scores(store, 20, start=1500 + 20 * k, stream="w")
                writing.set()
                await asyncio.sleep(0.01)
            return last

        write_task = asyncio.create_task(writer())
        await writing.wait()
        progress: list[Progress] = []
        # The rebuild runs in its own definition object, as the CLI would.
        result = await rebuild(
            database, app.make_scores(), store=store, batch_size=200, on_progress=progress.append
        )
        last = await write_task
        assert (result.previous, result.version) == (1, 2)
        assert progress and progress[-1].done == result.events >= 1500
        await runner.wait_until(last, timeout=30)
        [status] = await runner.status()
        assert status.live_version == 2 and status.rebuilding is None

        rebuilt = await read_model(database, scores)
        assert len(rebuilt["log"]) == len(set(rebuilt["log"])) == 2100
        assert rebuilt["totals"] == expected_totals(2100)

        # A fresh build of the same events under another name is identical.
        fresh = app.make_scores("scores_fresh", batch_size=500)
        fresh_runner = ProjectionRunner(database, [fresh], store=store)
        while await fresh_runner.run_once():
            pass
        assert await read_model(database, fresh) == rebuilt

        # Side effects fired once per event by the live runner and once by the fresh
        # build, never by the rebuild's replay (which would make three).
        fired = Counter(app.SIDE_EFFECTS)
        assert set(fired) == set(rebuilt["log"]) and set(fired.values()) == {2}
        # The old version's tables stay until the next rebuild, which drops them.
        async with database.connect() as conn:
            names = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
        assert {"scores_totals_v1", "scores_totals_v2", "scores_log_v1", "scores_log_v2"} <= set(
            names
        )
        again = await rebuild(database, app.make_scores(), store=store)
        assert (again.previous, again.version) == (2, 3)
        await runner.wait_until(await store.head(), timeout=30)
        async with database.connect() as conn:
            names = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
        assert "scores_totals_v1" not in names and "scores_totals_v3" in names
        assert await read_model(database, scores) == rebuilt
        [status] = await projection_status(database, [scores], store=store)
        assert status.live_version == 3 and status.events_behind == 0
    finally:
        await runner.stop()
        await store.close()


async def test_a_batch_size_below_one_is_refused_by_its_name(database: Database) -> None:
    """0 was taken as "the default", -5 failed deep down as "limit must be..."."""
    for size in (0, -5):
        with pytest.raises(ConfigurationError, match=f"batch_size must be .* not {size}"):
            await rebuild(database, app.make_scores(), batch_size=size)
