"""The backend-neutral face of the event store: validation, upcasting, subscriptions.

:class:`EventStore` picks its backend from the database (``EventStore(db)``
returns a :class:`~accord.eventstore._postgres.PostgresEventStore` or a
:class:`~accord.eventstore._sqlite.SqliteEventStore`); each backend
implements the few ``_``-prefixed primitives at the bottom of the class.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import weakref
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from accord._aio import wait_event
from accord._checks import is_count
from accord.db.database import Database, translate_errors
from accord.db.schema_events import events as events_table
from accord.db.schema_events import snapshots
from accord.errors import ConcurrencyError, ConfigurationError, DecodeError
from accord.eventstore._types import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    AppendResult,
    ExpectedVersion,
    NewEvent,
    RecordedEvent,
)
from accord.eventstore._upcasting import Upcasters
from accord.messages import MAX_NAME_LENGTH, Message
from accord.serialization import loads

__all__ = [
    "MAX_STREAM_ID_LENGTH",
    "METADATA_EXTENSION",
    "NOTIFY_CHANNEL",
    "EventStore",
    "Snapshot",
    "message_key",
]

#: The longest stream id the store holds (the width of its column).
MAX_STREAM_ID_LENGTH: int = events_table.c.stream_id.type.length  # type: ignore[attr-defined]

#: The PostgreSQL channel a commit that appended events notifies (payload: the last position).
NOTIFY_CHANNEL = "accord_events"

#: The extension attribute of an outbox message that carries its event's metadata
#: (as JSON text) when it holds more than the message's correlation and causation ids.
METADATA_EXTENSION = "eventmetadata"
_METADATA_ATTRIBUTES = frozenset(("correlation_id", "causation_id"))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The saved state of an aggregate stream at ``version``.

    ``schema_version`` is the aggregate class's snapshot version when it was
    taken; a loader ignores a snapshot whose version differs from its own.
    """

    stream_id: str
    aggregate_type: str
    version: int
    schema_version: int
    state: dict[str, Any]
    created_at: datetime


@dataclass(slots=True)
class _Row:
    """One event ready for the database."""

    id: Any
    type: str
    schema_version: int
    data: dict[str, Any]
    metadata: dict[str, Any]
    recorded_at: datetime
    #: ``data`` and ``metadata`` as JSON text (what PostgreSQL is sent).
    data_json: str
    metadata_json: str


def _describe(expected: ExpectedVersion) -> str:
    return repr(expected) if not isinstance(expected, int) else f"version {expected}"


#: Where a connection keeps the time its transaction's events are recorded at.
_RECORDED_AT = "accord_events_recorded_at"


def _transaction_time(conn: AsyncConnection | None) -> datetime:
    """The time the events appended in ``conn``'s transaction are recorded at: that of
    its first append. One transaction's events share it, so ``as_of`` sees all of
    them or none (a match and both players' points, not one side of it)."""
    now = datetime.now(UTC)
    sync = conn.sync_connection if conn is not None else None
    transaction = sync.get_transaction() if sync is not None else None
    if sync is None or transaction is None:
        return now
    held = sync.info.get(_RECORDED_AT)
    if held is not None and held[0]() is transaction:
        return held[1]  # type: ignore[no-any-return]
    sync.info[_RECORDED_AT] = (weakref.ref(transaction), now)
    return now


