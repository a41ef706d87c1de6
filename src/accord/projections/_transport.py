"""Feeding a projection from a transport subscription instead of the event store.

Messages carry no global position a checkpoint could follow, so exactly-once
comes from the inbox instead: each delivery is applied in one transaction with
an ``accord_inbox`` row ``(projection:<name>, message id)``; a redelivered or
duplicated message finds the row and is acked without running the handler.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from accord.db.database import Database
from accord.eventstore import RecordedEvent
from accord.eventstore._store import METADATA_EXTENSION
from accord.inbox._store import record
from accord.messages import Message
from accord.projections import _state
from accord.projections._projection import Projection, ProjectionContext
from accord.serialization import loads
from accord.transports.base import Delivery, GroupDeclaration, Subscription, Transport

__all__ = ["TransportProjector", "event_from_message"]

log = logging.getLogger("accord.projections")


def event_from_message(message: Message) -> RecordedEvent:
    """A :class:`RecordedEvent` view of a message.

    ``position``/``version``/``schema_version`` come from the ``position``,
    ``streamversion`` and ``schemaversion`` extensions the event store's outbox sets
    (0 / 0 / 1 when absent). ``stream_id`` is the message's ``subject`` when the
    event store sent it (the full stream id: its ``key`` is a digest for a stream id
    over 200 characters), else its key (or subject). ``metadata`` holds
    ``correlation_id`` and ``causation_id``, and the rest of the event's metadata
    that the store sent along (its ``eventmetadata`` extension).
    """
    ext = message.extensions or {}
    from_store = "streamversion" in ext and bool(message.subject)

    def number(name: str, default: int) -> int:
        try:
            return int(ext.get(name, default))
        except (TypeError, ValueError):
            return default

    try:
        event_id = uuid.UUID(message.id)
    except ValueError:
        event_id = uuid.uuid5(uuid.NAMESPACE_URL, message.id)
    data = message.data if isinstance(message.data, dict) else {"value": message.data}
    return RecordedEvent(
        position=number("position", 0),
        stream_id=(message.subject if from_store else message.key or message.subject) or "",
        version=number("streamversion", 0),
        type=message.type,
        schema_version=number("schemaversion", 1),
        data=data,
        metadata={
            **_sent_metadata(message, ext),
            "correlation_id": message.correlationid,
            "causation_id": message.causationid,
        },
        recorded_at=message.time or datetime.now(UTC),
        id=event_id,
    )


def _sent_metadata(message: Message, ext: Mapping[str, str]) -> dict[str, Any]:
    """The metadata the event store sent with ``message`` ({} if none, or if it is
    not a JSON object: a handler then sees what it would without it)."""
    text = ext.get(METADATA_EXTENSION)
    if text is None:
        return {}
    try:
        value = loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        log.warning(
            "message %s: its %s extension is not a JSON object; its metadata is left out",
            message.id,
            METADATA_EXTENSION,
        )
        return {}
    return value


class TransportProjector:
    """Applies the messages of a transport group to ``projection``'s live read model.

    A worker component (``run``/``stop``). ``group`` defaults to
    ``projection:<name>``; it subscribes to the projection's event types. Each
    message is applied once (inbox row in the same transaction). A handler that
    raises is nacked with backoff; after ``max_attempts`` the message is rejected
    (the broker's dead-letter destination gets it, with the error) and logged as
    an error - it is never acked silently.
    """

    def __init__(
        self,
        database: Database,
        projection: Projection,
        transport: Transport,
        *,
        group: str | None = None,
        prefetch: int = 64,
        max_attempts: int = 5,
    ) -> None:
        self.database = database
        self.projection = projection
        self.transport = transport
        self.group = group or f"projection:{projection.name}"
        self.name = self.group
        self.prefetch = prefetch
        self.max_attempts = max_attempts
        self._subscription: Subscription | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        """Prepare the live tables and subscribe."""
        async with self.database.transaction() as conn:
            versions = await _state.ensure_versions(conn, self.projection.name)
            await self.projection.create_tables(conn, versions.live)
        await self.transport.connect()
        self._subscription = await self.transport.subscribe(
            self.group, self._handle, topics=self.projection.event_types, prefetch=self.prefetch
        )

    async def declare(self) -> list[GroupDeclaration]:
        """Declare the group for the projection's event types, without consuming: what
        is published from now on waits for it."""
        topics = tuple(self.projection.event_types)
        await self.transport.connect()
        await self.transport.declare(self.group, topics=topics)
        return [GroupDeclaration(self.transport.name, self.group, topics)]

    async def run(self) -> None:
        """Start, then wait until :meth:`stop`; cancelled, it stops the subscription
        before it returns."""
        self._stopped.clear()
        try:
            await self.start()
            await self._stopped.wait()
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Stop the subscription (unsettled deliveries are redelivered later)."""
        if self._subscription is not None:
            subscription, self._subscription = self._subscription, None
            await subscription.stop()
        self._stopped.set()

    async def _handle(self, delivery: Delivery) -> None:
        message = delivery.message
        if message is None:
            await delivery.reject(f"undecodable message: {delivery.decode_error}")
            return
        entry = self.projection.handlers.get(message.type)
        if entry is None:
            await delivery.ack()
            return
        fn, is_async = entry
        try:
            async with self.database.transaction() as conn:
                if not await record(conn, self.group, message):
                    return  # a duplicate: applied before
                live = await self.projection.live_version(conn)
                ctx = ProjectionContext(self.projection, conn, live, replaying=False)
                result: Any = fn(ctx, event_from_message(message))
                if is_async:
                    await result
                await ctx.flush()
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            if delivery.attempt >= self.max_attempts:
                log.error(
                    "projection %s: rejecting message %s (%s) after %d attempts: %s",
                    self.projection.name,
                    message.id,
                    message.type,
                    delivery.attempt,
                    error,
                )
                await delivery.reject(f"projection {self.projection.name}: {error}")
                return
            await delivery.nack(min(30.0, 0.1 * 2 ** (delivery.attempt - 1)))
