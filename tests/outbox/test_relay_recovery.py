"""The relay keeps going where it used to stall, lose or spin: a key in backoff, a
corrupt row, a lost LISTEN, a database blip, a broker refusing an odd-looking id;
text payloads arrive as text; SQLite takes what PostgreSQL takes."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from accord import Database, Message, add_to_outbox
from accord.db.schema import outbox
from accord.errors import ConfigurationError, TransportUnavailable
from accord.outbox import Relay
from accord.outbox._claim import Settlement, settle
from accord.testing import FaultyTransport, wait_for
from accord.transports import from_url
from accord.transports.sql import SqlTransport
from tests.outbox.conftest import broker_url, fast_relay, statuses

pytestmark = pytest.mark.rabbitmq


async def test_a_key_in_backoff_never_holds_back_another_key(
    database: Database, listen: Any
) -> None:
    """Different keys never block each other: while alice's first message waits in
    backoff, bob's message (committed after alice's backlog) goes out at once,
    however many of alice's messages wait behind her first one.

    Before, it failed because the claim takes the first ``batch_size`` PENDING rows by seq
    *before* the per-key check: when they are all alice's (blocked behind her
    message in backoff), the claim is empty and bob waits for alice's backoff."""
    transport, received = await listen(broker_url("rabbitmq", ""))
    alice = [Message(type="score.changed", data={"n": i}, key="alice") for i in range(4)]
    bob = Message(type="score.changed", data={"n": 0}, key="bob")
    async with database.transaction() as conn:
        await add_to_outbox(conn, *alice, bob)

    faulty = FaultyTransport(transport, fail_ids={alice[0].id})
    relay = fast_relay(
        database, faulty, batch_size=3, max_attempts=100, backoff_base=60, backoff_cap=60
    )
    await relay.run_once()  # alice's first fails: backoff of 30-60 s
    for _ in range(3):  # rounds while she waits
        await relay.run_once()
    state = await statuses(database)
    assert state[alice[0].id] == "PENDING"
    assert state[bob.id] == "SENT", "bob was held back by alice's backoff"
    await received.wait(1)
    assert received.ids == [bob.id]


async def test_a_text_message_arrives_as_the_text_it_was(database: Database, listen: Any) -> None:
    """A message with a non-JSON content type carries the text itself as its data
    (Message's contract, and what ``transport.publish`` delivers). Through the outbox
    it must arrive the same: ``data == "hello"``.

    Before, it failed because the writer stores ``message.data`` as a JSON value and the relay
    publishes that JSON text as the body: the consumer of a ``text/plain`` message
    gets ``'"hello"'`` (quotes included) instead of ``'hello'``."""
    transport, received = await listen(broker_url("rabbitmq", ""))
    text = Message(type="note.written", data="hello", datacontenttype="text/plain")
    async with database.transaction() as conn:
        await add_to_outbox(conn, text)
    assert await fast_relay(database, transport).run_once() == 1
    await received.wait(1)
    [(message, _)] = received.received
    assert message is not None
    assert message.data == "hello"


async def test_a_row_whose_headers_are_not_an_object_goes_dead_and_blocks_nobody(
    database: Database, listen: Any
) -> None:
    """A row that is not a valid message never publishes: the relay marks it DEAD
    with the reason at once (as it does for a row missing a CloudEvents attribute),
    and the rest of the outbox flows.

    Before, it failed because ``Envelope.check()`` raises AttributeError (not DecodeError) when
    the stored headers are a JSON array: ``run_once`` dies with it, so the whole
    batch — every key behind that row — is retried and crashes on every round."""
    transport, received = await listen(broker_url("rabbitmq", ""))
    corrupt, fine = Message(type="t.corrupt", key="a"), Message(type="t.fine", key="b")
    async with database.transaction() as conn:
        await add_to_outbox(conn, corrupt, fine)
        # Written by hand (or double-encoded by some tool): not a JSON object.
        await conn.execute(
            outbox.update().where(outbox.c.event_type == "t.corrupt").values(headers=["oops"])
        )
    relay = fast_relay(database, transport, claims="lease")
    assert await relay.run_once() == 1
    await received.wait(1)
    assert received.ids == [fine.id]
    assert await statuses(database) == {corrupt.id: "DEAD", fine.id: "SENT"}


