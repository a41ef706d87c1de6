"""``accord outbox``: status, scheduled messages and dead letters of a database's outbox."""

from __future__ import annotations

import enum
import json
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.table import Table

from accord.cli.app import DbOption, JsonOption, app, console, escape, plain, print_json, run
from accord.db import Database
from accord.outbox.admin import OutboxAdmin

outbox_app = typer.Typer(help="Inspect the transactional outbox.", no_args_is_help=True)
dead_app = typer.Typer(
    help="Messages the relay gave up on (DEAD): list, show, replay, purge.", no_args_is_help=True
)
outbox_app.add_typer(dead_app, name="dead")
scheduled_app = typer.Typer(
    help="Messages added for later (add_to_outbox(..., delay=/deliver_at=)) and not yet "
    "due: list, cancel.",
    no_args_is_help=True,
)
outbox_app.add_typer(scheduled_app, name="scheduled")
app.add_typer(outbox_app, name="outbox")


class Claims(enum.StrEnum):
    lock = "lock"
    lease = "lease"


IdsArgument = Annotated[list[str] | None, typer.Argument(help="Outbox message ids (UUIDs).")]
AllOption = Annotated[bool, typer.Option("--all", help="Act on every DEAD message.")]


@outbox_app.command("status")
def status(db: DbOption, as_json: JsonOption = False) -> None:
    """Counts of PENDING / SENT / DEAD messages, the age of the oldest pending one, and
    the messages scheduled for later (and when the first falls due)."""

    async def go() -> dict[str, object]:
        async with Database(db) as database:
            return (await OutboxAdmin(database).status()).as_dict()

    result = run(go())
    if as_json:
        print_json(result)
        return
    table = Table(title="Outbox")
    columns = ("pending", "retrying", "sent", "dead", "oldest pending (s)", "scheduled", "next due")
    for column in columns:
        table.add_column(column, justify="right")
    age = result["oldest_pending_age_seconds"]
    due = result["next_scheduled_at"]
    table.add_row(
        *(str(result[k]) for k in ("pending", "retrying", "sent", "dead")),
        "-" if age is None else f"{age:.1f}",
        str(result["scheduled"]),
        "-" if due is None else f"{_utc(due)} UTC",
    )
    console.print(table)


@dead_app.command("list")
def dead_list(
    db: DbOption,
    as_json: JsonOption = False,
    limit: Annotated[int, typer.Option(help="At most this many.", min=1)] = 100,
    event_type: Annotated[str | None, typer.Option("--type", help="Only this type.")] = None,
) -> None:
    """DEAD messages, oldest first, with their last error."""

    async def go() -> list[dict[str, object]]:
        async with Database(db) as database:
            return await OutboxAdmin(database).dead(limit=limit, event_type=event_type)

    rows = run(go())
    if as_json:
        print_json(rows)
        return
    table = Table(title=f"DEAD outbox messages ({len(rows)})")
    table.add_column("id", no_wrap=True, min_width=36)  # whole, to paste into replay
    for column in ("type", "key", "attempts", "last error"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            *plain(row["id"], row["event_type"], row["key"], row["retry_count"], row["last_error"])
        )
    console.print(table)


@dead_app.command("show")
def dead_show(message_id: str, db: DbOption, as_json: JsonOption = False) -> None:
    """One message with its payload, headers and last error."""

    async def go() -> dict[str, object]:
        async with Database(db) as database:
            return await OutboxAdmin(database).show(message_id)

    row = run(go())
    if as_json:
        print_json(row)
        return
    for name, value in row.items():
        if isinstance(value, dict | list):  # the payload and headers: as JSON, not reprs
            value = json.dumps(value, indent=2, ensure_ascii=False, default=str)
        console.print(f"[bold]{name}[/]: {escape(str(value))}")


@dead_app.command("replay")
def dead_replay(
    db: DbOption, ids: IdsArgument = None, all_dead: AllOption = False, as_json: JsonOption = False
) -> None:
    """Put DEAD messages back to PENDING with attempts reset; the relay sends them again."""

    _ids_or_all(ids, all_dead)

    async def go() -> int:
        async with Database(db) as database:
            return await OutboxAdmin(database).replay(ids or [], all_dead=all_dead)

    count = run(go())
    if as_json:
        print_json({"replayed": count})
    else:
        console.print(f"{count} message(s) back to PENDING.")


