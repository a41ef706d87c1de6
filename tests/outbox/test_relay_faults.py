"""Fault tests: real relay processes killed with SIGKILL, a real broker restarted."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from accord import Consumer, Database, HandlerContext, Message, add_to_outbox
from accord.db.schema import outbox
from accord.testing import Collector, wait_for
from tests.outbox.conftest import broker_url

pytestmark = [pytest.mark.fault, pytest.mark.rabbitmq]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def spawn() -> Iterator[Any]:
    """Start relay processes; whatever is still running at teardown is killed."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.outbox.relay_process", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


async def pending(database: Database) -> int:
    async with database.connect() as conn:
        return int(
            await conn.scalar(sa.select(sa.func.count()).where(outbox.c.status != "SENT")) or 0
        )


# Each fault test runs on SQLite (leases), PostgreSQL with its default (locks held
# through the publish) and PostgreSQL with leases.
CLAIMS = pytest.mark.parametrize(
    "db_url, claims",
    [
        ("sqlite", None),
        pytest.param("postgres", None, marks=pytest.mark.postgres),
        pytest.param("postgres", "lease", marks=pytest.mark.postgres, id="postgres-lease"),
    ],
    indirect=["db_url"],
)


def claims_args(claims: str | None) -> list[str]:
    return [] if claims is None else ["--claims", claims]


@CLAIMS
async def test_two_relays_keep_every_keys_commit_order_under_random_failures(
    db_url: str, claims: str | None, channel: str, make_transport: Any, spawn: Any
) -> None:
    database = Database(db_url)
    broker = broker_url("rabbitmq", db_url)
    consumer = make_transport(broker)
    await consumer.connect()
    received = Collector()
    await consumer.subscribe("scores", received, prefetch=500)

    relays = [
        spawn(
            db_url,
            broker,
            channel,
            "--fail-rate",
            "0.05",
            "--seed",
            str(seed),
            *claims_args(claims),
        )
        for seed in (1, 2)
    ]
    counters: dict[str, int] = defaultdict(int)
    sent: list[Message] = []
    for _ in range(100):  # 100 commits of 100 messages, while both relays run
        batch = []
        for i in range(100):
            key = f"player-{(len(sent) + i) * 7 % 100}"
            batch.append(Message(type="score.changed", key=key, data={"n": counters[key]}))
            counters[key] += 1
        async with database.transaction() as conn:
            await add_to_outbox(conn, *batch)
        sent.extend(batch)

    await received.wait(10_000, timeout=120)
    await asyncio.sleep(1)
    assert len(received.received) == 10_000, "a message was delivered twice"
    assert sorted(received.ids) == sorted(m.id for m in sent), "a message is missing"
    by_key: dict[str, list[int]] = defaultdict(list)
    for message, _ in received.received:
        assert message is not None
        by_key[message.key or ""].append(message.data["n"])
    assert len(by_key) == 100
    for key, numbers in by_key.items():
        assert numbers == list(range(100)), f"{key} arrived out of commit order"
    for proc in relays:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    assert await pending(database) == 0
    await database.dispose()


