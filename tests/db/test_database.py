from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from accord import Message, add_to_outbox, outbox_transaction
from accord.db import Database
from accord.db.database import on_commit
from accord.db.migrations import MIGRATIONS
from accord.db.schema import outbox, queue, schema_version
from accord.errors import ConfigurationError, DatabaseError
from accord.eventstore import EventStore, NewEvent
from accord.testing import wait_for


async def test_upgrade_is_idempotent_and_versioned(database: Database) -> None:
    latest = MIGRATIONS[-1][0]
    assert await database.upgrade() == latest
    assert await database.upgrade() == latest
    async with database.transaction() as conn:
        versions = (await conn.execute(sa.select(schema_version.c.version))).scalars().all()
    assert versions == [n for n, _, _ in MIGRATIONS]


async def test_upgrade_from_version_1_adds_the_inbox_holds_table(database: Database) -> None:
    await database.upgrade()
    async with database.transaction() as conn:  # back to what version 1 left
        await conn.execute(sa.text("DROP TABLE accord_inbox_holds"))
        await conn.execute(schema_version.delete().where(schema_version.c.version > 1))
    assert await database.upgrade() == MIGRATIONS[-1][0]
    async with database.connect() as conn:
        assert await conn.scalar(sa.text("SELECT count(*) FROM accord_inbox_holds")) == 0


async def test_upgrade_from_version_4_indexes_dead_letters(database: Database) -> None:
    """A database of version 4 gets the dead-letter indexes by message and for
    replays (dead-lettering looked up a message's earlier letter by reading every
    letter of its consumer)."""
    wanted = {"ix_accord_dead_letters_message", "ix_accord_dead_letters_replay"}

    async def indexes() -> set[str]:
        async with database.connect() as conn:
            found = await conn.run_sync(
                lambda sync: sa.inspect(sync).get_indexes("accord_dead_letters")
            )
        return {index["name"] for index in found} & wanted

    await database.upgrade()
    assert await indexes() == wanted
    async with database.transaction() as conn:  # back to what version 4 left
        for name in wanted:
            await conn.execute(sa.text(f"DROP INDEX {name}"))
        await conn.execute(schema_version.delete().where(schema_version.c.version > 4))
    assert await database.upgrade() == MIGRATIONS[-1][0]
    assert await indexes() == wanted


async def test_upgrade_from_version_5_names_each_deadlines_saga(database: Database) -> None:
    """A database of version 5 gets the saga name on each deadline, filled in from
    the sagas, and the (saga_name, due_at) index in place of the one on due_at
    alone. The timer then fires the deadlines it had, and deletes the one whose
    saga was already gone (its name stays NULL)."""
    from accord.db.schema_sagas import deadlines
    from accord.sagas import Orchestrator, Saga, command
    from accord.transports.sql import SqlTransport

    await database.upgrade()
    saga = Saga("migrated").step("ask", command("migrated.ask"), timeout=60)
    transport = SqlTransport(database.url, channel=f"c{uuid.uuid4().hex[:8]}")
    orchestrator = Orchestrator(database, transport, [saga])
    saga_id = await orchestrator.start("migrated", {})
    async with database.transaction() as conn:  # back to what version 5 left
        (row,) = (await conn.execute(sa.select(deadlines))).mappings().all()
        assert row["saga_name"] == "migrated"
        await conn.execute(sa.text("DROP TABLE accord_deadlines"))
        before = sa.MetaData()
        old = sa.Table(
            deadlines.name,
            before,
            *(c._copy() for c in deadlines.columns if c.name != "saga_name"),
            sa.Index("ix_accord_deadlines_due", "due_at"),
        )
        await conn.run_sync(before.create_all)
        kept = {k: v for k, v in row.items() if k != "saga_name"}
        await conn.execute(old.insert(), [kept, {**kept, "saga_id": "gone"}])
        await conn.execute(schema_version.delete().where(schema_version.c.version > 5))
    assert await database.upgrade() == MIGRATIONS[-1][0]
    async with database.connect() as conn:
        names = dict(
            (await conn.execute(sa.select(deadlines.c.saga_id, deadlines.c.saga_name))).all()
        )
        found = await conn.run_sync(lambda sync: sa.inspect(sync).get_indexes(deadlines.name))
    assert names == {saga_id: "migrated", "gone": None}
    assert {index["name"] for index in found} == {"ix_accord_deadlines_name_due"}
    later = datetime.now(UTC) + timedelta(minutes=5)
    assert await orchestrator.fire_due(later) == 1
    async with database.connect() as conn:
        left = (await conn.execute(sa.select(deadlines.c.saga_id))).scalars().all()
    assert "gone" not in left


