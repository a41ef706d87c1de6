"""One process of the stack: ``python -m tournament.process ROLE CONFIG_JSON``.

The supervisor starts these; the API token comes in the environment
(:data:`tournament.config.TOKEN_ENV`). API roles serve HTTP with uvicorn, worker
roles run their components in an :class:`accord.runtime.Worker`; both stop
cleanly on SIGTERM/SIGINT and exit 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time

from accord.observability import configure_logging
from accord.runtime import Worker
from tournament.config import SUPERVISOR_ENV, StackConfig
from tournament.stack import (
    API_ROLES,
    WORKER_ROLES,
    components,
    make_transport,
    styles_in_flight,
)

__all__ = ["main", "serve_api", "serve_worker", "stop_with_supervisor"]


def stop_with_supervisor() -> None:
    """Stop this process (SIGTERM to itself: the graceful path) once the supervisor
    that started it is gone, so a killed ``accord up`` never leaves children holding
    its ports. Our children run in their own session, so nothing else tells them."""
    supervisor = os.environ.get(SUPERVISOR_ENV)
    if not supervisor:
        return

    def watch() -> None:
        while os.getppid() == int(supervisor):
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


def serve_api(role: str, config: StackConfig) -> int:
    """Serve the engine's HTTP API on its port until SIGTERM/SIGINT."""
    import uvicorn

    if role == "match-api":
        from tournament.match_engine.app import create_app

        port = config.match_port
    else:
        from tournament.score_engine.app import create_app

        port = config.score_port
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            host=config.host,
            port=port,
            log_level=config.log_level.lower(),
            access_log=False,
            lifespan="on",
        )
    )
    server.run()
    return 0 if server.started else 1


async def serve_worker(role: str, config: StackConfig) -> int:
    """Connect to the broker, run the role's components until SIGTERM/SIGINT. A broker
    that cannot be reached fails the process (the supervisor restarts it with backoff)."""
    also = sorted(await styles_in_flight(config)) if role == "match-saga" else []
    transport = make_transport(config)
    await transport.connect()
    try:
        parts = components(role, config, transport, also_styles=also)
        return await Worker(parts, stop_timeout=10.0).run()
    finally:
        await transport.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``ROLE CONFIG_JSON``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in (*API_ROLES, *WORKER_ROLES):
        print(
            f"usage: python -m tournament.process ROLE CONFIG_JSON; "
            f"ROLE is one of {', '.join((*API_ROLES, *WORKER_ROLES))}",
            file=sys.stderr,
        )
        return 2
    role, text = args
    stop_with_supervisor()
    config = StackConfig.from_json(text).resolved()
    configure_logging(config.log_level, json_logs=False, service=role)
    if role in API_ROLES:
        return serve_api(role, config)
    return asyncio.run(serve_worker(role, config))


if __name__ == "__main__":
    sys.exit(main())
