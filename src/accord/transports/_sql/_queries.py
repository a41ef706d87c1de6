"""The SQL transport's statements, one function per thing that happens in the database.

Each function runs on a connection the caller holds inside a transaction, so
the caller decides what commits together. Times are passed in (aware UTC) so
every process compares leases and delays against the same kind of clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from accord.db.schema import queue, queue_deliveries, queue_groups
from accord.db.types import UTCDateTime, rows_of_each, tuple_ids_of_each

__all__ = [
    "Claimed",
    "claim",
    "cleanup",
    "delete_deliveries",
    "extend_leases",
    "insert_deliveries",
    "insert_messages",
    "load_groups",
    "nack",
    "notify",
    "register_group",
    "release",
    "release_unstarted",
]

#: The PostgreSQL NOTIFY channel publishers signal on; the payload is the Accord channel.
NOTIFY_CHANNEL = "accord_queue"

# First key of the two-int advisory lock that serialises claims of one group on
# PostgreSQL ("AQEQ"); the second key is a hash of channel and group.
_CLAIM_LOCK_SPACE = 0x4151_4551

_d = queue_deliveries


@dataclass(frozen=True, slots=True)
class Claimed:
    """A delivery a consumer has just leased, with its message's stored bytes."""

    seq: int
    key: str | None
    attempt: int
    headers: dict[str, str]
    body: bytes


def _insert(is_postgres: bool, table: sa.Table) -> Any:
    return postgresql.insert(table) if is_postgres else sqlite.insert(table)


async def load_groups(conn: AsyncConnection, channel: str) -> list[tuple[str, list[str]]]:
    """Every group registered on ``channel`` with its topic patterns."""
    rows = await conn.execute(
        sa.select(queue_groups.c.group_name, queue_groups.c.patterns).where(
            queue_groups.c.channel == channel
        )
    )
    return [(str(name), [str(p) for p in patterns]) for name, patterns in rows]


async def register_group(
    conn: AsyncConnection,
    channel: str,
    group: str,
    patterns: Sequence[str],
    now: datetime,
    *,
    is_postgres: bool,
) -> list[str]:
    """Register ``group`` on ``channel`` (or widen its patterns); return its patterns.

    A group's patterns only grow, the way a RabbitMQ queue keeps every binding
    it was given: two members of one group subscribing with different topics
    both get what they asked for.
    """
    t = queue_groups
    await conn.execute(
        _insert(is_postgres, t)
        .values(channel=channel, group_name=group, patterns=sorted(set(patterns)), created_at=now)
        .on_conflict_do_nothing(index_elements=["channel", "group_name"])
    )
    select = sa.select(t.c.patterns).where(t.c.channel == channel, t.c.group_name == group)
    if is_postgres:
        select = select.with_for_update()
    current = [str(p) for p in (await conn.scalar(select)) or []]
    merged = sorted(set(current) | set(patterns))
    if merged != sorted(current):
        await conn.execute(
            sa.update(t)
            .where(t.c.channel == channel, t.c.group_name == group)
            .values(patterns=merged)
        )
    return merged


async def insert_messages(
    conn: AsyncConnection, rows: Sequence[dict[str, Any]], *, is_postgres: bool
) -> dict[str, int]:
    """Insert message rows in order; return ``message_id -> seq`` for those stored.

    A message id already stored on the channel is skipped (deduplication while
    its row lives), so it is missing from the result.
    """
    if not rows:
        return {}
    stmt = (
        _insert(is_postgres, queue)
        .on_conflict_do_nothing(index_elements=["channel", "message_id"])
        .returning(queue.c.message_id, queue.c.seq)
    )
    result = await conn.execute(stmt, list(rows))
    return {str(message_id): int(seq) for message_id, seq in result}


