"""Choreographed sagas: each service reacts to one event with a local transaction and
emits the next event, or a failure event that sets the compensating handlers going."""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from pydantic_core import core_schema
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from accord.db.schema_sagas import participations
from accord.errors import ConfigurationError
from accord.inbox import Consumer, HandlerContext
from accord.messages import CONTROL_CHARACTERS, MAX_NAME_LENGTH, Message
from accord.outbox import add as add_to_outbox
from accord.sagas._participant import refuse_snapshot_isolation

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

    A service that compensated a flow records it (in its transaction), and a step
    event of that flow reaching the service afterwards — it can, with parallel
    branches or a redelivery that waits while later messages go ahead — is not
    applied: nothing is left behind that no compensation will undo.
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
        that every event of this flow will carry.

        Idempotent per ``correlation_id``: the first event's id is derived from it, so
        a retried start adds nothing to the outbox while the first is there, and the
        services' inboxes drop it after that (as ``Orchestrator.start`` per saga id).
        ``correlation_id`` is a non-empty text of at most 200 characters without
        control characters (None: a new random one).
        """
        if correlation_id is not None:
            _check_correlation_id(correlation_id)
        correlation = correlation_id or str(uuid.uuid4())
        message = Message(
            id=str(uuid.uuid5(_START_IDS, f"{self.name}/{correlation}")),
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
        refuse_snapshot_isolation(consumer.database, f"choreography step on {event!r}")

        def register(func: FlowHandler) -> FlowHandler:
            step = func.__name__

            async def handle(ctx: HandlerContext, data: Any) -> None:
                if await _compensated_here(ctx):
                    log.info(
                        "flow %s was compensated at %s: late %s not applied",
                        _flow_id(ctx),
                        ctx.consumer,
                        ctx.message.type,
                    )
                    return
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

            consumer.add_handler(event, handle, schema=JsonObject if schema is None else schema)
            return func

        return register

    def compensate(
        self, consumer: Consumer, *events: str, emits: str, schema: Any = None
    ) -> Callable[[FlowHandler], FlowHandler]:
        """Register a compensating handler for the failure events ``events``; it emits
        ``emits`` once done. It must succeed eventually: raising makes the consumer retry."""
        if not events:
            raise ConfigurationError("compensate() needs at least one failure event type")
        refuse_snapshot_isolation(consumer.database, f"compensation on {events[0]!r}")

        def register(func: FlowHandler) -> FlowHandler:
            step = func.__name__
            # What makes this compensation the one it is, whatever its function's name.
            identity = (
                f"{self.name}|{func.__module__}.{func.__qualname__}|{','.join(sorted(events))}"
                f"|{emits}"
            )

            async def handle(ctx: HandlerContext, data: Any) -> None:
                if not await _mark_compensated_here(ctx, identity):
                    # Another failure event of this flow (parallel branches that both
                    # failed) already had this compensation run here: once is enough.
                    log.info(
                        "flow %s: %s already ran at %s; %s changes nothing",
                        _flow_id(ctx),
                        step,
                        ctx.consumer,
                        ctx.message.type,
                    )
                    return
                await func(ctx, data)
                payload = dict(ctx.message.data or {})
                outcome = self._outcome(emits, COMPENSATING)
                await self._emit(ctx, emits, payload, step, outcome)

            for event in events:
                consumer.add_handler(event, handle, schema=JsonObject if schema is None else schema)
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
                key=parent.key or _ordering_key(_flow_id(ctx)),
                extensions={"flowstep": step, "flowoutcome": outcome},
            )
        )


def _check_correlation_id(correlation_id: Any) -> None:
    if not isinstance(correlation_id, str) or not correlation_id:
        # "" would start a new random flow at every retry: no longer idempotent.
        raise ConfigurationError(
            "correlation_id must be a non-empty string (or None for a new random id), "
            f"not {correlation_id!r}"
        )
    if len(correlation_id) > MAX_NAME_LENGTH:
        raise ConfigurationError(
            f"correlation_id {correlation_id[:40]!r}... is {len(correlation_id)} characters "
            f"long; at most {MAX_NAME_LENGTH} (it is the flow's key: derive a shorter one, "
            "e.g. uuid.uuid5 of the long one)"
        )
    if CONTROL_CHARACTERS.search(correlation_id):
        raise ConfigurationError(
            f"correlation_id {correlation_id!r} holds a control character, which a message "
            "attribute cannot carry"
        )


class JsonObject:
    """The data a choreography handler takes when registered without a ``schema``: a
    JSON object, or none. Anything else is dead-lettered at once as invalid data,
    saying so: the handlers merge the data into the next event's, and failed with a
    TypeError at every attempt (a compensating function ran, and was rolled back,
    each time)."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        return core_schema.no_info_plain_validator_function(_event_data)


