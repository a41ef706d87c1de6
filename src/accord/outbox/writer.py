"""Adding messages to the outbox inside the caller's own transaction."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import uuid
import weakref
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from accord.db.database import (
    CallerErrors,
    Database,
    driver_in_transaction,
    translate_errors,
)
from accord.db.schema import outbox
from accord.db.types import UTCDateTime
from accord.errors import ConfigurationError
from accord.messages import Message, decode, headers_of

__all__ = [
    "NOTIFY_CHANNEL",
    "SCHEDULED",
    "add",
    "cancel_scheduled",
    "driver_row",
    "message_from_row",
    "message_uuid",
    "row_from_message",
    "transaction",
    "withdraw_scheduled",
]

#: The PostgreSQL channel a commit that added outbox rows notifies; relays LISTEN on it.
NOTIFY_CHANNEL = "accord_outbox"
#: The status of a row added for later (``deliver_at`` / ``delay``) until it is due:
#: relays release it then, as PENDING behind the rows already pending.
SCHEDULED = "SCHEDULED"


def row_from_message(message: Message, now: datetime) -> dict[str, Any]:
    """The outbox row for a message (headers keep every CloudEvents attribute)."""
    if not isinstance(message, Message):
        fix = (
            ": pass them one by one, add_to_outbox(conn, *messages)"
            if isinstance(message, list | tuple)
            else ""
        )
        raise ConfigurationError(
            f"add_to_outbox takes Message objects, not a {type(message).__name__}{fix}"
        )
    try:
        row_id = uuid.UUID(message.id)
    except ValueError:
        raise ConfigurationError(
            f"outbox message id {message.id!r} is not a UUID; leave Message.id to its "
            "default or use uuid.uuid5() for a deterministic id"
        ) from None
    if message.id != str(row_id):
        # One spelling of the id everywhere (the row, the ce-id header, the broker's
        # confirms), or a refusal reported by ce-id would match no row.
        message = message.with_(id=str(row_id))
    headers = headers_of(message)
    return {
        "id": row_id,
        "event_type": message.type,
        "key": message.key,
        "payload": message.data,
        "headers": headers,
        "status": "PENDING",
        "retry_count": 0,
        "available_at": now,
        "created_at": now,
    }


def message_from_row(headers: dict[str, str], payload: Any) -> Message:
    """Rebuild the message an outbox row was made from."""
    return decode(headers, json.dumps(payload, separators=(",", ":"), default=str).encode())


# One prepared statement, one round trip: the row and the wake-up of the relays.
# The notification is delivered at commit, and only if the transaction commits;
# identical notifications in one transaction are folded into one.
_INSERT = (
    "INSERT INTO accord_outbox (id, event_type, key, payload, headers, status, retry_count, "
    "available_at, created_at) VALUES "
)
_PG_ADD = (
    f"WITH added AS ({_INSERT}($1, $2, $3, $4::jsonb, $5::jsonb, 'PENDING', 0, now(), now()) "
    f"ON CONFLICT (id) DO NOTHING RETURNING 1) SELECT pg_notify('{NOTIFY_CHANNEL}', '')"
)
# A row for later: due at $6, or $7 microseconds after the server's clock when it is
# added (statement_timestamp(): now() is when the transaction began; microseconds,
# not an interval of days, which PostgreSQL would add as calendar days in the
# session's time zone, 23 or 25 hours across a daylight-saving change). No wake-up:
# a relay releases it when due.
_PG_DELAY = "statement_timestamp() + {micros} * interval '1 microsecond'"
_PG_SCHEDULE = (
    f"{_INSERT}($1, $2, $3, $4::jsonb, $5::jsonb, '{SCHEDULED}', 0, "
    f"COALESCE($6::timestamptz, {_PG_DELAY.format(micros='$7::bigint')}), now()) "
    "ON CONFLICT (id) DO NOTHING"
)


@dataclass(frozen=True, slots=True)
class _Schedule:
    """When messages added for later are due: at ``at``, or ``delay`` after they are
    added (by the server's clock on PostgreSQL)."""

    at: datetime | None
    delay: timedelta | None

    @staticmethod
    def of(deliver_at: datetime | None, delay: timedelta | None) -> _Schedule | None:
        if deliver_at is not None and delay is not None:
            raise ConfigurationError("give add_to_outbox deliver_at or delay, not both")
        if deliver_at is not None:
            if not isinstance(deliver_at, datetime):
                raise ConfigurationError(
                    f"deliver_at must be a timezone-aware datetime, not {deliver_at!r}"
                )
            if deliver_at.tzinfo is None or deliver_at.utcoffset() is None:
                raise ConfigurationError(
                    f"deliver_at must be timezone-aware (e.g. datetime.now(UTC) + "
                    f"timedelta(hours=1)), not {deliver_at!r}"
                )
            try:
                return _Schedule(deliver_at.astimezone(UTC), None)
            except OverflowError:  # within a day of datetime.min or .max
                raise ConfigurationError(
                    f"deliver_at {deliver_at!r} is out of range in UTC (years 1 to 9999)"
                ) from None
        if delay is not None:
            if not isinstance(delay, timedelta) or delay < timedelta(0):
                raise ConfigurationError(
                    f"delay must be a timedelta of zero or more, not {delay!r}"
                )
            try:
                datetime.now(UTC) + delay
            except OverflowError:
                raise ConfigurationError(
                    f"delay {delay!r} falls due after the year 9999; give a shorter one"
                ) from None
            return _Schedule(None, delay)
        return None

    def due(self, now: datetime) -> datetime:
        """The due time, with ``now`` as the time they are added."""
        return self.at if self.at is not None else now + (self.delay or timedelta(0))

    @property
    def micros(self) -> int | None:
        """The delay in whole microseconds."""
        return None if self.delay is None else self.delay // timedelta(microseconds=1)

    def sql(self) -> str:
        """The due time as a PostgreSQL expression of literals."""
        if self.at is not None:
            return f"'{self.at.isoformat()}'::timestamptz"
        return _PG_DELAY.format(micros=self.micros)


async def add(
    conn: AsyncConnection | AsyncSession,
    *messages: Message,
    deliver_at: datetime | None = None,
    delay: timedelta | None = None,
) -> None:
    """Write ``messages`` to the outbox in the transaction ``conn`` is in.

    Nothing is published unless that transaction commits; once it commits, the
    relay publishes each message at least once, with its id unchanged.
    Messages with the same ``key`` are published in the order they were added.
    A message whose id is in the outbox already is not added again: give a retried
    operation a deterministic id (``uuid.uuid5``) and it stays one message.

    ``deliver_at`` (timezone-aware) or ``delay`` schedule the messages for later: they
    wait in the database, not in the broker, and a relay publishes them once due
    (within its ``poll_interval``), in the order they fall due. A scheduled message
    takes its place in its key's order when it falls due, behind the messages of
    that key pending then; until then it holds nothing back. On PostgreSQL
    ``delay`` counts from the server's clock. :func:`cancel_scheduled` withdraws one
    before it is due.
    """
    if not messages:
        return
    schedule = _Schedule.of(deliver_at, delay)
    connection = await conn.connection() if isinstance(conn, AsyncSession) else conn
    now = datetime.now(UTC)
    rows = [row_from_message(m, now) for m in messages]
    block = _BLOCKS.get(connection.sync_connection) if connection.sync_connection else None
    if block is not None and block.values is not None:
        # Sent with the COMMIT of outbox.transaction(); rendered now, so that text
        # that cannot be sent is refused here.
        block.values.extend([_row_values(row, schedule) for row in rows])
        block.scheduled.extend(row["id"] if schedule is not None else None for row in rows)
        return
    with translate_errors("adding to the outbox"):
        if connection.dialect.name == "postgresql" and await _add_on_driver(
            connection, rows, schedule
        ):
            return
        postgres = connection.dialect.name == "postgresql"
        for row in rows:
            # As the hot path and messages.encode() write data: a datetime, a UUID,
            # a Decimal as its text (the JSON type alone would refuse them).
            row["payload"] = json.loads(_payload_json(row["payload"]))
            if postgres:
                del row["available_at"], row["created_at"]  # the server's now()
            elif schedule is not None:
                row["available_at"] = schedule.due(now)
            if schedule is not None:
                row["status"] = SCHEDULED
        statement = _insert_ignoring_duplicates(connection.dialect.name)
        if schedule is not None and postgres:
            due = sa.literal_column(schedule.sql(), UTCDateTime())
            statement = statement.values(available_at=due)
        await connection.execute(statement, rows)
        if schedule is None:
            await announce_pending(connection)


async def announce_pending(conn: AsyncConnection) -> None:
    """Have the relays look for PENDING rows once ``conn``'s transaction commits: a
    ``NOTIFY`` on PostgreSQL; on SQLite, which has none, a wake-up of this process's
    relays on that file."""
    if conn.dialect.name == "postgresql":
        await conn.execute(sa.text(f"NOTIFY {NOTIFY_CHANNEL}"))
    else:
        _wake_relays_on_commit(conn)


#: The relays running in this process, by the database they relay from (see
#: :func:`_database_key`). SQLite has no NOTIFY: a commit that added outbox rows
#: wakes these at once, so a message does not wait for their next poll. Relays in
#: other processes still poll.
_LOCAL_RELAYS: dict[str, weakref.WeakSet[Any]] = {}
#: Engines whose commits and rollbacks are watched for that (listeners on an engine
#: cannot be removed: one pair each, for good).
_WATCHED: weakref.WeakSet[Engine] = weakref.WeakSet()
#: The key, in a connection's ``info``, of the relays its open transaction will wake.
_WAKES = "accord_outbox_wakes"


@functools.lru_cache(maxsize=64)
def _database_key(url: sa.URL) -> str:
    """One name for one database: a SQLite file by its real path (a relative path, a
    symlink or query options name the same file), anything else by its URL."""
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        return "sqlite:" + os.path.realpath(url.database or "")
    return str(url)


def wake_on_local_commits(url: sa.URL, relay: Any) -> None:
    """Have ``relay.committed()`` called when a transaction of this process that added
    outbox rows to the database at ``url`` commits; :func:`stop_waking` undoes it."""
    _LOCAL_RELAYS.setdefault(_database_key(url), weakref.WeakSet()).add(relay)


def stop_waking(url: sa.URL, relay: Any) -> None:
    """Undo :func:`wake_on_local_commits`."""
    key = _database_key(url)
    relays = _LOCAL_RELAYS.get(key)
    if relays is not None:
        relays.discard(relay)
        if not relays:
            _LOCAL_RELAYS.pop(key, None)


def _wake_relays_on_commit(connection: AsyncConnection) -> None:
    if not _LOCAL_RELAYS:
        return
    key = _database_key(connection.engine.url)
    if key not in _LOCAL_RELAYS:
        return
    sync = connection.sync_connection
    assert sync is not None  # it just ran the INSERT
    engine = connection.engine.sync_engine
    if engine not in _WATCHED:
        _WATCHED.add(engine)
        event.listen(engine, "commit", _committed)
        event.listen(engine, "rollback", _rolled_back)
    sync.info[_WAKES] = key


def _committed(conn: Connection) -> None:
    # Runs as the COMMIT is sent: a woken relay's claim waits for the file's write
    # lock, which the committing transaction holds until it is done. It must never
    # raise (the commit would fail with it): a relay it cannot reach is skipped.
    key = conn.info.pop(_WAKES, None)
    if key is None:
        return
    try:
        relays = list(_LOCAL_RELAYS.get(key, ()))
    except RuntimeError:  # another thread's relay registered meanwhile
        return
    for relay in relays:
        with contextlib.suppress(Exception):
            relay.committed()


def _rolled_back(conn: Connection) -> None:
    conn.info.pop(_WAKES, None)


async def cancel_scheduled(
    conn: AsyncConnection | AsyncSession, message_id: str | uuid.UUID
) -> bool:
    """Withdraw a message added for later (``deliver_at`` / ``delay``) before a relay
    releases it, in the transaction ``conn`` is in (rolled back, the message stays
    scheduled), or added in that transaction (in an :func:`outbox_transaction`
    block too, where it is still held for the COMMIT). True if it was withdrawn;
    False if no such message waits: never added (or added by a transaction not
    committed yet), already released to be published, or cancelled."""
    connection = await conn.connection() if isinstance(conn, AsyncSession) else conn
    wanted = message_uuid(message_id)
    held = _withdraw_held(connection, wanted)
    # Held in an outbox_transaction() block, it may also have been added (and
    # committed) before: a second add of one id is not a second message.
    return await withdraw_scheduled(connection, [message_id]) == 1 or held


def _withdraw_held(connection: AsyncConnection, message_id: uuid.UUID) -> bool:
    """Withdraw the message ``message_id``, added for later, from the rows an
    outbox_transaction() block on ``connection`` holds for its COMMIT; whether it
    held it."""
    sync = connection.sync_connection
    block = _BLOCKS.get(sync) if sync is not None else None
    return block is not None and block.values is not None and block.withdraw(message_id)


async def withdraw_scheduled(conn: AsyncConnection, message_ids: Sequence[str | uuid.UUID]) -> int:
    """Delete the SCHEDULED rows of ``message_ids`` in ``conn``'s transaction; return
    how many there were."""
    ids = [message_uuid(m) for m in message_ids]
    with translate_errors("cancelling scheduled messages"):
        result = await conn.execute(
            outbox.delete().where(outbox.c.id.in_(ids), outbox.c.status == SCHEDULED)
        )
    return int(result.rowcount or 0)


def message_uuid(value: str | uuid.UUID) -> uuid.UUID:
    """An outbox message id given as text (or a UUID), as the UUID its row holds."""
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        raise ConfigurationError(f"{value!r} is not an outbox message id (a UUID)") from None


def driver_row(row: dict[str, Any]) -> tuple[uuid.UUID, str, str | None, str, str]:
    """``(id, event_type, key, payload JSON, headers JSON)`` of an outbox row, as the
    statements sent straight to asyncpg take them."""
    payload = _payload_json(row["payload"])
    return (row["id"], row["event_type"], row["key"], payload, _to_json(row["headers"]))


def _payload_json(data: Any) -> str:
    try:
        return _to_json(data)
    except ValueError as exc:  # NaN or an infinity, refused on SQLite alike
        raise ValueError(f"adding to the outbox failed: a value cannot be stored: {exc}") from None


# json.dumps() with arguments builds a new encoder on every call.
_to_json = json.JSONEncoder(separators=(",", ":"), default=str, allow_nan=False).encode


async def _add_on_driver(
    connection: AsyncConnection, rows: list[dict[str, Any]], schedule: _Schedule | None
) -> bool:
    """The hot path: asyncpg underneath SQLAlchemy's own transaction. Returns False
    (nothing done) when the driver cannot be had in that transaction, so the
    caller's statements and ours can never end up in different transactions."""
    driver = await driver_in_transaction(connection)
    if driver is None:
        return False
    # add() translates asyncpg's own errors (translate_errors) like SQLAlchemy's.
    if schedule is None:
        await driver.executemany(_PG_ADD, [driver_row(r) for r in rows])
    else:
        due = (schedule.at, schedule.micros)
        await driver.executemany(_PG_SCHEDULE, [(*driver_row(r), *due) for r in rows])
    return True


@functools.cache
def _insert_ignoring_duplicates(dialect: str) -> Any:
    if dialect == "postgresql":
        # The server's time, as the statements sent straight to asyncpg write it.
        return (
            pg_insert(outbox)
            .values(available_at=sa.func.now(), created_at=sa.func.now())
            .on_conflict_do_nothing(index_elements=[outbox.c.id])
        )
    return sqlite_insert(outbox).on_conflict_do_nothing(index_elements=[outbox.c.id])


# -- outbox.transaction(): the rows travel with the COMMIT --------------------------


@dataclass
class _Block:
    """An open outbox.transaction() on one connection."""

    #: The VALUES of the rows to send with the COMMIT, rendered when add() is called;
    #: None when they cannot travel as literals (add() then writes at once).
    values: list[str] | None
    #: For each of ``values``, its message's id if it was added for later (None if
    #: not): cancel_scheduled() can withdraw it before it is sent.
    scheduled: list[uuid.UUID | None] = field(default_factory=list)
    #: The rows withdrawn so far (their places in ``values``), each with how many
    #: savepoints were open then: rolling that one back undoes the withdrawal, as
    #: it would a DELETE.
    withdrawn: dict[int, int] = field(default_factory=dict)
    #: len(values) when each savepoint still open began: rolling one back drops the
    #: rows added since.
    marks: list[int] = field(default_factory=list)
    #: The transaction was rolled back inside the block (a session whose flush failed
    #: does that): the block must not commit.
    rolled_back: bool = False

    def withdraw(self, message_id: uuid.UUID) -> bool:
        """Withdraw the held rows of ``message_id``, added for later; whether any."""
        held = [
            i
            for i, scheduled in enumerate(self.scheduled)
            if scheduled == message_id and i not in self.withdrawn
        ]
        self.withdrawn.update(dict.fromkeys(held, len(self.marks)))
        return bool(held)

    def to_send(self) -> list[str]:
        """The rows to send with the COMMIT: the held ones not withdrawn."""
        return [v for i, v in enumerate(self.values or []) if i not in self.withdrawn]

    def savepoint_ended(self, rolled_back: bool) -> None:
        """The innermost savepoint ended: rolled back, its rows and withdrawals go;
        released, its withdrawals are its parent's."""
        mark = self.marks.pop()
        depth = len(self.marks)
        if rolled_back:
            if self.values is not None:
                del self.values[mark:]
            del self.scheduled[mark:]
            self.withdrawn = {i: at for i, at in self.withdrawn.items() if at <= depth}
        else:
            self.withdrawn = {i: min(at, depth) for i, at in self.withdrawn.items()}


_BLOCKS: weakref.WeakKeyDictionary[Connection, _Block] = weakref.WeakKeyDictionary()
# Per Database, its engine with the driver in autocommit: BEGIN and COMMIT are ours.
_AUTOCOMMIT: weakref.WeakKeyDictionary[Database, AsyncEngine] = weakref.WeakKeyDictionary()
_ISOLATION_LEVELS = ("SERIALIZABLE", "REPEATABLE READ", "READ COMMITTED", "READ UNCOMMITTED")


@contextlib.asynccontextmanager
async def transaction(database: Database) -> AsyncIterator[AsyncConnection]:
    """A transaction, like ``database.transaction()``, whose outbox rows are sent
    to PostgreSQL together with its ``COMMIT``: one round trip fewer than
    :func:`add` on an ordinary transaction.

    Use the connection for your own statements (or bind an ``AsyncSession`` to
    it) and call :func:`add` as usual; the messages are held in memory and
    written — rows, the relays' wake-up and ``COMMIT`` in one message to the
    server — when the block exits. The guarantee is the same: the rows commit
    with your statements or not at all, and rows added inside a savepoint
    (``begin_nested()``) that rolls back are dropped with it. What differs: your
    own statements cannot see the outbox rows before the commit, and the block
    owns the transaction — it commits when the block exits and rolls back when
    the block raises. ``commit()`` on the connection inside it is refused; after a
    ``rollback()`` (or a bound session's failed flush) the block commits nothing
    and raises when it exits. Do not send ``COMMIT`` or ``ROLLBACK`` as SQL text.
    The transaction begins at the ``isolation_level`` the Database was given.
    On SQLite this is ``database.transaction()`` with :func:`add` writing at once.
    """
    if not database.is_postgres:
        async with database.transaction() as conn:
            yield conn
        return
    begin = _begin_statement(database)
    engine = _AUTOCOMMIT.get(database) or _autocommit_engine(database)
    callers = CallerErrors()
    with translate_errors("outbox transaction", callers):
        async with engine.connect() as conn:
            sync = conn.sync_connection
            assert sync is not None  # an open connection
            # Checked out just now, so no I/O is needed to reach the driver.
            driver: Any = sync.connection.driver_connection
            # Literals are sent as UTF-8 text: under another client encoding the
            # server would read them differently, so add() writes rows at once.
            _BLOCKS[sync] = _Block(values=[] if _utf8(driver) else None)
            try:
                await driver.execute(begin)
                # SQLAlchemy's side of it, so that sessions bound to the connection
                # join it; it sends nothing.
                await conn.begin()
                with callers.noting():
                    yield conn
                block = _BLOCKS.pop(sync)
                if block.rolled_back:
                    raise ConfigurationError(
                        "the transaction of this outbox_transaction() block was rolled back "
                        "inside it (rollback() on its connection, or a session's failed "
                        "flush), so the block committed nothing: raise to roll back instead"
                    )
                if block.values and not _utf8(driver):
                    raise ConfigurationError(
                        "client_encoding was changed inside an outbox_transaction() block: "
                        "its outbox rows cannot be sent as text; nothing was committed"
                    )
                # SQLAlchemy's bookkeeping and on_commit callbacks, which run before
                # the COMMIT is sent, as with database.transaction(); it sends nothing.
                await conn.commit()
                await driver.execute(_commit_statements(block.to_send()))
            except BaseException:
                await _abandon(conn, driver)
                raise
            finally:
                _BLOCKS.pop(sync, None)


def _utf8(driver: Any) -> bool:
    return str(driver.get_settings().client_encoding).upper() in ("UTF8", "UTF-8")


def _begin_statement(database: Database) -> str:
    level = (database.isolation_level or "").upper().replace("_", " ")
    if not level:
        return "BEGIN"
    if level not in _ISOLATION_LEVELS:
        raise ConfigurationError(
            f"outbox_transaction() cannot begin a transaction at isolation level "
            f"{database.isolation_level!r}: give the Database one of {', '.join(_ISOLATION_LEVELS)}"
        )
    return f"BEGIN ISOLATION LEVEL {level}"


def _autocommit_engine(database: Database) -> AsyncEngine:
    engine = database.engine.execution_options(isolation_level="AUTOCOMMIT")
    # Listeners on this engine alone (not on database.engine): only blocks see them.
    events = engine.sync_engine
    event.listen(events, "commit", _refuse_commit)
    event.listen(events, "rollback", _note_rollback)
    event.listen(events, "savepoint", _note_savepoint)
    event.listen(events, "rollback_savepoint", _drop_since_savepoint)
    event.listen(events, "release_savepoint", _keep_since_savepoint)
    _AUTOCOMMIT[database] = engine
    return engine


def _refuse_commit(conn: Connection) -> None:
    if conn in _BLOCKS:  # else the block has ended: this is its own commit
        raise ConfigurationError(
            "outbox_transaction() commits when its block exits: do not call commit() on "
            "its connection inside the block"
        )


def _note_rollback(conn: Connection) -> None:
    block = _BLOCKS.get(conn)
    if block is not None:
        block.rolled_back = True


def _note_savepoint(conn: Connection, _name: str | None) -> None:
    block = _BLOCKS.get(conn)
    if block is not None and block.values is not None:
        block.marks.append(len(block.values))


def _drop_since_savepoint(conn: Connection, _name: str, _context: Any) -> None:
    block = _BLOCKS.get(conn)
    if block is not None and block.values is not None and block.marks:
        block.savepoint_ended(rolled_back=True)


def _keep_since_savepoint(conn: Connection, _name: str, _context: Any) -> None:
    block = _BLOCKS.get(conn)
    if block is not None and block.values is not None and block.marks:
        block.savepoint_ended(rolled_back=False)


async def _abandon(conn: AsyncConnection, driver: Any) -> None:
    """Roll back what the block began. ROLLBACK is sent even when the driver says no
    transaction is open: a BEGIN cancelled in flight is not yet known to it (and a
    ROLLBACK outside a transaction only warns). A connection whose state is still
    in doubt is closed instead of going back to the pool inside a transaction."""
    if driver.is_closed():
        await conn.invalidate()
        return
    try:
        await driver.execute("ROLLBACK")
    except asyncio.CancelledError:
        await conn.invalidate()
        raise
    except Exception:
        await conn.invalidate()
        return
    if driver.is_in_transaction():
        await conn.invalidate()


def _row_values(row: dict[str, Any], schedule: _Schedule | None = None) -> str:
    """The row as a VALUES tuple of literals."""
    row_id, event_type, key, payload, headers = driver_row(row)
    status, due = "PENDING", "now()"
    if schedule is not None:
        # Sent with the COMMIT: a delay counts from then, never before the add() call.
        status, due = SCHEDULED, schedule.sql()
    return (
        f"('{row_id}'::uuid,{_literal(event_type)},{_literal(key)},{_literal(payload)}"
        f"::jsonb,{_literal(headers)}::jsonb,'{status}',0,{due},now())"
    )


def _commit_statements(values: list[str]) -> str:
    """``COMMIT``, preceded by the rows' ``INSERT`` and the relays' ``NOTIFY``: one
    simple-protocol message, so the rows go with the commit (statements with
    parameters cannot share a message; the values are quoted literals)."""
    if not values:
        return "COMMIT"
    return (
        f"{_INSERT}{','.join(values)} ON CONFLICT (id) DO NOTHING; NOTIFY {NOTIFY_CHANNEL}; COMMIT"
    )


def _literal(text: str | None) -> str:
    """An escape-string literal (``E'…'``): its backslashes and quotes are escaped
    whatever the server's ``standard_conforming_strings`` (the text is sent as
    UTF-8, to a session whose client encoding is UTF-8)."""
    if text is None:
        return "NULL"
    if "\x00" in text:
        raise ConfigurationError(f"an outbox message cannot hold a NUL character: {text[:80]!r}")
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        raise ConfigurationError(
            f"an outbox message holds text that is not valid Unicode ({exc.reason}): {text[:80]!r}"
        ) from None
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"
