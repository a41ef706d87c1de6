"""The relay: moves committed outbox rows to the broker, in order, at least once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from prometheus_client import Counter, Histogram

from accord._backoff import backoff_delay
from accord._checks import is_count, is_seconds
from accord.db.database import Database, translate_errors
from accord.db.types import UTCDateTime
from accord.errors import (
    AccordError,
    ConfigurationError,
    DecodeError,
    MessageTooLarge,
    PublishError,
    TransportUnavailable,
)
from accord.outbox._claim import (
    ClaimedRow,
    NotJson,
    Settlement,
    any_due,
    claim,
    claim_on_driver,
    release_scheduled,
    settle,
    settle_on_driver,
)
from accord.outbox.writer import NOTIFY_CHANNEL, SCHEDULED, stop_waking, wake_on_local_commits
from accord.transports.base import Envelope, Transport

__all__ = ["Relay", "backoff_delay"]

# How many SENT rows one clean-up statement deletes.
_CLEANUP_BATCH = 5000
# PostgreSQL, once it has statistics, plans DELETE ... WHERE seq IN (subquery) as a
# hash join over the whole table, every batch; the rows fetched by their seqs go by
# the primary key. 'SENT' is in the text so that a generic plan reads the partial
# index of SENT rows. The clean-up runs on custom plans (_CUSTOM_PLANS): with a plan
# a connection kept from when the table was small, the rows fetched by their seqs
# were a scan of it (4.3 ms a batch at 6,000 rows). (Deleted by tuple id instead, a
# batch of 5,000 on an analyzed table was a hash join over the whole table.)
_CLEANUP_POSTGRES = sa.text(
    "DELETE FROM accord_outbox WHERE seq = ANY(ARRAY("
    "SELECT seq FROM accord_outbox WHERE status = 'SENT' AND sent_at < :cutoff LIMIT :batch))"
).bindparams(sa.bindparam("cutoff", type_=UTCDateTime()))

# Planned at each run from the table as it is (a statement run once a minute).
_CUSTOM_PLANS = sa.text("SET LOCAL plan_cache_mode = force_custom_plan")

log = logging.getLogger("accord.outbox.relay")

PUBLISHED = Counter("accord_outbox_published", "Outbox messages confirmed by the broker")
FAILED = Counter("accord_outbox_publish_failures", "Outbox publish attempts that failed")
DEAD = Counter("accord_outbox_dead", "Outbox messages marked DEAD after their last attempt")
RELEASED = Counter(
    "accord_outbox_scheduled_released", "Scheduled outbox messages released when due"
)
BATCH_SECONDS = Histogram("accord_outbox_batch_seconds", "Claim, publish and settle one batch")


def _envelope(row: ClaimedRow) -> Envelope:
    """The row as the broker gets it; DecodeError if it is not a message.

    The payload is stored as JSON; a message whose content type is not JSON
    (``text/plain``...) carries its text itself, as :func:`accord.messages.encode`
    sends it, not that text as a JSON string."""
    if isinstance(row.headers, NotJson):
        raise DecodeError(f"its stored headers are not JSON ({row.headers.error})")
    if not isinstance(row.headers, Mapping):
        kind = type(row.headers).__name__
        raise DecodeError(f"not a CloudEvent: its headers are a JSON {kind}, not an object")
    body = row.payload
    content_type = row.headers.get("content-type", "application/json")
    if "json" not in str(content_type).lower():
        try:
            text = json.loads(body)
        except ValueError as exc:
            raise DecodeError(f"its stored data is not JSON: {exc}") from None
        if text is None or isinstance(text, str):
            try:
                body = b"" if text is None else text.encode()
            except UnicodeEncodeError as exc:  # a lone surrogate SQLite kept
                raise DecodeError(f"its text cannot be sent as UTF-8: {exc}") from None
    envelope = Envelope(row.id, row.event_type, row.key, row.headers, body)
    envelope.check()
    return envelope


def _waves(rows: Sequence[ClaimedRow]) -> list[list[ClaimedRow]]:
    """Split a claim so that no publish call holds two rows with the same key.

    Rows of different keys (and keyless rows) go out together, pipelined; the
    n-th row of a key goes in the n-th wave, so it is only sent once the rows
    before it were confirmed.
    """
    waves: list[list[ClaimedRow]] = []
    depth: dict[str, int] = {}
    for row in rows:
        index = 0
        if row.key is not None:
            index = depth.get(row.key, 0)
            depth[row.key] = index + 1
        while len(waves) <= index:
            waves.append([])
        waves[index].append(row)
    return waves


#: The longest time a relay option may name (a lease, a backoff, a poll, the
#: retention): past it, the relay's datetime arithmetic overflows in every round.
_MAX_SECONDS = 10 * 365 * 24 * 3600.0


#: The longest a round waits before it tries again during an outage (of the database
#: or the broker): how late, at worst, the relay notices that it is over.
_OUTAGE_RETRY_CAP = 5.0


def _check_options(*, retention: Any, **options: Any) -> None:
    """Raise ConfigurationError unless every Relay option is a value it can work with.

    Checked when the relay is made, not when a round first needs one: a NaN lease or
    batch size failed every round (nothing was ever published), a NaN backoff failed
    a round after its publishes (with locks, the batch was sent again each round),
    a NaN max_attempts never let a message go DEAD, a poll_interval of 0 spun."""
    for name in ("batch_size", "max_attempts", "concurrency"):
        value = options.pop(name)
        if not is_count(value):
            raise ConfigurationError(
                f"Relay {name} must be a whole number of at least 1, not {value!r}"
            )
    for name, value in options.items():
        zero_ok = name.startswith("backoff_")  # a retry at once is a choice
        if not is_seconds(value, zero_ok=zero_ok, longest=_MAX_SECONDS):
            least = "zero or a positive" if zero_ok else "a positive"
            raise ConfigurationError(
                f"Relay {name} must be {least} number of seconds (up to ten years), not {value!r}"
            )
    if not isinstance(retention, timedelta) or not (
        timedelta(0) <= retention <= timedelta(seconds=_MAX_SECONDS)
    ):
        raise ConfigurationError(
            f"Relay retention must be a timedelta from 0 to ten years (how long SENT rows "
            f"are kept), not {retention!r}"
        )


#: How long a relay on SQLite waits, once a commit of its process added outbox rows,
#: before it looks: the commits of that window share one round.
LOCAL_WAKE_DELAY = 0.01


class Relay:
    """Publishes committed outbox rows to a transport; a worker component.

    Promises: a row is marked SENT only after the broker confirmed it; a row
    whose publish failed is retried with exponential backoff and jitter and,
    after ``max_attempts``, marked DEAD with its last error; a row never goes
    out before an earlier PENDING row with the same key, also while that row
    waits in backoff and with several relays on one database. A broker outage
    does not count against attempts: the relay waits and resumes.

    Several relays may run against one database. ``claims`` says how a batch is
    kept from the others while it is published:

    - ``"lock"`` (PostgreSQL's default): the batch stays locked in the one
      transaction that claims, publishes and settles it, so a relay that dies
      leaves its rows to the others at once. That transaction is open for as
      long as the broker takes to confirm, up to the transport's publish
      timeout when the broker stalls, and while it is open it holds back
      PostgreSQL's ``xmin`` for the whole server: vacuum, and the event store's
      gap-safe readers (projections, ``subscribe``), wait for it.
    - ``"lease"`` (SQLite's only mode): the batch is leased for ``lease``
      seconds in a short transaction, published with no transaction open, and
      settled in another; a relay that dies leaves its rows to come back when
      the lease runs out. Choose it on PostgreSQL when an event store shares the
      server, so a slow broker never holds its readers back. If the lease runs
      out mid-batch the relay sends no further wave, and it settles only rows
      still under its own lease: a row another relay claimed since is that
      relay's to publish (again) and settle. Keep ``lease`` well above the
      transport's publish timeout.
    """

    def __init__(
        self,
        database: Database,
        transport: Transport,
        *,
        batch_size: int = 500,
        max_attempts: int = 10,
        backoff_base: float = 0.5,
        backoff_cap: float = 300.0,
        poll_interval: float = 1.0,
        lease: float = 30.0,
        retention: timedelta = timedelta(days=7),
        cleanup_interval: float = 60.0,
        concurrency: int = 2,
        name: str | None = None,
        claims: str | None = None,
    ) -> None:
        _check_options(
            batch_size=batch_size,
            max_attempts=max_attempts,
            concurrency=concurrency,
            backoff_base=backoff_base,
            backoff_cap=backoff_cap,
            poll_interval=poll_interval,
            lease=lease,
            cleanup_interval=cleanup_interval,
            retention=retention,
        )
        self.database = database
        self.transport = transport
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.poll_interval = poll_interval
        self.lease = lease
        self.retention = retention
        self.cleanup_interval = cleanup_interval
        self.concurrency = concurrency
        default = "lock" if database.is_postgres else "lease"
        self.claims = default if claims is None else claims
        if self.claims not in ("lock", "lease"):
            raise ConfigurationError(f"Relay claims must be 'lock' or 'lease', not {claims!r}")
        if self.claims == "lock" and not database.is_postgres:
            raise ConfigurationError(
                "Relay claims='lock' needs PostgreSQL: SQLite's single writer cannot stay "
                "in a transaction while the broker confirms; use claims='lease' (its default)"
            )
        publish_timeout = getattr(transport, "publish_timeout", None)
        if self.claims == "lease" and publish_timeout is not None and lease <= publish_timeout:
            log.warning(
                "relay lease (%.1fs) is not longer than the transport's publish_timeout "
                "(%.1fs): a stalled broker outlasts the lease and its rows are published again",
                lease,
                publish_timeout,
            )
        self.name = name or f"relay-{socket.gethostname()}-{id(self):x}"
        # The rounds waiting for work, longest idle first: a wake-up goes to one of
        # them, or, when none is idle, to the next round that finishes.
        self._idle_rounds: deque[asyncio.Future[None]] = deque()
        self._woken_meanwhile = False
        self._wake_soon: asyncio.TimerHandle | None = None
        self._poll_timer: asyncio.TimerHandle | None = None  # while run() runs
        self._event_loop: asyncio.AbstractEventLoop | None = None  # while run() runs
        self._stopping = False
        self._running = False
        self._stopped = asyncio.Event()
        self._next_due: float | None = None
        self._scheduled_due = 0.0  # monotonic time to look for due scheduled rows
        self._outage = 0
        # Whether the last claim found nothing: then (SQLite) the next round looks
        # without the write lock first; while claims find work, they claim at once.
        self._idle_claim = True
        # Leased batches the broker confirmed but whose settle failed (the database
        # went away meanwhile): (sent, others, lease_until). A later round settles them
        # while their lease holds, rather than leave them to be published again when
        # it runs out, their keys held back until then.
        self._unsettled: deque[tuple[list[int], list[Settlement], datetime]] = deque()
        # PostgreSQL: the LISTEN that wakes the relay on commit, and whether it needs
        # (re)starting: first, and after its connection was lost.
        self._unlisten: Callable[[], Any] | None = None
        self._listen_lost = database.is_postgres

    async def run_once(self) -> int:
        """Claim one batch, publish it and settle every row. Returns how many were SENT.

        With ``claims="lock"`` the round is one transaction: the claimed rows stay
        locked while they are published (other relays and rounds skip them), then are
        settled and committed; a relay that dies mid-round leaves them to the next
        round at once. With ``claims="lease"`` the rows are leased for ``lease``
        seconds in one transaction and settled in another.
        """
        await self.database.clock.sync_if_due()
        if self._unsettled:
            await self._settle_unsettled()
        now = self.database.clock.now()
        if time.monotonic() >= self._scheduled_due:
            await self._release_scheduled(now)
        if self.database.is_sqlite and self._idle_claim and not await self._due("PENDING", now):
            self._outage = 0  # the database answered; nothing to publish
            return 0
        sent: list[int] = []
        others: list[Settlement] = []
        if self.claims == "lock":  # the rows stay locked in the claiming transaction
            async with self.database.transaction() as conn:
                rows = await claim(conn, now=now, lease_until=None, limit=self.batch_size)
                self._idle_claim = not rows
                if not rows:
                    self._outage = 0  # the database answered; nothing to publish
                    return 0
                started = time.perf_counter()
                await self._publish(rows, None, sent, others)
                await settle(conn, now=self.database.clock.now(), sent=sent, others=others)
            return self._count(sent, len(sent), started)
        lease_until = now + timedelta(seconds=self.lease)
        rows = await self._claim_leased(now, lease_until)
        self._idle_claim = not rows
        if not rows:
            self._outage = 0  # the database answered; nothing to publish
            return 0
        started = time.perf_counter()
        try:
            await self._publish(rows, lease_until, sent, others)
        except asyncio.CancelledError:
            await self._release_cancelled(rows, sent, others, lease_until)
            raise
        try:
            marked = await self._settle_leased(sent, others, lease_until)
        except Exception:
            self._unsettled.append((sent, others, lease_until))
            raise
        return self._count(sent, marked, started)

    async def _settle_unsettled(self) -> None:
        """Settle the leased batches whose settle failed, while their lease holds;
        raises (the round fails) while the database is still away."""
        while self._unsettled:
            sent, others, lease_until = self._unsettled.popleft()
            if lease_until <= self.database.clock.now():
                log.warning(
                    "relay %s: the lease on %d published rows ran out before the database "
                    "came back; they are published again",
                    self.name,
                    len(sent),
                )
                continue
            try:
                marked = await self._settle_leased(sent, others, lease_until)
            except BaseException:
                self._unsettled.appendleft((sent, others, lease_until))
                raise
            PUBLISHED.inc(marked)
            log.info(
                "relay %s settled a batch of %d rows whose settle had failed",
                self.name,
                len(sent) + len(others),
            )

    async def _release_scheduled(self, now: datetime) -> None:
        """Make the scheduled rows due by ``now`` PENDING (up to a batch), for this
        round to claim; looked for again a ``poll_interval`` later, or at once
        after a full batch."""
        try:
            with translate_errors("releasing scheduled outbox rows"):
                if self.database.is_sqlite and not await self._due(SCHEDULED, now):
                    released = 0
                else:
                    async with self.database.transaction() as conn:
                        released = await release_scheduled(conn, now=now, limit=self.batch_size)
        except Exception as exc:  # the round goes on: what is pending still goes out
            log.warning("relay %s could not release scheduled messages: %s", self.name, exc)
            released = 0
        if released:
            RELEASED.inc(released)
            log.debug("relay %s released %d scheduled messages", self.name, released)
        full = released >= self.batch_size
        self._scheduled_due = 0.0 if full else time.monotonic() + self.poll_interval

    async def _due(self, status: str, now: datetime) -> bool:
        """SQLite: whether a row of ``status`` is due, looked for without the file's
        write lock, which a claim or release takes even when it finds nothing: an
        idle relay's polls then leave the service's writers alone."""
        async with self.database.read() as conn:
            return await any_due(conn, status=status, now=now)

    async def _release_cancelled(
        self,
        rows: Sequence[ClaimedRow],
        sent: list[int],
        others: list[Settlement],
        lease_until: datetime,
    ) -> None:
        """A round cancelled while publishing (its task is being torn down): settle
        what is known and give the rest back now rather than when the lease runs
        out. A row whose confirm was still awaited is published again, once some
        relay claims it (at least once; the inbox drops the copy)."""
        settled = set(sent) | {s.seq for s in others}
        released = others + [self._release(r, None) for r in rows if r.seq not in settled]
        try:
            async with asyncio.timeout(5):
                PUBLISHED.inc(await self._settle_leased(sent, released, lease_until))
        except Exception as exc:  # whatever it is, the cancel is re-raised after
            log.warning(
                "relay %s: could not give back the %d rows of a cancelled round (%s); "
                "they return when their lease runs out",
                self.name,
                len(rows),
                exc,
            )

    async def _claim_leased(self, now: datetime, lease_until: datetime) -> list[ClaimedRow]:
        """Claim and lease a batch in a transaction of its own. On PostgreSQL that is
        one statement sent to asyncpg outside any transaction: one round trip."""
        async with self.database.driver_alone() as driver:
            if driver is not None:
                with translate_errors("claiming outbox rows"):
                    return await claim_on_driver(
                        driver, now=now, lease_until=lease_until, limit=self.batch_size
                    )
        async with self.database.transaction() as conn:
            return await claim(conn, now=now, lease_until=lease_until, limit=self.batch_size)

    async def _settle_leased(
        self, sent: list[int], others: list[Settlement], lease_until: datetime
    ) -> int:
        """Settle a leased batch (only rows still under this lease); returns how many
        were marked SENT. On PostgreSQL each statement commits on its own."""
        now = self.database.clock.now()
        async with self.database.driver_alone() as driver:
            if driver is not None:
                with translate_errors("settling outbox rows"):
                    return await settle_on_driver(
                        driver, now=now, sent=sent, others=others, held_until=lease_until
                    )
        async with self.database.transaction() as conn:
            return await settle(conn, now=now, sent=sent, others=others, held_until=lease_until)

    def _count(self, sent: Sequence[int], marked: int, started: float) -> int:
        """Metrics for a settled round; returns how many rows it marked SENT."""
        if marked < len(sent):
            log.warning(
                "relay %s: the lease on %d of %d published rows ran out before they were "
                "marked SENT; their new holder publishes them again (lease=%.0fs is too "
                "short for this broker)",
                self.name,
                len(sent) - marked,
                len(sent),
                self.lease,
            )
        BATCH_SECONDS.observe(time.perf_counter() - started)
        PUBLISHED.inc(marked)
        return marked

    async def _publish(
        self,
        rows: Sequence[ClaimedRow],
        lease_until: datetime | None,
        sent: list[int],
        others: list[Settlement],
    ) -> None:
        """Publish ``rows`` wave by wave, appending the seq of each confirmed row to
        ``sent`` and how to settle each other row to ``others`` as it is known."""
        blocked: set[str] = set()
        unavailable: str | None = None
        for wave in _waves(rows):
            # Once the lease ran out (earlier waves were slow) the rows may be another
            # relay's: publishing a key's next row could overtake that relay's copy.
            expired = lease_until is not None and self.database.clock.now() >= lease_until
            ready: list[tuple[ClaimedRow, Envelope]] = []
            for row in wave:
                if expired or unavailable is not None or (row.key in blocked):
                    others.append(self._release(row, unavailable))
                    continue
                try:
                    envelope = _envelope(row)
                except DecodeError as exc:
                    # A row that is not a valid message will never publish: DEAD now.
                    others.append(self._dead(row, f"not a valid message: {exc}"))
                    if row.key is not None:
                        blocked.add(row.key)
                    continue
                ready.append((row, envelope))
            if not ready:
                continue
            failed: dict[str, BaseException] = {}
            try:
                await self.transport.publish_envelopes([e for _, e in ready])
            except PublishError as exc:
                failed = exc.failed
            except TransportUnavailable as exc:
                unavailable = f"broker unavailable: {exc}"
                others.extend(self._release(row, unavailable) for row, _ in ready)
                continue
            except AccordError as exc:
                failed = {e.id: exc for _, e in ready}
            for row, envelope in ready:
                error = failed.get(envelope.id)
                if error is None:
                    sent.append(row.seq)
                elif isinstance(error, TransportUnavailable):
                    # The broker went away mid-batch: an outage, not this message's fault.
                    unavailable = f"broker unavailable: {error}"
                    others.append(self._release(row, unavailable))
                elif isinstance(error, DecodeError):
                    # A row that is not a valid message will never publish: DEAD now.
                    others.append(self._dead(row, f"not a valid message: {error}"))
                elif isinstance(error, MessageTooLarge):
                    # Nor will one larger than the broker takes, however often tried.
                    others.append(self._dead(row, f"{type(error).__name__}: {error}"))
                else:
                    others.append(self._failed(row, error))
                if error is not None and row.key is not None:
                    blocked.add(row.key)
        self._outage = self._outage + 1 if unavailable else 0

    def _release(self, row: ClaimedRow, reason: str | None) -> Settlement:
        """Back to PENDING, claimable now, attempts unchanged."""
        return Settlement(row.seq, "PENDING", self.database.clock.now(), row.retry_count, reason)

    def _failed(self, row: ClaimedRow, error: BaseException) -> Settlement:
        FAILED.inc()
        attempts = row.retry_count + 1
        message = f"{error.__class__.__name__}: {error}"
        if attempts >= self.max_attempts:
            return self._dead(row, message, attempts)
        delay = backoff_delay(attempts, self.backoff_base, self.backoff_cap)
        due = self.database.clock.now() + timedelta(seconds=delay)
        self._note_due(delay)
        log.warning(
            "publish of %s failed (attempt %d), retry in %.1fs: %s",
            row.id,
            attempts,
            delay,
            message,
        )
        return Settlement(row.seq, "PENDING", due, attempts, message)

    def _dead(self, row: ClaimedRow, reason: str, attempts: int | None = None) -> Settlement:
        DEAD.inc()
        log.error("outbox message %s is DEAD: %s", row.id, reason)
        count = row.retry_count + 1 if attempts is None else attempts
        return Settlement(row.seq, "DEAD", self.database.clock.now(), count, reason)

    def _note_due(self, delay: float) -> None:
        due = time.monotonic() + delay
        if self._next_due is None or due < self._next_due:
            self._next_due = due

    async def cleanup(self) -> int:
        """Delete SENT rows older than the retention, in batches. Returns how many."""
        cutoff = self.database.clock.now() - self.retention
        from accord.db.schema import outbox

        batch = (
            sa.select(outbox.c.seq)
            .where(outbox.c.status == "SENT", outbox.c.sent_at < cutoff)
            .limit(_CLEANUP_BATCH)
        )
        delete: Any = outbox.delete().where(outbox.c.seq.in_(batch.scalar_subquery()))
        if self.database.is_postgres:
            delete = _CLEANUP_POSTGRES.bindparams(cutoff=cutoff, batch=_CLEANUP_BATCH)
        total = 0
        while True:
            async with self.database.transaction() as conn:
                if self.database.is_postgres:
                    await conn.execute(_CUSTOM_PLANS)
                result = await conn.execute(delete)
            total += result.rowcount or 0
            if (result.rowcount or 0) < _CLEANUP_BATCH:
                return total

    def committed(self) -> None:
        """A transaction of this process that added outbox rows is committing (SQLite):
        look for work in :data:`LOCAL_WAKE_DELAY` seconds. The commits of that
        window go out in one round rather than a round each."""
        loop = self._event_loop
        if loop is None or self._wake_soon is not None:
            return
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is loop:
            self._wake_soon = loop.call_later(LOCAL_WAKE_DELAY, self._woken)
        else:  # committed on another thread's loop: hand it over
            with contextlib.suppress(RuntimeError):  # that loop closed: nothing to wake
                loop.call_soon_threadsafe(self.committed)

    def _woken(self) -> None:
        self._wake_soon = None
        self.wake()

    def _poll_soon(self) -> None:
        loop = asyncio.get_running_loop()
        self._poll_timer = loop.call_later(self.poll_interval, self._polled)

    def _polled(self) -> None:
        """Every ``poll_interval``, one round looks for what nothing announced (other
        processes' commits on SQLite, rows coming due, expired leases), whichever
        round is idle: not only the first, which may be busy for long."""
        if not self._outage:  # rounds retry an outage on their own backoff
            self.wake()
        self._poll_soon()

    def wake(self) -> None:
        """Look for work now (called on PostgreSQL NOTIFY, and on SQLite when a
        transaction of this process that added outbox rows commits; safe any time).

        One round looks: the longest idle, or, when every round is busy, the next to
        finish. A round that finds a full batch wakes another, so a burst is still
        relayed ``concurrency`` rounds at a time, while a trickle of commits costs one
        claim each rather than one per round (on SQLite a claim takes the write lock).
        """
        if not self._wake_idle_round():
            self._woken_meanwhile = True

    def _wake_idle_round(self) -> bool:
        while self._idle_rounds:
            waiter = self._idle_rounds.popleft()
            if not waiter.done():  # else its round is being cancelled
                waiter.set_result(None)
                return True
        return False

    async def run(self) -> None:
        """Relay until :meth:`stop`: wake on commit (PostgreSQL's NOTIFY; on SQLite
        the commits of this process), else poll every ``poll_interval``.

        ``concurrency`` rounds run at once, so one batch is claimed and settled in
        the database while another is being confirmed by the broker. Order per key
        still holds: a claimed row stays PENDING until settled, and no round claims
        a row behind a PENDING row of its key.
        """
        self._running = True
        self._stopped.clear()
        try:
            # connect() is idempotent by the port's contract; a fresh transport needs it.
            await self.transport.connect()
            await self._listen()
            if not self.database.is_postgres:
                self._event_loop = asyncio.get_running_loop()
                wake_on_local_commits(self.database.engine.url, self)
            self._poll_soon()
            log.info("relay %s started on %s -> %s", self.name, self.database, self.transport.name)
            # A task group: if one loop ever dies, its siblings are cancelled with it
            # rather than left relaying where stop() cannot reach them.
            async with asyncio.TaskGroup() as group:
                for index in range(self.concurrency):
                    group.create_task(self._loop(index), name=f"{self.name}-round-{index}")
        finally:
            stop_waking(self.database.engine.url, self)
            if self._poll_timer is not None:
                self._poll_timer.cancel()
                self._poll_timer = None
            self._event_loop = None
            if self._wake_soon is not None:
                self._wake_soon.cancel()
                self._wake_soon = None
            if self._unlisten is not None:
                await self._unlisten()
                self._unlisten = None
            self._listen_lost = self.database.is_postgres
            self._running = False
            # Reset here, not at the start: a stop() that came before run() must hold.
            self._stopping = False
            self._stopped.set()
            log.info("relay %s stopped", self.name)

    async def _listen(self) -> None:
        """LISTEN for commits (PostgreSQL), again after the connection was lost (a
        server restart, a failover): without it the relay would only poll, for good."""
        if not self._listen_lost:
            return
        if self._unlisten is not None:
            await self._unlisten()
            self._unlisten = None
        with contextlib.suppress(AccordError, OSError):
            self._unlisten = await self.database.listen(
                NOTIFY_CHANNEL, lambda _: self.wake(), on_lost=self._lost_listener
            )
            self._listen_lost = False

    def _lost_listener(self) -> None:
        self._listen_lost = True
        self.wake()  # a commit may have gone unheard: look now

    async def _loop(self, index: int) -> None:
        last_cleanup = 0.0
        failures = 0  # this round's in a row: its own backoff, whatever the others do
        while not self._stopping:
            # This round sees every commit so far; a wake-up during it goes to an idle
            # round or, if none, makes the next round to finish look again.
            self._woken_meanwhile = False
            try:
                if index == 0:
                    await self._listen()
                published = await self.run_once()
                if index == 0 and time.monotonic() - last_cleanup > self.cleanup_interval:
                    last_cleanup = time.monotonic()
                    await self.cleanup()
            except AccordError as exc:
                log.error("relay round failed, retrying: %s", exc)
                published = 0
                self._outage += 1
            except Exception:
                # Not ours to translate (a bug, a transport's stray error): never let
                # the relay die of it; the rows it leased come back after the lease.
                log.exception("relay round failed unexpectedly, retrying")
                published = 0
                self._outage += 1
            if not self._outage:
                if failures:  # back: the rounds waiting out their backoff look now
                    while self._wake_idle_round():
                        pass
                failures = 0
            else:
                failures += 1
            if published >= self.batch_size and not self._outage:
                self._wake_idle_round()  # there is likely more: another round claims it
                continue
            await self._idle(failures)

    async def _idle(self, failures: int) -> None:
        # Woken by a commit, a NOTIFY, a full batch or the poll (_polled); a timeout
        # of its own only to retry an outage (after this round's ``failures`` in a
        # row) or when a row it saw comes due.
        timeout: float | None = None
        if failures:
            timeout = min(_OUTAGE_RETRY_CAP, 0.25 * 2 ** min(failures - 1, 5))
        elif self._next_due is not None:
            timeout = max(0.0, min(self.poll_interval, self._next_due - time.monotonic()))
            self._next_due = None
        if self._stopping:
            return
        if self._woken_meanwhile:
            self._woken_meanwhile = False
            return
        waiter = asyncio.get_running_loop().create_future()
        self._idle_rounds.append(waiter)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await waiter
        finally:
            # Timed out or cancelled (which cancels the waiter too): no longer idle.
            with contextlib.suppress(ValueError):
                self._idle_rounds.remove(waiter)

    async def stop(self) -> None:
        """Stop claiming; the batch in flight is published and settled first."""
        self._stopping = True
        while self._wake_idle_round():
            pass
        if self._running:
            try:
                async with asyncio.timeout(self.lease):
                    await self._stopped.wait()
            except TimeoutError:
                log.warning(
                    "relay %s did not stop within %.0fs; cancelling its run() gives the "
                    "batch in flight back at once (a leased batch is released, a locked "
                    "one rolled back); left alone, a leased batch returns after its lease",
                    self.name,
                    self.lease,
                )