@pytest.mark.parametrize("version", [7, 9, 10])
async def test_upgrade_indexes_participants_records_for_pruning_only(
    database: Database, version: int
) -> None:
    """Pruning a participant's records reads a range of (participant, at) over its
    records, not its pruning marks (a partial index, which lookups by saga cannot
    take). A database at version 8 or 9 has a whole (participant, at) index, which
    PostgreSQL took for lookups by saga and scanned; one at version 10 (as first
    released) an (at, participant) one, which made pruning walk every other
    participant's older records: the upgrade replaces either."""
    new = "ix_accord_saga_participations_prune"
    before = {
        8: ("ix_accord_saga_participations_at", "participant, at"),
        10: ("ix_accord_saga_participations_time", "at, participant"),
    }

    async def indexes() -> dict[str, list[str]]:
        async with database.connect() as conn:
            found = await conn.run_sync(
                lambda sync: sa.inspect(sync).get_indexes("accord_saga_participations")
            )
        return {index["name"]: index["column_names"] for index in found if index["name"]}

    await database.upgrade()
    assert (await indexes()).get(new) == ["participant", "at"]
    async with database.transaction() as conn:  # back to what that version left
        await conn.execute(sa.text(f"DROP INDEX {new}"))
        if version >= 8:
            name, columns = before[10 if version >= 10 else 8]
            await conn.execute(
                sa.text(f"CREATE INDEX {name} ON accord_saga_participations ({columns})")
            )
        await conn.execute(schema_version.delete().where(schema_version.c.version > version))
    assert new not in await indexes()
    assert await database.upgrade() == MIGRATIONS[-1][0]
    assert await indexes() == {new: ["participant", "at"]}


async def test_the_sql_transports_queue_never_reuses_a_seq_on_sqlite(sqlite_url: str) -> None:
    """SQLite gives the highest rowid again once its row is deleted, unless the table
    is AUTOINCREMENT; a delivery settled late must never meet a newer message under its
    seq. An existing file (version 2) is rebuilt, its rows kept."""
    async with Database(sqlite_url) as db:
        await db.upgrade()
        async with db.transaction() as conn:  # back to what version 2 left
            await conn.execute(sa.text("DROP TABLE accord_queue"))
            await conn.execute(sa.text("DROP INDEX IF EXISTS ix_accord_queue_channel"))
            before = sa.MetaData()
            old = queue.to_metadata(before)
            old.dialect_options["sqlite"]["autoincrement"] = False
            await conn.run_sync(before.create_all)
            await conn.execute(schema_version.delete().where(schema_version.c.version > 2))
            row = {"channel": "c", "type": "t", "headers": {}, "body": b"x"}
            for n in (1, 2):
                await conn.execute(
                    queue.insert().values(message_id=f"m{n}", created_at=datetime.now(UTC), **row)
                )
        assert await db.upgrade() == MIGRATIONS[-1][0]
        async with db.transaction() as conn:
            ddl = await conn.scalar(
                sa.text("SELECT sql FROM sqlite_master WHERE name = 'accord_queue'")
            )
            kept = (await conn.execute(sa.select(queue.c.seq, queue.c.message_id))).all()
            await conn.execute(queue.delete().where(queue.c.seq == 2))
            await conn.execute(
                queue.insert().values(message_id="m3", created_at=datetime.now(UTC), **row)
            )
            newest = await conn.scalar(sa.select(queue.c.seq).where(queue.c.message_id == "m3"))
    assert "AUTOINCREMENT" in ddl.upper()
    assert [tuple(r) for r in kept] == [(1, "m1"), (2, "m2")]
    assert newest == 3


