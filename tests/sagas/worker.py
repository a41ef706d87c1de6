"""The trip saga's relay, orchestrator and participants in one process, for fault tests:
``python -m tests.sagas.worker DB BROKER CHANNEL PREFIX [--kill-at POINT --kill-after N]
[--batch-size N]`` (``--batch-size`` > 1: the orchestrator and participants in batch mode).

``--kill-at`` makes the process SIGKILL itself at the N-th passage through POINT:
  save_before_commit   an orchestrator transition written, its transaction not committed
  reply_after_commit   a reply's transition committed, the reply not yet acked
  timer_after_commit   a deadline fired and committed
  participant_after_commit  a participant's step committed, the command not yet acked
  relay_after_publish  commands/replies confirmed by the broker, not yet marked SENT
  batch_after_commit   a batch of several replies or commands committed whole, none acked
Prints "ready" once every consumer is subscribed; SIGTERM stops it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import Sequence
from typing import Any

from accord.db import Database
from accord.inbox import Consumer
from accord.outbox import Relay
from accord.sagas import Orchestrator
from accord.sagas import _engine as engine_module
from accord.testing import FaultyTransport
from accord.transports.base import Delivery
from tests.processes import serve
from tests.sagas import app
from tests.sagas.conftest import make_transport


class Killer:
    def __init__(self, point: str | None, after: int) -> None:
        self.point = point
        self.after = after
        self.count = 0

    def passed(self, point: str) -> None:
        if point != self.point:
            return
        self.count += 1
        if self.count >= self.after:
            os.kill(os.getpid(), signal.SIGKILL)


def kill_before_ack(consumer: Consumer, killer: Killer, point: str) -> None:
    handle = consumer.handle

    async def wrapped(delivery: Delivery) -> None:
        ack = delivery.ack

        async def ack_then_maybe_die() -> None:
            killer.passed(point)
            await ack()

        delivery.ack = ack_then_maybe_die  # type: ignore[method-assign]
        await handle(delivery)

    consumer.handle = wrapped  # type: ignore[method-assign]


def kill_after_batch(consumer: Consumer, killer: Killer, point: str) -> None:
    handle_batch = consumer.handle_batch

    async def wrapped(deliveries: Sequence[Delivery]) -> None:
        await handle_batch(deliveries)
        # A batch applied whole left its deliveries for the transport to ack, once this
        # returns (one that fell back to one at a time settled each itself).
        if len(deliveries) > 1 and not any(d.settled for d in deliveries):
            killer.passed(point)

    consumer.handle_batch = wrapped  # type: ignore[method-assign]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("broker")
    parser.add_argument("channel")
    parser.add_argument("prefix")
    parser.add_argument("--kill-at", default=None)
    parser.add_argument("--kill-after", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args()
    killer = Killer(args.kill_at, args.kill_after)

    database = Database(args.db)
    kind = "sql" if args.broker == args.db else "rabbitmq"
    inner = make_transport(kind, args.db, args.channel)
    transport = FaultyTransport(inner)
    if args.kill_at == "relay_after_publish":
        transport.kill_after = args.kill_after
    await transport.connect()

    save = engine_module.Engine.save

    async def save_then_maybe_die(self: Any) -> None:
        await save(self)
        killer.passed("save_before_commit")

    engine_module.Engine.save = save_then_maybe_die  # type: ignore[method-assign]

    class KillingOrchestrator(Orchestrator):
        async def _fire(self, saga_id: str, moment: Any) -> int:
            fired = await super()._fire(saga_id, moment)
            if fired:
                killer.passed("timer_after_commit")
            return fired

    trip = app.make_trip(timeout=args.timeout, comp_timeout=args.timeout)
    relay = Relay(
        database,
        transport,
        poll_interval=0.05,
        backoff_base=0.02,
        backoff_cap=0.2,
        lease=1.0,
        max_attempts=1000,
    )
    orchestrator = KillingOrchestrator(
        database,
        transport,
        [trip],
        name=f"{args.prefix}-orch",
        timer_interval=0.05,
        batch_size=args.batch_size,
    )
    kill_before_ack(orchestrator.consumer, killer, "reply_after_commit")
    participants = app.participant_consumers(
        database, transport, args.prefix, batch_size=args.batch_size
    )
    for consumer in participants:
        kill_before_ack(consumer, killer, "participant_after_commit")
    for consumer in [orchestrator.consumer, *participants]:
        kill_after_batch(consumer, killer, "batch_after_commit")

    await serve(
        [relay, orchestrator, *participants],
        [orchestrator.consumer, *participants],
        transport,
        database,
    )


if __name__ == "__main__":
    asyncio.run(main())
