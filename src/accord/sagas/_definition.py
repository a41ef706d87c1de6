"""The saga definition DSL: ordered steps that read like the business flow."""

from __future__ import annotations

import enum
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from accord._backoff import backoff_delay
from accord._checks import is_count, is_seconds
from accord.errors import ConfigurationError
from accord.messages import CONTROL_CHARACTERS, MAX_NAME_LENGTH

__all__ = [
    "Command",
    "LocalAction",
    "Retry",
    "Saga",
    "Step",
    "StepContext",
    "StepKind",
    "command",
]


class StepKind(enum.Enum):
    """Richardson's step kinds: undoable steps, the point of no return, steps after it."""

    COMPENSATABLE = "compensatable"
    PIVOT = "pivot"
    RETRIABLE = "retriable"


@dataclass
class StepContext:
    """What a local action or compensation gets: the orchestrator's transaction and the
    saga's data. Changes to ``data`` are saved with the step's transition."""

    conn: AsyncConnection
    saga_id: str
    data: dict[str, Any]
    step: str
    attempt: int


LocalAction = Callable[[StepContext], Awaitable[Any]]


@dataclass(frozen=True)
class Command:
    """A remote action: a command message of ``type`` to a participant.

    ``payload(data)`` builds the command's data from the saga's data (default: the
    saga data itself). The participant's reply result, if a dict, is merged into
    the saga data (under ``result_key`` if given).
    """

    type: str
    payload: Callable[[dict[str, Any]], Any] | None = None
    result_key: str | None = None

    def build(self, data: dict[str, Any]) -> Any:
        """The command's data for the saga data ``data``."""
        return dict(data) if self.payload is None else self.payload(data)


def command(
    type: str,
    payload: Callable[[dict[str, Any]], Any] | None = None,
    *,
    result_key: str | None = None,
) -> Command:
    """A remote action or compensation: send ``type`` to the participant that handles it."""
    if not isinstance(type, str) or not _MESSAGE_TYPE.fullmatch(type):
        raise ConfigurationError(
            f"command type {type!r} must be dot-separated words without spaces or "
            "wildcards (*, >, #), e.g. 'hotels.reserve'"
        )
    if len(type) > MAX_NAME_LENGTH:
        raise ConfigurationError(
            f"command type {type[:40]!r}... is {len(type)} characters long; a message "
            f"type holds at most {MAX_NAME_LENGTH}"
        )
    if payload is not None and not callable(payload):
        raise ConfigurationError(
            f"the payload of command {type!r} must be a function of the saga's data, "
            f"not {payload!r}"
        )
    return Command(type, payload, result_key)


#: A message type every transport can route: words of no spaces or wildcards, by dots.
_MESSAGE_TYPE = re.compile(r"[^\s.*>#]+(\.[^\s.*>#]+)*")
#: A saga's name: one word of a message type (no dots, spaces, wildcards or control
#: characters); it is part of the saga's reply type ``accord.saga.<name>.reply``,
#: which must fit :data:`MAX_NAME_LENGTH`.
_SAGA_NAME = re.compile("[^\\s.*>#\x00-\x1f\x7f-\x9f]+")
MAX_SAGA_NAME_LENGTH = MAX_NAME_LENGTH - len("accord.saga..reply")
#: The longest step and compensation timeout: ten years. ``None`` waits for ever.
MAX_TIMEOUT = 10 * 365 * 24 * 3600.0
#: The widest step name (the step log's column).
MAX_STEP_NAME_LENGTH = 200


def seconds(what: str, value: Any, *, forever: bool = False) -> float | None:
    """``value`` as a positive, finite number of seconds up to :data:`MAX_TIMEOUT`
    (or None, when ``forever`` allows waiting for ever); else a clear error."""
    if value is None and forever:
        return None
    if not is_seconds(value, longest=MAX_TIMEOUT):
        hint = " (None waits for ever)" if forever else ""
        raise ConfigurationError(
            f"{what} must be a positive number of seconds up to ten years{hint}, not {value!r}"
        )
    return float(value)


def _check_action(what: str, action: Any, *, optional: bool = False) -> None:
    if action is None and optional:
        return
    if isinstance(action, Command):
        return
    if isinstance(action, str):
        raise ConfigurationError(
            f"{what} is the string {action!r}: wrap a command to a participant in "
            f"command({action!r}), or pass an async function for a local step"
        )
    if not callable(action):
        raise ConfigurationError(
            f"{what} must be command(...) or an async function of a StepContext, not {action!r}"
        )