async def test_stop_after_a_run_that_could_not_start_returns_at_once(database: Database) -> None:
    """A relay whose ``run()`` failed to start (the broker was unreachable; the
    worker will retry it later) is not running: ``stop()`` — what SIGTERM calls —
    returns at once.

    Before, it failed because ``run()`` sets ``_running`` and clears ``_stopped`` *before*
    ``transport.connect()``, outside the try/finally that undoes them: after a
    failed connect the relay looks running forever, and every ``stop()`` waits the
    whole ``lease`` for a run that is not there (SIGTERM during a broker outage
    takes 30 s by default)."""
    unreachable = from_url("amqp://guest:guest@127.0.0.1:1/", channel="nowhere")
    relay = Relay(database, unreachable, claims="lease", lease=8)
    try:
        with pytest.raises(TransportUnavailable):
            await asyncio.wait_for(relay.run(), 30)
        started = time.monotonic()
        await relay.stop()
        assert time.monotonic() - started < 2, "stop() waited for a relay that never ran"
    finally:
        await unreachable.close()


async def test_a_batch_size_below_one_is_refused(database: Database) -> None:
    """``Relay(batch_size=0)`` (``accord outbox relay --batch-size 0``) can never
    publish anything: it is refused with a ConfigurationError, as ``concurrency=0``
    is.

    Before, it failed because batch_size is not checked: the relay claims ``LIMIT 0`` rows,
    and as ``published (0) >= batch_size (0)`` its loop never idles — it spins on
    the database (about a hundred empty rounds a second on SQLite) and never sends
    the backlog."""
    with pytest.raises(ConfigurationError, match="batch_size"):
        Relay(database, from_url("memory://"), batch_size=0)


async def test_data_the_outbox_takes_on_postgresql_it_takes_on_sqlite(
    sqlite_url: str, listen: Any
) -> None:
    """The outbox behaves the same on the embedded default as on PostgreSQL. A
    message whose data holds a datetime is added on PostgreSQL (the writer encodes
    with ``default=str``, as ``messages.encode`` does for a direct publish), so it is
    added on SQLite too and arrives with the same data.

    Before, it failed on SQLite: the SQLAlchemy path stores the payload with the JSON type's
    plain ``json.dumps``, which raises TypeError — reported as a DatabaseError.
    (The same test on PostgreSQL passes: asyncpg's path encodes with ``default=str``.)"""
    transport, received = await listen(broker_url("rabbitmq", ""))
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    message = Message(type="match.scheduled", data={"at": at})
    async with Database(sqlite_url) as database:
        async with database.transaction() as conn:
            await add_to_outbox(conn, message)
        assert await fast_relay(database, transport).run_once() == 1
    await received.wait(1)
    [(got, _)] = received.received
    assert got is not None and got.data == {"at": str(at)}


@pytest.mark.postgres
async def test_the_relay_listens_again_after_losing_its_listening_connection(
    pg_url: str, listen: Any
) -> None:
    """The relay wakes on commit through LISTEN/NOTIFY, and keeps doing so when its
    listening connection is lost (a server restart, a failover, an idle-session
    timeout, ``pg_terminate_backend``): it listens again, so a commit after that
    still brings the message out at once, not at the next poll.

    Before, it failed because ``run()`` calls ``database.listen()`` once; when that connection
    dies nothing notices or re-listens, and the relay falls back to polling every
    ``poll_interval`` (here an hour) for as long as it runs."""
    database = Database(pg_url)
    transport, received = await listen(broker_url("rabbitmq", ""))
    first, second = Message(type="order.placed"), Message(type="order.placed")
    async with database.transaction() as conn:
        await add_to_outbox(conn, first)
    relay = Relay(database, transport, poll_interval=3600, concurrency=1)
    task = asyncio.create_task(relay.run())
    try:
        await received.wait(1)
        async with database.connect() as conn:
            killed = await conn.scalar(
                sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "AND query LIKE 'LISTEN%'"
                )
            )
        assert killed == 1  # the relay's listening connection, and only it
        await asyncio.sleep(1)
        async with database.transaction() as conn:
            await add_to_outbox(conn, second)
        await received.wait(2, timeout=10)
        assert received.ids == [first.id, second.id]
    finally:
        await relay.stop()
        await asyncio.wait_for(task, 10)
        await database.dispose()


