"""The tournament system on the embedded default (SQLite files, SQL transport), end to end
over HTTP with real processes: orchestrated saga, ledger, leaderboard, bad requests."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from accord.testing import wait_for
from tests.tournament.conftest import Stack, running

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(module_tmp: Path) -> Iterator[Stack]:
    with running(module_tmp / "data") as s:
        yield s


def names(n: int) -> list[str]:
    tag = uuid.uuid4().hex[:6]
    return [f"p{i}-{tag}" for i in range(n)]


async def test_a_tournament_is_activated_with_a_ledger_per_participant(api: Stack) -> None:
    players = names(4)
    created = await api.create(players, name="Spring Cup")
    assert created["status"] == "PENDING" and created["saga_id"]
    t = await api.settled(created["id"])
    assert t["status"] == "ACTIVE" and t["reason"] is None
    assert t["participants"] == players and t["name"] == "Spring Cup"
    for p in players:
        r = await api.ledger(t["id"], p)
        assert r.status_code == 200
        assert [e["type"] for e in r.json()["events"]] == ["ScoresInitialized"]
    saga = (await api.client.get(f"{api.match_url}/sagas/{t['saga_id']}")).json()
    assert saga["status"] == "COMPLETED" and saga["style"] == "orchestration"
    events = [(s["step_name"], s["event"]) for s in saga["steps"]]
    assert ("initialise scores", "succeeded") in events and ("activate", "succeeded") in events
    board = (await api.leaderboard(t["id"], min_position=0)).json()
    assert board["tournament_id"] == t["id"]


async def test_a_banned_participant_cancels_the_tournament_and_leaves_no_ledger(
    api: Stack,
) -> None:
    players = names(3)
    await api.ban(players[2])
    t = await api.settled((await api.create(players))["id"])
    assert t["status"] == "CANCELLED"
    assert players[2] in t["reason"] and "banned" in t["reason"]
    for p in players:
        assert (await api.ledger(t["id"], p)).status_code == 404
    assert (await api.leaderboard(t["id"])).status_code == 404
    saga = (await api.client.get(f"{api.match_url}/sagas/{t['saga_id']}")).json()
    assert saga["status"] == "COMPENSATED"
    assert ("record tournament", "compensated") in [
        (s["step_name"], s["event"]) for s in saga["steps"]
    ]
    r = await api.client.post(
        f"{api.match_url}/tournaments/{t['id']}/matches",
        json={"home": players[0], "away": players[1], "winner": None},
        headers=api.auth,
    )
    assert r.status_code == 409 and "CANCELLED" in r.json()["detail"]


async def test_matches_points_time_travel_and_read_your_writes(api: Stack) -> None:
    a, b, c = names(3)
    t = await api.settled((await api.create([a, b, c]))["id"])
    m1 = await api.play(t["id"], a, b, a)
    await api.applied(t["id"], b, m1)
    await api.applied(t["id"], a, m1)
    between = datetime.now(UTC)
    m2 = await api.play(t["id"], b, c, None)
    m3 = await api.play(t["id"], c, a, c)
    positions = [await api.applied(t["id"], p, m) for p, m in ((c, m3), (a, m3), (b, m2))]
    position = max(positions)
    # Read-your-writes: at min_position the projection has applied every one of them.
    board = (await api.leaderboard(t["id"], min_position=position)).json()
    assert board["position"] >= position
    points = {e["participant"]: (e["points"], e["played"], e["rank"]) for e in board["entries"]}
    assert points == {
        c: (4, 2, 1),
        a: (3, 2, 2),
        b: (1, 2, 3),
    }
    assert [e["participant"] for e in board["entries"]] == [c, a, b]
    # Time travel: as the ledgers stood after the first match.
    past = (await api.leaderboard(t["id"], as_of=between.isoformat())).json()
    assert {e["participant"]: e["points"] for e in past["entries"]} == {a: 3, b: 0, c: 0}
    before = (await api.leaderboard(t["id"], as_of="2000-01-01T00:00:00Z")).json()
    assert before["entries"] == []
    # The audit trail, oldest first.
    trail = (await api.ledger(t["id"], c)).json()
    assert [(e["type"], e["data"].get("result")) for e in trail["events"]] == [
        ("ScoresInitialized", None),
        ("PointsAwarded", "draw"),
        ("PointsAwarded", "win"),
    ]
    assert trail["points"] == 4
    # Read-your-writes in one request: the id POST /matches answered, nothing else.
    m4 = await api.play(t["id"], b, a, b)
    board = (await api.leaderboard(t["id"], match_id=m4)).json()
    assert {e["participant"]: e["points"] for e in board["entries"]} == {c: 4, a: 3, b: 4}


def match_db_counts(stack: Stack) -> tuple[int, int, int]:
    with sqlite3.connect(stack.data_dir / "match-engine.db") as conn:
        return (
            conn.execute("SELECT count(*) FROM match_tournaments").fetchone()[0],
            conn.execute("SELECT count(*) FROM match_matches").fetchone()[0],
            conn.execute("SELECT count(*) FROM accord_outbox").fetchone()[0],
        )


def score_db_counts(stack: Stack) -> tuple[int, int, int]:
    with sqlite3.connect(stack.data_dir / "score-engine.db") as conn:
        return (
            conn.execute("SELECT count(*) FROM score_bans").fetchone()[0],
            conn.execute("SELECT count(*) FROM score_ledgers").fetchone()[0],
            conn.execute("SELECT count(*) FROM accord_events").fetchone()[0],
        )


async def test_bad_requests_are_refused_clearly_and_write_nothing(api: Stack) -> None:
    a, b = names(2)
    t = await api.settled((await api.create([a, b]))["id"])
    before, score_before = match_db_counts(api), score_db_counts(api)
    url = f"{api.match_url}/tournaments"
    post = api.client.post
    good = {"name": "x", "participants": [a, b]}

    r = await post(url, json=good)
    assert r.status_code == 401 and "Bearer" in r.json()["detail"]
    r = await post(url, json=good, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = await post(f"{api.score_url}/bans", json={"participant": a})
    assert r.status_code == 401

    big = b'{"name": "' + b"x" * (1024 * 1024 + 10) + b'", "participants": []}'
    r = await post(url, content=big, headers={**api.auth, "content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    async def chunks():  # no Content-Length: refused while streaming
        for _ in range(20):
            yield b" " * 65536

    r = await post(url, content=chunks(), headers={**api.auth, "content-type": "application/json"})
    assert r.status_code == 413

    cases = [
        ({"name": "x", "participants": [a]}, "participants"),
        ({"name": "x", "participants": [f"q{i}" for i in range(1025)]}, "participants"),
        ({"name": "x", "participants": [a, a]}, "appears twice"),
        ({"name": "x", "participants": [a, "bad id!"]}, "not a valid participant id"),
        ({"name": "x", "participants": [a, "x" * 65]}, "not a valid participant id"),
        ({"name": "", "participants": [a, b]}, "name"),
        ({"name": "n" * 201, "participants": [a, b]}, "name"),
        ({"participants": [a, b]}, "name: this field is required"),
        ({**good, "colour": "red"}, "colour: unknown field"),
    ]
    for body, words in cases:
        r = await post(url, json=body, headers=api.auth)
        assert r.status_code == 422, body
        assert words in r.json()["detail"], (body, r.json())
    r = await post(
        url, content=b"{not json", headers={**api.auth, "content-type": "application/json"}
    )
    assert r.status_code == 422 and "JSON" in r.json()["detail"]

    murl = f"{api.match_url}/tournaments/{t['id']}/matches"
    for body, words in [
        ({"home": a, "away": a, "winner": None}, "cannot play itself"),
        ({"home": a, "away": b, "winner": "zed"}, "neither player"),
        ({"home": a, "away": "stranger", "winner": None}, "not a participant"),
        ({"home": a, "away": b}, "winner: this field is required"),
    ]:
        r = await post(murl, json=body, headers=api.auth)
        assert r.status_code == 422, body
        assert words in r.json()["detail"], (body, r.json())
    r = await post(
        f"{api.match_url}/tournaments/nope/matches",
        json={"home": a, "away": b, "winner": None},
        headers=api.auth,
    )
    assert r.status_code == 404
    r = await post(f"{api.score_url}/bans", json={"participant": "no good"}, headers=api.auth)
    assert r.status_code == 422
    r = await post(
        f"{api.score_url}/bans",
        content=b'{"participant": "' + b"x" * (1024 * 1024 + 10) + b'"}',
        headers={**api.auth, "content-type": "application/json"},
    )
    assert r.status_code == 413
    r = await api.leaderboard(t["id"], as_of="last tuesday")
    assert r.status_code == 422 and "ISO-8601" in r.json()["detail"]
    r = await api.leaderboard(t["id"], min_position=-1)
    assert r.status_code == 422 and "min_position" in r.json()["detail"]
    assert match_db_counts(api) == before
    assert score_db_counts(api) == score_before


async def test_unknown_ids_get_404(api: Stack) -> None:
    get = api.client.get
    for url in (
        f"{api.match_url}/tournaments/nope",
        f"{api.match_url}/sagas/nope",
        f"{api.match_url}/tournaments/nope/matches",
        f"{api.score_url}/tournaments/nope/leaderboard",
        f"{api.score_url}/tournaments/nope/participants/x/ledger",
    ):
        r = await get(url)
        assert r.status_code == 404, url
        assert "nope" in r.json()["detail"]


async def test_token_file_is_private_and_its_path_printed(api: Stack) -> None:
    path = api.data_dir / "api-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert str(path) in api.output().replace("\n", "")


async def test_a_dead_worker_is_restarted_and_the_restart_logged(api: Stack) -> None:
    a, b = names(2)
    t = await api.settled((await api.create([a, b]))["id"])
    victim = api.pids()["score-consumer"]
    os.kill(victim, signal.SIGKILL)
    await wait_for(lambda: api.pids()["score-consumer"] != victim, 20.0, interval=0.1)
    assert "score-consumer" in api.output() and "restarting" in api.output()
    match_id = await api.play(t["id"], a, b, b)
    await api.applied(t["id"], b, match_id)


async def test_health_answers(api: Stack) -> None:
    for url, service in ((api.match_url, "match-engine"), (api.score_url, "score-engine")):
        r = await api.client.get(f"{url}/health")
        assert r.status_code == 200
        assert (r.json()["status"], r.json()["service"]) == ("ok", service)
