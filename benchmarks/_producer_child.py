"""A steady producer for benchmarks: ``python -m benchmarks._producer_child DB RATE SECONDS``.

Commits one outbox message per business transaction, paced to RATE per second
by several concurrent loops, then prints the rate it achieved and, after it, one
line per message: its id and the wall-clock time its commit returned.
"""

from __future__ import annotations

import asyncio
import sys
import time

from accord import Database, Message, add_to_outbox

LOOPS = 8


async def main() -> None:
    url, rate, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    commits: list[tuple[str, float]] = []
    database = Database(url)
    per_loop = rate / LOOPS
    total = int(seconds * per_loop)
    start = time.perf_counter() + 0.2

    async def loop(offset: int) -> None:
        for i in range(total):
            due = start + (i + offset / LOOPS) / per_loop
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            message = Message(type="bench.tick", data={"t": time.time()})
            async with database.transaction() as conn:
                await add_to_outbox(conn, message)
            commits.append((message.id, time.time()))

    await asyncio.gather(*(loop(i) for i in range(LOOPS)))
    achieved = total * LOOPS / (time.perf_counter() - start)
    print(f"{achieved:.1f}")
    sys.stdout.writelines(f"{id_} {at}\n" for id_, at in commits)
    sys.stdout.flush()
    await database.dispose()


if __name__ == "__main__":
    asyncio.run(main())
