"""The relay's SQL: claim the next publishable rows, then settle them.

A claimed row is *leased* by moving its ``available_at`` past the lease time;
other relays only claim rows whose ``available_at`` has passed, so a relay that
dies mid-publish leaves its rows to be claimed again when the lease runs out.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from accord.db.database import driver_in_transaction
from accord.db.types import JSONType, UTCDateTime, json_text, tuple_ids_of_each
from accord.errors import ConfigurationError

__all__ = [
    "ClaimedRow",
    "NotJson",
    "Settlement",
    "any_due",
    "claim",
    "claim_on_driver",
    "release_scheduled",
    "settle",
    "settle_on_driver",
]

log = logging.getLogger("accord.outbox.relay")

# How long giving back the rows of an unfinished claim may take.
_GIVE_BACK_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class NotJson:
    """A stored value that is not JSON (SQLite keeps any text written to a JSON
    column by hand) and why it could not be read."""

    text: str
    error: str


@dataclass(frozen=True, slots=True)
class ClaimedRow:
    seq: int
    id: str
    event_type: str
    key: str | None
    #: The stored headers as they decode: an object if the row is sound, else any
    #: JSON value, or :class:`NotJson`. The relay dead-letters a row that has no
    #: object here rather than failing the claim of its whole batch.
    headers: Any
    payload: bytes
    retry_count: int


@dataclass(frozen=True, slots=True)
class Settlement:
    """What happened to one claimed row: SENT, back to PENDING at ``available_at``, or DEAD."""

    seq: int
    status: str
    available_at: datetime
    retry_count: int
    last_error: str | None


# The claim that looks at every due row: the batch's worth of due rows in seq
# order, leaving out the rows of a key whose first PENDING row is not due (in
# backoff, or leased by another relay): they could not go out, and taking their
# places would starve every other key meanwhile. The key's head is one index probe
# (ordered by (key, seq), so that the planner takes the key's index whatever it
# guesses of the key's share of the rows); on PostgreSQL a lateral join lets it
# remember each key's head (Memoize), so a blocked backlog of 200,000 rows costs a
# scan of them, not a probe each. PostgreSQL plans that only once it has
# statistics for the table (up to a minute after a bulk load): it is the relay's
# last resort there, after the look-ahead windows below.
_HEAD = """
SELECT h.available_at FROM accord_outbox h
WHERE h.key = c.key AND h.status = 'PENDING'
ORDER BY h.key, h.seq LIMIT 1"""
_CANDIDATES = f"""
SELECT c.seq, c.key FROM accord_outbox c
WHERE c.status = 'PENDING' AND c.available_at <= :now
  AND (c.key IS NULL OR ({_HEAD}) <= :now)
ORDER BY c.seq
LIMIT :limit
"""
_CANDIDATES_POSTGRES = f"""
SELECT c.seq, c.key FROM accord_outbox c
LEFT JOIN LATERAL ({_HEAD}) head ON true
WHERE c.status = 'PENDING' AND c.available_at <= :now
  AND (c.key IS NULL OR head.available_at <= :now)
ORDER BY c.seq
LIMIT :limit
"""

# A row may go out only if no earlier row with the same key is still PENDING —
# unless that earlier row is in this very claim (then it goes out first). This
# holds while the earlier row waits in backoff, and across relay processes: a row
# leased or locked by another relay is PENDING too. Per key of the claim, its first
# PENDING row outside the claim is found once (not once per row: a key's backlog
# would make that quadratic); the claim's rows of that key from there on wait.
_BLOCKERS = """
blockers AS {materialized}(
  SELECT k.key, (
    SELECT e.seq FROM accord_outbox e
    WHERE e.key = k.key AND e.status = 'PENDING'
      AND e.seq NOT IN (SELECT seq FROM candidates)
    ORDER BY e.key, e.seq LIMIT 1) AS first_out
  FROM (SELECT DISTINCT key FROM candidates WHERE key IS NOT NULL) k)