@CLAIMS
async def test_relay_killed_between_publish_and_mark_sent_publishes_again_and_inbox_applies_once(
    db_url: str,
    claims: str | None,
    tmp_path: Path,
    channel: str,
    make_transport: Any,
    spawn: Any,
) -> None:
    database = Database(db_url)
    receiver = Database(f"sqlite+aiosqlite:///{tmp_path / 'receiver.db'}")  # its own database
    await receiver.upgrade()
    async with receiver.transaction() as conn:
        await conn.execute(sa.text("CREATE TABLE effects (message_id TEXT, n INT)"))
    broker = broker_url("rabbitmq", db_url)
    consumer_transport = make_transport(broker)
    await consumer_transport.connect()
    deliveries = Collector()
    await consumer_transport.subscribe("wiretap", deliveries)
    consumer = Consumer("scores", receiver, consumer_transport)

    @consumer.handler("score.changed")
    async def apply(ctx: HandlerContext, data: dict[str, Any]) -> None:
        await ctx.conn.execute(
            sa.text("INSERT INTO effects VALUES (:id, :n)"), {"id": ctx.message.id, "n": data["n"]}
        )

    await consumer.start()
    messages = [Message(type="score.changed", data={"n": i}) for i in range(5)]
    async with database.transaction() as conn:
        await add_to_outbox(conn, *messages)

    doomed = spawn(
        db_url, broker, channel, "--kill-after", "1", "--lease", "1", *claims_args(claims)
    )
    assert doomed.wait(20) == -signal.SIGKILL
    await deliveries.wait(5)
    assert await pending(database) == 5, "the killed relay must not have marked anything SENT"
    async with database.connect() as conn:
        leased = await conn.scalar(
            sa.select(sa.func.count()).where(outbox.c.available_at > outbox.c.created_at)
        )
    # A lease moved the dead relay's rows forward; a lock died with its transaction.
    assert leased == (0 if database.is_postgres and claims is None else 5)

    survivor = spawn(db_url, broker, channel, "--lease", "1", *claims_args(claims))
    await deliveries.wait(10, timeout=30)

    async def all_sent() -> bool:
        return await pending(database) == 0

    await wait_for(all_sent, 15)
    ids = [m.id for m in messages]
    assert sorted(deliveries.ids) == sorted(ids * 2), "each message reached the broker twice"

    async def effects() -> list[tuple[str, int]]:
        async with receiver.connect() as conn:
            rows = (await conn.execute(sa.text("SELECT message_id, n FROM effects"))).all()
        return [(r[0], r[1]) for r in rows]

    async def inbox_caught_up() -> bool:
        return len(await effects()) >= 5

    await wait_for(inbox_caught_up, 15)
    await asyncio.sleep(1)  # room for a wrongly applied duplicate to show up
    assert sorted(await effects()) == sorted((m.id, i) for i, m in enumerate(messages))
    await consumer.stop()
    survivor.send_signal(signal.SIGTERM)
    assert survivor.wait(20) == 0
    await database.dispose()
    await receiver.dispose()


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


@pytest.mark.serial
@pytest.mark.postgres
async def test_broker_restart_loses_nothing_and_the_backlog_drains(
    pg_url: str, channel: str, make_transport: Any, spawn: Any
) -> None:
    database = Database(pg_url)
    broker = broker_url("rabbitmq", pg_url)
    consumer = make_transport(broker)
    await consumer.connect()
    received = Collector()
    await consumer.subscribe("scores", received, prefetch=200)
    relay = spawn(pg_url, broker, channel)

    sent: list[Message] = []

    async def produce(count: int) -> None:
        for _ in range(count):
            batch = [Message(type="score.changed", data={"n": len(sent) + i}) for i in range(20)]
            async with database.transaction() as conn:
                await add_to_outbox(conn, *batch)
            sent.extend(batch)
            await asyncio.sleep(0.02)

    await produce(25)
    try:
        await asyncio.to_thread(_rabbitmqctl, "stop_app")
        await produce(25)  # commits keep landing in the outbox while the broker is down
        assert await pending(database) > 0
    finally:
        await asyncio.to_thread(_rabbitmqctl, "start_app")
    await produce(25)

    await received.wait(len(sent), timeout=90)
    assert set(received.ids) == {m.id for m in sent}

    async def all_sent() -> bool:
        return await pending(database) == 0

    await wait_for(all_sent, 30)
    relay.send_signal(signal.SIGTERM)
    assert relay.wait(30) == 0
    await database.dispose()


@pytest.mark.parametrize("broker", ["sql", "rabbitmq"])
async def test_accord_outbox_relay_command_relays_and_stops_cleanly_on_sigterm(
    sqlite_url: str, channel: str, make_transport: Any, broker: str
) -> None:
    database = Database(sqlite_url)
    url = broker_url(broker, sqlite_url)
    consumer = make_transport(url)
    await consumer.connect()
    received = Collector()
    await consumer.subscribe("audit", received)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "accord",
        "outbox",
        "relay",
        "--db",
        sqlite_url,
        "--broker",
        url,
        "--channel",
        channel,
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        sent = [Message(type="order.placed", data={"n": i}) for i in range(10)]
        async with database.transaction() as conn:
            await add_to_outbox(conn, *sent)
        await received.wait(10, timeout=30)
        assert sorted(received.ids) == sorted(m.id for m in sent)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr_bytes = await asyncio.wait_for(proc.communicate(), 30)
    stderr = stderr_bytes.decode()
    assert proc.returncode == 0, stderr[-2000:]
    assert await pending(database) == 0
    await database.dispose()
