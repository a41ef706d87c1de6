"""One side of the messaging core in its own process, for the database outage tests:
``python -m tests.outbox.outage_worker relay DB BROKER CHANNEL [--claims lock|lease]``
(a relay of DB's outbox) or ``... consumer DB BROKER CHANNEL`` (group "orders", which
inserts a row into DB's ``effects`` for each ``order.placed``, through its inbox on DB).

Both use the library's default options but for a shorter poll (the relay) and a shorter
first backoff (the consumer), so that a test does not wait for seconds between retries:
a database outage must be ridden out with the options users have. Prints "ready" once
it can work (the consumer subscribed); SIGTERM stops it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

import sqlalchemy as sa

from accord import Consumer, Database, HandlerContext
from accord.outbox import Relay
from accord.transports import from_url
from tests.processes import Part, serve

GROUP = "orders"

effects = sa.Table(
    "outage_effects",
    sa.MetaData(),
    sa.Column("message_id", sa.String(200), nullable=False),  # not unique: twice shows
    sa.Column("n", sa.Integer, nullable=False),
)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["relay", "consumer"])
    parser.add_argument("db")
    parser.add_argument("broker")
    parser.add_argument("channel")
    parser.add_argument("--claims", choices=["lock", "lease"], default=None)
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")

    database = Database(args.db)
    transport = from_url(args.broker, channel=args.channel)
    await transport.connect()
    parts: list[Part] = []
    consumers: list[Consumer] = []
    if args.role == "relay":
        parts.append(Relay(database, transport, poll_interval=0.2, claims=args.claims))
    else:
        consumer = Consumer(GROUP, database, transport, backoff_base=0.05)

        @consumer.handler("order.placed")
        async def apply(ctx: HandlerContext, data: dict[str, Any]) -> None:
            await ctx.conn.execute(effects.insert().values(message_id=ctx.message.id, n=data["n"]))

        parts.append(consumer)
        consumers.append(consumer)
    await serve(parts, consumers, transport, database)


if __name__ == "__main__":
    asyncio.run(main())
