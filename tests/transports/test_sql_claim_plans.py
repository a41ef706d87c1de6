"""On PostgreSQL the SQL transport's claim reads the deliveries and messages it takes
and no others, however the tables grew since the connection made its plans."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from tests.plans import Kept, reads

from accord.db import Database
from accord.transports._sql._queries import _BODIES_POSTGRES, _LEASE_POSTGRES, _PICK_AHEAD

pytestmark = pytest.mark.postgres

_ADD = """
WITH m AS (
  INSERT INTO accord_queue (channel, message_id, type, key, headers, body, created_at)
  SELECT 'ch', gen_random_uuid()::text, 't', 'k' || (i % 50), '{}', '\\x00', now()
  FROM generate_series(1, $1::int) AS i
  RETURNING seq, key)
INSERT INTO accord_queue_deliveries (seq, group_name, channel, key, attempts, available_at)
SELECT seq, 'g', 'ch', key, 0, now() - interval '1 second' FROM m
"""
_WAITING = "SELECT seq FROM accord_queue_deliveries WHERE locked_by IS NULL ORDER BY seq"
_SETTLE = "DELETE FROM accord_queue_deliveries WHERE locked_by IS NOT NULL"


@pytest.mark.parametrize("few", [5, 70])
async def test_a_claim_reaches_its_deliveries_by_key_on_tables_grown_since_its_plans(
    pg_url: str, few: int
) -> None:
    """The window's deliveries were locked by ``seq = ANY(...)``, leased by ``seq IN
    (...)`` and their messages read by ``seq IN (...)``: with the plans kept from
    when the tables were small, scans of the group's deliveries and of every message
    (3.7, 6 and 4.7 ms at 6,000, growing with the backlog). Each must probe a key per
    delivery, lease the 40 it took and read their 40 messages."""
    database = Database(pg_url)
    await database.upgrade()
    driver = await database.connect_driver()
    pick, lease, bodies = (
        Kept(driver, s) for s in (_PICK_AHEAD, _LEASE_POSTGRES, _BODIES_POSTGRES)
    )
    until = datetime.now(UTC) + timedelta(minutes=5)

    def picking(now: datetime) -> dict[str, Any]:
        return {
            "channel": "ch", "group": "g", "now": now, "after": 0,
            "window": 80, "limit": 40, "taken": [],
        }  # fmt: skip

    def leasing(seqs: list[int]) -> dict[str, Any]:
        return {"group": "g", "seqs": seqs, "until": until, "consumer": "c1"}

    try:
        for kept in (pick, lease, bodies):
            await kept.prepare()
        for _ in range(12):  # past the custom plans: the connection keeps one plan
            await driver.execute(_ADD, few)
            async with driver.transaction():
                picked = [r["seq"] for r in await pick.run(picking(datetime.now(UTC))) if r["seq"]]
                await lease.run(leasing(picked))
                await bodies.run({"seqs": picked})
            await driver.execute(_SETTLE)
        await driver.execute(_ADD, 6000)
        waiting = [r["seq"] for r in await driver.fetch(_WAITING)]
        async with driver.transaction():
            now = datetime.now(UTC)
            picked = [r["seq"] for r in await pick.run(picking(now)) if r["seq"]]
            pick_plan = await pick.explain(picking(now))
            leased = await lease.run(leasing(picked))
            lease_plan = await lease.explain(leasing(picked))
            read = await bodies.run({"seqs": picked})
            bodies_plan = await bodies.explain({"seqs": picked})
    finally:
        await driver.close()
        await database.dispose()
    assert picked == waiting[:40]
    assert sorted(r["seq"] for r in leased) == picked
    assert sorted(r["seq"] for r in read) == picked
    for name, plan in (("pick", pick_plan), ("lease", lease_plan), ("bodies", bodies_plan)):
        scans = [n for n in reads(plan, "accord_queue") if n["Node Type"] != "Function Scan"]
        assert scans, (name, plan)
        for scan in scans:
            assert scan["Node Type"] in ("Index Scan", "Index Only Scan", "Tid Scan"), (
                name,
                scan,
            )
            assert scan.get("Rows Removed by Filter", 0) <= 100, (name, scan)
