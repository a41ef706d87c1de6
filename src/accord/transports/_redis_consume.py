"""The consuming side of the Redis transport: the read loop, deliveries, errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.commands.core import AsyncScript
from redis.typing import StreamIdT

from accord._aio import wait_event
from accord.errors import TransportError, TransportUnavailable
from accord.transports.base import (
    DEFAULT_REDELIVERY_DELAY,
    BatchHandler,
    Delivery,
    Subscription,
    topic_matches,
)

__all__ = ["GroupKeys", "RedisSubscription", "describe", "translate_redis_error"]

log = logging.getLogger("accord.transports.redis")

#: Longest XREADGROUP blocks before the loop looks at delayed and abandoned entries (ms).
BLOCK_MS = 1000
# How long a member trusts its copy of its group's topic patterns.
_PATTERNS_FRESH = 1.0
_BOOKKEEPING = (b"body", b"accord-attempt", b"accord-origin")


@dataclass(frozen=True)
class GroupKeys:
    """The Redis keys one consumer group reads and writes."""

    stream: str
    retry: str
    delayed: str
    dead: str
    #: A set: the topic patterns of every subscribe to the group so far (their union).
    patterns: str


def translate_redis_error(exc: BaseException, doing: str) -> TransportError:
    """The Accord error for a redis-py exception raised while ``doing`` something."""
    if isinstance(exc, TransportError):
        return exc
    if isinstance(
        exc,
        redis.exceptions.ConnectionError
        | redis.exceptions.TimeoutError
        | redis.exceptions.BusyLoadingError
        | asyncio.TimeoutError
        | OSError,
    ):
        error: TransportError = TransportUnavailable(
            f"Redis unavailable while {doing}: {describe(exc)}"
        )
    else:
        error = TransportError(f"Redis error while {doing}: {describe(exc)}")
    error.__cause__ = exc
    return error


def describe(exc: BaseException) -> str:
    """``Type: message`` (redis-py 8's repr says only ``server:ResponseError``)."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def text_of(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


class _RedisDelivery(Delivery):
    def __init__(
        self,
        subscription: RedisSubscription,
        key: str,
        entry_id: bytes,
        fields: Mapping[bytes, bytes],
        delivery_count: int,
    ) -> None:
        headers = {text_of(k): text_of(v) for k, v in fields.items() if k not in _BOOKKEEPING}
        try:  # written by Accord; a foreign entry's may be anything
            base = max(1, int(fields.get(b"accord-attempt", b"1") or 1))
        except ValueError:
            base = 1
        super().__init__(headers, fields.get(b"body", b""), base + max(delivery_count, 1) - 1)
        self._subscription = subscription
        self.key = key
        self.entry_id = entry_id
        self.origin = fields.get(b"accord-origin", entry_id)
        self._from_retry = "1" if key == subscription.keys.retry else "0"

    def _fields(self) -> list[bytes | str]:
        flat: list[bytes | str] = []
        for name, value in self.headers.items():
            flat += [name, value]
        return [*flat, "body", self.body]

    async def _run(self, name: str, keys: list[str], args: list[Any]) -> None:
        sub = self._subscription
        # Shielded: a handler cancelled by stop() must not cut a settle command in half.
        call = asyncio.ensure_future(
            sub.scripts[name](keys=keys, args=[sub.group, self.entry_id, *args])
        )
        sub.settling.add(call)
        call.add_done_callback(sub.settling.discard)
        try:
            await asyncio.shield(call)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise translate_redis_error(exc, f"settling a delivery ({name.lower()})") from exc

    async def _ack(self) -> None:
        await self._run("ACK", [self.key], [self._from_retry])

    async def _nack(self, delay: float) -> None:
        keys = self._subscription.keys
        fields = [
            *self._fields(),
            "accord-attempt",
            str(self.attempt + 1),
            "accord-origin",
            self.origin,
        ]
        args = [self._from_retry, int(delay * 1000), *fields]
        await self._run("NACK", [self.key, keys.retry, keys.delayed], args)

    async def _reject(self, reason: str) -> None:
        sub = self._subscription
        fields = [
            *self._fields(),
            "accord-dead-group",
            sub.group,
            "accord-dead-reason",
            reason,
            "accord-dead-attempt",
            str(self.attempt),
            "accord-origin",
            self.origin,
        ]
        await self._run("REJECT", [self.key, sub.keys.dead], [self._from_retry, *fields])


class RedisSubscription(Subscription):
    """One consumer of a group: moves due delayed entries, takes over abandoned ones
    (XAUTOCLAIM), reads new ones (XREADGROUP) and hands them to the handler in chunks of
    at most ``max_batch``, one call at a time; what it leaves unsettled is acked with the
    rest of the read in one round trip.

    redis-py (8.x) can swallow a task cancellation that lands inside a command and leave
    the connection half-read, so no Redis call here is ever cancelled: stop() signals
    the loop, wakes its blocked read with CLIENT UNBLOCK, and cancels only the handler.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        reader: aioredis.Redis,
        scripts: Mapping[str, AsyncScript],
        keys: GroupKeys,
        handler: BatchHandler,
        *,
        group: str,
        topics: tuple[str, ...],
        prefetch: int,
        max_batch: int,
        claim_idle: float,
        stop_timeout: float,
    ) -> None:
        self.client = client
        self.scripts = scripts
        self.keys = keys
        self.group = group
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._reader = reader  # one connection of its own for the blocking read
        self._reader_id: int | None = None
        self._handler = handler
        self._topics = topics
        # The group's patterns (every member's), read again when an entry matches none
        # of this member's and the copy is older than _PATTERNS_FRESH seconds.
        self._group_topics = topics
        self._group_topics_at = 0.0
        self._prefetch = prefetch
        self._max_batch = max_batch
        self._claim_idle_ms = max(1, int(claim_idle * 1000))
        self._claim_cursors: dict[str, str] = {}  # per stream key: where XAUTOCLAIM goes on
        self._claim_every = max(0.05, min(claim_idle / 2, 5.0))
        self._stop_timeout = stop_timeout
        self._held: list[_RedisDelivery] = []
        self._acks: list[_RedisDelivery] = []
        self._handling: asyncio.Task[None] | None = None
        self.settling: set[asyncio.Future[Any]] = set()
        self._stopping = asyncio.Event()
        self._stopped = False
        self._task = asyncio.create_task(self._run(), name=f"accord-redis-{group}")
        self._keeper = asyncio.create_task(self._keep_alive(), name=f"accord-redis-keep-{group}")

    def _wanted(self, delivery: _RedisDelivery, topics: tuple[str, ...]) -> bool:
        message_type = delivery.headers.get("ce-type")
        if message_type is None or "#" in topics:
            return True  # bytes that are not a CloudEvent go to the handler to dead-letter
        return any(topic_matches(topic, message_type) for topic in topics)

    async def _sort(self, batch: list[_RedisDelivery]) -> list[_RedisDelivery]:
        """The entries of ``batch`` for this group; the others are acked. An entry none of
        this member's topics match may match another member's (a rolling deploy that
        adds a topic): it is the group's, and this member takes it, as RabbitMQ and the
        SQL transport deliver what any member's topics match to every member."""
        wanted: list[_RedisDelivery] = []
        for delivery in batch:
            if not self._wanted(delivery, self._topics):
                if time.monotonic() - self._group_topics_at > _PATTERNS_FRESH:
                    members = await self.client.smembers(self.keys.patterns)
                    self._group_topics = tuple(sorted({*self._topics, *map(text_of, members)}))
                    self._group_topics_at = time.monotonic()
                if not self._wanted(delivery, self._group_topics):
                    self._ack_later(delivery)
                    continue
            wanted.append(delivery)
        return wanted

    async def _pause(self, seconds: float) -> None:
        await wait_event(self._stopping, seconds)

    async def _run(self) -> None:
        backoff = 0.05
        last_claim = 0.0
        while not self._stopping.is_set():
            try:
                wait_ms = int(await self.scripts["PROMOTE"](
                    keys=[self.keys.delayed, self.keys.retry], args=[self._prefetch]
                ))  # fmt: skip
                batch: list[_RedisDelivery] = []
                if time.monotonic() - last_claim >= self._claim_every:
                    last_claim = time.monotonic()
                    batch = await self._claim()
                if not batch:
                    if self._reader_id is None:
                        self._reader_id = int(await self._reader.client_id())
                    block = BLOCK_MS if wait_ms < 0 else max(1, min(wait_ms, BLOCK_MS))
                    block = min(block, max(1, int(self._claim_every * 1000)))
                    if self._stopping.is_set():
                        break
                    batch = self._parse(
                        await self._reader.xreadgroup(
                            self.group,
                            self.consumer,
                            {self.keys.stream: ">", self.keys.retry: ">"},
                            count=self._prefetch,
                            block=block,
                        )
                    )
            except Exception as exc:
                self._reader_id = None
                if self._stopping.is_set():
                    break
                log.warning("reading for group %r failed (%s); retrying", self.group, describe(exc))
                await self._pause(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.05
            self._held = batch
            try:
                wanted = await self._sort(batch)
            except Exception as exc:
                # Held, unacked: they come back to the group (XAUTOCLAIM) after claim_idle.
                log.warning("reading group %r's topics failed (%s)", self.group, describe(exc))
                self._held = []
                continue
            for start in range(0, len(wanted), self._max_batch):
                if self._stopping.is_set():
                    break  # the rest is given back by stop()
                chunk = wanted[start : start + self._max_batch]
                self._handling = asyncio.create_task(self._dispatch(chunk))
                await asyncio.wait({self._handling})
                self._handling = None
            await self._flush_acks()
            self._held = []
        await self._flush_acks()

    async def _flush_acks(self) -> None:
        acks, self._acks = self._acks, []
        if not acks:
            return
        pipe = self.client.pipeline(transaction=False)
        for key in (self.keys.stream, self.keys.retry):
            ids: list[StreamIdT] = [d.entry_id for d in acks if d.key == key]
            if ids:
                pipe.xack(key, self.group, *ids)
                if key == self.keys.retry:
                    pipe.xdel(key, *ids)
        try:
            await pipe.execute()
        except Exception as exc:
            # Still pending: given back on stop or claimed later, so delivered again.
            log.warning("acking %d deliveries of group %r failed: %s", len(acks), self.group,
                        describe(exc))  # fmt: skip

    def _parse(self, response: Any) -> list[_RedisDelivery]:
        items = response.items() if isinstance(response, dict) else (response or [])
        batch = []
        for key, entries in items:
            for entry_id, fields in entries:
                batch.append(_RedisDelivery(self, text_of(key), _as_bytes(entry_id), fields, 1))
        return batch

    async def _claim(self) -> list[_RedisDelivery]:
        batch = []
        for key in (self.keys.stream, self.keys.retry):
            # From where the last scan stopped: entries live consumers hold at the head
            # of a long pending list would otherwise hide a dead one's behind them.
            cursor = self._claim_cursors.get(key, "0-0")
            args: list[str | int] = [
                self.group,
                self.consumer,
                self._claim_idle_ms,
                self._prefetch,
                cursor,
            ]
            next_cursor, claimed = await self.scripts["CLAIM"](keys=[key], args=args)
            self._claim_cursors[key] = text_of(next_cursor)
            for entry_id, flat, count in claimed:
                fields = dict(zip(flat[::2], flat[1::2], strict=True))
                batch.append(_RedisDelivery(self, key, _as_bytes(entry_id), fields, int(count)))
        if batch:
            log.info("group %r took over %d abandoned entries", self.group, len(batch))
        return batch

    async def _dispatch(self, batch: Sequence[_RedisDelivery]) -> None:
        try:
            await self._handler(batch)
        except asyncio.CancelledError:
            raise  # stop() gives the entries back
        except Exception:
            log.exception("handler of group %r failed; redelivering", self.group)
            failure: TransportError | None = None
            for delivery in batch:
                try:
                    await delivery.nack(DEFAULT_REDELIVERY_DELAY)
                except TransportError as exc:
                    failure = exc
            if failure is not None:
                # Settling failed: the entries stay pending and are given back or claimed.
                log.warning("nacking deliveries of group %r failed: %s", self.group, failure)
        else:
            for delivery in batch:
                self._ack_later(delivery)

    def _ack_later(self, delivery: _RedisDelivery) -> None:
        if not delivery.settled:
            # Acked together with the rest of the read (one round trip).
            delivery.settled = True
            self._acks.append(delivery)

    async def _keep_alive(self) -> None:
        # Entries held longer than claim_idle (slow handler, large batch) would be taken
        # over by another consumer; re-claiming them to ourselves resets their idle time.
        while not self._stopping.is_set():
            await self._pause(self._claim_idle_ms / 3000)
            # Acks not flushed yet are still pending in Redis: keep those alive too.
            pending = [d for d in self._held if not d.settled] + self._acks
            for key in (self.keys.stream, self.keys.retry):
                ids: list[StreamIdT] = [d.entry_id for d in pending if d.key == key]
                if ids and not self._stopping.is_set():
                    with contextlib.suppress(Exception):
                        await self.scripts["KEEP"](
                            keys=[key], args=[self.group, self.consumer, *ids]
                        )

    async def stop(self) -> None:
        """Stop reading; give every entry this consumer holds back to the group at once
        (attempt raised), then remove the consumer. A running handler is cancelled."""
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        if self._handling is not None:
            self._handling.cancel()
        if self._reader_id is not None:
            with contextlib.suppress(Exception):
                await self.client.client_unblock(self._reader_id)
        await asyncio.wait({self._task, self._keeper}, timeout=self._stop_timeout)
        if self.settling:
            await asyncio.wait(self.settling, timeout=self._stop_timeout)
        self._held = []
        for key, delete in ((self.keys.stream, "0"), (self.keys.retry, "1")):
            try:
                await self.scripts["GIVE_BACK"](
                    keys=[key, self.keys.retry], args=[self.group, self.consumer, delete]
                )
            except Exception as exc:
                log.warning(
                    "could not give back entries of group %r (%s); they return after claim_idle",
                    self.group,
                    describe(exc),
                )
        with contextlib.suppress(Exception):
            await self._reader.aclose()