@dataclass(frozen=True)
class Retry:
    """How often a step's action (or compensation) is attempted, and how long to wait
    between attempts: ``base * 2**(attempt-1)`` seconds, capped at ``cap``, jittered.

    ``max_attempts=None`` means retry for ever (retriable steps by default).
    """

    max_attempts: int | None = 1
    base: float = 0.5
    cap: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts is not None and not is_count(self.max_attempts):
            raise ConfigurationError(
                f"Retry max_attempts must be an int of at least 1 (or None: for ever), "
                f"not {self.max_attempts!r}"
            )
        for name in ("base", "cap"):
            value = getattr(self, name)
            if not is_seconds(value, zero_ok=True):
                raise ConfigurationError(
                    f"Retry {name} must be a finite number of seconds of 0 or more, not {value!r}"
                )

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt``."""
        return backoff_delay(attempt, self.base, self.cap)

    def exhausted(self, attempt: int) -> bool:
        """Whether ``attempt`` attempts used up the policy."""
        return self.max_attempts is not None and attempt >= self.max_attempts


Action = LocalAction | Command


@dataclass(frozen=True)
class Step:
    """One step: an action, an optional compensation, a timeout for remote actions
    and a retry policy for the action."""

    name: str
    action: Action
    compensation: Action | None = None
    kind: StepKind = StepKind.COMPENSATABLE
    timeout: float | None = None
    retry: Retry = field(default_factory=Retry)

    @property
    def remote(self) -> bool:
        """Whether the action is a command to a participant."""
        return isinstance(self.action, Command)


#: How long a remote step before the pivot, or the pivot, waits for its reply unless
#: given a ``timeout``: a reply lost for good must not leave the saga RUNNING for ever.
STEP_TIMEOUT = 600.0


class Saga:
    """A saga definition, built step by step in business order::

        book_trip = (
            Saga("book-trip")
            .step("reserve seat", command("seats.reserve"), compensate=command("seats.release"),
                  timeout=10)
            .step("record booking", record_booking, compensate=cancel_booking)
            .pivot("charge card", command("payments.charge"), timeout=30)
            .retriable("send ticket", command("tickets.issue"))
        )

    Compensatable steps come first, then at most one pivot, then retriable steps
    (retried until they succeed, never compensated). A remote step's timeout
    (``STEP_TIMEOUT``, ten minutes, unless given), once passed, counts as a failure
    of unknown outcome: the step is compensated too, or voided if it has no
    compensating command (participants made with :func:`accord.sagas.participant`
    make that safe). ``timeout=None`` waits for a reply for ever: only for a step
    that something else is sure to end, since a lost reply leaves the saga
    RUNNING.

    ``compensation_retry`` governs every compensation: retried with backoff until
    it succeeds; after ``max_attempts`` the saga is STUCK and waits for an operator.
    ``compensation_timeout`` is how long a remote compensation may go unanswered
    before it is sent again.
    """

    def __init__(
        self,
        name: str,
        *,
        compensation_retry: Retry | None = None,
        compensation_timeout: float | None = 30.0,
        stuck_after: int = 10,
    ) -> None:
        if not isinstance(name, str) or not _SAGA_NAME.fullmatch(name):
            raise ConfigurationError(
                f"saga name {name!r} must be one word without dots, spaces, wildcards "
                "(*, >, #) or control characters (it is part of the saga's reply type), "
                "e.g. 'book-trip'"
            )
        if len(name) > MAX_SAGA_NAME_LENGTH:
            raise ConfigurationError(
                f"saga name {name[:40]!r}... is {len(name)} characters long; at most "
                f"{MAX_SAGA_NAME_LENGTH} (its reply type accord.saga.<name>.reply must fit "
                f"a message type's {MAX_NAME_LENGTH})"
            )
        if not is_count(stuck_after):
            raise ConfigurationError(
                f"stuck_after must be an int of at least 1, not {stuck_after!r}"
            )
        seconds(f"compensation_timeout of saga {name!r}", compensation_timeout, forever=True)
        self.name = name
        self.steps: list[Step] = []
        self.compensation_retry = compensation_retry or Retry(
            max_attempts=stuck_after, base=0.5, cap=60.0
        )
        self.compensation_timeout = compensation_timeout
        self.stuck_after = stuck_after

    @property
    def reply_type(self) -> str:
        """The message type participants reply to this saga's commands with."""
        return f"accord.saga.{self.name}.reply"

    def _add(self, step: Step) -> Saga:
        if not isinstance(step.name, str) or not step.name.strip():
            raise ConfigurationError(
                f"a step of saga {self.name!r} needs a name, not {step.name!r}"
            )
        if CONTROL_CHARACTERS.search(step.name):
            raise ConfigurationError(
                f"step name {step.name!r} of saga {self.name!r} holds a control character "
                "(it is the subject of the step's commands, where CloudEvents allows none)"
            )
        if len(step.name) > MAX_STEP_NAME_LENGTH:
            raise ConfigurationError(
                f"step name {step.name[:40]!r}... of saga {self.name!r} is "
                f"{len(step.name)} characters long; at most {MAX_STEP_NAME_LENGTH}"
            )
        where = f"step {step.name!r} of saga {self.name!r}"
        _check_action(f"the action of {where}", step.action)
        _check_action(f"the compensation of {where}", step.compensation, optional=True)
        seconds(f"the timeout of {where}", step.timeout, forever=True)
        if not isinstance(step.retry, Retry):
            raise ConfigurationError(f"the retry of {where} must be a Retry, not {step.retry!r}")
        if any(s.name == step.name for s in self.steps):
            raise ConfigurationError(f"saga {self.name!r} already has a step {step.name!r}")
        kinds = [s.kind for s in self.steps]
        if step.kind is StepKind.COMPENSATABLE and (
            StepKind.PIVOT in kinds or StepKind.RETRIABLE in kinds
        ):
            raise ConfigurationError(
                f"step {step.name!r} of saga {self.name!r}: compensatable steps must come "
                "before the pivot; use .retriable(...) for steps after it"
            )
        if step.kind is StepKind.PIVOT and (StepKind.PIVOT in kinds):
            raise ConfigurationError(f"saga {self.name!r} can have only one pivot step")
        if step.kind is StepKind.PIVOT and StepKind.RETRIABLE in kinds:
            raise ConfigurationError(f"the pivot {step.name!r} must come before retriable steps")
        if step.kind is StepKind.RETRIABLE and StepKind.PIVOT not in kinds:
            raise ConfigurationError(
                f"retriable step {step.name!r} of saga {self.name!r} follows the pivot: "
                "declare the point of no return with .pivot(...) first"
            )
        if step.kind is not StepKind.COMPENSATABLE and step.compensation is not None:
            raise ConfigurationError(
                f"step {step.name!r} is a {step.kind.value} step: it is never compensated, "
                "so it takes no compensate="
            )
        self.steps.append(step)
        return self

    def step(
        self,
        name: str,
        action: Action,
        *,
        compensate: Action | None = None,
        timeout: float | None = STEP_TIMEOUT,
        retry: Retry | None = None,
    ) -> Saga:
        """Add a compensatable step; ``compensate`` undoes it if a later step fails."""
        return self._add(
            Step(name, action, compensate, StepKind.COMPENSATABLE, timeout, retry or Retry())
        )

    def pivot(
        self,
        name: str,
        action: Action,
        *,
        timeout: float | None = STEP_TIMEOUT,
        retry: Retry | None = None,
    ) -> Saga:
        """Add the pivot: once it succeeds the saga runs to completion."""
        return self._add(Step(name, action, None, StepKind.PIVOT, timeout, retry or Retry()))

    def retriable(
        self,
        name: str,
        action: Action,
        *,
        timeout: float | None = 30.0,
        retry: Retry | None = None,
    ) -> Saga:
        """Add a step after the pivot: retried with backoff until it succeeds (past
        ``retry.max_attempts`` — default ``stuck_after`` — the saga is STUCK)."""
        policy = retry or Retry(max_attempts=self.stuck_after, base=0.5, cap=60.0)
        return self._add(Step(name, action, None, StepKind.RETRIABLE, timeout, policy))

    def command_types(self) -> list[str]:
        """Every command type the saga sends (actions and compensations)."""
        found = []
        for s in self.steps:
            for a in (s.action, s.compensation):
                if isinstance(a, Command):
                    found.append(a.type)
        return found

    def __repr__(self) -> str:
        return f"Saga({self.name!r}, steps={[s.name for s in self.steps]})"


def registry(sagas: Mapping[str, Saga] | list[Saga]) -> dict[str, Saga]:
    """Sagas by name; a clear error on duplicates or empty definitions."""
    found: dict[str, Saga] = {}
    for saga in sagas.values() if isinstance(sagas, Mapping) else sagas:
        if saga.name in found:
            raise ConfigurationError(f"two saga definitions are named {saga.name!r}")
        if not saga.steps:
            raise ConfigurationError(f"saga {saga.name!r} has no steps")
        found[saga.name] = saga
    return found
