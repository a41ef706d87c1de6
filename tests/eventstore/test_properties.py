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
