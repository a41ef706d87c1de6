"""Choreographed sagas: each service reacts to one event with a local transaction and
emits the next event, or a failure event that sets the compensating handlers going."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from accord.errors import ConfigurationError
from accord.inbox import Consumer, HandlerContext
from accord.messages import Message
from accord.outbox import add as add_to_outbox

__all__ = ["Choreography", "FlowHandler"]

log = logging.getLogger("accord.sagas.choreography")

FlowHandler = Callable[[HandlerContext, Any], Awaitable[Any]]

#: ``flowoutcome`` extension values the flow tracker understands.
NEXT, FAILED, COMPENSATING, COMPLETED, COMPENSATED = (
    "next",
    "failed",
    "compensating",
    "completed",
    "compensated",
)


class Choreography:
    """A choreographed saga: the events that chain its services, declared where they are
    handled::

        trip = Choreography("trip", completed="trip.booked", compensated="trip.cancelled")

        @trip.on(hotels, "trip.requested", emits="hotel.reserved", fails="trip.cancelled")
        async def reserve_hotel(ctx, data): ...          # raise to fail

        @trip.on(cars, "hotel.reserved", emits="trip.booked", fails="car.failed")
        async def rent_car(ctx, data): ...

        @trip.compensate(hotels, "car.failed", emits="trip.cancelled")
        async def cancel_hotel(ctx, data): ...

    A step handler runs in its consumer's transaction (inbox row included). If it
    returns, the event ``emits`` is published through the outbox with the incoming
    data updated by the returned dict. If it raises, its writes are rolled back
    (savepoint) and the failure event ``fails`` is published instead, with the
    error. A compensating handler is retried by its consumer until it succeeds
    (past the consumer's attempts it is dead-lettered and the flow tracker reports
    the flow as stalled). Every event carries the correlation id given by
    :meth:`start`, the step name and its outcome, for the flow tracker.
    """

    def __init__(self, name: str, *, completed: str, compensated: str) -> None:
        self.name = name
        self.completed = completed
        self.compensated = compensated

    async def start(
        self,
        conn: AsyncConnection,
        type: str,
        data: dict[str, Any],
        *,
        correlation_id: str | None = None,
        source: str = "accord",
    ) -> str:
        """Publish the first event in ``conn``'s transaction; return the correlation id
        that every event of this flow will carry."""
        correlation = correlation_id or str(uuid.uuid4())
        message = Message(
            type=type,
            data=data,
            source=source,
            key=correlation,
            correlationid=correlation,
            extensions={"flowstep": f"{self.name}.start", "flowoutcome": NEXT},
        )
        await add_to_outbox(conn, message)
        return correlation

    def _outcome(self, type: str, default: str) -> str:
        if type == self.completed:
            return COMPLETED
        if type == self.compensated:
            return COMPENSATED
        return default

    def on(
        self, consumer: Consumer, event: str, *, emits: str, fails: str, schema: Any = None
    ) -> Callable[[FlowHandler], FlowHandler]:
        """Register a step: on ``event``, run the handler, then emit ``emits`` or ``fails``."""

        def register(func: FlowHandler) -> FlowHandler:
            step = func.__name__

            async def handle(ctx: HandlerContext, data: Any) -> None:
                incoming = dict(ctx.message.data or {})
                nested = await ctx.conn.begin_nested()
                try:
                    result = await func(ctx, data)
                except Exception as exc:
                    await nested.rollback()
                    error = f"{type(exc).__name__}: {exc}"
                    log.info("flow step %s failed: %s", step, error)
                    outcome = self._outcome(fails, FAILED)
                    await self._emit(ctx, fails, {**incoming, "error": error}, step, outcome)
                    return
                await nested.commit()
                payload = {**incoming, **result} if isinstance(result, dict) else incoming
                await self._emit(ctx, emits, payload, step, self._outcome(emits, NEXT))

            consumer.add_handler(event, handle, schema=schema)
            return func

        return register

    def compensate(
        self, consumer: Consumer, *events: str, emits: str, schema: Any = None
    ) -> Callable[[FlowHandler], FlowHandler]:
        """Register a compensating handler for the failure events ``events``; it emits
        ``emits`` once done. It must succeed eventually: raising makes the consumer retry."""
        if not events:
            raise ConfigurationError("compensate() needs at least one failure event type")

        def register(func: FlowHandler) -> FlowHandler:
            step = func.__name__

            async def handle(ctx: HandlerContext, data: Any) -> None:
                await func(ctx, data)
                payload = dict(ctx.message.data or {})
                outcome = self._outcome(emits, COMPENSATING)
                await self._emit(ctx, emits, payload, step, outcome)

            for event in events:
                consumer.add_handler(event, handle, schema=schema)
            return func

        return register

    async def _emit(
        self, ctx: HandlerContext, type: str, data: dict[str, Any], step: str, outcome: str
    ) -> None:
        parent = ctx.message
        await ctx.publish(
            Message(
                type=type,
                data=data,
                source=ctx.consumer,
                key=parent.key or parent.correlationid,
                extensions={"flowstep": step, "flowoutcome": outcome},
            )
        )
