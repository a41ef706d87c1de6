"""``accord flows``: the timeline of a flow across services, stalled flows, pruning."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from accord.cli.app import (
    DbOption,
    JsonOption,
    age_option,
    app,
    console,
    duration,
    plain,
    print_json,
    run,
    run_prune,
)
from accord.db import Database
from accord.errors import NotFoundError
from accord.sagas import Flows

flows_app = typer.Typer(
    help="Flows recorded by a flow tracker: a timeline per correlation id, stalled "
    "flows, pruning old ones.",
    no_args_is_help=True,
)
app.add_typer(flows_app, name="flows")

_OUTCOME_STYLES = {"failed": "red", "compensating": "magenta", "compensated": "yellow"}


@flows_app.command("show")
def show(
    correlation_id: Annotated[str, typer.Argument(help="The flow's correlation id.")],
    db: DbOption,
    as_json: JsonOption = False,
) -> None:
    """Every message of the flow: which step ran where, when, and what failed."""

    async def go() -> list[dict[str, Any]]:
        async with Database(db) as database:
            entries = await Flows(database).timeline(correlation_id)
        if not entries:
            raise NotFoundError(
                f"no messages recorded for correlation id {correlation_id!r}: is a "
                "FlowTracker consuming this flow's messages into this database?"
            )
        return [e.as_dict() for e in entries]

    entries = run(go())
    if as_json:
        print_json({"correlation_id": correlation_id, "messages": entries})
        return
    # A Text title: the id is data, not Rich markup ("[/x]" in it crashed the command).
    table = Table(title=Text(f"Flow {correlation_id}"))
    for column in ("time", "service", "step", "message", "outcome", "error"):
        table.add_column(column)
    for e in entries:
        outcome = e["outcome"] or ""
        style = _OUTCOME_STYLES.get(outcome, "green" if outcome == "completed" else "white")
        table.add_row(
            *plain(e["time"], e["source"], e["step"], e["type"], Text(outcome, style), e["error"])
        )
    console.print(table)


@flows_app.command("stalled")
def stalled(
    db: DbOption,
    as_json: JsonOption = False,
    older_than: Annotated[
        float, typer.Option("--older-than", help="Seconds without progress.", callback=duration)
    ] = 300.0,
) -> None:
    """Flows that did not end and had no new message for --older-than seconds."""

    async def go() -> list[dict[str, Any]]:
        async with Database(db) as database:
            found = await Flows(database).stalled(timedelta(seconds=older_than))
        return [f.as_dict() for f in found]

    found = run(go())
    if as_json:
        print_json({"older_than": older_than, "stalled": found})
        return
    if not found:
        console.print(f"No flow stalled for more than {older_than:g}s.")
        return
    table = Table(title=f"Flows without progress for more than {older_than:g}s")
    for column in ("correlation id", "last message", "at", "messages"):
        table.add_column(column)
    for f in found:
        table.add_row(*plain(f["correlation_id"], f["last_type"], f["last_at"], f["messages"]))
    console.print(table)


@flows_app.command("prune")
def prune(
    db: DbOption,
    older_than_days: Annotated[
        float, age_option("Delete flows whose last message was recorded before this.")
    ] = 7.0,
    include_stalled: Annotated[
        bool,
        typer.Option(
            "--stalled",
            help="Delete flows that never ended too (they stop being reported as stalled).",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Delete old flows, their messages and timelines. A running FlowTracker does this
    for ended flows every round (its ``retention``); flows that never ended are kept
    until they end or --stalled is given."""

    run_prune(
        db,
        "flows",
        lambda database, show: Flows(database).prune(
            timedelta(days=older_than_days), stalled=include_stalled, on_batch=show
        ),
        noun="flow(s)",
        as_json=as_json,
        report={"older_than_days": older_than_days, "stalled": include_stalled},
    )
