"""Projection catch-up into a PostgreSQL read model: Accord's runner vs bare asyncpg, same run.

    .venv/bin/python -m benchmarks.projections [--quick] [--events N] [--batch N]

Loads N ``score.changed`` events (200-byte JSON payload, 1,000 players) into a
scratch PostgreSQL database, then times catching a projection up from position
0: per event, one upsert of the player's totals (points += , games += 1). Accord
runs its :class:`ProjectionRunner` (gap-safe ``read_all``, deferred upserts as
one executemany per batch, checkpoint in the same transaction). The baseline
is hand-written asyncpg doing the same work without any of the guarantees:
``SELECT ... WHERE position > $1 ORDER BY position LIMIT n``, ``json.loads``,
``executemany`` of the same upsert, a checkpoint update, one commit per batch.
Goal: Accord >= 50,000 events/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import asyncpg
import sqlalchemy as sa

from accord.db import Database
from accord.eventstore import EventStore, NewEvent, RecordedEvent
from accord.projections import Projection, ProjectionContext, ProjectionRunner
from benchmarks._common import ScratchDatabase, console, report

PLAYERS = 1000
GOAL = 50_000.0


def make_projection(batch: int) -> Projection:
    """The benchmark's projection: totals per player."""
    p = Projection("bench_totals", batch_size=batch)
    p.table(
        "totals",
        sa.Column("player", sa.String(50), primary_key=True),
        sa.Column("points", sa.BigInteger, nullable=False),
        sa.Column("games", sa.BigInteger, nullable=False),
    )

    @p.on("score.changed")
    def changed(ctx: ProjectionContext, event: RecordedEvent) -> None:
        data = event.data
        ctx.upsert(
            "totals",
            {"player": data["player"], "points": data["points"], "games": 1},
            key=["player"],
            add=["points", "games"],
        )

    return p


async def load(url: str, n: int) -> None:
    """Append ``n`` events, 500 per append, from 8 concurrent writers."""
    db = Database(url)
    await db.upgrade()
    store = EventStore(db)
    pad = "x" * 140

    async def writer(w: int) -> None:
        for base in range(w * 500, n, 8 * 500):
            events = [
                NewEvent(
                    "score.changed",
                    {"player": f"player-{i % PLAYERS}", "points": i % 7, "pad": pad},
                )
                for i in range(base, min(base + 500, n))
            ]
            await store.append(f"match-{base}", events)

    await asyncio.gather(*(writer(w) for w in range(8)))
    await store.close()
    await db.dispose()


async def accord_catch_up(url: str, n: int, batch: int) -> tuple[float, dict[str, Any]]:
    """Seconds for the runner to apply all ``n`` events, and the resulting totals."""
    db = Database(url)
    store = EventStore(db)
    projection = make_projection(batch)
    runner = ProjectionRunner(db, [projection], store=store)
    head = await store.head()
    start = time.perf_counter()
    await runner.start()
    await runner.wait_until(head, timeout=600)
    seconds = time.perf_counter() - start
    [status] = await runner.status()
    await runner.stop()
    assert status.handled == n, f"applied {status.handled} of {n}"
    async with db.connect() as conn:
        table = (await projection.live_tables(conn))["totals"]
        totals = {r.player: (r.points, r.games) for r in await conn.execute(sa.select(table))}
    await store.close()
    await db.dispose()
    return seconds, totals


UPSERT = """
INSERT INTO bare_totals (player, points, games) VALUES ($1, $2, 1)
ON CONFLICT (player) DO UPDATE SET points = bare_totals.points + excluded.points,
                                   games = bare_totals.games + 1
"""


async def bare_catch_up(dsn: str, n: int, batch: int) -> tuple[float, dict[str, Any]]:
    """The same catch-up in hand-written asyncpg (no gap safety, no leases, no upcasting)."""
    conn = await asyncpg.connect(dsn)
    await conn.execute(
        "CREATE TABLE bare_totals (player varchar(50) PRIMARY KEY, points bigint NOT NULL, "
        "games bigint NOT NULL);"
        "CREATE TABLE bare_checkpoint (name text PRIMARY KEY, position bigint NOT NULL);"
        "INSERT INTO bare_checkpoint VALUES ('bare', 0)"
    )
    select = await conn.prepare(
        "SELECT position, type, data FROM accord_events WHERE position > $1 "
        "ORDER BY position LIMIT $2"
    )
    start = time.perf_counter()
    position, applied = 0, 0
    while True:
        rows = await select.fetch(position, batch)
        if not rows:
            break
        params = []
        for row in rows:
            if row["type"] == "score.changed":
                data = json.loads(row["data"])
                params.append((data["player"], data["points"]))
        position = rows[-1]["position"]
        async with conn.transaction():
            await conn.executemany(UPSERT, params)
            await conn.execute(
                "UPDATE bare_checkpoint SET position = $1 WHERE name = 'bare'", position
            )
        applied += len(rows)
    seconds = time.perf_counter() - start
    assert applied == n
    totals = {
        r["player"]: (r["points"], r["games"])
        for r in await conn.fetch("SELECT * FROM bare_totals")
    }
    await conn.close()
    return seconds, totals


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="20,000 events instead of 200,000")
    parser.add_argument("--events", type=int, default=None)
    parser.add_argument("--batch", type=int, default=5000)
    args = parser.parse_args()
    n = args.events or (20_000 if args.quick else 200_000)
    rows = []
    async with ScratchDatabase("bench_proj") as scratch:
        console.print(f"loading {n:,} events into {scratch.name}...")
        await load(scratch.url, n)
        # Alternate: bare, Accord, bare, Accord (fresh read model each round); best of each.
        rounds = 1 if args.quick else 2
        best: dict[str, float] = {}
        for r in range(rounds):
            bare_s, bare_totals = await bare_catch_up(scratch.dsn, n, args.batch)
            accord_s, accord_totals = await accord_catch_up(scratch.url, n, args.batch)
            assert accord_totals == bare_totals, "the two read models differ"
            best["bare"] = min(best.get("bare", bare_s), bare_s)
            best["accord"] = min(best.get("accord", accord_s), accord_s)
            if r + 1 < rounds:
                await _reset(scratch.dsn)
        accord_rate, bare_rate = n / best["accord"], n / best["bare"]
        rows = [
            {
                "benchmark": "catch-up, bare asyncpg",
                "events": n,
                "batch": args.batch,
                "seconds": best["bare"],
                "events/s": bare_rate,
            },
            {
                "benchmark": "catch-up, Accord ProjectionRunner",
                "events": n,
                "batch": args.batch,
                "seconds": best["accord"],
                "events/s": accord_rate,
                "vs bare": accord_rate / bare_rate,
                "goal": GOAL,
                "met": accord_rate >= GOAL,
            },
        ]
    report(
        "projections",
        "Projection catch-up into a PostgreSQL read model",
        rows,
        ["benchmark", "events", "batch", "seconds", "events/s", "vs bare", "goal", "met"],
    )


async def _reset(dsn: str) -> None:
    """Drop both read models and the projection's bookkeeping for another round."""
    conn = await asyncpg.connect(dsn)
    await conn.execute(
        "DROP TABLE bare_totals; DROP TABLE bare_checkpoint;"
        "DROP TABLE IF EXISTS bench_totals_totals_v1;"
        "DELETE FROM accord_projection_checkpoints; DELETE FROM accord_projection_versions;"
        "DELETE FROM accord_projection_leases"
    )
    await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
