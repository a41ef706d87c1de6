"""The Database: one SQLAlchemy 2 async engine, from a URL, tuned per dialect."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from accord.db.clock import ServerClock
from accord.errors import ConfigurationError, DatabaseError, MissingExtraError

__all__ = [
    "CallerErrors",
    "Database",
    "driver_in_transaction",
    "from_the_database_layer",
    "log_retried_failure",
    "on_commit",
    "translate_errors",
    "unreachable",
]

log = logging.getLogger("accord.db")

#: SQLite waits this long for a competing writer before failing with "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 30_000


@contextlib.contextmanager
def translate_errors(what: str, callers: CallerErrors | None = None) -> Any:
    """Re-raise SQLAlchemy/driver errors as :class:`accord.errors.DatabaseError`
    (a value that cannot be bound, such as a NaN in JSON, as ``ValueError``; one of a
    type JSON cannot hold as ``TypeError``).

    An ``OSError`` is taken to mean the database cannot be reached, unless it is
    one that ``callers`` noted as raised by the caller's own code inside a block
    (a ``TimeoutError`` of its ``asyncio.timeout``, a refused HTTP connection):
    that one passes through as it is."""
    try:
        yield
    except sa.exc.StatementError as exc:
        if not isinstance(exc, sa.exc.DBAPIError) and isinstance(exc.orig, ValueError | TypeError):
            # A value SQLAlchemy could not bind (NaN or an object in JSON, a bad
            # UUID): the caller's data, not the database, is wrong.
            error = TypeError if isinstance(exc.orig, TypeError) else ValueError
            raise error(f"{what} failed: a value cannot be stored: {exc.orig}") from exc
        raise DatabaseError(f"{what} failed{_hint(exc)}: {exc.__class__.__name__}: {exc}") from exc
    except sa.exc.SQLAlchemyError as exc:
        raise DatabaseError(f"{what} failed{_hint(exc)}: {exc.__class__.__name__}: {exc}") from exc
    except OSError as exc:
        if callers is not None and callers.raised(exc):
            raise
        raise DatabaseError(f"{what} failed: cannot reach the database ({exc})") from exc
    except Exception as exc:
        if type(exc).__module__.startswith("asyncpg"):  # the driver used directly
            raise DatabaseError(
                f"{what} failed{_hint(exc)}: {exc.__class__.__name__}: {exc}"
            ) from exc
        raise


def _hint(exc: Exception) -> str:
    """What to do, when the error says it: Accord's tables are missing."""
    text = str(exc)
    if "no such table: accord_" in text or (
        'relation "accord_' in text and "does not exist" in text
    ):
        return " (Accord's tables are not there: run `accord db upgrade --db URL` first)"
    return ""


class CallerErrors:
    """The ``OSError`` that the body of a ``with`` block raised, if it raised one.

    Wrap the ``yield`` of a context manager that translates errors in
    :meth:`noting`, and give the same object to :func:`translate_errors`, so that
    the caller's own errors are told from the database's."""

    __slots__ = ("_error",)

    def __init__(self) -> None:
        self._error: OSError | None = None

    @contextlib.contextmanager
    def noting(self) -> Any:
        try:
            yield
        except OSError as exc:
            if not from_the_database_layer(exc):
                self._error = exc
            raise

    def raised(self, exc: OSError) -> bool:
        return exc is self._error


_DATABASE_LAYER = ("sqlalchemy.", "asyncpg.", "aiosqlite.", "sqlite3.")


