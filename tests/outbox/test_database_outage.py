"""Fault test: the PostgreSQL server goes away while the messaging core works.

Producers commit business rows with their outbox messages, a relay process publishes
them to RabbitMQ and a consumer process applies each through its inbox, each service on
its own database of the one server; the server is stopped for a few seconds, then
started, while all that flows. Neither process is restarted: they must ride the outage
out. Every committed message is applied exactly once, nothing else is; a producer
transaction that did not commit left nothing."""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import sqlalchemy as sa

from accord import Database, Message, add_to_outbox
from accord.db.schema import dead_letters, outbox
from accord.testing import wait_for
from tests.brokers import delete_everything, postgres_stopped
from tests.conftest import RABBIT_URL, fresh_pg_database
from tests.outbox import outage_worker
from tests.processes import Processes

pytestmark = [
    pytest.mark.fault,
    pytest.mark.slow,
    pytest.mark.serial,
    pytest.mark.postgres,
    pytest.mark.rabbitmq,
]

orders = sa.Table(
    "outage_orders",
    sa.MetaData(),
    sa.Column("id", sa.String(200), primary_key=True),
    sa.Column("n", sa.Integer, nullable=False),
)


class RolledBack(Exception):
    """A producer's transaction given up on purpose, after its writes."""


@dataclass
class Ledger:
    """What the producers know of their transactions, by order (= message) id."""

    committed: set[str] = field(default_factory=set)
    #: failed before COMMIT was sent (or rolled back on purpose): must leave nothing
    rolled_back: set[str] = field(default_factory=set)
    #: failed at COMMIT: committed or not, but whole or not at all
    unknown: set[str] = field(default_factory=set)
    failures: int = 0


async def produce(
    database: Database, ledger: Ledger, numbers: itertools.count[int], stop: asyncio.Event
) -> None:
    """Commit an order and its message after another until ``stop``; every seventh is
    rolled back on purpose. Failures (the server is away) are noted and the producer
    goes on with a new order after a pause, as an application would."""
    while not stop.is_set():
        n = next(numbers)
        order_id = str(uuid.uuid4())
        sent = False  # the body ran to its end: COMMIT is what failed, if anything
        try:
            async with database.transaction() as conn:
                await conn.execute(orders.insert().values(id=order_id, n=n))
                await asyncio.sleep(0.005)  # an application's work between its writes
                await add_to_outbox(
                    conn,
                    Message(id=order_id, type="order.placed", key=f"k{n % 8}", data={"n": n}),
                )
                if n % 7 == 0:
                    raise RolledBack
                sent = True
        except RolledBack:
            ledger.rolled_back.add(order_id)
        except Exception:
            ledger.failures += 1
            (ledger.unknown if sent else ledger.rolled_back).add(order_id)
            await asyncio.sleep(0.1)
        else:
            ledger.committed.add(order_id)
            await asyncio.sleep(0.01)


async def straddle(database: Database, ledger: Ledger, resume: asyncio.Event) -> str:
    """A producer's transaction open across the outage: its writes are made before,
    its next statement and its COMMIT after. Its id."""
    order_id = str(uuid.uuid4())
    sent = False
    try:
        async with database.transaction() as conn:
            await conn.execute(orders.insert().values(id=order_id, n=-1))
            await add_to_outbox(conn, Message(id=order_id, type="order.placed", data={"n": -1}))
            await resume.wait()
            await conn.execute(sa.select(sa.func.count()).select_from(orders))
            sent = True
    except Exception:
        (ledger.unknown if sent else ledger.rolled_back).add(order_id)
    else:
        ledger.committed.add(order_id)
    return order_id


@pytest.fixture
async def receiver_url(pg_template: str) -> AsyncIterator[str]:
    """The consuming service's own database, on the same server."""
    async with fresh_pg_database(pg_template) as url:
        yield url


async def ids_of(database: Database, query: sa.Select[tuple[str]]) -> list[str]:
    async with database.connect() as conn:
        return [str(row[0]) for row in (await conn.execute(query)).all()]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("claims", ["lock", "lease"])
