"""What a caller of add_to_outbox / cancel_scheduled may get wrong — a schedule past
the calendar, a list given for messages, an id of the wrong type — is a
ConfigurationError that names it, and nothing is added."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from accord import Database, Message, add_to_outbox
from accord.errors import ConfigurationError
from accord.outbox import OutboxAdmin, cancel_scheduled
from tests.outbox.conftest import statuses


@pytest.mark.parametrize(
    "schedule",
    [
        {"deliver_at": datetime.max.replace(tzinfo=timezone(timedelta(hours=-5)))},
        {"deliver_at": datetime.min.replace(tzinfo=timezone(timedelta(hours=5)))},
        {"delay": timedelta.max},
        {"delay": timedelta(days=9999 * 366)},
    ],
    ids=["deliver_at-past-9999", "deliver_at-before-year-1", "delay-max", "delay-past-9999"],
)
async def test_a_schedule_past_the_calendar_is_refused_by_name_and_adds_nothing(
    database: Database, schedule: dict[str, Any]
) -> None:
    """A due time that UTC cannot hold is a ConfigurationError that names it.

    Before, it failed because it was a bare OverflowError ('date value out of range')
    from converting ``deliver_at`` to UTC or adding ``delay`` to the time (SQLite),
    or asyncpg's DataError on the delay's microseconds ('value out of int64 range')."""
    with pytest.raises(ConfigurationError, match=r"^(deliver_at|delay) "):
        async with database.transaction() as conn:
            await add_to_outbox(conn, Message(type="t.later"), **schedule)
    assert await statuses(database) == {}


async def test_add_refuses_what_is_not_a_message_and_says_how_to_pass_a_list(
    database: Database,
) -> None:
    """``add_to_outbox(conn, messages)`` with a list is a ConfigurationError that
    says to unpack it; anything else that is not a Message is refused by its type.

    Before, it failed because it was an AttributeError ('list' object has no
    attribute 'id')."""
    messages = [Message(type="t.one"), Message(type="t.two")]
    with pytest.raises(ConfigurationError, match=r"add_to_outbox\(conn, \*messages\)"):
        async with database.transaction() as conn:
            await add_to_outbox(conn, messages)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="Message objects, not a dict"):
        async with database.transaction() as conn:
            await add_to_outbox(conn, {"type": "t.one"})  # type: ignore[arg-type]
    assert await statuses(database) == {}


async def test_message_ids_may_be_uuids_and_anything_else_is_refused_by_name(
    database: Database,
) -> None:
    """``cancel_scheduled`` and ``OutboxAdmin`` take a message id as text or as a
    ``uuid.UUID``; another type is a ConfigurationError naming the value.

    Before, it failed because a UUID was an AttributeError ('UUID' object has no
    attribute 'replace'), as was 5, and None a TypeError."""
    later = Message(type="t.later")
    async with database.transaction() as conn:
        await add_to_outbox(conn, later, delay=timedelta(hours=1))
    admin = OutboxAdmin(database)
    assert (await admin.show(uuid.UUID(later.id)))["id"] == later.id  # type: ignore[arg-type]
    for wrong in (None, 5):
        with pytest.raises(ConfigurationError, match="is not an outbox message id"):
            async with database.transaction() as conn:
                await cancel_scheduled(conn, wrong)  # type: ignore[arg-type]
    async with database.transaction() as conn:
        assert await cancel_scheduled(conn, uuid.UUID(later.id))
    assert await statuses(database) == {}
