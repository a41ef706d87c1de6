"""Aggregates and the Repository where a user's code goes a little wrong: an event
class that changed, an event that does not survive JSON, a state class that grew an
attribute, an overridden apply method."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import BaseModel, Field

from accord.db import Database
from accord.errors import ConfigurationError, DecodeError
from accord.eventstore import (
    Aggregate,
    EventStore,
    NewEvent,
    Repository,
    applies,
)


@pytest.fixture
async def store(database: Database) -> AsyncIterator[EventStore]:
    store = EventStore(database)
    yield store
    await store.close()


class Joined(BaseModel):
    player: str


class Noted(BaseModel):
    note: dict[str, Any]


class Pinned(BaseModel):
    player: str
    pin: str = Field(exclude=True)  # left out of the stored JSON, yet required


class Table(Aggregate):
    snapshot_every = 3

    def __init__(self, id: str) -> None:
        super().__init__(id)
        self.seats: dict[str, int] = {}
        self.notes: list[dict[str, Any]] = []

    @applies(Joined)
    def _joined(self, event: Joined) -> None:
        self.seats[event.player] = len(self.seats) + 1

    @applies(Noted)
    def _noted(self, event: Noted) -> None:
        self.notes.append(event.note)

    @applies(Pinned)
    def _pinned(self, event: Pinned) -> None:
        self.seats[event.player] = int(event.pin)


async def test_an_event_that_no_longer_fits_its_class_says_where_and_what_to_do(
    store: EventStore,
) -> None:
    """An event written before its class changed (a field renamed, no upcaster) was a
    bare pydantic ValidationError naming neither the stream nor the event."""
    await store.append("table-old", [NewEvent("Joined", {"name": "ann"})])
    with pytest.raises(DecodeError) as info:
        await Repository(store, Table).load("table-old")
    message = str(info.value)
    assert "stream 'table-old'" in message and "v1 ('Joined', schema version 1)" in message
    assert "field 'player': Field required" in message
    assert "Upcasters.register('Joined'" in message


async def test_record_applies_the_event_as_loads_will_read_it(store: EventStore) -> None:
    """A value that JSON turns into another (a datetime under ``Any``) gave the saved
    aggregate one state and the same aggregate loaded back another."""
    repo = Repository(store, Table)
    table = repo.create("table-note")
    table.record(Noted(note={"at": datetime(2024, 3, 1, 18, 0, tzinfo=UTC)}))
    await repo.save(table)
    loaded = await repo.load("table-note")
    assert table.notes == loaded.notes == [{"at": "2024-03-01T18:00:00Z"}]


async def test_an_event_that_cannot_load_back_is_refused_when_recorded(
    store: EventStore,
) -> None:
    """Saved, it would have made its stream fail to load for ever."""
    repo = Repository(store, Table)
    table = repo.create("table-pin")
    with pytest.raises(ConfigurationError, match=r"field 'pin': Field required.*exclude=True"):
        table.record(Pinned(player="ann", pin="7"))
    assert table.pending == [] and table.seats == {}
    assert await repo.save(table) is None
    assert await store.stream_version("table-pin") == 0


class TableWithCount(Table):
    """The next release of Table: one more attribute, ``snapshot_version`` not raised."""

    @classmethod
    def aggregate_type(cls) -> str:
        return "Table"

    def __init__(self, id: str) -> None:
        super().__init__(id)
        self.count = 0

    @applies(Joined)
    def _joined(self, event: Joined) -> None:
        super()._joined(event)
        self.count += 1


async def test_a_snapshot_without_an_attribute_of_the_state_is_not_used(
    store: EventStore,
) -> None:
    """The old snapshot restored ``seats`` and left ``count`` at 0: a state that never
    was. It does not fit, so the aggregate is rebuilt from its events."""
    repo = Repository(store, Table)
    table = repo.create("table-count")
    for player in ("ann", "bob", "cy", "dee"):
        table.record(Joined(player=player))
    await repo.save(table)
    snapshot = await store.load_snapshot("table-count")
    assert snapshot is not None and "count" not in snapshot.state
    loaded = await Repository(store, TableWithCount).load("table-count")
    assert loaded.count == 4 and loaded.version == 4


class QuietTable(Table):
    """Overrides the apply method by its name, as any Python method is overridden."""

    def _joined(self, event: Joined) -> None:
        self.seats[event.player] = 0


async def test_an_overridden_apply_method_is_the_one_that_runs(store: EventStore) -> None:
    quiet = QuietTable("table-quiet")
    quiet.record(Joined(player="ann"))
    assert quiet.seats == {"ann": 0}
    await Repository(store, QuietTable).save(quiet)
    assert (await Repository(store, QuietTable).load("table-quiet")).seats == {"ann": 0}


def test_two_apply_methods_for_one_event_type_are_refused() -> None:
    """Only the last one ran: the other's effects were silently lost."""
    with pytest.raises(ConfigurationError, match=r"two @applies methods for event type 'Joined'"):

        class Twice(Aggregate):
            @applies(Joined)
            def _seat(self, event: Joined) -> None:
                pass

            @applies(Joined)
            def _greet(self, event: Joined) -> None:
                pass


@pytest.mark.parametrize(
    ("event_type", "schema_version", "says"),
    [
        ("", 1, "__event_type__"),
        ("x" * 201, 1, "__event_type__"),
        ("a\x00b", 1, "NUL"),
        ("ok.Happened", 0, "__schema_version__"),
        ("ok.Happened", "2", "__schema_version__"),
    ],
)
def test_an_event_class_the_store_cannot_hold_is_refused_with_its_aggregate(
    event_type: str, schema_version: Any, says: str
) -> None:
    """It was found at the first save, by a ValueError naming neither class, after
    the event had been applied."""

    class Odd(BaseModel):
        __event_type__ = event_type
        __schema_version__ = schema_version

    with pytest.raises(ConfigurationError, match=says) as caught:

        class Board(Aggregate):
            @applies(Odd)
            def on_odd(self, event: Odd) -> None:
                pass

    assert "Board" in str(caught.value) and "Odd" in str(caught.value)