class EventStore:
    """An append-only event store on an Accord :class:`~accord.db.Database`.

    ``EventStore(database, upcasters)`` returns the implementation for the
    database's dialect. All methods are safe to call concurrently; every read
    path returns events upcast by ``upcasters`` to their latest schema.
    """

    #: Seconds between polls when no notification arrives (subscriptions).
    poll_interval: float = 1.0

    def __new__(cls, database: Database, *args: Any, **kwargs: Any) -> EventStore:
        if cls is EventStore:
            if database.is_postgres:
                from accord.eventstore._postgres import PostgresEventStore

                cls = PostgresEventStore
            else:
                from accord.eventstore._sqlite import SqliteEventStore

                cls = SqliteEventStore
        return super().__new__(cls)

    def __init__(
        self,
        database: Database,
        upcasters: Upcasters | None = None,
        *,
        poll_interval: float | None = None,
    ) -> None:
        self.database = database
        self.upcasters = upcasters or Upcasters()
        if poll_interval is not None:
            self.poll_interval = poll_interval
        self._wakers: set[asyncio.Event] = set()

    # --- writing -----------------------------------------------------------

    async def append(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        *,
        expected_version: ExpectedVersion = ANY,
        conn: AsyncConnection | None = None,
        outbox: bool = False,
    ) -> AppendResult:
        """Append ``events`` to ``stream_id`` atomically, after checking ``expected_version``.

        ``expected_version`` is :data:`ANY`, :data:`NO_STREAM`,
        :data:`STREAM_EXISTS` or the stream's exact current version (0 = no
        stream). If the check fails, nothing is written and
        :class:`~accord.errors.ConcurrencyError` is raised with ``.actual``
        set to the stream's version. With ``conn`` the events are written in
        that connection's transaction and become visible when it commits.
        With ``outbox=True`` each event is also added to the outbox as an
        :class:`accord.Message` (id = event id, subject = stream id, key =
        :func:`message_key` of it: the stream id itself up to 200 characters), in
        the same transaction.
        """
        _check_stream_id(stream_id)
        if isinstance(expected_version, bool) or (
            expected_version not in (ANY, NO_STREAM, STREAM_EXISTS)
            and (not isinstance(expected_version, int) or expected_version < 0)
        ):
            raise ConfigurationError(
                f"expected_version must be ANY, NO_STREAM, STREAM_EXISTS or an int >= 0, "
                f"got {expected_version!r}"
            )
        if not events:
            raise ConfigurationError(f"append to {stream_id!r} was given no events")
        if expected_version == 0:
            expected_version = NO_STREAM
        if conn is not None and not conn.in_transaction():
            await conn.begin()  # as its first statement would: its time is the transaction's
        now = _transaction_time(conn)
        rows = [self._row(stream_id, e, now) for e in events]
        if outbox:
            if conn is not None:
                result = await self._append_in(conn, stream_id, rows, expected_version)
                await self._add_to_outbox(conn, stream_id, events, rows, result)
                return result
            async with self.database.transaction() as own:
                result = await self._append(own, stream_id, rows, expected_version)
                await self._add_to_outbox(own, stream_id, events, rows, result)
        elif conn is not None:
            return await self._append_in(conn, stream_id, rows, expected_version)
        else:
            result = await self._append_own(stream_id, rows, expected_version)
        self._wake_local()
        return result

    def _row(self, stream_id: str, event: NewEvent, now: datetime) -> _Row:
        """``event`` ready for the database, or the caller's error: a schema version
        the upcasters cannot read, data that is not JSON (checked here, before
        anything is written, so that every backend refuses the same values)."""
        latest = self.upcasters.latest(event.type)
        version = event.schema_version
        if version is None:
            version = latest
        elif version > latest and event.type in self.upcasters.types():
            raise ConfigurationError(
                f"appending to stream {stream_id!r}: event {event.type!r} has schema version "
                f"{version}, but the store's upcasters read it up to version {latest}: the "
                "stream could not be read back (register the upcasters that lead to it, "
                "or append it at a version they know)"
            )
        data, metadata = dict(event.data), dict(event.metadata)
        return _Row(
            id=event.id,
            type=event.type,
            schema_version=version,
            data=data,
            metadata=metadata,
            recorded_at=event.time or now,
            data_json=_json(stream_id, event, "data", data),
            metadata_json=_json(stream_id, event, "metadata", metadata),
        )

    async def _append_in(
        self,
        conn: AsyncConnection,
        stream_id: str,
        rows: Sequence[_Row],
        expected: ExpectedVersion,
    ) -> AppendResult:
        """:meth:`_append` in the caller's transaction, inside a savepoint: losing a
        race (ConcurrencyError) leaves that transaction usable, on every backend."""
        if not self.database.is_postgres:
            return await self._append(conn, stream_id, rows, expected)  # checked first
        async with conn.begin_nested():
            return await self._append(conn, stream_id, rows, expected)

    async def _add_to_outbox(
        self,
        conn: AsyncConnection,
        stream_id: str,
        events: Sequence[NewEvent],
        rows: Sequence[_Row],
        result: AppendResult,
    ) -> None:
        from accord.outbox import add

        first = result.version - len(rows) + 1
        messages = []
        for i, (event, row) in enumerate(zip(events, rows, strict=True)):
            extensions = {
                "streamversion": str(first + i),
                "schemaversion": str(row.schema_version),
                "position": str(result.positions[i]),
            }
            if event.metadata.keys() - _METADATA_ATTRIBUTES:
                # The rest of the metadata (an actor, a tenant) travels too, so a
                # projection fed by a transport sees what one fed by the store sees.
                extensions[METADATA_EXTENSION] = row.metadata_json
            messages.append(
                Message(
                    type=row.type,
                    data=dict(event.data),
                    id=str(row.id),
                    time=row.recorded_at,
                    subject=stream_id,
                    key=message_key(stream_id),
                    correlationid=_opt(event.metadata.get("correlation_id")),
                    causationid=_opt(event.metadata.get("causation_id")),
                    extensions=extensions,
                )
            )
        await add(conn, *messages)

    def _conflict(self, stream_id: str, expected: ExpectedVersion, actual: int) -> ConcurrencyError:
        return ConcurrencyError(
            f"stream {stream_id!r} is at version {actual}, but the append expected "
            f"{_describe(expected)}: reload the stream and retry the command "
            "(see accord.eventstore.retry_on_conflict)",
            expected=expected,
            actual=actual,
        )

    def _check(self, stream_id: str, expected: ExpectedVersion, actual: int) -> None:
        """Raise the conflict if ``actual`` does not satisfy ``expected``."""
        ok = (
            expected is ANY
            or (expected is NO_STREAM and actual == 0)
            or (expected is STREAM_EXISTS and actual > 0)
            or (isinstance(expected, int) and expected == actual)
        )
        if not ok:
            raise self._conflict(stream_id, expected, actual)

    # --- reading -----------------------------------------------------------

    async def read_stream(
        self,
        stream_id: str,
        *,
        from_version: int = 1,
        to_version: int | None = None,
        backwards: bool = False,
        as_of: datetime | None = None,
        limit: int | None = None,
        conn: AsyncConnection | None = None,
    ) -> list[RecordedEvent]:
        """The events of one stream with ``from_version <= version <= to_version``.

        Oldest first, or newest first with ``backwards=True`` (``limit`` then
        takes the newest). ``as_of`` reads the stream as it was at that time (time
        travel): the versions before the first event recorded after ``as_of``, a
        prefix of the stream even when a later append set an earlier
        ``NewEvent.time``. The events of one transaction are recorded at the
        time of its first append, so it sees them all or none; a transaction still
        open at ``as_of`` shows up in such a read once it commits. On PostgreSQL
        two transactions appending to one stream at once can leave an event of the
        earlier-started one behind the later's in the stream, recorded earlier:
        ``as_of`` between their times then cuts the stream before it and shows
        that transaction's other events. A stream that does not exist reads as
        ``[]``.
        Stream reads see every committed event at once (no gap-safety wait).
        """
        if as_of is not None and as_of.tzinfo is None:
            raise ConfigurationError("as_of must be timezone-aware (e.g. datetime.now(UTC))")
        if limit is not None:
            _at_least_one("limit", limit)
        raw = await self._read_stream(
            stream_id, from_version, to_version, backwards, as_of, limit, conn
        )
        return [self._recorded(r) for r in raw]

    async def stream_version(self, stream_id: str, *, conn: AsyncConnection | None = None) -> int:
        """The stream's current version (0 if it has no events)."""
        return await self._stream_version(stream_id, conn)

    async def read_all(
        self,
        after: int = 0,
        *,
        limit: int = 1000,
        types: Sequence[str] | None = None,
        conn: AsyncConnection | None = None,
    ) -> list[RecordedEvent]:
        """Up to ``limit`` events with ``position > after``, in position order, gap-safe.

        Only events of finished transactions are returned, in an order that
        later commits can never precede: calling again with the position of
        the last event returned never misses an event (see the package docs).
        ``types`` keeps only those event types.
        """
        _at_least_one("limit", limit)
        events, _bound = await self._read_all(after, limit, list(types) if types else None, conn)
        return events

    async def head(self, *, conn: AsyncConnection | None = None) -> int:
        """The highest position :meth:`read_all` can return now (0 if none)."""
        return await self._head(conn)

    async def count(
        self,
        after: int = 0,
        *,
        upto: int | None = None,
        types: Sequence[str] | None = None,
        conn: AsyncConnection | None = None,
    ) -> int:
        """How many events ``read_all`` would return with ``after < position <= upto``
        (``upto`` = the current head). Use this for "events behind", never ``head - after``:
        positions are not dense on PostgreSQL."""
        return await self._count(after, upto, list(types) if types else None, conn)

    async def subscribe(
        self,
        after: int = 0,
        *,
        types: Sequence[str] | None = None,
        batch_size: int = 1000,
    ) -> AsyncIterator[RecordedEvent]:
        """Every event with ``position > after``: first the history, then live events.

        Gap-safe like :meth:`read_all`, each event exactly once, in position
        order. Wakes on PostgreSQL NOTIFY, polls every ``poll_interval``
        otherwise. Runs until the consumer stops iterating (``break``/``aclose``).
        """
        _at_least_one("batch_size", batch_size)
        wanted = list(types) if types else None
        wake = asyncio.Event()
        notified = 0

        def on_notify(payload: str) -> None:
            nonlocal notified
            with contextlib.suppress(ValueError):
                notified = max(notified, int(payload))
            wake.set()

        stop = await self._listen(on_notify)
        self._wakers.add(wake)
        cursor = after
        backoff = 0.005
        try:
            while True:
                wake.clear()
                events, bound = await self._read_all(cursor, batch_size, wanted, None)
                for event in events:
                    cursor = event.position
                    yield event
                if len(events) == batch_size:
                    continue
                if notified >= bound:
                    # A commit we were told about is not visible yet: an older
                    # transaction is still open. Poll fast until it is.
                    await wait_event(wake, backoff)
                    backoff = min(backoff * 2, 0.1, self.poll_interval)
                    continue
                backoff = 0.005
                await wait_event(wake, self.poll_interval)
        finally:
            self._wakers.discard(wake)
            if stop is not None:
                await stop()

    async def close(self) -> None:
        """Release what the store holds (connections kept for speed); it stays usable."""

    async def __aenter__(self) -> EventStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _wake_local(self) -> None:
        for wake in self._wakers:
            wake.set()

    def _recorded(self, r: Any) -> RecordedEvent:
        """A RecordedEvent from a row ``(position, stream_id, version, id, type,
        schema_version, data, metadata, recorded_at)``, upcast to the latest schema."""
        position, stream_id, version, event_id, type_, schema_version, data, meta, at = r
        if not isinstance(data, dict):
            data = loads(data)
        if not isinstance(meta, dict):
            # Most events carry no metadata: skip the parser on the hot read path.
            meta = {} if meta == "{}" else loads(meta)
        latest = self.upcasters.latest(type_)
        if schema_version != latest and (schema_version < latest or latest > 1):
            # Lift old payloads; a payload newer than the code raises a clear DecodeError.
            try:
                data = self.upcasters.upcast(type_, schema_version, data)
            except DecodeError as exc:
                # Name the event: in a long log, which one failed is half the answer.
                raise DecodeError(
                    f"reading stream {stream_id!r} v{version} (position {position}): {exc}"
                ) from (exc.__cause__ or exc)
            schema_version = latest
        return RecordedEvent(
            position=position,
            stream_id=stream_id,
            version=version,
            type=type_,
            schema_version=schema_version,
            data=data,
            metadata=meta,
            recorded_at=at,
            id=event_id,
        )

    # --- snapshots ---------------------------------------------------------

    async def save_snapshot(
        self, snapshot: Snapshot, *, conn: AsyncConnection | None = None
    ) -> None:
        """Keep ``snapshot`` as the stream's latest unless a newer one is already stored."""
        await self._save_snapshot(snapshot, conn)

    async def load_snapshot(
        self, stream_id: str, *, conn: AsyncConnection | None = None
    ) -> Snapshot | None:
        """The stream's latest snapshot, or None."""
        return await self._load_snapshot(stream_id, conn)

    # --- backend primitives ------------------------------------------------

    async def _append(
        self,
        conn: AsyncConnection,
        stream_id: str,
        rows: Sequence[_Row],
        expected: ExpectedVersion,
    ) -> AppendResult:
        """Append in ``conn``'s transaction (which may be the caller's)."""
        raise NotImplementedError

    async def _append_own(
        self, stream_id: str, rows: Sequence[_Row], expected: ExpectedVersion
    ) -> AppendResult:
        """Append in a transaction of its own, committed on return."""
        async with self.database.transaction() as conn:
            return await self._append(conn, stream_id, rows, expected)

    async def _read_stream(
        self,
        stream_id: str,
        from_version: int,
        to_version: int | None,
        backwards: bool,
        as_of: datetime | None,
        limit: int | None,
        conn: AsyncConnection | None,
    ) -> Sequence[Any]:
        raise NotImplementedError

    async def _stream_version(self, stream_id: str, conn: AsyncConnection | None) -> int:
        raise NotImplementedError

    async def _read_all(
        self, after: int, limit: int, types: list[str] | None, conn: AsyncConnection | None
    ) -> tuple[list[RecordedEvent], int]:
        """Events after ``after`` and the exclusive upper bound of what was visible."""
        raise NotImplementedError

    async def _head(self, conn: AsyncConnection | None) -> int:
        raise NotImplementedError

    async def _count(
        self, after: int, upto: int | None, types: list[str] | None, conn: AsyncConnection | None
    ) -> int:
        raise NotImplementedError

    async def _listen(self, callback: Any) -> Any:
        """Start listening for commits; return an async stop function or None."""
        return None

    async def _save_snapshot(self, snapshot: Snapshot, conn: AsyncConnection | None) -> None:
        if self.database.is_postgres:
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
        state: Any = snapshot.state
        if self.database.is_postgres:
            # JSONB reorders an object's keys (shortest first): a dict restored from
            # it would iterate in another order than the events built it in, so a
            # snapshot would change what a load returns. Kept as JSON text in a JSONB
            # string instead; _load_snapshot reads both forms.
            state = json.dumps(state, separators=(",", ":"), allow_nan=False)
        values = {
            "stream_id": snapshot.stream_id,
            "aggregate_type": snapshot.aggregate_type,
            "version": snapshot.version,
            "schema_version": snapshot.schema_version,
            "state": state,
            "created_at": snapshot.created_at,
        }
        stmt = insert(snapshots).values(values)
        stmt = stmt.on_conflict_do_update(
            index_elements=[snapshots.c.stream_id],
            set_={k: stmt.excluded[k] for k in values if k != "stream_id"},
            where=(snapshots.c.version <= stmt.excluded.version)
            | (snapshots.c.schema_version != stmt.excluded.schema_version),
        )
        with translate_errors("saving a snapshot"):
            if conn is not None:
                await conn.execute(stmt)
            else:
                async with self.database.transaction() as own:
                    await own.execute(stmt)

    async def _load_snapshot(self, stream_id: str, conn: AsyncConnection | None) -> Snapshot | None:
        query = sa.select(snapshots).where(snapshots.c.stream_id == stream_id)
        with translate_errors("loading a snapshot"):
            if conn is not None:
                row = (await conn.execute(query)).first()
            else:
                async with self.database.read() as own:
                    row = (await own.execute(query)).first()
        if row is None:
            return None
        state = row.state
        if isinstance(state, str):  # PostgreSQL: the state's JSON text (_save_snapshot)
            state = loads(state)
        return Snapshot(
            stream_id=row.stream_id,
            aggregate_type=row.aggregate_type,
            version=row.version,
            schema_version=row.schema_version,
            state=state,
            created_at=row.created_at,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.database!r})"


