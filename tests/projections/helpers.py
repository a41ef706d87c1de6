"""Helpers shared by the projection tests: appending score events, reading the read model."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from accord.db import Database
from accord.eventstore import EventStore, NewEvent
from accord.projections import Projection
from accord.testing import wait_for


async def append_scores(
    store: EventStore, n: int, *, stream: str = "s", start: int = 0, per_append: int = 10
) -> int:
    """Append ``n`` score.changed events (points = i % 7, player p<i % 13>); return the last
    position."""
    last = 0
    for base in range(start, start + n, per_append):
        events = [
            NewEvent("score.changed", {"player": f"p{i % 13}", "points": i % 7})
            for i in range(base, min(base + per_append, start + n))
        ]
        result = await store.append(f"{stream}-{base % 5}", events)
        last = result.position
    return last


def expected_totals(n: int, start: int = 0) -> dict[str, tuple[int, int]]:
    """The totals ``append_scores(n, start=start)`` should produce."""
    out: dict[str, tuple[int, int]] = {}
    for i in range(start, start + n):
        points, games = out.get(f"p{i % 13}", (0, 0))
        out[f"p{i % 13}"] = (points + i % 7, games + 1)
    return out


async def read_model(database: Database, projection: Projection) -> dict[str, Any]:
    """The live read model: totals and the applied positions (the log, duplicates kept)."""
    async with database.connect() as conn:
        tables = await projection.live_tables(conn)
        totals = {
            r.player: (r.points, r.games) for r in await conn.execute(sa.select(tables["totals"]))
        }
        log = [r[0] for r in await conn.execute(sa.select(tables["log"].c.position))]
    return {"totals": totals, "log": sorted(log)}


async def visible(store: EventStore, position: int) -> None:
    """Wait until ``position`` is visible to readers: on PostgreSQL a transaction open
    anywhere on the server (other tests) holds the gap-safe head back for a moment."""

    async def check() -> bool:
        return await store.head() >= position

    await wait_for(check, 20)
