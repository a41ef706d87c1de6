"""The tournament system on PostgreSQL (one database per engine) and RabbitMQ, with two
relay/consumer processes per engine; and workers SIGKILLed while 50 tournaments are made."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.brokers import delete_everything
from tests.conftest import RABBIT_URL
from tests.tournament.conftest import (
    SAGA_GROUPS,
    Stack,
    create_pg_database,
    drop_pg_database,
    pg_url_of,
    running,
)

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq, pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(module_tmp: Path) -> Iterator[Stack]:
    match_name = asyncio.run(create_pg_database())
    score_name = asyncio.run(create_pg_database())
    channel = f"t-{uuid.uuid4().hex[:10]}"
    try:
        with running(
            module_tmp / "data",
            match_db=pg_url_of(match_name),
            score_db=pg_url_of(score_name),
            broker=RABBIT_URL,
            channel=channel,
            workers=2,
        ) as s:
            yield s
    finally:
        asyncio.run(delete_everything({channel: set(SAGA_GROUPS)}))
        asyncio.run(drop_pg_database(match_name))
        asyncio.run(drop_pg_database(score_name))


def names(n: int) -> list[str]:
    tag = uuid.uuid4().hex[:6]
    return [f"r{i}-{tag}" for i in range(n)]


async def test_activation_compensation_points_time_travel(api: Stack) -> None:
    a, b, c = names(3)
    t = await api.settled((await api.create([a, b, c]))["id"])
    assert t["status"] == "ACTIVE"
    m1 = await api.play(t["id"], a, b, a)
    await api.applied(t["id"], b, m1)
    between = datetime.now(UTC)
    m2 = await api.play(t["id"], c, b, None)
    position = max([await api.applied(t["id"], c, m2), await api.applied(t["id"], b, m2)])
    board = (await api.leaderboard(t["id"], min_position=position)).json()
    assert board["position"] >= position
    assert [(e["participant"], e["points"], e["rank"]) for e in board["entries"]] == [
        (a, 3, 1),
        (b, 1, 2),
        (c, 1, 2),
    ]
    past = (await api.leaderboard(t["id"], as_of=between.isoformat())).json()
    assert {e["participant"]: e["points"] for e in past["entries"]} == {a: 3, b: 0, c: 0}
    # Read-your-writes in one request: the id POST /matches answered, nothing else.
    m3 = await api.play(t["id"], b, a, b)
    board = (await api.leaderboard(t["id"], match_id=m3)).json()
    assert {e["participant"]: e["points"] for e in board["entries"]} == {a: 3, b: 4, c: 1}

    await api.ban(c)
    cancelled = await api.settled((await api.create([a, c]))["id"])
    assert cancelled["status"] == "CANCELLED" and c in cancelled["reason"]
    assert (await api.ledger(cancelled["id"], a)).status_code == 404
    assert (await api.ledger(cancelled["id"], c)).status_code == 404


@pytest.mark.fault
async def test_workers_killed_while_creating_50_tournaments(api: Stack) -> None:
    banned = f"banned-{uuid.uuid4().hex[:6]}"
    await api.ban(banned)
    kills = {10: "score-consumer-1", 25: "match-saga-1", 40: "match-relay-1"}
    created: list[tuple[str, list[str]]] = []
    killed: dict[str, int] = {}
    for i in range(50):
        players = names(3)
        if i % 5 == 0:
            players[1] = banned
        created.append(((await api.create(players))["id"], players))
        if i in kills:
            victim = api.pids()[kills[i]]
            killed[kills[i]] = victim
            os.kill(victim, signal.SIGKILL)
    final = [await api.settled(tid, timeout=90.0) for tid, _ in created]
    for (tid, players), t in zip(created, final, strict=True):
        codes = [(await api.ledger(tid, p)).status_code for p in players]
        if t["status"] == "ACTIVE":
            assert codes == [200, 200, 200], (tid, codes)
            for p in players:
                events = (await api.ledger(tid, p)).json()["events"]
                assert [e["type"] for e in events] == ["ScoresInitialized"], (tid, p, events)
        else:
            assert t["status"] == "CANCELLED"
            assert codes == [404, 404, 404], (tid, codes)
        # Only the tournaments with the banned player are cancelled.
        assert (t["status"] == "CANCELLED") == (banned in players), (tid, t)
    out = api.output()
    for name, pid in killed.items():  # each killed child was seen to die and came back
        assert f"{name} (pid {pid}) exited" in out, (name, pid)
        assert f"{name} restarted" in out, name