def _check_stream_id(stream_id: str) -> None:
    if not isinstance(stream_id, str) or not stream_id:
        raise ConfigurationError("stream_id must be a non-empty string")
    if len(stream_id) > MAX_STREAM_ID_LENGTH:
        raise ConfigurationError(
            f"stream_id is {len(stream_id)} characters long; the event store holds at "
            f"most {MAX_STREAM_ID_LENGTH} (keep long natural keys in the events, and "
            "name the stream by an id or a digest of them)"
        )
    if "\x00" in stream_id:
        raise ConfigurationError(
            f"stream_id {stream_id!r} holds a NUL character, which PostgreSQL cannot store"
        )


# A NUL escape in JSON text: \u0000 after an even number of backslashes.
_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def _json(stream_id: str, event: NewEvent, part: str, value: dict[str, Any]) -> str:
    """``value`` as JSON text, or the caller's TypeError/ValueError naming the stream
    and what cannot be stored. Only what :func:`json.dumps` writes as it is goes in:
    anything else would be stored as something else (a set as its repr on
    PostgreSQL, through ``str``) or refused by one backend and not the other."""
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False, default=_not_json)
    except (TypeError, ValueError) as exc:
        raise type(exc)(
            f"appending to stream {stream_id!r}: the {part} of event {event.type!r} "
            f"cannot be stored: {exc}"
        ) from None
    if _NUL.search(text):
        raise ValueError(
            f"appending to stream {stream_id!r}: the {part} of event {event.type!r} cannot "
            "be stored: it holds a NUL character (PostgreSQL's JSONB cannot hold one)"
        )
    return text


