"""The operator's view of odd rows and odd arguments: rows whose JSON was spoilt by
hand (SQLite keeps any text) go DEAD without stalling the relay and can be listed and
shown; a --limit past BIGINT lists everything; one id where a list is expected is
refused with the fix."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from accord import Database, Message, add_to_outbox
from accord.cli.app import _register_subcommands, app
from accord.db.schema import outbox
from accord.errors import ConfigurationError
from accord.outbox import OutboxAdmin, Relay
from accord.transports import from_url
from tests.outbox.conftest import statuses

_register_subcommands()
runner = CliRunner()


def test_on_sqlite_a_row_whose_json_was_spoilt_goes_dead_and_can_be_looked_at(
    sqlite_url: str,
) -> None:
    """SQLite keeps any text in a JSON column. A row whose headers are not JSON goes
    DEAD with the reason, and the rest of the outbox flows; ``dead list`` and ``dead
    show`` read rows whose headers or payload are not JSON (or hold a NaN), showing
    the text stored, in valid JSON.

    Before, it failed because the claim decoded every row's headers as it read them:
    one such row failed every claim (JSONDecodeError), round after round, and
    nothing was published any more; ``dead list`` and ``dead show`` decoded them too
    and printed a JSONDecodeError traceback, and ``dead show --json`` printed a
    stored NaN as ``NaN``, which is not JSON."""
    spoilt = {
        "headers": Message(type="t.headers", key="k"),
        "payload": Message(type="t.payload", key="k"),
        "nan": Message(type="t.nan"),
    }
    after, other = Message(type="t.after", key="k"), Message(type="t.other")
    asyncio.run(_spoil_and_relay(sqlite_url, spoilt, after, other))
    listed = runner.invoke(app, ["outbox", "dead", "list", "--db", sqlite_url, "--json"])
    assert listed.exit_code == 0, listed.output
    assert len(_strict_json(listed.stdout)) == 3
    assert runner.invoke(app, ["outbox", "dead", "list", "--db", sqlite_url]).exit_code == 0
    shown = {}
    for what, message in spoilt.items():
        result = runner.invoke(
            app, ["outbox", "dead", "show", message.id, "--db", sqlite_url, "--json"]
        )
        assert result.exit_code == 0, result.output
        shown[what] = _strict_json(result.stdout)
        text = runner.invoke(app, ["outbox", "dead", "show", message.id, "--db", sqlite_url])
        assert text.exit_code == 0, text.output
    assert shown["headers"]["headers"] == "{oops"
    assert shown["payload"]["payload"] == "not json{"
    assert shown["nan"]["payload"] == '{"x": NaN}'
    assert shown["nan"]["headers"]["ce-id"] == spoilt["nan"].id


async def _spoil_and_relay(
    sqlite_url: str, spoilt: dict[str, Message], after: Message, other: Message
) -> None:
    transport = from_url(sqlite_url, channel="spoilt")
    try:
        async with Database(sqlite_url) as database:
            async with database.transaction() as conn:
                await add_to_outbox(conn, *spoilt.values(), after, other)
                for column, text in (
                    ("headers", "{oops"),
                    ("payload", "not json{"),
                    ("payload", '{"x": NaN}'),
                ):
                    what = "nan" if "NaN" in text else column
                    await conn.execute(
                        sa.text(f"UPDATE accord_outbox SET {column} = :text WHERE id = :id"),
                        {"text": text, "id": uuid.UUID(spoilt[what].id).hex},
                    )
                # These went DEAD before they were spoilt: only looked at here.
                await conn.execute(
                    outbox.update()
                    .where(outbox.c.event_type.in_(["t.payload", "t.nan"]))
                    .values(status="DEAD", last_error="refused")
                )
            await transport.connect()
            relay = Relay(database, transport)
            assert await relay.run_once() == 1  # other; after waits behind the spoilt one
            assert await relay.run_once() == 1  # after
            state = await statuses(database)
            assert state == {
                spoilt["headers"].id: "DEAD",
                spoilt["payload"].id: "DEAD",
                spoilt["nan"].id: "DEAD",
                after.id: "SENT",
                other.id: "SENT",
            }
            reason = (await OutboxAdmin(database).show(spoilt["headers"].id))["last_error"]
            assert "stored headers are not JSON" in reason
    finally:
        await transport.close()


def _strict_json(text: str) -> Any:
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_a_limit_past_bigint_lists_everything_and_one_below_one_is_refused(db_url: str) -> None:
    """``--limit`` past BIGINT lists every row, as inbox dead letters do;
    ``OutboxAdmin.dead``/``scheduled`` refuse a limit below 1 or not a whole number.

    Before, it failed because the limit went to the database as it was: SQLite's
    OverflowError with a traceback, asyncpg's DataError with the SQL; and a limit of
    -1 listed everything on SQLite and was a driver error on PostgreSQL."""

    async def seed() -> None:
        async with Database(db_url) as database, database.transaction() as conn:
            await add_to_outbox(conn, Message(type="t.dead"))
            await add_to_outbox(conn, Message(type="t.later"), delay=timedelta(hours=1))
            await conn.execute(
                outbox.update().where(outbox.c.event_type == "t.dead").values(status="DEAD")
            )
        async with Database(db_url) as database:
            admin = OutboxAdmin(database)
            wrongs: list[Any] = [0, -1, 2.5, True]
            for wrong in wrongs:
                with pytest.raises(ConfigurationError, match="limit must be"):
                    await admin.dead(limit=wrong)
                with pytest.raises(ConfigurationError, match="limit must be"):
                    await admin.scheduled(limit=wrong)

    asyncio.run(seed())
    huge = str(2**64)
    for command, kind in (("dead", "t.dead"), ("scheduled", "t.later")):
        result = runner.invoke(
            app, ["outbox", command, "list", "--db", db_url, "--limit", huge, "--json"]
        )
        assert result.exit_code == 0, result.output
        assert [row["event_type"] for row in json.loads(result.stdout)] == [kind]


async def test_one_id_where_a_list_is_expected_is_refused_with_the_fix(
    database: Database,
) -> None:
    """``OutboxAdmin.replay("…")`` / ``purge`` / ``cancel`` with one id as a string
    (not a list of them) is refused, saying to give a list.

    Before, it failed because the string's characters were taken as ids: "'6' is not
    an outbox message id (a UUID)", about an id nobody gave."""
    admin = OutboxAdmin(database)
    message_id = str(uuid.uuid4())
    for act in (admin.replay, admin.purge, admin.cancel):
        with pytest.raises(ConfigurationError, match=r"as a list, e\.g\. \["):
            await act(message_id)
