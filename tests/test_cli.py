"""What every `accord` command owes its user: stored text shown as it is, errors that
name the fix on stderr with exit 1, usage errors with exit 2, and no traceback."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import typer
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from accord.cli.app import _register_subcommands, app
from accord.db import Database
from accord.db.schema import inbox
from tests.sagas.test_cli import record_flow

_register_subcommands()
runner = CliRunner()


def accord(*args: str) -> Any:
    # Wide enough that Rich tables do not wrap the cells the tests look for.
    result = runner.invoke(app, list(args), env={"COLUMNS": "250"})
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"escaped as a traceback: {result.exception!r}\n{result.output}"
    )
    return result


@pytest.mark.parametrize("saga_id", ["[/x]", "[bold]abc"])
def test_an_error_message_is_printed_as_it_is_not_as_markup(sqlite_url: str, saga_id: str) -> None:
    """An id like '[/x]' crashed the CLI (Rich's MarkupError); '[bold]abc' was shown
    as 'abc', an id the user never typed."""
    result = accord("sagas", "show", saga_id, "--db", sqlite_url)
    assert result.exit_code == 1
    assert f"no saga {saga_id!r}" in result.stderr


@pytest.mark.parametrize(
    ("source", "error"),
    [("cars", "Field required [type=missing]"), ("cars[/v2]", "no cars")],
    ids=["pydantic's wording", "a closing tag"],
)
def test_text_recorded_from_messages_is_shown_as_it_is(
    sqlite_url: str, source: str, error: str
) -> None:
    """A source or an error is data: Rich swallowed '[type=missing]' and crashed on
    '[/v2]'."""
    correlation = asyncio.run(record_flow(sqlite_url, source, error))
    result = accord("flows", "show", correlation, "--db", sqlite_url)
    assert result.exit_code == 0
    assert source in result.stdout and error in result.stdout


async def _inbox_rows(url: str, add: bool = False) -> int:
    async with Database(url) as database, database.transaction() as conn:
        if add:
            row = {"consumer": "c", "message_id": "m", "processed_at": datetime.now(UTC)}
            await conn.execute(inbox.insert().values(message_type="t", **row))
        return int(await conn.scalar(sa.select(sa.func.count()).select_from(inbox)) or 0)


@pytest.mark.parametrize(
    "args",
    [
        ("inbox", "prune", "--older-than-days", "-1"),
        ("inbox", "prune", "--older-than-days", "nan"),
        ("inbox", "prune", "--older-than-days", "inf"),
        ("inbox", "prune", "--older-than-days", "1e12"),
        ("flows", "stalled", "--older-than", "nan"),
        ("flows", "stalled", "--older-than", "-5"),
    ],
)
def test_a_duration_that_is_not_one_is_a_usage_error(db_url: str, args: tuple[str, ...]) -> None:
    """`prune --older-than-days -1` put the cutoff in the future and deleted the rows
    of messages applied a moment ago (their redeliveries would apply twice); nan, inf
    and 1e12 days were tracebacks."""
    assert asyncio.run(_inbox_rows(db_url, add=True)) == 1
    result = accord(*args, "--db", db_url, "--json")
    assert result.exit_code == 2
    assert "is not a duration" in result.stderr
    assert asyncio.run(_inbox_rows(db_url)) == 1


@pytest.mark.parametrize(
    "command",
    [("sagas", "list"), ("inbox", "status"), ("inbox", "dead", "list"), ("flows", "stalled")],
)
def test_a_database_without_accords_tables_gets_told_to_run_db_upgrade(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    (tmp_path / "never-migrated.db").touch()
    url = f"sqlite+aiosqlite:///{tmp_path / 'never-migrated.db'}"
    result = accord(*command, "--db", url)
    assert result.exit_code == 1
    assert "run `accord db upgrade --db URL` first" in result.stderr


@pytest.mark.parametrize(
    "command",
    [("sagas", "list"), ("outbox", "status"), ("events", "read", "s-1"), ("flows", "stalled")],
)
def test_a_sqlite_path_with_no_database_is_a_usage_error_that_creates_nothing(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    """SQLite would create an empty file (and its folder) for a mistyped path, and the
    command then advise ``accord db upgrade``, which would migrate the typo."""
    missing = tmp_path / "typo" / "match.db"
    result = accord(*command, "--db", f"sqlite+aiosqlite:///{missing}")
    assert result.exit_code == 2
    assert f"there is no SQLite database at {missing}" in " ".join(result.stderr.split())
    assert not missing.parent.exists()
    typo = accord(*command, "--db", f"sqlite+aiosqlite:///file:{missing}")  # no uri=true
    assert typo.exit_code == 2
    assert not missing.parent.exists()
    upgraded = accord("db", "upgrade", "--db", f"sqlite+aiosqlite:///{tmp_path / 'new.db'}")
    assert upgraded.exit_code == 0, upgraded.stderr


@pytest.mark.postgres
def test_db_upgrade_shows_the_url_without_its_password(pg_url: str) -> None:
    """The URL went to stdout (CI logs) as given, password included. (The test
    server trusts any password.)"""
    url = make_url(pg_url).set(password="s3cret-pw").render_as_string(hide_password=False)
    result = accord("db", "upgrade", "--db", url, "--json")
    assert result.exit_code == 0, result.output
    assert "s3cret-pw" not in result.stdout and "***" in result.stdout


@pytest.mark.parametrize(
    "url", ["bogus", "postgresql://postgres@127.0.0.1:abc/db", "sqlite:///{tmp}/a-file/x.db"]
)
def test_db_upgrade_with_an_unusable_url_exits_1_with_the_reason(url: str, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    result = accord("db", "upgrade", "--db", url.format(tmp=tmp_path), "--json")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot")


def test_purging_a_dead_letter_that_is_not_there_exits_1(db_url: str) -> None:
    """It printed "Purged 0" and exited 0, while `show 999` and `replay 999` exit 1:
    a script could not tell a typo from success."""
    result = accord("inbox", "dead", "purge", "999", "--db", db_url, "--json")
    assert result.exit_code == 1
    assert "no dead letter with id 999" in result.stderr


def test_a_usage_error_goes_to_stderr_and_leaves_the_json_on_stdout_alone(
    sqlite_url: str,
) -> None:
    result = accord("inbox", "dead", "replay", "--db", sqlite_url, "--json")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "give a dead letter ID, or --all" in result.stderr


@pytest.mark.parametrize("days", ["1000000", "800000"])
def test_prune_refuses_an_age_in_days_past_the_calendar_as_a_usage_error(
    sqlite_url: str, days: str
) -> None:
    """`accord inbox prune --older-than-days N` must refuse, as a usage error (exit 2,
    no traceback), an age whose cutoff falls before year 1, as it refuses nan/inf/-1.

    Before the fix, it failed because the shared ``duration`` callback bounds every
    option by ``_LONGEST`` = a century *in seconds* (3.15e9), but ``--older-than-days``
    is in days: 800 000 days passes the check, and
    ``datetime.now() - timedelta(days=800000)`` raises OverflowError (a traceback)."""
    upgrade = runner.invoke(app, ["db", "upgrade", "--db", sqlite_url])
    assert upgrade.exit_code == 0, upgrade.output
    result = runner.invoke(
        app, ["inbox", "prune", "--db", sqlite_url, "--older-than-days", days],
        env={"COLUMNS": "200"},
    )  # fmt: skip
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"escaped as a traceback: {result.exception!r}"
    )
    assert result.exit_code == 2, result.output


@pytest.mark.parametrize(
    "command", [("outbox", "dead", "list"), ("inbox", "dead", "list"), ("sagas", "list")]
)
def test_a_limit_below_one_is_a_usage_error(sqlite_url: str, command: tuple[str, ...]) -> None:
    """--limit -1 meant "all" on SQLite and was an SQL error on PostgreSQL."""
    result = accord(*command, "--db", sqlite_url, "--limit", "-1")
    assert result.exit_code == 2
    assert "--limit" in result.stderr


@pytest.mark.parametrize(
    "command",
    [
        ("events", "read", "s-1", "--version"),
        ("events", "tail", "--after"),
        ("sagas", "list", "--limit"),
        ("projections", "rebuild", "p", "--batch-size"),
        ("projections", "parked", "replay", "p", "--id"),
    ],
)
def test_a_number_past_what_the_database_holds_is_a_usage_error(
    db_url: str, command: tuple[str, ...]
) -> None:
    """A number past BIGINT was SQLite's OverflowError with a traceback (asyncpg's
    DataError on PostgreSQL)."""
    *args, option = command
    result = accord(*args, "--db", db_url, option, str(2**63))
    assert result.exit_code == 2, result.output
    assert option in result.stderr and "9223372036854775807" in result.stderr


def test_json_output_writes_times_as_iso_8601(sqlite_url: str) -> None:
    """Times were written as str() gives them, with a space for ISO-8601's "T"."""
    from accord import Message, add_to_outbox

    async def schedule() -> None:
        async with Database(sqlite_url) as database:
            await database.upgrade()
            async with database.transaction() as conn:
                await add_to_outbox(conn, Message(type="t.later"), delay=timedelta(hours=1))

    asyncio.run(schedule())
    result = accord("outbox", "scheduled", "list", "--db", sqlite_url, "--json")
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)
    times = [v for v in row.values() if isinstance(v, str) and v[:4].isdigit() and ":" in v]
    assert times and all("T" in t and datetime.fromisoformat(t).tzinfo for t in times), row


