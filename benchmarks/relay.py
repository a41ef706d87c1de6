"""Relay benchmarks: throughput to RabbitMQ and NATS against a bare driver loop,
commit-to-broker latency at a steady rate, the cost of ``outbox.add``, relay
memory with a million pending rows, and the cost of one claim over keyed backlogs
(``claim``: Accord's per-key-ordered claim against a bare ``FOR UPDATE SKIP
LOCKED`` claim that keeps no order), and what messages scheduled for later cost the
relay (``scheduled``: a claim behind many of them against the same claim without).

    .venv/bin/python -m benchmarks.relay [--quick] [--only NAME ...] [--claims lock|lease]
        [--rtt-ms MS]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
from tests.brokers import delete_everything

from accord import Database, Message, add_to_outbox, outbox_transaction
from accord.outbox import OutboxAdmin, Relay
from accord.testing import wait_for
from accord.transports import from_url
from accord.transports.rabbitmq import RabbitTopology
from benchmarks._common import (
    BARE_CLAIM,
    NATS_URL,
    RABBIT_URL,
    ScratchDatabase,
    bare_amqp_message,
    console,
    median,
    percentile,
    report,
)

PAYLOAD = {"tournament": "t-0001", "player": "p-000042", "points": 3, "note": "x" * 120}

FILL_SQL = """
INSERT INTO accord_outbox (id, event_type, key, payload, headers, status, retry_count,
                           available_at, created_at)
SELECT u, 'bench.scored', NULL, $2::jsonb,
       jsonb_build_object('ce-id', u::text, 'ce-source', 'bench', 'ce-type', 'bench.scored',
                          'ce-specversion', '1.0', 'ce-time', '2026-01-01T00:00:00Z',
                          'content-type', 'application/json'),
       'PENDING', 0, now(), now()
