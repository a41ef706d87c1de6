"""On PostgreSQL, a batch's look-ups of saga instances and of a participant's records
read the rows they return and no others, however the table grew since the
connection made their plan; and the instances stay locked as before."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from accord.db import Database
from accord.sagas import Orchestrator, Saga, command
from accord.sagas._participant import _oldest_records, _records_statement
from accord.sagas._store import _statements, load_locked
from accord.transports.sql import SqlTransport
from tests.plans import Kept, nodes, reads

pytestmark = pytest.mark.postgres

_ADD_RECORDS = """
INSERT INTO accord_saga_participations (participant, saga_id, step, phase, attempt, ok, at)
SELECT 'svc-b', 'saga-' || i, s, 'action', 1, true, now()
FROM generate_series($1::int, $2::int) AS i, generate_series(1, 2) AS s
"""
_ADD_SAGAS = """
INSERT INTO accord_sagas (id, name, status, phase, step, attempt, attempt_base, waiting, data,
                          version, created_at, updated_at)
SELECT 'saga-' || i, 'trip', 'RUNNING', 'action', 0, 1, 0, true, '{}', 1, now(), now()
FROM generate_series($1::int, $2::int) AS i
"""


async def _plan_after_growth(
    pg_url: str, statement: Any, params: dict[str, Any], add: str, ids: list[str], few: int
) -> tuple[list[Any], dict[str, Any]]:
    """Run ``statement`` (with ``params`` and the list ``ids``) twelve times on one
    connection while ``add`` has put ``few`` sagas' rows in its table, grow the table
    to 6,000 sagas, and return what the kept plan then returns for ``ids`` and how it
    ran."""
    database = Database(pg_url)
    await database.upgrade()
    driver = await database.connect_driver()
    kept = Kept(driver, statement)
    try:
        await driver.execute(add, 1, few)
        await kept.prepare()
        async with driver.transaction():
            for k in range(12):  # past the custom plans: the connection keeps one plan
                await kept.run({**params, "ids": [f"saga-{i}" for i in range(k, k + 40)]})
        await driver.execute(add, few + 1, 6000)
        async with driver.transaction():
            rows = await kept.run({**params, "ids": ids})
            plan = await kept.explain({**params, "ids": ids})
    finally:
        await driver.close()
        await database.dispose()
    return rows, plan


def _assert_probes_the_key(plan: dict[str, Any], table: str) -> None:
    scans = reads(plan, table)
    assert scans, plan
    for scan in scans:
        assert scan.get("Index Name") == f"{table}_pkey", scan
        assert scan.get("Rows Removed by Filter", 0) == 0, scan
        assert scan.get("Rows Removed by Index Recheck", 0) == 0, scan


@pytest.mark.parametrize("few", [5, 70])
async def test_a_participants_lookup_probes_the_key_on_a_table_grown_since_its_plan(
    pg_url: str, few: int
) -> None:
    """A service's records mostly share one participant. On a table with no statistics
    PostgreSQL took ``participant = :name`` for selective and kept the plan it made
    while the table was small: the lookup used the (participant, at) index, or the key
    by participant alone, and read every record of the participant to find a batch's
    40 sagas (10-13 ms a batch at 1,400-1,800 records in the saga benchmark)."""
    ids = ["", *(f"saga-{i}" for i in range(3000, 3040))]
    rows, plan = await _plan_after_growth(
        pg_url, _records_statement("postgresql"), {"name": "svc-b"}, _ADD_RECORDS, ids, few
    )
    assert sorted((r["saga_id"], r["step"]) for r in rows) == sorted(
        (f"saga-{i}", s) for i in range(3000, 3040) for s in (1, 2)
    )
    _assert_probes_the_key(plan, "accord_saga_participations")
    for scan in reads(plan, "accord_saga_participations"):
        assert "saga_id" in scan.get("Index Cond", ""), scan


@pytest.mark.parametrize("few", [5, 70])
async def test_an_orchestrators_batch_load_probes_the_key_on_a_table_grown_since_its_plan(
    pg_url: str, few: int
) -> None:
    """The orchestrator loads and locks a batch's sagas by id. With the plan kept from
    when the table was small it scanned every saga (5-10 ms a batch of 64 at 1,100 to
    1,300 sagas in the saga benchmark, growing with the table)."""
    ids = sorted(f"saga-{i}" for i in range(3000, 3064))
    rows, plan = await _plan_after_growth(
        pg_url, _statements("postgresql").load_locked, {}, _ADD_SAGAS, ids, few
    )
    assert sorted(r["id"] for r in rows) == ids
    _assert_probes_the_key(plan, "accord_sagas")


_ADD_DEADLINES = """
INSERT INTO accord_deadlines (saga_id, kind, phase, step, attempt, due_at, saga_name)
SELECT 'saga-' || i, 'timeout', 'action', 0, 1, now() + interval '1 hour', 'trip'
FROM generate_series($1::int, $2::int) AS i
"""


@pytest.mark.parametrize("few", [5, 70])
async def test_clearing_a_batchs_deadlines_probes_the_key_on_a_table_grown_since_its_plan(
    pg_url: str, few: int
) -> None:
    """A batch's transitions clear their sagas' deadlines by id; with the plan kept
    from when the table was small, a scan of every saga's deadline (7 ms at 6,000)."""
    ids = sorted(f"saga-{i}" for i in range(3000, 3064))
    statement = _statements("postgresql").delete_deadlines
    _rows, plan = await _plan_after_growth(pg_url, statement, {}, _ADD_DEADLINES, ids, few)
    scans = reads(plan, "accord_deadlines")
    assert scans, plan
    for scan in scans:
        assert scan["Node Type"] in ("Index Scan", "Tid Scan"), scan
        assert scan.get("Rows Removed by Filter", 0) == 0, scan
    # One probe per saga (the first run of the batch deleted its rows already), and
    # the rows deleted by tuple id.
    assert [s["Actual Loops"] for s in scans if s["Node Type"] == "Index Scan"] == [64]
    assert [s["Node Type"] for s in scans].count("Tid Scan") == 1


