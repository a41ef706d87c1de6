"""A projection runner in its own process, for fault tests:
``python -m tests.projections.runner_process DB --lease-ttl 1``.

Prints ``ready <owner>`` once started; runs until SIGTERM. With
``ACCORD_TEST_KILL_AT=n`` in its environment it SIGKILLs itself inside the n-th
handler call (mid-batch, before the batch commits).
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from accord.db import Database
from accord.projections import ProjectionRunner
from tests.projections.app import make_scores


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("--lease-ttl", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=50)
    args = parser.parse_args()
    database = Database(args.db)
    runner = ProjectionRunner(
        database, [make_scores(batch_size=args.batch)], lease_ttl=args.lease_ttl, poll_interval=0.05
    )
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(runner.stop()))
    await runner.start()
    print(f"ready {runner.owner}", flush=True)
    await runner.run()
    await database.dispose()


if __name__ == "__main__":
    asyncio.run(main())
