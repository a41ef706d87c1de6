"""Hosts whose clocks differ, played in one process: each "host" has its own Database
(the ``host`` fixture, in ``tests/conftest.py``), and a host's clock is off by giving
its Database a ``ServerClock`` reading a skewed local clock (:func:`clock_of`) or by
patching the ``datetime`` a module reads (:func:`skew`)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from accord.db import Database, ServerClock

SKEW = timedelta(seconds=30)


def skewed_datetime(skew: timedelta) -> type[datetime]:
    """A ``datetime`` whose ``now()`` is ``skew`` off the real clock."""

    class Skewed(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return datetime.now(tz) + skew

    return Skewed


def skew(monkeypatch: pytest.MonkeyPatch, offset: timedelta, *modules: str) -> None:
    """The local clock, as the code of ``modules`` reads it, is ``offset`` off."""
    for module in modules:
        monkeypatch.setattr(f"{module}.datetime", skewed_datetime(offset))


def ahead(offset: timedelta) -> Callable[[], datetime]:
    """A local clock ``offset`` ahead of the real one (behind if negative)."""
    return lambda: datetime.now(UTC) + offset


def clock_of(database: Database, offset: timedelta) -> None:
    """``database``'s host has a clock ``offset`` off the real one."""
    database.clock = ServerClock(database, local=ahead(offset))


async def server_now(database: Database) -> datetime:
    """The database server's time now."""
    async with database.connect() as conn:
        found = await conn.scalar(sa.text("SELECT clock_timestamp()"))
    assert isinstance(found, datetime)
    return found
