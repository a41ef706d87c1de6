"""What the engines answer to bodies, headers and parameters they cannot take: every
refusal is a 422 of one shape (``detail`` a sentence, ``errors`` the list) that says
what is wrong; authentication hides no 404 or 405; a client can read its own match
on the leaderboard. The engines' apps in process, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from accord.db import Database
from accord.eventstore import EventStore
from accord.projections import ProjectionRunner
from accord.testing import wait_for
from tests.tournament.conftest import AUTH, engines
from tournament.contracts import MatchRecorded
from tournament.match_engine.tables import tournaments
from tournament.score_engine import ledger
from tournament.score_engine.leaderboard import leaderboard

JSON = {**AUTH, "content-type": "application/json"}


def assert_422(r: httpx.Response, *words: str) -> dict[str, Any]:
    """A 422 in the shape of every other: ``detail`` the ``errors`` joined, naming ``words``."""
    assert r.status_code == 422, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"detail", "errors"}, body
    assert body["detail"] == "; ".join(body["errors"]), body
    for word in words:
        assert word in body["detail"], (word, body)
    return dict(body)


async def test_a_body_that_is_not_utf8_or_nests_too_deeply_gets_422(
    db_url: str, tmp_path: Path
) -> None:
    """FastAPI answers ``400 There was an error parsing the body`` to these (its JSON
    parser raises UnicodeDecodeError / RecursionError, not JSONDecodeError)."""
    async with engines(tmp_path, match_db=db_url) as (match, score, _config):
        r = await match.post(
            "/tournaments",
            content=b'{"name": "caf\xe9", "participants": ["ann", "ben"]}',
            headers=JSON,
        )
        assert_422(r, "not valid JSON", "UTF-8", "0xe9")
        deep = b'{"name": ' + b"[" * 5000 + b"]" * 5000 + b', "participants": ["ann", "ben"]}'
        assert_422(await match.post("/tournaments", content=deep, headers=JSON), "nest")
        r = await score.post("/bans", content=b'{"participant": "\xff"}', headers=JSON)
        assert_422(r, "UTF-8")
        # Unchanged: JSON that stops short, and a body that parses.
        assert_422(await match.post("/tournaments", content=b'{"name', headers=JSON), "JSON")
        ok = await match.post(
            "/tournaments", json={"name": "café", "participants": ["ann", "ben"]}, headers=AUTH
        )
        assert ok.status_code == 202, ok.text


async def test_names_that_do_not_show_as_themselves_are_refused(
    db_url: str, tmp_path: Path
) -> None:
    """Before the fix a name of spaces only, or holding an ANSI escape or a right-to-left
    override, was stored as given."""
    async with engines(tmp_path, match_db=db_url) as (match, _score, _config):
        for name, words in [
            ("   ", "visible character"),
            ("\u3000\u200b", "visible character"),
            ("\x1b[31mred cup", "U+001B"),
            ("cup\nnext line", "U+000A"),
            ("tab\there", "U+0009"),
            ("cup\u2028", "U+2028"),
            ("\u202egnp.exe", "U+202E"),
            ("a\u2066b", "U+2066"),
        ]:
            r = await match.post(
                "/tournaments", json={"name": name, "participants": ["ann", "ben"]}, headers=AUTH
            )
            assert_422(r, "name: ", words)
        r = await match.post(
            "/tournaments",
            json={"name": "cup", "participants": ["ann", "b\u202een"]},
            headers=AUTH,
        )
        assert_422(r, "not a valid participant id")
        for name in ("Coupe d'été 2024", "杯", "👨‍👩‍👧 family cup", " padded "):
            r = await match.post(
                "/tournaments", json={"name": name, "participants": ["ann", "ben"]}, headers=AUTH
            )
            assert r.status_code == 202, (name, r.text)
    async with Database(db_url) as db, db.connect() as conn:
        stored = set(await conn.scalars(sa.select(tournaments.c.name)))
    assert stored == {"Coupe d'été 2024", "杯", "👨‍👩‍👧 family cup", " padded "}


async def test_players_who_are_not_participants_get_a_422_like_the_others(
    db_url: str, tmp_path: Path
) -> None:
    """Before the fix: ``{"detail": "'dave', 'carol' are not a participant of ..."}``,
    with no ``errors`` list."""
    async with engines(tmp_path, match_db=db_url) as (match, _score, _config):
        r = await match.post(
            "/tournaments", json={"name": "cup", "participants": ["ann", "ben"]}, headers=AUTH
        )
        tid = r.json()["id"]
        async with Database(db_url) as db, db.transaction() as conn:
            await conn.execute(
                tournaments.update().where(tournaments.c.id == tid).values(status="ACTIVE")
            )
        url = f"/tournaments/{tid}/matches"
        r = await match.post(
            url, json={"home": "dave", "away": "carol", "winner": None}, headers=AUTH
        )
        body = assert_422(r)
        assert body["errors"] == [
            f"home: 'dave' is not a participant of tournament {tid}",
            f"away: 'carol' is not a participant of tournament {tid}",
        ]
        r = await match.post(
            url, json={"home": "ann", "away": "carol", "winner": None}, headers=AUTH
        )
        assert assert_422(r)["errors"] == [
            f"away: 'carol' is not a participant of tournament {tid}"
        ]


async def opened(config: Any, tournament_id: str, players: list[str]) -> None:
    """Open the players' ledgers."""
    async with Database(config.score_db) as db, db.transaction() as conn:
        await ledger.initialise(conn, EventStore(db), tournament_id, players)


