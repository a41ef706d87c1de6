"""On PostgreSQL a relay's claim, and its marking rows sent, read the rows they need
and no others, however the table grew since the connection made their plans."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from accord.db import Database
from accord.outbox._claim import _CLAIM_AHEAD_DRIVER, _MARK_SENT_DRIVER

pytestmark = pytest.mark.postgres

_ADD = """
INSERT INTO accord_outbox (id, event_type, key, payload, headers, status, retry_count,
                           available_at, created_at)
SELECT gen_random_uuid(), 't', 'k' || (i % 50), '{}'::jsonb, '{}'::jsonb, $2, 0,
       now() - interval '1 second', now()
FROM generate_series(1, $1::int) AS i
"""


def _nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    found = [node]
    for child in node.get("Plans", []):
        found += _nodes(child)
    return found


async def test_a_claim_probes_its_windows_rows_on_a_table_grown_since_its_plan(
    pg_url: str,
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
            await driver.execute(_ADD, 5, "PENDING")
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
            # EXPLAIN takes no parameters: the same arguments, written out.
            [plan] = json.loads(
                await driver.fetchval(
                    f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE {claim.get_name()}"
                    f"('{now.isoformat()}', 40, 80, 0, '{{}}'::bigint[])"
                )
            )
    finally:
        await driver.close()
        await database.dispose()
    assert [r["seq"] for r in rows if r["seq"] is not None] == pending[:40]
    scans = [n for n in _nodes(plan["Plan"]) if n.get("Relation Name") == "accord_outbox"]
    assert scans, plan
    for scan in scans:
        assert scan["Node Type"] != "Seq Scan", scan
        assert scan.get("Rows Removed by Filter", 0) <= 100, scan


async def test_marking_rows_sent_probes_them_on_a_table_grown_since_its_plan(
    pg_url: str,
) -> None:
    """Marking a batch SENT found its rows by ``seq = ANY(...)``: with the plan kept
    from when the table was small, a scan of the whole table (1.7 ms at 6,000 rows,
    growing with it). It must reach the batch's rows only, and mark them all."""
    database = Database(pg_url)
    await database.upgrade()
    driver = await database.connect_driver()
    pending = "SELECT seq FROM accord_outbox WHERE status = 'PENDING' ORDER BY seq"
    try:
        mark = await driver.prepare(_MARK_SENT_DRIVER)
        for _ in range(12):  # past the custom plans: the connection keeps one plan
            await driver.execute(_ADD, 5, "PENDING")
            await mark.fetch(
                datetime.now(UTC), [r["seq"] for r in await driver.fetch(pending)], None
            )
        await driver.execute(_ADD, 6000, "SENT")
        await driver.execute(_ADD, 40, "PENDING")
        seqs = [r["seq"] for r in await driver.fetch(pending)]
        async with driver.transaction():
            [plan] = json.loads(
                await driver.fetchval(
                    f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE {mark.get_name()}"
                    f"('{datetime.now(UTC).isoformat()}', "
                    f"'{{{','.join(map(str, seqs))}}}'::bigint[], NULL)"
                )
            )
        left = await driver.fetchval("SELECT count(*) FROM accord_outbox WHERE status = 'PENDING'")
    finally:
        await driver.close()
        await database.dispose()
    assert len(seqs) == 40
    assert left == 0  # EXPLAIN ANALYZE ran the update: every row of the batch is SENT
    scans = [n for n in _nodes(plan["Plan"]) if n.get("Relation Name") == "accord_outbox"]
    assert scans, plan
    for scan in scans:
        assert scan["Node Type"] != "Seq Scan", scan
        assert scan.get("Rows Removed by Filter", 0) == 0, scan
