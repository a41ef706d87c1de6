"""The trip as a choreography: hotels -> cars -> payments, each reacting to the previous
event; failures flow back through compensating handlers.

Two shapes of the same flow:

* :func:`services`: hotels and cars on one database, writing ``app``'s ledger (the quick
  tests, on every database and broker).
* :func:`hotels_service` and :func:`cars_service`: each service with its own database,
  relay and state, as deployed: ``holdings`` (hotel RESERVED/CANCELLED, car
  RENTED/RETURNED, payment CHARGED) and ``effects``, one row per local step applied,
  so that a step applied twice shows up as a count. Run in the test process, or as
  killable processes (``python -m tests.sagas.choreo_worker``).

Flow data steers failures: ``fail_at`` (step 1 hotel, 2 car, 3 payment refuses, after
writing: its writes must be rolled back) and ``comp_fail`` ({step: n}: that
compensation fails its first n attempts).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa

from accord.db import Database
from accord.db.types import BigId
from accord.inbox import Consumer, HandlerContext
from accord.outbox import Relay
from accord.sagas import Choreography, StepFailed
from accord.transports.base import Transport
from tests.sagas.app import _comp_fails, _write

trip = Choreography("trip", completed="trip.booked", compensated="trip.cancelled")

CONSUMER_OPTIONS: dict[str, Any] = {"backoff_base": 0.02, "backoff_cap": 0.2, "max_attempts": 8}


def _refuse_at(data: dict[str, Any], step: int) -> None:
    if data.get("fail_at") == step:
        raise StepFailed(f"step {step} refused")


def services(database: Database, transport: Transport, prefix: str) -> list[Consumer]:
    """The hotels and cars services (cars also takes payments), on one database."""
    hotels = Consumer(f"{prefix}-hotels", database, transport, **CONSUMER_OPTIONS)
    cars = Consumer(f"{prefix}-cars", database, transport, **CONSUMER_OPTIONS)

    @trip.on(hotels, "trip.requested", emits="hotel.reserved", fails="trip.cancelled")
    async def reserve_hotel(ctx: HandlerContext, data: dict[str, Any]) -> dict[str, Any]:
        await _write(ctx.conn, ctx.message.correlationid or "", 1, "do", "hotels")
        _refuse_at(data, 1)
        return {"hotel": "h-1"}

    @trip.on(cars, "hotel.reserved", emits="car.rented", fails="car.failed")
    async def rent_car(ctx: HandlerContext, data: dict[str, Any]) -> None:
        await _write(ctx.conn, ctx.message.correlationid or "", 2, "do", "cars")
        _refuse_at(data, 2)

    @trip.on(cars, "car.rented", emits="trip.booked", fails="payment.failed")
    async def charge_card(ctx: HandlerContext, data: dict[str, Any]) -> None:
        await _write(ctx.conn, ctx.message.correlationid or "", 3, "do", "cars")
        _refuse_at(data, 3)

    @trip.compensate(cars, "payment.failed", emits="car.returned")
    async def return_car(ctx: HandlerContext, data: dict[str, Any]) -> None:
        if await _comp_fails(ctx.conn, data, 2, ctx.attempt):
            raise RuntimeError("car return failed (injected)")
        await _write(ctx.conn, ctx.message.correlationid or "", 2, "undo", "cars")

    @trip.compensate(hotels, "car.failed", "car.returned", emits="trip.cancelled")
    async def cancel_hotel(ctx: HandlerContext, data: dict[str, Any]) -> None:
        if await _comp_fails(ctx.conn, data, 1, ctx.attempt):
            raise RuntimeError("hotel cancel failed (injected)")
        await _write(ctx.conn, ctx.message.correlationid or "", 1, "undo", "hotels")

    return [hotels, cars]


def expected(fail_at: int | None) -> list[tuple[int, str]]:
    """Ledger of one flow: a failing step leaves nothing; those before it are undone."""
    if fail_at is None:
        return [(1, "do"), (2, "do"), (3, "do")]
    done = [(i, "do") for i in range(1, fail_at)]
    return done + [(i, "undo") for i in reversed(range(1, fail_at))]


# -- each service on its own database --------------------------------------------------

state = sa.MetaData()
# Every local step a service applied. No unique constraint: a step applied twice must
# show up as two rows, not as a failure that would hide it.
effects = sa.Table(
    "choreo_effects",
    state,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("flow_id", sa.String(100), nullable=False),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("op", sa.String(10), nullable=False),  # "do" / "undo"
)
# What the service holds for a flow: (kind, status).
holdings = sa.Table(
    "choreo_holdings",
    state,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("flow_id", sa.String(100), nullable=False),
    sa.Column("kind", sa.String(20), nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
)

#: Called with (step function name, flow id) before a step or compensation touches
#: anything: tests hold a step there (a slow hotel system).
Hook = Callable[[str, str], Awaitable[None]]

HOTELS, CARS = "hotels", "cars"


async def create_state(database: Database) -> None:
    async with database.transaction() as conn:
        await conn.run_sync(lambda sync: state.create_all(sync, checkfirst=True))


async def _hold(ctx: HandlerContext, step: int, kind: str, status: str) -> None:
    flow_id = ctx.message.correlationid or ""
    await ctx.conn.execute(effects.insert().values(flow_id=flow_id, step=step, op="do"))
    await ctx.conn.execute(holdings.insert().values(flow_id=flow_id, kind=kind, status=status))


async def _release(ctx: HandlerContext, step: int, kind: str, status: str) -> None:
    flow_id = ctx.message.correlationid or ""
    await ctx.conn.execute(effects.insert().values(flow_id=flow_id, step=step, op="undo"))
    # Releases what is held, if anything: a compensation never fails for lack of it.
    await ctx.conn.execute(
        holdings.update()
        .where(holdings.c.flow_id == flow_id, holdings.c.kind == kind)
        .values(status=status)
    )


def _comp_flaky(data: dict[str, Any], step: int, attempt: int) -> bool:
    return attempt <= int((data.get("comp_fail") or {}).get(str(step), 0))


async def _no_hook(step: str, flow_id: str) -> None:
    return None


def relay(database: Database, transport: Transport, lease: float = 1.0) -> Relay:
    """A service's relay, quick to poll and to retry."""
    return Relay(
        database,
        transport,
        poll_interval=0.05,
        backoff_base=0.02,
        backoff_cap=0.2,
        lease=lease,
        max_attempts=1000,
    )


