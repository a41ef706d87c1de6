"""SQL transport on PostgreSQL: a later delivery of a key never overtakes an earlier
one that another transaction holds locked.

The claim skips rows another transaction has locked (``FOR UPDATE SKIP LOCKED``), and
its "an earlier delivery of the key is out" check reads the last *committed* version
of the row. A transport write to an earlier delivery whose lease has run out (a late
lease extension, a late nack, a release) locks the row while its committed state
still says "not out": the claim now reads again without locking and leaves the later
deliveries of that key alone (before, it took them: they overtook)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from accord.db import Database
from accord.db.schema import queue_deliveries
from accord.messages import Message
from accord.transports._sql import _queries as q
from accord.transports._sql._errors import transaction
from accord.transports.sql import SqlTransport

GROUP = "workers"


@pytest.fixture
def channel() -> str:
    return f"susp-{uuid.uuid4().hex[:12]}"


def _now() -> datetime:
    return datetime.now(UTC)


async def _register(db: Database, channel: str) -> None:
    async with transaction(db, "registering") as conn:
        await q.register_group(conn, channel, GROUP, ["#"], _now(), is_postgres=db.is_postgres)


async def _claim(db: Database, channel: str, consumer: str, lease: float) -> list[q.Claimed]:
    """One claim round exactly as SqlSubscription._run does it."""
    async with transaction(db, "claiming deliveries") as conn:
        now = _now()
        return await q.claim(
            conn,
            channel,
            GROUP,
            consumer,
            64,
            now,
            now + timedelta(seconds=lease),
            is_postgres=db.is_postgres,
        )


async def _rows(db: Database, channel: str) -> dict[int, tuple[str | None, str | None, bool]]:
    """seq -> (key, locked_by, lease live) of every delivery of the group."""
    d = queue_deliveries
    async with db.connect() as conn:
        result = await conn.execute(
            sa.select(d.c.seq, d.c.key, d.c.locked_by, d.c.locked_until).where(
                d.c.channel == channel, d.c.group_name == GROUP
            )
        )
        now = _now()
        return {
            int(seq): (key, by, until is not None and until > now) for seq, key, by, until in result
        }


# -- a locked earlier delivery is skipped, and so are the later ones of its key ---------


async def _late_extension(conn: object, channel: str, seq: int) -> None:
    # A's heartbeat, once A wakes from a stall longer than its lease.
    await q.extend_leases(conn, channel, GROUP, "A", [seq], _now() + timedelta(seconds=30))  # type: ignore[arg-type]


async def _late_nack(conn: object, channel: str, seq: int) -> None:
    # A's handler failed after A's lease ran out: redeliver d1 in 5 s.
    await q.nack(conn, GROUP, [seq], "A", _now() + timedelta(seconds=5))  # type: ignore[arg-type]


async def _late_release(conn: object, channel: str, seq: int) -> None:
    # A stops (SqlSubscription.stop) after its lease ran out: d1 is offered again.
    await q.release(conn, channel, GROUP, "A")  # type: ignore[arg-type]


@pytest.mark.postgres
@pytest.mark.parametrize(
    "late_write",
    [_late_extension, _late_nack, _late_release],
    ids=["lease-extension", "nack", "release"],
)
async def test_postgres_a_later_delivery_of_a_key_does_not_overtake_an_earlier_locked_one(
    pg_url: str,
    channel: str,
    late_write: Callable[[object, str, int], Awaitable[None]],
) -> None:
    """A claims d1 (key k) and stalls past its lease; d2 (key k) is published. A
    wakes and writes d1 (extends its lease / nacks it / releases it); while that
    transaction is open (one round trip normally; the whole stall if A's loop
    blocks between its UPDATE and its COMMIT), B claims. B must not get d2 without
    d1: d1 is earlier and about to be out again (leased by A, waiting out a nack
    delay) or offered again (released)."""
    transport = SqlTransport(pg_url, channel=channel)
    await transport.connect()
    db = transport.database
    try:
        await _register(db, channel)
        await transport.publish([Message(type="t.x", key="k", data={"n": 1})])
        a = await _claim(db, channel, "A", lease=0.3)
        assert [c.key for c in a] == ["k"]
        d1 = a[0].seq
        await transport.publish([Message(type="t.x", key="k", data={"n": 2})])
        rows = await _rows(db, channel)
        d2 = max(rows)
        assert d2 > d1 and rows[d2][0] == "k"
        await asyncio.sleep(0.6)  # A stalled: its lease on d1 has run out

        async with db.transaction() as a_conn:
            await late_write(a_conn, channel, d1)  # row lock on d1 held until commit
            b_task = asyncio.create_task(_claim(db, channel, "B", lease=30))
            # Give B's claim time to finish (it does at once on SQL that skips d1);
            # a claim that waits for the lock instead goes on after this commit.
            await asyncio.wait({b_task}, timeout=1.0)
        b = [c.seq for c in await asyncio.wait_for(b_task, 15)]
        rows = await _rows(db, channel)
        assert d2 not in b or d1 in b, (
            f"B claimed d2={d2} (key k) alone while A's open transaction held the "
            f"earlier d1={d1} (key k): d2 overtook d1; deliveries now {rows}"
        )
    finally:
        await transport.close()
