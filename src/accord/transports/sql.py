"""The broker-less SQL transport: a queue table in a SQLite or PostgreSQL database.

The zero-setup default on a SQLite file (no broker to run) and a real option on
PostgreSQL, where publishers ``NOTIFY`` and consumers wake at once. Tables:
``accord_queue`` (one row per message), ``accord_queue_groups`` (the durable
consumer groups and their topic patterns) and ``accord_queue_deliveries`` (one
row per group and message, created when the message is published).

What it promises, beyond :class:`~accord.transports.base.Transport`:

* :meth:`SqlTransport.publish` writes a batch in one transaction and returns
  after the commit (that is the confirm): all of the batch or none of it.
  A message id still stored on the channel is not stored twice.
* A group gets the messages published after its first subscribe whose type
  matches its patterns (the union of every subscribe's ``topics``).
* Members of a group compete: each delivery is leased to one of them
  (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite has a single writer).
  A delivery is handed out in publish order, and never while an earlier
  delivery with the same ``key`` in the group is out (leased or waiting out a
  nack delay): per-key order holds with any number of competing consumers.
* :meth:`SqlTransport.subscribe_batches` hands each call up to ``max_batch`` of
  the deliveries a claim leased (a claim leases up to ``prefetch``). Once a
  delivery is nacked, the later ones with its key that the consumer still holds
  go back to the group, so no later call gets them before it; inside one call,
  not handling a delivery after a nacked one of its key is the handler's job.
* A lease (``lease`` seconds, extended while the consumer lives) ends when the
  consumer settles the delivery; a consumer that dies without settling has its
  deliveries offered again once the lease runs out. ``attempt`` counts every
  claim, including those of consumers that died.
* Acks are committed in the background, several per transaction, before the
  consumer's next claim and before ``stop()`` returns; a consumer that dies in
  between gets those deliveries again (at-least-once; the inbox deduplicates).
* ``Subscription.stop()`` and :meth:`SqlTransport.close` cancel a handler in
  progress and give every unsettled delivery back to its group at once.
* Message rows whose deliveries are all settled are deleted in batches,
  periodically (:meth:`SqlTransport.cleanup`).
* On PostgreSQL a lost ``LISTEN`` connection is not re-established: consumers
  then fall back to polling every ``poll_interval``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from accord.db import Database
from accord.errors import (
    ConfigurationError,
    DecodeError,
    PublishError,
    TransportError,
    TransportUnavailable,
)
from accord.messages import Message, decode, encode
from accord.transports._sql import _queries as q
from accord.transports._sql._errors import transaction, translate
from accord.transports._sql._subscription import SqlDelivery, SqlSubscription
from accord.transports.base import (
    BatchHandler,
    Envelope,
    Subscription,
    Transport,
    check_batching,
    check_counts,
    check_group,
    check_seconds,
    topic_matches,
)

__all__ = ["MAX_PREFETCH", "SqlDelivery", "SqlSubscription", "SqlTransport"]

#: The most deliveries one claim of a subscription may lease.
MAX_PREFETCH = 10_000

log = logging.getLogger("accord.transports.sql")

# (message id, type, key, headers, body)
_Item = tuple[str, str, str | None, dict[str, str], bytes]


class SqlTransport(Transport):
    """A transport whose broker is a table in a SQL database.

    Give either ``url`` (a database URL: the transport makes its own
    :class:`~accord.db.Database` and creates the tables on :meth:`connect`) or
    ``database`` (share one you have; its tables must be upgraded already).
    ``channel`` separates independent sets of publishers and consumers in one
    database. ``poll_interval`` is how often an idle consumer looks for work
    when no wake-up arrives (always on SQLite across processes; on PostgreSQL
    only when a ``NOTIFY`` is lost). ``lease`` is how long a claimed delivery
    stays with a consumer that stopped extending it (it died).
    ``cleanup_interval`` and ``cleanup_batch`` pace the deletion of message
    rows no group needs any more.
    """

    name = "sql"

    def __init__(
        self,
        url: str | None = None,
        *,
        channel: str = "accord",
        database: Database | None = None,
        poll_interval: float = 0.5,
        lease: float = 30.0,
        cleanup_interval: float = 30.0,
        cleanup_batch: int = 1000,
    ) -> None:
        if (url is None) == (database is None):
            raise ConfigurationError(
                "SqlTransport needs exactly one of url= (a database URL such as "
                "sqlite+aiosqlite:///accord.db) or database= (an accord.db.Database)"
            )
        check_seconds(
            "SqlTransport",
            poll_interval=poll_interval,
            lease=lease,
            cleanup_interval=cleanup_interval,
        )
        check_counts("SqlTransport", cleanup_batch=cleanup_batch)
        if not channel:
            raise ConfigurationError("SqlTransport: channel must be a non-empty name")
        self.channel = channel
        self.poll_interval = poll_interval
        self.lease = lease
        self.cleanup_interval = cleanup_interval
        self.cleanup_batch = cleanup_batch
        self._owns_database = database is None
        self._url = url
        self._db: Database | None = database
        self._connected = False
        self._closed = False
        self._subscriptions: list[SqlSubscription] = []
        self._unlisten: Callable[[], Any] | None = None
        self._listen_lock = asyncio.Lock()
        self._cleaner: asyncio.Task[None] | None = None

    @property
    def database(self) -> Database:
        """The database the queue lives in."""
        if self._db is None:
            assert self._url is not None
            with translate("opening the database"):
                self._db = Database(self._url)
        return self._db

    async def connect(self) -> None:
        """Check the database is reachable; when the transport made its own
        database, create or migrate the tables. Idempotent."""
        if self._connected:
            return
        db = self.database
        with translate("connecting"):
            if self._owns_database:
                await db.upgrade()
            else:
                async with db.connect() as conn:
                    await conn.exec_driver_sql("SELECT 1")
        self._connected = True
        self._closed = False

    async def _ensure_open(self) -> Database:
        if self._closed:
            raise TransportUnavailable(
                "the SQL transport is closed; create a new one or call connect() again"
            )
        if not self._connected:
            await self.connect()
        return self.database

    # -- publishing -----------------------------------------------------------------

    async def publish(self, messages: Sequence[Message]) -> None:
        """Store the batch in one transaction with a delivery for every matching group;
        return after the commit. On failure nothing of the batch was stored:
        :class:`TransportUnavailable` if the database cannot be reached, otherwise
        :class:`PublishError` naming every message."""
        items: list[_Item] = []
        for message in messages:
            headers, body = encode(message)
            items.append((message.id, message.type, message.key, headers, body))
        await self._publish(items)

    async def publish_envelopes(self, envelopes: Sequence[Envelope]) -> None:
        """Store already-encoded messages as they are (no decode and re-encode).

        Their headers are checked first: an envelope that is not a CloudEvent is
        not stored and is named in :class:`PublishError` (the rest of the batch is
        stored). The body is stored unchecked; a consumer that cannot decode it
        gets the delivery with ``decode_error`` set.
        """
        items: list[_Item] = []
        failed: dict[str, BaseException] = {}
        for envelope in envelopes:
            try:
                decode(envelope.headers, b"")  # the attributes only: the body is not parsed
            except DecodeError as exc:
                failed[envelope.id] = exc
                continue
            items.append(
                (envelope.id, envelope.type, envelope.key, dict(envelope.headers), envelope.body)
            )
        if items:
            try:
                await self._publish(items)
            except PublishError as exc:
                failed.update(exc.failed)
        if failed:
            raise PublishError(failed)

    async def publish_raw(self, headers: Mapping[str, str], body: bytes) -> None:
        """Put arbitrary bytes on the channel, bypassing encoding (for tests of bad
        input and for tools). The routing type is the ``ce-type`` header, if any."""
        lowered = {k.lower(): v for k, v in headers.items()}
        message_id = lowered.get("ce-id") or str(uuid.uuid4())
        items: list[_Item] = [
            (
                message_id,
                lowered.get("ce-type", ""),
                lowered.get("ce-partitionkey"),
                dict(headers),
                body,
            )
        ]
        await self._publish(items)

    async def _publish(self, items: Sequence[_Item]) -> None:
        db = await self._ensure_open()
        if not items:
            return
        await db.clock.sync_if_due()
        now = db.clock.now()
        try:
            async with transaction(db, "publishing") as conn:
                groups = await q.load_groups(conn, self.channel)
                targets = {
                    item[0]: [
                        g for g, pats in groups if any(topic_matches(p, item[1]) for p in pats)
                    ]
                    for item in items
                }
                rows = [
                    {
                        "channel": self.channel,
                        "message_id": message_id,
                        "type": type_,
                        "key": key,
                        "headers": headers,
                        "body": body,
                        "created_at": now,
                    }
                    for message_id, type_, key, headers, body in items
                    if targets[message_id]  # a message no group wants is not stored
                ]
                seqs = await q.insert_messages(conn, rows, is_postgres=db.is_postgres)
                deliveries = []
                for message_id, _type, key, _headers, _body in items:
                    seq = seqs.pop(message_id, None)  # pop: a repeated id gets one set
                    if seq is None:
                        continue
                    for group in targets[message_id]:
                        deliveries.append(
                            {
                                "seq": seq,
                                "group_name": group,
                                "channel": self.channel,
                                "key": key,
                                "attempts": 0,
                                "available_at": now,
                            }
                        )
                await q.insert_deliveries(conn, deliveries)
                if deliveries and db.is_postgres:
                    await q.notify(conn, self.channel)
        except TransportError as exc:
            if isinstance(exc, TransportUnavailable):
                raise
            raise PublishError({item[0]: exc for item in items}) from exc
        for subscription in self._subscriptions:
            subscription.wake()

    # -- consuming ------------------------------------------------------------------

    async def declare(self, group: str, *, topics: Sequence[str] = ("#",)) -> None:
        """Register ``group`` durably, widening its patterns with ``topics``: every
        message published from then on gets a delivery for it."""
        await self._declare(group, topics)

    async def _declare(self, group: str, topics: Sequence[str]) -> Database:
        check_group(group, topics)
        db = await self._ensure_open()
        async with transaction(db, f"registering group {group!r}") as conn:
            await q.register_group(
                conn,
                self.channel,
                group,
                list(topics),
                datetime.now(UTC),
                is_postgres=db.is_postgres,
            )
        return db

    async def subscribe_batches(
        self,
        group: str,
        handler: BatchHandler,
        *,
        topics: Sequence[str] = ("#",),
        prefetch: int = 64,
        max_batch: int = 64,
    ) -> Subscription:
        """Register ``group`` durably (widening its patterns with ``topics``) and start
        a consumer of it. ``prefetch`` is how many deliveries one claim leases; each
        handler call gets up to ``max_batch`` of those already claimed."""
        check_batching(prefetch, max_batch)
        if prefetch > MAX_PREFETCH:
            # A claim's statements carry one parameter per delivery (asyncpg takes
            # 32,767 at most); past a few thousand a larger claim gains nothing.
            raise ConfigurationError(
                f"subscribe: prefetch must be at most {MAX_PREFETCH}, not {prefetch}"
            )
        prefetch = max(1, prefetch)
        db = await self._declare(group, topics)
        if db.is_postgres and self._unlisten is None:
            # Concurrent first subscribes must not each open a listener (one would leak).
            async with self._listen_lock:
                if self._unlisten is None:
                    with translate("listening for new messages"):
                        self._unlisten = await db.listen(q.NOTIFY_CHANNEL, self._on_notify)
        if self._closed:
            # close() ran while this subscribe awaited: nothing may consume after it.
            if self._unlisten is not None:
                await self._unlisten()
                self._unlisten = None
            raise TransportUnavailable("the SQL transport was closed while subscribing")
        subscription = SqlSubscription(
            database=db,
            channel=self.channel,
            group=group,
            handler=handler,
            prefetch=prefetch,
            max_batch=max_batch,
            poll_interval=self.poll_interval,
            lease=self.lease,
            on_settle=self._wake_group,
            on_stop=self._forget,
        )
        self._subscriptions.append(subscription)
        if self._cleaner is None or self._cleaner.done():
            self._cleaner = asyncio.create_task(self._clean_periodically())
        return subscription

    def _on_notify(self, payload: str) -> None:
        if payload == self.channel:
            for subscription in self._subscriptions:
                subscription.wake()

    def _wake_group(self, settled_by: SqlSubscription) -> None:
        # A settled delivery may unblock a later one with the same key for the
        # other members of the group in this process.
        for subscription in self._subscriptions:
            if subscription is not settled_by and subscription.group == settled_by.group:
                subscription.wake()

    def _forget(self, subscription: SqlSubscription) -> None:
        with contextlib.suppress(ValueError):
            self._subscriptions.remove(subscription)

    # -- housekeeping ---------------------------------------------------------------

    async def cleanup(self) -> int:
        """Delete the message rows of this channel that every group has settled,
        ``cleanup_batch`` per transaction; return how many went."""
        db = await self._ensure_open()
        total = after = 0
        while True:
            async with transaction(db, "cleaning up settled messages") as conn:
                deleted, after = await q.cleanup(conn, self.channel, self.cleanup_batch, after)
            total += deleted
            if deleted < self.cleanup_batch:
                return total

    async def _clean_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.cleanup_interval)
            try:
                deleted = await self.cleanup()
            except TransportError as exc:
                log.warning("channel %r: cleanup failed: %s", self.channel, exc)
            else:
                if deleted:
                    log.debug("channel %r: cleaned up %d settled messages", self.channel, deleted)

    async def close(self) -> None:
        """Stop every subscription (their unsettled deliveries go back to their groups
        at once), stop listening and, if the transport made its database, close it."""
        self._closed = True
        self._connected = False
        for subscription in list(self._subscriptions):
            await subscription.stop()
        self._subscriptions.clear()
        if self._cleaner is not None:
            self._cleaner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._cleaner
            self._cleaner = None
        if self._unlisten is not None:
            with contextlib.suppress(Exception):
                await self._unlisten()
            self._unlisten = None
        if self._owns_database and self._db is not None:
            with contextlib.suppress(Exception):
                await self._db.dispose()

    def __repr__(self) -> str:
        where = repr(self._db) if self._db is not None else "<not opened>"
        return f"SqlTransport({where}, channel={self.channel!r})"