def hotels_consumer(
    database: Database, transport: Transport, prefix: str, hook: Hook = _no_hook, **options: Any
) -> Consumer:
    """The hotels service: reserves on ``trip.requested``, cancels on a later failure."""
    hotels = Consumer(f"{prefix}-{HOTELS}", database, transport, **{**CONSUMER_OPTIONS, **options})

    @trip.on(hotels, "trip.requested", emits="hotel.reserved", fails="trip.cancelled")
    async def reserve_hotel(ctx: HandlerContext, data: dict[str, Any]) -> dict[str, Any]:
        await hook("reserve_hotel", ctx.message.correlationid or "")
        await _hold(ctx, 1, "hotel", "RESERVED")
        _refuse_at(data, 1)
        return {"hotel": "h-1"}

    @trip.compensate(hotels, "car.failed", "car.returned", emits="trip.cancelled")
    async def cancel_hotel(ctx: HandlerContext, data: dict[str, Any]) -> None:
        await hook("cancel_hotel", ctx.message.correlationid or "")
        if _comp_flaky(data, 1, ctx.attempt):
            raise RuntimeError("hotel cancel failed (injected)")
        await _release(ctx, 1, "hotel", "CANCELLED")

    return hotels


def cars_consumer(
    database: Database, transport: Transport, prefix: str, **options: Any
) -> Consumer:
    """The cars service: rents on ``hotel.reserved``, charges on ``car.rented``, returns
    the car when the payment failed."""
    cars = Consumer(f"{prefix}-{CARS}", database, transport, **{**CONSUMER_OPTIONS, **options})

    @trip.on(cars, "hotel.reserved", emits="car.rented", fails="car.failed")
    async def rent_car(ctx: HandlerContext, data: dict[str, Any]) -> None:
        await _hold(ctx, 2, "car", "RENTED")
        _refuse_at(data, 2)

    @trip.on(cars, "car.rented", emits="trip.booked", fails="payment.failed")
    async def charge_card(ctx: HandlerContext, data: dict[str, Any]) -> None:
        await _hold(ctx, 3, "payment", "CHARGED")
        _refuse_at(data, 3)

    @trip.compensate(cars, "payment.failed", emits="car.returned")
    async def return_car(ctx: HandlerContext, data: dict[str, Any]) -> None:
        if _comp_flaky(data, 2, ctx.attempt):
            raise RuntimeError("car return failed (injected)")
        await _release(ctx, 2, "car", "RETURNED")

    return cars


async def start(database: Database, data: dict[str, Any], flow_id: str | None = None) -> str:
    """Request a trip at the hotels service: the first event leaves through its outbox."""
    async with database.transaction() as conn:
        return await trip.start(conn, "trip.requested", data, correlation_id=flow_id, source=HOTELS)


async def effects_of(database: Database) -> dict[str, list[tuple[int, str]]]:
    """Every flow's applied steps at one service, in commit order."""
    found: dict[str, list[tuple[int, str]]] = {}
    async with database.connect() as conn:
        rows = await conn.execute(
            sa.select(effects.c.flow_id, effects.c.step, effects.c.op).order_by(effects.c.id)
        )
        for flow_id, step, op in rows:
            found.setdefault(flow_id, []).append((step, op))
    return found


async def holdings_of(database: Database) -> dict[str, list[tuple[str, str]]]:
    """Every flow's holdings at one service: sorted (kind, status)."""
    found: dict[str, list[tuple[str, str]]] = {}
    async with database.connect() as conn:
        rows = await conn.execute(sa.select(holdings.c.flow_id, holdings.c.kind, holdings.c.status))
        for flow_id, kind, status in rows:
            found.setdefault(flow_id, []).append((kind, status))
    return {flow_id: sorted(held) for flow_id, held in found.items()}


def expected_at(service: str, fail_at: int | None) -> tuple[list[tuple[int, str]], list[Any]]:
    """(effects, holdings) one flow must leave at ``service``: each step that succeeded
    applied once, and undone once (in reverse) if a later step failed; a refused step
    leaves nothing."""
    everything = expected(fail_at)
    mine = [(s, op) for s, op in everything if (s == 1) == (service == HOTELS)]
    held: list[tuple[str, str]] = []
    if service == HOTELS and (fail_at is None or fail_at > 1):
        held.append(("hotel", "RESERVED" if fail_at is None else "CANCELLED"))
    if service == CARS and (fail_at is None or fail_at > 2):
        held.append(("car", "RENTED" if fail_at is None else "RETURNED"))
    if service == CARS and fail_at is None:
        held.append(("payment", "CHARGED"))
    return mine, sorted(held)