FROM (SELECT gen_random_uuid() AS u FROM generate_series(1, $1)) AS g
"""


async def fill(dsn: str, count: int) -> None:
    conn = await asyncpg.connect(dsn)
    await conn.execute("TRUNCATE accord_outbox")
    await conn.execute(FILL_SQL, count, json.dumps(PAYLOAD))
    await conn.execute("VACUUM ANALYZE accord_outbox")
    await conn.close()


# -- the bare baselines: an asyncpg claim loop publishing with the plain client ---------

MARK = "UPDATE accord_outbox SET status = 'SENT', sent_at = now() WHERE seq = ANY($1)"


async def bare_loop(dsn: str, publish: Any, batch: int) -> int:
    conn = await asyncpg.connect(dsn)
    total = 0
    while True:
        async with conn.transaction():
            rows = await conn.fetch(BARE_CLAIM, batch)
            if not rows:
                break
            await publish(rows)
            await conn.execute(MARK, [r["seq"] for r in rows])
        total += len(rows)
    await conn.close()
    return total


async def bare_rabbit(dsn: str, batch: int) -> tuple[int, Any]:
    import aio_pika

    connection = await aio_pika.connect(RABBIT_URL)
    channel = await connection.channel(publisher_confirms=True)
    name = f"bench-bare-{uuid.uuid4().hex[:6]}"
    exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(name, durable=True)
    await queue.bind(exchange, "#")

    async def publish(rows: list[Any]) -> None:
        await asyncio.gather(
            *(exchange.publish(bare_amqp_message(r), routing_key=r["event_type"]) for r in rows)
        )

    async def cleanup() -> None:
        await queue.delete(if_unused=False, if_empty=False)
        await exchange.delete()
        await connection.close()

    return await bare_loop(dsn, publish, batch), cleanup


async def bare_nats(dsn: str, batch: int) -> tuple[int, Any]:
    import nats

    nc = await nats.connect(NATS_URL)
    js = nc.jetstream()
    name = f"benchbare{uuid.uuid4().hex[:6]}"
    await js.add_stream(name=name, subjects=[f"{name}.>"])

    async def publish(rows: list[Any]) -> None:
        await asyncio.gather(
            *(
                js.publish(
                    f"{name}.{r['event_type']}",
                    r["payload"].encode(),
                    headers={**json.loads(r["headers"]), "Nats-Msg-Id": str(r["id"])},
                )
                for r in rows
            )
        )

    async def cleanup() -> None:
        await js.delete_stream(name)
        await nc.close()

    return await bare_loop(dsn, publish, batch), cleanup


# -- Accord's relay over the same rows ----------------------------------------------------


async def accord_relay(url: str, broker: str, batch: int, claims: str) -> tuple[int, Any]:
    channel = f"bench-accord-{uuid.uuid4().hex[:6]}"
    transport = from_url(broker, channel=channel)
    await transport.connect()
    # A bound queue, so the broker routes and stores every message as in the baseline.
    sink = await transport.subscribe("sink", _drop, prefetch=1)
    await sink.stop()
    database = Database(url)
    relay = Relay(database, transport, batch_size=batch, poll_interval=0.05, claims=claims)
    task = asyncio.create_task(relay.run())
    stats = OutboxAdmin(database)

    async def drained() -> bool:
        return (await stats.status()).pending == 0

    await wait_for(drained, 600, interval=0.02)
    await relay.stop()
    await task
    total = (await stats.status()).sent

    async def cleanup() -> None:
        await transport.close()
        await database.dispose()
        if broker.startswith("amqp"):  # the sink holds every message published
            await delete_everything({channel: {"sink"}})

    return total, cleanup


async def _drop(_delivery: Any) -> None:
    return None


async def throughput(
    scratch: ScratchDatabase, broker: str, count: int, rounds: int, claims: str = "lock"
) -> dict[str, Any]:
    bare_fn = bare_rabbit if broker.startswith("amqp") else bare_nats
    bare_rates, accord_rates = [], []
    for _ in range(rounds):
        for which in ("bare", "accord"):
            await fill(scratch.dsn, count)
            started = time.perf_counter()
            if which == "bare":
                done, cleanup = await bare_fn(scratch.dsn, 500)
            else:
                done, cleanup = await accord_relay(scratch.url, broker, 500, claims)
            elapsed = time.perf_counter() - started
            await cleanup()
            assert done == count, f"{which} published {done} of {count}"
            (bare_rates if which == "bare" else accord_rates).append(count / elapsed)
    bare, ours = median(bare_rates), median(accord_rates)
    kind = "RabbitMQ" if broker.startswith("amqp") else "NATS"
    return {
        "benchmark": f"relay PostgreSQL -> {kind} (msg/s)"
        + ("" if claims == "lock" else f", claims={claims}"),
        "accord": ours,
        "baseline": bare,
        "ratio": ours / bare,
        "goal": ">= 0.90" if kind == "RabbitMQ" else ">= 0.75",
    }


async def latency(
    scratch: ScratchDatabase, seconds: float, rate: int, consume: bool
) -> dict[str, Any]:
    """Commit-to-broker latency with the relay woken by LISTEN/NOTIFY, and the same
    for the bare baseline (``_relay_child --bare``: one asyncpg loop publishing with
    plain aio-pika) in the same run, each into a queue of its own: two runs of each,
    in the order bare, Accord, Accord, bare, and the median of each pair.

    Two clocks: ``p50``/``p99`` run from ``outbox.add`` (before the commit) to the
    broker's confirm, so they include the producer's own commit; ``commit_p50``/
    ``commit_p99`` from the moment the commit returned to the producer (which is at
    or after the commit itself) to the confirm.

    With ``consume``, a consumer in this process also takes every message off the
    queue and the commit-to-consumer latency is reported too; without, the
    messages pile up in a bound durable queue (the broker still persists each one
    before confirming, and its confirms slow down as the queue grows) and the CPU
    goes to the producer, PostgreSQL, the relay and the broker alone.
    """
    runs: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    for bare in (True, False, False, True):  # against drift: bare, ours, ours, bare
        runs[bare].append(await _latency_run(scratch, seconds, rate, consume, bare=bare))
    ours, bares = runs[False], runs[True]
    p99 = median([r["p99"] for r in ours])
    bare_p99 = median([r["p99"] for r in bares])
    return {
        "benchmark": f"commit-to-broker latency p99 @ {rate} msg/s, "
        f"{'with' if consume else 'no'} consumer (ms; median of 2 runs)",
        "accord": p99,
        "baseline": bare_p99,
        "ratio": p99 / bare_p99,
        **{k: median([r[k] for r in ours]) for k in ("p50", "commit_p50", "commit_p99")},
        "p99": p99,
        "runs": ours,
        "bare_runs": bares,
        "goal": "p99 < 20",
    }


async def _latency_run(
    scratch: ScratchDatabase, seconds: float, rate: int, consume: bool, *, bare: bool
) -> dict[str, Any]:
    import aio_pika

    channel = f"bench-lat-{uuid.uuid4().hex[:6]}"
    consumer = from_url(RABBIT_URL, channel=channel)
    await consumer.connect()  # declares the exchange both relays publish to
    samples: list[float] = []

    async def on_message(delivery: Any) -> None:
        samples.append(time.time() - delivery.message.data["t"])

    if consume:
        await consumer.subscribe("latency", on_message, prefetch=500)
    else:
        held = await aio_pika.connect(RABBIT_URL)
        declare = await held.channel()
        queue = await declare.declare_queue(RabbitTopology(channel).queue("latency"), durable=True)
        await queue.bind(channel, "#")
        await held.close()
    await fill(scratch.dsn, 0)
    relay = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks._relay_child",
        scratch.url,
        RABBIT_URL,
        channel,
        *(["--bare"] if bare else []),
        stdout=asyncio.subprocess.PIPE,
    )
    assert relay.stdout is not None
    assert (await relay.stdout.readline()).strip() == b"ready"
    await asyncio.sleep(0.5)

    total = int(seconds * rate)
    producer = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks._producer_child",
        scratch.url,
        str(rate),
        str(seconds),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await producer.communicate()
    first, *commits = out.decode().splitlines() or ["0"]
    achieved = float(first)
    committed_at = dict(line.split() for line in commits)
    if consume:
        with contextlib.suppress(TimeoutError):
            await wait_for(lambda: len(samples) >= total, 30)
    relay.send_signal(signal.SIGTERM)
    await relay.wait()
    await consumer.close()
    await delete_everything({channel: {"latency"}})
    conn = await asyncpg.connect(scratch.dsn)
    # created_at is taken when the message is added, before the commit; sent_at after
    # the broker's confirm; the producer noted when each commit returned to it.
    rows = await conn.fetch(
        "SELECT id::text, EXTRACT(EPOCH FROM created_at) AS added, "
        "EXTRACT(EPOCH FROM sent_at) AS sent FROM accord_outbox WHERE status = 'SENT'"
    )
    await conn.close()
    broker_ms = [(float(r["sent"]) - float(r["added"])) * 1000 for r in rows]
    from_commit_ms = [
        (float(r["sent"]) - float(committed_at[r["id"]])) * 1000
        for r in rows
        if r["id"] in committed_at
    ]
    consumer_ms = [s * 1000 for s in samples]
    return {
        "p50": percentile(broker_ms, 50),
        "p99": percentile(broker_ms, 99),
        "commit_p50": percentile(from_commit_ms, 50),
        "commit_p99": percentile(from_commit_ms, 99),
        "consumer_p50": percentile(consumer_ms, 50) if consume else None,
        "consumer_p99": percentile(consumer_ms, 99) if consume else None,
        "sent": len(broker_ms),
        "commit_samples": len(from_commit_ms),  # SENT rows matched to a commit time
        "received": len(samples) if consume else None,
        "rate": achieved,
    }


async def add_cost(
    scratch: ScratchDatabase, count: int, rtt_ms: float = 0.0
) -> list[dict[str, Any]]:
    """Business insert alone vs business insert + outbox.add, same transaction shape.

    Two ways to add: ``add_to_outbox`` in an ordinary transaction (one statement
    more) and in ``outbox_transaction`` (the rows go with the COMMIT). Also, in the
    same run, the business insert followed by one ``SELECT 1`` sent straight to
    asyncpg in the same transaction: the cost of one round trip, the least any
    outbox pays that writes its row in a statement of its own. With ``rtt_ms`` every
    connection goes through a proxy that adds that round trip (a network's).
    """
    import sqlalchemy as sa

    url = scratch.url
    proxy: asyncio.subprocess.Process | None = None
    if rtt_ms:
        port = 15432
        proxy = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "benchmarks._delay_proxy", str(port), "5432", str(rtt_ms / 2)),
            stdout=asyncio.subprocess.PIPE,
        )
        assert proxy.stdout is not None and (await proxy.stdout.readline()).strip() == b"ready"
        url = url.replace(":5432/", f":{port}/")
    try:
        return await _add_cost(url, count, rtt_ms, sa)
    finally:
        if proxy is not None:
            proxy.kill()
            await proxy.wait()


async def _add_cost(url: str, count: int, rtt_ms: float, sa: Any) -> list[dict[str, Any]]:
    database = Database(url)
    async with database.transaction() as conn:
        await conn.execute(
            sa.text(
                "CREATE TABLE IF NOT EXISTS orders (id uuid PRIMARY KEY, customer text, "
                "total numeric, created_at timestamptz DEFAULT now())"
            )
        )
    insert = sa.text("INSERT INTO orders (id, customer, total) VALUES (:id, :customer, :total)")

    async def one(kind: str) -> float:
        started = time.perf_counter()
        opened = outbox_transaction(database) if kind == "block" else database.transaction()
        async with opened as conn:
            order = uuid.uuid4()
            await conn.execute(insert, {"id": order, "customer": "c-42", "total": 99.5})
            if kind in ("add", "block"):
                await add_to_outbox(
                    conn, Message(type="order.placed", data={"order": str(order), **PAYLOAD})
                )
            elif kind == "round trip":
                raw = await conn.get_raw_connection()
                await raw.driver_connection.fetchval("SELECT 1")  # type: ignore[union-attr]
        return time.perf_counter() - started

    kinds = ("alone", "add", "block", "round trip")
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(200):  # warm up
        for kind in kinds:
            await one(kind)
    for i in range(count):
        # rotate which goes first, against drift
        for kind in kinds[i % len(kinds) :] + kinds[: i % len(kinds)]:
            times[kind].append(await one(kind))
    await database.dispose()
    base, added, block, trip = (median(times[kind]) for kind in kinds)
    network = f", {rtt_ms:g} ms round trip added" if rtt_ms else ""
    common = {
        "baseline": base * 1e6,
        "one_round_trip_pct": (trip / base - 1) * 100,
        "goal": "< 15",
    }
    return [
        {
            "benchmark": f"outbox.add overhead on a business transaction (%){network}",
            "accord": (added / base - 1) * 100,
            "with_outbox_us": added * 1e6,
            **common,
        },
        {
            "benchmark": f"the same in outbox_transaction: rows sent with the COMMIT (%){network}",
            "accord": (block / base - 1) * 100,
            "with_outbox_us": block * 1e6,
            **common,
        },
    ]


def _peak_rss_kb(command: list[str]) -> int:
    proc = subprocess.Popen(command)
    peak = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
        except FileNotFoundError:
            break
        time.sleep(0.2)
    proc.wait()
    return peak


KEYED_FILL_SQL = """
INSERT INTO accord_outbox (id, event_type, key, payload, headers, status, retry_count,
                           available_at, created_at)
SELECT gen_random_uuid(), 'bench.scored', {key}, $2::jsonb, '{{}}'::jsonb, 'PENDING', 0,
       now() - interval '1 minute', now()
FROM generate_series(1, $1) AS g
"""

# The backlogs of the claim benchmark: the rows' key, by row number g.
BACKLOGS = {
    "no keys": "NULL",
    "1,000 keys": "'k' || (g % 1000)",
    "one key": "'only'",
    "one key of 99.5 % in backoff, 1,000 others": (
        "CASE WHEN g <= {big} THEN 'big' ELSE 'k' || (g % 1000) END"
    ),
}


async def claim_cost(rows: int, repeats: int) -> list[dict[str, Any]]:
    """Median time of one 500-row claim (in a transaction rolled back, so every
    claim sees the same backlog) by Accord's relay and by a bare claim, per backlog,
    on a table just loaded (PostgreSQL has no statistics for it yet: as for up to a
    minute after a bulk load, until autovacuum analyzes it) and once analyzed."""
    from accord.outbox._claim import _claim_ahead

    results = []
    for name, key in BACKLOGS.items():
        for analyzed in (False, True):
            # A database of its own each time: a table PostgreSQL never analyzed.
            async with ScratchDatabase("accord_bench_claim") as fresh:
                database = Database(fresh.url)
                await database.upgrade()
                await database.dispose()
                conn = await asyncpg.connect(fresh.dsn)
                fill_sql = KEYED_FILL_SQL.format(key=key.format(big=int(rows * 0.995)))
                await conn.execute(fill_sql, rows, json.dumps(PAYLOAD))
                if "backoff" in name:  # the big key's first row waits out a backoff
                    await conn.execute(
                        "UPDATE accord_outbox SET available_at = now() + interval '1 hour' "
                        "WHERE seq = (SELECT min(seq) FROM accord_outbox)"
                    )
                if analyzed:
                    await conn.execute("VACUUM ANALYZE accord_outbox")
                else:  # nor may autovacuum analyze it while it is measured
                    await conn.execute("ALTER TABLE accord_outbox SET (autovacuum_enabled = false)")
                times: dict[str, list[float]] = {"accord": [], "bare": []}
                claimed: dict[str, int] = {}
                for _ in range(repeats):
                    for who in ("accord", "bare"):
                        started = time.perf_counter()
                        tx = conn.transaction()
                        await tx.start()
                        if who == "accord":  # the relay's default: claims="lock"
                            got: Any = await _claim_ahead(
                                conn, now=time_now(), lease_until=None, limit=500
                            )
                        else:
                            got = await conn.fetch(BARE_CLAIM, 500)
                        await tx.rollback()
                        times[who].append(time.perf_counter() - started)
                        claimed[who] = len(got)
                accord_ms = median(times["accord"]) * 1000
                bare_ms = median(times["bare"]) * 1000
                results.append(
                    {
                        "benchmark": f"claim of 500 over {rows:,} rows, {name}, "
                        f"{'analyzed' if analyzed else 'no statistics yet'} (ms; rows "
                        f"claimed {claimed['accord']} / bare {claimed['bare']})",
                        "accord": accord_ms,
                        "baseline": bare_ms,
                        "ratio": bare_ms / accord_ms,
                    }
                )
                await conn.close()
                console.print(results[-1])
    return results


_DUE_FILL_SQL = """
INSERT INTO accord_outbox (id, event_type, key, payload, headers, status, retry_count,
                           available_at, created_at)
SELECT gen_random_uuid(), 'bench.due', 'k' || (g % 5), $2::jsonb, '{}'::jsonb, 'PENDING', 0,
       now(), now()
FROM generate_series(1, $1) AS g
"""
_SCHEDULED_FILL_SQL = """
INSERT INTO accord_outbox (id, event_type, key, payload, headers, status, retry_count,
                           available_at, created_at)
SELECT gen_random_uuid(), 'bench.later', 'r' || g, $2::jsonb, '{}'::jsonb, 'SCHEDULED', 0,
       now() + interval '1 day' + g * interval '1 second', now()
FROM generate_series(1, $1) AS g
"""


async def scheduled_cost(rows: int, repeats: int) -> list[dict[str, Any]]:
    """A 500-row claim over 1,000 due rows with ``rows`` messages scheduled for later
    (added before them, as reminders are) against the same claim with none; and the
    same rows kept PENDING with a future ``available_at`` (what an outbox without a
    SCHEDULED state does), which the claim must read past. Plus the relay's
    once-a-second look for due scheduled rows when none is due."""
    from accord.outbox._claim import _claim_ahead, release_scheduled

    async def measured(url: str, dsn: str) -> tuple[float, float]:
        conn = await asyncpg.connect(dsn)
        database = Database(url)
        claims: list[float] = []
        releases: list[float] = []
        try:
            for _ in range(repeats):
                started = time.perf_counter()
                tx = conn.transaction()
                await tx.start()
                got = await _claim_ahead(conn, now=time_now(), lease_until=None, limit=500)
                await tx.rollback()
                claims.append(time.perf_counter() - started)
                assert len(got) == 500, f"claimed {len(got)}"
                started = time.perf_counter()
                async with database.connect() as sa_conn, sa_conn.begin() as sa_tx:
                    assert await release_scheduled(sa_conn, now=time_now(), limit=500) == 0
                    await sa_tx.rollback()
                releases.append(time.perf_counter() - started)
        finally:
            await conn.close()
            await database.dispose()
        return median(claims) * 1000, median(releases) * 1000

    async def loaded(fresh: ScratchDatabase, scheduled: int) -> asyncpg.Connection:
        database = Database(fresh.url)
        await database.upgrade()
        await database.dispose()
        conn = await asyncpg.connect(fresh.dsn)
        if scheduled:
            await conn.execute(_SCHEDULED_FILL_SQL, scheduled, json.dumps(PAYLOAD))
        await conn.execute(_DUE_FILL_SQL, 1000, json.dumps(PAYLOAD))
        await conn.execute("VACUUM ANALYZE accord_outbox")
        return conn

    async with (
        ScratchDatabase("accord_bench_sched_none") as bare,
        ScratchDatabase("accord_bench_sched") as fresh,
    ):
        await (await loaded(bare, 0)).close()
        base_claim, base_release = await measured(bare.url, bare.dsn)
        conn = await loaded(fresh, rows)
        claim_ms, release_ms = await measured(fresh.url, fresh.dsn)
        await conn.execute("UPDATE accord_outbox SET status = 'PENDING' WHERE status = 'SCHEDULED'")
        await conn.execute("VACUUM ANALYZE accord_outbox")
        await conn.close()
        naive_ms, _ = await measured(fresh.url, fresh.dsn)
    results = [
        {
            "benchmark": f"claim of 500 over 1,000 due rows behind {rows:,} scheduled (ms)",
            "accord": claim_ms,
            "baseline": base_claim,
            "ratio": base_claim / claim_ms,
        },
        {
            "benchmark": f"the same {rows:,} kept PENDING with a future available_at (ms)",
            "accord": naive_ms,
            "baseline": base_claim,
            "ratio": base_claim / naive_ms,
        },
        {
            "benchmark": f"looking for due scheduled rows, none due, {rows:,} waiting (ms)",
            "accord": release_ms,
            "baseline": base_release,
            "ratio": base_release / release_ms,
        },
    ]
    for row in results:
        console.print(row)
    return results


def time_now() -> datetime:
    return datetime.now(UTC)


async def memory(scratch: ScratchDatabase, rows: int, seconds: float) -> dict[str, Any]:
    """Peak RSS of a relay process working through a table of ``rows`` pending rows."""
    await fill(scratch.dsn, rows)
    channel = f"bench-mem-{uuid.uuid4().hex[:6]}"
    command = [
        sys.executable,
        "-m",
        "benchmarks._relay_child",
        scratch.url,
        RABBIT_URL,
        channel,
        "--drain-for",
        str(seconds),
    ]
    peak = await asyncio.to_thread(_peak_rss_kb, command)
    return {
        "benchmark": f"relay peak RSS with {rows:,} pending rows (MB)",
        "accord": peak / 1024,
        "goal": "< 150",
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--rate", type=int, default=1000, help="latency: messages per second")
    parser.add_argument(
        "--only",
        nargs="*",
        default=["rabbitmq", "nats", "latency", "add", "claim", "scheduled", "memory"],
    )
    parser.add_argument(
        "--claims",
        choices=["lock", "lease"],
        default="lock",
        help="throughput: how Accord's relay holds a batch while publishing",
    )
    parser.add_argument(
        "--rtt-ms",
        type=float,
        default=0.0,
        help="add: route PostgreSQL through a proxy that adds this round trip (a network's)",
    )
    args = parser.parse_args()
    count, rounds = (5_000, 1) if args.quick else (30_000, 3)
    rows: list[dict[str, Any]] = []
    async with ScratchDatabase("bench_relay") as scratch:
        database = Database(scratch.url)
        await database.upgrade()
        await database.dispose()
        if "rabbitmq" in args.only:
            rows.append(await throughput(scratch, RABBIT_URL, count, rounds, args.claims))
            console.print(rows[-1])
        if "nats" in args.only:
            rows.append(await throughput(scratch, NATS_URL, count, rounds, args.claims))
            console.print(rows[-1])
        if "latency" in args.only:
            for consume in (False, True):
                rows.append(await latency(scratch, 3 if args.quick else 15, args.rate, consume))
                console.print(rows[-1])
        if "add" in args.only:
            rows.extend(await add_cost(scratch, 500 if args.quick else 3000, args.rtt_ms))
            console.print(rows[-2:])
        if "claim" in args.only:
            rows.extend(await claim_cost(20_000 if args.quick else 200_000, 7))
        if "scheduled" in args.only:
            rows.extend(await scheduled_cost(20_000 if args.quick else 200_000, 15))
        if "memory" in args.only:
            rows.append(await memory(scratch, 100_000 if args.quick else 1_000_000, 15))
            console.print(rows[-1])
    report(
        "relay",
        f"Relay benchmarks ({os.cpu_count()} cores)",
        rows,
        [
            "benchmark",
            "accord",
            "baseline",
            "ratio",
            "p50",
            "p99",
            "commit_p50",
            "commit_p99",
            "goal",
        ],
    )


if __name__ == "__main__":
    asyncio.run(main())
