"""Redis Streams transport: the contract suite plus Streams specifics, on the real server."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis
from tests.conftest import REDIS_URL
from tests.processes import a_killed_consumers_delivery_comes_back
from tests.transports.conftest import delete_redis_channel

from accord.errors import PublishError, TransportUnavailable
from accord.messages import Message
from accord.testing import Collector, TransportContract, assert_eventually, wait_for
from accord.transports.base import Delivery, Transport
from accord.transports.redis import RedisTransport

pytestmark = pytest.mark.redis


class TestRedisTransport(TransportContract):
    timeout = 15.0

    @pytest.fixture
    async def transport_factory(self, channel: str) -> AsyncIterator[Callable[[str], Transport]]:
        yield lambda ch: RedisTransport(REDIS_URL, channel=ch, claim_idle=3.0)
        await delete_redis_channel(channel)

    async def publish_raw(self, transport: Transport, headers: dict[str, str], body: bytes) -> None:
        assert isinstance(transport, RedisTransport)
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            await client.xadd(transport.stream, {**headers, "body": body})
        finally:
            await client.aclose()


async def test_entries_carry_ce_headers_as_fields(
    redis_transport: RedisTransport, admin: aioredis.Redis
) -> None:
    sent = Message(type="test.fields", data={"a": 1}, key="k1")
    await redis_transport.publish([sent])
    [(_, fields)] = await admin.xrange(redis_transport.stream)
    assert fields[b"ce-id"] == sent.id.encode()
    assert fields[b"ce-type"] == b"test.fields"
    assert fields[b"ce-partitionkey"] == b"k1"
    assert fields[b"content-type"] == b"application/json"
    assert fields[b"body"] == b'{"a":1}'


async def test_refused_entries_are_named_in_the_publish_error(
    redis_transport: RedisTransport, admin: aioredis.Redis
) -> None:
    await admin.set(redis_transport.stream, "not a stream")  # every XADD now fails
    sent = [Message(type="test.refused") for _ in range(3)]
    with pytest.raises(PublishError) as raised:
        await redis_transport.publish(sent)
    assert set(raised.value.failed) == {m.id for m in sent}
    assert "WRONGTYPE" in str(raised.value.failed[sent[0].id])


async def test_unreachable_server_raises_transport_unavailable() -> None:
    transport = RedisTransport("redis://127.0.0.1:1/0", connect_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(TransportUnavailable, match="cannot connect to Redis"):
        await transport.connect()
    assert time.monotonic() - started < 15
    with pytest.raises(TransportUnavailable):
        await transport.publish([Message(type="test.nowhere")])


def test_importing_without_the_driver_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "try:\n    import accord.transports.redis\n"
        "except ImportError as exc:\n    print(type(exc).__name__, exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "MissingExtraError" in out.stdout
    assert "accord[redis]" in out.stdout


async def test_nack_delay_is_honoured_and_no_two_consumers_take_a_delayed_entry(
    redis_transport: RedisTransport,
) -> None:
    other = RedisTransport(REDIS_URL, channel=redis_transport.channel, claim_idle=30.0)
    await other.connect()
    seen: dict[str, list[tuple[int, float]]] = {}

    async def handler(delivery: Delivery) -> None:
        assert delivery.message is not None
        seen.setdefault(delivery.message.id, []).append((delivery.attempt, time.monotonic()))
        if delivery.attempt == 1:
            await delivery.nack(0.5)

    try:
        await redis_transport.subscribe("delays", handler)
        await other.subscribe("delays", handler)
        sent = [Message(type="test.later", data={"n": i}) for i in range(30)]
        await redis_transport.publish(sent)
        await wait_for(lambda: sum(len(v) for v in seen.values()) >= 60, 15)
        await asyncio.sleep(0.3)  # a second take of a delayed entry would show up here
    finally:
        await other.close()
    assert sorted(seen) == sorted(m.id for m in sent)
    for deliveries in seen.values():
        assert [attempt for attempt, _ in deliveries] == [1, 2]
        assert deliveries[1][1] - deliveries[0][1] >= 0.4


async def test_reject_adds_to_the_dead_stream_with_group_and_reason(
    redis_transport: RedisTransport, admin: aioredis.Redis
) -> None:
    collector = Collector(settle="reject")
    await redis_transport.subscribe("picky", collector)
    sent = Message(type="test.poison", data={"x": 1})
    await redis_transport.publish([sent])
    await collector.wait(1)
    [(_, fields)] = await wait_for(lambda: admin.xrange(redis_transport.dead_stream), 10)
    assert fields[b"accord-dead-group"] == b"picky"
    assert fields[b"accord-dead-reason"] == b"rejected by the test"
    assert fields[b"ce-id"] == sent.id.encode()
    assert fields[b"body"] == b'{"x":1}'
    pending = await admin.xpending(redis_transport.stream, "picky")
    assert pending["pending"] == 0


async def test_non_matching_entries_are_acked_at_once_and_consumers_cleaned_up(
    redis_transport: RedisTransport, admin: aioredis.Redis
) -> None:
    collector = Collector()
    subscription = await redis_transport.subscribe("matches", collector, topics=["match.*"])
    await redis_transport.publish([Message(type="score.awarded"), Message(type="match.won")])
    await collector.wait(1)
    await assert_eventually(lambda: _assert_no_pending(admin, redis_transport.stream, "matches"), 5)
    assert [m.type for m, _ in collector.received if m] == ["match.won"]
    await subscription.stop()
    assert await admin.xinfo_consumers(redis_transport.stream, "matches") == []


async def _assert_no_pending(admin: aioredis.Redis, stream: str, group: str) -> None:
    assert (await admin.xpending(stream, group))["pending"] == 0


async def test_maxlen_trims_the_channel_stream(admin: aioredis.Redis) -> None:
    transport = RedisTransport(REDIS_URL, channel=f"redis-{uuid.uuid4().hex[:12]}", maxlen=100)
    await transport.connect()
    try:
        for _ in range(10):
            await transport.publish([Message(type="test.trim") for _ in range(100)])
        assert await admin.xlen(transport.stream) <= 300
        await transport.delete_channel()
    finally:
        await transport.close()


@pytest.mark.fault
async def test_entry_left_pending_by_a_killed_consumer_is_autoclaimed(
    redis_transport: RedisTransport, admin: aioredis.Redis
) -> None:
    await a_killed_consumers_delivery_comes_back(
        redis_transport,
        "from accord.transports.redis import RedisTransport",
        "RedisTransport(sys.argv[1], channel=sys.argv[2], claim_idle=1.0)",
        REDIS_URL,
        redis_transport.channel,
    )
    await assert_eventually(lambda: _assert_no_pending(admin, redis_transport.stream, "crashy"), 5)


@pytest.mark.fault
async def test_consuming_and_publishing_continue_after_connections_are_killed(
    redis_transport: RedisTransport, admin: aioredis.Redis
) -> None:
    collector = Collector()
    await redis_transport.subscribe("survivors", collector)
    first = [Message(type="test.first", data={"n": i}) for i in range(10)]
    await redis_transport.publish(first)
    await collector.wait(10)
    # Kill only this transport's connections (by name), not other tests' clients.
    killed = 0
    for client in await admin.client_list():
        if client.get("name") == redis_transport.client_name:
            killed += await admin.client_kill_filter(_id=client["id"])
    assert killed >= 2  # at least the shared pool's and the subscription's reader

    second = [Message(type="test.second", data={"n": i}) for i in range(10)]

    async def published() -> bool:
        try:
            await redis_transport.publish(second)
        except TransportUnavailable:
            return False
        return True

    await wait_for(published, 10)
    expected = {m.id for m in first + second}
    await wait_for(lambda: expected <= set(collector.ids), 15)


@pytest.mark.redis
async def test_redis_group_members_with_different_topics_get_what_they_asked_for() -> None:
    """Two members of one group subscribe with different topics (a rolling deploy that
    adds a topic): every message either member's topics match reaches the group, as on
    RabbitMQ (bindings add up) and the SQL transport (patterns are the union). Before,
    a member acked what its own topics did not match, dropping it for the group."""
    channel = f"topics-{uuid.uuid4().hex[:12]}"
    transport = RedisTransport(REDIS_URL, channel=channel, claim_idle=3.0)
    await transport.connect()
    try:
        got: list[str] = []

        async def handle(delivery: Delivery) -> None:
            assert delivery.message is not None
            got.append(delivery.message.id)

        await transport.subscribe("workers", handle, topics=["a.*"])
        await transport.subscribe("workers", handle, topics=["b.*"])
        sent = [Message(type="a.x", data={"n": i}) for i in range(20)]
        sent += [Message(type="b.x", data={"n": i}) for i in range(20)]
        for message in sent:  # one by one, so both members get a chance to read
            await transport.publish([message])
            await asyncio.sleep(0.01)
        with contextlib.suppress(TimeoutError):
            await wait_for(lambda: len(set(got)) >= len(sent), 5.0)
        missing = {m.id for m in sent} - set(got)
        assert not missing, f"{len(missing)} of {len(sent)} messages never reached the group"
    finally:
        await transport.close()
        await delete_redis_channel(channel)


@pytest.mark.redis
async def test_keep_alive_does_not_take_back_an_entry_another_member_took_over(
    redis_transport: RedisTransport, admin: aioredis.Redis
) -> None:
    """A consumer's keep-alive resets the idle time of the entries it holds, but one
    another member took over meanwhile (this consumer stalled past claim_idle) stays
    with that member: taken back, both would handle it."""
    got = asyncio.Event()
    release = asyncio.Event()
    held: list[str] = []

    async def hang(delivery: Delivery) -> None:
        held.append(delivery.entry_id)  # type: ignore[attr-defined]
        got.set()
        await release.wait()

    await redis_transport.subscribe("keep", hang)
    await redis_transport.publish([Message(type="test.keep")])
    await asyncio.wait_for(got.wait(), 10)
    # Another member's XAUTOCLAIM, as after a stall of this one: the entry is its now.
    await admin.xclaim(redis_transport.stream, "keep", "other-member", 0, [held[0]], justid=True)
    await asyncio.sleep(1.2)  # several keep-alive rounds (every claim_idle / 3)
    [pending] = await admin.xpending_range(redis_transport.stream, "keep", "-", "+", 10)
    release.set()
    assert pending["consumer"] == b"other-member"


async def test_a_dead_members_entry_behind_many_live_ones_is_taken_over(
    redis_transport: RedisTransport, admin: aioredis.Redis
) -> None:
    """XAUTOCLAIM examines a bounded stretch of the pending list per call (10 x COUNT).
    Started at 0-0 every time, the entries live members keep busy at the head of a
    long list hid a dead member's entry behind them for ever; each scan now goes on
    where the last one stopped."""
    stream, group = redis_transport.stream, "deep"
    await admin.xgroup_create(stream, group, id="0", mkstream=True)
    messages = [Message(type="test.deep") for _ in range(31)]
    await redis_transport.publish(messages)
    live = await admin.xreadgroup(group, "live", {stream: ">"}, count=30)
    live_ids = [entry_id for entry_id, _ in live[0][1]]
    await admin.xreadgroup(group, "ghost", {stream: ">"}, count=1)  # then dies

    async def keep_live_busy() -> None:
        while True:  # as a live member's keep-alive does
            await admin.xclaim(stream, group, "live", 0, live_ids, justid=True)
            await asyncio.sleep(0.1)

    keeper = asyncio.create_task(keep_live_busy())
    seen: list[str] = []

    async def handler(delivery: Delivery) -> None:
        assert delivery.message is not None
        seen.append(delivery.message.id)

    try:
        await asyncio.sleep(1.2)  # the ghost's entry is idle past claim_idle
        await redis_transport.subscribe(group, handler, prefetch=1)
        await wait_for(lambda: messages[-1].id in seen, 15)
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
    assert not set(seen) & {m.id for m in messages[:30]}  # the live ones stayed theirs
