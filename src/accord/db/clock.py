"""The database server's time, as one process reads it.

Relays, SQL-transport consumers and producers on several hosts compare times they
wrote into one database: when a row may be taken (``available_at``), until when a
lease holds (``locked_until``). Each reading its own clock, hosts whose clocks
differ by seconds delay each other's messages or cut each other's leases short by
that much. A :class:`ServerClock` reads the process's clock plus an offset it
measured against the PostgreSQL server, so every process writes and compares
server time, however far apart the hosts' clocks are. On SQLite (one host) it is
the process's clock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from prometheus_client import Gauge

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

    from accord.db.database import Database

__all__ = ["ServerClock"]

log = logging.getLogger("accord.db")

#: Seconds between two measures of the offset.
RESYNC_INTERVAL = 300.0
#: Seconds before a measure that failed is tried again.
RETRY_INTERVAL = 5.0
#: Seconds a measure may take (a server out of reach must not hold a loop up).
SYNC_TIMEOUT = 5.0
# Round trips per measure: the one that took least time is kept (the server read
# its clock somewhere inside the round trip; the shorter it, the closer the mid-point).
_SAMPLES = 3
# An offset this large is worth a warning: the hosts' clocks need fixing.
_WARN_OFFSET = timedelta(seconds=1)
# The local clock moved this much more or less than the monotonic one since the last
# measure: it was set (stepped by NTP or by hand, or the host slept), and the offset
# no longer holds.
_JUMP = 0.5


CLOCK_OFFSET = Gauge(
    "accord_db_clock_offset_seconds",
    "The database server's clock minus this host's, as last measured (PostgreSQL); "
    "alert on a large value: the hosts' clocks need fixing.",
    ["database"],
)


def _local_now() -> datetime:
    return datetime.now(UTC)


class ServerClock:
    """``now()`` is the server's time: the local clock (``local``) plus the offset
    :meth:`sync` measured (on PostgreSQL: ``clock_timestamp()`` against the
    mid-point of the round trip, the best of three). Components call
    :meth:`sync_if_due` from their loops; it measures once, then every five minutes,
    and keeps the last offset if the server cannot be reached (trying again five
    seconds later). Until a first measure succeeds, callers wait for it. If the
    local clock is set meanwhile (it moved half a second more or less than the
    monotonic clock since the measure), the next call measures again at once."""

    def __init__(self, database: Database, *, local: Callable[[], datetime] = _local_now) -> None:
        self.database = database
        self._local = local
        self.offset = timedelta(0)
        self._synced = False  # whether a measure ever succeeded
        self._due = 0.0  # event loop time of the next measure
        self._lock = asyncio.Lock()
        # (local, monotonic) clocks read together at the last measure
        self._anchor: tuple[datetime, float] | None = None

    def now(self) -> datetime:
        """The server's time now, as far as this process can tell."""
        return self._local() + self.offset

    def sql_now(self) -> Any:
        """The server's time in a statement that writes it: ``now()`` on PostgreSQL
        (exact, no offset needed); on SQLite (one host) the local clock."""
        return sa.func.now() if self.database.is_postgres else self._local()

    async def sync_if_due(self, conn: AsyncConnection | None = None) -> None:
        """Measure the offset if it never was, or five minutes ago (PostgreSQL only).
        Callers that come while the first measure is under way wait for it; once
        one succeeded, they go on with the last offset while another is taken. A
        failure is logged, the last offset kept, and the measure tried again five
        seconds later. ``conn``: measure on it (a caller inside a transaction, which
        holds a connection of the pool), unbounded in time like its other statements."""
        if not self.database.is_postgres:
            return
        loop = asyncio.get_running_loop()
        if self._jumped():
            self._due = 0.0
        if loop.time() < self._due or (self._synced and self._lock.locked()):
            return
        async with self._lock:
            if loop.time() < self._due:
                return  # measured while this caller waited
            try:
                if conn is not None:
                    await self.sync(conn)
                else:
                    async with asyncio.timeout(SYNC_TIMEOUT):
                        await self.sync()
            except Exception as exc:
                self._due = loop.time() + RETRY_INTERVAL
                log.warning(
                    "could not read the database server's clock (%s); %s",
                    exc,
                    "keeping the last offset" if self._synced else "using this host's",
                )
                return
            self._synced = True
            self._due = loop.time() + RESYNC_INTERVAL

    def _jumped(self) -> bool:
        """Whether the local clock was set since the last measure."""
        if self._anchor is None:
            return False
        local, monotonic = self._anchor
        moved = (self._local() - local).total_seconds() - (time.monotonic() - monotonic)
        if abs(moved) < _JUMP:
            return False
        log.warning(
            "this host's clock was set %+.3f s since the database server's was read; "
            "reading it again",
            moved,
        )
        self._anchor = None  # warn once; the measure sets it again
        return True

    async def sync(self, conn: AsyncConnection | None = None) -> timedelta:
        """Measure the offset of the server's clock from the local one now (on ``conn``
        if given); return it."""
        if not self.database.is_postgres:
            return self.offset
        if conn is None:
            async with self.database.connect() as own:
                return await self._measure(own)
        return await self._measure(conn)

    async def _measure(self, conn: AsyncConnection) -> timedelta:
        # (round trip, offset, the local and monotonic clocks when it was sent). The
        # round trip is timed on the monotonic clock: a step of the local one during
        # a measure must not make a sample look the fastest; a step after the kept
        # sample was sent shows at the next call (_jumped).
        best: tuple[float, timedelta, tuple[datetime, float]] | None = None
        for _ in range(_SAMPLES):
            sent_at, sent = time.monotonic(), self._local()
            server = await conn.scalar(_CLOCK)
            trip = time.monotonic() - sent_at
            assert isinstance(server, datetime)
            offset = server - (sent + timedelta(seconds=trip / 2))
            if best is None or trip < best[0]:
                best = trip, offset, (sent, sent_at)
        assert best is not None
        if abs(best[1]) >= _WARN_OFFSET and abs(best[1] - self.offset) >= _WARN_OFFSET:
            log.warning(
                "this host's clock is %.3f s %s the database server's; Accord uses the "
                "server's time for availability and leases, but fix the clocks (NTP)",
                abs(best[1].total_seconds()),
                "behind" if best[1] > timedelta(0) else "ahead of",
            )
        self.offset = best[1]
        self._anchor = best[2]
        CLOCK_OFFSET.labels(self._label).set(self.offset.total_seconds())
        return self.offset

    @property
    def _label(self) -> str:
        url = self.database.engine.url
        return f"{url.host or ''}:{url.port or ''}/{url.database or ''}"


_CLOCK = sa.text("SELECT clock_timestamp()")
