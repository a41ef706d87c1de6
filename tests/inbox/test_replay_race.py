"""Replaying a dead letter whose consumer is running: the consumer may take it, and
having handled it, delete it, as soon as the mark commits."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from accord import Database, Message
from accord.inbox import Consumer, DeadLetters, HandlerContext
from accord.testing import wait_for
from accord.transports.sql import SqlTransport


async def test_replay_reports_the_letter_it_marked_though_its_consumer_took_it_at_once(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replay read the letter again after its mark committed, and a consumer that
    had handled (and deleted) it in between made the replay fail, "no dead letter
    with id 1", though it worked (seen in the demo's CI run over Redis). Here every
    read of the letter after the mark waits until the consumer has handled it: the
    replay must report the letter as it marked it, from the mark itself."""
    name = f"race-{uuid.uuid4().hex[:8]}"
    transport = SqlTransport(channel=name, database=database, poll_interval=0.02)
    handled: list[str] = []
    broken = True
    consumer = Consumer(name, database, transport, max_attempts=1, replay_interval=0.02)

    @consumer.handler("race.replayed")
    async def on_replayed(ctx: HandlerContext, data: Any) -> None:
        if broken:
            raise KeyError("not yet")
        handled.append(ctx.message.id)

    await database.upgrade()
    await consumer.start()
    try:
        message = Message(type="race.replayed")
        await transport.publish([message])
        [letter] = await wait_for(lambda: DeadLetters(database).list(name), 5, interval=0.02)
        broken = False
        reads = DeadLetters.get

        async def read_once_handled(self: DeadLetters, letter_id: int) -> Any:
            current = (await self.list(name))[:1]
            if current and current[0].status == "REPLAY":
                await wait_for(lambda: handled, 5, interval=0.01)
                await asyncio.sleep(0.1)  # its deletion commits
            return await reads(self, letter_id)

        monkeypatch.setattr(DeadLetters, "get", read_once_handled)
        marked = await DeadLetters(database).replay(letter.id)
        assert (marked.id, marked.status, marked.attempts) == (letter.id, "REPLAY", 0)
        await wait_for(lambda: handled, 5, interval=0.01)
    finally:
        await consumer.stop()
        await transport.close()
    assert handled == [message.id]
