"""A relay process for benchmarks: ``python -m benchmarks._relay_child DB BROKER CHANNEL``.

Prints ``ready`` once connected, relays until SIGTERM (or, with ``--drain-for S``,
until the outbox is empty or S seconds passed), then exits 0.

With ``--bare`` it is the latency benchmark's baseline instead: the least a relay
can be, one asyncpg loop woken by the same ``NOTIFY`` that claims pending rows,
publishes them to the exchange ``CHANNEL`` with plain aio-pika and its publisher
confirms, and marks them SENT with the time the confirms came back.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from datetime import UTC, datetime

from accord import Database
from accord.outbox import Relay
from accord.outbox.writer import NOTIFY_CHANNEL
from accord.transports import from_url
from benchmarks._common import BARE_CLAIM, bare_amqp_message

BARE_MARK = "UPDATE accord_outbox SET status = 'SENT', sent_at = $2 WHERE seq = ANY($1)"


async def bare(dsn: str, broker: str, exchange_name: str, stopping: asyncio.Event) -> None:
    import aio_pika
    import asyncpg

    conn = await asyncpg.connect(dsn)
    listener = await asyncpg.connect(dsn)
    wake = asyncio.Event()
    await listener.add_listener(NOTIFY_CHANNEL, lambda *_: wake.set())
    amqp = await aio_pika.connect(broker)
    channel = await amqp.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(exchange_name)

    print("ready", flush=True)
    while not stopping.is_set():
        wake.clear()
        async with conn.transaction():
            rows = await conn.fetch(BARE_CLAIM, 500)
            if rows:
                await asyncio.gather(
                    *(
                        exchange.publish(bare_amqp_message(r), routing_key=r["event_type"])
                        for r in rows
                    )
                )
                await conn.execute(BARE_MARK, [r["seq"] for r in rows], datetime.now(UTC))
        if len(rows) < 500:
            waits = [asyncio.ensure_future(e.wait()) for e in (wake, stopping)]
            await asyncio.wait(waits, timeout=5.0, return_when=asyncio.FIRST_COMPLETED)
            for waiting in waits:
                waiting.cancel()
    await amqp.close()
    await listener.close()
    await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("broker")
    parser.add_argument("channel")
    parser.add_argument("--drain-for", type=float, default=None)
    parser.add_argument("--bare", action="store_true")
    args = parser.parse_args()
    loop = asyncio.get_running_loop()
    if args.bare:
        stopping = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stopping.set)
        dsn = args.db.replace("postgresql+asyncpg://", "postgresql://", 1)
        await bare(dsn, args.broker, args.channel, stopping)
        return
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
        loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(relay.stop()))
        await relay.run()
    await transport.close()
    await database.dispose()


if __name__ == "__main__":
    asyncio.run(main())
