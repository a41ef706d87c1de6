"""The semantic lock pattern: a saga holds a resource PENDING until it ends. Others see
the lock and refuse; the pivot's success confirms it, a compensation releases it.
This file is the example the ``accord.sagas`` docs point to."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import sqlalchemy as sa

from accord.db import Database
from accord.inbox import Consumer
from accord.outbox import Relay
from accord.sagas import (
    CommandContext,
    Orchestrator,
    Saga,
    SagaAdmin,
    StepContext,
    StepFailed,
    command,
    participant,
)
from accord.testing import wait_for
from accord.transports.sql import SqlTransport

rooms = sa.Table(
    "lock_test_rooms",
    sa.MetaData(),
    sa.Column("room", sa.String(20), primary_key=True),
    sa.Column("state", sa.String(10), nullable=False),  # PENDING, BOOKED
    sa.Column("saga_id", sa.String(100), nullable=False),
)


def hotel(consumer: Consumer) -> None:
    @participant(consumer, "rooms.hold")
    async def hold(ctx: CommandContext, data: dict[str, Any]) -> None:
        taken = await ctx.conn.scalar(sa.select(rooms.c.state).where(rooms.c.room == data["room"]))
        if taken is not None:  # PENDING (another saga holds it) or BOOKED
            raise StepFailed(f"room {data['room']} is {taken}")
        await ctx.conn.execute(
            rooms.insert().values(room=data["room"], state="PENDING", saga_id=ctx.saga_id)
        )

    @participant(consumer, "rooms.release")
    async def release(ctx: CommandContext, data: dict[str, Any]) -> None:
        await ctx.conn.execute(
            rooms.delete().where(rooms.c.room == data["room"], rooms.c.saga_id == ctx.saga_id)
        )

    @participant(consumer, "rooms.confirm")
    async def confirm(ctx: CommandContext, data: dict[str, Any]) -> None:
        await ctx.conn.execute(
            rooms.update()
            .where(rooms.c.room == data["room"], rooms.c.saga_id == ctx.saga_id)
            .values(state="BOOKED")
        )


async def charge(ctx: StepContext) -> None:
    if ctx.data.get("card") == "declined":
        raise StepFailed("card declined")


booking = (
    Saga("booking")
    .step("hold room", command("rooms.hold"), compensate=command("rooms.release"), timeout=30)
    .pivot("charge card", charge)
    .retriable("confirm room", command("rooms.confirm"))
)


async def room_state(database: Database, room: str) -> str | None:
    async with database.connect() as conn:
        value = await conn.scalar(sa.select(rooms.c.state).where(rooms.c.room == room))
    return None if value is None else str(value)


async def test_a_pending_room_is_refused_to_others_until_its_saga_ends(
    database: Database,
) -> None:
    async with database.transaction() as conn:
        await conn.run_sync(lambda sync: rooms.metadata.create_all(sync))
    transport = SqlTransport(
        database.url, channel=f"lock-{uuid.uuid4().hex[:8]}", poll_interval=0.05
    )
    await transport.connect()
    consumer = Consumer("hotel", database, transport, backoff_base=0.02)
    hotel(consumer)
    orchestrator = Orchestrator(database, transport, [booking], timer_interval=0.05)
    parts = [Relay(database, transport, poll_interval=0.05), consumer, orchestrator]
    tasks = [asyncio.create_task(p.run()) for p in parts]
    admin = SagaAdmin(database)

    async def status(saga_id: str, *wanted: str) -> bool:
        return (await admin.get(saga_id)).status in wanted

    try:
        await wait_for(
            lambda: (
                consumer._subscription is not None
                and orchestrator.consumer._subscription is not None
            )
        )
        # The first saga holds room 7 (PENDING) and is refused at its pivot: released.
        declined = await orchestrator.start(booking, {"room": "7", "card": "declined"})
        await wait_for(lambda: status(declined, "COMPENSATED"), 15)
        assert await room_state(database, "7") is None
        assert ("hold room", "succeeded") in [
            (e.step_name, e.event) for e in await admin.history(declined)
        ]

        # A second saga books it; while it is PENDING a third one is refused.
        async with database.transaction() as conn:  # pretend the hold of saga 2 is in place
            await conn.execute(rooms.insert().values(room="9", state="PENDING", saga_id="other"))
        refused = await orchestrator.start(booking, {"room": "9"})
        await wait_for(lambda: status(refused, "COMPENSATED"), 15)
        assert "room 9 is PENDING" in ((await admin.get(refused)).error or "")
        assert await room_state(database, "9") == "PENDING"  # the holder's lock is untouched

        booked = await orchestrator.start(booking, {"room": "7"})
        await wait_for(lambda: status(booked, "COMPLETED"), 15)
        assert await room_state(database, "7") == "BOOKED"
    finally:
        for p in parts:
            with contextlib.suppress(Exception):
                await p.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        await transport.close()
