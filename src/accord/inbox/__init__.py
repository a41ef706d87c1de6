"""The idempotent inbox: consumers that apply each message exactly once.

::

    consumer = Consumer("score-engine", database, transport)

    @consumer.handler("match.recorded", schema=MatchRecorded)
    async def on_match(ctx: HandlerContext, data: MatchRecorded) -> None:
        await ctx.conn.execute(...)          # same transaction as the inbox row
        await ctx.publish(Message(...))      # outbox, same transaction

    await consumer.run()
"""

from accord.inbox._consumer import Consumer
from accord.inbox._context import HandlerContext, HandlerFunc
from accord.inbox._dead_letters import DEAD, KINDS, REPLAY, DeadLetter, DeadLetters
from accord.inbox._store import Inbox

__all__ = [
    "DEAD",
    "KINDS",
    "REPLAY",
    "Consumer",
    "DeadLetter",
    "DeadLetters",
    "HandlerContext",
    "HandlerFunc",
    "Inbox",
]
