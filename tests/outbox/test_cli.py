"""``accord outbox status`` and ``accord outbox dead list|show|replay|purge``."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import Any

from typer.testing import CliRunner

from accord import Database, Message, add_to_outbox
from accord.cli.app import _register_subcommands, app
from accord.db.schema import outbox

_register_subcommands()
runner = CliRunner()


def accord(*args: str) -> Any:
    return runner.invoke(app, list(args))


async def _seed(url: str) -> tuple[list[str], str]:
    """Two DEAD messages, one SENT, one PENDING."""
    dead = [Message(type="order.placed", data={"n": i}) for i in range(2)]
    sent, waiting = Message(type="order.shipped"), Message(type="order.placed")
    async with Database(url) as database, database.transaction() as conn:
        await add_to_outbox(conn, *dead, sent, waiting)
        await conn.execute(
            outbox.update()
            .where(outbox.c.id.in_([uuid.UUID(m.id) for m in dead]))
            .values(status="DEAD", retry_count=10, last_error="TransportError: refused")
        )
        await conn.execute(
            outbox.update()
            .where(outbox.c.event_type == "order.shipped")
            .values(status="SENT", sent_at=datetime.now(UTC))
        )
    return [m.id for m in dead], waiting.id


def test_status_counts_every_state(db_url: str) -> None:
    asyncio.run(_seed(db_url))
    result = accord("outbox", "status", "--db", db_url, "--json")
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert (status["pending"], status["sent"], status["dead"]) == (1, 1, 2)
    assert status["oldest_pending_age_seconds"] >= 0
    table = accord("outbox", "status", "--db", db_url)
    assert table.exit_code == 0 and "pending" in table.output


def test_dead_list_show_replay_purge(db_url: str) -> None:
    dead_ids, _ = asyncio.run(_seed(db_url))

    listed = json.loads(accord("outbox", "dead", "list", "--db", db_url, "--json").output)
    assert [row["id"] for row in listed] == dead_ids
    assert all(row["last_error"] == "TransportError: refused" for row in listed)

    shown = json.loads(
        accord("outbox", "dead", "show", dead_ids[0], "--db", db_url, "--json").output
    )
    assert shown["payload"] == {"n": 0}
    assert shown["headers"]["ce-id"] == dead_ids[0]

    replayed = accord("outbox", "dead", "replay", dead_ids[0], "--db", db_url, "--json")
    assert json.loads(replayed.output) == {"replayed": 1}
    status = json.loads(accord("outbox", "status", "--db", db_url, "--json").output)
    assert (status["pending"], status["dead"]) == (2, 1)

    purged = accord("outbox", "dead", "purge", "--all", "--db", db_url, "--json")
    assert json.loads(purged.output) == {"purged": 1}
    assert json.loads(accord("outbox", "dead", "list", "--db", db_url, "--json").output) == []


def test_dead_show_prints_payload_and_headers_as_json(db_url: str) -> None:
    """The text output printed them as Python reprs (None, True, single quotes)."""

    async def seed() -> str:
        message = Message(type="order.placed", data={"gift": True, "note": None})
        async with Database(db_url) as database, database.transaction() as conn:
            await add_to_outbox(conn, message)
            await conn.execute(outbox.update().values(status="DEAD", last_error="refused"))
        return message.id

    shown = accord("outbox", "dead", "show", asyncio.run(seed()), "--db", db_url).output
    assert '"gift": true' in shown and '"note": null' in shown
    assert '"ce-type": "order.placed"' in shown
    assert "'gift': True" not in shown and "'note': None" not in shown


def test_errors_name_the_problem_and_the_fix(db_url: str) -> None:
    asyncio.run(_seed(db_url))
    missing = accord(
        "outbox", "dead", "show", "00000000-0000-0000-0000-000000000000", "--db", db_url
    )
    assert missing.exit_code == 1
    assert "no outbox message with id" in missing.output
    not_uuid = accord("outbox", "dead", "replay", "abc", "--db", db_url)
    assert not_uuid.exit_code == 1 and "is not an outbox message id" in not_uuid.output
    nothing_named = accord("outbox", "dead", "purge", "--db", db_url)
    assert nothing_named.exit_code == 2 and "--all" in nothing_named.output  # usage
    bad_url = accord("outbox", "status", "--db", "mysql://x/y")
    assert bad_url.exit_code == 1 and "sqlite+aiosqlite" in bad_url.output


def test_named_ids_are_acted_on_all_or_none(db_url: str) -> None:
    """An id with --all, or an id that is no DEAD message, is refused by name, and
    nothing is done (the id alone acted on only that one, an unknown one said 0)."""
    dead_ids, waiting = asyncio.run(_seed(db_url))
    unknown = str(uuid.uuid4())
    for command in ("replay", "purge"):
        both = accord("outbox", "dead", command, dead_ids[0], "--all", "--db", db_url)
        assert both.exit_code == 1 and "not both" in both.output, both.output
        for ids in ([unknown], [dead_ids[0], unknown], [waiting]):
            named = accord("outbox", "dead", command, *ids, "--db", db_url, "--json")
            assert named.exit_code == 1, named.output
            said = " ".join(named.output.split())
            assert f"no DEAD outbox message with id {ids[-1]}" in said
            assert f"nothing was {command.rstrip('e')}ed" in said
    status = json.loads(accord("outbox", "status", "--db", db_url, "--json").output)
    assert (status["pending"], status["dead"]) == (1, 2)
