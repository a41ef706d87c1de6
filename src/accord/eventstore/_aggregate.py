"""Aggregates: state rebuilt from typed events, one ``@applies`` method per event type."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from pydantic import TypeAdapter, ValidationError

from accord._checks import is_count
from accord.errors import ConfigurationError, DecodeError
from accord.eventstore._types import NewEvent, RecordedEvent
from accord.messages import MAX_NAME_LENGTH

__all__ = ["Aggregate", "applies", "event_type_name"]

E = TypeVar("E")
F = TypeVar("F", bound=Callable[..., None])

_adapters: dict[type, TypeAdapter[Any]] = {}


def _adapter(cls: type) -> TypeAdapter[Any]:
    adapter = _adapters.get(cls)
    if adapter is None:
        adapter = _adapters[cls] = TypeAdapter(cls)
    return adapter


def event_type_name(cls: type) -> str:
    """The stored type of an event class: ``__event_type__`` if set, else the class name."""
    return str(getattr(cls, "__event_type__", cls.__name__))


def event_schema_version(cls: type) -> int:
    """The schema version an event class writes: ``__schema_version__`` (default 1)."""
    return int(getattr(cls, "__schema_version__", 1))


def _check_event_class(aggregate: type, event_class: type, name: str) -> None:
    """Refuse, when the aggregate class is defined, an event class whose events the
    store could never hold (found at the first save otherwise, naming neither)."""
    where = f"{aggregate.__qualname__}: event class {event_class.__qualname__}"
    if not name or len(name) > MAX_NAME_LENGTH or "\x00" in name:
        raise ConfigurationError(
            f"{where} has the type name {name[:40]!r}{'...' if len(name) > 40 else ''} "
            f"({len(name)} characters), which the event store cannot hold: set "
            f"__event_type__ to a name of 1 to {MAX_NAME_LENGTH} characters without NUL"
        )
    version = getattr(event_class, "__schema_version__", 1)
    if not is_count(version):
        raise ConfigurationError(
            f"{where} has __schema_version__ {version!r}: give a whole number from 1"
        )


def applies(event_class: type) -> Callable[[F], F]:
    """Mark an aggregate method as the one that applies ``event_class`` to the state.

    The method takes the typed event and mutates ``self``; it must not fail
    for an event that was once accepted (it runs again on every load).
    """

    def decorator(fn: F) -> F:
        fn.__accord_applies__ = event_class  # type: ignore[attr-defined]
        return fn

    return decorator


class Aggregate:
    """Base class of event-sourced aggregates.

    Subclasses declare typed events (Pydantic models or dataclasses; stored
    type = class name or ``__event_type__``, schema = ``__schema_version__``)
    and one ``@applies(EventClass)`` method each. Commands validate, then call
    :meth:`record`, which applies the event and queues it for
    :meth:`Repository.save <accord.eventstore.Repository.save>`.

    Class settings: ``snapshot_every`` (take a snapshot every N events; None =
    never), ``snapshot_version`` (bump it when the snapshot shape changes: older
    snapshots are then ignored and the aggregate is rebuilt from its events).
    Override :meth:`snapshot_state` / :meth:`restore_state` when the default
    (public attributes as JSON) does not fit.
    """

    snapshot_every: ClassVar[int | None] = None
    snapshot_version: ClassVar[int] = 1
    _handlers: ClassVar[dict[str, tuple[type, Callable[..., None]]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        found: dict[str, tuple[type, str, Callable[..., None]]] = {}
        for base in reversed(cls.__mro__):
            in_base: dict[str, str] = {}
            for attr, value in vars(base).items():
                event_class = getattr(value, "__accord_applies__", None)
                if event_class is None:
                    continue
                name = event_type_name(event_class)
                _check_event_class(base, event_class, name)
                if name in in_base:
                    # Only the last would ever run: the other's effects would be lost.
                    raise ConfigurationError(
                        f"{base.__qualname__} has two @applies methods for event type "
                        f"{name!r}: {in_base[name]} and {attr}; keep one"
                    )
                in_base[name] = attr
                found[name] = (event_class, attr, value)
        handlers: dict[str, tuple[type, Callable[..., None]]] = {}
        for name, (event_class, attr, value) in found.items():
            # Looked up by name, so that a subclass overriding the method (without
            # repeating @applies) is what runs, as with any other method.
            fn = getattr(cls, attr, value)
            if getattr(fn, "__accord_applies__", event_class) is not event_class:
                fn = value  # the name now applies another event: keep this one's method
            handlers[name] = (event_class, fn)
        cls._handlers = handlers

    def __init__(self, id: str) -> None:
        #: The stream id. ``version`` is the last *stored* version the state
        #: includes; events recorded but not yet saved do not change it.
        self.id = id
        self.version = 0
        self._pending: list[Any] = []

    @classmethod
    def aggregate_type(cls) -> str:
        """The name snapshots are stored under (the class name)."""
        return cls.__name__

    @classmethod
    def event_types(cls) -> list[str]:
        """The stored types of the events this aggregate applies."""
        return list(cls._handlers)

    def record(self, event: Any) -> None:
        """Apply a new event to the state and queue it to be saved.

        The event is applied as every later load will read it: through its JSON
        form (a ``datetime`` in an ``Any`` field arrives as text, as it is stored).
        An event whose JSON form does not load back as its class (a required field
        left out by ``exclude=True``, a serializer whose output its validator
        refuses) is refused here: once stored, its stream could never load again.
        """
        stored = self._as_stored(event)
        self._dispatch(stored)
        self._pending.append(stored)

    @property
    def pending(self) -> list[Any]:
        """Events recorded since the aggregate was loaded or last saved."""
        return list(self._pending)

    def _as_stored(self, event: Any) -> Any:
        """``event`` as it comes back from the store (its JSON form, validated again)."""
        cls = type(event)
        if event_type_name(cls) not in self._handlers:
            return event  # _dispatch says what is missing
        adapter = _adapter(cls)
        data = adapter.dump_python(event, mode="json")
        try:
            return adapter.validate_python(data)
        except ValidationError as exc:
            raise ConfigurationError(
                f"{cls.__qualname__} event would be stored as {_short(data)}, which does not "
                f"load back as a {cls.__qualname__} ({_problems(exc)}): an event must survive "
                "its JSON form (look for fields left out with exclude=True and serializers "
                "whose output the validators refuse)"
            ) from None

    def _dispatch(self, event: Any) -> None:
        name = event_type_name(type(event))
        entry = self._handlers.get(name)
        if entry is None:
            raise ConfigurationError(
                f"{type(self).__name__} has no @applies({type(event).__name__}) method"
            )
        entry[1](self, event)

    def _apply_recorded(self, recorded: RecordedEvent) -> None:
        entry = self._handlers.get(recorded.type)
        if entry is None:
            raise ConfigurationError(
                f"{type(self).__name__} cannot apply stored event type {recorded.type!r} "
                f"(stream {recorded.stream_id!r} v{recorded.version}): add an @applies method"
            )
        event_class, handler = entry
        try:
            event = _adapter(event_class).validate_python(recorded.data)
        except ValidationError as exc:
            raise DecodeError(
                f"{type(self).__name__} cannot load stream {recorded.stream_id!r}: its event "
                f"v{recorded.version} ({recorded.type!r}, schema version "
                f"{recorded.schema_version}) does not fit {event_class.__qualname__} "
                f"({_problems(exc)}). If the class changed since the event was written, "
                f"raise its __schema_version__ and register an upcaster from the old version "
                f"(Upcasters.register({recorded.type!r}, <old version>))"
            ) from exc
        handler(self, event)
        self.version = recorded.version

    def _new_events(self, metadata: dict[str, Any]) -> list[NewEvent]:
        return [
            NewEvent(
                type=event_type_name(type(e)),
                data=_adapter(type(e)).dump_python(e, mode="json"),
                metadata=metadata,
                schema_version=event_schema_version(type(e)),
            )
            for e in self._pending
        ]

    def snapshot_state(self) -> dict[str, Any]:
        """The state to snapshot: public attributes except ``id``/``version``, as JSON."""
        state = {
            k: v
            for k, v in vars(self).items()
            if not k.startswith("_") and k not in ("id", "version")
        }
        result: dict[str, Any] = TypeAdapter(dict[str, Any]).dump_python(state, mode="json")
        return result

    def restore_state(self, state: dict[str, Any]) -> None:
        """Set the state from :meth:`snapshot_state`'s output; raise if it does not fit.

        Called on a new aggregate: a public attribute its ``__init__`` set that the
        snapshot lacks means the snapshot was taken by code before that attribute
        (a ``snapshot_version`` left as it was), so the snapshot does not fit and the
        aggregate is rebuilt from its events instead of keeping the initial value.
        """
        missing = [
            k
            for k in vars(self)
            if not k.startswith("_") and k not in ("id", "version") and k not in state
        ]
        if missing:
            raise ValueError(
                f"the snapshot has no {', '.join(map(repr, missing))}: it was taken by "
                "code whose state had other attributes (raise snapshot_version when the "
                "state's shape changes)"
            )
        for key, value in state.items():
            setattr(self, key, value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, version={self.version})"


def _problems(exc: ValidationError) -> str:
    """pydantic's errors on one line: "field 'a.b': Field required; ..."."""
    problems = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error.get("loc", ())) or "<data>"
        problems.append(f"field {location!r}: {error.get('msg')}")
    return "; ".join(problems)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def is_dataclass_event(obj: Any) -> bool:
    """True for dataclass instances (used in docs/tests)."""
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)