def from_the_database_layer(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside SQLAlchemy or a driver (a statement's
    ``command_timeout``, a dropped socket), as its traceback shows, rather than by
    the caller's own code."""
    tb = exc.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        if module.startswith(_DATABASE_LAYER):
            return True
        tb = tb.tb_next
    return False


# SQLSTATEs of a server that cannot serve the session now, whatever it was asked:
# connection exceptions (08: the connection failed or is gone), an administrator's or a
# crash's shutdown (57P01, 57P02), a server starting or stopping (57P03, "cannot connect
# now"), no connection slot left (53300).
_UNREACHABLE_STATES = ("08", "57P01", "57P02", "57P03", "53300")


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it came from, says that the database could not be
    reached or went away (a server stopping, starting or restarting, a dropped
    connection), not that what was asked of it failed: something to retry once the
    database is back, never to hold against the work that was under way. An
    ``OSError`` counts only when raised inside SQLAlchemy or the driver, not by the
    caller's own code (a refused HTTP call in a handler), and a ``TimeoutError`` not
    at all."""
    seen: BaseException | None = exc
    for _ in range(50):  # a chain of causes that loops back ends here
        if seen is None:
            return False
        if isinstance(seen, sa.exc.DBAPIError) and seen.connection_invalidated:
            return True
        if isinstance(seen, sa.exc.DisconnectionError):
            return True
        if (
            isinstance(seen, OSError)
            # A statement's timeout is no outage: the same work may time out for ever.
            and not isinstance(seen, TimeoutError)
            and from_the_database_layer(seen)
        ):
            return True
        state = getattr(seen, "sqlstate", None)
        if isinstance(state, str) and state.startswith(_UNREACHABLE_STATES):
            return True
        if type(seen).__name__ == "InterfaceError" and "connection is closed" in str(seen):
            return True  # asyncpg's, for a connection closed under its user
        seen = seen.__cause__ or seen.__context__
    return False


def log_retried_failure(
    logger: logging.Logger, exc: BaseException, message: str, *args: object
) -> None:
    """Log the failure ``exc`` of work that is retried later: with its traceback (a
    bug, a statement that failed), or, when the database could not be reached
    (:func:`unreachable`), as one warning line, so that an outage does not fill the
    log with the same traceback at every retry."""
    if unreachable(exc):
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        logger.warning(message + ": the database is unavailable (%s)", *args, reason)
    else:
        logger.error(message, *args, exc_info=exc)


async def driver_in_transaction(conn: AsyncConnection) -> Any | None:
    """The asyncpg connection under ``conn``, inside the transaction ``conn`` is in.

    For hot paths that send a prepared statement straight to the driver: one
    round trip and no SQLAlchemy statement overhead, in the caller's own
    transaction. SQLAlchemy sends ``BEGIN`` with its first statement; if none went
    yet it is sent now, by SQLAlchemy's own adapter, so the transaction stays
    SQLAlchemy's to commit or roll back. None (use SQLAlchemy) for another
    driver, outside a transaction, or with an adapter this does not know.
    """
    if conn.dialect.name != "postgresql" or not conn.in_transaction():
        return None
    raw = await conn.get_raw_connection()
    driver: Any = raw.driver_connection
    if driver is None or not hasattr(driver, "is_in_transaction"):
        return None
    if driver.is_in_transaction():
        return driver
    adapter: Any = raw.dbapi_connection
    start = getattr(adapter, "_start_transaction", None)
    mutex = getattr(adapter, "_execute_mutex", None)
    if start is None or mutex is None or getattr(adapter, "_transaction", False) is not None:
        return None
    async with mutex:
        await start()
    return driver if adapter._transaction is not None else None


async def driver_outside_transaction(conn: AsyncConnection) -> Any | None:
    """The asyncpg connection under ``conn``, which is in no transaction: each
    statement sent on it commits on its own (one round trip: no ``BEGIN``, no
    ``COMMIT``). None for another driver, or if ``conn`` is in a transaction.
    Only for a connection of one's own: a caller's connection that has sent nothing
    yet is in no transaction either, but expects its next statement to begin one."""
    if conn.dialect.name != "postgresql" or conn.in_transaction():
        return None
    driver: Any = (await conn.get_raw_connection()).driver_connection
    if driver is None or not hasattr(driver, "is_in_transaction") or driver.is_in_transaction():
        return None
    return driver


def on_commit(conn: AsyncConnection, callback: Callable[[], None]) -> None:
    """Call ``callback()`` when the transaction ``conn`` is in commits; forget it if
    that transaction rolls back. For effects of work done in a caller's transaction
    that must not happen unless it commits (metrics, say). It runs as the commit is
    sent, synchronously: keep it small, and it must not raise. Limits: it runs
    just *before* the COMMIT is sent (SQLAlchemy has no event after a successful
    commit), so a COMMIT the server refuses (a deferred constraint, a lost
    connection) still ran it; only the outermost transaction counts (rolling back a
    savepoint alone does not cancel it).
    """
    sync = conn.sync_connection
    if sync is None:
        raise ConfigurationError("on_commit needs a connection that is open")
    pending = _ON_COMMIT.get(sync)
    if pending is None:
        # One pair of listeners per connection, however many transactions it runs
        # (listeners on a connection cannot be removed).
        pending = _ON_COMMIT[sync] = []
        event.listen(sync, "commit", functools.partial(_committed, pending))
        event.listen(sync, "rollback", lambda _conn: pending.clear())
    pending.append(callback)


def _committed(pending: list[Callable[[], None]], _conn: Any) -> None:
    callbacks = pending[:]
    pending.clear()
    for callback in callbacks:
        callback()


# What each open connection runs when its transaction commits; the lists hold no
# reference to their connection, so an entry goes with the connection.
_ON_COMMIT: weakref.WeakKeyDictionary[Connection, list[Callable[[], None]]] = (
    weakref.WeakKeyDictionary()
)


class Database:
    """An Accord database: an async engine plus what the dialect needs.

    ``url`` is a SQLAlchemy URL: ``sqlite+aiosqlite:///path.db`` (the embedded
    default; WAL mode, a busy timeout and ``BEGIN IMMEDIATE`` so writers queue
    instead of failing) or ``postgresql+asyncpg://user@host/db``. Plain
    ``sqlite:///`` and ``postgresql://`` URLs are given their async driver.
    """

    def __init__(self, url: str, *, echo: bool = False, **engine_kwargs: Any) -> None:
        normalized = normalize_url(url)
        parsed = given = _parse_url(normalized)
        self.dialect = parsed.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise ConfigurationError(
                f"unsupported database {self.dialect!r} in URL "
                f"{parsed.render_as_string(hide_password=True)!r}: {_URL_FORMS}"
            )
        if self.dialect == "postgresql":
            try:
                import asyncpg  # noqa: F401
            except ImportError as exc:
                raise MissingExtraError("PostgreSQL", "postgres", "asyncpg") from exc
            parsed = _asyncpg_options(parsed, engine_kwargs)
            engine_kwargs.setdefault("pool_size", 10)
            engine_kwargs.setdefault("max_overflow", 20)
        else:
            database = parsed.database or ""
            if database and database != ":memory:":
                try:
                    Path(database).parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise ConfigurationError(
                        f"cannot create the folder of the SQLite file {database!r}: {exc}"
                    ) from None
            engine_kwargs.setdefault("connect_args", {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        self.url = normalized if parsed is given else parsed.render_as_string(hide_password=False)
        self._connect_args = dict(engine_kwargs.get("connect_args") or {})
        # NaN and the infinities are not JSON: refused on both databases alike (SQLite
        # would store them, and no strict parser reads them back).
        engine_kwargs.setdefault("json_serializer", _strict_json)
        #: The isolation level the engine was given, if any (``outbox_transaction``
        #: begins its transactions at it too).
        self.isolation_level: str | None = engine_kwargs.get("isolation_level") or dict(
            engine_kwargs.get("execution_options") or {}
        ).get("isolation_level")
        try:
            self.engine: AsyncEngine = create_async_engine(self.url, echo=echo, **engine_kwargs)
        except (sa.exc.ArgumentError, sa.exc.InvalidRequestError) as exc:
            raise ConfigurationError(
                f"cannot use this database URL ({exc}): {_URL_FORMS}"
            ) from None
        # The stop() of each live listener: dispose() ends those left running.
        self._listeners: set[Callable[[], Awaitable[None]]] = set()
        #: The server's time as this process reads it: what relays and the SQL
        #: transport write and compare availability and leases with.
        self.clock = ServerClock(self)
        if self.dialect == "sqlite":
            _tune_sqlite(self.engine, autocommit=self.isolation_level == "AUTOCOMMIT")
        elif not engine_kwargs.get("pool_pre_ping"):
            _drop_closed_on_checkout(self.engine)

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """A connection inside a transaction that commits on exit and rolls back on error."""
        callers = CallerErrors()
        with translate_errors("database transaction", callers):
            async with self.engine.begin() as conn:
                with callers.noting():
                    yield conn

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[AsyncConnection]:
        """A connection without an implicit transaction scope (autobegin on first use)."""
        callers = CallerErrors()
        with translate_errors("database statement", callers):
            async with self.engine.connect() as conn:
                with callers.noting():
                    yield conn

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reading only (autobegin on first use). On SQLite its
        transaction begins deferred: it reads a snapshot without taking the file's
        one write lock, so it neither waits for writers nor makes them wait (every
        other transaction begins ``IMMEDIATE``). A write on it may fail at once
        with "database is locked": write through :meth:`transaction`."""
        callers = CallerErrors()
        with translate_errors("database read", callers):
            async with self.engine.connect() as conn:
                if self.is_sqlite:
                    await conn.execution_options(**{_READ_ONLY: True})
                with callers.noting():
                    yield conn

    @contextlib.asynccontextmanager
    async def driver_alone(self) -> AsyncIterator[Any | None]:
        """The asyncpg connection of a pooled connection, in no transaction: each
        statement sent on it commits on its own (one round trip: no ``BEGIN``, no
        ``COMMIT``). None for another driver: use :meth:`transaction`."""
        if self.engine.dialect.driver != "asyncpg":
            yield None
            return
        async with self.connect() as conn:
            yield await driver_outside_transaction(conn)

    async def upgrade(self) -> int:
        """Create or migrate every Accord table; idempotent. Returns the schema version."""
        from accord.db.migrations import upgrade

        return await upgrade(self)

    async def listen(
        self,
        channel: str,
        callback: Callable[[str], None],
        *,
        on_lost: Callable[[], None] | None = None,
    ) -> Callable[[], Awaitable[None]]:
        """PostgreSQL LISTEN on ``channel``; ``callback(payload)`` runs on each NOTIFY.

        Returns an async ``stop()`` that unlistens and releases the connection.
        The connection is held outside the pool for as long as the listener lives;
        ``on_lost()`` runs if it is lost (a server restart, an administrator's
        ``pg_terminate_backend``): the listener hears nothing more, listen again.
        """
        if not self.is_postgres:
            raise ConfigurationError("LISTEN/NOTIFY needs PostgreSQL")

        def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            callback(payload)

        def on_terminated(_conn: Any) -> None:
            if on_lost is not None:
                on_lost()

        with translate_errors(f"listening on {channel!r}"):
            conn = await self.engine.connect()
            try:
                raw = await conn.get_raw_connection()
                driver = raw.driver_connection
                assert driver is not None
                await driver.add_listener(channel, on_notify)
                driver.add_termination_listener(on_terminated)
            except BaseException:
                await conn.close()  # never leave the held connection behind
                raise

        async def stop() -> None:
            self._listeners.discard(stop)
            with contextlib.suppress(Exception):
                driver.remove_termination_listener(on_terminated)
                await driver.remove_listener(channel, on_notify)
            with contextlib.suppress(Exception):
                await conn.close()

        self._listeners.add(stop)
        return stop

    async def connect_driver(self) -> Any:
        """A new asyncpg connection of its own (not pooled, not in a transaction),
        made with the options the engine's connections get (URL and ``connect_args``)."""
        import asyncpg

        _args, options = self.engine.sync_engine.dialect.create_connect_args(make_url(self.url))
        options = {**options, **self._connect_args}
        for sqlalchemys_own in _SQLALCHEMY_CONNECT_ARGS:
            options.pop(sqlalchemys_own, None)
        return await asyncpg.connect(**options)

    async def dispose(self) -> None:
        """Stop the listeners still running and close every pooled connection."""
        for stop in list(self._listeners):
            await stop()
        await self.engine.dispose()

    async def __aenter__(self) -> Database:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.dispose()

    def __repr__(self) -> str:
        return f"Database({make_url(self.url).render_as_string(hide_password=True)!r})"