def _event_data(value: Any) -> Any:
    if value is None or isinstance(value, dict):
        return value
    kind = _JSON_KINDS.get(type(value), type(value).__name__)
    raise ValueError(
        f"a choreography event's data must be a JSON object (or null), not {kind}: "
        "the next event's data is made from its fields"
    )


_JSON_KINDS = {
    list: "an array",
    str: "a string",
    bool: "a boolean",
    int: "a number",
    float: "a number",
}


_START_IDS = uuid.UUID("3d6c1f0a-7b2e-4c55-9a0e-5f1d2b8c7e44")

# A flow compensated at a service is a participations row of that service's consumer
# with step -1 (orchestrated steps are numbered from 0).
_FLOW_STEP = -1
#: The width of the participations' saga id column, which holds a flow's id.
_FLOW_ID_WIDTH = 100


def _flow_id(ctx: HandlerContext) -> str:
    # As HandlerContext.publish gives the events a handler emits (and the flow tracker
    # records them): the correlation id, else the message's own id. Never the key: a
    # flow's first event without a correlation id would be looked up under its key
    # while its compensation, carrying the correlation id it was given, is recorded
    # under that id; a late step event was then applied after its compensation.
    return ctx.message.correlationid or ctx.message.id


def _flow_key(ctx: HandlerContext) -> str:
    """The flow's id as its records here hold it: a longer one than the column (a
    correlation id has no limit) by a digest of it, else PostgreSQL refused the
    record and the compensation was dead-lettered, never run."""
    return _fitted(_flow_id(ctx), _FLOW_ID_WIDTH)


def _ordering_key(flow: str) -> str:
    # The events of a flow share its key; a correlation id longer than a key may be
    # (a message refuses it) is replaced by a digest, else no event could be emitted.
    return _fitted(flow, MAX_NAME_LENGTH)


def _fitted(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


async def _lock_flow(ctx: HandlerContext) -> None:
    # A step event and a compensation of one flow handled at once by two consumers of
    # the service: serialise them, so one sees the other's record (SQLite is serial).
    if ctx.conn.dialect.name == "postgresql":
        await ctx.conn.execute(
            sa.text("SELECT pg_advisory_xact_lock(hashtext(:k))"),
            {"k": f"accord-flow/{ctx.consumer}/{_flow_id(ctx)}"},
        )


async def _compensated_here(ctx: HandlerContext) -> bool:
    await _lock_flow(ctx)
    query = sa.select(sa.literal(1)).where(
        participations.c.participant == ctx.consumer,
        participations.c.saga_id == _flow_key(ctx),
        participations.c.step == _FLOW_STEP,
    )
    return (await ctx.conn.scalar(query)) is not None


async def _mark_compensated_here(ctx: HandlerContext, compensation: str) -> bool:
    """Record that ``compensation`` ran here for this flow; False if it had already."""
    await _lock_flow(ctx)
    insert = pg_insert if ctx.conn.dialect.name == "postgresql" else sqlite_insert
    # One row per compensating function and flow (the phase column is short: a digest).
    digest = hashlib.sha1(compensation.encode(), usedforsecurity=False).hexdigest()[:16]
    result = await ctx.conn.execute(
        insert(participations)
        .values(
            participant=ctx.consumer,
            saga_id=_flow_key(ctx),
            step=_FLOW_STEP,
            phase=f"c:{digest}",
            attempt=ctx.attempt,
            ok=True,
            at=datetime.now(UTC),
        )
        .on_conflict_do_nothing()
    )
    return bool(result.rowcount)
