"""The Match Engine's API in process (no workers running), on SQLite and PostgreSQL:
a PENDING tournament is a semantic lock, and what the saga start wrote."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import sqlalchemy as sa

from accord.db import Database
from accord.db.schema import outbox
from tournament.config import StackConfig
from tournament.match_engine.app import create_app
from tournament.match_engine.tables import tournaments
from tournament.stack import prepare

TOKEN = "secret-token"
auth = {"Authorization": f"Bearer {TOKEN}"}


@contextlib.asynccontextmanager
async def match_api(db_url: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the Match Engine's app in process on ``db_url``; no worker runs."""
    config = StackConfig(
        data_dir=str(tmp_path),
        match_db=db_url,
        score_db=f"sqlite+aiosqlite:///{tmp_path / 'score.db'}",
        api_token=TOKEN,
    )
    await prepare(config.resolved())
    transport = httpx.ASGITransport(app=create_app(config))
    async with httpx.AsyncClient(transport=transport, base_url="http://match") as client:
        yield client


async def test_a_pending_tournament_refuses_matches(db_url: str, tmp_path: Path) -> None:
    async with match_api(db_url, tmp_path) as client:
        r = await client.post(
            "/tournaments", json={"name": "cup", "participants": ["ann", "ben"]}, headers=auth
        )
        assert r.status_code == 202
        created = r.json()
        # No worker runs: the saga waits for the Score Engine, the tournament stays PENDING.
        t = (await client.get(f"/tournaments/{created['id']}")).json()
        assert t["status"] == "PENDING"
        r = await client.post(
            f"/tournaments/{created['id']}/matches",
            json={"home": "ann", "away": "ben", "winner": None},
            headers=auth,
        )
        assert r.status_code == 409
        assert "PENDING" in r.json()["detail"] and "ACTIVE" in r.json()["detail"]
        saga = (await client.get(f"/sagas/{created['saga_id']}")).json()
        assert saga["status"] == "RUNNING"
        assert [s["event"] for s in saga["steps"]][-1] == "sent"
    async with Database(db_url) as db, db.connect() as conn:
        # The record, the saga and its command committed together; no match was written.
        assert await conn.scalar(sa.select(sa.func.count()).select_from(tournaments)) == 1
        types = [r[0] for r in await conn.execute(sa.select(outbox.c.event_type))]
        assert types == ["scores.initialise"]


async def test_a_get_with_wait_answers_when_the_tournament_settles(
    db_url: str, tmp_path: Path
) -> None:
    async with match_api(db_url, tmp_path) as client, Database(db_url) as db:
        ids = []
        for name in ("cup", "shield"):
            r = await client.post(
                "/tournaments", json={"name": name, "participants": ["ann", "ben"]}, headers=auth
            )
            ids.append(r.json()["id"])
        cup, shield = ids

        # No worker runs: a wait that runs out answers PENDING, after the wait.
        started = time.perf_counter()
        r = await client.get(f"/tournaments/{shield}", params={"wait": 0.3})
        assert r.status_code == 200 and r.json()["status"] == "PENDING"
        assert time.perf_counter() - started >= 0.3

        async def settle_cup_soon() -> None:
            await asyncio.sleep(0.3)  # as the saga's last step would
            async with db.transaction() as conn:
                await conn.execute(
                    tournaments.update().where(tournaments.c.id == cup).values(status="ACTIVE")
                )

        # Two waiters on the cup, one on the shield: the cup's answer as soon as it
        # settles (well within its 20 s), the shield's when its own wait runs out.
        started = time.perf_counter()
        settling = asyncio.create_task(settle_cup_soon())
        first, second, other = await asyncio.gather(
            client.get(f"/tournaments/{cup}", params={"wait": 20}),
            client.get(f"/tournaments/{cup}", params={"wait": 20}),
            client.get(f"/tournaments/{shield}", params={"wait": 1}),
        )
        await settling
        assert first.json()["status"] == second.json()["status"] == "ACTIVE"
        assert other.json()["status"] == "PENDING"
        assert time.perf_counter() - started < 5

        for bad in ("-1", "31", "soon"):
            r = await client.get(f"/tournaments/{cup}", params={"wait": bad})
            assert r.status_code == 422, bad
            assert "wait" in r.text
