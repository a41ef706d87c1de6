"""Messages added to the outbox for later (``deliver_at`` / ``delay``): kept SCHEDULED in
the database until due, then released by a relay behind the rows pending then, and
published; withdrawn with ``cancel_scheduled`` before that. On SQLite and PostgreSQL,
through the SQL transport."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from typer.testing import CliRunner

from accord import (
    Database,
    Message,
    add_to_outbox,
    cancel_scheduled,  # beside add_to_outbox, as the README shows it
    outbox_transaction,
)
from accord.cli.app import _register_subcommands, app
from accord.db.schema import outbox
from accord.errors import ConfigurationError, DatabaseError
from accord.outbox import SCHEDULED, OutboxAdmin, Relay
from accord.outbox._claim import release_scheduled
from tests.outbox.conftest import fast_relay, statuses

WAYS = ["transaction", "outbox_transaction", "session"]

_register_subcommands()


async def accord(*args: str) -> Any:
    """The CLI, run in a thread of its own (it runs an event loop)."""
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env={"COLUMNS": "200"})


@contextlib.asynccontextmanager
async def adding(database: Database, way: str) -> AsyncIterator[AsyncConnection | AsyncSession]:
    """A transaction to add to the outbox in: ``database.transaction()``,
    ``outbox_transaction`` (rows sent with the COMMIT) or an ORM session."""
    if way == "outbox_transaction":
        async with outbox_transaction(database) as conn:
            yield conn
    elif way == "session":
        async with database.transaction() as conn:
            yield AsyncSession(bind=conn)
    else:
        async with database.transaction() as conn:
            yield conn


@contextlib.asynccontextmanager
async def running(relay: Relay) -> AsyncIterator[Relay]:
    task = asyncio.create_task(relay.run())
    try:
        yield relay
    finally:
        await relay.stop()
        await task


async def relayed(database: Database, listen: Callable[..., Any], db_url: str) -> Any:
    transport, received = await listen(db_url)
    return fast_relay(database, transport), received


async def row_of(database: Database, message_id: str) -> Any:
    async with database.connect() as conn:
        return (
            await conn.execute(sa.select(outbox).where(outbox.c.id == uuid.UUID(message_id)))
        ).one()


@pytest.mark.parametrize("way", WAYS)
async def test_a_scheduled_message_is_published_when_due_and_not_before(
    database: Database, db_url: str, listen: Any, way: str
) -> None:
    relay, received = await relayed(database, listen, db_url)
    released = REGISTRY.get_sample_value("accord_outbox_scheduled_released_total") or 0.0
    later, at_once = Message(type="reminder.due"), Message(type="reminder.now")
    fixed = Message(type="reminder.fixed")
    started = time.monotonic()
    async with adding(database, way) as conn:
        await add_to_outbox(conn, later, delay=timedelta(seconds=1.5))
        await add_to_outbox(conn, fixed, deliver_at=datetime.now(UTC) + timedelta(seconds=1.5))
        await add_to_outbox(conn, at_once)
    assert (await row_of(database, later.id)).status == SCHEDULED
    async with running(relay):
        await received.wait(1, timeout=5)
        assert received.ids == [at_once.id]
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
        assert received.ids == [at_once.id], "a scheduled message went a second early"
        await received.wait(3, timeout=10)
    assert time.monotonic() - started >= 1.4
    assert sorted(received.ids[1:]) == sorted([later.id, fixed.id])
    assert set((await statuses(database)).values()) == {"SENT"}
    assert REGISTRY.get_sample_value("accord_outbox_scheduled_released_total") == released + 2
    message = next(m for m, _ in received.received if m is not None and m.id == later.id)
    assert message.type == "reminder.due"


async def test_a_rolled_back_schedule_leaves_nothing(
    database: Database, db_url: str, listen: Any
) -> None:
    with pytest.raises(ZeroDivisionError):
        async with database.transaction() as conn:
            await add_to_outbox(conn, Message(type="reminder.due"), delay=timedelta(0))
            raise ZeroDivisionError
    assert await statuses(database) == {}


async def test_scheduled_messages_go_in_the_order_they_fall_due_behind_their_keys_pending_rows(
    database: Database, db_url: str, listen: Any
) -> None:
    """A key's scheduled message holds nothing back until due; then it goes behind the
    key's rows pending at that time, and scheduled messages go in due order
    whatever the order they were added in."""
    relay, received = await relayed(database, listen, db_url)
    now = datetime.now(UTC)
    second = Message(type="k.second", key="k")
    first = Message(type="k.first", key="k")
    at_once = Message(type="k.at-once", key="k")
    async with database.transaction() as conn:
        await add_to_outbox(conn, second, deliver_at=now + timedelta(seconds=2.6))
        await add_to_outbox(conn, first, deliver_at=now + timedelta(seconds=2))
        await add_to_outbox(conn, at_once)
    async with running(relay):
        await received.wait(1, timeout=5)
        assert received.ids == [at_once.id]
        await received.wait(3, timeout=10)
    assert received.ids == [at_once.id, first.id, second.id]
    seqs = [(await row_of(database, m.id)).seq for m in (at_once, first, second)]
    assert seqs == sorted(seqs), "released rows take new places, in due order"


@pytest.mark.parametrize("way", WAYS)
async def test_cancel_withdraws_a_scheduled_message_in_the_callers_transaction(
    database: Database, db_url: str, listen: Any, way: str
) -> None:
    relay, received = await relayed(database, listen, db_url)
    cancelled, kept = Message(type="reminder.off"), Message(type="reminder.on")
    async with adding(database, way) as conn:
        await add_to_outbox(conn, cancelled, kept, delay=timedelta(seconds=0.5))
    with pytest.raises(ZeroDivisionError):
        async with database.transaction() as conn:
            assert await cancel_scheduled(conn, kept.id) is True
            raise ZeroDivisionError  # rolled back: kept stays scheduled
    async with adding(database, way) as conn:
        assert await cancel_scheduled(conn, cancelled.id) is True
        assert await cancel_scheduled(conn, cancelled.id) is False  # gone already
        assert await cancel_scheduled(conn, str(uuid.uuid4())) is False  # never added
    async with running(relay):
        await received.wait(1, timeout=10)
        await asyncio.sleep(0.3)
    assert received.ids == [kept.id]
    async with database.transaction() as conn:
        assert await cancel_scheduled(conn, kept.id) is False  # published: too late
    assert await statuses(database) == {kept.id: "SENT"}


@pytest.mark.parametrize("way", WAYS)
async def test_cancel_withdraws_a_message_scheduled_in_the_same_transaction(
    database: Database, db_url: str, listen: Any, way: str
) -> None:
    """In an ``outbox_transaction()`` block the rows wait in memory for the COMMIT;
    a message added for later there and cancelled before the block ends is not
    written at all, the others are. Savepoints behave as they do on rows written at
    once: one rolled back drops what was added in it and undoes what was cancelled
    in it."""
    relay, received = await relayed(database, listen, db_url)
    now = Message(type="sent.now")
    gone, kept, restored, dropped, again = (Message(type=f"later.{n}") for n in range(5))
    async with adding(database, way) as conn:
        connection = await conn.connection() if isinstance(conn, AsyncSession) else conn
        await add_to_outbox(conn, gone, delay=timedelta(seconds=0.3))
        await add_to_outbox(conn, now)
        savepoint = await connection.begin_nested()
        await add_to_outbox(conn, kept, restored, delay=timedelta(seconds=0.3))
        assert await cancel_scheduled(conn, gone.id) is True  # added before the savepoint
        await savepoint.commit()
        savepoint = await connection.begin_nested()
        await add_to_outbox(conn, dropped, delay=timedelta(seconds=0.3))
        assert await cancel_scheduled(conn, restored.id) is True
        assert await cancel_scheduled(conn, restored.id) is False  # withdrawn already
        await savepoint.rollback()  # drops ``dropped``; ``restored`` waits again
        assert await cancel_scheduled(conn, gone.id) is False  # gone already
        assert await cancel_scheduled(conn, now.id) is False  # not added for later
        await add_to_outbox(conn, again, delay=timedelta(seconds=0.3))
        assert await cancel_scheduled(conn, again.id) is True
        await add_to_outbox(conn, again, delay=timedelta(seconds=0.3))  # waits again
    async with running(relay):
        await received.wait(4, timeout=10)
        await asyncio.sleep(0.5)
    sent = [now.id, kept.id, restored.id, again.id]
    assert sorted(received.ids) == sorted(sent)
    assert await statuses(database) == dict.fromkeys(sent, "SENT")


async def test_status_counts_scheduled_messages_and_a_released_ones_age_counts_from_its_due_time(
    database: Database, db_url: str
) -> None:
    due = datetime.now(UTC) + timedelta(seconds=0.5)
    far = datetime.now(UTC) + timedelta(days=3)
    soon, later = Message(type="reminder.soon"), Message(type="reminder.later")
    async with database.transaction() as conn:
        await add_to_outbox(conn, soon, deliver_at=due)
        await add_to_outbox(conn, later, deliver_at=far)
    status = await OutboxAdmin(database).status()
    assert (status.scheduled, status.pending) == (2, 0)
    assert status.next_scheduled_at is not None
    assert abs(status.next_scheduled_at - due) < timedelta(milliseconds=1)
    assert status.as_dict()["scheduled"] == 2

    await asyncio.sleep(1.0)
    # Released but not yet published: PENDING, and as old as the time since it was due.
    async with database.transaction() as conn:
        assert await release_scheduled(conn, now=datetime.now(UTC), limit=10) == 1
    status = await OutboxAdmin(database).status()
    assert (status.scheduled, status.pending) == (1, 1)
    assert status.oldest_pending_age is not None
    assert 0.4 < status.oldest_pending_age < 5, "counted from the due time, not the commit"
    assert status.next_scheduled_at is not None
    assert abs(status.next_scheduled_at - far) < timedelta(milliseconds=1)

    result = await accord("outbox", "status", "--db", db_url, "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert (shown["scheduled"], shown["pending"]) == (1, 1)
    assert shown["next_scheduled_at"].startswith(f"{far:%Y-%m-%d}")
    result = await accord("outbox", "status", "--db", db_url)
    assert result.exit_code == 0, result.output
    assert "scheduled" in result.output and f"{far:%Y-%m-%d %H:%M}" in result.output


async def test_many_due_at_once_are_released_a_batch_at_a_time_by_two_relays(
    database: Database, db_url: str, listen: Any
) -> None:
    transport, received = await listen(db_url)
    relays = [fast_relay(database, transport, batch_size=50) for _ in range(2)]
    messages = [Message(type="bulk.due", data=n, key=f"k{n % 7}") for n in range(300)]
    async with database.transaction() as conn:
        await add_to_outbox(conn, *messages, delay=timedelta(seconds=0.3))
    async with running(relays[0]), running(relays[1]):
        await received.wait(300, timeout=30)
    assert sorted(received.ids) == sorted(m.id for m in messages)
    for key in {m.key for m in messages}:
        sent = [i for i in received.ids if i in {m.id for m in messages if m.key == key}]
        assert sent == [m.id for m in messages if m.key == key], f"key {key} out of order"


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({"deliver_at": datetime(2030, 1, 1)}, "timezone-aware"),
        ({"delay": timedelta(seconds=-1)}, "zero or more"),
        ({"delay": 5}, "timedelta"),
        ({"deliver_at": "2030-01-01T00:00:00+00:00"}, "timezone-aware datetime"),
        (
            {"deliver_at": datetime(2030, 1, 1, tzinfo=UTC), "delay": timedelta(seconds=1)},
            "not both",
        ),
    ],
)
async def test_a_bad_schedule_is_refused_by_name_and_adds_nothing(
    database: Database, options: dict[str, Any], complaint: str
) -> None:
    async with database.transaction() as conn:
        with pytest.raises(ConfigurationError, match=complaint):
            await add_to_outbox(conn, Message(type="reminder.bad"), **options)
    assert await statuses(database) == {}
    async with database.transaction() as conn:
        with pytest.raises(ConfigurationError, match="not an outbox message id"):
            await cancel_scheduled(conn, "not-a-uuid")


async def test_the_cli_lists_scheduled_messages_next_due_first_and_cancels_them(
    database: Database, db_url: str
) -> None:
    now = datetime.now(UTC)
    later, sooner = Message(type="reminder.later"), Message(type="reminder.sooner", key="k")
    async with database.transaction() as conn:
        await add_to_outbox(conn, later, deliver_at=now + timedelta(days=2))
        await add_to_outbox(conn, sooner, deliver_at=now + timedelta(days=1))
        await add_to_outbox(conn, Message(type="reminder.now"))
    result = await accord("outbox", "scheduled", "list", "--db", db_url, "--json")
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert [r["id"] for r in listed] == [sooner.id, later.id]
    assert listed[0]["key"] == "k" and listed[0]["available_at"].startswith(
        f"{now + timedelta(days=1):%Y-%m-%d}"
    )
    result = await accord("outbox", "scheduled", "list", "--db", db_url, "--type", "reminder.later")
    assert result.exit_code == 0, result.output
    assert later.id in result.output and sooner.id not in result.output
    assert f"{now + timedelta(days=2):%Y-%m-%d %H:%M}" in result.output

    result = await accord(
        "outbox", "scheduled", "cancel", "--db", db_url, later.id, str(uuid.uuid4())
    )
    assert result.exit_code == 0, result.output
    assert "1 of 2 message(s) cancelled" in result.output
    result = await accord("outbox", "scheduled", "cancel", "--db", db_url, "nope", "--json")
    assert result.exit_code != 0 and "not an outbox message id" in result.output
    left = await statuses(database)
    assert sorted(left.values()) == ["PENDING", SCHEDULED] and left[sooner.id] == SCHEDULED


async def test_a_relay_that_cannot_release_scheduled_messages_still_publishes_the_pending(
    database: Database, db_url: str, listen: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay, received = await relayed(database, listen, db_url)

    async def broken(*args: Any, **kwargs: Any) -> int:
        raise DatabaseError("releasing scheduled outbox rows failed: the server said no")

    monkeypatch.setattr("accord.outbox.relay.release_scheduled", broken)
    message = Message(type="reminder.now")
    async with database.transaction() as conn:
        await add_to_outbox(conn, message)
    assert await relay.run_once() == 1
    await received.wait(1, timeout=5)
    assert received.ids == [message.id]
