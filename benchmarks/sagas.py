"""Saga benchmark: a three-step saga across two participant services, each service with
its own PostgreSQL database, relay and consumer, in its own process; over RabbitMQ and
NATS. Baseline in the same run: the raw group-commit rate of that PostgreSQL (many
connections doing a one-row INSERT + COMMIT), so the report shows transactions per saga
and the engine's efficiency = saga transactions/s / raw transactions/s.

    .venv/bin/python -m benchmarks.sagas [--quick] [--rate 400] [--seconds 10]
        [--batch 64] [--concurrency 1] [--only rabbitmq|nats|sqlite|timer|flows]
        [--functions batch|single]

Each service consumes in batch mode (``Consumer(batch_size=--batch)``, the orchestrator
``Orchestrator(batch_size=...)``) with ``--concurrency`` competing consumers; the
report names both. ``--batch 1`` measures the one-message-per-transaction path.
Each step records its effect in the participant's database: by default its function
takes the batch's commands at once (``participant(..., batch=True)``) and writes them
in one statement; ``--functions single`` calls it once per command, one INSERT each.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Any

import asyncpg
import sqlalchemy as sa
from tests.brokers import delete_everything
from tests.processes import serve

from accord.db import Database
from accord.db.schema_sagas import deadlines
from accord.db.schema_sagas import sagas as sagas_table
from accord.inbox import Consumer
from accord.outbox import Relay
from accord.sagas import CommandContext, Orchestrator, Saga, command, participant
from accord.transports import from_url
from benchmarks._common import (
    NATS_URL,
    RABBIT_URL,
    ScratchDatabase,
    console,
    median,
    percentile,
    report,
)


def definition() -> Saga:
    """reserve (service A) -> rent (service B) -> charge (service B, the pivot)."""
    return (
        Saga("bench-trip", compensation_timeout=120)
        .step(
            "reserve", command("bench.a.reserve"), compensate=command("bench.a.cancel"), timeout=120
        )
        .step("rent", command("bench.b.rent"), compensate=command("bench.b.return"), timeout=120)
        .pivot("charge", command("bench.b.charge"), timeout=120)
    )


_TABLE = "CREATE TABLE IF NOT EXISTS bench_effects (saga_id text, step text, op text)"
#: Concurrent callers of Orchestrator.start in the load generator.
STARTERS = 16
#: How often SQL-transport consumers poll on SQLite (no NOTIFY there).
POLL_INTERVAL = 0.05


def service(
    database: Database, transport: Any, name: str, batch: int, concurrency: int, functions: str
) -> list[Consumer]:
    return [_service(database, transport, name, batch, functions) for _ in range(concurrency)]


_EFFECT = sa.text("INSERT INTO bench_effects VALUES (:s, :t, :o)")


def _service(database: Database, transport: Any, name: str, batch: int, functions: str) -> Consumer:
    """A participant service whose steps each record their effect in a table of its own:
    one INSERT per command (``functions="single"``), or one statement for all the
    commands of a batch (``"batch"``: ``participant(..., batch=True)``)."""
    consumer = Consumer(name, database, transport, batch_size=batch)
    types = (
        {"bench.a.reserve": "do", "bench.a.cancel": "undo"}
        if name == "svc-a"
        else {"bench.b.rent": "do", "bench.b.return": "undo", "bench.b.charge": "do"}
    )
    for type_, op in types.items():
        if functions == "batch":

            @participant(consumer, type_, batch=True)
            async def handle_all(
                commands: Sequence[tuple[CommandContext, Any]], _t: str = type_, _op: str = op
            ) -> None:
                await commands[0][0].conn.execute(
                    _EFFECT, [{"s": ctx.saga_id, "t": _t, "o": _op} for ctx, _ in commands]
                )

        else:

            @participant(consumer, type_)
            async def handle(
                ctx: CommandContext, data: Any, _t: str = type_, _op: str = op
            ) -> None:
                await ctx.conn.execute(_EFFECT, {"s": ctx.saga_id, "t": _t, "o": _op})

    return consumer


async def child(
    role: str,
    db_url: str,
    broker: str,
    channel: str,
    batch: str,
    concurrency: str,
    functions: str,
) -> None:
    """One process: the orchestrator or a participant service, with its own relay."""
    embedded = db_url.startswith("sqlite")
    database = Database(db_url) if embedded else Database(db_url, pool_size=8)
    await database.upgrade()
    async with database.transaction() as conn:
        await conn.execute(sa.text(_TABLE))
    # SQLite has no NOTIFY: the SQL transport's consumers in other processes poll.
    polling = {"poll_interval": POLL_INTERVAL} if embedded else {}
    transport = from_url(broker, channel=channel, **polling)
    await transport.connect()
    if role == "orchestrator":
        orchestrator = Orchestrator(
            database,
            transport,
            [definition()],
            name="bench-orch",
            concurrency=int(concurrency),
            batch_size=int(batch),
        )
        parts: list[Any] = [orchestrator]
        consumers = orchestrator.consumers
    else:
        consumers = service(database, transport, role, int(batch), int(concurrency), functions)
        parts = list(consumers)
    # Woken at each commit that adds outbox rows: by NOTIFY on PostgreSQL, in-process
    # on SQLite (the commits come from this process's consumers); its own poll
    # interval (1 s) is left alone.
    relay = Relay(database, transport)
    parts.append(relay)
    sizes: list[int] = []
    for consumer in consumers:
        consumer.handle_batch = _counting(consumer.handle_batch, sizes)  # type: ignore[method-assign]
    await serve(
        parts,
        consumers,
        transport,
        database,
        on_sigterm=lambda: print(
            json.dumps({"role": role, "batches": len(sizes), "messages": sum(sizes)}), flush=True
        ),
    )


def _counting(handle: Any, sizes: list[int]) -> Any:
    """``handle`` (a consumer's batch callback), recording the size of each batch."""

    async def counted(deliveries: Any) -> None:
        sizes.append(len(deliveries))
        await handle(deliveries)

    return counted


async def commits(dsns: list[str]) -> int:
    """Committed transactions so far in these databases (pg_stat_database)."""
    total = 0
    for dsn in dsns:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            total += int(
                await conn.fetchval(
                    "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
                )
            )
        finally:
            await conn.close()
    return total


async def raw_commit_rate(dsn: str, seconds: float, connections: int = 32) -> float:
    """Transactions/s of many connections each doing one-row INSERT + COMMIT."""
    setup = await asyncpg.connect(dsn)
    await setup.execute("CREATE TABLE IF NOT EXISTS bench_raw (id bigserial, v int)")
    await setup.close()
    pool = await asyncpg.create_pool(dsn, min_size=connections, max_size=connections)
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        async with pool.acquire() as conn:
            while time.perf_counter() < deadline:
                await conn.execute("INSERT INTO bench_raw (v) VALUES (1)")
                done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    await pool.close()
    return done / elapsed


def sqlite_commit_rate(directory: str, seconds: float) -> float:
    """Transactions/s of one sqlite3 connection doing one-row INSERT + COMMIT on a file
    in WAL mode with ``synchronous=NORMAL`` (Accord's settings; one writer at a time)."""
    conn = sqlite3.connect(f"{directory}/raw.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE bench_raw (id INTEGER PRIMARY KEY, v INTEGER)")
    done = 0
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO bench_raw (v) VALUES (1)")
        conn.execute("COMMIT")
        done += 1
    elapsed = time.perf_counter() - started
    conn.close()
    return done / elapsed


@contextlib.asynccontextmanager
async def service_databases(sqlite_dir: str | None) -> AsyncIterator[list[tuple[str, str | None]]]:
    """(URL, asyncpg DSN) of the orchestrator's and the two services' databases: files
    in ``sqlite_dir`` (no DSN: no commit count), else scratch PostgreSQL databases."""
    if sqlite_dir is not None:
        yield [(f"sqlite+aiosqlite:///{sqlite_dir}/{name}.db", None) for name in ROLES]
        return
    async with (
        ScratchDatabase("bench_orch") as orch_db,
        ScratchDatabase("bench_a") as a_db,
        ScratchDatabase("bench_b") as b_db,
    ):
        yield [(db.url, db.dsn) for db in (orch_db, a_db, b_db)]


ROLES = ("orchestrator", "svc-a", "svc-b")


async def run_sagas(
    broker: str,
    rate: float,
    seconds: float,
    batch: int,
    concurrency: int,
    functions: str,
    sqlite_dir: str | None = None,
) -> dict[str, Any]:
    channel = f"bench-sagas-{uuid.uuid4().hex[:8]}"
    async with service_databases(sqlite_dir) as databases:
        procs = []
        try:
            for role, (url, _) in zip(ROLES, databases, strict=True):
                proc = subprocess.Popen(  # noqa: ASYNC220
                    [
                        sys.executable,
                        "-m",
                        "benchmarks.sagas",
                        "--child",
                        role,
                        url,
                        broker,
                        channel,
                        str(batch),
                        str(concurrency),
                        functions,
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                procs.append(proc)
                assert proc.stdout is not None
                line = await asyncio.to_thread(proc.stdout.readline)
                assert line.strip() == "ready", f"{role} did not start"
            database = Database(databases[0][0])
            orchestrator = Orchestrator(
                database, from_url(broker, channel=channel), [definition()], name="bench-orch"
            )
            dsns = [dsn for _, dsn in databases if dsn is not None]
            before = await commits(dsns)
            total = int(rate * seconds)
            started = time.perf_counter()

            async def starter(offset: int) -> None:
                # Paced open loop: saga i starts at i / rate seconds, whatever came before.
                for i in range(offset, total, STARTERS):
                    delay = started + i / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    await orchestrator.start("bench-trip", {"n": 1})

            await asyncio.gather(*(starter(k) for k in range(STARTERS)))
            async with database.connect() as conn:
                while True:
                    ended = await conn.scalar(
                        sa.select(sa.func.count()).where(sagas_table.c.status == "COMPLETED")
                    )
                    await conn.commit()
                    if ended >= total:
                        break
                    await asyncio.sleep(0.2)
                rows = (
                    await conn.execute(sa.select(sagas_table.c.created_at, sagas_table.c.ended_at))
                ).all()
            after = await commits(dsns)
            batch_sizes = await _mean_batches(procs)
            first = min(r[0] for r in rows)
            last = max(r[1] for r in rows)
            latencies = [(r[1] - r[0]).total_seconds() * 1000 for r in rows]
            await database.dispose()
            throughput = total / (last - first).total_seconds()
            return {
                "sagas": total,
                "sagas_per_s": throughput,
                "p50_ms": percentile(latencies, 50),
                "p99_ms": percentile(latencies, 99),
                "tx_per_saga": (after - before) / total if dsns else None,
                "mean_batch": batch_sizes,
            }
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            await _delete_channel(broker, channel)


async def _delete_channel(broker: str, channel: str) -> None:
    """Remove what the run declared on the broker (queues and exchanges, or the stream)."""
    if broker.startswith("sqlite"):
        return  # the file goes with its directory
    if broker.startswith("amqp"):
        await delete_everything({channel: {"bench-orch", "svc-a", "svc-b"}})
    else:
        transport = from_url(broker, channel=channel)
        await transport.connect()
        await transport.delete_stream()  # type: ignore[attr-defined]
        await transport.close()


async def _mean_batches(procs: list[subprocess.Popen[str]]) -> str:
    """Stop the services; the mean batch size each consumed with, "orch/a/b"."""
    means = []
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        stats = json.loads(line)
        means.append(f"{stats['messages'] / max(1, stats['batches']):.1f}")
    return "/".join(means)


#: Due deadlines another service's orchestrator left (it is down) in the timer run.
FOREIGN_DUE = 50_000
TIMER_TICKS = 30


async def timer_tick_cost(foreign: int, ticks: int) -> list[dict[str, Any]]:
    """Median time of one idle timer tick (``fire_due`` finding none of its own
    sagas' deadlines due) while ``foreign`` deadlines of another saga are due, before
    PostgreSQL has statistics for the table and once analyzed; baseline: the bare
    driver round trip (``SELECT 1``) in the same run."""
    results = []
    for analyzed in (False, True):
        async with ScratchDatabase("accord_bench_timer") as fresh:
            database = Database(fresh.url)
            await database.upgrade()
            conn = await asyncpg.connect(fresh.dsn)
            await conn.execute(
                "INSERT INTO accord_sagas (id, name, status, phase, step, data, created_at,"
                " updated_at) SELECT 'theirs-' || n, 'theirs', 'RUNNING', 'action', 0, '{}',"
                " now(), now() FROM generate_series(1, $1) AS n",
                foreign,
            )
            named = "saga_name" in deadlines.c  # an Accord older than the column: no name
            await conn.execute(
                f"INSERT INTO accord_deadlines (saga_id, kind, phase, step, attempt, due_at"
                f"{', saga_name' if named else ''}) SELECT 'theirs-' || n, 'timeout', 'action',"
                f" 0, 1, now() - interval '1 minute' {', ' + repr('theirs') if named else ''}"
                " FROM generate_series(1, $1) AS n",
                foreign,
            )
            if analyzed:
                await conn.execute("VACUUM ANALYZE accord_sagas, accord_deadlines")
            else:
                for table in ("accord_sagas", "accord_deadlines"):
                    await conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
            ours = Saga("ours").step("ask", command("bench.ours.ask"), timeout=60)
            transport = from_url(database.url, channel="bench-timer")
            orchestrator = Orchestrator(database, transport, [ours], name="bench-timer")
            times: dict[str, list[float]] = {"accord": [], "bare": []}
            for _ in range(ticks):
                began = time.perf_counter()
                fired = await orchestrator.fire_due()
                times["accord"].append(time.perf_counter() - began)
                assert fired == 0, fired
                began = time.perf_counter()
                await conn.fetchval("SELECT 1")
                times["bare"].append(time.perf_counter() - began)
            await conn.close()
            await database.dispose()
        accord_ms, bare_ms = (1000 * median(times[who]) for who in ("accord", "bare"))
        row = {
            "benchmark": f"idle timer tick, {foreign:,} foreign due deadlines,"
            f" {'analyzed' if analyzed else 'no statistics'}",
            "tick_ms": accord_ms,
            "bare_round_trip_ms": bare_ms,
            "ratio": accord_ms / bare_ms,
        }
        console.print(row)
        results.append(row)
    return results


#: The flow tracker run: recorded messages, over this many flows (4 messages each).
FLOW_ROWS, FLOWS = 200_000, 50_000
RECORDED = 1_000


async def flow_tracker_cost(rows: int, flows: int, repeats: int) -> list[dict[str, Any]]:
    """The flow tracker beside ``rows`` recorded messages of ``flows`` flows (one in
    ten never ended): the median stalled-flow check (``Flows.stalled``) against the
    bare driver round trip, and recording ``RECORDED`` messages one transaction each
    (``consumer.handle``) against a bare asyncpg INSERT + COMMIT of the same row."""
    from accord.messages import Message
    from accord.sagas import Flows, FlowTracker
    from accord.testing import CapturedDelivery

    async with ScratchDatabase("accord_bench_flows") as fresh:
        database = Database(fresh.url)
        await database.upgrade()
        conn = await asyncpg.connect(fresh.dsn)
        began = time.perf_counter()
        await conn.execute(
            "INSERT INTO accord_flows (correlation_id, message_id, type, source, outcome, time,"
            " recorded_at) SELECT 'flow-' || (n % $2), 'm-' || n, 'bench.step', 'bench',"
            " CASE WHEN n > $1 - $2 AND (n % $2) % 10 <> 0 THEN 'completed' ELSE 'next' END,"
            " now(), now() - interval '1 hour' + n * interval '1 ms'"
            " FROM generate_series(1, $1) AS n",
            rows,
            flows,
        )
        try:  # an Accord with flow heads fills them in as its migration does
            from accord.db.migrations import _flow_heads  # type: ignore[attr-defined]
        except ImportError:
            fill_s = 0.0
        else:
            began = time.perf_counter()
            async with database.transaction() as sa_conn:
                await _flow_heads(sa_conn)
            fill_s = time.perf_counter() - began
        await conn.execute("VACUUM ANALYZE")
        tracker = FlowTracker(database, from_url(database.url, channel="bench-flows"))
        times: dict[str, list[float]] = {"accord": [], "bare": []}
        found = 0
        for _ in range(repeats):
            began = time.perf_counter()
            found = len(await Flows(database).stalled(timedelta(minutes=1)))
            times["accord"].append(time.perf_counter() - began)
            began = time.perf_counter()
            await conn.fetchval("SELECT 1")
            times["bare"].append(time.perf_counter() - began)
        began = time.perf_counter()
        for n in range(RECORDED):
            message = Message(type="bench.step", correlationid=f"new-{n % 100}", source="bench")
            await tracker.consumer.handle(CapturedDelivery(message))
        record_ms = 1000 * (time.perf_counter() - began) / RECORDED
        began = time.perf_counter()
        for n in range(RECORDED):
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO accord_flows (correlation_id, message_id, type, source, time,"
                    " recorded_at) VALUES ($1, $2, 'bench.step', 'bench', now(), now())",
                    f"bare-{n % 100}",
                    f"bare-{n}",
                )
        bare_record_ms = 1000 * (time.perf_counter() - began) / RECORDED
        await conn.close()
        await database.dispose()
    check_ms, bare_ms = (1000 * median(times[who]) for who in ("accord", "bare"))
    rows_out = [
        {
            "benchmark": f"stalled-flow check, {rows:,} messages of {flows:,} flows"
            f" ({found} reported)",
            "ms": check_ms,
            "baseline_ms": bare_ms,
            "ratio": check_ms / bare_ms,
            "note": f"heads filled in {fill_s:.1f} s" if fill_s else "",
        },
        {
            "benchmark": f"record a message (consumer.handle, {RECORDED:,} in a row)",
            "ms": record_ms,
            "baseline_ms": bare_record_ms,
            "ratio": record_ms / bare_record_ms,
            "note": "baseline: bare INSERT + COMMIT of the flow row",
        },
    ]
    for row in rows_out:
        console.print(row)
    return rows_out


async def embedded(args: argparse.Namespace, seconds: float) -> None:
    """The embedded default: each service a SQLite file, the SQL transport on another."""
    with tempfile.TemporaryDirectory(prefix="bench-sagas-") as directory:
        raw = await asyncio.to_thread(sqlite_commit_rate, directory, 3.0 if args.quick else 8.0)
        console.print(f"raw SQLite INSERT + COMMIT, one connection: {raw:,.0f} tx/s")
        result = await run_sagas(
            f"sqlite+aiosqlite:///{directory}/broker.db",
            args.rate,
            seconds,
            args.batch,
            args.concurrency,
            args.functions,
            sqlite_dir=directory,
        )
    row = {
        "benchmark": f"3-step saga, SQLite files + SQL transport, batch {args.batch}"
        f" x{args.concurrency}, {args.functions} functions",
        **result,
    }
    console.print(row)
    report(
        "sagas_sqlite",
        "Sagas on the embedded default: each service a SQLite file, the SQL transport on another",
        [{"benchmark": "raw INSERT+COMMIT, one sqlite3 connection", "tx_per_s": raw}, row],
        ["benchmark", "sagas", "sagas_per_s", "p50_ms", "p99_ms", "mean_batch", "tx_per_s"],
    )


async def main(args: argparse.Namespace) -> None:
    if args.only == "flows":
        rows = await flow_tracker_cost(FLOW_ROWS, FLOWS, TIMER_TICKS)
        columns = ["benchmark", "ms", "baseline_ms", "ratio", "note"]
        report("sagas_flows", "Flow tracker: the stalled-flow check and recording", rows, columns)
        return
    if args.only == "timer":
        rows = await timer_tick_cost(FOREIGN_DUE, TIMER_TICKS)
        columns = ["benchmark", "tick_ms", "bare_round_trip_ms", "ratio"]
        report(
            "sagas_timer",
            "Saga timer: an idle tick beside another service's due deadlines",
            rows,
            columns,
        )
        return
    seconds = 3.0 if args.quick else args.seconds
    if args.only == "sqlite":
        await embedded(args, seconds)
        return
    async with ScratchDatabase("bench_raw") as raw_db:
        raw = await raw_commit_rate(raw_db.dsn, 3.0 if args.quick else 8.0)
    console.print(f"raw PostgreSQL group commit: {raw:,.0f} tx/s")
    rows: list[dict[str, Any]] = [{"benchmark": "raw INSERT+COMMIT x32 conns", "tx_per_s": raw}]
    brokers = {"rabbitmq": ("RabbitMQ", RABBIT_URL), "nats": ("NATS", NATS_URL)}
    for key, (name, broker) in brokers.items():
        if args.only and key != args.only:
            continue
        result = await run_sagas(
            broker, args.rate, seconds, args.batch, args.concurrency, args.functions
        )
        saga_tx = result["sagas_per_s"] * result["tx_per_saga"]
        rows.append(
            {
                "benchmark": f"3-step saga, PostgreSQL + {name}, batch {args.batch}"
                f" x{args.concurrency}, {args.functions} functions",
                **result,
                "tx_per_s": saga_tx,
                "efficiency_pct": 100 * saga_tx / raw,
            }
        )
        console.print(rows[-1])
    report(
        "sagas",
        "Sagas: 3 steps, 2 participant services, each service its own database and process",
        rows,
        [
            "benchmark",
            "sagas",
            "sagas_per_s",
            "p50_ms",
            "p99_ms",
            "tx_per_saga",
            "mean_batch",
            "tx_per_s",
            "efficiency_pct",
        ],
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 s runs instead of --seconds.")
    parser.add_argument("--rate", type=float, default=400.0, help="Sagas started per second.")
    parser.add_argument("--seconds", type=float, default=10.0, help="How long to start sagas.")
    parser.add_argument("--batch", type=int, default=64, help="Consumer batch_size.")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="Competing consumers per service process. They share its one event loop: "
        "2 measured slower than 1 here (p50 312 ms against 187 ms at 150 sagas/s).",
    )
    parser.add_argument(
        "--only",
        choices=["rabbitmq", "nats", "sqlite", "timer", "flows"],
        help="Run one broker only; 'sqlite': the embedded default (each service a SQLite "
        "file, the SQL transport on another; baseline one sqlite3 connection's INSERT + "
        "COMMIT rate); or 'timer': the cost of an idle saga timer tick while "
        f"{FOREIGN_DUE:,} deadlines of another service's sagas are due; or 'flows': the "
        f"flow tracker's stalled-flow check beside {FLOW_ROWS:,} recorded messages, and "
        "the cost of recording one.",
    )
    parser.add_argument(
        "--functions",
        choices=["batch", "single"],
        default="batch",
        help="Participant functions: one call per batch of commands (participant(...,"
        " batch=True), one INSERT for all) or one call and one INSERT per command.",
    )
    parser.add_argument(
        "--child",
        nargs=7,
        metavar=("ROLE", "DB", "BROKER", "CHANNEL", "BATCH", "CONCURRENCY", "FUNCTIONS"),
    )
    parsed = parser.parse_args()
    if parsed.child:
        asyncio.run(child(*parsed.child))
    else:
        asyncio.run(main(parsed))
