"""``accord sagas``: list saga instances, show one's timeline, retry STUCK ones, abort,
prune ended ones and participants' old records."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from accord.cli.app import (
    MAX_INTEGER,
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
from accord.errors import AccordError
from accord.sagas import STATUSES, SagaAdmin

sagas_app = typer.Typer(
    help="Saga instances: list, show (step log as a timeline), retry STUCK ones, abort, "
    "prune ended ones and participants' old records.",
    no_args_is_help=True,
)
app.add_typer(sagas_app, name="sagas")

IdArgument = Annotated[str, typer.Argument(help="The saga instance id.")]
_STYLES = {
    "COMPLETED": "green",
    "COMPENSATED": "yellow",
    "STUCK": "bold red",
    "ABORTED": "red",
    "RUNNING": "cyan",
    "COMPENSATING": "magenta",
}


def _styled(status: str) -> str:
    return f"[{_STYLES.get(status, 'white')}]{status}[/]"


@sagas_app.command("list")
def list_sagas(
    db: DbOption,
    as_json: JsonOption = False,
    status: Annotated[
        str | None, typer.Option("--status", help=f"Only this status: {', '.join(STATUSES)}.")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Only this saga.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many.", min=1, max=MAX_INTEGER)] = 100,
) -> None:
    """Saga instances, most recently changed first, with the counts per status."""
    if status and status.upper() not in STATUSES:
        raise typer.BadParameter(f"--status must be one of {', '.join(STATUSES)}")

    async def go() -> tuple[list[dict[str, Any]], dict[str, int]]:
        async with Database(db) as database:
            admin = SagaAdmin(database)
            found = await admin.list(status=status, name=name, limit=limit)
            return [s.as_dict() for s in found], await admin.counts()

    found, counts = run(go())
    if as_json:
        print_json({"sagas": found, "counts": counts})
        return
    table = Table(title="Sagas")
    # Ids whole (up to a UUID's width), for retry and abort: the other columns wrap.
    widest = max((len(s["id"]) for s in found), default=2)
    table.add_column("id", min_width=min(widest, 36), overflow="fold")
    for column in ("saga", "status", "at", "updated", "error"):
        table.add_column(column)
    for s in found:
        where = f"{s['phase']} step {s['step']} (attempt {s['attempt']})"
        styled = Text.from_markup(_styled(s["status"]))
        table.add_row(*plain(s["id"], s["name"], styled, where, s["updated_at"], s["error"]))
    console.print(table)
    console.print("  ".join(f"{_styled(k)}: {v}" for k, v in sorted(counts.items())))


@sagas_app.command("show")
def show(saga_id: IdArgument, db: DbOption, as_json: JsonOption = False) -> None:
    """One instance and its step log as a timeline."""

    async def go() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        async with Database(db) as database:
            admin = SagaAdmin(database)
            state = await admin.get(saga_id)
            return state.as_dict(), [e.as_dict() for e in await admin.history(saga_id)]

    state, history = run(go())
    if as_json:
        print_json({**state, "steps": history})
        return
    console.print(
        f"[bold]{escape(state['name'])}[/] {escape(state['id'])}: {_styled(state['status'])} "
        f"({state['phase']} step {state['step']}, version {state['version']})"
    )
    if state["error"]:
        console.print(f"  reason: {escape(state['error'])}")
    table = Table(title="Timeline")
    for column in ("at", "step", "phase", "event", "attempt", "detail"):
        table.add_column(column)
    for e in history:
        table.add_row(
            *plain(
                e["at"],
                f"{e['step']} {e['step_name']}",
                e["phase"],
                e["event"],
                e["attempt"],
                e["detail"],
            )
        )
    console.print(table)


@sagas_app.command("retry")
def retry(
    db: DbOption,
    saga_ids: Annotated[
        list[str] | None, typer.Argument(help="STUCK saga instance ids.", show_default=False)
    ] = None,
    all_stuck: Annotated[
        bool, typer.Option("--all", help="Resume every STUCK saga (see --name).")
    ] = False,
    name: Annotated[
        str | None, typer.Option("--name", help="With --all: only the STUCK sagas of this saga.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Resume STUCK sagas where they stopped, with fresh attempts (the running
    orchestrator carries them on).

    --json prints an object with "resumed" (the sagas, as `show` prints them)
    and "failed" (each id with its error). Exits 1 if a named saga could not be
    resumed (not found, or not STUCK).
    """
    if name and not all_stuck:
        raise typer.BadParameter("--name selects sagas for --all; with ids, leave it out")
    if all_stuck == bool(saga_ids):
        raise typer.BadParameter("give the ids of STUCK sagas, or --all (not both)")

    async def go() -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
        async with Database(db) as database:
            admin = SagaAdmin(database)
            if all_stuck:
                with _progress(as_json) as show:
                    resumed = await admin.retry_stuck(name=name, on_progress=show)
                return [s.as_dict() for s in resumed], []
            done: list[dict[str, Any]] = []
            failed: list[dict[str, str]] = []
            for saga_id in dict.fromkeys(saga_ids or []):
                try:
                    done.append((await admin.retry(saga_id)).as_dict())
                except AccordError as exc:
                    failed.append({"id": saga_id, "error": str(exc)})
            return done, failed

    resumed, failed = run(go())
    if as_json:
        print_json({"resumed": resumed, "failed": failed})
    else:
        for state in resumed if len(resumed) <= 10 else []:
            console.print(f"saga {escape(state['id'])} resumed: {_styled(state['status'])}")
        console.print(f"{len(resumed)} saga(s) resumed.")
        for f in failed:
            err_console.print(
                f"[bold red]not resumed:[/] {escape(str(f['error']))}", soft_wrap=True
            )
    if failed:
        raise typer.Exit(1)


