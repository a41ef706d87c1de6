"""``accord inbox dead list|show|replay|purge`` and ``accord inbox status``."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from typer.testing import CliRunner

from accord.cli.app import _register_subcommands, app
from accord.db import Database
from accord.errors import ConfigurationError
from accord.inbox import Consumer, DeadLetters, HandlerContext
from accord.inbox._store import holds_of, note_holds
from accord.messages import Message
from accord.transports.sql import SqlTransport
from tests.inbox.conftest import Captured

_register_subcommands()
runner = CliRunner()


def invoke(*args: str, input: str | None = None) -> Any:
    result = runner.invoke(app, list(args), input=input)
    return result


async def _seed(url: str) -> list[str]:
    """Two dead letters for 'alpha' (bad data, unknown type), one for 'beta', one applied."""
    async with Database(url) as database:
        ids = []
        for name in ("alpha", "beta"):
            consumer = Consumer(name, database, SqlTransport(database=database))

            @consumer.handler("test.known")
            async def on_known(ctx: HandlerContext, data: Any) -> None:
                pass

            unknown = Message(type="test.unknown", data={"x": 1})
            await consumer.handle(Captured(unknown))
            ids.append(unknown.id)
            if name == "alpha":
                await consumer.handle(Captured(Message(type="test.known")))
                await consumer.handle(Captured(Message(type="test.unknown", data=[1, 2])))
    return ids


def test_list_show_replay_purge(db_url: str) -> None:
    asyncio.run(_seed(db_url))

    listed = invoke("inbox", "dead", "list", "--db", db_url, "--json")
    assert listed.exit_code == 0, listed.output
    letters = json.loads(listed.output)
    assert [(x["consumer"], x["kind"], x["status"]) for x in letters] == [
        ("alpha", "unknown_type", "DEAD"),
        ("alpha", "unknown_type", "DEAD"),
        ("beta", "unknown_type", "DEAD"),
    ]
    only_beta = json.loads(
        invoke("inbox", "dead", "list", "--db", db_url, "--consumer", "beta", "--json").output
    )
    assert [x["consumer"] for x in only_beta] == ["beta"]
    table = invoke("inbox", "dead", "list", "--db", db_url)
    assert table.exit_code == 0 and "alpha" in table.output

    first = letters[0]["id"]
    shown = json.loads(invoke("inbox", "dead", "show", str(first), "--db", db_url, "--json").output)
    assert shown["headers"]["ce-type"] == "test.unknown"
    assert json.loads(shown["body"]) == {"x": 1}
    assert "unknown message type 'test.unknown'" in shown["reason"]
    text = invoke("inbox", "dead", "show", str(first), "--db", db_url)
    assert text.exit_code == 0 and "ce-type: test.unknown" in text.output

    missing = invoke("inbox", "dead", "show", "999999", "--db", db_url)
    assert missing.exit_code == 1 and "no dead letter with id 999999" in missing.output

    beta = letters[2]["id"]
    for command, done in (("replay", "replayed"), ("purge", "purged")):
        other = invoke("inbox", "dead", command, str(beta), "--consumer", "alpha", "--db", db_url)
        assert other.exit_code == 1, other.output
        said = " ".join(other.output.split())
        assert f"{beta} not {done}: it belongs to consumer 'beta', not to 'alpha'" in said

    replayed = invoke("inbox", "dead", "replay", str(first), "--db", db_url, "--json")
    assert json.loads(replayed.output) == {"replaying": 1, "id": first}
    status = json.loads(invoke("inbox", "status", "--db", db_url, "--json").output)
    assert status == [
        {"consumer": "alpha", "applied": 1, "dead": 1, "replaying": 1},
        {"consumer": "beta", "applied": 0, "dead": 1, "replaying": 0},
    ]

    assert invoke("inbox", "dead", "replay", "--db", db_url).exit_code == 2
    purged = invoke("inbox", "dead", "purge", "--db", db_url, "--consumer", "beta", "--yes")
    assert purged.exit_code == 0 and "Purged 1" in purged.output
    purged = invoke("inbox", "dead", "purge", "--db", db_url, "--json", "--yes")
    assert json.loads(purged.output) == {"purged": 1}  # the one waiting for replay is kept
    left = json.loads(invoke("inbox", "dead", "list", "--db", db_url, "--json").output)
    assert [(x["id"], x["status"]) for x in left] == [(first, "REPLAY")]


def test_purging_them_all_asks_first_even_with_json(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--json deleted every consumer's dead letters without asking. With no terminal
    to ask on (as under CliRunner), it needs --yes."""
    asyncio.run(_seed(db_url))
    for json_option in ([], ["--json"]):
        unasked = invoke("inbox", "dead", "purge", "--db", db_url, *json_option)
        assert unasked.exit_code == 1 and "needs --yes" in unasked.output, unasked.output
    monkeypatch.setattr("accord.cli.inbox._interactive", lambda: True)
    declined = invoke("inbox", "dead", "purge", "--db", db_url, "--json", input="n\n")
    assert declined.exit_code == 1 and "Delete all dead letters" in declined.output
    listed = invoke("inbox", "dead", "list", "--db", db_url, "--json")
    assert len(json.loads(listed.output)) == 3
    accepted = invoke("inbox", "dead", "purge", "--db", db_url, "--json", input="y\n")
    assert accepted.exit_code == 0, accepted.output
    printed = accepted.output  # the prompt (stderr) and then the JSON (stdout)
    assert json.loads(printed[printed.index("{") :]) == {"purged": 3}