"""

_ELIGIBLE = """
SELECT o.seq, o.id, o.event_type, o.key, o.headers, {payload} AS payload, o.retry_count
FROM candidates c
JOIN accord_outbox o ON o.seq = c.seq
LEFT JOIN blockers b ON b.key = c.key
WHERE b.first_out IS NULL OR o.seq < b.first_out
ORDER BY o.seq
"""

# PostgreSQL's claim (asyncpg, $1 = now, $2 = limit) looks ahead at a window: the
# first $3 PENDING rows in seq order after seq $4, leaving out the keys that have a
# PENDING row at or before $4 that this claim did not take ($5, the seqs it took in
# the windows looked at already). Every earlier PENDING row of a key in the window
# is in the window too, or taken, so the window alone says which of its rows may go
# out: a due row whose key has nothing undue before it
# (bool_and over the key's rows so far). Those are locked in seq order, skipping
# rows another relay holds; a key with such a row keeps all its rows back this
# time. No join whose plan depends on statistics: the window's rows are locked
# (and read whole) one index probe each, in seq order, until the batch is full (a
# lateral subquery per row; ``OFFSET`` keeps the planner from merging it back),
# and keys are looked up in hashes: a few milliseconds on a table loaded a second
# ago as on one analyzed. (Fetched by ``seq = ANY(...)`` instead, a connection kept
# the plan it made while the table was small, a scan of it, as the table grew with
# sent rows: 2 ms a claim at 6,000 rows, 0.4 ms this way.) The last row is one
# more: how many rows the window held and where it ended (every other column
# NULL), so the caller knows whether to look further.
_AHEAD = """
ahead AS MATERIALIZED (
  SELECT a.seq, a.key, a.available_at <= $1 AS due FROM accord_outbox a
  WHERE a.status = 'PENDING' AND a.seq > $4
    AND (a.key IS NULL OR $4 = 0 OR a.key NOT IN (
      SELECT s.key FROM accord_outbox s
      WHERE s.status = 'PENDING' AND s.key IS NOT NULL AND s.seq <= $4
        AND NOT (s.seq = ANY($5::bigint[]))))
  ORDER BY a.seq LIMIT $3),
open AS (
  SELECT seq, key FROM (
    SELECT seq, key, due, bool_and(due) OVER (PARTITION BY key ORDER BY seq) AS clear
    FROM ahead) a
  WHERE due AND (key IS NULL OR clear)),
candidates AS MATERIALIZED (
  SELECT c.* FROM (SELECT seq FROM open ORDER BY seq) w
  CROSS JOIN LATERAL (
    SELECT c.seq, c.id, c.event_type, c.key, c.headers, c.payload::text AS payload,
           c.retry_count
    FROM accord_outbox c
    WHERE c.seq = w.seq AND c.status = 'PENDING' AND c.available_at <= $1
    OFFSET 0 FOR UPDATE OF c SKIP LOCKED) c
  ORDER BY w.seq LIMIT $2),
skipped AS (
  SELECT o.key FROM open o
  WHERE o.key IS NOT NULL AND o.seq < (SELECT max(seq) FROM candidates)
    AND o.seq NOT IN (SELECT seq FROM candidates)),
eligible AS MATERIALIZED (
  SELECT * FROM candidates WHERE key IS NULL OR key NOT IN (SELECT key FROM skipped))
"""
_AHEAD_RESULT = """
SELECT e.*, w.looked_at, w.last_seq, w.locked, w.last_locked
FROM (SELECT count(*) AS looked_at, max(seq) AS last_seq,
             (SELECT count(*) FROM candidates) AS locked,
             (SELECT max(seq) FROM candidates) AS last_locked FROM ahead) w
