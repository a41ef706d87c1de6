"""The SQL transport's claim against a model, over random states of a group.

Whatever the deliveries (keys; leased to another consumer, waiting out a nack
delay, a lease run out, locked right now by another transaction) and however small
the claim (so that PostgreSQL's look-ahead windows fill up and the claim looks
further), a claim:

- leases only deliveries whose delay has passed and that nobody holds;
- leases a keyed delivery only with every earlier delivery of its key;
- leases no more than asked, in seq order;
- leases the first deliveries that may go, in seq order, passing over none;
- leases at least one if any may go — checked when no other transaction holds
  rows (see ``tests/outbox/test_claim.py`` for why).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st
from tests.claims import SETTINGS, Slot, check_claim, claim_deliveries, with_examples

from accord.db import Database
from accord.db.schema import queue, queue_deliveries
from accord.transports._sql import _queries as q

CHANNEL, GROUP = "ch", "workers"


@dataclass(frozen=True)
class Delivery:
    key: str | None
    state: str  # ready | leased (live lease) | expired (lease ran out) | delayed | held


def deliveries(spec: str) -> list[Delivery]:
    """From ``"a a:leased - b:delayed"``: a key (``-`` none) and a state (ready)."""
    out = []
    for word in spec.split():
        key, _, state = word.partition(":")
        out.append(Delivery(None if key == "-" else key, state or "ready"))
    return out


states = st.lists(
    st.builds(
        Delivery,
        key=st.sampled_from([None, "a", "b", "c"]),
        state=st.sampled_from(["ready"] * 5 + ["leased", "expired", "delayed", "held"]),
    ),
    max_size=24,
)


def _out_after_ready(rows: list[tuple[int, Delivery]]) -> bool:
    """A key with a delivery that may go before one that is out: no claim leaves
    that behind, and PostgreSQL's last resort holds such a key back whole."""
    seen: set[str] = set()
    for _, row in rows:
        if row.key is None:
            continue
        if row.state in ("leased", "delayed") and row.key in seen:
            return True
        if row.state in ("ready", "expired"):
            seen.add(row.key)
    return False


def check(rows: list[tuple[int, Delivery]], claimed: list[q.Claimed], limit: int) -> None:
    slots = [
        Slot(seq, r.key, r.state in ("ready", "expired"), r.state == "held") for seq, r in rows
    ]
    check_claim(slots, [c.seq for c in claimed], limit, in_order=not _out_after_ready(rows))


async def fill(
    database: Database, rows: list[Delivery], now: datetime
) -> list[tuple[int, Delivery]]:
    async with database.transaction() as conn:
        await conn.execute(queue_deliveries.delete())
        await conn.execute(queue.delete())
        seqs = []
        for row in rows:
            result = await conn.execute(
                queue.insert().values(
                    channel=CHANNEL,
                    message_id=uuid.uuid4().hex,
                    type="t",
                    key=row.key,
                    headers={},
                    body=b"{}",
                    created_at=now,
                )
            )
            seq = int(result.inserted_primary_key[0])
            seqs.append(seq)
            later, earlier = now + timedelta(hours=1), now - timedelta(minutes=1)
            await conn.execute(
                queue_deliveries.insert().values(
                    seq=seq,
                    group_name=GROUP,
                    channel=CHANNEL,
                    key=row.key,
                    attempts=0,
                    available_at=later if row.state == "delayed" else earlier,
                    locked_until={"leased": later, "expired": earlier}.get(row.state),
                    locked_by="other" if row.state in ("leased", "expired") else None,
                )
            )
        return list(zip(seqs, rows, strict=True))


async def claim(
    database: Database, rows: list[tuple[int, Delivery]], limit: int, now: datetime
) -> list[q.Claimed]:
    """One claim while another transaction holds the ``held`` rows locked (a consumer
    settling or extending them right now)."""
    other = await database.engine.connect() if database.is_postgres else None
    try:
        held = [seq for seq, row in rows if row.state == "held"]
        if other is not None and held:
            await other.begin()
            d = queue_deliveries
            await other.execute(sa.select(d.c.seq).where(d.c.seq.in_(held)).with_for_update())
        claimed = await claim_deliveries(database, CHANNEL, GROUP, limit, now, keep=False)
        return claimed
    finally:
        if other is not None:
            await other.close()


# Shapes a random search finds rarely: a busy key out ahead of other keys, two windows
# of deliveries that cannot go before one that can, a delivery behind its key's
# delivery another transaction holds.
examples = with_examples(
    deliveries,
    [
        ("a:leased a a a b", 1),
        ("a:delayed a b:leased b c", 1),
        ("-:leased -:leased -:delayed -:leased -", 1),
        ("a:held a b", 2),
        ("a:expired a b:leased b", 2),
        ("x a:leased a a x c", 2),
        ("a:held a b c d", 2),
    ],
)


@pytest.mark.postgres
@SETTINGS
@examples
@given(rows=states, limit=st.integers(1, 4))
async def test_a_postgresql_claim_follows_the_model(
    pg_url: str, rows: list[Delivery], limit: int
) -> None:
    async with Database(pg_url) as database:
        now = datetime.now(UTC)
        seqs = await fill(database, rows, now)
        check(seqs, await claim(database, seqs, limit, now), limit)


@SETTINGS
@examples
@given(rows=states, limit=st.integers(1, 4))
async def test_a_sqlite_claim_follows_the_model(
    sqlite_url: str, rows: list[Delivery], limit: int
) -> None:
    """SQLite has one writer: nothing is held by another transaction."""
    rows = [Delivery(r.key, "ready" if r.state == "held" else r.state) for r in rows]
    async with Database(sqlite_url) as database:
        now = datetime.now(UTC)
        seqs = await fill(database, rows, now)
        check(seqs, await claim(database, seqs, limit, now), limit)
