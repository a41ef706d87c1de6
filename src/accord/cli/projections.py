"""``accord projections``: status and lag, rebuild with a progress bar, parked events."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
from collections.abc import AsyncIterator
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

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
from accord.db import Database
from accord.errors import ConfigurationError, NotFoundError
from accord.eventstore import EventStore, Upcasters
from accord.projections import (
    ParkedEvent,
    Projection,
    ProjectionStatus,
    RebuildResult,
    ReplayOutcome,
    list_parked,
    projection_status,
    rebuild,
    replay_parked,
)
from accord.projections import Progress as RebuildProgress

__all__ = ["load_projections", "projections_app"]

projections_app = typer.Typer(
    help="Projections: lag, rebuilds, parked events.", no_args_is_help=True
)
parked_app = typer.Typer(help="Poison events a projection parked.", no_args_is_help=True)
projections_app.add_typer(parked_app, name="parked")
app.add_typer(projections_app, name="projections")

AppOption = Annotated[
    str | None,
    typer.Option(
        "--app",
        envvar="ACCORD_PROJECTIONS",
        help="module:attribute giving the projection definitions (a list of Projection, "
        "or a function returning them).",
    ),
]


UpcastersOption = Annotated[
    str | None,
    typer.Option(
        "--upcasters",
        envvar="ACCORD_UPCASTERS",
        help="module:attribute giving the event store's Upcasters (or a function returning "
        "them): handlers then get events upcast as the running service's store gives them.",
    ),
]


def load_upcasters(spec: str | None) -> Upcasters | None:
    """Import ``module:attribute`` and return the :class:`Upcasters` it holds or returns."""
    if not spec:
        return None
    target = _import(spec, "--upcasters", "myservice.events:upcasters")
    if callable(target) and not isinstance(target, Upcasters):
        target = target()
    if not isinstance(target, Upcasters):
        raise ConfigurationError(f"--upcasters {spec!r} gave {target!r}, not an Upcasters")
    return target


def _import(spec: str, option: str, example: str) -> Any:
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigurationError(
            f"{option} {spec!r} must look like module:attribute, e.g. {example}"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"cannot import {module_name!r} (from {option} {spec!r}): {exc}"
        ) from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigurationError(f"{module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    return target


def load_projections(spec: str) -> list[Projection]:
    """Import ``module:attribute`` and return the projections it holds or returns."""
    target = _import(spec, "--app", "myservice.read:projections")
    if callable(target) and not isinstance(target, Projection):
        target = target()
    if inspect.isawaitable(target):
        raise ConfigurationError(f"--app {spec!r} must not be async")
    found = [target] if isinstance(target, Projection) else list(target)
    bad = [p for p in found if not isinstance(p, Projection)]
    if bad or not found:
        raise ConfigurationError(f"--app {spec!r} gave {bad or 'nothing'}, not Projection objects")
    return found


@contextlib.asynccontextmanager
async def _store(database: Database, upcasters: Upcasters | None) -> AsyncIterator[EventStore]:
    store = EventStore(database, upcasters)
    try:
        yield store
    finally:
        await store.close()


def _pick(projections: list[Projection], name: str) -> Projection:
    for p in projections:
        if p.name == name:
            return p
    raise NotFoundError(
        f"no projection {name!r} in the definitions; they define {[p.name for p in projections]}"
    )


def _need_app(spec: str | None) -> list[Projection]:
    if not spec:
        raise ConfigurationError(
            "this command runs projection handlers: name their definitions with "
            "--app module:attribute (or ACCORD_PROJECTIONS)"
        )
    return load_projections(spec)


@projections_app.command("status")
def status(db: DbOption, app_spec: AppOption = None, as_json: JsonOption = False) -> None:
    """Each projection's position, lag (events and seconds behind), lease and parked count.

    Give --app for a true lag: without the definitions the command does not know
    which event types a projection handles, and counts every event after its
    checkpoint as behind (a projection that is caught up can look far behind).
    """

    async def go() -> list[ProjectionStatus]:
        defs = load_projections(app_spec) if app_spec else None
        async with Database(db) as database:
            return await projection_status(database, defs)

    found = run(go())
    if as_json:
        print_json([s.as_dict() for s in found])
        return
    table = Table(title="projections")
    for column in ("name", "version", "state", "position", "behind", "seconds", "parked", "lease"):
        table.add_column(column)
    for s in found:
        state = Text(s.state, "bold red" if s.state == "stopped" else "")
        if s.rebuilding is not None:
            state.append(f" (rebuilding v{s.rebuilding} at {s.rebuild_position})")
        lag = (
            ("-", "-", "-")
            if s.transport_fed
            else (s.position, s.events_behind, f"{s.seconds_behind:.1f}")
        )
        table.add_row(
            *plain(
                s.name,
                f"v{s.live_version}",
                state,
                *lag,
                Text(str(s.parked), "yellow" if s.parked else ""),
                s.lease_owner or "-",
            )
        )
    console.print(table)
    for s in found:
        if s.error:
            console.print(f"[bold red]{escape(s.name)}:[/] {escape(s.error)}")
    if any(s.transport_fed for s in found):
        console.print(
            "[dim]transport: fed by a TransportProjector, not from the event store's log; "
            "its backlog is its broker queue's[/]"
        )


@projections_app.command("rebuild")
def rebuild_command(
    name: Annotated[str, typer.Argument(help="The projection to rebuild.")],
    db: DbOption,
    app_spec: AppOption = None,
    upcasters_spec: UpcastersOption = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, max=MAX_INTEGER, help="Events per batch.")
    ] = 2000,
    allow_parked: Annotated[
        bool,
        typer.Option(
            "--allow-parked",
            help="Swap the new version in even if handlers failed on events and they "
            "were parked (it then lacks their data until `parked replay`).",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Build a new version of NAME's read model from position 0 beside the live one,
    while writes continue, then swap it in atomically. Give --upcasters if the
    service's event store has them, so the handlers get the events it gives them.

    If a handler fails on events and they are parked, the new version lacks their
    data: it is not swapped in (the live one stays; exit code 1) unless
    --allow-parked is given; the parked events are listed by `parked list`."""

    async def go() -> RebuildResult:
        projection = _pick(_need_app(app_spec), name)
        upcasters = load_upcasters(upcasters_spec)
        async with Database(db) as database, _store(database, upcasters) as store:
            if as_json:
                return await rebuild(
                    database,
                    projection,
                    store=store,
                    batch_size=batch_size,
                    allow_parked=allow_parked,
                )
            with Progress(
                TextColumn(f"rebuilding [bold]{name}[/]"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[rate]:>10} ev/s"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
            ) as bar:
                task = bar.add_task("rebuild", total=None, rate="-")

                def show(p: RebuildProgress) -> None:
                    rate = p.done / p.elapsed if p.elapsed > 0 else 0.0
                    bar.update(task, completed=p.done, total=p.total, rate=f"{rate:,.0f}")

                return await rebuild(
                    database,
                    projection,
                    store=store,
                    batch_size=batch_size,
                    on_progress=show,
                    allow_parked=allow_parked,
                )

    result = run(go())
    if as_json:
        print_json(
            {
                "projection": result.projection,
                "version": result.version,
                "previous": result.previous,
                "events": result.events,
                "parked": result.parked,
                "seconds": round(result.seconds, 3),
            }
        )
    else:
        rate = result.events / result.seconds if result.seconds > 0 else 0.0
        console.print(
            f"[green]v{result.version} of {result.projection} is live[/] "
            f"(was v{result.previous}): {result.events:,} events in {result.seconds:.1f}s "
            f"({rate:,.0f} events/s)"
        )
        if result.parked:
            console.print(
                f"[yellow]{result.parked} event(s) parked[/]: v{result.version} lacks their "
                f"data until `accord projections parked replay {escape(name)}` applies them"
            )