async def insert_deliveries(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    """Insert delivery rows (one per group and message)."""
    if rows:
        await conn.execute(sa.insert(_d), list(rows))


async def notify(conn: AsyncConnection, channel: str) -> None:
    """PostgreSQL: wake listeners of ``channel`` when the transaction commits."""
    await conn.execute(
        sa.text("SELECT pg_notify(:name, :payload)"), {"name": NOTIFY_CHANNEL, "payload": channel}
    )


async def claim(
    conn: AsyncConnection,
    channel: str,
    group: str,
    consumer: str,
    limit: int,
    now: datetime,
    until: datetime,
    *,
    is_postgres: bool,
) -> list[Claimed]:
    """Lease up to ``limit`` ready deliveries of ``group`` to ``consumer``, in seq order.

    A delivery is ready when its delay has passed, nobody holds a live lease on
    it, and no earlier delivery with the same key in the group is out (leased
    or waiting out a nack delay): that keeps per-key order with competing
    consumers. Several same-key deliveries may go to one consumer in one claim,
    because it handles them in order. Each claim counts as an attempt, so a
    consumer that keeps dying on a message still raises its ``attempt``.
    """
    if is_postgres:
        # SKIP LOCKED alone lets a claimer skip a row another claimer is taking
        # and take a later row with the same key. Serialising the claims of one
        # group closes that race; claims are short and take whole batches.
        await conn.execute(
            sa.text("SELECT pg_advisory_xact_lock(:space, hashtext(:name))"),
            {"space": _CLAIM_LOCK_SPACE, "name": f"{len(channel)}:{channel}:{group}"},
        )
        rows = await _pick_postgres(conn, channel, group, limit, now)
    else:
        rows = await _pick(conn, channel, group, limit, now, is_postgres=False)
    seqs = [seq for seq, _ in rows]
    if not seqs:
        return []
    # Two statements, not UPDATE ... WHERE seq IN (subquery): PostgreSQL plans that
    # as a hash join over every delivery of the group, which grows with the backlog.
    # On PostgreSQL both reach their rows one key probe each (see rows_of_each):
    # with ``seq IN (...)`` the plan kept from when the table was small scanned the
    # group's deliveries (6 ms at 6,000) and every message (4.7 ms at 6,000).
    if is_postgres:
        lease = {"group": group, "seqs": seqs, "until": until, "consumer": consumer}
        claimed = await conn.execute(_LEASE_POSTGRES, lease)
    else:
        claimed = await conn.execute(
            sa.update(_d)
            .where(_d.c.group_name == group, _d.c.seq.in_(seqs))
            .values(locked_until=until, locked_by=consumer, attempts=_d.c.attempts + 1)
            .returning(_d.c.seq, _d.c.key, _d.c.attempts)
        )
    leased = {int(seq): (key, int(attempts)) for seq, key, attempts in claimed}
    if not leased:
        return []
    bodies = await conn.execute(
        _BODIES_POSTGRES if is_postgres else _BODIES_SQLITE, {"seqs": list(leased)}
    )
    out = []
    for row in bodies:
        key, attempt = leased[int(row.seq)]
        out.append(Claimed(int(row.seq), key, attempt, dict(row.headers), bytes(row.body)))
    out.sort(key=lambda item: item.seq)
    return out


_LEASE_POSTGRES = sa.text(
    "UPDATE accord_queue_deliveries d "
    "SET locked_until = :until, locked_by = :consumer, attempts = d.attempts + 1 FROM "
    + tuple_ids_of_each(
        "accord_queue_deliveries", "seq", "CAST(:seqs AS bigint[])", "t.group_name = :group"
    )
    + " AS found WHERE d.ctid = found.tid RETURNING d.seq, d.key, d.attempts"
).bindparams(sa.bindparam("until", type_=UTCDateTime()))
_BODIES_POSTGRES = rows_of_each(queue, queue.c.seq, "seqs", dialect="postgresql")
_BODIES_SQLITE = rows_of_each(queue, queue.c.seq, "seqs", dialect="sqlite")


async def any_ready(conn: AsyncConnection, channel: str, group: str, now: datetime) -> bool:
    """Whether a delivery of ``group`` is ready (due and unheld): the look an idle
    consumer on SQLite takes through a read, without the file's write lock, which a
    claim takes even when it finds nothing."""
    query = sa.select(sa.literal(1)).where(*_ready(_d, channel, group, now)).limit(1)
    return await conn.scalar(query) is not None


def _ready(c: Any, channel: str, group: str, now: datetime) -> tuple[Any, ...]:
    """A delivery of the group whose delay has passed and that nobody holds."""
    return (
        c.c.channel == channel,
        c.c.group_name == group,
        c.c.available_at <= now,
        sa.or_(c.c.locked_until.is_(None), c.c.locked_until <= now),
    )


async def _pick(
    conn: AsyncConnection,
    channel: str,
    group: str,
    limit: int,
    now: datetime,
    *,
    is_postgres: bool,
) -> list[tuple[int, str | None]]:
    """The first ``limit`` ready deliveries in seq order, each unless an earlier
    delivery of its key is out (one index probe per row: SQLite's plan, and
    PostgreSQL's last resort, where it holds back every key with a delivery out:
    see :func:`_pick_postgres`)."""
    c = _d.alias("candidate")
    ready = _ready(c, channel, group, now)
    if is_postgres:
        # The keys with a delivery out, found in one pass over the group's rows:
        # a probe per row can cost a scan of every earlier row (PostgreSQL's plan
        # once it has statistics for one busy key), which is quadratic.
        o = _d.alias("out")
        out_keys = sa.select(o.c.key).where(
            o.c.channel == channel,
            o.c.group_name == group,
            o.c.key.is_not(None),
            sa.or_(o.c.available_at > now, o.c.locked_until > now),
        )
        passes = sa.or_(c.c.key.is_(None), c.c.key.not_in(out_keys))
    else:
        e = _d.alias("earlier")
        earlier_out = (
            sa.select(sa.literal(1))
            .where(
                e.c.channel == c.c.channel,
                e.c.group_name == c.c.group_name,
                e.c.key == c.c.key,
                e.c.seq < c.c.seq,
                sa.or_(e.c.available_at > now, e.c.locked_until > now),
            )
            .exists()
        )
        passes = sa.or_(c.c.key.is_(None), ~earlier_out)
    picked = sa.select(c.c.seq, c.c.key).where(*ready, passes).order_by(c.c.seq).limit(limit)
    if is_postgres:
        picked = picked.with_for_update(skip_locked=True, of=c)
    rows = [(int(seq), key) for seq, key in (await conn.execute(picked)).all()]
    if is_postgres:
        rows = await _behind_skipped(conn, c, channel, group, rows)
    return rows


# PostgreSQL picks from a window ahead: the group's first :window deliveries in seq
# order after :after, leaving out the keys with a delivery at or before :after that
# this claim did not take (:taken, its picks from the windows looked at already).
# Every earlier delivery of a key in the window is in the window too, or taken, so
# the window alone says which may go: a ready one whose key
# has nothing out before it (bool_and over the key's deliveries so far). Those are
# locked in seq order, skipping rows another transaction holds (a consumer
# settling or extending right now); a key with such a row keeps all its
# deliveries back this time. No plan that depends on statistics: the window's
# deliveries are locked one key probe each, in seq order, until the claim is full
# (a lateral subquery per delivery that the planner cannot merge back; with
# ``seq = ANY(...)`` a connection kept the plan it made while the table was small,
# a scan of the group, as the backlog grew: 3.7 ms at 6,000 deliveries, 0.6 ms
# this way). The last row is one more: how many deliveries the window held and
# where it ended (the others NULL), so the caller knows whether to look further.
_PICK_AHEAD = sa.text(
    """
WITH ahead AS MATERIALIZED (
  SELECT a.seq, a.key,
         a.available_at <= :now AND (a.locked_until IS NULL OR a.locked_until <= :now) AS ready
  FROM accord_queue_deliveries a
  WHERE a.channel = :channel AND a.group_name = :group AND a.seq > :after
    AND (a.key IS NULL OR :after = 0 OR a.key NOT IN (
      SELECT s.key FROM accord_queue_deliveries s
      WHERE s.channel = :channel AND s.group_name = :group AND s.key IS NOT NULL
        AND s.seq <= :after AND NOT (s.seq = ANY(:taken))))
  ORDER BY a.seq LIMIT :window),
open AS (
  SELECT seq, key FROM (
    SELECT seq, key, ready, bool_and(ready) OVER (PARTITION BY key ORDER BY seq) AS clear
    FROM ahead) a
  WHERE ready AND (key IS NULL OR clear)),
candidates AS MATERIALIZED (
  SELECT c.seq, c.key FROM (SELECT seq FROM open ORDER BY seq) w
  CROSS JOIN LATERAL (
    SELECT c.seq, c.key FROM accord_queue_deliveries c
    WHERE c.seq = w.seq AND c.group_name = :group
      AND c.available_at <= :now AND (c.locked_until IS NULL OR c.locked_until <= :now)
    OFFSET 0 FOR UPDATE OF c SKIP LOCKED) c
  ORDER BY w.seq LIMIT :limit),
skipped AS (
  SELECT o.key FROM open o
  WHERE o.key IS NOT NULL AND o.seq < (SELECT max(seq) FROM candidates)
    AND o.seq NOT IN (SELECT seq FROM candidates))
SELECT c.seq, c.key, w.looked_at, w.last_seq, w.locked, w.last_locked
FROM (SELECT count(*) AS looked_at, max(seq) AS last_seq,
             (SELECT count(*) FROM candidates) AS locked,
             (SELECT max(seq) FROM candidates) AS last_locked FROM ahead) w
LEFT JOIN candidates c ON c.key IS NULL OR c.key NOT IN (SELECT key FROM skipped)
ORDER BY c.seq NULLS LAST
"""
).bindparams(
    sa.bindparam("now", type_=UTCDateTime()),
    sa.bindparam("after", type_=sa.BigInteger()),
    sa.bindparam("window", type_=sa.BigInteger()),
    sa.bindparam("limit", type_=sa.BigInteger()),
    sa.bindparam("taken", type_=postgresql.ARRAY(sa.BigInteger())),
)
# How many windows a claim looks at before its last resort; a window is twice the
# claim (room for the deliveries of keys that are out).
_AHEAD_WINDOWS = 2
_AHEAD_FACTOR = 2


async def _pick_postgres(
    conn: AsyncConnection, channel: str, group: str, limit: int, now: datetime
) -> list[tuple[int, str | None]]:
    """Up to ``limit`` deliveries that may go now, locked, in seq order: through up
    to :data:`_AHEAD_WINDOWS` windows, then, if each was full and the claim is still
    short, through :func:`_pick` (one pass over the group's deliveries): a busy key
    that is out never holds back another key, however many deliveries it has."""
    window = max(limit * _AHEAD_FACTOR, 1)
    picked: list[tuple[int, str | None]] = []
    after = 0
    for _ in range(_AHEAD_WINDOWS):
        result = (
            await conn.execute(
                _PICK_AHEAD,
                {
                    "channel": channel,
                    "group": group,
                    "now": now,
                    "after": after,
                    "window": window,
                    "limit": limit - len(picked),
                    "taken": [seq for seq, _ in picked],
                },
            )
        ).all()
        asked = limit - len(picked)
        picked += [(int(r.seq), r.key) for r in result if r.seq is not None]
        meta = result[-1]
        # Deliveries past the last one locked were not looked at if the lock step
        # filled its limit (and then dropped some behind a skipped one).
        filled = meta.locked == asked
        if len(picked) >= limit or (meta.looked_at < window and not filled):
            return picked
        after = int(meta.last_locked if filled else meta.last_seq)
    # This transaction's own locks are not skipped: the last resort takes the
    # window's deliveries again, with more if there are.
    more = await _pick(conn, channel, group, limit, now, is_postgres=True)
    merged = dict(picked + more)
    return [(seq, merged[seq]) for seq in sorted(merged)][:limit]


async def _behind_skipped(
    conn: AsyncConnection,
    c: Any,
    channel: str,
    group: str,
    rows: list[tuple[int, str | None]],
) -> list[tuple[int, str | None]]:
    """PostgreSQL: ``rows`` less those behind an earlier delivery of their key that the
    claim skipped because another transaction held a lock on it (a consumer whose
    lease ran out, extending, nacking or releasing it right now). Its committed row
    still looked ready, so the earlier-delivery check let the later ones through:
    taken, they would overtake it. Read again without locking, it shows up here."""
    keys = {key for _, key in rows if key is not None}
    if not keys:
        return rows
    taken = {seq for seq, _ in rows}
    # Whatever its state now: read in a new statement, a delivery skipped as
    # locked may show a lease its holder committed meanwhile (then it is out).
    earlier = (
        sa.select(c.c.seq, c.c.key)
        .where(
            c.c.channel == channel,
            c.c.group_name == group,
            c.c.key.in_(sorted(keys)),
            c.c.seq < max(taken),
        )
        .order_by(c.c.seq)
    )
    blocked: dict[str, int] = {}  # key -> its first delivery the claim skipped
    for seq, key in (await conn.execute(earlier)).all():
        if int(seq) not in taken:
            blocked.setdefault(key, int(seq))
    if not blocked:
        return rows
    return [
        (seq, key) for seq, key in rows if key is None or key not in blocked or seq < blocked[key]
    ]


async def delete_deliveries(
    conn: AsyncConnection, group: str, seqs: Sequence[int], consumer: str
) -> None:
    """Settle deliveries for good (ack or reject), those ``consumer`` still holds: once
    its lease ran out and another consumer took one, that consumer settles it."""
    if seqs:
        await conn.execute(
            sa.delete(_d).where(
                _d.c.group_name == group, _d.c.seq.in_(list(seqs)), _d.c.locked_by == consumer
            )
        )


async def nack(
    conn: AsyncConnection,
    group: str,
    seqs: Sequence[int],
    consumer: str,
    available_at: datetime,
) -> None:
    """Give deliveries back, offered again from ``available_at``.

    Only those ``consumer`` still holds: once a lease ran out and someone else
    took the delivery, the other consumer's lease wins.
    """
    if seqs:
        await conn.execute(
            sa.update(_d)
            .where(_d.c.group_name == group, _d.c.seq.in_(list(seqs)), _d.c.locked_by == consumer)
            .values(available_at=available_at, locked_until=None, locked_by=None)
        )


async def release(
    conn: AsyncConnection,
    channel: str,
    group: str,
    consumer: str,
    *,
    unstarted: Sequence[int] = (),
) -> None:
    """Give back every delivery ``consumer`` holds in ``group``, offered again at once.

    Those in ``unstarted`` never reached a handler, so their claim is not
    counted as an attempt.
    """
    base = sa.update(_d).where(
        _d.c.channel == channel, _d.c.group_name == group, _d.c.locked_by == consumer
    )
    if unstarted:
        await conn.execute(
            base.where(_d.c.seq.in_(list(unstarted))).values(
                locked_until=None, locked_by=None, attempts=_d.c.attempts - 1
            )
        )
    await conn.execute(base.values(locked_until=None, locked_by=None))


async def release_unstarted(
    conn: AsyncConnection, channel: str, group: str, consumer: str, seqs: Sequence[int]
) -> None:
    """Give back only ``seqs`` (held by ``consumer``, never handed to a handler)."""
    if seqs:
        await conn.execute(
            sa.update(_d)
            .where(
                _d.c.channel == channel,
                _d.c.group_name == group,
                _d.c.locked_by == consumer,
                _d.c.seq.in_(list(seqs)),
            )
            .values(locked_until=None, locked_by=None, attempts=_d.c.attempts - 1)
        )


async def extend_leases(
    conn: AsyncConnection,
    channel: str,
    group: str,
    consumer: str,
    seqs: Sequence[int],
    until: datetime,
) -> None:
    """Push out the lease of the deliveries ``seqs`` that ``consumer`` still holds."""
    if seqs:
        await conn.execute(
            sa.update(_d)
            .where(
                _d.c.channel == channel,
                _d.c.group_name == group,
                _d.c.locked_by == consumer,
                _d.c.seq.in_(list(seqs)),
            )
            .values(locked_until=until)
        )


async def cleanup(
    conn: AsyncConnection, channel: str, limit: int, after: int = 0
) -> tuple[int, int]:
    """Delete up to ``limit`` message rows of ``channel`` past seq ``after`` that no
    delivery needs any more. Returns how many went and the seq to go on after.

    A round goes on from where its last batch ended: the rows still needed at the
    front (a group lagging behind) are walked past once a round, not once a batch.
    The seqs are read first and deleted by value: a DELETE ... IN (subquery) is
    planned by PostgreSQL as a hash join over the channel's every row.
    """
    q = queue.alias("done")
    unused = (
        sa.select(q.c.seq)
        .where(
            q.c.channel == channel,
            q.c.seq > after,
            ~sa.select(sa.literal(1)).where(_d.c.seq == q.c.seq).exists(),
        )
        .order_by(q.c.seq)
        .limit(limit)
    )
    seqs = [int(seq) for seq in (await conn.execute(unused)).scalars()]
    if not seqs:
        return 0, after
    await conn.execute(sa.delete(queue).where(queue.c.seq.in_(seqs)))
    return len(seqs), seqs[-1]
