"""Shared plumbing for benchmarks: scratch databases, result tables and JSON reports."""

from __future__ import annotations

import json
import os
import statistics
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
from rich.console import Console
from rich.table import Table

PG_ADMIN = os.environ.get("ACCORD_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
RABBIT_URL = os.environ.get("ACCORD_BENCH_RABBIT", "amqp://guest:guest@127.0.0.1:5672/")
NATS_URL = os.environ.get("ACCORD_BENCH_NATS", "nats://127.0.0.1:4222")
RESULTS = Path(__file__).parent / "results"
console = Console()


# -- what the bare baselines share: an asyncpg claim and the plain aio-pika message --

BARE_CLAIM = """SELECT seq, id, event_type, headers, payload FROM accord_outbox
WHERE status = 'PENDING' ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED"""


def bare_amqp_message(row: Any) -> Any:
    """The plain aio-pika message for a claimed outbox row (persistent, the row's
    CloudEvents headers, its id as the AMQP message id)."""
    import aio_pika

    return aio_pika.Message(
        body=row["payload"].encode(),
        headers=json.loads(row["headers"]),
        message_id=str(row["id"]),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


class ScratchDatabase:
    """A PostgreSQL database created for one benchmark run and dropped after it."""

    def __init__(self, prefix: str) -> None:
        self.name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        base = PG_ADMIN.rsplit("/", 1)[0]
        self.dsn = f"{base}/{self.name}"
        self.url = self.dsn.replace("postgresql://", "postgresql+asyncpg://", 1)

    async def __aenter__(self) -> ScratchDatabase:
        admin = await asyncpg.connect(PG_ADMIN)
        await admin.execute(f'CREATE DATABASE "{self.name}"')
        await admin.close()
        return self

    async def __aexit__(self, *exc: object) -> None:
        admin = await asyncpg.connect(PG_ADMIN)
        await admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        await admin.close()


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(name: str, title: str, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    """Print a Rich table of ``rows`` and write them to ``benchmarks/results/<name>.json``."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right" if column != "benchmark" else "left")
    for row in rows:
        table.add_row(*(_fmt(row.get(c)) for c in columns))
    console.print(table)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "rows": rows}, indent=2, default=str))
    console.print(f"written to {path}")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return "" if value is None else str(value)
