"""``accord worker``: run a service's relays and consumers until SIGTERM."""

from __future__ import annotations

from typing import Annotated

import typer

from accord.cli.app import app, run
from accord.runtime import load_settings, serve

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
        str | None, typer.Option("--db", help="Database URL (default: ACCORD_DB or the file).")
    ] = None,
    broker: Annotated[
        str | None,
        typer.Option("--broker", help="Broker URL (default: ACCORD_BROKER, else the database)."),
    ] = None,
    service: Annotated[str | None, typer.Option("--service", help="Service name.")] = None,
    settings_file: Annotated[
        str | None,
        typer.Option(
            "--settings", envvar="ACCORD_SETTINGS", help="Settings file (.toml or KEY=value)."
        ),
    ] = None,
    log_level: Annotated[str | None, typer.Option("--log-level", help="Logging level.")] = None,
) -> None:
    """Run the app's components until SIGTERM/SIGINT, then stop them gracefully and exit 0."""

    async def go() -> int:
        # Inside run(): a settings error is a one-line message, not a traceback.
        settings = load_settings(
            settings_file, db=db, broker=broker, service=service, log_level=log_level
        )
        return await serve(app_spec, settings)

    raise typer.Exit(run(go()))
