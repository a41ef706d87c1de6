"""The saga under test, its participants and their ledger; shared by the tests and the
worker processes they kill (``python -m tests.sagas.worker``).

``trip``: 0 "hold seat" (local) -> 1 "reserve hotel" (remote, service hotels)
-> 2 "rent car" (remote, service cars) -> 3 "charge card" (pivot, remote, payments
= service cars) -> 4 "issue ticket" (retriable, local).

Saga data steers failures: ``fail_at`` (step index whose action refuses),
``comp_fail`` ({step: n} compensation fails its first n attempts; for always, see
``set_outage``),
``flaky_ticket`` (the retriable step fails its first n attempts).
Every applied action / compensation writes a ``ledger`` row, so tests can check
that nothing ran twice and that compensations ran in reverse.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from accord.db import Database
from accord.db.schema import inbox
from accord.db.types import BigId
from accord.inbox import Consumer
from accord.outbox import Relay
from accord.sagas import (
    CommandContext,
    Orchestrator,
    Retry,
    Saga,
    StepContext,
    StepFailed,
    command,
    participant,
)
from accord.transports.base import Transport

business = sa.MetaData()
ledger = sa.Table(
    "saga_test_ledger",
    business,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("saga_id", sa.String(100), nullable=False),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("op", sa.String(10), nullable=False),  # "do" / "undo"
    sa.Column("service", sa.String(50), nullable=False),
)

# A row (step) here makes that step's compensation fail until an operator removes it.
outage = sa.Table("saga_test_outage", business, sa.Column("step", sa.Integer, primary_key=True))

STEPS = ["hold seat", "reserve hotel", "rent car", "charge card", "issue ticket"]
COMPENSATABLE = 3  # steps 0..2 have compensations


async def create_tables(database: Database) -> None:
    async with database.transaction() as conn:
        await conn.run_sync(lambda sync: business.create_all(sync, checkfirst=True))


async def _write(conn: Any, saga_id: str, step: int, op: str, service: str) -> None:
    await conn.execute(ledger.insert().values(saga_id=saga_id, step=step, op=op, service=service))


async def _comp_fails(conn: Any, data: dict[str, Any], step: int, attempt: int) -> bool:
    n = int((data.get("comp_fail") or {}).get(str(step), 0))
    if attempt <= n:
        return True
    down = await conn.scalar(sa.select(outage.c.step).where(outage.c.step == step))
    return down is not None


async def set_outage(database: Database, step: int, down: bool) -> None:
    async with database.transaction() as conn:
        if down:
            await conn.execute(outage.insert().values(step=step))
        else:
            await conn.execute(outage.delete().where(outage.c.step == step))


async def hold_seat(ctx: StepContext) -> None:
    if ctx.data.get("fail_at") == 0:
        raise StepFailed("no seat")
    await _write(ctx.conn, ctx.saga_id, 0, "do", "orchestrator")
    ctx.data["seat"] = "12A"


async def release_seat(ctx: StepContext) -> None:
    if await _comp_fails(ctx.conn, ctx.data, 0, ctx.attempt):
        raise RuntimeError("seat service flaky")
    await _write(ctx.conn, ctx.saga_id, 0, "undo", "orchestrator")


async def issue_ticket(ctx: StepContext) -> None:
    if ctx.attempt <= int(ctx.data.get("flaky_ticket", 0)):
        raise RuntimeError("printer jammed")
    await _write(ctx.conn, ctx.saga_id, 4, "do", "orchestrator")


def make_trip(*, timeout: float = 10.0, comp_timeout: float = 10.0, stuck_after: int = 4) -> Saga:
    fast = Retry(max_attempts=stuck_after, base=0.05, cap=0.2)
    return (
        Saga(
            "trip",
            compensation_retry=fast,
            compensation_timeout=comp_timeout,
            stuck_after=stuck_after,
        )
        .step("hold seat", hold_seat, compensate=release_seat)
        .step(
            "reserve hotel",
            command("hotels.reserve"),
            compensate=command("hotels.cancel"),
            timeout=timeout,
        )
        .step("rent car", command("cars.rent"), compensate=command("cars.return"), timeout=timeout)
        .pivot("charge card", command("payments.charge"), timeout=timeout)
        .retriable("issue ticket", issue_ticket, retry=fast)
    )


def register_participants(hotels: Consumer, cars: Consumer) -> None:
    """The remote steps: hotels serves step 1, cars serves steps 2 and 3."""

    def action(consumer: Consumer, type: str, step: int) -> None:
        @participant(consumer, type)
        async def do(ctx: CommandContext, data: dict[str, Any]) -> dict[str, Any]:
            if data.get("fail_at") == step:
                raise StepFailed(f"{type} refused")
            await _write(ctx.conn, ctx.saga_id, step, "do", consumer.name)
            return {f"ref{step}": f"{type}-{ctx.saga_id[:8]}"}

    def compensation(consumer: Consumer, type: str, step: int) -> None:
        @participant(consumer, type)
        async def undo(ctx: CommandContext, data: dict[str, Any]) -> None:
            if await _comp_fails(ctx.conn, data, step, ctx.attempt):
                raise RuntimeError(f"{type} failed (injected)")
            await _write(ctx.conn, ctx.saga_id, step, "undo", consumer.name)

    action(hotels, "hotels.reserve", 1)
    compensation(hotels, "hotels.cancel", 1)
    action(cars, "cars.rent", 2)
    compensation(cars, "cars.return", 2)
    action(cars, "payments.charge", 3)


def components(
    database: Database,
    transport: Transport,
    *,
    prefix: str,
    trip: Saga,
    orchestrator: bool = True,
    participants: bool = True,
    relay: bool = True,
    batch_size: int = 1,
) -> list[Any]:
    """The relay, the orchestrator and the participants' consumers, all on one database
    (each service could have its own; sharing one keeps the tests quick). ``batch_size``
    > 1 runs the orchestrator and the participants' consumers in batch mode."""
    made: list[Any] = []
    if relay:
        made.append(
            Relay(
                database,
                transport,
                poll_interval=0.05,
                backoff_base=0.02,
                backoff_cap=0.2,
                lease=2.0,
                max_attempts=1000,
            )
        )
    if orchestrator:
        made.append(
            Orchestrator(
                database,
                transport,
                [trip],
                name=f"{prefix}-orch",
                timer_interval=0.05,
                batch_size=batch_size,
            )
        )
    if participants:
        made += participant_consumers(database, transport, prefix, batch_size=batch_size)
    return made


