"""The same business flow, choreographed by events: same outcomes as the orchestrated saga."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tournament.conftest import Stack, running

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(module_tmp: Path) -> Iterator[Stack]:
    with running(module_tmp / "data", saga_style="choreography") as s:
        yield s


def names(n: int) -> list[str]:
    tag = uuid.uuid4().hex[:6]
    return [f"c{i}-{tag}" for i in range(n)]


async def test_activation_by_events(api: Stack) -> None:
    players = names(3)
    t = await api.settled((await api.create(players))["id"])
    assert t["status"] == "ACTIVE" and t["saga_style"] == "choreography"
    for p in players:
        assert (await api.ledger(t["id"], p)).status_code == 200
    saga = (await api.client.get(f"{api.match_url}/sagas/{t['saga_id']}")).json()
    assert saga["style"] == "choreography" and saga["status"] == "COMPLETED"


async def test_a_ban_cancels_by_events_and_leaves_no_ledger(api: Stack) -> None:
    players = names(3)
    await api.ban(players[0])
    t = await api.settled((await api.create(players))["id"])
    assert t["status"] == "CANCELLED"
    assert players[0] in t["reason"] and "banned" in t["reason"]
    for p in players:
        assert (await api.ledger(t["id"], p)).status_code == 404
    assert (await api.leaderboard(t["id"])).status_code == 404
    saga = (await api.client.get(f"{api.match_url}/sagas/{t['saga_id']}")).json()
    assert saga["status"] == "COMPENSATED"


async def test_matches_score_the_same(api: Stack) -> None:
    a, b = names(2)
    t = await api.settled((await api.create([a, b]))["id"])
    m1 = await api.play(t["id"], a, b, None)
    m2 = await api.play(t["id"], b, a, b)
    position = max([await api.applied(t["id"], a, m1), await api.applied(t["id"], b, m2)])
    board = (await api.leaderboard(t["id"], min_position=position)).json()
    assert {e["participant"]: e["points"] for e in board["entries"]} == {a: 1, b: 4}
