"""A relay in its own process, for fault tests: ``python -m tests.outbox.relay_process``.

Runs until SIGTERM (then stops cleanly and exits 0); ``--kill-after N`` makes it
SIGKILL itself right after its N-th confirmed publish, before marking rows SENT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from accord import Database
from accord.outbox import Relay
from accord.testing import FaultyTransport
from accord.transports import from_url


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("broker")
    parser.add_argument("channel")
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--kill-after", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--lease", type=float, default=30.0)
    parser.add_argument("--claims", choices=["lock", "lease"], default=None)
    args = parser.parse_args()

    database = Database(args.db)
    transport = FaultyTransport(
        from_url(args.broker, channel=args.channel),
        fail_rate=args.fail_rate,
        kill_after=args.kill_after,
        seed=args.seed,
    )
    await transport.connect()
    relay = Relay(
        database,
        transport,
        batch_size=args.batch,
        lease=args.lease,
        claims=args.claims,
        max_attempts=1000,
        backoff_base=0.02,
        backoff_cap=0.2,
        poll_interval=0.1,
    )
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(relay.stop()))
    print("ready", flush=True)
    await relay.run()
    await transport.close()
    await database.dispose()


if __name__ == "__main__":
    asyncio.run(main())
