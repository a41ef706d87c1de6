"""Participants registered with ``batch=True``: one call for the commands of a batch that
need their function, handed straight to the consumer (real database, no broker)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import pytest
import sqlalchemy as sa

from accord.db import Database
from accord.inbox import Consumer
from accord.sagas import CommandContext, StepFailed, participant
from accord.testing import CapturedDelivery
from accord.transports.sql import SqlTransport
from tests.sagas import app
from tests.sagas.test_replies import command, outcomes, replies, unrefused

Calls = list[list[tuple[str, str]]]  # per call: (saga id, phase) of each command given


async def _write_all(commands: Sequence[tuple[CommandContext, Any]], op: str, service: str) -> None:
    """One statement for every command of the call."""
    await commands[0][0].conn.execute(
        app.ledger.insert(),
        [{"saga_id": c.saga_id, "step": c.step, "op": op, "service": service} for c, _ in commands],
    )


def hotels(database: Database, *, batch_size: int, calls: Calls) -> Consumer:
    transport = SqlTransport(database.url, channel=f"bp-{uuid.uuid4().hex[:8]}")
    consumer = Consumer("bp-hotels", database, transport, batch_size=batch_size)

    @participant(consumer, "hotels.reserve", batch=True)
    async def reserve(commands: Sequence[tuple[CommandContext, Any]]) -> list[Any]:
        calls.append([(c.saga_id, c.phase) for c, _ in commands])
        for ctx, data in commands:
            if data.get("fail_at") == 1:
                raise StepFailed(f"no room for {ctx.saga_id[:8]}")
        await _write_all(commands, "do", consumer.name)
        if any(data.get("wrong_count") for _, data in commands):
            return []
        return [{"room": f"R-{ctx.saga_id[:8]}"} for ctx, _ in commands]

    @participant(consumer, "hotels.cancel", batch=True)
    async def cancel(commands: Sequence[tuple[CommandContext, Any]]) -> None:
        calls.append([(c.saga_id, c.phase) for c, _ in commands])
        assert all(c.compensating for c, _ in commands)
        await _write_all(commands, "undo", consumer.name)

    return consumer


def reserves(**second: Any) -> tuple[list[str], list[CapturedDelivery]]:
    """Three sagas' reserve commands; the second's data carries ``second``."""
    saga_ids = [str(uuid.uuid4()) for _ in range(3)]
    batch = [
        CapturedDelivery(
            command(saga_id, "hotels.reserve", 1, "action", **(second if i == 1 else {}))
        )
        for i, saga_id in enumerate(saga_ids)
    ]
    return saga_ids, batch


@pytest.fixture
async def tables(database: Database) -> Database:
    await app.create_tables(database)
    return database


async def test_one_call_for_the_commands_that_need_the_function_with_results_in_order(
    tables: Database,
) -> None:
    calls: Calls = []
    consumer = hotels(tables, batch_size=16, calls=calls)
    s1, s2, s3, s4 = (str(uuid.uuid4()) for _ in range(4))
    original = command(s1, "hotels.reserve", 1, "action")
    batch = [
        CapturedDelivery(original),
        CapturedDelivery(command(s2, "hotels.reserve", 1, "action")),
        CapturedDelivery(original),  # the same message twice: the inbox drops it
        CapturedDelivery(command(s3, "hotels.cancel", 1, "compensation")),  # nothing to undo
        CapturedDelivery(command(s3, "hotels.reserve", 1, "action")),  # overtaken: refused
        CapturedDelivery(command(s4, "hotels.reserve", 1, "action")),
    ]
    await consumer.handle_batch(batch)
    assert unrefused(batch)
    assert calls == [[(s1, "action"), (s2, "action"), (s4, "action")]]
    assert await app.transaction_sizes(tables, "bp-hotels") == [5]
    assert await app.ledger_rows(tables) == [(s1, 1, "do"), (s2, 1, "do"), (s4, 1, "do")]
    for saga_id in (s1, s2, s4):
        [sent] = await replies(tables, saga_id)
        assert sent["ok"] and sent["result"] == {"room": f"R-{saga_id[:8]}"}
    assert await outcomes(tables, s3) == [("compensation", True), ("action", False)]


async def test_a_command_whose_step_is_already_in_the_call_waits_for_that_call(
    tables: Database,
) -> None:
    calls: Calls = []
    consumer = hotels(tables, batch_size=16, calls=calls)
    s1, s2 = str(uuid.uuid4()), str(uuid.uuid4())
    batch = [
        CapturedDelivery(command(s1, "hotels.reserve", 1, "action")),
        CapturedDelivery(command(s2, "hotels.reserve", 1, "action")),
        # s1's compensation right behind its action, and the action re-sent under another
        # id: both must see what the first call did
        CapturedDelivery(command(s1, "hotels.cancel", 1, "compensation")),
        CapturedDelivery(command(s1, "hotels.reserve", 1, "action")),
    ]
    await consumer.handle_batch(batch)
    assert unrefused(batch)
    assert calls == [[(s1, "action"), (s2, "action")], [(s1, "compensation")]]
    assert await app.ledger_rows(tables) == [(s1, 1, "do"), (s2, 1, "do"), (s1, 1, "undo")]
    assert await outcomes(tables, s1) == [
        ("action", True),
        ("compensation", True),
        ("action", False),  # late: its step was compensated
    ]


async def test_a_refusal_fails_the_batch_then_only_its_own_command_one_at_a_time(
    tables: Database,
) -> None:
    calls: Calls = []
    consumer = hotels(tables, batch_size=16, calls=calls)
    (s1, s2, s3), batch = reserves(fail_at=1)
    await consumer.handle_batch(batch)
    assert [d.outcome for d in batch] == ["ack"] * 3
    # The whole batch in one call, rolled back; then one command per call.
    assert calls == [[(s1, "action"), (s2, "action"), (s3, "action")]] + [
        [(s, "action")] for s in (s1, s2, s3)
    ]
    assert await app.ledger_rows(tables) == [(s1, 1, "do"), (s3, 1, "do")]
    [refused] = await replies(tables, s2)
    assert not refused["ok"] and refused["error"] == f"StepFailed: no room for {s2[:8]}"
    assert await outcomes(tables, s1) == await outcomes(tables, s3) == [("action", True)]


async def test_a_function_returning_the_wrong_number_of_results_is_refused_with_the_reason(
    tables: Database,
) -> None:
    calls: Calls = []
    consumer = hotels(tables, batch_size=1, calls=calls)  # one command a transaction
    saga_id = str(uuid.uuid4())
    delivery = CapturedDelivery(command(saga_id, "hotels.reserve", 1, "action", wrong_count=True))
    await consumer.handle(delivery)
    assert delivery.outcome == "ack"
    [sent] = await replies(tables, saga_id)
    assert not sent["ok"]
    assert "returned 0 result(s) for 1 command(s)" in sent["error"]
    assert await app.ledger_rows(tables) == []  # its writes rolled back with the savepoint


async def test_a_batch_function_serves_a_consumer_outside_batch_mode(tables: Database) -> None:
    calls: Calls = []
    consumer = hotels(tables, batch_size=1, calls=calls)
    saga_id = str(uuid.uuid4())
    for _ in range(2):  # the orchestrator retrying after a lost reply: done once
        delivery = CapturedDelivery(command(saga_id, "hotels.reserve", 1, "action"))
        await consumer.handle(delivery)
        assert delivery.outcome == "ack"
    assert calls == [[(saga_id, "action")]]
    assert [(r["ok"], r["result"]) for r in await replies(tables, saga_id)] == [
        (True, {"room": f"R-{saga_id[:8]}"})
    ] * 2
    async with tables.connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(app.ledger)) == 1


async def test_a_wrong_number_of_results_fails_the_batch_then_refuses_only_that_command(
    tables: Database,
) -> None:
    calls: Calls = []
    consumer = hotels(tables, batch_size=16, calls=calls)
    (s1, s2, s3), batch = reserves(wrong_count=True)
    await consumer.handle_batch(batch)
    assert [d.outcome for d in batch] == ["ack"] * 3
    assert len(calls) == 4  # the batch, then one command per call
    assert await app.ledger_rows(tables) == [(s1, 1, "do"), (s3, 1, "do")]
    [refused] = await replies(tables, s2)
    assert not refused["ok"] and "returned 0 result(s) for 1 command(s)" in refused["error"]


async def test_after_a_failed_batch_a_batch_function_gets_one_command_at_a_time_for_a_while(
    tables: Database,
) -> None:
    calls: Calls = []
    consumer = hotels(tables, batch_size=16, calls=calls)
    failing = [str(uuid.uuid4()) for _ in range(2)]
    await consumer.handle_batch(
        [
            CapturedDelivery(command(failing[0], "hotels.reserve", 1, "action")),
            CapturedDelivery(command(failing[1], "hotels.reserve", 1, "action", fail_at=1)),
        ]
    )
    calls.clear()
    # Careful now: a refusal is one command's failure reply, not another replayed batch.
    (s1, s2, s3), careful = reserves(fail_at=1)
    await consumer.handle_batch(careful)
    assert unrefused(careful)
    assert calls == [[(s, "action")] for s in (s1, s2, s3)]
    assert (await app.transaction_sizes(tables, "bp-hotels"))[0] == 3  # one transaction
    assert await outcomes(tables, s1) == await outcomes(tables, s3) == [("action", True)]
    assert await outcomes(tables, s2) == [("action", False)]


async def test_per_command_and_batch_functions_share_a_batch_and_a_sagas_order(
    tables: Database,
) -> None:
    calls: Calls = []
    consumer = hotels(tables, batch_size=16, calls=calls)
    order: list[tuple[str, str]] = []

    @participant(consumer, "hotels.upgrade")
    async def upgrade(ctx: CommandContext, data: Any) -> dict[str, str]:
        order.append((ctx.saga_id, "upgrade"))
        return {"suite": ctx.saga_id[:8]}

    s1, s2 = str(uuid.uuid4()), str(uuid.uuid4())
    batch = [
        CapturedDelivery(command(s1, "hotels.reserve", 1, "action")),
        CapturedDelivery(command(s2, "hotels.upgrade", 2, "action")),
        CapturedDelivery(command(s1, "hotels.upgrade", 2, "action")),  # after s1's reserve
        CapturedDelivery(command(s2, "hotels.reserve", 1, "action")),  # after s2's upgrade
    ]
    await consumer.handle_batch(batch)
    assert unrefused(batch)
    assert await app.transaction_sizes(tables, "bp-hotels") == [4]
    # s2's upgrade ran (alone) before the first reserve call; s1's upgrade waited for it.
    assert calls == [[(s1, "action")], [(s2, "action")]]
    assert order == [(s2, "upgrade"), (s1, "upgrade")]
    rows = await app.ledger_rows(tables)
    assert rows == [(s1, 1, "do"), (s2, 1, "do")]
    sent = {
        saga_id: [(r["step"], r["ok"]) for r in await replies(tables, saga_id)]
        for saga_id in (s1, s2)
    }
    assert sent == {s1: [(1, True), (2, True)], s2: [(2, True), (1, True)]}  # in arrival order