async def test_database_restart_mid_flow_applies_every_committed_message_exactly_once(
    pg_url: str, receiver_url: str, claims: str, tmp_path: Path
) -> None:
    producer_db = Database(pg_url)
    receiver_db = Database(receiver_url)
    async with producer_db.transaction() as conn:
        await conn.run_sync(lambda sync: orders.create(sync))
    async with receiver_db.transaction() as conn:
        await conn.run_sync(lambda sync: outage_worker.effects.create(sync))
    channel = f"outage-{uuid.uuid4().hex[:10]}"
    ledger = Ledger()
    numbers = itertools.count()
    logs = {role: tmp_path / f"{role}.log" for role in ("consumer", "relay")}
    producers: list[asyncio.Task[None]] = []
    stop = asyncio.Event()
    try:
        async with Processes() as processes:
            workers: dict[str, subprocess.Popen[str]] = {}
            for role, url in (("consumer", receiver_url), ("relay", pg_url)):
                args = [role, url, RABBIT_URL, channel, "--claims", claims]
                with logs[role].open("w") as log:
                    workers[role] = await processes.spawn(
                        "tests.outbox.outage_worker", *args, stderr=log
                    )
            producers = [
                asyncio.create_task(produce(producer_db, ledger, numbers, stop)) for _ in range(4)
            ]

            async def applied_more_than(count: int) -> bool:
                query = sa.select(sa.func.count()).select_from(outage_worker.effects)
                async with receiver_db.connect() as conn:
                    return int(await conn.scalar(query) or 0) > count

            await wait_for(lambda: applied_more_than(100), 30, interval=0.1)

            resume = asyncio.Event()
            straddler = asyncio.create_task(straddle(producer_db, ledger, resume))
            await asyncio.sleep(0.2)
            async with postgres_stopped():
                # Producers fail meanwhile; the workers' work in flight is cut off.
                await asyncio.sleep(4)
            resume.set()
            assert await straddler in ledger.rolled_back, (
                "a transaction open across the outage committed"
            )
            before = len(ledger.committed)

            # Back: the producers commit again, and what they commit now flows too.
            await wait_for(lambda: len(ledger.committed) > before + 100, 30, interval=0.1)
            stop.set()
            await asyncio.gather(*producers)
            assert ledger.failures > 0, "the outage came too late to test anything"

            async def all_sent() -> bool:
                query = sa.select(sa.func.count()).where(outbox.c.status != "SENT")
                async with producer_db.connect() as conn:
                    return await conn.scalar(query) == 0

            # With leases, a batch published before the outage whose settling it cut off
            # stays PENDING until its lease (30 s) runs out, then goes again: a minute.
            await wait_for(all_sent, 60, interval=0.1)
            stored = len(await ids_of(producer_db, sa.select(orders.c.id)))

            async def caught_up() -> bool:
                # Or given up on: a dead letter, reported below.
                letters = await ids_of(receiver_db, sa.select(dead_letters.c.message_id))
                return bool(letters) or await applied_more_than(stored - 1)

            await wait_for(caught_up, 30, interval=0.1)
            # Room for a wrongly applied duplicate to show up; and with nothing left to
            # do, a worker that recovered has nothing to log (no error in a loop).
            logged = {role: log.stat().st_size for role, log in logs.items()}
            await asyncio.sleep(1.5)
            for role, log in logs.items():
                assert log.stat().st_size == logged[role], f"the {role} goes on: {tail(log)}"

            for role, proc in workers.items():
                assert proc.poll() is None, f"the {role} died: {tail(logs[role])}"
                proc.send_signal(signal.SIGTERM)
                assert await processes.exited(proc, 30) == 0, tail(logs[role])

        orders_stored = set(await ids_of(producer_db, sa.select(orders.c.id)))
        messages = set(await ids_of(producer_db, sa.select(outbox.c.id)))
        effects = Counter(await ids_of(receiver_db, sa.select(outage_worker.effects.c.message_id)))
        letters = await ids_of(receiver_db, sa.select(dead_letters.c.message_id))
        assert orders_stored == messages, "an order and its message did not commit together"
        assert ledger.committed <= orders_stored, "a committed order is missing"
        assert not (ledger.rolled_back & orders_stored), "a transaction that failed left a row"
        assert orders_stored <= ledger.committed | ledger.unknown
        assert not letters, f"{len(letters)} message(s) dead-lettered: {letters[:5]}"
        assert set(effects) == orders_stored, (
            f"{len(orders_stored - set(effects))} message(s) never applied, "
            f"{len(set(effects) - orders_stored)} applied that no order committed"
        )
        twice = [message_id for message_id, n in effects.items() if n > 1]
        assert not twice, f"{len(twice)} message(s) applied twice"
    finally:
        for task in producers:
            task.cancel()
        await asyncio.gather(*producers, return_exceptions=True)
        await delete_everything({channel: {outage_worker.GROUP}})
        await producer_db.dispose()
        await receiver_db.dispose()


def tail(log: Path, lines: int = 30) -> str:
    """The end of a worker's log, for a failure's message."""
    return "\n".join(log.read_text().splitlines()[-lines:])
