"""Data that breaks a schema's own validator, copies of one message in one batch, and
input Accord's columns cannot hold: each is dead-lettered or skipped, never
redelivered for ever."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from pydantic import BaseModel, field_validator

from accord.db import Database
from accord.inbox import Consumer, DeadLetters, HandlerContext
from accord.messages import Message
from accord.testing import CapturedDelivery, wait_for
from accord.transports.sql import SqlTransport
from tests.inbox.conftest import Broker, Captured, effect_counts, effects, unique


class Named(BaseModel):
    """A schema whose ``before`` validator assumes a string, as schemas often do."""

    name: str

    @field_validator("name", mode="before")
    @classmethod
    def strip(cls, value: Any) -> Any:
        return value.strip()  # AttributeError (not ValueError) on a non-string


async def _dead(database: Database, name: str) -> Sequence[Any]:
    return await DeadLetters(database).list(name)


async def test_data_that_makes_a_schema_validator_raise_is_dead_lettered_not_redelivered_forever(
    app_db: Database, broker: Broker, consumers: Callable[..., Consumer]
) -> None:
    """A validator raising what pydantic does not wrap (AttributeError here; pydantic
    wraps only ValueError and AssertionError) fails the data, not the consumer: the
    message is dead-lettered at once with the error, and the next message of its key
    is applied (before, it was redelivered for ever, holding its key back)."""
    name = unique()
    consumer = consumers(name, app_db, broker.transport(), max_attempts=2)
    applied: list[str] = []

    @consumer.handler("test.named", schema=Named)
    async def on_named(ctx: HandlerContext, data: Named) -> None:
        applied.append(data.name)
        await ctx.conn.execute(effects.insert().values(message_id=ctx.message.id))

    await consumer.start()
    poison = Message(type="test.named", data={"name": 5}, key="k")
    good = Message(type="test.named", data={"name": " ok "}, key="k")
    await broker.publish(poison, good)

    letters = await wait_for(lambda: _dead(app_db, name), timeout=8)
    assert [letter.message_id for letter in letters] == [poison.id]
    await wait_for(lambda: applied == ["ok"], timeout=5)


async def test_in_batch_mode_a_validator_error_does_not_stall_the_rest_of_its_batch(
    app_db: Database, broker: Broker, consumers: Callable[..., Consumer]
) -> None:
    """The same in batch mode: the poison is dead-lettered and the rest of its batch is
    applied (before, the error escaped the batch's triage and every delivery of the
    batch was given back, together, again and again)."""
    name = unique()
    consumer = consumers(name, app_db, broker.transport(), max_attempts=2, batch_size=16)

    @consumer.handler("test.named", schema=Named)
    async def on_named(ctx: HandlerContext, data: Named) -> None:
        await ctx.conn.execute(effects.insert().values(message_id=ctx.message.id))

    good = [Message(type="test.named", data={"name": f"n{i}"}) for i in range(5)]
    poison = Message(type="test.named", data={"name": 5})
    await consumer.start()
    await consumer.stop()
    await broker.publish(*good, poison)  # one backlog: one batch
    await consumer.start()

    async def all_good_applied() -> bool:
        return await effect_counts(app_db) == {m.id: 1 for m in good}

    await wait_for(all_good_applied, timeout=8)
    await wait_for(lambda: _dead(app_db, name), timeout=5)


async def test_a_duplicate_in_the_batch_does_not_reset_the_failing_copys_attempts(
    app_db: Database,
) -> None:
    """Two copies of one message id with a key in one batch (a relay's duplicate). The
    batch fails and is handled one at a time: the first copy fails and is given back,
    the second is skipped as a duplicate. Held back behind the first instead, its
    hold was counted against the first copy's attempts, and the message was never
    dead-lettered while the copies kept meeting."""
    name = unique()
    consumer = Consumer(name, app_db, None, max_attempts=3, backoff_base=0.01, batch_size=8)  # type: ignore[arg-type]
    failures = 0

    @consumer.handler("test.scored")
    async def on_scored(ctx: HandlerContext, data: Any) -> None:
        nonlocal failures
        failures += 1
        raise RuntimeError("always fails")

    message = Message(type="test.scored", data={}, key="k")
    outcomes = []
    for attempt in range(1, 7):
        first, second = Captured(message, attempt), Captured(message, attempt)
        await consumer.handle_batch([first, second])
        outcomes.append((first.outcome, second.outcome))
        if await DeadLetters(app_db).list(name):
            break
    assert await DeadLetters(app_db).list(name), (
        f"after {failures} handler failures (max_attempts=3) the message is not dead: "
        f"settlements per round {outcomes}"
    )


_REQUIRED = {"ce-id": "1", "ce-source": "/elsewhere", "ce-specversion": "1.0", "ce-type": "t.x"}


@pytest.mark.parametrize(
    ("headers", "kind", "reason"),
    [
        ({**_REQUIRED, "ce-id": "x" * 250}, "undecodable", "Message.id is 250 characters"),
        ({**_REQUIRED, "ce-tenant": "a\x00b"}, "undecodable", "holds a control character"),
        (
            {"ce-id": "n\x00" * 150, "ce-type": "t\x00x", "ce-source": "s", "ce-x": "a\x00b"},
            "undecodable",
            "missing required attribute(s) specversion",
        ),
    ],
    ids=["id too long", "NUL in an extension", "not a CloudEvent, NUL everywhere"],
)
async def test_input_the_dead_letter_columns_could_not_hold_is_dead_lettered_at_once(
    database: Database, headers: dict[str, str], kind: str, reason: str
) -> None:
    """A foreign message with a 250-character id, or a NUL in a header, was nacked on
    every delivery on PostgreSQL, for ever: the inbox row or the dead letter could not
    be written (VARCHAR(200); text and JSONB refuse NUL). It is dead-lettered at once,
    its id and type cut to the columns and its NULs kept as U+FFFD."""
    consumer = Consumer(unique(), database, SqlTransport(database=database), max_attempts=2)

    @consumer.handler("t.x")
    async def on_x(ctx: HandlerContext, data: Any) -> None:
        raise AssertionError("bad input reached the handler")

    delivery = CapturedDelivery.raw(headers, b"{}")
    await consumer.handle(delivery)
    assert delivery.outcome == "ack"
    [letter] = await _dead(database, consumer.name)
    assert letter.kind == kind and reason in letter.reason
    assert letter.message_id is None or len(letter.message_id) <= 200
    assert "\x00" not in json.dumps(letter.headers)
    assert all("\x00" not in v for v in (letter.message_id or "", letter.message_type or ""))


async def test_a_control_character_next_to_an_edge_time_is_a_decode_error(
    database: Database,
) -> None:
    """Input from a broker that breaks the CloudEvents rules must be a DecodeError (the
    delivery carries it as ``decode_error`` and the consumer dead-letters it), whatever
    else is odd about it.

    Before the fix, it failed because ``Message.__post_init__``, on finding a
    control character, names the attribute by calling ``self.attributes()``, which
    renders ``time`` in UTC: a valid RFC 3339 time at the calendar's edge
    (``0001-01-01T00:00:00+01:00``) raises OverflowError there, which ``decode()``
    does not turn into DecodeError: it escapes ``Delivery.__init__``, i.e. the
    transport's delivery loop, instead of being dead-lettered."""
    headers = {
        "ce-id": str(uuid.uuid4()),
        "ce-source": "/elsewhere",
        "ce-specversion": "1.0",
        "ce-type": "t.x",
        "ce-time": "0001-01-01T00:00:00+01:00",
        "ce-subject": "a\x01b",
    }
    consumer = Consumer(
        f"review-{uuid.uuid4().hex[:8]}", database, SqlTransport(database=database), max_attempts=2
    )

    @consumer.handler("t.x")
    async def on_x(ctx: HandlerContext, data: Any) -> None:
        raise AssertionError("bad input reached the handler")

    delivery = CapturedDelivery.raw(headers, b"{}")  # OverflowError here
    await consumer.handle(delivery)
    assert delivery.outcome == "ack"
    [letter] = await DeadLetters(database).list(consumer.name)
    assert "control character" in letter.reason