async def test_sqlite_runs_in_wal_mode(sqlite_url: str) -> None:
    async with Database(sqlite_url) as db, db.connect() as conn:
        mode = await conn.scalar(sa.text("PRAGMA journal_mode"))
        timeout = await conn.scalar(sa.text("PRAGMA busy_timeout"))
    assert mode == "wal"
    assert timeout >= 1000


async def test_driver_errors_are_translated(database: Database) -> None:
    with pytest.raises(DatabaseError, match="database transaction failed"):
        async with database.transaction() as conn:
            await conn.execute(sa.text("SELECT * FROM no_such_table"))


@pytest.mark.parametrize("block", ["transaction", "connect", "outbox_transaction"])
@pytest.mark.parametrize(
    "error", [TimeoutError(), ConnectionRefusedError(111, "an HTTP call was refused")]
)
async def test_the_callers_own_os_errors_pass_through_a_block_untranslated(
    database: Database, block: str, error: OSError
) -> None:
    """An OSError from the caller's own code inside a block (its asyncio.timeout
    expiring, a service it calls refusing) is not the database unreachable: it
    comes out as it is, and the block's statements are rolled back."""
    await database.upgrade()
    opened = {
        "transaction": database.transaction,
        "connect": database.connect,
        "outbox_transaction": lambda: outbox_transaction(database),
    }[block]
    with pytest.raises(type(error)) as raised:
        async with opened() as conn:
            await conn.execute(
                schema_version.insert().values(version=999, applied_at=datetime.now(UTC))
            )
            raise error
    assert raised.value is error
    async with database.connect() as conn:
        kept = await conn.scalar(sa.select(sa.func.count()).where(schema_version.c.version == 999))
    assert kept == 0


async def test_a_timeout_of_the_caller_inside_a_block_is_a_timeout_error(
    database: Database,
) -> None:
    with pytest.raises(TimeoutError):
        async with database.transaction(), asyncio.timeout(0.01):
            await asyncio.sleep(5)


def test_unsupported_url_names_the_fix_and_hides_the_password() -> None:
    with pytest.raises(ConfigurationError, match="sqlite\\+aiosqlite") as raised:
        Database("mysql://root:s3cret@localhost/x")
    assert "s3cret" not in str(raised.value)


@pytest.mark.parametrize(
    "url",
    ["bogus", "postgresql://postgres@127.0.0.1:abc/db", "sqlite+pysqlite:///x.db"],
    ids=["not a URL", "a port that is not a number", "a driver that is not async"],
)
def test_an_unusable_url_is_a_configuration_error_that_shows_a_usable_one(url: str) -> None:
    """SQLAlchemy's ArgumentError, InvalidRequestError and a bare ValueError escaped."""
    with pytest.raises(ConfigurationError, match=r"use sqlite\+aiosqlite:///file\.db or"):
        Database(url)


def test_a_sqlite_file_whose_folder_cannot_be_made_is_a_configuration_error(
    tmp_path: Path,
) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigurationError, match="cannot create the folder of the SQLite"):
        Database(f"sqlite:///{tmp_path / 'a-file' / 'x.db'}")


@pytest.mark.postgres
async def test_libpq_url_options_work_on_the_pool_and_the_event_stores_connections(
    pg_url: str,
) -> None:
    """URLs as libpq, psycopg and hosting dashboards write them (``sslmode``,
    ``connect_timeout``) made asyncpg raise a raw TypeError on the first connection.
    They are renamed to asyncpg's ``ssl`` and ``timeout``, for the pool and for the
    connections the PostgreSQL event store opens on its own."""
    async with Database(f"{pg_url}?sslmode=disable&connect_timeout=5") as db:
        async with db.transaction() as conn:
            assert await conn.scalar(sa.text("SELECT 1")) == 1
        store = EventStore(db)
        await store.append("s-1", [NewEvent("t.x", {"a": 1})])
        assert [e.data for e in await store.read_stream("s-1")] == [{"a": 1}]
        await store.close()


def test_a_url_option_asyncpg_does_not_take_is_refused_by_name() -> None:
    with pytest.raises(ConfigurationError, match="asyncpg does not take: sslrootcrt;"):
        Database("postgresql://u@h/d?sslrootcrt=x")