def _not_json(value: Any) -> Any:
    kind = type(value)
    name = kind.__qualname__
    if kind.__module__ != "builtins":
        name = f"{kind.__module__}.{name}"
    raise TypeError(
        f"it holds a {name}, which is not JSON: "
        "convert it first (a datetime to its isoformat(), a set to a list, bytes to text)"
    )


def _opt(value: Any) -> str | None:
    return None if value is None else str(value)


def _at_least_one(name: str, value: int) -> None:
    # 0 would read nothing for ever (subscribe spun); -1 meant "all" on SQLite only.
    if not is_count(value):
        raise ConfigurationError(f"{name} must be an int of at least 1, not {value!r}")


def message_key(stream_id: str) -> str:
    """The ordering key of ``stream_id``'s events in the outbox: the stream id, or for
    one longer than a key holds (200 characters; a stream id may have 300), its
    first 135 characters, ``#`` and the SHA-256 of the whole. One key per stream
    either way, so its events keep their order; the message's ``subject`` carries
    the full stream id."""
    if len(stream_id) <= MAX_NAME_LENGTH:
        return stream_id
    digest = hashlib.sha256(stream_id.encode()).hexdigest()
    return f"{stream_id[: MAX_NAME_LENGTH - len(digest) - 1]}#{digest}"
