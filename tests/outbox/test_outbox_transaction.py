"""outbox.transaction(): a transaction whose outbox rows go to PostgreSQL with its
COMMIT. The promise is add()'s: the rows commit with the caller's statements or not
at all, and they are the rows add() writes; the connection goes back to the pool
outside any transaction whatever happened in the block."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncSession

from accord import Database, Message, add_to_outbox, outbox_transaction
from accord.db.database import on_commit
from accord.db.schema import outbox
from accord.errors import ConfigurationError, DatabaseError
from accord.outbox import NOTIFY_CHANNEL
from accord.outbox.writer import message_from_row


class Boom(Exception):
    pass


ORDERS = "CREATE TABLE t_orders (id text PRIMARY KEY)"


@pytest.fixture
async def shop(database: Database) -> AsyncIterator[Database]:
    async with database.transaction() as conn:
        await conn.execute(sa.text(ORDERS))
    yield database


async def _orders(db: Database) -> list[str]:
    async with db.transaction() as conn:
        return list((await conn.execute(sa.text("SELECT id FROM t_orders ORDER BY id"))).scalars())


async def _rows(db: Database) -> list[sa.Row[Any]]:
    async with db.transaction() as conn:
        return list((await conn.execute(sa.select(outbox).order_by(outbox.c.seq))).all())


async def _open_transactions(db: Database) -> int:
    """Sessions on this database, other than the asking one, inside a transaction."""
    async with db.connect() as conn:
        return int(
            await conn.scalar(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid() AND xact_start IS NOT NULL"
                )
            )
            or 0
        )


async def _nothing_was_kept(db: Database) -> None:
    """Neither the block's statements nor its messages committed, and no session
    of the pool is left inside a transaction."""
    assert await _orders(db) == []
    assert await _rows(db) == []
    assert await _open_transactions(db) == 0


async def _order(conn: Any, order_id: str) -> None:
    await conn.execute(sa.text("INSERT INTO t_orders (id) VALUES (:id)"), {"id": order_id})


async def test_the_block_commits_its_statements_and_messages_together(shop: Database) -> None:
    placed = Message(type="order.placed", data={"order": "o-1", "note": "it's"}, key="o-1")
    async with outbox_transaction(shop) as conn:
        await _order(conn, "o-1")
        await add_to_outbox(conn, placed)
    assert await _orders(shop) == ["o-1"]
    [row] = await _rows(shop)
    assert (row.status, row.retry_count, row.key) == ("PENDING", 0, "o-1")
    assert message_from_row(row.headers, row.payload) == placed


async def test_a_block_that_raises_leaves_neither(shop: Database) -> None:
    with pytest.raises(Boom):
        async with outbox_transaction(shop) as conn:
            await _order(conn, "o-1")
            await add_to_outbox(conn, Message(type="order.placed"))
            raise Boom
    assert await _orders(shop) == []
    assert await _rows(shop) == []
    if shop.is_postgres:
        assert await _open_transactions(shop) == 0


# Text that a quoted SQL literal gets wrong when its escaping is wrong.
_tricky = st.text(
    alphabet=st.sampled_from(["'", "\\", "$", "E", '"', "\n", "é", "€", "𝄞", "x", ";", "-"])
    | st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=24,
)
# The same for attributes, which hold no control characters (CloudEvents).
_tricky_attribute = st.text(
    alphabet=st.sampled_from(["'", "\\", "$", "E", '"', "é", "€", "𝄞", "x", ";", "-"])
    | st.characters(blacklist_categories=("Cs", "Cc")),
    max_size=24,
)


@pytest.mark.postgres
@pytest.mark.parametrize("conforming", ["on", "off"])
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kind=_tricky_attribute.filter(bool),
    key=st.none() | _tricky_attribute,
    data=st.dictionaries(_tricky, _tricky | st.integers(), max_size=4),
    subject=st.none() | _tricky_attribute,
)
async def test_rows_are_those_add_writes_whatever_the_text(
    pg_url: str,
    conforming: str,
    kind: str,
    key: str | None,
    data: dict[str, Any],
    subject: str | None,
) -> None:
    # The rows travel as quoted literals: quotes, backslashes, dollars and non-ASCII
    # text must arrive as they left, with standard_conforming_strings on or off.
    settings_ = {"standard_conforming_strings": conforming}
    async with Database(pg_url, connect_args={"server_settings": settings_}) as db:
        message = Message(type=kind, key=key, data=data, subject=subject)
        reference = message.with_(id=str(uuid.uuid4()))
        async with db.transaction() as conn:
            await add_to_outbox(conn, reference)
        async with outbox_transaction(db) as conn:
            await add_to_outbox(conn, message)
        async with db.transaction() as conn:
            rows = (await conn.execute(sa.select(outbox).order_by(outbox.c.seq))).mappings().all()
            await conn.execute(sa.delete(outbox))  # the next example starts empty
        expected, got = (_comparable(row) for row in rows)
        assert got == expected
        assert message_from_row(rows[1]["headers"], rows[1]["payload"]) == message


def _comparable(row: Any) -> dict[str, Any]:
    """A row without what differs between two adds of one message: id, order, times."""
    skip = {"id", "seq", "created_at", "available_at"}
    kept = {name: value for name, value in row.items() if name not in skip}
    kept["headers"] = {k: v for k, v in row["headers"].items() if k != "ce-id"}
    return kept


async def _pg_shop(pg_url: str, **options: Any) -> Database:
    db = Database(pg_url, **options)
    async with db.transaction() as conn:
        await conn.execute(sa.text(ORDERS))
    return db


@pytest.mark.postgres
async def test_commit_inside_the_block_is_refused_and_nothing_commits(pg_url: str) -> None:
    async with await _pg_shop(pg_url) as db:
        with pytest.raises(ConfigurationError, match="commits when its block exits"):
            async with outbox_transaction(db) as conn:
                await _order(conn, "o-1")
                await add_to_outbox(conn, Message(type="order.placed"))
                await conn.commit()
        # A caller that catches the refusal and goes on still commits nothing.
        with pytest.raises(DatabaseError):
            async with outbox_transaction(db) as conn:
                await _order(conn, "o-2")
                await add_to_outbox(conn, Message(type="order.placed"))
                with pytest.raises(ConfigurationError):
                    await conn.commit()
        await _nothing_was_kept(db)


@pytest.mark.postgres
async def test_a_rollback_inside_the_block_commits_nothing(pg_url: str) -> None:
    async with await _pg_shop(pg_url) as db:
        with pytest.raises(ConfigurationError, match="rolled back inside it"):
            async with outbox_transaction(db) as conn:
                await _order(conn, "o-1")
                await add_to_outbox(conn, Message(type="order.placed"))
                await conn.rollback()
                await _order(conn, "o-2")
        await _nothing_was_kept(db)


@pytest.mark.postgres
async def test_a_bound_sessions_failed_flush_raises_its_own_error(pg_url: str) -> None:
    # The session rolls the transaction back; the caller sees the IntegrityError,
    # as with database.transaction(), and nothing commits.
    async with await _pg_shop(pg_url) as db:
        with pytest.raises(DatabaseError, match=r"IntegrityError|UniqueViolation") as raised:
            async with outbox_transaction(db) as conn:
                session = AsyncSession(bind=conn)
                await add_to_outbox(session, Message(type="order.placed"))
                await _order(session, "o-1")
                await _order(session, "o-1")
        assert isinstance(raised.value.__cause__, sa.exc.IntegrityError)
        await _nothing_was_kept(db)


@pytest.mark.postgres
async def test_messages_added_in_a_savepoint_go_with_it(pg_url: str) -> None:
    async with await _pg_shop(pg_url) as db:
        async with outbox_transaction(db) as conn:
            await _order(conn, "kept")
            await add_to_outbox(conn, Message(type="kept"))
            with pytest.raises(Boom):
                async with conn.begin_nested():
                    await _order(conn, "undone")
                    await add_to_outbox(conn, Message(type="undone"))
                    async with conn.begin_nested():  # released, then undone with its parent
                        await add_to_outbox(conn, Message(type="undone.inner"))
                    raise Boom
            async with conn.begin_nested():  # released: kept
                await _order(conn, "released")
                await add_to_outbox(conn, Message(type="released"))
            session = AsyncSession(bind=conn)
            with pytest.raises(Boom):
                async with session.begin_nested():
                    await add_to_outbox(session, Message(type="undone.session"))
                    raise Boom
            await session.close()
            await add_to_outbox(conn, Message(type="last"))
        assert await _orders(db) == ["kept", "released"]
        assert [r.event_type for r in await _rows(db)] == ["kept", "released", "last"]


@pytest.mark.postgres
async def test_an_on_commit_callback_that_raises_prevents_the_commit(pg_url: str) -> None:
    # As with database.transaction(): callbacks run before the COMMIT is sent.
    async with await _pg_shop(pg_url) as db:
        with pytest.raises(ZeroDivisionError):
            async with outbox_transaction(db) as conn:
                await _order(conn, "o-1")
                await add_to_outbox(conn, Message(type="order.placed"))
                on_commit(conn, lambda: print(1 / 0))
        await _nothing_was_kept(db)


@pytest.mark.postgres
async def test_the_block_begins_at_the_databases_isolation_level(pg_url: str) -> None:
    async with Database(pg_url, isolation_level="SERIALIZABLE") as db:
        async with outbox_transaction(db) as conn:
            level = await conn.scalar(sa.text("SHOW transaction_isolation"))
        assert level == "serializable"
    with pytest.raises(ConfigurationError, match="isolation level 'AUTOCOMMIT'"):
        async with (
            Database(pg_url, isolation_level="AUTOCOMMIT") as db,
            outbox_transaction(db),
        ):
            pass


@pytest.mark.postgres
async def test_under_another_client_encoding_rows_are_written_at_once(pg_url: str) -> None:
    # Literals are sent as UTF-8 text; a session reading another encoding gets its
    # rows through bound parameters instead, in the block's transaction.
    settings_ = {"client_encoding": "LATIN1"}
    async with await _pg_shop(pg_url, connect_args={"server_settings": settings_}) as db:
        message = Message(type="order.placed", key="o'1\\", data={"n": "it's"})
        async with outbox_transaction(db) as conn:
            await _order(conn, "o-1")
            await add_to_outbox(conn, message)
            seen = await conn.scalar(sa.select(sa.func.count()).select_from(outbox))
            assert seen == 1  # written at once, visible inside the transaction
        [row] = await _rows(db)
        assert message_from_row(row.headers, row.payload) == message
        with pytest.raises(Boom):
            async with outbox_transaction(db) as conn:
                await add_to_outbox(conn, Message(type="rolled.back"))
                raise Boom
        assert len(await _rows(db)) == 1


@pytest.mark.postgres
async def test_cancelled_anywhere_a_block_commits_all_or_nothing_and_frees_its_connection(
    pg_url: str,
) -> None:
    # One pooled connection: a block that left it inside a transaction would make
    # every later transaction fail. Cancel at random points, BEGIN included.
    rng = random.Random(11)
    async with await _pg_shop(pg_url, pool_size=1, max_overflow=0) as db:
        for i in range(120):

            async def block(order: str = f"o-{i:03}") -> None:
                async with outbox_transaction(db) as conn:
                    await _order(conn, order)
                    await add_to_outbox(conn, Message(type="order.placed", subject=order))

            task = asyncio.create_task(block())
            for _ in range(rng.randint(0, 12)):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert await _open_transactions(db) == 0, f"after cancel {i}"
        orders = await _orders(db)
        assert sorted(r.headers["ce-subject"] for r in await _rows(db)) == orders
        async with db.transaction() as conn:  # the pool serves on
            await _order(conn, "after")


@pytest.mark.postgres
async def test_a_commit_the_server_refuses_leaves_nothing(pg_url: str) -> None:
    # A deferred foreign key is checked at COMMIT, after the outbox rows were sent.
    async with Database(pg_url) as db:
        async with db.transaction() as conn:
            await conn.execute(sa.text("CREATE TABLE t_parents (id int PRIMARY KEY)"))
            await conn.execute(
                sa.text(
                    "CREATE TABLE t_children (parent int REFERENCES t_parents "
                    "DEFERRABLE INITIALLY DEFERRED)"
                )
            )
        with pytest.raises(DatabaseError, match=r"outbox transaction failed: ForeignKeyViolation"):
            async with outbox_transaction(db) as conn:
                await conn.execute(sa.text("INSERT INTO t_children VALUES (7)"))
                await add_to_outbox(conn, Message(type="child.added"))
        assert await _rows(db) == []
        assert await _open_transactions(db) == 0
        async with outbox_transaction(db) as conn:  # the pool serves on
            await add_to_outbox(conn, Message(type="after"))
        assert [r.event_type for r in await _rows(db)] == ["after"]


@pytest.mark.postgres
async def test_a_block_cancelled_mid_statement_leaves_no_transaction_open(pg_url: str) -> None:
    async with Database(pg_url) as db:
        started = asyncio.Event()

        async def block() -> None:
            async with outbox_transaction(db) as conn:
                await add_to_outbox(conn, Message(type="never"))
                started.set()
                await conn.execute(sa.text("SELECT pg_sleep(30)"))

        task = asyncio.create_task(block())
        async with asyncio.timeout(10):
            await started.wait()
        await asyncio.sleep(0.2)  # inside pg_sleep
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):  # the server notices the closed connection at once, or soon
            if not await _open_transactions(db):
                break
            await asyncio.sleep(0.05)
        assert await _open_transactions(db) == 0
        assert await _rows(db) == []


@pytest.mark.postgres
async def test_duplicate_ids_are_written_once(pg_url: str) -> None:
    async with Database(pg_url) as db:
        retried = Message(type="t.retried", id=str(uuid.uuid5(uuid.NAMESPACE_URL, "order/42")))
        async with db.transaction() as conn:
            await add_to_outbox(conn, retried)
        async with outbox_transaction(db) as conn:
            await add_to_outbox(conn, retried, Message(type="t.other"), retried)
        assert [r.event_type for r in await _rows(db)] == ["t.retried", "t.other"]


@pytest.mark.postgres
async def test_an_orm_session_bound_to_the_block(pg_url: str) -> None:
    async with Database(pg_url) as db:
        async with db.transaction() as conn:
            await conn.execute(sa.text(ORDERS))
        async with outbox_transaction(db) as conn:
            session = AsyncSession(bind=conn)
            await _order(session, "o-1")
            await add_to_outbox(session, Message(type="order.placed"))
            await session.flush()
            await session.close()
        assert await _orders(db) == ["o-1"]
        assert [r.event_type for r in await _rows(db)] == ["order.placed"]


@pytest.mark.postgres
async def test_the_relays_are_woken_when_the_block_commits(pg_url: str) -> None:
    async with Database(pg_url) as db:
        woken = asyncio.Event()
        stop = await db.listen(NOTIFY_CHANNEL, lambda _payload: woken.set())
        try:
            async with outbox_transaction(db) as conn:
                await add_to_outbox(conn, Message(type="order.placed"))
                await asyncio.sleep(0.3)
                assert not woken.is_set()  # nothing is written before the commit
            async with asyncio.timeout(5):
                await woken.wait()
        finally:
            await stop()


@pytest.mark.postgres
async def test_on_commit_callbacks_run_once_and_only_on_commit(pg_url: str) -> None:
    async with Database(pg_url) as db:
        calls: list[str] = []
        async with outbox_transaction(db) as conn:
            await add_to_outbox(conn, Message(type="a"))
            on_commit(conn, lambda: calls.append("committed"))
        with pytest.raises(Boom):
            async with outbox_transaction(db) as conn:
                await add_to_outbox(conn, Message(type="b"))
                on_commit(conn, lambda: calls.append("rolled back"))
                raise Boom
        assert calls == ["committed"]


@pytest.mark.postgres
async def test_a_nul_character_is_refused_and_nothing_is_kept(pg_url: str) -> None:
    async with Database(pg_url) as db:
        # Attributes cannot hold one (Message refuses it); PostgreSQL's JSONB refuses
        # one in the data.
        with pytest.raises(DatabaseError, match="u0000 cannot be converted to text"):
            async with outbox_transaction(db) as conn:
                await add_to_outbox(conn, Message(type="order.placed", data={"note": "a\x00b"}))
        assert await _rows(db) == []
        assert await _open_transactions(db) == 0