async def test_a_batch_load_keeps_its_sagas_locked_until_it_ends(pg_url: str) -> None:
    """Another batch that shares a saga waits for the first to end; one that shares
    none does not."""
    database = Database(pg_url)
    await database.upgrade()
    try:
        async with database.transaction() as conn:
            await conn.execute(sa.text(_ADD_SAGAS.replace("$1::int", "1").replace("$2::int", "6")))
        async with database.transaction() as first:
            held = await load_locked(first, ["saga-3", "saga-1", "saga-2"])
            assert sorted(held) == ["saga-1", "saga-2", "saga-3"]

            async def second(ids: list[str]) -> set[str]:
                async with database.transaction() as conn:
                    return set(await load_locked(conn, ids))

            apart = await asyncio.wait_for(second(["saga-4", "saga-5"]), 10)
            assert apart == {"saga-4", "saga-5"}
            shared = asyncio.create_task(second(["saga-6", "saga-2"]))
            await asyncio.sleep(0.5)
            assert not shared.done()
        assert await asyncio.wait_for(shared, 10) == {"saga-2", "saga-6"}
    finally:
        await database.dispose()


async def test_a_failed_deadline_is_put_off_only_once_no_batch_holds_its_saga(
    pg_url: str,
) -> None:
    """A batch clears its sagas' deadlines by tuple id, which passes by a deadline
    another transaction moved meanwhile. The timer's putting off of a deadline that
    failed to fire is that other writer: it must wait for the saga, as every other
    writer of a deadline does, and then find the deadline cleared."""
    database = Database(pg_url)
    await database.upgrade()
    saga = Saga("trip").step("book", command("hotels.book"))
    orchestrator = Orchestrator(database, SqlTransport(pg_url, channel="put-off"), [saga])
    try:
        async with database.transaction() as conn:
            for add in (_ADD_SAGAS, _ADD_DEADLINES):
                await conn.execute(sa.text(add.replace("$1::int", "1").replace("$2::int", "1")))
        moment = datetime.now(UTC) + timedelta(hours=2)
        async with database.transaction() as batch:
            await load_locked(batch, ["saga-1"])
            put_off = asyncio.create_task(orchestrator._put_off("saga-1", moment))
            await asyncio.sleep(0.5)
            assert not put_off.done()
            await batch.execute(_statements("postgresql").delete_deadlines, {"ids": ["saga-1"]})
        await asyncio.wait_for(put_off, 10)
        async with database.connect() as conn:
            left = await conn.scalar(sa.text("SELECT count(*) FROM accord_deadlines"))
    finally:
        await database.dispose()
    assert left == 0


@pytest.mark.parametrize("analyzed", [False, True])
async def test_pruning_a_participant_reads_a_range_of_its_own_records(
    pg_url: str, analyzed: bool
) -> None:
    """One database may keep several participants' records. Pruning one reads a range
    of its own old records (the partial (participant, at) index), not the others':
    with an (at, participant) index it walked every other participant's older
    records (6.5 ms a batch of 1,000 behind 200,000, against 0.5 ms)."""
    database = Database(pg_url)
    await database.upgrade()
    add = """
    INSERT INTO accord_saga_participations (participant, saga_id, step, phase, attempt, ok, at)
    SELECT $1::text, $1::text || '-' || $2::text || '-' || i, 1, 'action', 1, true,
           now() - ($2::text || ' days')::interval
    FROM generate_series(1, $3::int) AS i
    """
    driver = await database.connect_driver()
    try:
        await driver.execute(add, "svc-b", "20", 20000)  # another participant's, older
        await driver.execute(add, "svc-a", "2", 1000)
        await driver.execute(add, "svc-a", "0", 5000)
        if analyzed:
            await driver.execute("ANALYZE accord_saga_participations")
        statement = _oldest_records("svc-a", datetime.now(UTC) - timedelta(days=1), 500)
        sql = str(
            statement.with_for_update(skip_locked=True).compile(
                dialect=postgresql.asyncpg.dialect(), compile_kwargs={"literal_binds": True}
            )
        )
        async with driver.transaction():
            picked = await driver.fetch(sql)
            [plan] = json.loads(await driver.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + sql))
    finally:
        await driver.close()
        await database.dispose()
    assert len(picked) == 500
    assert all(r["saga_id"].startswith("svc-a-") for r in picked)

    used = {n["Index Name"] for n in nodes(plan["Plan"]) if "Index Name" in n}
    assert used == {"ix_accord_saga_participations_prune"}, plan
    for scan in reads(plan, "accord_saga_participations"):
        assert scan["Node Type"] != "Seq Scan", scan
        assert scan.get("Rows Removed by Filter", 0) == 0, scan