async def test_after_a_database_outage_an_idle_relay_polls_at_its_poll_interval_again(
    sqlite_url: str, make_transport: Any
) -> None:
    """While the database fails, the relay backs off between rounds (up to 5 s);
    once a round succeeds again it is back to ``poll_interval`` — on SQLite, with
    no NOTIFY, that is what brings a new message out.

    Before, it failed because the outage counter is only reset inside ``_publish``, i.e. when a
    round had rows to publish: after the outage, empty rounds keep the backed-off
    idle time (here 4 s, up to 30 s), so the next committed message waits for it
    instead of ``poll_interval`` (0.05 s)."""
    transport = make_transport(broker_url("rabbitmq", ""))
    await transport.connect()
    database = Database(sqlite_url)
    relay = fast_relay(database, transport, concurrency=1, claims="lease")
    task = asyncio.create_task(relay.run())
    try:
        await asyncio.sleep(0.3)
        async with database.transaction() as conn:  # the outage: every round fails
            await conn.execute(sa.text("ALTER TABLE accord_outbox RENAME TO accord_outbox_away"))
        await asyncio.sleep(5)  # four failed rounds: 0.5, 1, 2, then 4 s apart
        async with database.transaction() as conn:  # the database is back
            await conn.execute(sa.text("ALTER TABLE accord_outbox_away RENAME TO accord_outbox"))
        await asyncio.sleep(3.3)  # a round has succeeded (with nothing to send) since
        message = Message(type="order.placed")
        async with database.transaction() as conn:
            await add_to_outbox(conn, message)
        await asyncio.sleep(1.5)  # thirty times poll_interval
        assert (await statuses(database)).get(message.id) == "SENT"
    finally:
        await relay.stop()
        await asyncio.wait_for(task, 10)
        await database.dispose()


class OutboxAwayAfterPublishing(FaultyTransport):
    """Publishes, then takes the outbox table away once: the broker confirmed the
    batch, and the settle that follows fails until the test puts it back."""

    def __init__(self, inner: Any, database: Database) -> None:
        super().__init__(inner)
        self.database = database
        self.cut = False

    async def publish_envelopes(self, envelopes: Any) -> None:
        await super().publish_envelopes(envelopes)
        if not self.cut:
            self.cut = True
            async with self.database.transaction() as conn:
                await conn.execute(sa.text("ALTER TABLE accord_outbox RENAME TO outbox_away"))


async def test_a_leased_batch_whose_settle_failed_is_settled_when_the_database_answers(
    sqlite_url: str, listen: Any
) -> None:
    """The broker confirmed a leased batch, then the database went away before the
    rows were marked SENT: a later round marks them once the database answers,
    instead of leaving them PENDING (their keys held back) until the lease runs out
    and publishing them again."""
    database = Database(sqlite_url)
    inner, received = await listen(broker_url("rabbitmq", ""))
    messages = [Message(type="order.placed", key=f"k{i % 2}") for i in range(6)]
    async with database.transaction() as conn:
        await add_to_outbox(conn, *messages)
    transport = OutboxAwayAfterPublishing(inner, database)
    relay = fast_relay(database, transport, claims="lease", lease=30, concurrency=1)
    task = asyncio.create_task(relay.run())
    try:
        later = Message(type="order.placed", key="k0")  # behind the cut batch's key

        async def all_sent() -> bool:
            found = await statuses(database)
            return len(found) == 7 and set(found.values()) == {"SENT"}

        await received.wait(6)
        assert transport.cut
        await asyncio.sleep(1)  # rounds fail meanwhile
        async with database.transaction() as conn:  # the database is back
            await conn.execute(sa.text("ALTER TABLE outbox_away RENAME TO accord_outbox"))
            await add_to_outbox(conn, later)
        await wait_for(all_sent, 10)  # well inside the 30 s lease
        await received.wait(7)
        await asyncio.sleep(0.5)
        assert sorted(received.ids) == sorted(m.id for m in [*messages, later])  # once each
    finally:
        await relay.stop()
        await asyncio.wait_for(task, 10)
        await database.dispose()


def _dead_messages(url: str, *messages: Message, last_error: str) -> None:
    async def seed() -> None:
        async with Database(url) as database, database.transaction() as conn:
            await add_to_outbox(conn, *messages)
            await conn.execute(outbox.update().values(status="DEAD", last_error=last_error))

    asyncio.run(seed())


