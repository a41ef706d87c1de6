"""Redis Streams transport (redis-py asyncio): one stream per channel, a consumer group
per Accord group, XAUTOCLAIM of entries left pending by a dead consumer.

Keys, for ``channel="accord"`` and a group ``g``:

* ``accord:accord`` - the stream every message is XADDed to (fields: the CloudEvents
  ``ce-*`` headers plus ``body``), read by one consumer group per Accord group;
* ``accord:accord:g:retry`` - the group's own retry stream: nacked and given-back
  entries are delivered from here (with ``accord-attempt``), so a redelivery reaches
  that group only;
* ``accord:accord:g:delayed`` - a sorted set of entries nacked with a delay, scored by
  due time; consumers move due ones into the retry stream (atomically, in Lua);
* ``accord:accord:dead`` - rejected entries with ``accord-dead-group`` and
  ``accord-dead-reason``.

Consumer groups are created at ``$`` on a group's first subscribe and are durable from
then on. Entries stay in the channel stream after every group acked them; pass
``maxlen`` to trim it (approximately) on each publish - entries a slow group has not
read yet are trimmed too, so size it generously. Not for Redis Cluster (the scripts
touch several keys).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

try:
    import redis.asyncio as aioredis
    import redis.exceptions
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.typing import EncodableT, FieldT
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    from accord.errors import MissingExtraError

    raise MissingExtraError("The Redis transport", "redis", "redis") from exc

from accord.errors import ConfigurationError, PublishError, TransportError, TransportUnavailable
from accord.messages import Message, encode
from accord.transports import _redis_scripts as scripts
from accord.transports._naming import safe_name
from accord.transports._redis_consume import (
    BLOCK_MS,
    GroupKeys,
    RedisSubscription,
    describe,
    text_of,
    translate_redis_error,
)
from accord.transports.base import (
    BatchHandler,
    Subscription,
    Transport,
    check_batching,
    check_counts,
    check_group,
    check_seconds,
)

__all__ = ["RedisTransport"]

log = logging.getLogger("accord.transports.redis")


class RedisTransport(Transport):
    """A :class:`~accord.transports.base.Transport` on Redis Streams.

    ``claim_idle``: seconds an entry may stay pending with a consumer before another
    consumer of the group takes it over with XAUTOCLAIM (the first consumer is presumed
    dead; a live consumer refreshes what it holds). ``maxlen``: approximate cap on the
    channel stream's length, or ``None`` to keep everything. ``publish_timeout`` bounds
    every command; ``connect_timeout`` the wait for an unreachable server. Dropped
    connections are re-established by redis-py (commands are retried with backoff).
    """

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        channel: str = "accord",
        claim_idle: float = 30.0,
        maxlen: int | None = None,
        publish_timeout: float = 10.0,
        connect_timeout: float = 5.0,
    ) -> None:
        if not channel:
            raise ConfigurationError("the Redis channel name must not be empty")
        check_seconds(
            "RedisTransport",
            claim_idle=claim_idle,
            publish_timeout=publish_timeout,
            connect_timeout=connect_timeout,
        )
        # maxlen 0 trimmed every entry as it was added: published, confirmed and lost.
        check_counts("RedisTransport", maxlen=maxlen)
        self.url = url
        self.channel = channel
        self.stream = f"accord:{channel}"
        self.dead_stream = f"accord:{channel}:dead"
        self.claim_idle = claim_idle
        self.maxlen = maxlen
        self.publish_timeout = publish_timeout
        self.connect_timeout = connect_timeout
        #: Name the transport's connections carry (CLIENT SETNAME), for operators.
        self.client_name = f"accord-{safe_name(channel)}"
        self._redis: aioredis.Redis | None = None
        self._subscriptions: list[RedisSubscription] = []
        self._lock = asyncio.Lock()

    def group_keys(self, group: str) -> GroupKeys:
        """The keys a consumer group uses (see the module doc)."""
        return GroupKeys(
            stream=self.stream,
            retry=f"accord:{self.channel}:{group}:retry",
            delayed=f"accord:{self.channel}:{group}:delayed",
            dead=self.dead_stream,
            patterns=f"accord:{self.channel}:{group}:patterns",
        )

    # -- connection ---------------------------------------------------------------

    async def connect(self) -> None:
        """Connect and check the server can do what the transport needs. Idempotent."""
        async with self._lock:
            if self._redis is not None:
                return
            client = self._new_client(retries=3)
            try:
                async with asyncio.timeout(self.connect_timeout * 4 + 1):
                    info = await client.info("server")
            except Exception as exc:
                with contextlib.suppress(Exception):
                    await client.aclose()
                raise TransportUnavailable(
                    f"cannot connect to Redis at {self.url}: {describe(exc)}; "
                    "is redis-server running?"
                ) from exc
            version = tuple(int(p) for p in str(info.get("redis_version", "0")).split(".")[:2])
            if version < (6, 2):
                await client.aclose()
                raise TransportError(
                    f"Redis {info.get('redis_version')} at {self.url} is too old: the Redis "
                    "transport needs XAUTOCLAIM (Redis 6.2 or later)"
                )
            self._redis = client

    def _new_client(self, *, retries: int, single: bool = False) -> aioredis.Redis:
        return aioredis.Redis.from_url(
            self.url,
            socket_connect_timeout=self.connect_timeout,
            socket_timeout=self.publish_timeout + BLOCK_MS / 1000,
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries=retries),
            retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
            client_name=self.client_name,
            health_check_interval=30,
            single_connection_client=single,
        )

    def _client(self) -> aioredis.Redis:
        if self._redis is None:
            raise TransportUnavailable("the Redis transport is not connected: call connect() first")
        return self._redis

    # -- publishing ---------------------------------------------------------------

    async def publish(self, messages: Sequence[Message]) -> None:
        """XADD the whole batch in one pipeline (one round trip) and check every reply;
        raise PublishError naming the entries Redis refused."""
        client = self._client()
        if not messages:
            return
        pipe = client.pipeline(transaction=False)
        for message in messages:
            headers, body = encode(message)
            fields: dict[FieldT, EncodableT] = {"body": body}
            fields.update(headers)
            if self.maxlen is None:
                pipe.xadd(self.stream, fields)
            else:
                pipe.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)
        try:
            async with asyncio.timeout(self.publish_timeout):
                replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            error = translate_redis_error(exc, "publishing")
            if isinstance(error, TransportUnavailable):
                raise error from exc
            raise PublishError({m.id: error for m in messages}) from exc
        failed: dict[str, BaseException] = {
            message.id: translate_redis_error(reply, "publishing")
            for message, reply in zip(messages, replies, strict=True)
            if isinstance(reply, BaseException) or not reply
        }
        if failed:
            raise PublishError(failed)

    # -- consuming ----------------------------------------------------------------

    async def declare(self, group: str, *, topics: Sequence[str] = ("#",)) -> None:
        """Create the group (at ``$`` on the channel stream: the messages added from now
        on) and record its topics, without reading."""
        await self._declare(self._client(), group, topics)

    async def _declare(
        self, client: aioredis.Redis, group: str, topics: Sequence[str]
    ) -> GroupKeys:
        check_group(group, topics)
        keys = self.group_keys(group)
        for key, start in ((keys.stream, "$"), (keys.retry, "0")):
            try:
                await client.xgroup_create(key, group, id=start, mkstream=True)
            except redis.exceptions.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise translate_redis_error(exc, f"creating group {group!r}") from exc
            except Exception as exc:
                raise translate_redis_error(exc, f"creating group {group!r}") from exc
        try:
            await client.sadd(keys.patterns, *topics)
            known = {text_of(p) for p in await client.smembers(keys.patterns)}
        except Exception as exc:
            raise translate_redis_error(exc, f"recording group {group!r}'s topics") from exc
        if known != set(topics):
            log.warning(
                "group %r on channel %r has members with other topics (%s; this one: %s): "
                "each member gets the messages of all of them, and a consumer without a "
                "handler for one dead-letters it as unknown_type",
                group,
                self.channel,
                ", ".join(sorted(known)),
                ", ".join(topics),
            )
        return keys

    async def subscribe_batches(
        self,
        group: str,
        handler: BatchHandler,
        *,
        topics: Sequence[str] = ("#",),
        prefetch: int = 64,
        max_batch: int = 64,
    ) -> Subscription:
        """Create the group (at ``$`` on the channel stream, durable from now on) and
        start reading as a new, uniquely named consumer of it: what each read returns is
        handed over in chunks of at most ``max_batch`` (and ``prefetch``)."""
        check_batching(prefetch, max_batch)
        client = self._client()
        keys = await self._declare(client, group, topics)
        if self._redis is not client:
            # close() ran while this subscribe awaited (redis-py would reconnect the
            # closed client for it): nothing may consume after close().
            raise TransportUnavailable("the Redis transport was closed while subscribing")
        subscription = RedisSubscription(
            client,
            # The blocking read gets its own connection; errors surface to the read loop,
            # which retries (and learns the new connection's id for CLIENT UNBLOCK).
            self._new_client(retries=0, single=True),
            {name: client.register_script(getattr(scripts, name)) for name in scripts.__all__},
            keys,
            handler,
            group=group,
            topics=tuple(topics),
            prefetch=max(1, prefetch),
            max_batch=max(1, min(max_batch, prefetch)),
            claim_idle=self.claim_idle,
            stop_timeout=self.publish_timeout + BLOCK_MS / 1000,
        )
        self._subscriptions.append(subscription)
        return subscription

    async def close(self) -> None:
        """Stop every subscription (giving what it held back to its group), then close
        the connections. Idempotent."""
        async with self._lock:
            subscriptions, self._subscriptions = self._subscriptions, []
            for subscription in subscriptions:
                with contextlib.suppress(Exception):
                    await subscription.stop()
            client, self._redis = self._redis, None
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()

    # -- administration -----------------------------------------------------------

    async def delete_channel(self) -> int:
        """Delete every key of this channel (streams, groups, delayed sets, dead letters);
        return how many were deleted. For tests and teardown."""
        client = self._client()
        try:
            pattern = f"{_escape(self.stream)}:*"
            keys = [self.stream, *[key async for key in client.scan_iter(match=pattern)]]
            return int(await client.delete(*keys))
        except Exception as exc:
            raise translate_redis_error(exc, "deleting the channel's keys") from exc


def _escape(pattern: str) -> str:
    for char in "\\*?[]":
        pattern = pattern.replace(char, "\\" + char)
    return pattern
