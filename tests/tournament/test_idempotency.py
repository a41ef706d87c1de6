"""``POST /tournaments`` with an ``Idempotency-Key``: a retry, even one sent while the
first request still runs, gets the first answer and starts no second saga; the key
with another body is refused. The Match Engine's app in process, no worker, on SQLite
and PostgreSQL, in both saga styles."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import sqlalchemy as sa

from accord.db import Database
from accord.db.schema import outbox
from tests.tournament.conftest import AUTH, engines
from tournament.match_engine.tables import tournaments

BODY = {"name": "Spring Cup", "participants": ["ann", "ben", "cat"]}


async def written(db_url: str) -> tuple[int, list[str]]:
    """How many tournaments, and the types of the outbox's messages."""
    async with Database(db_url) as db, db.connect() as conn:
        count = await conn.scalar(sa.select(sa.func.count()).select_from(tournaments))
        types = list(await conn.scalars(sa.select(outbox.c.event_type)))
    return int(count or 0), types


@pytest.mark.parametrize("style", ["orchestration", "choreography"])
async def test_a_retry_with_the_same_key_gets_the_first_answer_and_starts_nothing(
    db_url: str, tmp_path: Path, style: str
) -> None:
    """Before the fix the header was ignored: every retry made one more tournament."""
    async with engines(tmp_path, match_db=db_url, saga_style=style) as (match, _score, _c):
        keyed = {**AUTH, "Idempotency-Key": "order-42"}
        first = await match.post("/tournaments", json=BODY, headers=keyed)
        assert first.status_code == 202, first.text
        assert "idempotent-replayed" not in first.headers
        # The same body written otherwise (order of fields, spacing) is the same request.
        again = await match.post(
            "/tournaments",
            content=json.dumps(dict(reversed(BODY.items())), indent=2).encode(),
            headers={**keyed, "content-type": "application/json"},
        )
        assert (again.status_code, again.json()) == (202, first.json())
        assert again.headers["idempotent-replayed"] == "true"
        count, types = await written(db_url)
        assert count == 1 and len(types) == 1, (count, types)

        other = await match.post("/tournaments", json={**BODY, "name": "Autumn Cup"}, headers=keyed)
        assert other.status_code == 422, other.text
        assert set(other.json()) == {"detail", "errors"}
        assert "Idempotency-Key 'order-42'" in other.json()["detail"]
        assert "different body" in other.json()["detail"]
        assert first.json()["id"] in other.json()["detail"]

        second = await match.post(
            "/tournaments", json=BODY, headers={**AUTH, "Idempotency-Key": "order-43"}
        )
        assert second.status_code == 202 and second.json()["id"] != first.json()["id"]
        assert (await match.get(f"/tournaments/{first.json()['id']}")).json()["name"] == BODY[
            "name"
        ]
        count, types = await written(db_url)
        assert count == 2 and len(types) == 2, (count, types)

        # Without the key nothing changes: each request is a new tournament.
        for _ in range(2):
            assert (await match.post("/tournaments", json=BODY, headers=AUTH)).status_code == 202
        assert (await written(db_url))[0] == 4

        too_long = await match.post(
            "/tournaments", json=BODY, headers={**AUTH, "Idempotency-Key": "k" * 256}
        )
        assert too_long.status_code == 422 and "idempotency-key" in too_long.text.lower()


async def test_concurrent_requests_with_one_key_make_one_tournament(
    db_url: str, tmp_path: Path
) -> None:
    """Twenty identical requests at once (a client retrying on a timeout while the first
    still runs): one tournament, one saga, twenty identical answers."""
    async with engines(tmp_path, match_db=db_url) as (match, _score, _config):
        keyed = {**AUTH, "Idempotency-Key": "burst"}
        answers = await asyncio.gather(
            *(match.post("/tournaments", json=BODY, headers=keyed) for _ in range(20))
        )
        assert [r.status_code for r in answers] == [202] * 20, [r.text for r in answers]
        assert len({json.dumps(r.json(), sort_keys=True) for r in answers}) == 1
        replayed = [r.headers.get("idempotent-replayed") for r in answers]
        assert replayed.count(None) == 1 and replayed.count("true") == 19, replayed
        saga_id = answers[0].json()["saga_id"]
        saga = (await match.get(f"/sagas/{saga_id}")).json()
        assert saga["status"] == "RUNNING", saga
    assert await written(db_url) == (1, ["scores.initialise"])