_URL_FORMS = "use sqlite+aiosqlite:///file.db or postgresql+asyncpg://user@host/db"
# connect_args SQLAlchemy's asyncpg dialect takes for itself, not asyncpg's.
_SQLALCHEMY_CONNECT_ARGS = (
    "prepared_statement_cache_size",
    "prepared_statement_name_func",
    "async_creator_fn",
)
_strict_json = functools.partial(json.dumps, allow_nan=False)
# The execution option that marks a connection of Database.read() (SQLite).
_READ_ONLY = "accord_read_only"
# libpq's names (psycopg URLs, hosting dashboards) for what asyncpg calls otherwise.
_LIBPQ_OPTIONS = {"sslmode": "ssl", "connect_timeout": "timeout"}


def _parse_url(url: str) -> URL:
    try:
        return make_url(url)
    except (sa.exc.ArgumentError, ValueError) as exc:
        raise ConfigurationError(f"cannot parse the database URL ({exc}): {_URL_FORMS}") from None


def _asyncpg_options(parsed: URL, engine_kwargs: dict[str, Any]) -> URL:
    """The URL's query options as asyncpg takes them: libpq's ``sslmode`` and
    ``connect_timeout`` renamed, anything asyncpg does not know refused by name."""
    import asyncpg

    query = dict(parsed.query)
    connect_args = dict(engine_kwargs.get("connect_args") or {})
    for libpq, ours in _LIBPQ_OPTIONS.items():
        if libpq in query:
            value = query.pop(libpq)
            if ours == "timeout":
                try:
                    seconds = float(str(value))
                    # libpq's 0 (or less) is "wait for ever"; asyncpg's is None.
                    connect_args.setdefault(ours, seconds if seconds > 0 else None)
                except ValueError:
                    raise ConfigurationError(
                        f"connect_timeout={value!r} in the database URL is not a number"
                    ) from None
            else:
                query[ours] = value
    known = set(inspect.signature(asyncpg.connect).parameters) | {"prepared_statement_cache_size"}
    unknown = sorted(set(query) - known)
    if unknown:
        raise ConfigurationError(
            f"the database URL has option(s) asyncpg does not take: {', '.join(unknown)}; "
            "pass driver options as Database(url, connect_args={...})"
        )
    if connect_args:
        engine_kwargs["connect_args"] = connect_args
    return parsed.set(query=query)


