"""Upcasters: per event type, a chain of functions that lift old payloads to the latest schema."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from accord._checks import is_count
from accord.errors import ConfigurationError, DecodeError

__all__ = ["Upcaster", "Upcasters"]

#: Takes the payload at schema version ``n`` and returns it at version ``n + 1``.
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


class Upcasters:
    """A registry of upcasters, one per (event type, from-version).

    Register ``v1 -> v2`` and ``v2 -> v3`` for a type and every event of that
    type read from the store - by stream reads, ``read_all``, ``subscribe``,
    aggregates and projections - arrives at version 3, whatever version it was
    written in. Events are stored as written; upcasting happens on read.

    >>> up = Upcasters()
    >>> @up.register("ScoreChanged", 1)
    ... def add_reason(data):
    ...     return {**data, "reason": "unknown"}
    >>> up.latest("ScoreChanged")
    2
    """

    def __init__(self) -> None:
        self._chains: dict[str, dict[int, Upcaster]] = {}

    def register(self, event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Decorator: ``fn`` turns ``event_type`` data from ``from_version`` into the next one."""

        def decorator(fn: Upcaster) -> Upcaster:
            self.add(event_type, from_version, fn)
            return fn

        return decorator

    def add(self, event_type: str, from_version: int, fn: Upcaster) -> None:
        """Register ``fn`` as the upcaster of ``event_type`` from ``from_version`` to the next."""
        if not isinstance(event_type, str) or not event_type:
            raise ConfigurationError(
                f"an upcaster's event type must be the stored type's name (a non-empty "
                f"string), not {event_type!r}"
            )
        if not is_count(from_version):
            # 1.5 was taken, and made the type's latest version 2.5.
            raise ConfigurationError(
                f"upcaster versions are ints from 1 (the schema version the upcaster reads), "
                f"got {from_version!r} for {event_type!r}"
            )
        chain = self._chains.setdefault(event_type, {})
        if from_version in chain:
            raise ConfigurationError(
                f"{event_type!r} already has an upcaster from version {from_version}"
            )
        # Links may be registered in any order; a missing link is reported on use.
        chain[from_version] = fn

    def latest(self, event_type: str) -> int:
        """The schema version events of this type are upcast to (1 if it has no upcasters)."""
        chain = self._chains.get(event_type)
        return max(chain) + 1 if chain else 1

    def types(self) -> list[str]:
        """The event types that have upcasters."""
        return sorted(self._chains)

    def upcast(self, event_type: str, schema_version: int, data: dict[str, Any]) -> dict[str, Any]:
        """Lift ``data`` from ``schema_version`` to :meth:`latest`; raise DecodeError if a
        link of the chain is missing or an upcaster fails."""
        chain = self._chains.get(event_type)
        if not chain:
            return data
        target = max(chain) + 1
        if schema_version > target:
            raise DecodeError(
                f"event {event_type!r} has schema version {schema_version}, newer than this "
                f"code knows ({target}): deploy the code that wrote it, or add its upcasters"
            )
        version = schema_version
        while version < target:
            fn = chain.get(version)
            if fn is None:
                raise DecodeError(
                    f"no upcaster for {event_type!r} from schema version {version} to "
                    f"{version + 1}: register one with "
                    f"Upcasters.register({event_type!r}, {version})"
                )
            try:
                data = fn(dict(data))
            except Exception as exc:
                raise DecodeError(
                    f"upcaster {getattr(fn, '__qualname__', fn)!r} failed on {event_type!r} "
                    f"v{version}: {exc.__class__.__name__}: {exc}"
                ) from exc
            if not isinstance(data, dict):  # a forgotten `return`, most often
                raise DecodeError(
                    f"upcaster {getattr(fn, '__qualname__', fn)!r} of {event_type!r} "
                    f"v{version} returned {type(data).__name__}, not the event's data (a dict)"
                )
            version += 1
        return data