@parked_app.command("list")
def parked_list(
    db: DbOption,
    name: Annotated[str | None, typer.Argument(help="Only this projection.")] = None,
    replayed: Annotated[
        bool, typer.Option("--replayed", help="Include events already replayed.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Poison events projections parked (with their error), oldest first."""

    async def go() -> list[ParkedEvent]:
        async with Database(db) as database:
            return await list_parked(database, name, include_replayed=replayed)

    found = run(go())
    if as_json:
        print_json([p.as_dict() for p in found])
        return
    table = Table(title="parked events")
    for column in ("id", "projection", "version", "position", "type", "stream", "error"):
        table.add_column(column)
    for p in found:
        table.add_row(
            *plain(p.id, p.projection, f"v{p.version}", p.position, p.type, p.stream_id, p.error)
        )
    console.print(table)


@parked_app.command("replay")
def parked_replay(
    name: Annotated[str, typer.Argument(help="The projection.")],
    db: DbOption,
    app_spec: AppOption = None,
    upcasters_spec: UpcastersOption = None,
    ids: Annotated[
        list[int] | None,
        typer.Option("--id", min=1, max=MAX_INTEGER, help="Only these parked ids (repeatable)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Run NAME's handler again on its parked events (after fixing the handler)."""

    async def go() -> list[ReplayOutcome]:
        projection = _pick(_need_app(app_spec), name)
        upcasters = load_upcasters(upcasters_spec)
        async with Database(db) as database, _store(database, upcasters) as store:
            return await replay_parked(database, projection, ids or None, store=store)

    outcomes = run(go())
    if as_json:
        print_json(
            [{"id": o.id, "position": o.position, "ok": o.ok, "error": o.error} for o in outcomes]
        )
    else:
        for o in outcomes:
            mark = "[green]applied[/]" if o.ok else f"[red]failed again:[/] {escape(str(o.error))}"
            console.print(f"parked #{o.id} (position {o.position}): {mark}")
        if not outcomes:
            console.print("nothing to replay")
    if any(not o.ok for o in outcomes):
        raise typer.Exit(1)
