"""A relay process for benchmarks: ``python -m benchmarks._relay_child DB BROKER CHANNEL``.

Prints ``ready`` once connected, relays until SIGTERM (or, with ``--drain-for S``,
until the outbox is empty or S seconds passed), then exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time

from accord import Database
from accord.outbox import Relay
from accord.transports import from_url


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("broker")
    parser.add_argument("channel")
    parser.add_argument("--drain-for", type=float, default=None)
    args = parser.parse_args()
    transport = from_url(args.broker, channel=args.channel)
    await transport.connect()
    database = Database(args.db)
    relay = Relay(database, transport, batch_size=500, poll_interval=5.0)
    print("ready", flush=True)
    if args.drain_for is not None:
        end = time.monotonic() + args.drain_for
        while time.monotonic() < end and await relay.run_once():
            pass
    else:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(relay.stop()))
        await relay.run()
    await transport.close()
    await database.dispose()


if __name__ == "__main__":
    asyncio.run(main())
