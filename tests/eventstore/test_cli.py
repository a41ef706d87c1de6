"""``accord events read`` and ``accord events tail`` against a real database."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from accord.cli.app import _register_subcommands, app
from accord.db import Database
from accord.eventstore import EventStore, NewEvent
from accord.testing import wait_for
from tests.conftest import fresh_pg_database

_register_subcommands()


async def invoke(_app: object, args: list[str]) -> Result:
    # The command runs its own event loop: give it a thread.
    return await asyncio.to_thread(CliRunner().invoke, app, args)


async def test_events_read_with_time_travel(db_url: str) -> None:
    async with Database(db_url) as db:
        store = EventStore(db)
        await store.append(
            "cli-s",
            [NewEvent("T", {"n": i}, time=datetime(2024, 1, 1, i, tzinfo=UTC)) for i in range(4)],
        )
        await store.close()
    out = await invoke(app, ["events", "read", "cli-s", "--db", db_url, "--json"])
    assert out.exit_code == 0, out.output
    assert [e["version"] for e in json.loads(out.output)] == [1, 2, 3, 4]
    out = await invoke(app, ["events", "read", "cli-s", "--db", db_url, "--json", "--version", "2"])
    assert [e["data"]["n"] for e in json.loads(out.output)] == [0, 1]
    args = ["events", "read", "cli-s", "--db", db_url, "--json", "--as-of", "2024-01-01T02:30:00Z"]
    out = await invoke(app, args)
    assert [e["data"]["n"] for e in json.loads(out.output)] == [0, 1, 2]
    out = await invoke(app, ["events", "read", "cli-s", "--db", db_url])
    assert out.exit_code == 0 and "cli-s" in out.output
    out = await invoke(app, ["events", "read", "nope", "--db", db_url])
    assert out.exit_code == 1


async def test_events_tail_follows_live(db_url: str) -> None:
    proc = subprocess.Popen(  # noqa: ASYNC220 (a quick spawn, killed in finally)
        [
            str(Path(sys.executable).parent / "accord"),
            "events",
            "tail",
            "--db",
            db_url,
            "--json",
            "--after",
            "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        async with Database(db_url) as db:
            store = EventStore(db)
            await store.append("cli-t", [NewEvent("T", {"n": 1}), NewEvent("T", {"n": 2})])
            await store.close()
        lines: list[dict[str, object]] = []
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)

        def two_lines() -> bool:
            line = proc.stdout.readline() if proc.stdout else ""
            if line.strip():
                lines.append(json.loads(line))
            return len(lines) >= 2

        await wait_for(two_lines, 20)
        assert [line["version"] for line in lines] == [1, 2]
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def never_upgraded(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The URL of a database Accord's tables were never created in."""
    if request.param == "sqlite":
        (tmp_path / "empty.db").touch()  # a SQLite database with no tables
        yield f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
        return
    async with fresh_pg_database("template0") as url:
        yield url


async def test_events_commands_on_a_database_never_upgraded_say_what_to_do(
    never_upgraded: str,
) -> None:
    """The store's own driver connections (PostgreSQL) give the hint every other
    path gives, not a bare UndefinedTableError."""
    for args in (["events", "read", "s"], ["events", "tail", "--after", "0"]):
        out = await invoke(app, [*args, "--db", never_upgraded])
        assert out.exit_code == 1, out.output
        assert "run `accord db upgrade --db URL` first" in " ".join(out.output.split())
