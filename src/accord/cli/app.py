"""The ``accord`` command line: one Typer app, one sub-app per area."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import inspect
import json
import math
import os
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text
from sqlalchemy.engine import make_url

from accord._checks import MAX_BIGINT
from accord.db import Database
from accord.db.database import normalize_url
from accord.errors import AccordError

__all__ = [
    "MAX_INTEGER",
    "DbOption",
    "JsonOption",
    "age_option",
    "app",
    "console",
    "duration",
    "duration_days",
    "err_console",
    "escape",
    "main",
    "plain",
    "print_json",
    "pruning",
    "run",
]

T = TypeVar("T")

app = typer.Typer(
    name="accord",
    help="Accord: outbox, inbox, sagas, event sourcing and projections for services "
    "that must agree without distributed transactions.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Create and migrate Accord's tables.", no_args_is_help=True)
app.add_typer(db_app, name="db")

console = Console()
err_console = Console(stderr=True)

#: The largest whole number an option may take: what both databases' BIGINT holds
#: (SQLite's driver raised OverflowError on a larger one, asyncpg a DataError).
MAX_INTEGER = MAX_BIGINT

_DB_HELP = "Database URL: sqlite+aiosqlite:///path.db or postgresql+asyncpg://user@host/db."


def existing_database(url: str) -> str:
    """``--db`` of a command that reads or changes what is there: a SQLite file must
    exist (SQLite would create an empty one, and the command then report no tables,
    for a mistyped path)."""
    try:
        parsed = make_url(normalize_url(url))
    except Exception:
        return url  # Database() says what is wrong with it
    path = parsed.database
    # With ?uri=true the path is a file: URI whose mode may create it on purpose.
    in_a_file = bool(path) and path != ":memory:" and "uri" not in parsed.query
    if parsed.get_backend_name() == "sqlite" and in_a_file and not os.path.exists(str(path)):
        raise typer.BadParameter(
            f"there is no SQLite database at {path}: check the path "
            "(accord db upgrade --db URL creates one)"
        )
    return url


DbOption = Annotated[
    str, typer.Option("--db", envvar="ACCORD_DB", help=_DB_HELP, callback=existing_database)
]
#: ``--db`` of ``accord db upgrade``: creates a SQLite file that is not there.
NewDbOption = Annotated[str, typer.Option("--db", envvar="ACCORD_DB", help=_DB_HELP)]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine for a command; turn Accord errors into a clear message and exit 1."""
    try:
        return asyncio.run(coro)
    except AccordError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None


def duration(value: float) -> float:
    """A ``--older-than``-like option in seconds: a finite, non-negative number up to
    a century (``nan``, ``inf`` or a negative age would select nothing or
    everything; past a century datetime arithmetic overflows)."""
    return _within(value, 100 * 365 * 86_400.0)


def duration_days(value: float) -> float:
    """:func:`duration` for an option in days."""
    return _within(value, 100 * 365)


@contextlib.contextmanager
def pruning(what: str, quiet: bool) -> Iterator[Callable[[int], None] | None]:
    """A live count on stderr while a prune runs, batch by batch (none with --json);
    yields the callback a prune calls with how many ``what`` went so far."""
    if quiet:
        yield None
        return
    with err_console.status(f"pruning {what}…") as status:
        yield lambda done: status.update(f"pruning {what}: {done:,} so far…")


def run_prune(
    db: str,
    what: str,
    prune: Callable[[Database, Callable[[int], None] | None], Awaitable[int]],
    *,
    noun: str,
    as_json: bool,
    report: dict[str, Any],
) -> None:
    """Run a prune command: ``prune(database, on_batch)`` on ``db`` with a live count of
    ``what`` on stderr, then print how many ``noun`` went (as JSON: with ``report``,
    the options it ran with)."""

    async def go() -> int:
        async with Database(db) as database:
            with pruning(what, as_json) as show:
                return await prune(database, show)

    count = run(go())
    if as_json:
        print_json({"pruned": count, **report})
    else:
        console.print(f"Pruned {count} {noun}.")


def age_option(help: str) -> Any:
    """The ``--older-than-days`` option of a prune command, checked by
    :func:`duration_days`; ``help`` says what goes."""
    return typer.Option("--older-than-days", help=help, callback=duration_days)


def _within(value: float, longest: float) -> float:
    if not math.isfinite(value) or not 0 <= value <= longest:
        raise typer.BadParameter(f"{value:g} is not a duration: give 0 to {longest:g}")
    return value


def plain(*values: object) -> list[Text]:
    """Table cells shown as they are: stored text (a reason, a type, a source) is
    data, not Rich markup (``[/x]`` in it would break the table, ``[bold]`` vanish).
    ``None`` is an empty cell; a :class:`~rich.text.Text` keeps its style."""
    return [v if isinstance(v, Text) else Text("" if v is None else str(v)) for v in values]


def print_json(value: Any) -> None:
    """Print a JSON document (times as ISO-8601, ``2026-12-07T23:00:00+00:00``)."""
    typer.echo(json.dumps(value, indent=2, default=_json_value))


def _json_value(value: Any) -> Any:
    # str() of a datetime puts a space where ISO-8601 (and JavaScript's Date, jq's
    # fromdateiso8601) wants a "T".
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    return str(value)


@db_app.command("upgrade")
def db_upgrade(db: NewDbOption, as_json: JsonOption = False) -> None:
    """Create or migrate every Accord table (idempotent)."""

    async def go() -> int:
        async with Database(db) as database:
            return await database.upgrade()

    version = run(go())
    if as_json:
        shown = make_url(normalize_url(db)).render_as_string(hide_password=True)
        print_json({"database": shown, "schema_version": version})
    else:
        console.print(f"Accord schema is at version [bold]{version}[/].")


def _register_subcommands() -> None:
    """Import the sub-apps that other modules contribute (outbox, events, sagas...)."""
    import importlib

    for module in (
        "accord.cli.outbox",
        "accord.cli.inbox",
        "accord.cli.worker",
        "accord.cli.events",
        "accord.cli.projections",
        "accord.cli.sagas",
        "accord.cli.flows",
        "accord.cli.demo",
    ):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    _summarise(app)


def _summarise(group: typer.Typer) -> None:
    """Give each command the first paragraph of its docstring, on one line, as the
    summary its group's help lists (Typer keeps the docstring's line breaks there,
    and its reStructuredText quotes)."""
    for command in group.registered_commands:
        text = command.help or inspect.getdoc(command.callback) or ""
        if command.short_help is None and text:
            first = " ".join(text.split("\n\n")[0].split())
            command.short_help = first.replace("``", "")
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            _summarise(sub.typer_instance)


def main() -> None:
    """Entry point of the ``accord`` console script."""
    _register_subcommands()
    app()
