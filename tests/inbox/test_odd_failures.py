"""Handlers that fail oddly: a BaseException of their own, a CancelledError of something
they awaited, an error whose str() raises or is huge. Each is a failure of its message
(retried, then dead-lettered with a readable reason); the consumer goes on serving."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from accord.db import Database
from accord.inbox import Consumer, DeadLetters, HandlerContext
from accord.messages import Message
from accord.testing import wait_for
from tests.inbox.conftest import Broker, Captured, effect_counts, effects, unique


class OwnBaseException(BaseException):
    """What some libraries raise to unwind (gevent's Timeout, a test framework's)."""


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("cannot print me")


def _raise_base() -> None:
    raise OwnBaseException("unwinding")


def _raise_cancelled() -> None:
    raise asyncio.CancelledError()  # as awaiting a task someone else cancelled does


def _raise_unprintable() -> None:
    raise Unprintable()


ODD = {
    "own BaseException": (_raise_base, "OwnBaseException: unwinding"),
    "CancelledError not of this task": (_raise_cancelled, "CancelledError"),
    "str() raises": (_raise_unprintable, "Unprintable: <its str() raised RuntimeError>"),
}


async def _dead_reasons(database: Database, name: str) -> list[str] | None:
    letters = await DeadLetters(database).list(name)
    return [letter.reason for letter in letters] or None


@pytest.mark.parametrize("batch_size", [1, 8])
@pytest.mark.parametrize("odd", list(ODD))
async def test_an_odd_failure_is_dead_lettered_and_the_consumer_goes_on(
    app_db: Database,
    broker: Broker,
    consumers: Callable[..., Consumer],
    odd: str,
    batch_size: int,
) -> None:
    """Before, a BaseException of the handler's own or a CancelledError ended the
    transport's consuming task (nothing more was handled, and the worker did not
    notice), and an error whose str() raised was redelivered for ever: building its
    dead letter's reason raised too."""
    name = unique()
    consumer = consumers(name, app_db, broker.transport(), max_attempts=2, batch_size=batch_size)
    raise_it, described = ODD[odd]

    @consumer.handler("test.odd")
    async def on_odd(ctx: HandlerContext, data: Any) -> None:
        await ctx.conn.execute(effects.insert().values(message_id=ctx.message.id))
        raise_it()

    @consumer.handler("test.ok")
    async def on_ok(ctx: HandlerContext, data: Any) -> None:
        await ctx.conn.execute(effects.insert().values(message_id=ctx.message.id))

    await consumer.start()
    await consumer.stop()  # the group exists: what follows is one backlog, one batch
    poison = Message(type="test.odd", data={})
    before = [Message(type="test.ok", data={"n": i}) for i in range(3)]
    await broker.publish(*before, poison)
    await consumer.start()
    [reason] = await wait_for(lambda: _dead_reasons(app_db, name), timeout=15)
    assert reason.startswith(f"handler failed 2 time(s); last error: {described}\n"), reason
    assert "Traceback" in reason and "on_odd" in reason

    after = [Message(type="test.ok", data={"n": i}) for i in range(3, 6)]
    await broker.publish(*after)

    async def all_ok_applied_once() -> bool:
        return await effect_counts(app_db) == {m.id: 1 for m in [*before, *after]}

    await wait_for(all_ok_applied_once, timeout=15)


async def test_a_huge_error_keeps_its_traceback_in_the_reason(database: Database) -> None:
    """An error with a megabyte of text: its dead letter's reason says where it failed
    (the text alone filled the 4,000 characters kept, and the traceback was cut off);
    the retry's log line keeps a thousand characters of it, not the megabyte."""
    name = unique()
    consumer = Consumer(name, database, None, max_attempts=2)  # type: ignore[arg-type]

    @consumer.handler("test.huge")
    async def on_huge(ctx: HandlerContext, data: Any) -> None:
        raise ValueError("x" * 1_000_000)

    message = Message(type="test.huge", data={})
    first = Captured(message, 1)
    await consumer.handle(first)
    assert first.outcome == "nack"
    last = Captured(message, 2)
    await consumer.handle(last)
    assert last.outcome == "ack"
    [letter] = await DeadLetters(database).list(name)
    assert len(letter.reason) <= 4000
    assert len(letter.summary) < 1100, letter.summary[:200]
    assert letter.summary.startswith("handler failed 2 time(s); last error: ValueError: xxx")
    assert "Traceback" in letter.reason and "on_huge" in letter.reason


async def test_an_after_commit_callback_raising_a_base_exception_does_not_stop_the_ack(
    app_db: Database,
) -> None:
    """The commit stands: the delivery is acked and the callbacks after it still run
    (before, the BaseException escaped and the committed message was never acked)."""
    name = unique()
    consumer = Consumer(name, app_db, None)  # type: ignore[arg-type]
    ran: list[str] = []

    @consumer.handler("test.ok")
    async def on_ok(ctx: HandlerContext, data: Any) -> None:
        await ctx.conn.execute(effects.insert().values(message_id=ctx.message.id))
        ctx.after_commit(_raise_base)
        ctx.after_commit(lambda: ran.append("second"))

    message = Message(type="test.ok", data={})
    delivery = Captured(message)
    await consumer.handle(delivery)
    assert delivery.outcome == "ack"
    assert ran == ["second"]
    assert await effect_counts(app_db) == {message.id: 1}
