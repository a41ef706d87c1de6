"""On PostgreSQL a relay's claim, its marking rows sent and its clean-up read the rows
they need and no others, however the table grew since the connection made their plans."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from accord.db import Database
from accord.outbox import Relay
from accord.outbox._claim import _CLAIM_AHEAD_DRIVER, _MARK_SENT_DRIVER, _claim_ahead
from accord.transports.sql import SqlTransport
from tests.plans import explain, reads

pytestmark = pytest.mark.postgres

_ADD = """
INSERT INTO accord_outbox (id, event_type, key, payload, headers, status, retry_count,
                           available_at, created_at)
SELECT gen_random_uuid(), 't', 'k' || (i % 50), '{}'::jsonb, '{}'::jsonb, $2, 0,
       now() - interval '1 second', now()
FROM generate_series(1, $1::int) AS i
"""


@pytest.mark.parametrize("few", [5, 70])
async def test_a_claim_probes_its_windows_rows_on_a_table_grown_since_its_plan(
    pg_url: str, few: int
) -> None:
    """The claim locked and read its window's rows by ``seq = ANY(...)``. A connection
    keeps the plan it made while the table was small (no statistics until autovacuum
    analyzes it), which scanned the whole table for them, twice; the table then grows
    with sent rows: 2 ms a claim at 6,000 rows, growing with it. Here the plan is made
    while the table holds a few rows, then 6,000 sent rows and 100 pending are added:
    the claim must take the first 40 pending rows through an index, row by row."""
    database = Database(pg_url)
    await database.upgrade()
    driver = await database.connect_driver()
    try:
        claim = await driver.prepare(_CLAIM_AHEAD_DRIVER)
        for _ in range(12):  # past the custom plans: the connection keeps one plan
            await driver.execute(_ADD, few, "PENDING")
            async with driver.transaction():
                await claim.fetch(datetime.now(UTC), 40, 80, 0, [])
            await driver.execute("UPDATE accord_outbox SET status = 'SENT'")
        await driver.execute(_ADD, 6000, "SENT")
        await driver.execute(_ADD, 100, "PENDING")
        pending = [
            r["seq"]
            for r in await driver.fetch(
                "SELECT seq FROM accord_outbox WHERE status = 'PENDING' ORDER BY seq"
            )
        ]
        now = datetime.now(UTC)
        async with driver.transaction():
            rows = await claim.fetch(now, 40, 80, 0, [])
            plan = await explain(driver, claim, [now, 40, 80, 0, []])
    finally:
        await driver.close()
        await database.dispose()
    assert [r["seq"] for r in rows if r["seq"] is not None] == pending[:40]
    scans = reads(plan, "accord_outbox")
    assert scans, plan
    for scan in scans:
        assert scan["Node Type"] != "Seq Scan", scan
        assert scan.get("Rows Removed by Filter", 0) <= 100, scan


@pytest.mark.parametrize("leased", [False, True])
@pytest.mark.parametrize("few", [5, 70])
async def test_marking_rows_sent_probes_them_on_a_table_grown_since_its_plan(
    pg_url: str, few: int, leased: bool
) -> None:
    """Marking a batch SENT found its rows by ``seq = ANY(...)``: with the plan kept
    from when the table was small, a scan of the whole table (1.7 ms at 6,000 rows,
    growing with it); so did ``ctid = ANY(...)`` of the rows' tuple ids. It must reach
    the batch's rows only, and mark them all (leased ones only under their lease)."""
    database = Database(pg_url)
    await database.upgrade()
    driver = await database.connect_driver()
    lease = datetime(2100, 1, 1, tzinfo=UTC) if leased else None
    pending = "SELECT seq FROM accord_outbox WHERE status = 'PENDING' ORDER BY seq"
    hold = "UPDATE accord_outbox SET available_at = $1 WHERE status = 'PENDING'"
    try:
        mark = await driver.prepare(_MARK_SENT_DRIVER)
        for _ in range(12):  # past the custom plans: the connection keeps one plan
            await driver.execute(_ADD, few, "PENDING")
            if lease:
                await driver.execute(hold, lease)
            seqs = [r["seq"] for r in await driver.fetch(pending)]
            await mark.fetch(datetime.now(UTC), seqs, lease)
        await driver.execute(_ADD, 6000, "SENT")
        await driver.execute(_ADD, 40, "PENDING")
        if lease:
            await driver.execute(hold, lease)
        seqs = [r["seq"] for r in await driver.fetch(pending)]
        async with driver.transaction():
            plan = await explain(driver, mark, [datetime.now(UTC), seqs, lease])
        left = await driver.fetchval("SELECT count(*) FROM accord_outbox WHERE status = 'PENDING'")
    finally:
        await driver.close()
        await database.dispose()
    assert len(seqs) == 40
    assert left == 0  # EXPLAIN ANALYZE ran the update: every row of the batch is SENT
    scans = reads(plan, "accord_outbox")
    assert scans, plan
    for scan in scans:
        assert scan["Node Type"] in ("Index Scan", "Tid Scan"), scan
        assert scan.get("Rows Removed by Filter", 0) == 0, scan


async def test_the_clean_up_is_planned_afresh_at_each_run(pg_url: str) -> None:
    """The relay's clean-up deleted old SENT rows by ``seq = ANY(ARRAY(...))`` under
    the plan a connection kept from when the table was small: a scan of the whole
    table per batch (4.3 ms at 6,000 rows, growing with it). It runs once a minute:
    it is planned at each run from the table as it is. Here its one pooled
    connection runs it a dozen times and PostgreSQL reports no generic plan."""
    database = Database(pg_url, pool_size=1, max_overflow=0)
    await database.upgrade()
    relay = Relay(database, SqlTransport(pg_url, channel="clean"), retention=timedelta(0))
    old = "UPDATE accord_outbox SET sent_at = now() - interval '1 day' WHERE status = 'SENT'"
    plans = (
        "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
        "WHERE statement LIKE 'DELETE FROM accord_outbox%'"
    )
    try:
        driver = await database.connect_driver()
        try:
            for _ in range(12):
                await driver.execute(_ADD, 5, "SENT")
                await driver.execute(old)
                assert await relay.cleanup() == 5
        finally:
            await driver.close()
        async with database.connect() as conn:  # the pool's one connection
            [(generic, custom)] = (await conn.execute(sa.text(plans))).all()
    finally:
        await database.dispose()
    assert (generic, custom) == (0, 12)


async def test_a_claim_locks_the_rows_it_returns_and_no_others(pg_url: str) -> None:
    """The window's rows are locked one probe each, in seq order, until the batch is
    full: the claim returns the first ``limit`` rows in seq order and holds those
    locks only (another relay can take the rest at once)."""
    database = Database(pg_url)
    await database.upgrade()
    first, second = await database.connect_driver(), await database.connect_driver()
    free = "SELECT seq FROM accord_outbox FOR UPDATE SKIP LOCKED"
    try:
        await first.execute(_ADD, 50, "PENDING")
        seqs = [r["seq"] for r in await first.fetch("SELECT seq FROM accord_outbox ORDER BY seq")]
        async with first.transaction():
            claimed = await _claim_ahead(first, now=datetime.now(UTC), lease_until=None, limit=10)
            async with second.transaction():
                unlocked = sorted(r["seq"] for r in await second.fetch(free))
    finally:
        await first.close()
        await second.close()
        await database.dispose()
    assert [row.seq for row in claimed] == seqs[:10]
    assert unlocked == seqs[10:]
