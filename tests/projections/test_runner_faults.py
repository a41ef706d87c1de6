"""The projection runner keeps going through database faults: a timed-out lease
renewal, a failed read-ahead."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from accord.db import Database
from accord.testing import wait_for


@pytest.mark.postgres
async def test_a_driver_timeout_does_not_kill_the_projection_runners_loop(pg_url: str) -> None:
    """A lease renewal blocked past command_timeout is a DatabaseError the runner's loop
    retries on: the projection's task goes on, it does not end for good."""
    from accord.db.schema_events import projection_leases
    from accord.projections import Projection, ProjectionRunner

    database = Database(pg_url, connect_args={"command_timeout": 0.3})
    projection = Projection(f"review-{uuid.uuid4().hex[:8]}")

    @projection.on("review.happened")
    def happened(ctx: Any, event: Any) -> None:
        pass

    runner = ProjectionRunner(database, [projection], lease_ttl=1.5, poll_interval=0.05)
    blocker = Database(pg_url)
    try:
        await runner.start()

        async def leased() -> bool:
            async with blocker.connect() as conn:
                owner = await conn.scalar(
                    sa.select(projection_leases.c.owner).where(
                        projection_leases.c.name == projection.name
                    )
                )
            return owner is not None

        await wait_for(leased, 10)
        # Another session holds the lease row (a slow rebuild, an operator's query)
        # for longer than command_timeout: the next renewal waits for it and times out.
        async with blocker.transaction() as conn:
            await conn.execute(
                sa.select(projection_leases)
                .where(projection_leases.c.name == projection.name)
                .with_for_update()
            )
            await asyncio.sleep(1.5)
        await asyncio.sleep(1.0)
        task = runner._tasks[0]
        died = task.done() and not task.cancelled() and task.exception() is not None
        assert not died, f"the projection loop died: {task.exception()!r}"
    finally:
        await runner.stop()
        await database.dispose()
        await blocker.dispose()
