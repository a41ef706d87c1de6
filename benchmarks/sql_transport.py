"""SQL transport throughput: publish and consume on SQLite and PostgreSQL, and the
cost of one claim on PostgreSQL over a group's backlog (``claim``).

    .venv/bin/python -m benchmarks.sql_transport [--quick] [--only sqlite postgres claim]

Accord: ``SqlTransport.publish`` in batches of 100 (one group registered), then
one consumer draining the backlog (``prefetch`` 256, messages over 100 keys so
the per-key check runs). Baseline, in the same run: the bare driver (aiosqlite /
asyncpg) doing the same inserts (a message row and a delivery row per message,
one transaction per batch) and the same consumption (select a batch in order,
delete its deliveries, commit) in a loop, with no leases or keys. Both sides
encode and decode the CloudEvents envelope, so the ratio is the transport's cost.

``claim``: the median time of one claim of 256 deliveries (in a transaction rolled
back, so each sees the same backlog) over 20,000 deliveries of one group, by
backlog (no keys, 100 keys, one key, one key whose first delivery another consumer
holds), on a table PostgreSQL has no statistics for yet and once analyzed; the
baseline is a bare ``FOR UPDATE SKIP LOCKED`` select keeping no order.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite
import asyncpg

from accord.db import Database
from accord.messages import Message, decode, encode
from accord.transports._sql import _queries as queries
from accord.transports.base import Delivery
from accord.transports.sql import SqlTransport
from benchmarks._common import ScratchDatabase, console, report

BATCH = 100
PREFETCH = 256


def _messages(count: int) -> list[Message]:
    return [
        Message(type="bench.tick", data={"n": n, "pad": "x" * 64}, key=f"k{n % 100}")
        for n in range(count)
    ]


async def accord_run(url: str, count: int) -> tuple[float, float]:
    """(publish msg/s, consume msg/s) through SqlTransport."""
    channel = f"bench-{uuid.uuid4().hex[:8]}"
    publisher = SqlTransport(url, channel=channel, poll_interval=0.05)
    consumer = SqlTransport(url, channel=channel, poll_interval=0.05)
    received = 0
    done = asyncio.Event()

    async def handle(delivery: Delivery) -> None:
        nonlocal received
        received += 1
        if received >= count:
            done.set()

    try:
        await (await consumer.subscribe("bench", handle, prefetch=PREFETCH)).stop()
        messages = _messages(count)
        started = time.perf_counter()
        for start in range(0, count, BATCH):
            await publisher.publish(messages[start : start + BATCH])
        publish_rate = count / (time.perf_counter() - started)
        started = time.perf_counter()
        subscription = await consumer.subscribe("bench", handle, prefetch=PREFETCH)
        await done.wait()
        await subscription.stop()  # commits the last acks
        consume_rate = count / (time.perf_counter() - started)
    finally:
        await publisher.close()
        await consumer.close()
    return publish_rate, consume_rate


_SQLITE_DDL = [
    "CREATE TABLE q (seq INTEGER PRIMARY KEY, headers TEXT NOT NULL, body BLOB NOT NULL)",
    "CREATE TABLE d (seq INTEGER PRIMARY KEY, grp TEXT NOT NULL)",
]


async def sqlite_baseline(path: Path, count: int) -> tuple[float, float]:
    """(insert msg/s, select+delete msg/s) with aiosqlite alone."""
    messages = _messages(count)
    async with aiosqlite.connect(path, isolation_level=None) as db:
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        for ddl in _SQLITE_DDL:
            await db.execute(ddl)
        started = time.perf_counter()
        seq = 0
        for start in range(0, count, BATCH):
            chunk = [encode(m) for m in messages[start : start + BATCH]]
            await db.execute("BEGIN IMMEDIATE")
            rows = []
            for headers, body in chunk:
                seq += 1
                rows.append((seq, json.dumps(headers), body))
            await db.executemany("INSERT INTO q VALUES (?, ?, ?)", rows)
            await db.executemany("INSERT INTO d VALUES (?, 'bench')", [(r[0],) for r in rows])
            await db.execute("COMMIT")
        insert_rate = count / (time.perf_counter() - started)
        started = time.perf_counter()
        consumed = 0
        while consumed < count:
            await db.execute("BEGIN IMMEDIATE")
            cursor = await db.execute(
                "SELECT d.seq, q.headers, q.body FROM d JOIN q ON q.seq = d.seq "
                "WHERE d.grp = 'bench' ORDER BY d.seq LIMIT ?",
                (PREFETCH,),
            )
            batch = await cursor.fetchall()
            for _seq, headers, body in batch:
                decode(json.loads(headers), body)
            await db.executemany("DELETE FROM d WHERE seq = ?", [(r[0],) for r in batch])
            await db.execute("COMMIT")
            consumed += len(batch)
        consume_rate = count / (time.perf_counter() - started)
    return insert_rate, consume_rate


async def postgres_baseline(dsn: str, count: int) -> tuple[float, float]:
    """(insert msg/s, claim+delete msg/s) with asyncpg alone."""
    messages = _messages(count)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "CREATE TABLE q (seq bigserial PRIMARY KEY, headers jsonb NOT NULL,"
            " body bytea NOT NULL);"
            "CREATE TABLE d (seq bigint, grp text, PRIMARY KEY (seq, grp))"
        )
        started = time.perf_counter()
        for start in range(0, count, BATCH):
            chunk = [encode(m) for m in messages[start : start + BATCH]]
            async with conn.transaction():
                seqs = await conn.fetch(
                    "INSERT INTO q (headers, body) SELECT * FROM unnest($1::jsonb[], $2::bytea[]) "
                    "RETURNING seq",
                    [json.dumps(h) for h, _ in chunk],
                    [b for _, b in chunk],
                )
                await conn.executemany(
                    "INSERT INTO d VALUES ($1, 'bench')", [(r["seq"],) for r in seqs]
                )
        insert_rate = count / (time.perf_counter() - started)
        started = time.perf_counter()
        consumed = 0
        while consumed < count:
            async with conn.transaction():
                batch = await conn.fetch(
                    "SELECT d.seq, q.headers, q.body FROM d JOIN q ON q.seq = d.seq "
                    "WHERE d.grp = 'bench' ORDER BY d.seq LIMIT $1 FOR UPDATE OF d SKIP LOCKED",
                    PREFETCH,
                )
                for row in batch:
                    decode(json.loads(row["headers"]), row["body"])
                await conn.execute(
                    "DELETE FROM d WHERE grp = 'bench' AND seq = ANY($1::bigint[])",
                    [r["seq"] for r in batch],
                )
            consumed += len(batch)
        consume_rate = count / (time.perf_counter() - started)
    finally:
        await conn.close()
    return insert_rate, consume_rate


_CLAIM_BACKLOGS = {
    "no keys": ("NULL", False),
    "100 keys": ("'k' || (g % 100)", False),
    "one key": ("'only'", False),
    "one key, its first delivery held by another consumer": ("'only'", True),
}
_FILL_MESSAGES = """
INSERT INTO accord_queue (seq, channel, message_id, type, key, headers, body, created_at)
SELECT g, 'bench', 'm' || g, 'bench.tick', {key}, '{{}}'::jsonb, '\\x7b7d'::bytea, now()
FROM generate_series(1, $1) g"""
_FILL_DELIVERIES = """
INSERT INTO accord_queue_deliveries (seq, group_name, channel, key, attempts, available_at)
SELECT g, 'bench', 'bench', {key}, 0, now() - interval '1 minute' FROM generate_series(1, $1) g"""
_BARE_CLAIM = """SELECT seq FROM accord_queue_deliveries WHERE channel = 'bench'
AND group_name = 'bench' ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED"""


async def claim_cost(rows: int, limit: int, repeats: int) -> list[dict[str, Any]]:
    """Median ms of one claim of ``limit`` over ``rows`` deliveries, per backlog."""
    results = []
    for name, (key, first_held) in _CLAIM_BACKLOGS.items():
        for analyzed in (False, True):
            async with ScratchDatabase("bench_sqlq_claim") as scratch:
                async with Database(scratch.url) as database:
                    await database.upgrade()
                conn = await asyncpg.connect(scratch.dsn)
                await conn.execute(
                    "ALTER TABLE accord_queue_deliveries SET (autovacuum_enabled = false)"
                )
                await conn.execute(_FILL_MESSAGES.format(key=key), rows)
                await conn.execute(_FILL_DELIVERIES.format(key=key), rows)
                if first_held:
                    await conn.execute(
                        "UPDATE accord_queue_deliveries SET locked_by = 'other', "
                        "locked_until = now() + interval '1 hour' WHERE seq = 1"
                    )
                if analyzed:
                    await conn.execute("VACUUM ANALYZE")
                times: dict[str, list[float]] = {"accord": [], "bare": []}
                claimed: dict[str, int] = {}
                async with Database(scratch.url) as database:
                    for _ in range(repeats):
                        async with database.engine.connect() as sa_conn:
                            started = time.perf_counter()
                            tx = await sa_conn.begin()
                            now = datetime.now(UTC)
                            got: Any = await queries.claim(
                                sa_conn,
                                "bench",
                                "bench",
                                "me",
                                limit,
                                now,
                                now + timedelta(seconds=30),
                                is_postgres=True,
                            )
                            await tx.rollback()
                            times["accord"].append(time.perf_counter() - started)
                            claimed["accord"] = len(got)
                        started = time.perf_counter()
                        async with conn.transaction():
                            got = await conn.fetch(_BARE_CLAIM, limit)
                            claimed["bare"] = len(got)
                        times["bare"].append(time.perf_counter() - started)
                await conn.close()
                accord_ms = statistics.median(times["accord"]) * 1000
                bare_ms = statistics.median(times["bare"]) * 1000
                results.append(
                    {
                        "benchmark": f"claim of {limit} over {rows:,} deliveries, {name}, "
                        f"{'analyzed' if analyzed else 'no statistics yet'} (ms; claimed "
                        f"{claimed['accord']} / bare {claimed['bare']})",
                        "accord": accord_ms,
                        "baseline": bare_ms,
                        "ratio": bare_ms / accord_ms,
                        "unit": "ms",
                    }
                )
                console.print(results[-1])
    return results


def _rows(backend: str, accord: tuple[float, float], base: tuple[float, float]) -> list[Any]:
    return [
        {
            "benchmark": f"{backend} {what}",
            "accord": a,
            "baseline": b,
            "ratio": a / b if b else None,
            "unit": "msg/s",
        }
        for what, a, b in (("publish", accord[0], base[0]), ("consume", accord[1], base[1]))
    ]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--only", nargs="*", default=["sqlite", "postgres", "claim"])
    args = parser.parse_args()
    count = 2_000 if args.quick else 20_000
    rows: list[dict[str, Any]] = []
    if "sqlite" in args.only:
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite+aiosqlite:///{tmp}/accord.db"
            async with Database(url) as database:
                await database.upgrade()
            accord = await accord_run(url, count)
            base = await sqlite_baseline(Path(tmp) / "baseline.db", count)
        rows += _rows("sqlite", accord, base)
        console.print(rows[-2:])
    if "postgres" in args.only:
        async with ScratchDatabase("bench_sqlq") as scratch:
            async with Database(scratch.url) as database:
                await database.upgrade()
            accord = await accord_run(scratch.url, count)
            base = await postgres_baseline(scratch.dsn, count)
        rows += _rows("postgres", accord, base)
        console.print(rows[-2:])
    if "claim" in args.only:
        rows += await claim_cost(count, 256, 3 if args.quick else 7)
    report(
        "sql_transport",
        f"SQL transport, {count:,} messages ({os.cpu_count()} cores)",
        rows,
        ["benchmark", "accord", "baseline", "ratio", "unit"],
    )


if __name__ == "__main__":
    asyncio.run(main())
