"""The score ledger and the leaderboard projection on SQLite and PostgreSQL: a ban refuses
the whole tournament (nothing written), revocation closes every ledger and empties the
leaderboard, points fold the same from the events as in the projection."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from accord.db import Database
from accord.eventstore import EventStore
from accord.projections import ProjectionRunner
from accord.sagas import StepFailed
from tournament.contracts import MatchRecorded
from tournament.score_engine import ledger
from tournament.score_engine.leaderboard import make_leaderboard, read_leaderboard
from tournament.score_engine.tables import bans, ledgers, metadata


async def setup(database: Database) -> EventStore:
    await database.upgrade()
    async with database.transaction() as conn:
        await conn.run_sync(metadata.create_all)
    return EventStore(database)


def match(home: str, away: str, winner: str | None, n: int) -> MatchRecorded:
    return MatchRecorded(
        match_id=f"m{n}",
        tournament_id="t1",
        home=home,
        away=away,
        winner=winner,
        played_at=datetime.now(UTC).isoformat(),
    )


async def test_a_ban_refuses_every_ledger(database: Database) -> None:
    store = await setup(database)
    async with database.transaction() as conn:
        await conn.execute(bans.insert().values(participant="eve", banned_at=datetime.now(UTC)))
    with pytest.raises(StepFailed, match="'eve' is banned"):
        async with database.transaction() as conn:
            await ledger.initialise(conn, store, "t1", ["ann", "eve"])
    assert await store.read_stream(ledger.stream_id("t1", "ann")) == []
    async with database.connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(ledgers)) == 0


async def test_points_revocation_and_the_projection(database: Database) -> None:
    store = await setup(database)
    board = make_leaderboard()
    runner = ProjectionRunner(database, [board], store=store)
    async with database.transaction() as conn:
        assert await ledger.initialise(conn, store, "t1", ["ann", "ben", "cat"]) == 3
        assert await ledger.initialise(conn, store, "t1", ["ann", "ben", "cat"]) == 0
    async with database.transaction() as conn:
        await ledger.award(conn, store, match("ann", "ben", "ann", 1))
        await ledger.award(conn, store, match("ben", "cat", None, 2))
    while await runner.run_once():
        pass
    async with database.connect() as conn:
        entries = await read_leaderboard(conn, "t1")
    assert [(e["participant"], e["points"], e["played"], e["rank"]) for e in entries] == [
        ("ann", 3, 1, 1),
        ("ben", 1, 2, 2),
        ("cat", 1, 1, 2),
    ]
    folded = ledger.fold("ben", await store.read_stream(ledger.stream_id("t1", "ben")))
    assert folded is not None and (folded.points, folded.played) == (1, 2)
    with pytest.raises(ledger.LedgerMissing, match="'zed'"):
        async with database.transaction() as conn:
            await ledger.award(conn, store, match("ann", "zed", None, 3))
    async with database.transaction() as conn:
        assert await ledger.revoke(conn, store, "t1", "cancelled") == 3
        assert await ledger.revoke(conn, store, "t1", "cancelled") == 0
    while await runner.run_once():
        pass
    async with database.connect() as conn:
        assert await read_leaderboard(conn, "t1") == []
    events = await store.read_stream(ledger.stream_id("t1", "ann"))
    assert [e.type for e in events] == ["ScoresInitialized", "PointsAwarded", "ScoresRevoked"]
    with pytest.raises(ledger.LedgerMissing):
        async with database.transaction() as conn:
            await ledger.award(conn, store, match("ann", "ben", None, 4))