def _accord(*args: str, columns: int = 80) -> Any:
    from typer.testing import CliRunner

    from accord.cli.app import _register_subcommands, app

    _register_subcommands()
    return CliRunner().invoke(app, list(args), env={"COLUMNS": str(columns)})


def test_dead_list_shows_ids_whole_in_an_80_column_terminal(sqlite_url: str) -> None:
    """``accord outbox dead list`` exists so the operator can pick ids to ``show``,
    ``replay`` or ``purge``: every id is printed whole, also in an 80-column
    terminal (and when piped, where Rich assumes 80 columns).

    Before, it failed because the table lets Rich shrink the id column: with a last error of
    ordinary length the ids come out cut (``98db94cd-0a45-43e4…``) and cannot be
    copied into ``accord outbox dead replay``."""
    message = Message(type="order.placed", key="k")
    _dead_messages(
        sqlite_url,
        message,
        last_error="TransportError: broker refused the message: NOT_FOUND - no exchange",
    )
    listed = _accord("outbox", "dead", "list", "--db", sqlite_url)
    assert listed.exit_code == 0, listed.output
    assert message.id in listed.output


@pytest.mark.redis
async def test_a_message_the_broker_refused_is_never_marked_sent_whatever_its_id_looks_like(
    database: Database, make_transport: Any
) -> None:
    """A row is marked SENT only after the broker confirmed it. ``add_to_outbox``
    accepts any id ``uuid.UUID()`` parses — ``uuid4().hex``, an upper-case GUID — so
    for such a message too, a publish the broker refuses leaves the row PENDING
    with one attempt spent and the broker's error.

    Before, it failed because the row's id is stored canonical (``str(uuid.UUID(id))``) while
    the message keeps the id it was given (``ce-id``); the relay publishes with
    the canonical id but the Redis transport (``Transport.publish_envelopes``'
    default) reports failures by ``ce-id``, so the relay finds no failure for the
    row and marks the refused message SENT: it is lost."""
    import redis.asyncio as aioredis

    from tests.conftest import REDIS_URL

    transport = make_transport(broker_url("redis", ""))
    await transport.connect()
    message = Message(type="order.placed", id=uuid.uuid4().hex)
    async with database.transaction() as conn:
        await add_to_outbox(conn, message)
    client = aioredis.from_url(REDIS_URL)
    try:
        await client.set(transport.stream, "not a stream")  # every XADD now fails: WRONGTYPE
        relay = fast_relay(database, transport, max_attempts=5)
        assert await relay.run_once() == 0, "the broker confirmed nothing"
        async with database.connect() as conn:
            row = (await conn.execute(sa.select(outbox))).one()
        assert (row.status, row.retry_count) == ("PENDING", 1)
        assert "WRONGTYPE" in (row.last_error or "")
    finally:
        await client.delete(transport.stream)
        await client.aclose()


async def test_a_text_message_whose_text_cannot_be_encoded_goes_dead_and_stalls_nothing(
    sqlite_url: str,
) -> None:
    """SQLite (the embedded default) stores a ``text/plain`` message whose text holds a
    lone surrogate (JSON ``"\\ud800"``). The relay must settle it (DEAD, as any row that
    is not a publishable message) and publish the other rows of its batch.

    Before the fix, it failed because ``_envelope`` turns the stored JSON
    string back into text and calls ``text.encode()``: UnicodeEncodeError is not a
    DecodeError, so it escapes ``_publish``; the whole leased batch stays unsettled, is
    claimed again when the lease runs out, and fails again, for ever (every batch
    starts with that row: the outbox stalls behind it). Before the commit the row was
    published as its JSON text."""
    database = Database(sqlite_url)
    await database.upgrade()
    transport = SqlTransport(database=database, channel=f"review-{uuid.uuid4().hex[:8]}")
    try:
        await transport.connect()
        bad = Message(type="note.written", data="\ud800", datacontenttype="text/plain", key="a")
        good = Message(type="note.written", data="fine", datacontenttype="text/plain", key="b")
        async with database.transaction() as conn:
            await add_to_outbox(conn, bad, good)
        relay = Relay(database, transport, poll_interval=0.05, lease=60)
        await relay.run_once()  # must not raise
        state = await statuses(database)
        assert state[good.id] == "SENT"
        assert state[bad.id] == "DEAD"
    finally:
        await transport.close()
        await database.dispose()