LEFT JOIN eligible e ON true
ORDER BY e.seq NULLS LAST
"""
_CLAIM_AHEAD_DRIVER = f"WITH {_AHEAD} {_AHEAD_RESULT}"
# Claim and lease in one statement ($6 = the lease's end): sent on its own, outside
# any transaction, it is one round trip and its own short transaction.
_CLAIM_AHEAD_AND_LEASE_DRIVER = (
    f"WITH {_AHEAD}, leased AS (UPDATE accord_outbox o SET available_at = $6 "
    f"FROM eligible e WHERE o.seq = e.seq) {_AHEAD_RESULT}"
)
# How many windows a claim looks at before it falls back to the claim over every
# due row; a window is twice the batch (room for the batch another relay holds).
AHEAD_WINDOWS = 2
AHEAD_FACTOR = 2


def _claimed(
    sql: str, *params: sa.BindParameter[Any], raw_headers: bool = False
) -> sa.TextualSelect:
    """``sql`` returning claimed rows; the payload comes back as JSON text: it is
    published as it is, never parsed. ``raw_headers``: the headers come back as the
    text stored, for :func:`_headers` to decode row by row."""
    json_type: Any = sa.String() if raw_headers else JSONType
    return (
        sa.text(sql)
        .bindparams(sa.bindparam("now", type_=UTCDateTime()), *params)
        .columns(
            sa.column("seq", sa.BigInteger()),
            sa.column("id", sa.Uuid()),
            sa.column("event_type", sa.String()),
            sa.column("key", sa.String()),
            sa.column("headers", json_type),
            sa.column("payload", sa.String()),
            sa.column("retry_count", sa.Integer()),
        )
    )


# SQLite: one writer at a time, nothing to skip; the lease is a second statement.
_CLAIM_SQLITE = _claimed(
    f"WITH candidates AS ({_CANDIDATES}), {_BLOCKERS.format(materialized='')} "
    f"{_ELIGIBLE.replace('{payload}', 'o.payload')}",
    raw_headers=True,
)

# PostgreSQL: the rows stay locked until the caller's transaction ends; a relay that
# keeps it open while it publishes them writes no lease (claims="lock"). Blockers
# are materialized: computed once per key whatever the planner guesses.
_PG_BLOCKERS = _BLOCKERS.format(materialized="MATERIALIZED ")
_CLAIM_POSTGRES = _claimed(
    f"WITH candidates AS ({_CANDIDATES_POSTGRES} FOR UPDATE OF c SKIP LOCKED), {_PG_BLOCKERS} "
    f"{_ELIGIBLE.replace('{payload}', 'o.payload::text')}"
)

# The claim over every due row sent to asyncpg ($1 = now, $2 = limit).
_CLAIM_POSTGRES_DRIVER = (
    f"WITH candidates AS ({_CANDIDATES_POSTGRES.replace(':now', '$1').replace(':limit', '$2')} "
    f"FOR UPDATE OF c SKIP LOCKED), {_PG_BLOCKERS} "
    f"{_ELIGIBLE.replace('{payload}', 'o.payload::text')}"
)
# The same, leasing the rows ($3 = the lease's end).
_CLAIM_AND_LEASE_DRIVER = (
    f"WITH candidates AS ({_CANDIDATES_POSTGRES.replace(':now', '$1').replace(':limit', '$2')} "
    f"FOR UPDATE OF c SKIP LOCKED), {_PG_BLOCKERS}, "
    f"eligible AS MATERIALIZED ({_ELIGIBLE.replace('{payload}', 'o.payload::text')}), "
    "leased AS (UPDATE accord_outbox o SET available_at = $3 FROM eligible e "
    "WHERE o.seq = e.seq) "
    "SELECT * FROM eligible ORDER BY seq"
)

# A leased row is settled only while the lease is still this relay's: after it
# ran out another relay may have claimed the row (its lease, its outcome).
_STILL_HELD_DRIVER = " AND ($3::timestamptz IS NULL OR (status = 'PENDING' AND available_at = $3))"
# The rows are found one index probe each and updated by their tuple ids: with
# ``WHERE seq = ANY($2)`` a connection kept the plan it made while the table was
# small, a scan of it, as the table grew with sent rows (1.7 ms at 6,000 rows).
_MARK_SENT_DRIVER = (
    "UPDATE accord_outbox SET status = 'SENT', sent_at = $1, last_error = NULL FROM "
    + tuple_ids_of_each("accord_outbox", "seq", "$2::bigint[]")
    + " AS found WHERE accord_outbox.ctid = found.tid"
    + _STILL_HELD_DRIVER
)
# A row given back without an error of its own (held behind its key, a cancelled
# round, an expired lease) keeps the error of its last failed attempt.
_RESCHEDULE_DRIVER = (
    "UPDATE accord_outbox SET status = $2, available_at = $3, retry_count = $4, "
    "last_error = COALESCE($5, last_error) WHERE seq = $1"
    " AND ($6::timestamptz IS NULL OR (status = 'PENDING' AND available_at = $6))"
)

_LEASE = sa.text("UPDATE accord_outbox SET available_at = :until WHERE seq IN :seqs").bindparams(
    sa.bindparam("seqs", expanding=True), sa.bindparam("until", type_=UTCDateTime())
)
_STILL_HELD = " AND status = 'PENDING' AND available_at = :held_until"
_MARK_SENT = sa.text(
    "UPDATE accord_outbox SET status = 'SENT', sent_at = :now, last_error = NULL WHERE seq IN :seqs"
).bindparams(sa.bindparam("seqs", expanding=True), sa.bindparam("now", type_=UTCDateTime()))
_MARK_SENT_HELD = sa.text(_MARK_SENT.text + _STILL_HELD).bindparams(
    sa.bindparam("seqs", expanding=True),
    sa.bindparam("now", type_=UTCDateTime()),
    sa.bindparam("held_until", type_=UTCDateTime()),
)
_RESCHEDULE = sa.text(
    "UPDATE accord_outbox SET status = :status, available_at = :available_at, "
    "retry_count = :retry_count, last_error = COALESCE(:last_error, last_error) WHERE seq = :seq"
).bindparams(sa.bindparam("available_at", type_=UTCDateTime()))
_RESCHEDULE_HELD = sa.text(_RESCHEDULE.text + _STILL_HELD).bindparams(
    sa.bindparam("available_at", type_=UTCDateTime()),
    sa.bindparam("held_until", type_=UTCDateTime()),
)


async def claim(
    conn: AsyncConnection, *, now: datetime, lease_until: datetime | None, limit: int
) -> list[ClaimedRow]:
    """Claim up to ``limit`` rows that may be published now, in ``seq`` order.

    With ``lease_until`` the rows are leased until then (moved past it) and the
    transaction may end at once; SQLite (one writer at a time) always needs it.
    Without it (PostgreSQL only) they are locked (``FOR UPDATE SKIP LOCKED``)
    until ``conn``'s transaction ends: keep it open until they are settled.
    """
    if lease_until is None and conn.dialect.name != "postgresql":
        raise ConfigurationError("only PostgreSQL can hold a claim by locking; give lease_until")
    driver = await driver_in_transaction(conn)
    if driver is not None:
        return await _claim_ahead(driver, now=now, lease_until=lease_until, limit=limit)
    query = _CLAIM_POSTGRES if conn.dialect.name == "postgresql" else _CLAIM_SQLITE
    rows = list((await conn.execute(query, {"now": now, "limit": limit})).all())
    if rows and lease_until is not None:
        await conn.execute(_LEASE, {"until": lease_until, "seqs": [r.seq for r in rows]})
    return [
        ClaimedRow(
            seq=r.seq,
            id=str(r.id),
            event_type=r.event_type,
            key=r.key,
            headers=_headers(r.headers) if conn.dialect.name == "sqlite" else r.headers,
            payload=json_text(r.payload).encode(),
            retry_count=r.retry_count,
        )
        for r in rows
    ]


def _headers(stored: str | bytes | float | None) -> Any:
    """SQLite: a row's headers as stored, decoded; :class:`NotJson` if they are not
    JSON, which would otherwise fail the claim of every row with it, round after
    round, and nothing would be published."""
    text = json_text(stored)
    try:
        return json.loads(text)
    except ValueError as exc:
        return NotJson(text, str(exc))


async def claim_on_driver(
    driver: Any, *, now: datetime, lease_until: datetime, limit: int
) -> list[ClaimedRow]:
    """PostgreSQL: claim and lease up to ``limit`` rows on an asyncpg connection;
    outside a transaction each statement commits on its own (the lease holds the
    rows). Usually one statement, one round trip; a claim that fails or is
    cancelled after one of its statements leased rows gives them back."""
    return await _claim_ahead(driver, now=now, lease_until=lease_until, limit=limit)


async def _claim_ahead(
    driver: Any, *, now: datetime, lease_until: datetime | None, limit: int
) -> list[ClaimedRow]:
    """Claim through up to :data:`AHEAD_WINDOWS` look-ahead windows, then, if every
    window was full and the batch is still short (rows of blocked keys or held by
    other relays fill them), through the claim over every due row: different keys
    never block each other, however deep the blocked rows go."""
    window = max(limit * AHEAD_FACTOR, 1)
    claimed: list[ClaimedRow] = []
    try:
        after = 0
        for _ in range(AHEAD_WINDOWS):
            taken = [row.seq for row in claimed]
            records = await driver.fetch(
                *_ahead_statement(now, limit - len(claimed), window, after, taken, lease_until)
            )
            claimed += _rows([r for r in records if r["seq"] is not None])
            meta = records[-1]
            # Rows past the last one locked were not looked at if the lock step
            # filled its limit (and then dropped rows behind a skipped one).
            filled = meta["locked"] == limit - len(taken)
            if len(claimed) >= limit or (meta["looked_at"] < window and not filled):
                return claimed
            after = meta["last_locked"] if filled else meta["last_seq"]
        # A claim of this transaction's own: its locked rows are claimed again (a
        # lock holder is not skipped), its leased rows are not due (their keys wait).
        if lease_until is None:
            more = _rows(await driver.fetch(_CLAIM_POSTGRES_DRIVER, now, limit))
        else:
            more = _rows(
                await driver.fetch(_CLAIM_AND_LEASE_DRIVER, now, limit - len(claimed), lease_until)
            )
    except BaseException:
        if lease_until is not None and claimed:
            await _give_back(driver, claimed, now, lease_until)
        raise
    merged = {row.seq: row for row in claimed + more}
    return [merged[seq] for seq in sorted(merged)][:limit]


def _ahead_statement(
    now: datetime,
    limit: int,
    window: int,
    after: int,
    taken: list[int],
    lease_until: datetime | None,
) -> tuple[Any, ...]:
    if lease_until is None:
        return _CLAIM_AHEAD_DRIVER, now, limit, window, after, taken
    return _CLAIM_AHEAD_AND_LEASE_DRIVER, now, limit, window, after, taken, lease_until


async def _give_back(
    driver: Any, rows: Sequence[ClaimedRow], now: datetime, lease_until: datetime
) -> None:
    """Leases: a claim that ends in an error or a cancel after its first window
    committed leases the caller never gets; give those rows back, due from ``now``
    (the claim's), rather than when the lease runs out (if the connection still
    answers: else they wait)."""
    settlements = [Settlement(r.seq, "PENDING", now, r.retry_count, None) for r in rows]
    try:
        async with asyncio.timeout(_GIVE_BACK_TIMEOUT):
            await settle_on_driver(
                driver, now=now, sent=[], others=settlements, held_until=lease_until
            )
    except Exception as exc:
        log.warning(
            "could not give back %d rows of an unfinished claim (%s); "
            "they return when their lease runs out",
            len(rows),
            exc,
        )


def _rows(records: Sequence[Any]) -> list[ClaimedRow]:
    return [
        ClaimedRow(
            seq=r["seq"],
            id=str(r["id"]),
            event_type=r["event_type"],
            key=r["key"],
            # Decoded already: SQLAlchemy's asyncpg dialect registers a JSON codec.
            headers=r["headers"],
            payload=(r["payload"] or "null").encode(),
            retry_count=r["retry_count"],
        )
        for r in records
    ]


async def settle(
    conn: AsyncConnection,
    *,
    now: datetime,
    sent: Sequence[int],
    others: Sequence[Settlement],
    held_until: datetime | None = None,
) -> int:
    """Mark ``sent`` rows SENT and apply every other settlement; returns how many
    rows were marked SENT.

    ``held_until``: the rows were leased until then (:func:`claim`'s
    ``lease_until``); a row whose lease is no longer that one (it ran out and
    another relay claimed the row) is left to its new holder.
    """
    driver = await driver_in_transaction(conn)
    if driver is not None:
        return await settle_on_driver(
            driver, now=now, sent=sent, others=others, held_until=held_until
        )
    marked = 0
    held = {} if held_until is None else {"held_until": held_until}
    if sent:
        result = await conn.execute(
            _MARK_SENT if held_until is None else _MARK_SENT_HELD,
            {"now": now, "seqs": list(sent), **held},
        )
        marked = result.rowcount or 0
    if others:
        await conn.execute(
            _RESCHEDULE if held_until is None else _RESCHEDULE_HELD,
            [
                {
                    "seq": s.seq,
                    "status": s.status,
                    "available_at": s.available_at,
                    "retry_count": s.retry_count,
                    "last_error": s.last_error,
                    **held,
                }
                for s in others
            ],
        )
    return marked


async def settle_on_driver(
    driver: Any,
    *,
    now: datetime,
    sent: Sequence[int],
    others: Sequence[Settlement],
    held_until: datetime | None = None,
) -> int:
    """:func:`settle` on an asyncpg connection. Outside a transaction the SENT marks
    commit in one statement and the other settlements in another; if the second
    fails, its rows keep their lease and come back when it runs out."""
    marked = 0
    if sent:
        status = await driver.execute(_MARK_SENT_DRIVER, now, list(sent), held_until)
        marked = int(status.split()[-1])
    if others:
        await driver.executemany(
            _RESCHEDULE_DRIVER,
            [
                (s.seq, s.status, s.available_at, s.retry_count, s.last_error, held_until)
                for s in others
            ],
        )
    return marked


# -- rows scheduled for later -------------------------------------------------------
#
# A SCHEDULED row is released when due: it becomes PENDING with a new seq, behind
# every row pending then (its place in its key's order is the time it fell due), and
# its created_at becomes that time (the relay's lag counts from then). Oldest due
# first, and one relay at a time (PostgreSQL: a transaction-level advisory lock; the
# others skip releasing meanwhile; SQLite: its one writer): two relays releasing at
# once would commit one key's rows in the other order, and the later-due ones, seen
# first, would go first.
# (Accord's key, 1): the two-number key space, apart from single-number locks.
_RELEASE_LOCK = sa.text("SELECT pg_try_advisory_xact_lock(1094930258, 1)")
_RELEASE_POSTGRES = sa.text(
    """
