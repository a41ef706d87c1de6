"""Input no Accord producer makes, and a subscribe racing close: a JSON body nested
too deep to read, a foreign Redis entry's attempt field, a type in NATS's dead-letter
subjects. Each was a consumer that died or stalled, or a message dropped unseen;
each is now dead-lettered, refused or consumed as any other. Real servers only."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
import redis.asyncio as aioredis
from tests.conftest import NATS_URL, REDIS_URL
from tests.transports.conftest import delete_redis_channel
from tests.transports.test_rabbitmq import rabbit  # noqa: F401 - the fixture

from accord.errors import ConfigurationError
from accord.messages import Message, encode
from accord.testing import CapturedDelivery, Collector, wait_for
from accord.transports.memory import MemoryTransport
from accord.transports.nats import NatsTransport, stream_name
from accord.transports.redis import RedisTransport
from accord.transports.sql import SqlTransport

# A body json.loads gives up on with RecursionError (not a ValueError): deep nesting.
DEEP_JSON = b"[" * 100_000


def _ce_headers(message_type: str = "bad.deep") -> dict[str, str]:
    return {
        "ce-id": str(uuid.uuid4()),
        "ce-source": "tests/hostile",
        "ce-type": message_type,
        "ce-specversion": "1.0",
        "content-type": "application/json",
    }


async def _expect_bad_then_good(collector: Collector, good: Message) -> None:
    def good_arrived() -> bool:
        return good.id in collector.ids

    await wait_for(good_arrived, 15.0)
    bad = [d for d in collector.deliveries if d.message is None]
    assert bad and bad[0].decode_error is not None, "the undecodable delivery never arrived"


# -- deeply nested JSON: RecursionError escapes Delivery.__init__ ---------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'queue.db'}"
    return str(request.getfixturevalue("pg_url"))


async def test_sql_deeply_nested_json_body_does_not_kill_the_subscription(sql_url: str) -> None:
    """A message whose JSON body nests too deeply for ``json.loads`` (it raises
    RecursionError, not a JSONDecodeError) must reach the handler as an undecodable
    delivery (``message is None``, ``decode_error`` set), and the message after it
    must be delivered too: bad input never stops a subscription.

    Before the fix, ``SqlSubscription._run`` builds the ``SqlDelivery`` outside its try: the
    RecursionError ends the consuming task, the heartbeat keeps extending the lease of
    what was claimed, and nothing more is ever delivered to this consumer."""
    transport = SqlTransport(sql_url, channel="hostile", poll_interval=0.1, lease=2.0)
    await transport.connect()
    try:
        collector = Collector()
        await transport.subscribe("deep", collector)
        await transport.publish_raw(_ce_headers(), DEEP_JSON)
        good = Message(type="good.after")
        await transport.publish([good])
        await _expect_bad_then_good(collector, good)
    finally:
        await transport.close()


async def test_memory_deeply_nested_json_body_does_not_kill_the_subscription() -> None:
    """The in-memory transport (users' unit tests) must behave like the others: the
    undecodable delivery reaches the handler with ``decode_error`` and the next message
    arrives. Before the fix, ``_MemorySubscription._run`` dies on the RecursionError raised while
    building the ``_MemoryDelivery``."""
    transport = MemoryTransport()
    await transport.connect()
    try:
        collector = Collector()
        await transport.subscribe("deep", collector)
        await transport.publish_raw(_ce_headers(), DEEP_JSON)
        good = Message(type="good.after")
        await transport.publish([good])
        await _expect_bad_then_good(collector, good)
    finally:
        await transport.close()


@pytest.fixture
async def nats_transport() -> AsyncIterator[NatsTransport]:
    transport = NatsTransport(NATS_URL, channel=f"hostile-{uuid.uuid4().hex[:12]}", ack_wait=2.0)
    await transport.connect()
    yield transport
    await transport.close()
    nc = await nats.connect(NATS_URL)
    try:
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(stream_name(transport.channel))
    finally:
        await nc.close()


@pytest.mark.nats
async def test_nats_deeply_nested_json_body_does_not_kill_the_subscription(
    nats_transport: NatsTransport,
) -> None:
    """A foreign message on the channel whose JSON body nests too deeply must be
    handed over undecodable, and the messages after it delivered.

    Before the fix, ``NatsSubscription._run`` builds ``_NatsDelivery`` objects outside its try:
    the RecursionError ends the pull loop for good (the subscription object looks alive)
    and the group's messages pile up unconsumed."""
    collector = Collector()
    await nats_transport.subscribe("deep", collector)
    nc = await nats.connect(NATS_URL)
    try:
        await nc.jetstream().publish(
            f"{nats_transport.channel}.bad.deep", DEEP_JSON, headers=_ce_headers()
        )
    finally:
        await nc.close()
    good = Message(type="good.after")
    await nats_transport.publish([good])
    await _expect_bad_then_good(collector, good)


@pytest.mark.redis
async def test_redis_deeply_nested_json_body_does_not_stall_its_batch(
    redis_transport: RedisTransport, admin: aioredis.Redis
) -> None:
    """A foreign entry whose JSON body nests too deeply must be handed over
    undecodable, and a good entry read together with it must be delivered.

    Before the fix, ``_RedisDelivery`` raises RecursionError inside ``_parse``: the whole read is
    dropped as "reading failed", its entries stay pending, and every XAUTOCLAIM of them
    fails the same way, so the good entry read with the bad one is never handled."""
    collector = Collector()
    await redis_transport.subscribe("deep", collector)
    good = Message(type="good.after")
    headers, body = encode(good)
    # One pipeline: both entries are there before the consumer's next read.
    pipe = admin.pipeline(transaction=False)
    pipe.xadd(redis_transport.stream, {**_ce_headers(), "body": DEEP_JSON})
    pipe.xadd(redis_transport.stream, {**headers, "body": body})
    await pipe.execute()
    await _expect_bad_then_good(collector, good)


@pytest.mark.redis
async def test_redis_entry_with_a_non_integer_attempt_field_does_not_stall_its_batch(
    redis_transport: RedisTransport, admin: aioredis.Redis
) -> None:
    """A foreign entry on the channel stream whose ``accord-attempt`` field is not an
    integer is bad input like any other: it must not stop the good entries read with it.

    Before the fix, ``_RedisDelivery.__init__`` read it with a bare ``int()``:
    the ValueError drops the whole read (and, after ``claim_idle``, every XAUTOCLAIM of
    it), so the good entry in the same read is never delivered."""
    collector = Collector()
    await redis_transport.subscribe("attempts", collector)
    good = Message(type="good.after")
    headers, body = encode(good)
    bad_headers, bad_body = encode(Message(type="bad.attempt"))
    pipe = admin.pipeline(transaction=False)
    pipe.xadd(redis_transport.stream, {**bad_headers, "accord-attempt": "two", "body": bad_body})
    pipe.xadd(redis_transport.stream, {**headers, "body": body})
    await pipe.execute()

    def good_arrived() -> bool:
        return good.id in collector.ids

    await wait_for(good_arrived, 15.0)


# -- NATS: a message type that starts with "_dead." ----------------------------------------


@pytest.mark.nats
async def test_nats_message_type_starting_with_dead_prefix_is_not_silently_dropped(
    nats_transport: NatsTransport,
) -> None:
    """A valid CloudEvents type such as ``_dead.letter`` is either delivered to a group
    subscribed to ``#`` or refused at publish time (PublishError). It must never be
    confirmed and then acked unseen.

    Before the fix, ``publish_envelopes`` puts it on ``<channel>._dead.letter``, the subject prefix
    the transport uses for its own dead letters; ``NatsSubscription._wanted`` treats it
    as a dead letter and ``_settle`` acks it without calling the handler: lost."""
    collector = Collector()
    await nats_transport.subscribe("all", collector, topics=["#"])
    odd = Message(type="_dead.letter")
    try:
        await nats_transport.publish([odd])
    except Exception:
        return  # refused at publish: acceptable
    marker = Message(type="marker.after")
    await nats_transport.publish([marker])

    def marker_arrived() -> bool:
        return marker.id in collector.ids

    await wait_for(marker_arrived, 15.0)
    await asyncio.sleep(0.3)
    assert odd.id in collector.ids, "the published, confirmed message never reached the group"


# -- subscribe racing close -----------------------------------------------------------


async def _subscribe_racing_close(make: Any) -> Collector:
    """Start a subscribe, close the transport while it is under way, then publish from
    another transport; return what the raced subscription's handler received."""
    transport = make()
    await transport.connect()
    collector = Collector()
    subscribing = asyncio.create_task(transport.subscribe("raced", collector))
    await asyncio.sleep(0)  # the subscribe is waiting on the server now
    await transport.close()
    with contextlib.suppress(Exception):
        await subscribing  # raising is fine: the transport is closed
    other = make()
    await other.connect()
    try:
        await other.publish([Message(type="after.close")])
        await asyncio.sleep(2.0)
    finally:
        await other.close()
        if not subscribing.cancelled() and subscribing.exception() is None:
            await subscribing.result().stop()  # the leaked one, so the test ends cleanly
    return collector


async def test_sql_subscribe_racing_close_leaves_no_live_consumer(tmp_path: Path) -> None:
    """``close()`` stops every subscription of the transport; a ``subscribe`` that was
    under way when ``close()`` ran must raise (the transport is closed) or be stopped
    too. Nothing published after ``close()`` returned may reach its handler.

    Before the fix, ``SqlTransport.subscribe_batches`` checks ``_closed`` only before its first
    await; ``close()`` runs meanwhile (no subscription listed yet, database disposed),
    then the subscribe goes on, appends a running ``SqlSubscription`` to a closed
    transport and it consumes (SQLAlchemy reopens the disposed pool; on PostgreSQL it
    also opens a LISTEN connection nobody closes)."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'queue.db'}"
    collector = await _subscribe_racing_close(
        lambda: SqlTransport(url, channel="race", poll_interval=0.1, lease=2.0)
    )
    assert collector.received == [], "a subscription of a closed transport consumed"


@pytest.mark.redis
async def test_redis_subscribe_racing_close_leaves_no_live_consumer() -> None:
    """As for SQL: a ``subscribe`` under way when ``close()`` ran must raise or be
    stopped. Before the fix, ``RedisTransport.subscribe_batches`` takes the client before its
    first await and never looks again: ``close()`` closes that client, the subscribe
    goes on (redis-py reconnects a closed client on the next command) and the new
    ``RedisSubscription`` consumes the group's messages after ``close()`` returned."""
    channel = f"hostile-{uuid.uuid4().hex[:12]}"
    try:
        collector = await _subscribe_racing_close(
            lambda: RedisTransport(REDIS_URL, channel=channel, claim_idle=1.0)
        )
        assert collector.received == [], "a subscription of a closed transport consumed"
    finally:
        await delete_redis_channel(channel)


@pytest.mark.parametrize(
    ("delay", "waited"), [(float("inf"), 7 * 86_400.0), (float("nan"), 0.0), (-5.0, 0.0)]
)
async def test_a_nack_delay_out_of_range_is_brought_into_it(delay: float, waited: float) -> None:
    """An infinite delay overflowed the brokers' time arithmetic (OverflowError out of
    nack); it waits a week, and a negative or NaN one not at all."""
    delivery = CapturedDelivery(Message(type="t.x"))
    await delivery.nack(delay)
    assert (delivery.outcome, delivery.delay) == ("nack", waited)


async def test_a_sql_prefetch_past_what_a_claim_can_carry_is_refused(tmp_path: Path) -> None:
    """A claim carries one statement parameter per delivery; 40,000 would fail every
    claim on PostgreSQL (asyncpg takes 32,767), for ever."""
    transport = SqlTransport(f"sqlite+aiosqlite:///{tmp_path / 'q.db'}", channel="hostile")
    try:
        with pytest.raises(ConfigurationError, match="prefetch must be at most 10000"):
            await transport.subscribe("g", Collector(), prefetch=40_000)
    finally:
        await transport.close()
