"""Property tests: any sequence of appends behaves like a simple in-memory model."""

from __future__ import annotations

import asyncio
import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accord.db import Database
from accord.errors import ConcurrencyError
from accord.eventstore import ANY, NO_STREAM, STREAM_EXISTS, EventStore, NewEvent
from accord.testing.eventstore_contract import visible

expectations = st.one_of(
    st.sampled_from([ANY, NO_STREAM, STREAM_EXISTS]), st.integers(min_value=0, max_value=6)
)
operations = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c"]), expectations, st.integers(1, 3)),
    min_size=1,
    max_size=15,
)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=operations)
async def test_appends_match_the_model(db_url: str, ops: list[tuple[str, object, int]]) -> None:
    async with Database(db_url) as db:
        store = EventStore(db)
        try:
            run = uuid.uuid4().hex[:6]
            model: dict[str, list[int]] = {}
            start = await store.head()
            last = start
            for name, expected, n in ops:
                stream = f"{name}-{run}"
                current = len(model.get(stream, []))
                ok = (
                    expected is ANY
                    or (expected is NO_STREAM and current == 0)
                    or (expected is STREAM_EXISTS and current > 0)
                    or (isinstance(expected, int) and expected == current)
                )
                events = [NewEvent("p.E", {"k": i}) for i in range(n)]
                try:
                    result = await store.append(stream, events, expected_version=expected)  # type: ignore[arg-type]
                except ConcurrencyError as exc:
                    assert not ok and exc.actual == current
                    continue
                assert ok and result.version == current + n
                model.setdefault(stream, []).extend(result.positions)
                last = result.position
            for stream, positions in model.items():
                read = await store.read_stream(stream)
                assert [e.version for e in read] == list(range(1, len(positions) + 1))
                assert [e.position for e in read] == positions
            if last != start:
                await visible(store, last)
            everything = await store.read_all(start, limit=10_000)
            assert sorted(p for ps in model.values() for p in ps) == [
                e.position for e in everything
            ]
        finally:
            await store.close()


async def test_racing_exact_versions_admit_exactly_one_writer_per_version(
    database: Database,
) -> None:
    store = EventStore(database)
    try:
        stream = f"race-{uuid.uuid4().hex[:6]}"
        for version in range(5):
            results = await asyncio.gather(
                *(
                    store.append(stream, [NewEvent("r.E")], expected_version=version)
                    for _ in range(4)
                ),
                return_exceptions=True,
            )
            assert sum(1 for r in results if not isinstance(r, BaseException)) == 1
            assert all(
                isinstance(r, ConcurrencyError) for r in results if isinstance(r, BaseException)
            )
        assert await store.stream_version(stream) == 5
    finally:
        await store.close()


type_names = st.sampled_from(["t.A", "t.B", "t.C", "t.D"])


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    appended=st.lists(type_names, min_size=1, max_size=30),
    wanted=st.lists(type_names, min_size=1, max_size=4),
    limit=st.integers(1, 8),
    cut=st.integers(0, 30),
)
async def test_reads_and_counts_by_type_match_the_model(
    db_url: str, appended: list[str], wanted: list[str], limit: int, cut: int
) -> None:
    """``read_all(types=...)`` pages through exactly the events of those types, in
    position order (a type named twice counts once), and ``count`` agrees, with and
    without ``upto``."""
    async with Database(db_url) as db:
        store = EventStore(db)
        try:
            start = await store.head()
            stream = f"s-{uuid.uuid4().hex[:6]}"
            for name in appended:
                last = await store.append(stream, [NewEvent(name, {})])
            await visible(store, last.position)
            everything = await store.read_all(start, limit=10_000)
            model = [e for e in everything if e.type in set(wanted)]
            paged, after = [], start
            while batch := await store.read_all(after, limit=limit, types=wanted):
                assert len(batch) <= limit
                paged += batch
                after = batch[-1].position
            assert [e.position for e in paged] == [e.position for e in model]
            assert await store.count(start, types=wanted) == len(model)
            upto = everything[min(cut, len(everything) - 1)].position
            expected = len([e for e in model if e.position <= upto])
            assert await store.count(start, upto=upto, types=wanted) == expected
            assert await store.count(start, upto=upto) == len(
                [e for e in everything if e.position <= upto]
            )
        finally:
            await store.close()


async def test_reads_by_type_take_any_type_name(db_url: str) -> None:
    """Type names with quotes, backslashes and other text read back by type (they
    are written into the statement as literals on PostgreSQL)."""
    names = ["it's", "back\\slash", "\\'; DROP TABLE accord_events; --", "ünï.cödé", "plain"]
    async with Database(db_url) as db:
        store = EventStore(db)
        try:
            start = await store.head()
            stream = f"s-{uuid.uuid4().hex[:6]}"
            for name in names:
                last = await store.append(stream, [NewEvent(name, {})])
            await visible(store, last.position)
            for name in names:
                [event] = await store.read_all(start, types=[name])
                assert event.type == name
                assert await store.count(start, types=[name, name]) == 1
            assert len(await store.read_all(start, types=names)) == len(names)
        finally:
            await store.close()
