from __future__ import annotations

import contextlib
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from accord import Database, Message, add_to_outbox
from accord.db.schema import outbox
from accord.errors import ConfigurationError
from accord.outbox.writer import message_from_row


class Boom(Exception):
    pass


async def _rows(db: Database) -> list[sa.Row]:
    async with db.transaction() as conn:
        return list((await conn.execute(sa.select(outbox).order_by(outbox.c.seq))).all())


async def test_rollback_leaves_nothing_in_the_outbox(database: Database) -> None:
    with pytest.raises(Boom):
        async with database.transaction() as conn:
            await add_to_outbox(conn, Message(type="t.rolled_back"))
            raise Boom
    assert await _rows(database) == []


async def test_commit_keeps_messages_pending_in_order(database: Database) -> None:
    sent = [Message(type="t.kept", data={"n": i}, key="k") for i in range(3)]
    async with database.transaction() as conn:
        await add_to_outbox(conn, *sent)
    rows = await _rows(database)
    assert [r.id for r in rows] == [uuid.UUID(m.id) for m in sent]
    assert {r.status for r in rows} == {"PENDING"}
    assert [r.payload for r in rows] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert all(r.retry_count == 0 and r.key == "k" for r in rows)
    rebuilt = message_from_row(rows[0].headers, rows[0].payload)
    assert rebuilt == sent[0]


async def test_add_works_with_an_orm_session(database: Database) -> None:
    async with AsyncSession(database.engine) as session, session.begin():
        await add_to_outbox(session, Message(type="t.session"))
    assert [r.event_type for r in await _rows(database)] == ["t.session"]


async def test_non_uuid_id_is_refused_with_the_fix(database: Database) -> None:
    async with database.transaction() as conn:
        with pytest.raises(ConfigurationError, match="uuid5"):
            await add_to_outbox(conn, Message(type="t.bad", id="not-a-uuid"))


async def test_a_message_id_already_in_the_outbox_is_not_added_again(database: Database) -> None:
    retried = Message(type="t.retried", id=str(uuid.uuid5(uuid.NAMESPACE_URL, "order/42")))
    for _ in range(2):  # a client retries the operation that adds it
        async with database.transaction() as conn:
            await add_to_outbox(conn, retried)
    async with database.transaction() as conn:
        await add_to_outbox(conn, retried, Message(type="t.other"), retried)
    assert [r.event_type for r in await _rows(database)] == ["t.retried", "t.other"]


@pytest.mark.parametrize("commit", [True, False])
async def test_add_as_the_first_statement_shares_the_callers_transaction(
    database: Database, commit: bool
) -> None:
    # On PostgreSQL ``add`` begins SQLAlchemy's pending transaction on the driver
    # itself; the caller's later statements must land in that same transaction.
    async with database.transaction() as conn:
        await conn.execute(sa.text("CREATE TABLE IF NOT EXISTS t_orders (id text PRIMARY KEY)"))
    with contextlib.suppress(Boom):
        async with database.transaction() as conn:
            await add_to_outbox(conn, Message(type="t.first"))
            await conn.execute(sa.text("INSERT INTO t_orders (id) VALUES ('o-1')"))
            if not commit:
                raise Boom
    async with database.transaction() as conn:
        orders = (await conn.execute(sa.text("SELECT id FROM t_orders"))).scalars().all()
    assert orders == (["o-1"] if commit else [])
    assert [r.event_type for r in await _rows(database)] == (["t.first"] if commit else [])
