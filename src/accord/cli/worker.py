"""``accord worker``: run a service's relays and consumers until SIGTERM."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from accord.cli.app import JsonOption, app, console, print_json, run
from accord.runtime import Settings, declare_groups, load_settings, serve

__all__ = ["worker"]


@app.command("worker")
def worker(
    app_spec: Annotated[
        str,
        typer.Option(
            "--app",
            envvar="ACCORD_APP",
            help="module:attribute of a callable that takes the Settings and returns the "
            "components to run (relays, consumers...).",
        ),
    ],
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            help="Database URL: sqlite+aiosqlite:///path.db or postgresql+asyncpg://user@host/db "
            "(default: ACCORD_DB, the settings file, else sqlite+aiosqlite:///accord.db).",
        ),
    ] = None,
    broker: Annotated[
        str | None,
        typer.Option(
            "--broker",
            help="Broker URL: amqp://, nats://, redis://, or a database URL for the SQL "
            "transport (default: ACCORD_BROKER, the settings file, else the SQL transport on "
            "the database).",
        ),
    ] = None,
    service: Annotated[
        str | None,
        typer.Option(
            "--service", help="Service name, in logs and metrics (default: ACCORD_SERVICE)."
        ),
    ] = None,
    settings_file: Annotated[
        str | None,
        typer.Option(
            "--settings",
            envvar="ACCORD_SETTINGS",
            help="Settings file: TOML (top level or an \\[accord] table) or KEY=value lines. "
            f"Its keys are the settings: {', '.join(Settings.model_fields)}; each may also be "
            "set as ACCORD_<KEY> in the environment, which wins over the file, and options "
            "win over both. A key that is no setting is an error.",
        ),
    ] = None,
    log_level: Annotated[
        str | None,
        typer.Option(
            "--log-level",
            help="Logging level: DEBUG, INFO, WARNING, ERROR or CRITICAL (default: "
            "ACCORD_LOG_LEVEL, else INFO).",
        ),
    ] = None,
    declare_only: Annotated[
        bool,
        typer.Option(
            "--declare-only",
            help="Declare the components' consumer groups on the broker, print them and "
            "exit, without consuming. Run it for every service at deploy time, before any "
            "service that publishes to them starts: a group gets only what is published "
            "after it exists.",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Run the app's components until SIGTERM/SIGINT, then stop them gracefully
    and exit 0.

    On start the worker declares its consumers' groups first, then starts its
    relays and consumers, so its own relay never publishes before its groups exist.
    """

    if as_json and not declare_only:
        raise typer.BadParameter("--json goes with --declare-only", param_hint="--json")

    async def go() -> int:
        # Inside run(): a settings error is a one-line message, not a traceback.
        settings = load_settings(
            settings_file, db=db, broker=broker, service=service, log_level=log_level
        )
        if not declare_only:
            return await serve(app_spec, settings)
        declared = await declare_groups(app_spec, settings)
        if as_json:
            print_json(
                [
                    {"transport": d.transport, "group": d.group, "topics": list(d.topics)}
                    for d in declared
                ]
            )
        elif not declared:
            console.print("No component of this app consumes from a transport: nothing to declare.")
        else:
            for d in declared:
                group, topics = escape(d.group), escape(", ".join(d.topics))
                console.print(f"declared group [bold]{group}[/] on {d.transport} for {topics}")
        return 0

    raise typer.Exit(run(go()))
