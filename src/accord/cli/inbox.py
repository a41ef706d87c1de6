"""``accord inbox``: the consumers' inbox and dead letters."""

from __future__ import annotations

import sys
from datetime import timedelta
from typing import Annotated, Any

import typer
from rich.table import Table

from accord.cli.app import (
    DbOption,
    JsonOption,
    age_option,
    app,
    console,
    err_console,
    escape,
    plain,
    print_json,
    run,
    run_prune,
)
from accord.db import Database
from accord.errors import ConfigurationError
from accord.inbox import DeadLetter, DeadLetters, Inbox

__all__ = ["inbox_app"]

inbox_app = typer.Typer(help="Consumers' inbox and dead letters.", no_args_is_help=True)
dead_app = typer.Typer(
    help="Messages consumers gave up on: list, show, replay, purge.", no_args_is_help=True
)
inbox_app.add_typer(dead_app, name="dead")
app.add_typer(inbox_app, name="inbox")

ConsumerOption = Annotated[
    str | None, typer.Option("--consumer", "-c", help="Only this consumer's (its group name).")
]


@inbox_app.command("status")
def status(db: DbOption, consumer: ConsumerOption = None, as_json: JsonOption = False) -> None:
    """Messages applied and dead letters per consumer."""

    async def go() -> tuple[dict[str, int], dict[str, dict[str, int]]]:
        async with Database(db) as database:
            applied = await Inbox(database).count(consumer)
            dead = await DeadLetters(database).count()
        if consumer is not None:
            dead = {k: v for k, v in dead.items() if k == consumer}
        return applied, dead

    applied, dead = run(go())
    names = sorted(set(applied) | set(dead))
    rows: list[dict[str, Any]] = [
        {
            "consumer": name,
            "applied": applied.get(name, 0),
            "dead": dead.get(name, {}).get("DEAD", 0),
            "replaying": dead.get(name, {}).get("REPLAY", 0),
        }
        for name in names
    ]
    if as_json:
        print_json(rows)
        return
    table = Table("consumer", "applied", "dead", "replaying")
    for row in rows:
        table.add_row(*plain(row["consumer"], row["applied"], row["dead"], row["replaying"]))
    console.print(table)


@inbox_app.command("prune")
def prune(
    db: DbOption,
    older_than_days: Annotated[float, age_option("Delete rows processed before this.")] = 7.0,
    consumer: ConsumerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete old inbox rows. A message redelivered after its row is gone is applied
    again: keep this well above your broker's longest redelivery window."""

    run_prune(
        db,
        "inbox rows",
        lambda database, show: Inbox(database).prune(
            timedelta(days=older_than_days), consumer, on_batch=show
        ),
        noun="inbox row(s)",
        as_json=as_json,
        report={},
    )


@dead_app.command("list")
def dead_list(
    db: DbOption,
    consumer: ConsumerOption = None,
    limit: Annotated[int, typer.Option(help="At most this many.", min=1)] = 100,
    as_json: JsonOption = False,
) -> None:
    """List dead letters, oldest first."""

    async def go() -> list[DeadLetter]:
        async with Database(db) as database:
            return list(await DeadLetters(database).list(consumer, limit=limit))

    letters = run(go())
    if as_json:
        print_json([letter.to_dict() for letter in letters])
        return
    if not letters:
        console.print("No dead letters.")
        return
    table = Table("id", "consumer", "type", "kind", "attempts", "status", "created", "reason")
    for letter in letters:
        table.add_row(
            *plain(
                letter.id,
                letter.consumer,
                letter.message_type or "?",
                letter.kind,
                letter.attempts,
                letter.status,
                letter.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                letter.summary[:80],
            )
        )
    console.print(table)


@dead_app.command("show")
def dead_show(
    letter_id: Annotated[int, typer.Argument(help="Dead letter id (see `list`).")],
    db: DbOption,
    as_json: JsonOption = False,
) -> None:
    """Show one dead letter in full: headers, body and the whole reason."""

    async def go() -> DeadLetter:
        async with Database(db) as database:
            return await DeadLetters(database).get(letter_id)

    letter = run(go())
    view = letter.to_dict(full=True)
    if as_json:
        print_json(view)
        return
    for key in ("id", "consumer", "message_id", "message_type", "kind", "attempts", "status"):
        console.print(f"[bold]{key}:[/] {escape(str(view[key]))}")
    console.print(f"[bold]created_at:[/] {view['created_at']}")
    console.print("[bold]headers:[/]")
    for name, value in letter.headers.items():
        console.print(f"  {name}: {value}", markup=False)
    console.print("[bold]body:[/]")
    console.print(letter.body_text(), markup=False)
    console.print("[bold]reason:[/]")
    console.print(letter.reason, markup=False)


@dead_app.command("replay")
def dead_replay(
    db: DbOption,
    letter_id: Annotated[
        int | None, typer.Argument(help="Dead letter id; omit with --all.")
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="Replay every dead letter.")] = False,
    consumer: ConsumerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Deliver dead letters to their consumer again, attempts reset. The running consumer
    picks them up within its replay interval."""
    if (letter_id is None) == (not all_):
        raise typer.BadParameter("give a dead letter ID, or --all (optionally --consumer)")

    async def go() -> int:
        async with Database(db) as database:
            letters = DeadLetters(database)
            if letter_id is not None:
                await letters.replay(letter_id, consumer=consumer)
                return 1
            return await letters.replay_all(consumer)

    count = run(go())
    if as_json:
        print_json({"replaying": count, "id": letter_id})
    else:
        console.print(f"Marked {count} dead letter(s) for replay.")


@dead_app.command("purge")
def dead_purge(
    db: DbOption,
    letter_id: Annotated[int | None, typer.Argument(help="Only this dead letter.")] = None,
    consumer: ConsumerOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Delete dead letters for good (those waiting for replay are kept). Without an ID
    it asks first, or, with no terminal to ask on (a script, --json in a pipe),
    needs --yes."""
    if letter_id is None and not yes:
        scope = f"of consumer {consumer!r}" if consumer else "of every consumer"
        if not _interactive():
            err_console.print(
                f"[bold red]error:[/] deleting all dead letters {escape(scope)} needs --yes "
                "when there is no terminal to confirm on"
            )
            raise typer.Exit(1)
        typer.confirm(f"Delete all dead letters {scope}?", abort=True, err=True)

    async def go() -> int:
        async with Database(db) as database:
            letters = DeadLetters(database)
            count = await letters.purge(consumer, letter_id=letter_id)
            if letter_id is not None and count == 0:
                letter = await letters.get(letter_id)  # NotFoundError if there is none
                if consumer is not None and letter.consumer != consumer:
                    why = f"it belongs to consumer {letter.consumer!r}, not to {consumer!r}"
                else:
                    why = f"it is {letter.status}: only DEAD letters are (wait for its replay)"
                raise ConfigurationError(f"dead letter {letter_id} not purged: {why}")
            return count

    count = run(go())
    if as_json:
        print_json({"purged": count})
    else:
        console.print(f"Purged {count} dead letter(s).")


def _interactive() -> bool:
    """Whether a person can answer a confirmation (stdin is a terminal)."""
    return sys.stdin.isatty()
