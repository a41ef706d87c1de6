"""How the tournament system is wired: databases, broker, ports, saga style, token."""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

from accord.errors import ConfigurationError

__all__ = ["SAGA_STYLES", "SUPERVISOR_ENV", "TOKEN_ENV", "StackConfig", "ensure_token"]

SAGA_STYLES = ("orchestration", "choreography")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: Child processes get the API token from this variable (never on a command line).
TOKEN_ENV = "TOURNAMENT_API_TOKEN"
#: The supervisor's pid in its children's environment: they stop once it is gone.
SUPERVISOR_ENV = "TOURNAMENT_SUPERVISOR_PID"


@dataclass(frozen=True)
class StackConfig:
    """Everything a process of the stack needs to know.

    Databases and broker default to files under ``data_dir`` (the embedded
    default: one SQLite file per engine, the SQL transport on a third file).
    ``channel`` names the exchange/stream/queue set both engines share.
    ``instance`` tags one run of the stack (``/health`` answers it), so a supervisor
    never mistakes another process on its port for its own child.
    """

    data_dir: str = "./accord-data"
    match_db: str | None = None
    score_db: str | None = None
    broker: str | None = None
    channel: str = "tournament"
    saga_style: str = "orchestration"
    host: str = "127.0.0.1"
    match_port: int = 8001
    score_port: int = 8002
    workers: int = 1
    log_level: str = "WARNING"
    instance: str = ""
    api_token: str = ""

    def resolved(self) -> StackConfig:
        """A copy with every default filled in (URLs of the embedded files) and checked."""
        if self.saga_style not in SAGA_STYLES:
            raise ConfigurationError(
                f"--saga-style {self.saga_style!r} is not one of {', '.join(SAGA_STYLES)}"
            )
        if self.workers < 1:
            raise ConfigurationError(f"--workers must be at least 1, got {self.workers}")
        for name, port in (("--match-port", self.match_port), ("--score-port", self.score_port)):
            if not 0 < port < 65536:
                raise ConfigurationError(f"{name} {port} is not a TCP port (1-65535)")
        if self.match_port == self.score_port:
            raise ConfigurationError(
                f"--match-port and --score-port must differ (both are {self.match_port})"
            )
        if self.log_level.upper() not in _LOG_LEVELS:
            raise ConfigurationError(
                f"--log-level {self.log_level!r} is not a level: use {', '.join(_LOG_LEVELS)}"
            )
        data = Path(self.data_dir).expanduser().resolve()
        if data.exists() and not data.is_dir():
            raise ConfigurationError(f"--data-dir {data} is a file, not a folder")

        def embedded(name: str) -> str:
            # Quoted: a '?' or '%' in the folder's name is part of the path, not the URL's.
            return f"sqlite+aiosqlite:///{quote(str(data / name))}"

        return replace(
            self,
            data_dir=str(data),
            match_db=self.match_db or embedded("match-engine.db"),
            score_db=self.score_db or embedded("score-engine.db"),
            broker=self.broker or embedded("broker.db"),
        )

    @property
    def match_url(self) -> str:
        """Base URL of the Match Engine's HTTP API."""
        return f"http://{self.host}:{self.match_port}"

    @property
    def score_url(self) -> str:
        """Base URL of the Score Engine's HTTP API."""
        return f"http://{self.host}:{self.score_port}"

    def to_json(self) -> str:
        """The config for a child process, without the token (passed in the environment)."""
        data = asdict(self)
        data.pop("api_token")
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> StackConfig:
        """The config a parent passed; the token comes from :data:`TOKEN_ENV`."""
        data: dict[str, Any] = json.loads(text)
        return cls(**data, api_token=os.environ.get(TOKEN_ENV, ""))


def ensure_token(data_dir: str, given: str | None) -> tuple[str, Path]:
    """The API token: ``given``, else the one in ``DATA_DIR/api-token``, else a new one
    written there with mode 0600. Returns the token and the file's path."""
    path = Path(data_dir) / "api-token"
    if given:
        return given, path
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token, path
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    os.chmod(path, 0o600)
    return token, path
