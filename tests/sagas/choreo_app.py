"""The trip as a choreography: hotels -> cars -> payments, each reacting to the previous
event; failures flow back through compensating handlers. Uses the ledger of ``app``."""

from __future__ import annotations

from typing import Any

from accord.db import Database
from accord.inbox import Consumer, HandlerContext
from accord.sagas import Choreography, StepFailed
from accord.transports.base import Transport
from tests.sagas.app import _comp_fails, _write

trip = Choreography("trip", completed="trip.booked", compensated="trip.cancelled")


def services(database: Database, transport: Transport, prefix: str) -> list[Consumer]:
    """The hotels and cars services (cars also takes payments)."""
    options: dict[str, Any] = {"backoff_base": 0.02, "backoff_cap": 0.2, "max_attempts": 8}
    hotels = Consumer(f"{prefix}-hotels", database, transport, **options)
    cars = Consumer(f"{prefix}-cars", database, transport, **options)

    def fails(data: dict[str, Any], step: int) -> None:
        if data.get("fail_at") == step:
            raise StepFailed(f"step {step} refused")

    @trip.on(hotels, "trip.requested", emits="hotel.reserved", fails="trip.cancelled")
    async def reserve_hotel(ctx: HandlerContext, data: dict[str, Any]) -> dict[str, Any]:
        await _write(ctx.conn, ctx.message.correlationid or "", 1, "do", "hotels")
        fails(data, 1)
        return {"hotel": "h-1"}

    @trip.on(cars, "hotel.reserved", emits="car.rented", fails="car.failed")
    async def rent_car(ctx: HandlerContext, data: dict[str, Any]) -> None:
        await _write(ctx.conn, ctx.message.correlationid or "", 2, "do", "cars")
        fails(data, 2)

    @trip.on(cars, "car.rented", emits="trip.booked", fails="payment.failed")
    async def charge_card(ctx: HandlerContext, data: dict[str, Any]) -> None:
        await _write(ctx.conn, ctx.message.correlationid or "", 3, "do", "cars")
        fails(data, 3)

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