async def project(runner: ProjectionRunner, upto: int = 0) -> None:
    """Apply the events up to ``upto`` to the leaderboard, as the projector process would
    (one runner per test: a second one would wait for the first one's lease). On a busy
    PostgreSQL server the gap-safe reader may see them only a little later."""

    async def caught_up() -> bool:
        await runner.run_once()
        [status] = await runner.status()
        return status.position >= upto

    await wait_for(caught_up, 20.0, interval=0.05)


async def test_as_of_says_what_is_really_wrong(db_url: str, tmp_path: Path) -> None:
    """Before the fix every one of these was "is not an ISO-8601 date-time", also the
    valid ones that overflow in UTC, with no word about the '+' a URL turns into a space."""
    async with engines(tmp_path, score_db=db_url) as (_match, score, config):
        await opened(config, "t-1", ["ann", "ben"])
        url = "/tournaments/t-1/leaderboard"
        for moment in ("9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+05:00"):
            body = assert_422(await score.get(url, params={"as_of": moment}), "as_of")
            assert "valid date-time" in body["detail"] and "UTC" in body["detail"], body
            assert "not an ISO-8601" not in body["detail"], body
        # An unencoded '+' arrives as a space.
        r = await score.get(f"{url}?as_of=2024-05-01T12:00:00+01:00")
        assert_422(r, "as_of", "%2B")
        body = assert_422(await score.get(url, params={"as_of": "last tuesday"}), "ISO-8601")
        assert "%2B" not in body["detail"]
        ok = await score.get(url, params={"as_of": "2024-05-01T12:00:00+01:00"})
        assert ok.status_code == 200, ok.text


async def test_leaderboard_parameters_that_contradict_each_other_get_422(
    db_url: str, tmp_path: Path
) -> None:
    """Before the fix ``as_of`` silently dropped ``min_position`` and ``wait``, and
    ``wait`` alone was ignored: 200 every time."""
    async with engines(tmp_path, score_db=db_url) as (_match, score, config):
        await opened(config, "t-1", ["ann", "ben"])
        async with Database(config.score_db) as db:
            await project(ProjectionRunner(db, [leaderboard], store=EventStore(db)))
        url = "/tournaments/t-1/leaderboard"
        as_of = "2030-01-01T00:00:00Z"
        for params, words in [
            ({"as_of": as_of, "min_position": 5}, ["min_position cannot be combined with as_of"]),
            ({"as_of": as_of, "wait": 3}, ["wait cannot be combined with as_of"]),
            ({"as_of": as_of, "match_id": "m-1"}, ["match_id cannot be combined with as_of"]),
            ({"wait": 3}, ["wait applies only with min_position or match_id"]),
        ]:
            assert_422(await score.get(url, params=params), *words)
        body = assert_422(
            await score.get(url, params={"as_of": as_of, "min_position": 1, "wait": 1})
        )
        assert len(body["errors"]) == 2
        r = await score.get(url, params={"wait": 0, "min_position": 0})
        assert r.status_code == 422 and "wait" in r.json()["detail"]
        for params in ({"as_of": as_of}, {"min_position": 0}, {"min_position": 0, "wait": 1}):
            r = await score.get(url, params=params)
            assert r.status_code == 200, (params, r.text)


async def test_the_leaderboard_waits_for_a_match_given_by_its_id(
    db_url: str, tmp_path: Path
) -> None:
    """Read-your-writes with what ``POST /matches`` answers (``id``): before, only a
    ledger position could be waited for, and no answer of the API gave one."""
    async with engines(tmp_path, score_db=db_url) as (_match, score, config):
        await opened(config, "t-1", ["ann", "ben"])
        await opened(config, "t-2", ["ann", "ben"])
        async with Database(config.score_db) as db:
            store = EventStore(db)
            runner = ProjectionRunner(db, [leaderboard], store=store)

            async def applied_later(match_id: str, tournament_id: str) -> None:
                await asyncio.sleep(0.3)  # as the Score Engine's consumer, then projector would
                async with db.transaction() as conn:
                    positions = await ledger.award(
                        conn,
                        store,
                        MatchRecorded(
                            match_id=match_id,
                            tournament_id=tournament_id,
                            home="ann",
                            away="ben",
                            winner="ben",
                            played_at=datetime.now(UTC).isoformat(),
                        ),
                    )
                await project(runner, max(positions))

            url = "/tournaments/t-1/leaderboard"
            later = asyncio.create_task(applied_later("m-1", "t-1"))
            r = await score.get(url, params={"match_id": "m-1", "wait": 25})
            await later
            assert r.status_code == 200, r.text
            points = {e["participant"]: e["points"] for e in r.json()["entries"]}
            assert points == {"ben": 3, "ann": 0}
            await applied_later("m-2", "t-2")
            assert_422(await score.get(url, params={"match_id": "m-2"}), "t-2", "not t-1")
            r = await score.get(url, params={"match_id": "m-unknown", "wait": 0.2})
            assert r.status_code == 504 and "m-unknown" in r.json()["detail"], r.text


async def test_authentication_hides_no_404_or_405(tmp_path: Path) -> None:
    """Before the fix every POST/PUT/PATCH/DELETE without a token got 401, also to a path
    or method that does not exist."""
    async with engines(tmp_path) as (match, score, _config):
        assert (await match.post("/nowhere", json={})).status_code == 404
        assert (await match.delete("/tournaments/x")).status_code == 405
        assert (await match.put("/tournaments", json={})).status_code == 405
        assert (await score.patch("/bans", json={})).status_code == 405
        assert (await score.post("/tournaments/x/leaderboard")).status_code == 405
        # What exists still needs the token, before anything is read.
        r = await match.post("/tournaments", content=b"{not json", headers={"x": "y"})
        assert r.status_code == 401
        assert (await score.delete("/bans/ann")).status_code == 401
        assert (await match.post("/tournaments/x/matches", json={})).status_code == 401
