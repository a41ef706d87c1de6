"""Redis fixtures the transport tests share."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from tests.conftest import REDIS_URL

from accord.transports.redis import RedisTransport


async def delete_redis_channel(channel: str) -> None:
    """Delete a Redis channel's streams and keys."""
    transport = RedisTransport(REDIS_URL, channel=channel)
    await transport.connect()
    try:
        await transport.delete_channel()
    finally:
        await transport.close()


@pytest.fixture
async def redis_transport() -> AsyncIterator[RedisTransport]:
    """A connected Redis transport on a channel of its own (deleted after)."""
    transport = RedisTransport(REDIS_URL, channel=f"redis-{uuid.uuid4().hex[:12]}", claim_idle=1.0)
    await transport.connect()
    yield transport
    await transport.close()
    await delete_redis_channel(transport.channel)


@pytest.fixture
async def admin() -> AsyncIterator[aioredis.Redis]:
    """A plain redis-py client, to look at or meddle with what the transport wrote."""
    client = aioredis.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()
