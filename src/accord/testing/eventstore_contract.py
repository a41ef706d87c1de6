"""The event store contract suite: every EventStore backend must pass it.

Subclass :class:`EventStoreContract` and provide the ``event_store`` fixture
(the one hook): an async fixture yielding a fresh, migrated
:class:`~accord.eventstore.EventStore` whose upcasters are the ones passed in
``contract_upcasters`` (a fixture the suite provides).
"""

from __future__ import annotations

import asyncio
import math
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa

from accord.db.schema import outbox
from accord.errors import ConcurrencyError, ConfigurationError
from accord.eventstore import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    EventStore,
    NewEvent,
    RecordedEvent,
    Upcasters,
)
from accord.testing._eventually import wait_for

__all__ = ["EventStoreContract", "contract_upcasters_factory", "visible"]


def contract_upcasters_factory() -> Upcasters:
    """The upcasters the suite expects: ``Renamed`` v1 {name} -> v2 {title} -> v3 {title, lang}."""
    up = Upcasters()
    up.add("contract.Renamed", 1, lambda d: {"title": d["name"]})
    up.add("contract.Renamed", 2, lambda d: {**d, "lang": "en"})
    return up


async def visible(store: EventStore, position: int, timeout: float = 20.0) -> None:
    """Wait until ``read_all`` can return ``position`` (on PostgreSQL, any open
    transaction in the cluster that started earlier delays that)."""

    async def reached() -> bool:
        return await store.head() >= position

    await wait_for(reached, timeout)  # type: ignore[arg-type]


def _events(n: int, type: str = "contract.Happened", **data: Any) -> list[NewEvent]:
    return [NewEvent(type, {"n": i, **data}) for i in range(n)]


