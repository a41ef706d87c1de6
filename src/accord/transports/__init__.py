"""Transports: one module per broker behind the port in :mod:`accord.transports.base`.

:func:`from_url` picks the module by URL scheme and imports its driver only then,
so a missing optional driver fails with an error naming the extra to install.
"""

from __future__ import annotations

from typing import Any

from accord.errors import ConfigurationError
from accord.transports.base import (
    Delivery,
    GroupDeclaration,
    Handler,
    Subscription,
    Transport,
    topic_matches,
)

__all__ = [
    "Delivery",
    "GroupDeclaration",
    "Handler",
    "Subscription",
    "Transport",
    "from_url",
    "topic_matches",
]


def from_url(url: str, *, channel: str = "accord", **options: Any) -> Transport:
    """A transport for a broker URL.

    ``amqp://`` RabbitMQ, ``nats://`` NATS JetStream, ``redis://`` Redis Streams,
    a database URL (``sqlite…``, ``postgresql…``) the broker-less SQL transport,
    ``memory://`` the in-process one. ``channel`` names the exchange / stream /
    queue table channel that publishers and consumers share.
    """
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("amqp", "amqps"):
        from accord.transports.rabbitmq import RabbitTransport

        return RabbitTransport(url, channel=channel, **options)
    if scheme in ("nats", "tls"):
        from accord.transports.nats import NatsTransport

        return NatsTransport(url, channel=channel, **options)
    if scheme in ("redis", "rediss"):
        from accord.transports.redis import RedisTransport

        return RedisTransport(url, channel=channel, **options)
    if scheme.startswith(("sqlite", "postgresql", "postgres")):
        from accord.transports.sql import SqlTransport

        return SqlTransport(url, channel=channel, **options)
    if scheme == "memory":
        from accord.transports.memory import MemoryTransport

        return MemoryTransport()
    raise ConfigurationError(
        f"unknown broker URL {url!r}: use amqp://, nats://, redis://, "
        "a database URL (sqlite+aiosqlite:///file.db, postgresql+asyncpg://...) or memory://"
    )
