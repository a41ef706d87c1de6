"""Turning database failures into transport errors."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from accord.db import Database
from accord.errors import DatabaseError, TransportError, TransportUnavailable

__all__ = ["is_unavailable", "transaction", "translate"]

_TRANSIENT: tuple[type[BaseException], ...] = (
    sa.exc.OperationalError,  # server gone, "database is locked", too many connections
    sa.exc.InterfaceError,
    sa.exc.DisconnectionError,
    sa.exc.TimeoutError,  # pool exhausted
    OSError,
    TimeoutError,
)


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) means "the database cannot be reached right now"."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, _TRANSIENT):
            return True
        if isinstance(seen, sa.exc.DBAPIError) and seen.connection_invalidated:
            return True
        if type(seen).__module__.startswith("asyncpg") and "Connection" in type(seen).__name__:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextlib.contextmanager
def translate(what: str) -> Iterator[None]:
    """Re-raise database errors as :class:`TransportUnavailable` (cannot reach the
    database: retry later) or :class:`TransportError` (anything else)."""
    try:
        yield
    except (DatabaseError, sa.exc.SQLAlchemyError, OSError) as exc:
        reason = str(exc) if isinstance(exc, DatabaseError) else f"{type(exc).__name__}: {exc}"
        if is_unavailable(exc):
            raise TransportUnavailable(
                f"SQL transport: {what} failed, the database is unavailable ({reason}); "
                "check that it is running and reachable, then retry"
            ) from exc
        raise TransportError(f"SQL transport: {what} failed ({reason})") from exc


@contextlib.asynccontextmanager
async def transaction(db: Database, what: str) -> AsyncIterator[AsyncConnection]:
    """A transaction on ``db`` whose failures surface as transport errors."""
    with translate(what):
        async with db.transaction() as conn:
            yield conn


@contextlib.asynccontextmanager
async def reading(db: Database, what: str) -> AsyncIterator[AsyncConnection]:
    """A read (:meth:`Database.read`) on ``db`` whose failures surface as transport errors."""
    with translate(what):
        async with db.read() as conn:
            yield conn
