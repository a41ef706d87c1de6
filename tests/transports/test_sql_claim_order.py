"""SQL transport claim on PostgreSQL: deliveries are handed out in publish order.

Each test builds a group's deliveries directly in the table and runs one claim:
a claim does not hand out a later delivery while leaving an earlier one that could
go (past its look-ahead window's first keys, past rows its lock step dropped), and
its last resort does not let a later delivery of a key overtake an earlier one
whose holder commits between the last resort's two statements.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from tests.claims import claim_deliveries

from accord.db import Database
from accord.db.schema import queue, queue_deliveries
from accord.transports._sql import _queries as q

CHANNEL, GROUP = "ch", "workers"


async def fill(database: Database, spec: str, now: datetime) -> list[int]:
    """Deliveries from ``"x a:leased a"``: a key (``-`` none) and a state: ready
    (the default), leased (live lease of "other"), expired (lease of "other" ran
    out), delayed (nacked, back in an hour). Returns their seqs in order."""
    later, earlier = now + timedelta(hours=1), now - timedelta(minutes=1)
    seqs = []
    async with database.transaction() as conn:
        for word in spec.split():
            key, _, state = word.partition(":")
            key_or_none = None if key == "-" else key
            result = await conn.execute(
                queue.insert().values(
                    channel=CHANNEL,
                    message_id=uuid.uuid4().hex,
                    type="t",
                    key=key_or_none,
                    headers={},
                    body=b"{}",
                    created_at=now,
                )
            )
            seq = int(result.inserted_primary_key[0])
            seqs.append(seq)
            await conn.execute(
                queue_deliveries.insert().values(
                    seq=seq,
                    group_name=GROUP,
                    channel=CHANNEL,
                    key=key_or_none,
                    attempts=0,
                    available_at=later if state == "delayed" else earlier,
                    locked_until={"leased": later, "expired": earlier}.get(state),
                    locked_by="other" if state in ("leased", "expired") else None,
                )
            )
    return seqs


async def claim(database: Database, limit: int, now: datetime) -> list[int]:
    return [c.seq for c in await claim_deliveries(database, CHANNEL, GROUP, limit, now)]


async def test_a_claim_takes_the_next_delivery_of_a_key_it_takes_before_later_keys(
    db_url: str,
) -> None:
    """x1 can go; a2 is leased, so a3 and a4 wait; x5 can go with x1 (same claim,
    handled in order); c6 can go. A claim of 2 must lease x1 and x5, the first two
    that may go (SQLite does). PostgreSQL's second window leaves out every key seen
    in the first window, x included although x1 is being claimed right now, so it
    leases x1 and c6: c6 is handed out before x5, which could go (not publish
    order, and even a lone consumer gets c6 before x5)."""
    async with Database(db_url) as database:
        now = datetime.now(UTC)
        x1, _a2, _a3, _a4, x5, c6 = await fill(database, "x a:leased a a x c", now)
        got = await claim(database, 2, now)
        assert got == [x1, x5], f"leased {got}; x5={x5} could go before c6={c6}"


@pytest.mark.postgres
async def test_postgres_a_skipped_key_does_not_make_the_claim_jump_over_a_ready_delivery(
    pg_url: str,
) -> None:
    """Another transaction holds a1 locked (a consumer whose lease ran out is
    extending or releasing it right now). a2 must wait; b3 and c4 can go. The first
    window (4 deliveries for a claim of 2) locks a2 and b3, drops a2 (behind the
    skipped a1) and keeps b3; it never looked at c4, which lay past the lock limit.
    The second window starts after c4, so the claim leases b3 and d5 and jumps over
    c4, a ready delivery nobody holds: d5 is handed out before c4."""
    async with Database(pg_url) as database:
        now = datetime.now(UTC)
        a1, _a2, b3, c4, d5 = await fill(database, "a:expired a b c d", now)
        other = await database.engine.connect()
        try:
            await other.begin()
            d = queue_deliveries
            await other.execute(sa.select(d.c.seq).where(d.c.seq == a1).with_for_update())
            got = await claim(database, 2, now)
        finally:
            await other.close()
        assert d5 not in got or c4 in got, (
            f"leased {got}: d5={d5} went while c4={c4} (ready, unlocked) was left behind"
        )
        assert b3 in got


@pytest.mark.postgres
async def test_postgres_last_resort_does_not_overtake_an_earlier_delivery_extended_meanwhile(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Consumer "other" leased k1 and stalled past its lease; it now extends the
    lease (its UPDATE holds k1 locked, not committed). z1 is leased live and z2 waits
    behind it, so both look-ahead windows of a claim of 1 fill up without a pick
    (the second drops k2, behind the locked k1) and the claim falls back to _pick.
    _pick skips k1 (locked) and takes k2 (this claim's own lock from the window);
    _behind_skipped is meant to drop it, but it reads k1 again in a new statement:
    if the extension commits in between (READ COMMITTED; forced here), k1 reads as
    leased (not "ready"), so k2 is not dropped and is leased while "other" holds k1.
    Pre-existing in the old single-path claim; still there in the last resort."""
    async with Database(pg_url) as database:
        now = datetime.now(UTC)
        _z1, _z2, k1, k2 = await fill(database, "z:leased z k:expired k", now)
        other = await database.engine.connect()
        try:
            await other.begin()
            await q.extend_leases(other, CHANNEL, GROUP, "other", [k1], now + timedelta(minutes=5))

            original: Callable[..., Awaitable[Any]] = q._behind_skipped

            async def commit_first(*args: Any, **kwargs: Any) -> Any:
                if other.in_transaction():
                    await other.commit()  # the extension lands between the statements
                return await original(*args, **kwargs)

            monkeypatch.setattr(q, "_behind_skipped", commit_first)
            got = await claim(database, 1, now)
        finally:
            await other.close()
        d = queue_deliveries
        async with database.connect() as conn:
            result = await conn.execute(
                sa.select(d.c.seq, d.c.locked_by).where(d.c.seq.in_([k1, k2]))
            )
            holders = {int(seq): by for seq, by in result}
        assert k2 not in got, (
            f"leased k2={k2} to {holders[k2]!r} while k1={k1} (same key, earlier) "
            f"is leased to {holders[k1]!r}"
        )
