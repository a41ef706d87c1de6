"""The records the event store takes and gives back, and the expected-version markers."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from accord._checks import is_count
from accord.messages import MAX_NAME_LENGTH

__all__ = [
    "ANY",
    "NO_STREAM",
    "STREAM_EXISTS",
    "AppendResult",
    "ExpectedVersion",
    "NewEvent",
    "RecordedEvent",
]


class _Expect(enum.Enum):
    ANY = "any"
    NO_STREAM = "no stream"
    STREAM_EXISTS = "stream exists"

    def __repr__(self) -> str:
        return self.name


#: Append whatever the stream's version is (no concurrency check).
ANY: Final = _Expect.ANY
#: Append only if the stream has no events yet.
NO_STREAM: Final = _Expect.NO_STREAM
#: Append only if the stream already has at least one event.
STREAM_EXISTS: Final = _Expect.STREAM_EXISTS

#: What ``append(expected_version=...)`` accepts: a marker or the exact current
#: version (``0`` means the same as :data:`NO_STREAM`).
ExpectedVersion = _Expect | int


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append.

    ``schema_version`` left ``None`` means "the latest version the store's
    upcasters know for this type" (1 if none). ``metadata`` conventionally holds
    ``correlation_id``, ``causation_id`` and ``actor``; ``time`` defaults to now.
    ``data`` and ``metadata`` must be JSON as :func:`json.dumps` writes it (str,
    int, float, bool, None, lists and dicts): the store refuses anything else,
    such as a datetime, a set or bytes, on every backend, before writing.
    """

    type: str
    data: Mapping[str, Any] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    schema_version: int | None = None
    time: datetime | None = None
    id: uuid.UUID = field(default_factory=uuid.uuid4)

    def __post_init__(self) -> None:
        if not isinstance(self.type, str) or not self.type:
            raise ValueError("NewEvent.type must be a non-empty string")
        if len(self.type) > MAX_NAME_LENGTH:
            raise ValueError(
                f"NewEvent.type is {len(self.type)} characters long; the event store holds "
                f"at most {MAX_NAME_LENGTH}"
            )
        if "\x00" in self.type:
            raise ValueError("NewEvent.type holds a NUL character, which PostgreSQL cannot store")
        for name in ("data", "metadata"):
            value = getattr(self, name)
            if not isinstance(value, Mapping):
                raise TypeError(
                    f"NewEvent.{name} must be a mapping (a dict of named fields), not a "
                    f"{type(value).__name__}: put a bare value under a name, e.g. "
                    "{'items': [...]}"
                )
        if self.schema_version is not None and not is_count(self.schema_version):
            raise ValueError(
                f"NewEvent.schema_version must be an int of at least 1 (or None for the "
                f"latest the store's upcasters know), not {self.schema_version!r}"
            )
        if self.time is not None and self.time.tzinfo is None:
            raise ValueError("NewEvent.time must be timezone-aware (use datetime.now(UTC))")


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """An event as stored, already upcast to the latest schema version of its type.

    ``position`` is the global, gap-safe order (see :mod:`accord.eventstore`);
    ``version`` is the event's place in its stream, from 1.
    """

    position: int
    stream_id: str
    version: int
    type: str
    schema_version: int
    data: dict[str, Any]
    metadata: dict[str, Any]
    recorded_at: datetime
    id: uuid.UUID

    @property
    def correlation_id(self) -> str | None:
        """``metadata['correlation_id']``, if set."""
        value = self.metadata.get("correlation_id")
        return None if value is None else str(value)

    @property
    def causation_id(self) -> str | None:
        """``metadata['causation_id']``, if set."""
        value = self.metadata.get("causation_id")
        return None if value is None else str(value)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (used by the CLI's ``--json``)."""
        return {
            "position": self.position,
            "stream_id": self.stream_id,
            "version": self.version,
            "id": str(self.id),
            "type": self.type,
            "schema_version": self.schema_version,
            "data": self.data,
            "metadata": self.metadata,
            "recorded_at": self.recorded_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What an append wrote: the stream's new ``version`` and each event's ``position``."""

    stream_id: str
    version: int
    positions: tuple[int, ...]

    @property
    def position(self) -> int:
        """The position of the last event appended (what a reader can wait for)."""
        return self.positions[-1]