UPDATE accord_outbox o
SET seq = d.new_seq, status = 'PENDING', created_at = o.available_at
FROM (SELECT due.seq, nextval(pg_get_serial_sequence('accord_outbox', 'seq')) AS new_seq
      FROM (SELECT seq FROM accord_outbox
            WHERE status = 'SCHEDULED' AND available_at <= :now
            ORDER BY available_at, seq LIMIT :limit) AS due) AS d
WHERE o.seq = d.seq
"""
).bindparams(sa.bindparam("now", type_=UTCDateTime()))
_DUE_SQLITE = sa.text(
    "SELECT seq FROM accord_outbox WHERE status = 'SCHEDULED' AND available_at <= :now "
    "ORDER BY available_at, seq LIMIT :limit"
).bindparams(sa.bindparam("now", type_=UTCDateTime()))
_RELEASE_SQLITE = sa.text(
    "UPDATE accord_outbox SET seq = (SELECT max(seq) + 1 FROM accord_outbox), "
    "status = 'PENDING', created_at = available_at WHERE seq = :seq"
)


async def release_scheduled(conn: AsyncConnection, *, now: datetime, limit: int) -> int:
    """Make up to ``limit`` SCHEDULED rows due by ``now`` PENDING, in the order they
    fell due, in ``conn``'s transaction; return how many."""
    if conn.dialect.name == "postgresql":
        if not await conn.scalar(_RELEASE_LOCK):
            return 0  # another relay is releasing
        result = await conn.execute(_RELEASE_POSTGRES, {"now": now, "limit": limit})
        return int(result.rowcount or 0)
    seqs = (await conn.execute(_DUE_SQLITE, {"now": now, "limit": limit})).scalars().all()
    for seq in seqs:  # one at a time: each goes behind the one before
        await conn.execute(_RELEASE_SQLITE, {"seq": seq})
    return len(seqs)


# -- a look without the write lock (SQLite) -------------------------------------------
#
# Every SQLite write transaction takes the file's one write lock, also one that finds
# nothing to do; a relay polling an idle outbox would take it every poll and hold up
# the service's own writers. A read (Database.read(): no lock) looks first.
_ANY_DUE = sa.text(
    "SELECT 1 FROM accord_outbox WHERE status = :status AND available_at <= :now LIMIT 1"
).bindparams(sa.bindparam("now", type_=UTCDateTime()))


async def any_due(conn: AsyncConnection, *, status: str, now: datetime) -> bool:
    """Whether a row of ``status`` (PENDING or SCHEDULED) is due by ``now``."""
    return await conn.scalar(_ANY_DUE, {"status": status, "now": now}) is not None