def normalize_url(url: str) -> str:
    """Give plain ``sqlite://`` / ``postgresql://`` URLs their async driver."""
    if url.startswith("sqlite://") and not url.startswith("sqlite+"):
        return "sqlite+aiosqlite://" + url[len("sqlite://") :]
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    return url


def _drop_closed_on_checkout(engine: AsyncEngine) -> None:
    """Replace a pooled connection the server has closed (a restart, an
    administrator's ``pg_terminate_backend``) before anyone uses it.

    asyncpg notices the server closing the socket while the connection sits in
    the pool, so the check costs no round trip; SQLAlchemy's ``pool_pre_ping``
    costs three per checkout on asyncpg (BEGIN, a ping, ROLLBACK), which is twice
    the work of a one-statement transaction. Pass ``pool_pre_ping=True`` to get it.
    """

    @event.listens_for(engine.sync_engine, "checkout")
    def on_checkout(_dbapi_connection: Any, _record: Any, proxy: Any) -> None:
        driver = proxy.driver_connection
        if driver is not None and driver.is_closed():
            raise sa.exc.DisconnectionError("the server closed this pooled connection")


def _tune_sqlite(engine: AsyncEngine, *, autocommit: bool) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN itself (see below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(conn: Any) -> None:
        # A deferred transaction that later writes can fail with SQLITE_BUSY at
        # once (lock upgrade deadlock) instead of waiting: take the write lock
        # up front so writers queue on the busy timeout. Database.read()'s
        # connections only read: theirs begin deferred. An AUTOCOMMIT connection
        # (the engine's isolation_level, or the connection's) begins nothing: each
        # statement commits on its own, as on PostgreSQL.
        options = conn.get_execution_options()
        level = options.get("isolation_level")
        if level == "AUTOCOMMIT" or (level is None and autocommit):
            return
        if options.get(_READ_ONLY):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
