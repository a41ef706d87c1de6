"""Worker settings, from the environment (``ACCORD_*``), a file, and explicit overrides."""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from accord.db import Database
from accord.errors import ConfigurationError
from accord.transports import Transport, from_url

__all__ = ["Settings", "load_settings"]


class Settings(BaseSettings):
    """What a service's worker needs to know. Each field can be set with an
    ``ACCORD_<FIELD>`` environment variable (``ACCORD_DB``, ``ACCORD_BROKER``...),
    in a settings file, or passed explicitly; explicit beats environment beats file.

    :meth:`database` and :meth:`transport` build (once) the objects the worker's
    components share; :meth:`aclose` closes them.
    """

    model_config = SettingsConfigDict(env_prefix="ACCORD_", extra="ignore")

    service: str = Field("accord", description="Service name: in logs, consumer names, metrics.")
    db: str = Field(
        "sqlite+aiosqlite:///accord.db",
        description="Database URL of the service (its outbox, inbox, sagas, events).",
    )
    broker: str | None = Field(
        None,
        description="Broker URL (amqp://, nats://, redis://, memory://, or a database URL "
        "for the SQL transport). Default: the SQL transport on `db`.",
    )
    channel: str = Field("accord", description="Exchange / stream / queue channel name.")
    rabbitmq_queue_type: Literal["classic", "quorum"] = Field(
        "classic",
        description="RabbitMQ: the type of the queues declared (quorum: replicated, "
        "every redelivery counted; RabbitMQ 3.10 or later).",
    )
    log_level: str = Field(
        "INFO", description="Logging level: DEBUG, INFO, WARNING, ERROR or CRITICAL."
    )
    log_json: bool = Field(True, description="JSON log lines (false: readable text).")
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="Serve Prometheus /metrics on this port."
    )
    upgrade: bool = Field(True, description="Create/migrate Accord's tables at start.")
    max_attempts: int = Field(5, ge=1, description="Handler attempts before a message is dead.")

    _database: Database | None = PrivateAttr(None)
    _transport: Transport | None = PrivateAttr(None)

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        # Checked here: logging would refuse it only once the worker configures its
        # logs, with a traceback.
        level = value.strip().upper()
        if level not in logging.getLevelNamesMapping():
            raise ValueError(
                f"{value!r} is not a logging level: use DEBUG, INFO, WARNING, ERROR or CRITICAL"
            )
        return level

    @property
    def broker_url(self) -> str:
        """The broker URL in effect (the database itself when no broker is set)."""
        return self.broker or self.db

    def database(self) -> Database:
        """The service's :class:`~accord.db.Database` (made once)."""
        if self._database is None:
            self._database = Database(self.db)
        return self._database

    def transport(self) -> Transport:
        """The service's transport for :attr:`broker_url` (made once)."""
        if self._transport is None:
            options: dict[str, Any] = {}
            if self.broker_url.lower().startswith(("amqp://", "amqps://")):
                options["queue_type"] = self.rabbitmq_queue_type
            self._transport = from_url(self.broker_url, channel=self.channel, **options)
        return self._transport

    async def aclose(self) -> None:
        """Close the transport and the database this object made."""
        if self._transport is not None:
            await self._transport.close()
            self._transport = None
        if self._database is not None:
            await self._database.dispose()
            self._database = None


def _read_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigurationError(f"settings file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read settings file {str(path)!r}: {exc}") from None
    if path.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(
                f"settings file {str(path)!r} is not valid TOML: {exc} (quote string "
                'values: service = "score-engine")'
            ) from None
        section = data.get("accord", data)
        if not isinstance(section, dict):
            raise ConfigurationError(
                f"settings file {str(path)!r}: 'accord' must be a table ([accord]), "
                f"not a {type(section).__name__}"
            )
        return _known(path, {str(k).replace("-", "_"): v for k, v in section.items()})
    values: dict[str, Any] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise ConfigurationError(f"{path}:{number}: expected KEY=value, got {line!r}")
        key, value = (part.strip() for part in line.split("=", 1))
        key = key.lower().removeprefix("accord_")
        values[key] = value.strip("'\"")
    return _known(path, values)


def _known(path: Path, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` if every key is a setting: a misspelt one would otherwise be ignored
    in silence, and its setting left at its default (the environment's ``ACCORD_*``
    variables are not checked so: others than the settings are set there)."""
    unknown = sorted(k for k in values if k not in Settings.model_fields)
    if unknown:
        raise ConfigurationError(
            f"settings file {str(path)!r}: unknown setting(s) {', '.join(map(repr, unknown))}; "
            f"the settings are {', '.join(Settings.model_fields)}"
        )
    return values


def load_settings(file: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from ``overrides`` (``None`` values ignored), then the ``ACCORD_*``
    environment, then ``file`` (TOML — top level or an ``[accord]`` table — or
    ``KEY=value`` lines), then the defaults."""
    from_file = _read_file(Path(file)) if file else {}
    explicit = {k: v for k, v in overrides.items() if v is not None}
    try:
        from_env = Settings()
        env_set = from_env.model_fields_set
        merged = {k: v for k, v in from_file.items() if k not in env_set}
        merged.update({k: getattr(from_env, k) for k in env_set})
        merged.update(explicit)
        return Settings(**merged)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise ConfigurationError(f"invalid worker settings: {problems}") from None