async def test_nan_in_json_is_refused_as_a_value_error_on_both_databases(
    database: Database,
) -> None:
    """SQLite stored a NaN (PostgreSQL's JSONB refuses it) that no strict JSON parser
    reads back; both now refuse it the same way, as the caller's value error."""
    with pytest.raises(ValueError, match="a value cannot be stored: Out of range float"):
        async with database.transaction() as conn:
            await add_to_outbox(conn, Message(type="t.x", data={"x": float("nan")}))
    async with database.connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(outbox)) == 0


async def test_a_value_json_cannot_hold_is_refused_as_a_type_error(database: Database) -> None:
    """An object JSON has no form for is the caller's error, not a failed connection."""
    probe = sa.Table(f"json_probe_{uuid.uuid4().hex[:8]}", sa.MetaData(), sa.Column("v", sa.JSON))
    with pytest.raises(TypeError, match="a value cannot be stored: Object of type object"):
        async with database.transaction() as conn:
            await conn.run_sync(probe.create)
            await conn.execute(probe.insert().values(v={"x": object()}))


def test_plain_urls_get_their_async_driver(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert Database(f"sqlite:///{tmp_path}/a.db").url.startswith("sqlite+aiosqlite://")
    assert Database("postgresql://u@h/d").url.startswith("postgresql+asyncpg://")


async def test_timestamps_come_back_timezone_aware(database: Database) -> None:
    async with database.transaction() as conn:
        applied = await conn.scalar(sa.select(schema_version.c.applied_at))
    assert applied.tzinfo is not None
    assert abs((datetime.now(UTC) - applied).total_seconds()) < 600


@pytest.mark.postgres
async def test_a_transaction_on_an_unreachable_server_is_a_database_error() -> None:
    db = Database("postgresql+asyncpg://postgres@127.0.0.1:1/nowhere")
    with pytest.raises(DatabaseError, match="database transaction failed: cannot reach"):
        async with db.transaction():
            pass
    await db.dispose()


@pytest.mark.postgres
async def test_listen_on_an_unreachable_server_is_a_database_error() -> None:
    db = Database("postgresql+asyncpg://postgres@127.0.0.1:1/nowhere")
    with pytest.raises(DatabaseError, match="listening on 'accord_outbox' failed"):
        await db.listen("accord_outbox", lambda _payload: None)
    await db.dispose()


@pytest.mark.postgres
async def test_listen_delivers_notifications_and_stop_releases_the_connection(pg_url: str) -> None:
    db = Database(pg_url)
    got: list[str] = []
    stop = await db.listen("accord_test_channel", got.append)
    async with db.transaction() as conn:
        await conn.execute(sa.text("SELECT pg_notify('accord_test_channel', 'hello')"))
    await wait_for(lambda: got, 5)
    assert got == ["hello"]
    await stop()
    assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    await db.dispose()


@pytest.mark.postgres
async def test_dispose_stops_the_listeners_left_running(pg_url: str) -> None:
    """A listener whose owner never stopped it (a transport not closed) holds its
    connection outside the pool; disposing the Database ends it, so no connection
    is left to the garbage collector and the server sees the session end."""
    db = Database(pg_url)
    await db.listen("accord_test_channel", lambda _payload: None)
    await db.listen("accord_other_channel", lambda _payload: None)
    assert db.engine.pool.checkedout() == 2  # type: ignore[attr-defined]
    await db.dispose()
    assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.mark.postgres
async def test_a_pooled_connection_the_server_closed_is_replaced(pg_url: str) -> None:
    db = Database(pg_url)
    async with db.transaction() as conn:
        pid = (await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
    async with db.transaction() as conn:  # the same pooled connection is reused
        assert (await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one() == pid
    admin = Database(pg_url)
    async with admin.transaction() as conn:
        await conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    await admin.dispose()
    await wait_for(lambda: db.engine.pool.checkedin() == 1, 5)  # type: ignore[attr-defined]
    await asyncio.sleep(0.2)  # the event loop sees the server close the socket
    async with db.transaction() as conn:  # no error: a fresh connection is used
        assert (await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one() != pid
    await db.dispose()


async def test_on_commit_runs_once_when_the_transaction_commits_and_never_after_a_rollback(
    database: Database,
) -> None:
    calls: list[str] = []
    async with database.engine.connect() as conn:
        await conn.execute(sa.text("SELECT 1"))
        on_commit(conn, lambda: calls.append("rolled back"))
        await conn.rollback()
        await conn.execute(sa.text("SELECT 1"))
        on_commit(conn, lambda: calls.append("committed"))
        assert calls == []
        await conn.commit()
        assert calls == ["committed"]
        await conn.execute(sa.text("SELECT 1"))
        await conn.commit()  # a later transaction on the same connection: nothing more
    assert calls == ["committed"]


async def test_on_commit_keeps_one_pair_of_listeners_however_many_transactions(
    database: Database,
) -> None:
    calls: list[int] = []
    async with database.engine.connect() as conn:
        sync = conn.sync_connection
        assert sync is not None
        for n in range(50):
            await conn.execute(sa.text("SELECT 1"))
            on_commit(conn, lambda n=n: calls.append(n))
            on_commit(conn, lambda n=n: calls.append(-n))
            await (conn.commit() if n % 2 else conn.rollback())
        listeners = len(sync.dispatch.commit) + len(sync.dispatch.rollback)
    assert listeners == 2
    assert calls == [x for n in range(1, 50, 2) for x in (n, -n)]


@pytest.mark.postgres
async def test_a_driver_timeout_inside_a_transaction_is_still_a_database_error(
    pg_url: str,
) -> None:
    """asyncpg raises the builtin TimeoutError (an OSError) for command_timeout and
    SQLAlchemy passes it through: raised inside the database layer, it is the
    database's, not the caller's own, and becomes a DatabaseError."""
    database = Database(pg_url, connect_args={"command_timeout": 0.3})
    try:
        with pytest.raises(DatabaseError):
            async with database.transaction() as conn:
                await conn.execute(sa.text("SELECT pg_sleep(3)"))
    finally:
        await database.dispose()


async def test_upgrade_refuses_a_schema_a_newer_accord_migrated(database: Database) -> None:
    """Reporting success at a version this Accord does not know (after a rollback of
    the code, say) would let old code run against a schema it was not written for."""
    latest = MIGRATIONS[-1][0]
    async with database.transaction() as conn:
        await conn.execute(
            schema_version.insert().values(version=latest + 1, applied_at=datetime.now(UTC))
        )
    with pytest.raises(ConfigurationError, match=f"at version {latest + 1}, newer than this"):
        await database.upgrade()


@pytest.mark.postgres
async def test_a_libpq_connect_timeout_of_zero_means_wait_indefinitely(pg_url: str) -> None:
    """The commit translates libpq's ``connect_timeout`` for asyncpg. In libpq (and in
    every psycopg / hosting-dashboard URL) ``connect_timeout=0`` means *no* timeout:
    such a URL must connect like one without the option.

    Before the fix, it failed because ``_asyncpg_options`` passes the number on
    as asyncpg's ``timeout=0.0``, a deadline that has already passed: every connection
    attempt times out at once (DatabaseError ... TimeoutError) and the URL cannot be
    used at all."""
    libpq_url = pg_url.replace("postgresql+asyncpg://", "postgresql://")
    database = Database(f"{libpq_url}?connect_timeout=0")
    try:
        async with database.connect() as conn:
            assert await conn.scalar(sa.text("SELECT 1")) == 1
    finally:
        await database.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize(
    "connect_args",
    [
        # SQLAlchemy's documented PgBouncer set-up for asyncpg: options of SQLAlchemy's
        # asyncpg adapter, not of asyncpg.connect().
        {"prepared_statement_name_func": lambda: f"__asyncpg_{uuid.uuid4()}__"},
        {"prepared_statement_cache_size": 0},
    ],
    ids=["prepared_statement_name_func", "prepared_statement_cache_size"],
)
async def test_the_event_stores_own_connections_take_the_engines_connect_args(
    pg_url: str, connect_args: dict[str, Any]
) -> None:
    """``Database(url, connect_args=...)`` with the options SQLAlchemy documents for its
    asyncpg dialect must work for every PostgreSQL connection Accord opens, the event
    store's own included (before the commit the store ignored connect_args and
    connected with the URL alone: it worked).

    Before the fix, it failed because ``Database.connect_driver()`` passes
    ``connect_args`` whole to ``asyncpg.connect()``: it pops
    ``prepared_statement_cache_size`` from the URL's options only, and knows nothing
    of ``prepared_statement_name_func``; asyncpg raises TypeError (unexpected keyword
    argument), which the store does not even translate into a DatabaseError."""
    from accord.eventstore import EventStore, NewEvent

    database = Database(pg_url, connect_args=connect_args)
    store = EventStore(database)
    try:
        async with database.connect() as conn:  # the engine itself takes them
            assert await conn.scalar(sa.text("SELECT 1")) == 1
        await store.append("order-1", [NewEvent(type="order.placed", data={"n": 1})])
        assert [e.type for e in await store.read_stream("order-1")] == ["order.placed"]
    finally:
        await store.close()
        await database.dispose()


async def test_a_read_neither_waits_for_a_writer_nor_holds_one_back(database: Database) -> None:
    """SQLite: read() begins deferred, so a read goes on while a write transaction
    holds the file's write lock, and a writer commits while a read is open (neither
    waits out the 30 s busy timeout)."""
    await database.upgrade()
    key = f"read-{uuid.uuid4().hex[:8]}"
    count = sa.select(sa.func.count()).select_from(outbox).where(outbox.c.key == key)
    async with asyncio.timeout(5):
        async with database.transaction() as writer:
            await add_to_outbox(writer, Message(type="t.Read", key=key))
            async with database.read() as reader:
                assert await reader.scalar(count) == 0
        async with database.read() as reader:
            assert await reader.scalar(count) == 1  # its transaction is open now
            async with database.transaction() as writer:
                await add_to_outbox(writer, Message(type="t.Read", key=key))
    async with database.read() as reader:
        assert await reader.scalar(count) == 2


@pytest.mark.parametrize("where", ["connection", "engine"])
async def test_an_autocommit_connection_commits_each_statement(db_url: str, where: str) -> None:
    """On SQLite an AUTOCOMMIT connection still began a transaction (BEGIN IMMEDIATE),
    rolled back when the connection closed: its writes vanished (PostgreSQL kept them)."""
    options = {"isolation_level": "AUTOCOMMIT"} if where == "engine" else {}
    database = Database(db_url, **options)
    try:
        await database.upgrade()
        message = Message(type="t.autocommit")
        async with database.connect() as conn:
            if where == "connection":
                await conn.execution_options(isolation_level="AUTOCOMMIT")
            await add_to_outbox(conn, message)
        async with database.read() as conn:
            found = await conn.scalar(
                sa.select(sa.func.count())
                .select_from(outbox)
                .where(outbox.c.event_type == "t.autocommit")
            )
        assert found == 1
    finally:
        await database.dispose()


async def test_a_retried_failure_is_one_line_while_the_database_cannot_be_reached(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Loops that retry (the saga timer, dead-letter replays, the flow tracker) logged
    a whole traceback at every retry of an outage; a failed statement keeps its."""
    from accord.db.database import log_retried_failure

    logger = logging.getLogger("tests.retried")
    failures: list[BaseException] = []
    for url, sql in (
        ("postgresql+asyncpg://postgres@127.0.0.1:1/nowhere", "SELECT 1"),
        (pg_url, "SELECT * FROM no_such_table"),
    ):
        database = Database(url)
        try:
            async with database.connect() as conn:
                await conn.execute(sa.text(sql))
        except Exception as exc:
            failures.append(exc)
        finally:
            await database.dispose()
    gone, failed = failures
    with caplog.at_level(logging.WARNING, logger="tests.retried"):
        log_retried_failure(logger, gone, "round %d failed", 1)
        log_retried_failure(logger, failed, "round %d failed", 2)
    outage, statement = caplog.records
    assert outage.levelno == logging.WARNING and outage.exc_info is None
    assert outage.getMessage().startswith("round 1 failed: the database is unavailable (")
    assert "\n" not in outage.getMessage()
    assert statement.levelno == logging.ERROR and statement.exc_info is not None
    assert statement.getMessage() == "round 2 failed"