async def _holds(url: str, note: bool) -> int:
    async with Database(url) as database:
        if note:
            async with database.transaction() as conn:
                await note_holds(conn, "alpha", ["m-1", "m-2"])
                await note_holds(conn, "alpha", ["m-1"])
        async with database.connect() as conn:
            return await holds_of(conn, "alpha", "m-1")


def test_prune_keeps_recent_inbox_rows_and_holds(db_url: str) -> None:
    asyncio.run(_seed(db_url))
    assert asyncio.run(_holds(db_url, note=True)) == 2
    kept = invoke("inbox", "prune", "--db", db_url, "--json")
    assert json.loads(kept.output) == {"pruned": 0}
    assert asyncio.run(_holds(db_url, note=False)) == 2
    pruned = invoke("inbox", "prune", "--db", db_url, "--older-than-days", "0", "--json")
    assert json.loads(pruned.output) == {"pruned": 1}
    assert asyncio.run(_holds(db_url, note=False)) == 0


def test_an_id_or_limit_past_what_the_column_holds_is_not_a_driver_error(db_url: str) -> None:
    """An id past BIGINT: 'no dead letter with id …' like any other absent id (it was
    SQLite's OverflowError with a traceback, asyncpg's DataError with the SQL); a limit
    past it lists them all."""
    asyncio.run(_seed(db_url))
    huge = str(2**64)
    for args in (["show", huge], ["replay", huge], ["purge", huge, "--json"]):
        done = invoke("inbox", "dead", *args, "--db", db_url)
        said = " ".join(done.output.split())
        assert done.exit_code == 1, done.output
        assert f"no dead letter with id {huge}" in said, done.output
        assert "Traceback" not in said and "SQL" not in said
    listed = invoke("inbox", "dead", "list", "--limit", huge, "--db", db_url, "--json")
    assert listed.exit_code == 0, listed.output
    assert len(json.loads(listed.output)) == 3


async def _list_with_limit(url: str, limit: Any) -> None:
    async with Database(url) as database:
        await DeadLetters(database).list(limit=limit)


@pytest.mark.parametrize("limit", [0, -1, 2.5])
def test_a_list_limit_below_one_is_refused(db_url: str, limit: Any) -> None:
    """DeadLetters.list(limit=-1) listed every letter on SQLite (LIMIT -1 is none) and
    was a driver error on PostgreSQL."""
    with pytest.raises(ConfigurationError, match="limit must be a whole number"):
        asyncio.run(_list_with_limit(db_url, limit))
