"""PostgreSQL gap safety: a late-committing lower position is never skipped."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from accord.db import Database
from accord.errors import ConcurrencyError
from accord.eventstore import EventStore, NewEvent, RecordedEvent
from accord.testing import wait_for

pytestmark = pytest.mark.postgres


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[EventStore]:
    db = Database(pg_url)
    store = EventStore(db, poll_interval=0.2)
    yield store
    await store.close()
    await db.dispose()


async def test_deterministic_gap_race(store: EventStore) -> None:
    """Hold the transaction owning the lowest position open while later ones commit:
    readers see none of the later events until it commits, then all, once, in order."""
    got: list[RecordedEvent] = []

    async def follow() -> None:
        async for event in store.subscribe(0):
            got.append(event)

    follower = asyncio.create_task(follow())
    try:
        async with store.database.transaction() as slow:
            held = await store.append("gap-a", [NewEvent("gap.Slow", {"n": 0})], conn=slow)
            later = [
                await store.append(f"gap-{i}", [NewEvent("gap.Fast", {"n": i})]) for i in (1, 2)
            ]
            # The later transactions are committed (stream reads see them)...
            assert [e.type for e in await store.read_stream("gap-1")] == ["gap.Fast"]
            # ...and hold higher positions than the open one,
            assert held.position < later[0].position < later[1].position
            # ...yet a gap-safe reader must not see them yet: seeing 2 and moving
            # its cursor past the open transaction's position would lose it.
            assert await store.read_all(0) == []
            assert await store.head() == 0
            await asyncio.sleep(0)  # let the subscriber run a read cycle
            assert got == []
        await wait_for(lambda: len(got) >= 3, 20)
    finally:
        follower.cancel()
        async with asyncio.timeout(10):  # a lost cancellation fails here, not at pytest-timeout
            await asyncio.gather(follower, return_exceptions=True)
    assert [(e.type, e.data["n"]) for e in got] == [
        ("gap.Slow", 0),
        ("gap.Fast", 1),
        ("gap.Fast", 2),
    ]
    assert [e.position for e in got] == [held.position, later[0].position, later[1].position]


@pytest.mark.slow
async def test_concurrent_writers_with_a_live_subscriber_get_every_event_once(
    store: EventStore,
) -> None:
    writers, per_writer = 8, 5_000
    total = writers * per_writer
    got: list[int] = []
    done = asyncio.Event()

    async def follow() -> None:
        async for event in store.subscribe(0, batch_size=2000):
            got.append(event.position)
            if len(got) >= total:
                done.set()

    async def write(w: int) -> None:
        stream = f"w{w}-{uuid.uuid4().hex[:6]}"
        version = 0
        while version < per_writer:
            n = min(1 if version % 3 else 4, per_writer - version)  # some multi-event appends
            await store.append(stream, [NewEvent("w.E", {"w": w})] * n, expected_version=version)
            version += n

    follower = asyncio.create_task(follow())
    try:
        await asyncio.gather(*(write(w) for w in range(writers)))
        written = await store.count(0)
        try:
            await asyncio.wait_for(done.wait(), 60)
        except TimeoutError:
            raise AssertionError(
                f"subscriber got {len(got)} of {total} (visible: {written}, head "
                f"{await store.head()}); an open transaction elsewhere in the cluster holds xmin?"
            ) from None
    finally:
        follower.cancel()
        async with asyncio.timeout(10):  # a lost cancellation fails here, not at pytest-timeout
            await asyncio.gather(follower, return_exceptions=True)
    assert len(got) == total
    assert len(set(got)) == total
    assert got == sorted(got)
    assert await store.count(0) == total


async def test_version_conflicts_keep_the_stores_connections(pg_url: str) -> None:
    database = Database(pg_url)
    async with EventStore(database) as store:
        await store.append("s-1", [NewEvent("Happened", {"n": 0})])
        kept = list(store._idle)  # the store's own hot connections
        assert kept
        for _ in range(5):
            with pytest.raises(ConcurrencyError):
                await store.append("s-1", [NewEvent("Happened", {"n": 1})], expected_version=0)
        assert all(conn in store._idle for conn in kept), "a conflict threw a connection away"
        assert not any(conn.is_closed() for conn in store._idle)
    await database.dispose()
