"""Removing what tests declared on the shared brokers (exchanges, queues, streams, keys);
changing a broker setting for the length of a test; a transport slow to subscribe."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Sequence

import aio_pika

from accord.testing.faults import FaultyTransport
from accord.transports.base import BatchHandler, Subscription, Transport
from accord.transports.nats import NatsTransport
from accord.transports.rabbitmq import RabbitTopology, RabbitTransport
from accord.transports.redis import RedisTransport
from tests.conftest import RABBIT_URL


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
