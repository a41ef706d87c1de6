"""Removing what tests declared on the shared brokers (exchanges, queues, streams, keys)."""

from __future__ import annotations

import aio_pika

from accord.transports.base import Transport
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