@contextlib.contextmanager
def _progress(quiet: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar for a bulk retry (none with --json); yields its callback."""
    if quiet:
        yield None
        return
    with Progress(
        TextColumn("resuming STUCK sagas"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task("retry", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@sagas_app.command("abort")
def abort(
    saga_id: IdArgument,
    db: DbOption,
    as_json: JsonOption = False,
    reason: Annotated[str, typer.Option(help="Why, for the step log.")] = "aborted by an operator",
) -> None:
    """Abort a saga: compensate it if it is still running its steps; otherwise (already
    compensating, STUCK, past its pivot) mark it ABORTED and leave the rest to you."""

    async def go() -> dict[str, Any]:
        async with Database(db) as database:
            return (await SagaAdmin(database).abort(saga_id, reason)).as_dict()

    state = run(go())
    if as_json:
        print_json(state)
    else:
        console.print(f"abort of saga {escape(saga_id)} requested; the orchestrator carries it out")


@sagas_app.command("prune")
def prune(
    db: DbOption,
    older_than_days: Annotated[
        float,
        age_option("Delete sagas that ended before this (COMPLETED, COMPENSATED, ABORTED)."),
    ] = 30.0,
    name: Annotated[str | None, typer.Option(help="Only the instances of this saga.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Delete ended sagas and their step logs. A running orchestrator does this for its
    own sagas (its ``retention``); STUCK and running sagas are never deleted."""

    run_prune(
        db,
        "ended sagas",
        lambda database, show: SagaAdmin(database).prune(
            timedelta(days=older_than_days), name=name, on_batch=show
        ),
        noun="ended saga(s)",
        as_json=as_json,
        report={"older_than_days": older_than_days, "name": name},
    )


@sagas_app.command("prune-participations")
def prune_participations(
    db: DbOption,
    older_than_days: Annotated[
        float, age_option("Delete participants' records of saga steps written before this.")
    ] = 30.0,
    participant: Annotated[
        str | None,
        typer.Option(help="Only this participant's records (the name of its consumer)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Delete participants' records of the saga steps they handled (what makes a re-sent
    command idempotent). A consumer with participant handlers does this for its own
    (``records_retention``, 30 days). Keep them longer than your longest saga: a
    participant refuses a command of a saga that started before the time pruned up to
    when no record of its step is left, and the saga ends STUCK."""

    run_prune(
        db,
        "participants' records",
        lambda database, show: SagaAdmin(database).prune_participations(
            timedelta(days=older_than_days), participant=participant, on_batch=show
        ),
        noun="participant record(s)",
        as_json=as_json,
        report={"older_than_days": older_than_days, "participant": participant},
    )