def participant_consumers(
    database: Database, transport: Transport, prefix: str, *, batch_size: int = 1
) -> list[Any]:
    """The hotels and cars services' consumers, with their saga command handlers."""
    hotels = Consumer(
        f"{prefix}-hotels", database, transport, backoff_base=0.02, batch_size=batch_size
    )
    cars = Consumer(f"{prefix}-cars", database, transport, backoff_base=0.02, batch_size=batch_size)
    register_participants(hotels, cars)
    return [hotels, cars]


async def ledger_rows(database: Database) -> list[tuple[str, int, str]]:
    """(saga id, step, op) in commit order."""
    async with database.connect() as conn:
        rows = (
            await conn.execute(
                sa.select(ledger.c.saga_id, ledger.c.step, ledger.c.op).order_by(ledger.c.id)
            )
        ).all()
    return [(r[0], r[1], r[2]) for r in rows]


def expected_ops(outcome: str, reached: int) -> list[tuple[int, str]]:
    """What the ledger of one saga must hold: every step done once if COMPLETED; if
    COMPENSATED, steps 0..reached-1 done then undone in reverse."""
    if outcome == "COMPLETED":
        return [(i, "do") for i in range(5)]
    done = [(i, "do") for i in range(reached)]
    return done + [(i, "undo") for i in reversed(range(min(reached, COMPENSATABLE)))]


async def transaction_sizes(database: Database, consumer: str) -> list[int]:
    """How many messages ``consumer`` applied in each of its transactions, largest first:
    its inbox rows grouped by the transaction that wrote them (``xmin``) on PostgreSQL;
    SQLite has no transaction ids, so by ``processed_at``, one stamp per inbox insert."""
    if database.engine.dialect.name == "postgresql":
        written_by: Any = sa.cast(sa.literal_column("xmin"), sa.Text)
    else:
        written_by = inbox.c.processed_at
    query = sa.select(sa.func.count()).where(inbox.c.consumer == consumer).group_by(written_by)
    async with database.connect() as conn:
        sizes = [int(n) for (n,) in (await conn.execute(query)).all()]
    return sorted(sizes, reverse=True)
