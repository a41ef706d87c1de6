"""One service of the choreographed trip (its relay and its consumer) in a process of its
own, for the SIGKILL tests:
``python -m tests.sagas.choreo_worker SERVICE DB BROKER CHANNEL PREFIX [--kill-at POINT
--kill-after N]``, SERVICE being ``hotels`` or ``cars``, BROKER an AMQP URL or the URL of
the database holding the SQL transport's queue.

``--kill-at`` makes the process SIGKILL itself at the N-th passage through POINT:
  after_commit         an event handled and committed (effects, inbox row, next event in
                       the outbox), its delivery not yet acked
  relay_after_publish  events confirmed by the broker, not yet marked SENT
Prints "ready" once the consumer is subscribed; SIGTERM stops it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio

from accord.db import Database
from accord.testing import FaultyTransport
from accord.transports.base import Transport
from tests.processes import serve
from tests.sagas import choreo_app
from tests.sagas.worker import Killer, kill_before_ack


def transport_for(broker: str, channel: str) -> Transport:
    """RabbitMQ for an AMQP URL, else the SQL transport on that database."""
    if broker.startswith("amqp"):
        from accord.transports.rabbitmq import RabbitTransport

        return RabbitTransport(broker, channel=channel)
    from accord.transports.sql import SqlTransport

    return SqlTransport(broker, channel=channel, poll_interval=0.05, lease=2.0)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("service", choices=[choreo_app.HOTELS, choreo_app.CARS])
    parser.add_argument("db")
    parser.add_argument("broker")
    parser.add_argument("channel")
    parser.add_argument("prefix")
    parser.add_argument("--kill-at", choices=["after_commit", "relay_after_publish"])
    parser.add_argument("--kill-after", type=int, default=1)
    args = parser.parse_args()
    killer = Killer(args.kill_at, args.kill_after)

    database = Database(args.db, pool_size=3, max_overflow=3)
    transport = FaultyTransport(transport_for(args.broker, args.channel))
    if args.kill_at == "relay_after_publish":
        transport.kill_after = args.kill_after
    await transport.connect()

    if args.service == choreo_app.HOTELS:
        consumer = choreo_app.hotels_consumer(database, transport, args.prefix)
    else:
        consumer = choreo_app.cars_consumer(database, transport, args.prefix)
    kill_before_ack(consumer, killer, "after_commit")
    await serve([choreo_app.relay(database, transport), consumer], [consumer], transport, database)


if __name__ == "__main__":
    asyncio.run(main())
