"""Upcasters that fail say which stored event they failed on; bad registrations are
refused when made."""

from __future__ import annotations

from typing import Any

import pytest

from accord.db import Database
from accord.errors import ConfigurationError, DecodeError
from accord.eventstore import EventStore, NewEvent, Upcasters


def _delta_to_points(data: dict[str, Any]) -> dict[str, Any]:
    return {"player": data["player"], "points": data["delta"]}


async def test_a_failing_upcaster_names_the_stream_and_the_event(database: Database) -> None:
    """It said which upcaster and type, not which of the log's events: in a long log
    that is the half of the answer needed to find and repair it."""
    upcasters = Upcasters()
    upcasters.add("Awarded", 1, _delta_to_points)
    async with EventStore(database, upcasters) as store:
        await store.append("board-1", [NewEvent("Awarded", {"player": "ann", "delta": 2})])
        await store.append("board-1", [NewEvent("Awarded", {"player": "bob"}, schema_version=1)])
        with pytest.raises(DecodeError) as info:
            await store.read_stream("board-1")
        position = (await store.read_stream("board-1", to_version=1))[0].position
    message = str(info.value)
    assert message.startswith("reading stream 'board-1' v2 (position ")
    assert f"(position {position})" not in message  # the second event, not the first
    assert "_delta_to_points" in message and "KeyError: 'delta'" in message
    assert isinstance(info.value.__cause__, KeyError)


@pytest.mark.parametrize("from_version", [1.5, "1", True, None])
def test_an_upcaster_version_that_is_not_a_count_is_refused(from_version: Any) -> None:
    """1.5 was accepted and made the type's latest schema version 2.5; "1" and None
    were a bare TypeError from a comparison."""
    with pytest.raises(ConfigurationError, match="upcaster versions are ints from 1"):
        Upcasters().add("Awarded", from_version, _delta_to_points)


def test_an_upcaster_event_type_that_is_not_a_name_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="must be the stored type's name"):
        Upcasters().add("", 1, _delta_to_points)