@pytest.mark.parametrize("command", ["demo", "up"])
def test_the_tournament_commands_without_the_service_extra_name_it(
    command: str, tmp_path: Path
) -> None:
    """Without httpx (the service extra) they printed a ModuleNotFoundError
    traceback: tournament was imported before the check that names the extra."""
    code = (
        "import sys; sys.modules['httpx'] = None; from accord.cli import main; "
        f"sys.argv = ['accord', {command!r}, '--data-dir', {str(tmp_path)!r}]; main()"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "accord[service]" in " ".join(output.split()) and "Traceback" not in output


@pytest.mark.parametrize(
    "command",
    [("outbox", "dead", "replay"), ("outbox", "dead", "purge"), ("inbox", "dead", "replay")],
)
def test_a_dead_replay_or_purge_naming_nothing_is_a_usage_error(
    sqlite_url: str, command: tuple[str, ...]
) -> None:
    """The outbox's exited 1, as if the database had failed; the inbox's 2. (The
    inbox's purge without an id purges every dead letter, after a confirmation.)"""
    asyncio.run(_upgraded(sqlite_url))
    result = accord(*command, "--db", sqlite_url)
    assert result.exit_code == 2, result.output
    assert "--all" in result.stderr


async def _upgraded(url: str) -> None:
    async with Database(url) as database:
        await database.upgrade()


def test_every_commands_summary_is_one_paragraph_of_plain_text() -> None:
    """Typer lists a command by its docstring's first paragraph with the docstring's
    line breaks ("with fresh attempts (the running⏎ orchestrator carries them on)")
    and its reStructuredText quotes (``retention``)."""

    def commands(group: typer.Typer) -> list[Any]:
        found = list(group.registered_commands)
        for sub in group.registered_groups:
            if sub.typer_instance is not None:
                found += commands(sub.typer_instance)
        return found

    listed = commands(app)
    assert len(listed) > 30
    for command in listed:
        assert command.short_help, command.callback
        assert "\n" not in command.short_help and "``" not in command.short_help
    result = accord("sagas", "--help")
    assert "attempts (the running orchestrator" in " ".join(result.stdout.split())
