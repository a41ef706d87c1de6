"""``accord events``: read a stream (with time travel) and tail the global log."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.table import Table

from accord.cli.app import (
    MAX_INTEGER,
    DbOption,
    JsonOption,
    app,
    console,
    escape,
    plain,
    print_json,
    run,
)
from accord.cli.projections import UpcastersOption, load_upcasters
from accord.db import Database
from accord.errors import ConfigurationError, NotFoundError
from accord.eventstore import EventStore, RecordedEvent

__all__ = ["events_app"]

events_app = typer.Typer(help="Read and follow the event store.", no_args_is_help=True)
app.add_typer(events_app, name="events")


def _parse_time(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigurationError(
            f"--as-of {value!r} is not an ISO-8601 time; use e.g. 2024-03-01T18:15:00Z"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _table(events: list[RecordedEvent], title: str) -> Table:
    table = Table(title=title)
    for column in ("position", "stream", "version", "type", "schema", "recorded at", "data"):
        table.add_column(column)
    for e in events:
        table.add_row(
            *plain(
                e.position,
                e.stream_id,
                e.version,
                e.type,
                f"v{e.schema_version}",
                e.recorded_at.isoformat(timespec="seconds"),
                json.dumps(e.data, default=str)[:80],
            )
        )
    return table


@events_app.command("read")
def read(
    stream: Annotated[str, typer.Argument(help="The stream id.")],
    db: DbOption,
    as_of: Annotated[
        str | None, typer.Option("--as-of", help="Only events recorded at or before this time.")
    ] = None,
    version: Annotated[
        int | None,
        typer.Option(
            "--version", min=0, max=MAX_INTEGER, help="Only events up to this stream version."
        ),
    ] = None,
    upcasters_spec: UpcastersOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print one stream's events, optionally as it was; with --upcasters, upcast to
    their latest schema as the service's store gives them (else as stored)."""

    async def go() -> list[RecordedEvent]:
        when = _parse_time(as_of) if as_of else None
        upcasters = load_upcasters(upcasters_spec)
        async with Database(db) as database:
            store = EventStore(database, upcasters)
            try:
                found = await store.read_stream(stream, to_version=version, as_of=when)
                if not found and await store.stream_version(stream) == 0:
                    raise NotFoundError(f"stream {stream!r} has no events")
                return found
            finally:
                await store.close()

    events = run(go())
    if as_json:
        print_json([e.as_dict() for e in events])
    else:
        console.print(_table(events, f"stream {stream}"))


@events_app.command("tail")
def tail(
    db: DbOption,
    after: Annotated[
        int | None,
        typer.Option(
            "--after",
            min=0,
            max=MAX_INTEGER,
            help="Start after this position (default: the head).",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Follow the global log live (gap-safe), one line per event; Ctrl-C to stop."""

    async def go() -> None:
        async with Database(db) as database:
            store = EventStore(database)
            try:
                start = await store.head() if after is None else after
                async for e in store.subscribe(start):
                    if as_json:
                        typer.echo(json.dumps(e.as_dict(), default=str), nl=True)
                    else:
                        console.print(
                            f"[dim]{e.position}[/] [bold]{escape(e.stream_id)}[/]@{e.version} "
                            f"[cyan]{escape(e.type)}[/] "
                            f"{escape(json.dumps(e.data, default=str)[:100])}"
                        )
            finally:
                await store.close()

    try:
        run(go())
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