@pytest.mark.postgres
async def test_a_claim_over_a_large_backlog_is_not_jit_compiled(pg_url: str) -> None:
    """A relay catching up on a large backlog (here 60 000 due rows of one key, nothing
    blocked) must claim in a few milliseconds, as before the commit: the claim
    statement's estimated cost must stay below PostgreSQL's ``jit_above_cost``
    (default 100 000), or JIT be off for it (e.g. ``server_settings={"jit": "off"}`` on
    Accord's connections): every claim must not pay for JIT compilation.

    It failed with a per-row NOT EXISTS in ``_CANDIDATES``, which made the planner
    estimate the claim at ~3.3 x the PENDING row count (656 000 for 200 000 rows,
    against ~1 500 before): past ~30 000 pending rows each claim is JIT-compiled.
    Measured at 200 000 rows: 200-300 ms per claim (JIT 250-370 ms of it) against
    5 ms for the claim before the commit, when nothing at all is blocked."""
    from accord.outbox._claim import _CLAIM_AHEAD_AND_LEASE_DRIVER, _CLAIM_AND_LEASE_DRIVER

    database = Database(pg_url)
    driver = await database.connect_driver()
    explained: dict[str, Any] = {}
    try:
        await driver.execute("SET jit = on")  # whatever the server's default
        threshold = float(await driver.fetchval("SHOW jit_above_cost"))
        await driver.execute(
            """
            INSERT INTO accord_outbox (id, event_type, key, payload, headers, status,
                                       retry_count, available_at, created_at)
            SELECT gen_random_uuid(), 't', 'hot', '{}'::jsonb, '{}'::jsonb, 'PENDING', 0,
                   now() - interval '1 minute', now()
            FROM generate_series(1, 60000)
            """
        )
        await driver.execute("VACUUM ANALYZE accord_outbox")
        now = datetime.now(UTC)
        lease = now + timedelta(seconds=30)
        # The first look-ahead window, the second (past seq 200), the claim over all.
        for name, statement, args in [
            ("first window", _CLAIM_AHEAD_AND_LEASE_DRIVER, (now, 100, 200, 0, [], lease)),
            ("second window", _CLAIM_AHEAD_AND_LEASE_DRIVER, (now, 100, 200, 200, [], lease)),
            ("claim over every due row", _CLAIM_AND_LEASE_DRIVER, (now, 100, lease)),
        ]:
            tx = driver.transaction()
            await tx.start()
            try:
                [explained[name]] = json.loads(
                    await driver.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, *args)
                )
            finally:
                await tx.rollback()
    finally:
        await driver.close()
        await database.dispose()
    for name, plan in explained.items():
        cost = plan["Plan"]["Total Cost"]
        assert "JIT" not in plan, (
            f"the {name} is estimated at {cost:.0f} (jit_above_cost {threshold:.0f}): "
            f"JIT-compiled on every claim, {plan['JIT']['Timing']['Total']:.0f} ms"
        )


async def test_a_row_given_back_without_an_error_keeps_its_last_attempts_error(
    database: Database,
) -> None:
    """A retrying row that a round gives back untried (held behind its key, a
    cancelled round, an expired lease) kept no error: the operator lost why it was
    retrying. It keeps its last attempt's error; a new failure replaces it."""
    message = Message(type="order.placed", key="k")
    async with database.transaction() as conn:
        await add_to_outbox(conn, message)
        await conn.execute(outbox.update().values(retry_count=2, last_error="refused (attempt 2)"))
    now = datetime.now(UTC)
    async with database.transaction() as conn:
        seq = await conn.scalar(sa.select(outbox.c.seq))
        given_back = Settlement(seq, "PENDING", now, 2, None)
        await settle(conn, now=now, sent=[], others=[given_back])
        assert await conn.scalar(sa.select(outbox.c.last_error)) == "refused (attempt 2)"
        failed = Settlement(seq, "PENDING", now, 3, "refused (attempt 3)")
        await settle(conn, now=now, sent=[], others=[failed])
        assert await conn.scalar(sa.select(outbox.c.last_error)) == "refused (attempt 3)"