class EventStoreContract:
    """What every event store promises (see :class:`accord.eventstore.EventStore`)."""

    @pytest.fixture
    def contract_upcasters(self) -> Upcasters:
        return contract_upcasters_factory()

    @pytest.fixture
    async def event_store(self, contract_upcasters: Upcasters) -> Any:
        raise NotImplementedError("subclass EventStoreContract and provide event_store")

    @pytest.fixture
    def stream(self) -> str:
        return f"contract-{uuid.uuid4().hex[:10]}"

    async def test_append_and_read_back(self, event_store: EventStore, stream: str) -> None:
        meta = {"correlation_id": "c-1", "causation_id": "m-0", "actor": "alice"}
        result = await event_store.append(
            stream, [NewEvent("contract.A", {"x": 1}, meta), NewEvent("contract.B", {"y": [1, 2]})]
        )
        assert result.version == 2 and len(result.positions) == 2
        assert result.positions[0] < result.positions[1]
        events = await event_store.read_stream(stream)
        assert [(e.version, e.type, e.data) for e in events] == [
            (1, "contract.A", {"x": 1}),
            (2, "contract.B", {"y": [1, 2]}),
        ]
        assert events[0].metadata == meta and events[0].correlation_id == "c-1"
        assert [e.position for e in events] == list(result.positions)
        assert events[0].recorded_at.tzinfo is not None
        assert await event_store.stream_version(stream) == 2
        assert await event_store.read_stream(f"{stream}-missing") == []

    async def test_expected_versions(self, event_store: EventStore, stream: str) -> None:
        with pytest.raises(ConcurrencyError) as info:
            await event_store.append(stream, _events(1), expected_version=STREAM_EXISTS)
        assert info.value.actual == 0
        await event_store.append(stream, _events(2), expected_version=NO_STREAM)
        with pytest.raises(ConcurrencyError) as info:
            await event_store.append(stream, _events(1), expected_version=NO_STREAM)
        assert info.value.actual == 2
        with pytest.raises(ConcurrencyError) as info:
            await event_store.append(stream, _events(1), expected_version=1)
        assert info.value.actual == 2 and info.value.expected == 1
        assert (await event_store.append(stream, _events(1), expected_version=2)).version == 3
        assert (
            await event_store.append(stream, _events(1), expected_version=STREAM_EXISTS)
        ).version == 4
        assert (await event_store.append(stream, _events(1), expected_version=ANY)).version == 5
        assert [e.version for e in await event_store.read_stream(stream)] == [1, 2, 3, 4, 5]
        with pytest.raises(ConfigurationError):
            await event_store.append(stream, [], expected_version=ANY)
        with pytest.raises(ConfigurationError):
            await event_store.append(stream, _events(1), expected_version=-1)

    @pytest.mark.parametrize(
        ("value", "named"),
        [
            ({1, 2}, "a set"),
            (b"\xff", "a bytes"),
            (object(), "a object"),
            (datetime(2026, 12, 7, 19, 28, tzinfo=UTC), "a datetime.datetime"),
            (Decimal("1.5"), "a decimal.Decimal"),
            ({(1, 2): "x"}, "not tuple"),
        ],
    )
    @pytest.mark.parametrize("part", ["data", "metadata"])
    async def test_values_json_cannot_hold_are_refused_before_writing(
        self, event_store: EventStore, stream: str, value: Any, named: str, part: str
    ) -> None:
        """Every backend refuses them alike, as the caller's error naming the stream
        and the value's type; the valid event beside it is not written either."""
        fields: dict[str, Any] = {part: {"v": value}}
        bad = NewEvent("contract.A", **fields)
        with pytest.raises(TypeError, match=f"stream {stream!r}.*{part}.*{named}"):
            await event_store.append(stream, [NewEvent("contract.A", {"ok": 1}), bad])
        assert await event_store.stream_version(stream) == 0

    @pytest.mark.parametrize("value", [math.nan, math.inf, "a\x00b"])
    async def test_nan_and_nul_are_refused_before_writing(
        self, event_store: EventStore, stream: str, value: Any
    ) -> None:
        with pytest.raises(ValueError, match=f"stream {stream!r}"):
            await event_store.append(stream, [NewEvent("contract.A", {"v": [value]})])
        assert await event_store.stream_version(stream) == 0

    async def test_names_are_checked_up_front(self, event_store: EventStore, stream: str) -> None:
        """What a column cannot hold is refused before the database sees it, alike on
        every backend: a type over 200 characters, a NUL in a type or stream id."""
        with pytest.raises(TypeError, match=r"NewEvent\.data must be a mapping.*not a list"):
            NewEvent("contract.A", [1, 2])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"NewEvent\.metadata must be a mapping"):
            NewEvent("contract.A", {}, "actor")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="201 characters long"):
            NewEvent("t" * 201)
        with pytest.raises(ValueError, match="NUL"):
            NewEvent("contract.\x00A")
        with pytest.raises(ConfigurationError, match="NUL"):
            await event_store.append(f"{stream}\x00", [NewEvent("contract.A")])
        assert (await event_store.append(stream, [NewEvent("t" * 200)])).version == 1
        assert [e.type for e in await event_store.read_stream(stream)] == ["t" * 200]

    async def test_schema_versions_the_upcasters_cannot_read_are_refused(
        self, event_store: EventStore, stream: str
    ) -> None:
        """``contract.Renamed`` is read up to version 3: a version 4 (or 0, or -1)
        could never be read back, so it is not written."""
        for bad in (0, -1, True):
            with pytest.raises(ValueError, match="schema_version must be an int of at least 1"):
                NewEvent("contract.Renamed", {"title": "x"}, schema_version=bad)
        with pytest.raises(ConfigurationError, match=r"schema version 4.*up to version 3"):
            await event_store.append(
                stream, [NewEvent("contract.Renamed", {"title": "x"}, schema_version=4)]
            )
        assert await event_store.stream_version(stream) == 0
        # A type the upcasters do not know is stored as labelled (read as stored).
        await event_store.append(stream, [NewEvent("contract.Other", {"a": 1}, schema_version=7)])
        [event] = await event_store.read_stream(stream)
        assert (event.schema_version, event.data) == (7, {"a": 1})

    async def test_concurrent_appends_with_the_same_expected_version(
        self, event_store: EventStore, stream: str
    ) -> None:
        await event_store.append(stream, _events(1))

        async def attempt(i: int) -> bool:
            try:
                await event_store.append(stream, _events(1, who=i), expected_version=1)
                return True
            except ConcurrencyError as exc:
                assert exc.actual == 2
                return False

        outcomes = await asyncio.gather(*(attempt(i) for i in range(5)))
        assert outcomes.count(True) == 1
        assert [e.version for e in await event_store.read_stream(stream)] == [1, 2]

    async def test_concurrent_any_appends_all_succeed(
        self, event_store: EventStore, stream: str
    ) -> None:
        await asyncio.gather(*(event_store.append(stream, _events(2, who=i)) for i in range(6)))
        assert [e.version for e in await event_store.read_stream(stream)] == list(range(1, 13))

    async def test_append_in_the_callers_transaction(
        self, event_store: EventStore, stream: str
    ) -> None:
        db = event_store.database

        class Boom(Exception):
            pass

        with pytest.raises(Boom):
            async with db.transaction() as conn:
                await event_store.append(stream, _events(2), conn=conn, outbox=True)
                raise Boom
        assert await event_store.read_stream(stream) == []
        async with db.transaction() as conn:
            result = await event_store.append(stream, _events(2), conn=conn, outbox=True)
            await event_store.append(stream, _events(1), conn=conn, expected_version=2)
        events = await event_store.read_stream(stream)
        assert [e.version for e in events] == [1, 2, 3]
        async with db.connect() as conn:
            rows = (await conn.execute(sa.select(outbox).where(outbox.c.key == stream))).all()
        assert sorted(str(r.id) for r in rows) == sorted(str(e.id) for e in events[:2])
        assert {r.event_type for r in rows} == {"contract.Happened"}
        assert result.positions == tuple(e.position for e in events[:2])

    async def test_read_stream_ranges_backwards_and_time_travel(
        self, event_store: EventStore, stream: str
    ) -> None:
        t0 = datetime(2024, 1, 1, tzinfo=UTC)
        await event_store.append(
            stream,
            [NewEvent("contract.Tick", {"n": i}, time=t0 + timedelta(hours=i)) for i in range(6)],
        )
        versions = [
            e.version for e in await event_store.read_stream(stream, from_version=2, to_version=4)
        ]
        assert versions == [2, 3, 4]
        back = await event_store.read_stream(stream, backwards=True)
        assert [e.version for e in back] == [6, 5, 4, 3, 2, 1]
        last_two = await event_store.read_stream(stream, backwards=True, limit=2)
        assert [e.version for e in last_two] == [6, 5]
        as_of = await event_store.read_stream(stream, as_of=t0 + timedelta(hours=2, minutes=30))
        assert [e.version for e in as_of] == [1, 2, 3]
        assert await event_store.read_stream(stream, as_of=t0 - timedelta(seconds=1)) == []

    async def test_a_connections_implicit_transaction_records_at_one_time(
        self, event_store: EventStore, stream: str
    ) -> None:
        """On a connection that begins its transaction with its first statement
        (``Database.connect()``), the appends of that transaction share one time too."""
        async with event_store.database.connect() as conn:
            await event_store.append(stream, _events(1), conn=conn)
            await asyncio.sleep(0.05)
            await event_store.append(stream, _events(1), conn=conn)
            await conn.commit()
        first, second = await event_store.read_stream(stream)
        assert first.recorded_at == second.recorded_at

    async def test_time_travel_sees_a_transaction_whole(
        self, event_store: EventStore, stream: str
    ) -> None:
        """The events one transaction appends, to one stream or several, are recorded
        at one time (its first append's): ``as_of`` sees all of them or none."""
        db, other = event_store.database, f"{stream}-other"
        async with db.transaction() as conn:
            await event_store.append(stream, _events(1), conn=conn)
            await asyncio.sleep(0.05)
            await event_store.append(other, _events(2), conn=conn)
            await event_store.append(stream, _events(1), conn=conn)
        await asyncio.sleep(0.05)
        async with db.transaction() as conn:
            await event_store.append(stream, _events(1), conn=conn)
        first = await event_store.read_stream(stream, to_version=1)
        moment = first[0].recorded_at
        assert [e.version for e in await event_store.read_stream(stream, as_of=moment)] == [1, 2]
        assert [e.version for e in await event_store.read_stream(other, as_of=moment)] == [1, 2]
        (later,) = await event_store.read_stream(stream, from_version=3)
        assert later.recorded_at > moment
        before = moment - timedelta(microseconds=1)
        assert await event_store.read_stream(other, as_of=before) == []

    async def test_time_travel_reads_a_prefix_of_the_stream(
        self, event_store: EventStore, stream: str
    ) -> None:
        """An event appended later with an earlier ``NewEvent.time`` does not show up
        alone in the past: ``as_of`` stops at the first event recorded after it, so
        the stream is read as it was (version 2 never without version 1)."""
        await event_store.append(stream, _events(1))
        backdated = NewEvent("contract.Late", time=datetime(2024, 1, 1, tzinfo=UTC))
        await event_store.append(stream, [backdated])
        await asyncio.sleep(0.01)
        await event_store.append(stream, _events(1))
        first, second, third = await event_store.read_stream(stream)
        assert second.recorded_at < first.recorded_at < third.recorded_at

        async def versions(as_of: datetime, **options: Any) -> list[int]:
            found = await event_store.read_stream(stream, as_of=as_of, **options)
            return [e.version for e in found]

        assert await versions(datetime(2025, 1, 1, tzinfo=UTC)) == []
        assert await versions(first.recorded_at) == [1, 2]
        assert await versions(first.recorded_at, backwards=True) == [2, 1]
        assert await versions(first.recorded_at, from_version=2) == [2]
        assert await versions(third.recorded_at) == [1, 2, 3]

    async def test_a_limit_below_one_is_refused(self, event_store: EventStore, stream: str) -> None:
        await event_store.append(stream, _events(2))
        for limit in (0, -1):
            with pytest.raises(ConfigurationError, match="limit must be an int of at least 1"):
                await event_store.read_stream(stream, limit=limit)
            with pytest.raises(ConfigurationError, match="limit must be an int of at least 1"):
                await event_store.read_all(0, limit=limit)
        assert len(await event_store.read_stream(stream, limit=1)) == 1

    async def test_read_all_in_order_in_batches_and_by_type(self, event_store: EventStore) -> None:
        start = await event_store.head()
        streams = [f"all-{uuid.uuid4().hex[:8]}" for _ in range(3)]
        for i in range(12):
            last = await event_store.append(
                streams[i % 3], [NewEvent("contract.Odd" if i % 2 else "contract.Even", {"i": i})]
            )
        await visible(event_store, last.position)
        seen: list[RecordedEvent] = []
        cursor = start
        while batch := await event_store.read_all(cursor, limit=5):
            assert len(batch) <= 5
            seen.extend(batch)
            cursor = batch[-1].position
        assert [e.data["i"] for e in seen] == list(range(12))
        positions = [e.position for e in seen]
        assert positions == sorted(positions) and len(set(positions)) == 12
        assert await event_store.head() == positions[-1]
        assert await event_store.count(start) == 12
        assert await event_store.count(start, upto=positions[3]) == 4
        odd = await event_store.read_all(start, types=["contract.Odd"])
        assert [e.data["i"] for e in odd] == [1, 3, 5, 7, 9, 11]
        assert await event_store.count(start, types=["contract.Odd"]) == 6

    async def test_subscribe_catches_up_then_follows_live(
        self, event_store: EventStore, stream: str
    ) -> None:
        start = await event_store.head()
        await event_store.append(stream, _events(3))
        got: list[RecordedEvent] = []

        async def follow() -> None:
            async for event in event_store.subscribe(start):
                got.append(event)

        task = asyncio.create_task(follow())
        try:
            await wait_for(lambda: len(got) >= 3, 10)
            await event_store.append(stream, _events(2))
            async with event_store.database.transaction() as conn:
                await event_store.append(stream, _events(1), conn=conn)
            await wait_for(lambda: len(got) >= 6, 10)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert [e.version for e in got] == [1, 2, 3, 4, 5, 6]

    async def test_a_subscriber_cancelled_as_an_append_wakes_it_stops(
        self, event_store: EventStore, stream: str
    ) -> None:
        """The append wakes the waiting subscriber and the cancel lands in the same
        loop turn: on Python 3.11 a wait built on ``asyncio.wait_for`` lost that
        cancellation and the subscriber went on polling for ever."""
        got: list[RecordedEvent] = []

        async def follow() -> None:
            async for event in event_store.subscribe(await event_store.head()):
                got.append(event)

        task = asyncio.create_task(follow())
        await asyncio.sleep(0.2)  # caught up: waiting for a wake-up
        await event_store.append(stream, _events(1))
        task.cancel()
        try:
            async with asyncio.timeout(5):
                await asyncio.gather(task, return_exceptions=True)
        except TimeoutError:
            raise AssertionError("the subscriber ignored its cancellation") from None
        assert task.cancelled()

    async def test_subscribe_filters_types(self, event_store: EventStore, stream: str) -> None:
        start = await event_store.head()
        got: list[str] = []

        async def follow() -> None:
            async for event in event_store.subscribe(start, types=["contract.Wanted"]):
                got.append(event.type)

        task = asyncio.create_task(follow())
        try:
            await event_store.append(
                stream, [NewEvent("contract.Other"), NewEvent("contract.Wanted")]
            )
            await event_store.append(stream, [NewEvent("contract.Wanted")])
            await wait_for(lambda: len(got) >= 2, 10)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert got == ["contract.Wanted", "contract.Wanted"]

    async def test_upcasters_apply_on_every_read_path(
        self, event_store: EventStore, stream: str
    ) -> None:
        start = await event_store.head()
        last = await event_store.append(
            stream,
            [
                NewEvent("contract.Renamed", {"name": "old"}, schema_version=1),
                NewEvent("contract.Renamed", {"title": "mid"}, schema_version=2),
                NewEvent("contract.Renamed", {"title": "new", "lang": "fr"}),  # latest: 3
            ],
        )
        want = [
            {"title": "old", "lang": "en"},
            {"title": "mid", "lang": "en"},
            {"title": "new", "lang": "fr"},
        ]
        from_stream = await event_store.read_stream(stream)
        assert [e.data for e in from_stream] == want
        assert {e.schema_version for e in from_stream} == {3}
        await visible(event_store, last.position)
        assert [e.data for e in await event_store.read_all(start)] == want
        got: list[dict[str, Any]] = []

        async def follow() -> None:
            async for event in event_store.subscribe(start):
                got.append(event.data)

        task = asyncio.create_task(follow())
        try:
            await wait_for(lambda: len(got) >= 3, 10)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert got == want

    async def test_snapshots_keep_the_newest(self, event_store: EventStore, stream: str) -> None:
        from accord.eventstore import Snapshot

        now = datetime.now(UTC)
        assert await event_store.load_snapshot(stream) is None
        await event_store.save_snapshot(Snapshot(stream, "T", 10, 1, {"a": 1}, now))
        await event_store.save_snapshot(Snapshot(stream, "T", 5, 1, {"a": 0}, now))
        snap = await event_store.load_snapshot(stream)
        assert snap is not None and snap.version == 10 and snap.state == {"a": 1}
        await event_store.save_snapshot(Snapshot(stream, "T", 20, 1, {"a": 2}, now))
        snap = await event_store.load_snapshot(stream)
        assert snap is not None and snap.version == 20
