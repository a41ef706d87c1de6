"""Aggregates, repository, snapshots, time travel, and golden logs through upcasters."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from accord.db import Database
from accord.errors import ConcurrencyError, ConfigurationError, NotFoundError
from accord.eventstore import (
    Aggregate,
    EventStore,
    NewEvent,
    Repository,
    Upcasters,
    applies,
    retry_on_conflict,
)
from accord.testing import wait_for
from accord.testing.eventstore_contract import visible

from .ledger import Closed, Ledger, ledger_upcasters

FIXTURES = Path(__file__).parent.parent / "fixtures" / "eventstore"


@pytest.fixture
async def store(database: Database) -> AsyncIterator[EventStore]:
    store = EventStore(database, ledger_upcasters(), poll_interval=0.2)
    yield store
    await store.close()


async def load_golden(store: EventStore, name: str) -> dict[str, Any]:
    doc = json.loads((FIXTURES / name).read_text())
    for e in doc["events"]:
        await store.append(
            e["stream_id"],
            [
                NewEvent(
                    e["type"],
                    e["data"],
                    e["metadata"],
                    schema_version=e["schema_version"],
                    time=datetime.fromisoformat(e["recorded_at"]),
                )
            ],
        )
    return dict(doc["expected"])


async def test_golden_log_upcasts_on_every_read_path(store: EventStore) -> None:
    expected = await load_golden(store, "scores_v1_v2.json")
    repo = Repository(store, Ledger)
    assert (await repo.load("ledger-golden")).scores == expected["final"]
    stream = [e for e in await store.read_stream("ledger-golden") if e.type == "ScoreChanged"]
    assert [e.data["reason"] for e in stream] == expected["upcast_reasons"]
    assert all("points" in e.data and e.schema_version == 3 for e in stream)
    last = (await store.read_stream("ledger-golden", backwards=True, limit=1))[0]
    await visible(store, last.position)
    from_all = await store.read_all(0, types=["ScoreChanged"])
    assert [e.data["reason"] for e in from_all] == expected["upcast_reasons"]
    got: list[str] = []

    async def follow() -> None:
        async for event in store.subscribe(0, types=["ScoreChanged"]):
            got.append(event.data["reason"])

    task = asyncio.create_task(follow())
    try:
        await wait_for(lambda: len(got) >= 4, 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert got == expected["upcast_reasons"]
    as_of = datetime.fromisoformat("2024-03-01T18:15:00+00:00")
    assert (await repo.load("ledger-golden", as_of=as_of)).scores == expected["as_of_18_15"]
    assert (await repo.load("ledger-golden", version=3)).scores == expected["at_version_3"]


async def test_repository_saves_loads_and_detects_conflicts(store: EventStore) -> None:
    repo = Repository(store, Ledger)
    ledger = repo.create("ledger-1")
    ledger.register("ann")
    ledger.score("ann", 2)
    result = await repo.save(ledger)
    assert result is not None and result.version == 2 and ledger.pending == []
    first, second = await repo.load("ledger-1"), await repo.load("ledger-1")
    first.score("ann", 1)
    second.score("ann", 5)
    await repo.save(first)
    with pytest.raises(ConcurrencyError) as info:
        await repo.save(second)
    assert info.value.actual == 3
    with pytest.raises(NotFoundError):
        await repo.load("ledger-missing")
    with pytest.raises(NotFoundError, match=r"'ledger-1' has no events at version 0$"):
        await repo.load("ledger-1", version=0)
    stored = await store.read_stream("ledger-1")
    assert [e.schema_version for e in stored if e.type == "ScoreChanged"] == [3, 3]


async def test_retry_on_conflict_reruns_the_command(store: EventStore) -> None:
    repo = Repository(store, Ledger)
    ledger = repo.create("ledger-r")
    ledger.register("ann")
    await repo.save(ledger)

    async def add_one() -> None:
        async def once() -> None:
            agg = await repo.load("ledger-r")
            agg.score("ann", 1)
            await asyncio.sleep(0)  # let the others load the same version
            await repo.save(agg)

        await retry_on_conflict(once, attempts=20, backoff=0.002)

    await asyncio.gather(*(add_one() for _ in range(5)))
    assert (await repo.load("ledger-r")).scores == {"ann": 5}
    updated = await repo.update("ledger-r", lambda agg: agg.score("ann", 10))
    assert updated.scores == {"ann": 15}


async def test_snapshots_every_n_and_stale_snapshots_are_ignored(store: EventStore) -> None:
    repo = Repository(store, Ledger)
    ledger = repo.create("ledger-s")
    ledger.register("ann")
    for _ in range(6):
        ledger.score("ann", 1)
    await repo.save(ledger)  # 7 events: crosses 5 -> snapshot at 7
    snap = await store.load_snapshot("ledger-s")
    assert snap is not None and snap.version == 7 and snap.state["scores"] == {"ann": 6}
    # Prove loads use it: tamper with the snapshot; the tail is applied on top.
    await store.save_snapshot(
        type(snap)(**{**_fields(snap), "state": {"scores": {"ann": 100}, "closed": False}})
    )
    loaded = await repo.load("ledger-s")
    assert loaded.scores == {"ann": 100} and loaded.version == 7
    loaded.score("ann", 1)
    await repo.save(loaded)
    assert (await repo.load("ledger-s")).scores == {"ann": 101}
    # Time travel below the snapshot rebuilds from events.
    assert (await repo.load("ledger-s", version=3)).scores == {"ann": 2}
    # New code with another snapshot version ignores it and replays the events.

    class LedgerV2(Ledger):
        snapshot_version = 2

        @classmethod
        def aggregate_type(cls) -> str:
            return "Ledger"

    assert (await Repository(store, LedgerV2).load("ledger-s")).scores == {"ann": 7}
    # A snapshot whose state does not fit is ignored too.

    class Strict(Ledger):
        @classmethod
        def aggregate_type(cls) -> str:
            return "Ledger"

        def restore_state(self, state: dict[str, Any]) -> None:
            raise KeyError("missing field 'season'")

    assert (await Repository(store, Strict).load("ledger-s")).scores == {"ann": 7}


async def test_dataclass_events_and_outbox(store: EventStore) -> None:
    repo = Repository(store, Ledger)
    ledger = repo.create("ledger-d")
    ledger.register("ann")
    ledger.record(Closed(by="ref"))
    await repo.save(ledger, outbox=True, metadata={"actor": "ref"})
    loaded = await repo.load("ledger-d")
    assert loaded.closed is True
    events = await store.read_stream("ledger-d")
    assert events[-1].type == "Closed" and events[-1].data == {"by": "ref"}
    assert events[-1].metadata == {"actor": "ref"}


def _fields(snap: Any) -> dict[str, Any]:
    return {k: getattr(snap, k) for k in snap.__dataclass_fields__}


async def test_a_snapshot_that_fails_after_the_commit_does_not_fail_the_save(
    store: EventStore,
) -> None:
    """Without a caller's transaction the events commit first: a snapshot that cannot
    be taken afterwards (state that is not JSON) is logged, and save() returns, since
    the command succeeded (raising would make a caller retry and apply it twice)."""

    class Unsnapshottable(Ledger):
        @classmethod
        def aggregate_type(cls) -> str:
            return "Ledger"

        def snapshot_state(self) -> dict[str, Any]:
            return {"scores": object()}  # not JSON

    repo = Repository(store, Unsnapshottable)
    ledger = repo.create("ledger-u")
    ledger.register("ann")
    for _ in range(5):
        ledger.score("ann", 1)
    result = await repo.save(ledger)  # 6 events: crosses 5, the snapshot fails
    assert result is not None and result.version == 6
    assert await store.load_snapshot("ledger-u") is None
    assert (await repo.load("ledger-u")).scores == {"ann": 5}


class Awarded(BaseModel):
    """Version 2 of ``Awarded`` (v1 had ``delta``), but the class does not say so."""

    player: str
    points: int


class Board(Aggregate):
    def __init__(self, id: str) -> None:
        super().__init__(id)
        self.points = 0

    @applies(Awarded)
    def _awarded(self, event: Awarded) -> None:
        self.points += event.points


def _delta_to_points(data: dict[str, Any]) -> dict[str, Any]:
    return {"player": data["player"], "points": data["delta"]}


async def test_an_event_class_behind_its_upcasters_is_refused(database: Database) -> None:
    """Saved, its v2-shaped events would be labelled schema 1 and upcast again on
    every load, which would then fail for ever: refused when the repository is made,
    or at save if the upcasters were registered after that."""
    upcasters = Upcasters()
    upcasters.add("Awarded", 1, _delta_to_points)
    async with EventStore(database, upcasters) as store:
        with pytest.raises(ConfigurationError, match=r"`__schema_version__ = 2` on Awarded"):
            Repository(store, Board)
    later = Upcasters()
    async with EventStore(database, later) as store:
        repo = Repository(store, Board)
        later.add("Awarded", 1, _delta_to_points)
        board = repo.create("board-1")
        board.record(Awarded(player="ann", points=3))
        with pytest.raises(ConfigurationError, match="lift 'Awarded' to version 2"):
            await repo.save(board)
        assert await store.stream_version("board-1") == 0
