"""``accord up`` and ``accord demo``: run the tournament reference system.

Accord never imports ``tournament`` at module level (the library does not depend
on its reference system): each command imports it inside its function, lazily.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Any

import typer

from accord.cli.app import app, console, err_console, escape, run
from accord.errors import ConfigurationError, MissingExtraError

__all__ = ["demo", "up"]

DataDir = Annotated[
    str,
    typer.Option("--data-dir", help="Where the embedded databases, the token and logs live."),
]
MatchDb = Annotated[
    str | None,
    typer.Option("--match-db", help="Match Engine database URL (default: a SQLite file)."),
]
ScoreDb = Annotated[
    str | None,
    typer.Option("--score-db", help="Score Engine database URL (default: a SQLite file)."),
]
Broker = Annotated[
    str | None,
    typer.Option(
        "--broker",
        help="amqp://, nats://, redis:// or a database URL for the SQL transport "
        "(default: the SQL transport on a SQLite file).",
    ),
]
SagaStyle = Annotated[
    str,
    typer.Option("--saga-style", help="How 'create tournament' runs: orchestration|choreography."),
]
MatchPort = Annotated[int, typer.Option("--match-port", help="Match Engine HTTP port.")]
ScorePort = Annotated[int, typer.Option("--score-port", help="Score Engine HTTP port.")]
Workers = Annotated[
    int, typer.Option("--workers", help="Relay/consumer processes per engine.", min=1)
]
ApiToken = Annotated[
    str | None,
    typer.Option(
        "--api-token",
        envvar="ACCORD_API_TOKEN",
        help="Bearer token for POSTs and DELETEs (default: DATA_DIR/api-token, created on "
        "first start).",
    ),
]
Channel = Annotated[str, typer.Option("--channel", help="Broker channel name.", hidden=True)]
LogLevel = Annotated[str, typer.Option("--log-level", help="Log level of the processes.")]


def _config(**options: Any) -> Any:
    for module in ("fastapi", "uvicorn", "httpx"):
        if importlib.util.find_spec(module) is None:
            missing = MissingExtraError("the tournament system", "service", module)
            err_console.print(f"[bold red]error:[/] {escape(str(missing))}")
            raise typer.Exit(1)
    from tournament.config import StackConfig  # lazy: accord does not depend on tournament

    try:
        config = StackConfig(**options).resolved()
        try:
            Path(config.data_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(f"--data-dir {config.data_dir}: {exc.strerror}") from None
        return config
    except ConfigurationError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None


def _token(config: Any, given: str | None) -> str:
    from tournament.config import ensure_token  # lazy: accord does not depend on tournament

    token, path = ensure_token(config.data_dir, given)
    if given:
        console.print("API token: given with --api-token")
    else:
        console.print(f"API token: in [bold]{path}[/] (send it as 'Authorization: Bearer …')")
    return str(token)


@app.command("up")
def up(
    data_dir: DataDir = "./accord-data",
    match_db: MatchDb = None,
    score_db: ScoreDb = None,
    broker: Broker = None,
    saga_style: SagaStyle = "orchestration",
    match_port: MatchPort = 8001,
    score_port: ScorePort = 8002,
    workers: Workers = 1,
    api_token: ApiToken = None,
    channel: Channel = "tournament",
    log_level: LogLevel = "WARNING",
) -> None:
    """Run the tournament system (both engines and their workers) until Ctrl-C."""
    config = _config(
        data_dir=data_dir,
        match_db=match_db,
        score_db=score_db,
        broker=broker,
        saga_style=saga_style,
        match_port=match_port,
        score_port=score_port,
        workers=workers,
        channel=channel,
        log_level=log_level,
    )
    token = _token(config, api_token)
    # Lazy, and after _config() said which extra is missing: accord does not depend on
    # tournament, and tournament needs the service extra.
    from tournament.stack import prepare
    from tournament.supervisor import Supervisor

    async def go() -> int:
        await prepare(config)
        supervisor = Supervisor(config, token, say=lambda line: console.print(f"[dim]{line}[/]"))
        await supervisor.start()
        try:
            ready = await supervisor.wait_ready_or_stop()
        except BaseException:
            await supervisor.stop()
            raise
        if not ready:
            console.print("stopped before the stack was up.")
            return 0
        console.print(
            f"[bold green]up[/]: Match Engine {config.match_url}, Score Engine "
            f"{config.score_url} ({config.saga_style}; logs in {supervisor.log_dir}). "
            "Ctrl-C stops everything."
        )
        code = await supervisor.run()
        console.print("stopped.")
        return code

    raise typer.Exit(run(go()))


@app.command("demo")
def demo(
    data_dir: DataDir = "./accord-data",
    match_db: MatchDb = None,
    score_db: ScoreDb = None,
    broker: Broker = None,
    saga_style: SagaStyle = "orchestration",
    match_port: MatchPort = 8001,
    score_port: ScorePort = 8002,
    workers: Workers = 1,
    api_token: ApiToken = None,
    once: Annotated[
        bool, typer.Option("--once", help="Exit after the scenario (0 only if it all checked out).")
    ] = False,
    channel: Channel = "tournament",
) -> None:
    """Start the tournament system and play a narrated scenario of every pattern."""
    config = _config(
        data_dir=data_dir,
        match_db=match_db,
        score_db=score_db,
        broker=broker,
        saga_style=saga_style,
        match_port=match_port,
        score_port=score_port,
        workers=workers,
        channel=channel,
    )
    token = _token(config, api_token)
    from tournament.demo import run_demo  # lazy, after _config(): as in up()

    code = run(run_demo(config, token, console=console, once=once))
    raise typer.Exit(code)