@dead_app.command("purge")
def dead_purge(
    db: DbOption, ids: IdsArgument = None, all_dead: AllOption = False, as_json: JsonOption = False
) -> None:
    """Delete DEAD messages for good."""

    _ids_or_all(ids, all_dead)

    async def go() -> int:
        async with Database(db) as database:
            return await OutboxAdmin(database).purge(ids or [], all_dead=all_dead)

    count = run(go())
    if as_json:
        print_json({"purged": count})
    else:
        console.print(f"{count} message(s) purged.")


@scheduled_app.command("list")
def scheduled_list(
    db: DbOption,
    as_json: JsonOption = False,
    limit: Annotated[int, typer.Option(help="At most this many.", min=1)] = 100,
    event_type: Annotated[str | None, typer.Option("--type", help="Only this type.")] = None,
) -> None:
    """Scheduled messages, next due first, with when each falls due."""

    async def go() -> list[dict[str, object]]:
        async with Database(db) as database:
            return await OutboxAdmin(database).scheduled(limit=limit, event_type=event_type)

    rows = run(go())
    if as_json:
        print_json(rows)
        return
    table = Table(title=f"Scheduled outbox messages ({len(rows)})")
    table.add_column("id", no_wrap=True, min_width=36)  # whole, to paste into cancel
    for column in ("type", "key", "due (UTC)", "added (UTC)"):
        table.add_column(column)
    for row in rows:
        due, added = (_utc(row[k]) for k in ("available_at", "created_at"))
        table.add_row(*plain(row["id"], row["event_type"], row["key"], due, added))
    console.print(table)


@scheduled_app.command("cancel")
def scheduled_cancel(
    db: DbOption,
    ids: Annotated[list[str], typer.Argument(help="Outbox message ids (UUIDs).")],
    as_json: JsonOption = False,
) -> None:
    """Withdraw scheduled messages before they fall due (a message already released
    to the relay, or sent, is not withdrawn)."""

    async def go() -> int:
        async with Database(db) as database:
            return await OutboxAdmin(database).cancel(ids)

    count = run(go())
    if as_json:
        print_json({"cancelled": count, "asked": len(ids)})
    else:
        console.print(f"{count} of {len(ids)} message(s) cancelled.")


def _utc(value: object) -> str:
    return f"{value.astimezone(UTC):%Y-%m-%d %H:%M:%S}" if isinstance(value, datetime) else "-"


@outbox_app.command("relay")
def relay(
    db: DbOption,
    broker: Annotated[
        str | None,
        typer.Option(
            "--broker",
            envvar="ACCORD_BROKER",
            help="Broker URL: amqp://, nats://, redis://, or a database URL for the SQL "
            "transport (default: the SQL transport on --db).",
        ),
    ] = None,
    channel: Annotated[
        str, typer.Option(envvar="ACCORD_CHANNEL", help="Exchange / stream / channel name.")
    ] = "accord",
    batch_size: Annotated[int, typer.Option(help="Rows claimed per round.")] = 500,
    max_attempts: Annotated[
        int, typer.Option(help="Failed publishes before a message is DEAD.")
    ] = 10,
    claims: Annotated[
        Claims | None,
        typer.Option(
            help="How a batch is held while the broker confirms it: 'lock' (PostgreSQL's "
            "default: one transaction, rows locked) or 'lease' (no transaction open while "
            "publishing; use it when an event store shares the PostgreSQL server).",
        ),
    ] = None,
    lease: Annotated[
        float,
        typer.Option(
            help="Seconds a leased batch is this relay's; a relay that dies leaves its "
            "rows for this long. Make it longer than the broker's publish timeout."
        ),
    ] = 30.0,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "INFO",
) -> None:
    """Run a relay for this database's outbox until SIGTERM/SIGINT (then exit 0).

    Run as many as you like against one database: they share the work and keep
    each key's order. A relay that dies leaves its batch to the others.
    """
    from accord.outbox.relay import Relay
    from accord.runtime import load_settings, serve

    settings = load_settings(None, db=db, broker=broker, log_level=log_level, channel=channel)

    def components(settings_: Any) -> list[Relay]:
        return [
            Relay(
                settings_.database(),
                settings_.transport(),
                batch_size=batch_size,
                max_attempts=max_attempts,
                claims=None if claims is None else claims.value,
                lease=lease,
            )
        ]

    raise typer.Exit(run(serve(components, settings)))


def _ids_or_all(ids: list[str] | None, all_dead: bool) -> None:
    """A usage error (exit 2, as the inbox's) unless message ids or ``--all`` are given."""
    if not ids and not all_dead:
        raise typer.BadParameter("give message ids, or --all for every DEAD message")
