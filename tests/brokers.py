"""Removing what tests declared on the shared brokers (exchanges, queues, streams, keys);
changing a broker setting for the length of a test; a transport slow to subscribe;
taking the PostgreSQL server away (restarted, or stopped for a while), always bringing
it back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import time
from collections.abc import AsyncIterator, Sequence

import aio_pika

from accord.testing.faults import FaultyTransport
from accord.transports.base import BatchHandler, Subscription, Transport
from accord.transports.nats import NatsTransport
from accord.transports.rabbitmq import RabbitTopology, RabbitTransport
from accord.transports.redis import RedisTransport
from tests.conftest import PG_ADMIN_DSN, RABBIT_URL


async def delete_everything(channels: dict[str, set[str]]) -> None:
    """Delete the exchanges and queues RabbitTransports on these channels declared."""
    connection = await aio_pika.connect(RABBIT_URL)
    try:
        for channel_name, groups in channels.items():
            topology = RabbitTopology(channel_name)
            for group in groups:
                for queue in topology.queues(group):
                    channel = await connection.channel()
                    await channel.queue_delete(queue)
                    await channel.close()
            for exchange in (topology.exchange, topology.dead_exchange):
                channel = await connection.channel()
                await channel.exchange_delete(exchange)
                await channel.close()
    finally:
        await connection.close()


async def cleanup(transports: list[Transport]) -> None:
    """Close these transports and delete what they declared on their broker."""
    rabbit: dict[str, set[str]] = {}
    for transport in transports:
        if isinstance(transport, RabbitTransport):
            rabbit.setdefault(transport.channel, set()).update(transport.groups)
        elif isinstance(transport, NatsTransport):
            await transport.delete_stream()
        elif isinstance(transport, RedisTransport):
            await transport.delete_channel()
        await transport.close()
    if rabbit:
        await delete_everything(rabbit)


async def _rabbit_eval(expression: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-q", "eval", expression,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode == 0, f"rabbitmqctl eval {expression!r} failed: {err.decode()}"
    return out.decode().strip()


@contextlib.asynccontextmanager
async def rabbit_max_message_size(size: int) -> AsyncIterator[None]:
    """RabbitMQ's ``max_message_size`` is ``size`` for the channels opened inside the
    block (each channel reads it when it opens); the setting is restored after."""
    found = re.fullmatch(
        r"\{ok,(\d+)\}", await _rabbit_eval("application:get_env(rabbit, max_message_size).")
    )
    assert found, "could not read RabbitMQ's max_message_size"
    await _rabbit_eval(f"application:set_env(rabbit, max_message_size, {size}).")
    try:
        yield
    finally:
        await _rabbit_eval(f"application:set_env(rabbit, max_message_size, {found.group(1)}).")


class SlowToSubscribe(FaultyTransport):
    """A real transport whose subscribes take ``delay`` seconds longer (its declares
    do not): a consumer starting beside a relay is then surely the later of the two."""

    def __init__(self, inner: Transport, delay: float = 0.5) -> None:
        super().__init__(inner)
        self.delay = delay

    async def subscribe_batches(
        self,
        group: str,
        handler: BatchHandler,
        *,
        topics: Sequence[str] = ("#",),
        prefetch: int = 64,
        max_batch: int = 64,
    ) -> Subscription:
        await asyncio.sleep(self.delay)
        return await super().subscribe_batches(
            group, handler, topics=topics, prefetch=prefetch, max_batch=max_batch
        )


def _pg_ctlcluster(action: str) -> int:
    """``pg_ctlcluster VERSION main ACTION`` (the commands of DESIGN.md), blocking; its
    exit code (``status``: 0 running, 3 down)."""
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    done = subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if action != "status":
        assert done.returncode == 0, f"pg_ctlcluster {action} failed: {done.stderr}"
    return done.returncode


def postgres_accepts_connections(timeout: float = 60) -> None:
    """Start the PostgreSQL server if it is down; return once it runs a query.

    Blocking on purpose: it runs in ``finally:`` blocks, where a test that timed out or
    whose coroutine is being closed can no longer await anything."""
    if _pg_ctlcluster("status") == 3:
        _pg_ctlcluster("start")
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run(
            ["psql", PG_ADMIN_DSN, "-Atc", "SELECT 1"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        if done.returncode == 0 and done.stdout.strip() == "1":
            return
        assert time.monotonic() < deadline, f"PostgreSQL does not answer: {done.stderr}"
        time.sleep(0.2)


async def restart_postgres() -> None:
    """Restart the PostgreSQL server (fast shutdown: every session is cut off, open
    transactions roll back); return once it accepts connections again, also if the
    restart failed."""
    try:
        await asyncio.to_thread(_pg_ctlcluster, "restart")
    finally:
        postgres_accepts_connections()


@contextlib.asynccontextmanager
async def postgres_stopped() -> AsyncIterator[None]:
    """The PostgreSQL server is down for the length of the block (stopped with a fast
    shutdown: every session cut off); started again after it, whatever happened in
    it, and left once it accepts connections."""
    try:
        await asyncio.to_thread(_pg_ctlcluster, "stop")
        yield
    finally:
        postgres_accepts_connections()
