"""``accord sagas``: list saga instances, show one's timeline, retry a STUCK one, abort."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from accord.cli.app import DbOption, JsonOption, app, console, print_json, run
from accord.db import Database
from accord.sagas import STATUSES, SagaAdmin

sagas_app = typer.Typer(
    help="Saga instances: list, show (step log as a timeline), retry a STUCK one, abort.",
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
    limit: Annotated[int, typer.Option(help="At most this many.")] = 100,
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
    for column in ("id", "saga", "status", "at", "updated", "error"):
        table.add_column(column)
    for s in found:
        where = f"{s['phase']} step {s['step']} (attempt {s['attempt']})"
        table.add_row(
            s["id"], s["name"], _styled(s["status"]), where, s["updated_at"], s["error"] or ""
        )
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
        f"[bold]{state['name']}[/] {state['id']}: {_styled(state['status'])} "
        f"({state['phase']} step {state['step']}, version {state['version']})"
    )
    if state["error"]:
        console.print(f"  reason: {state['error']}")
    table = Table(title="Timeline")
    for column in ("at", "step", "phase", "event", "attempt", "detail"):
        table.add_column(column)
    for e in history:
        table.add_row(
            e["at"],
            f"{e['step']} {e['step_name']}",
            e["phase"],
            e["event"],
            str(e["attempt"]),
            e["detail"] or "",
        )
    console.print(table)


@sagas_app.command("retry")
def retry(saga_id: IdArgument, db: DbOption, as_json: JsonOption = False) -> None:
    """Resume a STUCK saga where it stopped (the running orchestrator carries it on)."""

    async def go() -> dict[str, Any]:
        async with Database(db) as database:
            return (await SagaAdmin(database).retry(saga_id)).as_dict()

    state = run(go())
    if as_json:
        print_json(state)
    else:
        console.print(f"saga {saga_id} resumed: {_styled(state['status'])}")


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
        console.print(f"abort of saga {saga_id} requested; the orchestrator carries it out")
