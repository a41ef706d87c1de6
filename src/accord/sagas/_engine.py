"""The saga state machine: from a stored instance and an input (start, reply, deadline,
operator command) to the next state, the commands to send and the deadline to keep.

Everything here runs inside one database transaction given by the caller: the
transition, its step-log entries, its deadline and its outgoing command commit
together or not at all.
"""

from __future__ import annotations

import copy
import json
import logging
import traceback
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NotRequired

from sqlalchemy.ext.asyncio import AsyncConnection
from typing_extensions import TypedDict

from accord.messages import Message
from accord.outbox import add as add_to_outbox
from accord.sagas._definition import Command, Saga, Step, StepContext, StepKind
from accord.sagas._metrics import SAGA_DURATION, SAGAS_ENDED, SAGAS_STUCK
from accord.sagas._store import (
    ABORTED,
    ACTION,
    COMPENSATED,
    COMPENSATING,
    COMPENSATION,
    COMPLETED,
    RUNNING,
    STUCK,
    VOID,
    SagaState,
    Transition,
)

__all__ = ["Engine", "Reply", "ReplyData", "command_message"]

log = logging.getLogger("accord.sagas")

_IDS = uuid.UUID("6f1c7f0e-5d2a-4b7e-9a55-3c0b8c6d2e11")


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def command_message(saga: Saga, state: SagaState, command: Command) -> Message:
    """The command for the instance's current step, phase and attempt. Its id is derived
    from those, so the same attempt always has the same message id."""
    token = f"{state.id}/{state.step}/{state.phase}/{state.attempt}"
    return Message(
        type=command.type,
        data=command.build(state.data),
        id=str(uuid.uuid5(_IDS, token)),
        source=f"saga/{saga.name}",
        key=state.id,
        correlationid=state.id,
        subject=saga.steps[state.step].name,
        extensions={
            "sagaid": state.id,
            "sagastep": str(state.step),
            "sagaphase": state.phase,
            "sagaattempt": str(state.attempt),
            "sagareply": saga.reply_type,
            # Whether a participant may have pruned its records of this saga.
            "sagastarted": state.created_at.isoformat(),
        },
    )


class ReplyData(TypedDict):
    """The data of a reply message: the schema the orchestrator's consumer checks, so
    that a malformed reply is dead-lettered at once with what is wrong in it."""

    saga_id: str
    step: int
    phase: str
    attempt: int
    ok: bool
    result: NotRequired[Any]
    error: NotRequired[str | None]


class Reply:
    """A participant's reply to a command, as carried in the reply message's data."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.saga_id = str(data["saga_id"])
        self.step = int(data["step"])
        self.phase = str(data["phase"])
        self.attempt = int(data["attempt"])
        self.ok = bool(data["ok"])
        self.result = data.get("result")
        self.error = data.get("error")

    def __repr__(self) -> str:
        outcome = "ok" if self.ok else f"failed: {self.error}"
        return f"reply to step {self.step} {self.phase} attempt {self.attempt} ({outcome})"


class Engine:
    """Drives one instance of ``saga`` within the transaction ``conn``."""

    def __init__(
        self,
        saga: Saga,
        conn: AsyncConnection,
        state: SagaState,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.saga = saga
        self.conn = conn
        self.state = state
        self.tx = Transition(state, state.version, clock)
        self.outbox: list[Message] = []
        #: What to do once the transition has committed (metrics, the STUCK log line):
        #: not before, so a rolled-back or replayed transition is not counted twice.
        self.committed: list[Callable[[], None]] = []
        self._paused = False  # a retry deadline was set: stop until it fires

    # -- inputs -------------------------------------------------------------------

    async def start(self) -> None:
        """Run the first steps of a new instance, up to its first remote command."""
        self.tx.log(0, self._step_name(0), ACTION, "saga_started", None)
        await self._run()

    async def on_reply(self, reply: Reply) -> bool:
        """Apply a reply; False (and an 'ignored' log entry) if it is not the one awaited.
        An engine may take several replies in turn (a batch): its transition then
        covers them all."""
        s = self.state
        self._paused = False
        awaited = (
            s.status in (RUNNING, COMPENSATING)
            and s.waiting
            and (s.step, s.phase, s.attempt) == (reply.step, reply.phase, reply.attempt)
        )
        if not awaited:
            aborted = self._abort_if_requested()
            why = "late or duplicate reply" if s.status in (RUNNING, COMPENSATING) else s.status
            self.tx.log(
                reply.step,
                self._step_name(reply.step),
                reply.phase,
                "ignored",
                f"{reply!r} ignored ({why}; saga is at step {s.step} {s.phase} "
                f"attempt {s.attempt})",
            )
            if aborted:
                await self._run()  # carry the abort out (compensate or end)
            # Otherwise nothing moves: a saga waiting out a retry backoff keeps waiting.
            return False
        # A step the changed definition lost: an operator's abort waiting for the timer
        # is carried out (ABORTED), not dropped with the deadline that STUCK clears.
        if self._off_definition() and (self._abort_if_requested() or self._beyond_definition()):
            return True
        s.waiting = False
        self.tx.clear_deadline()
        step = self.saga.steps[s.step]
        was_compensating = s.status == COMPENSATING
        if reply.ok:
            if s.phase == ACTION:
                self._merge(step, reply.result)
                self._succeeded(step)
            elif s.phase == VOID:
                self._voided(step, reply.result)
            else:
                self._compensated(step)
        elif s.phase == ACTION:
            self._action_failed(step, str(reply.error))
        else:
            self._compensation_failed(step, str(reply.error))
        # An operator's abort is carried out after the reply it met: what the reply
        # says (the pivot was applied, the step failed) decides what the abort does.
        self._abort_after_reply(was_compensating)
        await self._run()
        return True

    def _abort_after_reply(self, was_compensating: bool) -> None:
        s = self.state
        if s.abort_reason is None:
            return
        if s.status == COMPENSATING and not was_compensating:
            # The reply was a failure and began the compensation the abort asks for.
            reason, s.abort_reason = s.abort_reason, None
            self.tx.log(s.step, self._step_name(s.step), s.phase, "aborted", reason)
        elif s.status == COMPENSATING and s.phase == COMPENSATION and not self._left_to_undo():
            # The reply was the last compensation's success: the saga is compensated,
            # and nothing is left for the operator the abort would hand it to.
            reason, s.abort_reason = s.abort_reason, None
            self.tx.log(
                s.step + 1,
                self._step_name(s.step + 1),
                COMPENSATION,
                "abort_too_late",
                f"{reason} (every compensation was done)",
            )
        elif s.status == RUNNING and s.phase == ACTION and s.step >= len(self.saga.steps):
            # The reply was the last step's success: nothing is left to abort.
            reason, s.abort_reason = s.abort_reason, None
            self.tx.log(
                s.step - 1,
                self._step_name(s.step - 1),
                ACTION,
                "abort_too_late",
                f"{reason} (every step was done)",
            )
        else:
            self._abort_if_requested()

    async def on_deadline(self, kind: str) -> None:
        """A deadline of the current step and attempt is due: ``timeout`` (no reply in
        time), ``retry`` (the backoff after a failure is over, or an operator asked to
        resume a STUCK saga) or ``abort`` (an operator asked to abort)."""
        s = self.state
        self.tx.clear_deadline()
        if self._abort_if_requested() or kind == "abort":
            pass  # an abort supersedes whatever this deadline was for
        elif self._beyond_definition():
            return
        elif kind == "timeout":
            step = self.saga.steps[s.step]
            s.waiting = False
            if s.phase == ACTION:
                seconds = step.timeout
                self.tx.log(s.step, step.name, s.phase, "timed_out", f"no reply in {seconds}s")
                if step.kind is StepKind.RETRIABLE:
                    self._action_failed(step, f"timed out after {seconds}s")
                else:
                    # The outcome is unknown: the participant may have applied it, so
                    # this step is compensated too (its participant refuses the late
                    # command once the compensation, or the void, reached it).
                    self._begin_compensation(s.step, f"step {step.name!r} timed out", unknown=True)
            else:
                timeout = self.saga.compensation_timeout
                self.tx.log(s.step, step.name, s.phase, "timed_out", f"no reply in {timeout}s")
                self._compensation_failed(step, f"timed out after {timeout}s")
        await self._run()

    def _abort_if_requested(self) -> bool:
        # An operator's abort is carried out by the instance's next transition, whichever
        # it is: a reply racing the timer cannot make it get lost.
        s = self.state
        if s.abort_reason is None or s.status not in (RUNNING, COMPENSATING, STUCK):
            return False
        reason, s.abort_reason = s.abort_reason, None
        self.tx.clear_deadline()
        self._paused = False  # a retry the last reply set up is superseded
        self._abort(reason)
        return True

    def _abort(self, reason: str) -> None:
        s = self.state
        steps = self.saga.steps
        self.tx.log(s.step, self._step_name(s.step), s.phase, "aborted", reason)
        before_pivot = (
            s.phase == ACTION
            and s.step < len(steps)
            and steps[s.step].kind is not StepKind.RETRIABLE
        )
        if before_pivot:
            # A command still out may have been applied: compensate its step too.
            if s.waiting:
                self._begin_compensation(s.step, reason, unknown=True)
            else:
                self._begin_compensation(s.step - 1, reason)
            return
        # Compensating already, or past the pivot: what is left is the operator's.
        s.status = ABORTED
        s.waiting = False
        s.error = reason
        s.ended_at = self.tx.clock()
        self.committed.append(SAGAS_ENDED.labels(self.saga.name, ABORTED).inc)

    async def save(self) -> None:
        """Write the transition and its commands (raises ConcurrencyError on a race)."""
        await self.tx.save(self.conn)
        if self.outbox:
            await add_to_outbox(self.conn, *self.outbox)

    async def save_new(self, *, alone: bool = False) -> bool:
        """Insert the new instance as this transition leaves it, with its log, deadline
        and commands; False, writing nothing, if an instance with its id exists.
        ``alone``: the engine's connection is in no transaction; on PostgreSQL the
        insert is one statement that commits on its own (else one begins)."""
        inserted = await self.tx.insert_with(self.conn, self.outbox, alone=alone)
        if inserted is not None:
            return inserted
        if not await self.tx.insert(self.conn):
            return False
        if self.outbox:
            await add_to_outbox(self.conn, *self.outbox)
        return True

    # -- the machine --------------------------------------------------------------

    async def _run(self) -> None:
        s = self.state
        steps = self.saga.steps
        while s.status in (RUNNING, COMPENSATING) and not s.waiting and not self._paused:
            if self._beyond_definition():
                return
            if s.phase == ACTION:
                if s.step >= len(steps):
                    self._end(COMPLETED, None)
                    return
                step = steps[s.step]
                s.attempt += 1
                if isinstance(step.action, Command):
                    if self._send(step, step.action, step.timeout):
                        return
                    continue
                try:
                    await self._local(step, step.action)
                except Exception as exc:
                    self._action_failed(step, _error_text(exc))
                else:
                    self._succeeded(step)
            elif s.phase == VOID:
                # Asked with the action's own command (so the participant's schema
                # takes it); its sagaphase says it is a void.
                step = steps[s.step]
                if not isinstance(step.action, Command):
                    self._stuck(
                        f"step {step.name!r} waits for its participant's answer to a void, "
                        "but its action is no longer a command (the saga's definition "
                        "changed): settle it by hand, then abort or retry"
                    )
                    return
                s.attempt += 1
                if self._send(step, step.action, self.saga.compensation_timeout):
                    return
                continue
            else:
                if s.step < 0:
                    self._end(COMPENSATED, s.error)
                    return
                step = steps[s.step]
                if step.compensation is None:
                    s.step -= 1
                    continue
                s.attempt += 1
                if isinstance(step.compensation, Command):
                    if self._send(step, step.compensation, self.saga.compensation_timeout):
                        return
                    continue
                try:
                    await self._local(step, step.compensation)
                except Exception as exc:
                    self._compensation_failed(step, _error_text(exc))
                else:
                    self._compensated(step)

    async def _local(self, step: Step, action: Any) -> None:
        s = self.state
        data = copy.deepcopy(s.data)  # a failed attempt leaves no trace in it either
        ctx = StepContext(self.conn, s.id, data, step.name, s.attempt)
        # A savepoint: a failing local action leaves no trace but its log entry.
        nested = await self.conn.begin_nested()
        try:
            await action(ctx)
            # What the saga's row will store: data it cannot store fails the attempt
            # (as a raise does), not the transition, which would be retried for ever.
            json.dumps(data, separators=(",", ":"), allow_nan=False)
        except BaseException:
            await nested.rollback()
            log.debug("local %s of %s failed:\n%s", s.phase, step.name, traceback.format_exc())
            raise
        await nested.commit()
        s.data = data

    def _send(self, step: Step, command: Command, timeout: float | None) -> bool:
        """Send ``command`` and wait for its reply; False if it could not be built
        (its payload function raised, or made data that is not JSON): that attempt
        failed, as a failing local action does."""
        s = self.state
        try:
            message = command_message(self.saga, s, command)
            json.dumps(message.data, default=str, allow_nan=False)  # as the outbox writes
        except Exception as exc:
            error = f"building command {command.type!r} failed: {_error_text(exc)}"
            if s.phase == ACTION:
                self._action_failed(step, error)
            else:
                self._compensation_failed(step, error)
            return False
        s.waiting = True
        self.outbox.append(message)
        self.tx.log(s.step, step.name, s.phase, "sent", command.type)
        if timeout is not None:
            self.tx.set_deadline("timeout", timeout)
        return True

    def _merge(self, step: Step, result: Any) -> None:
        action = step.action
        if isinstance(action, Command) and action.result_key:
            self.state.data[action.result_key] = result
        elif isinstance(result, dict):
            self.state.data.update(result)

    def _succeeded(self, step: Step) -> None:
        s = self.state
        self.tx.log(s.step, step.name, ACTION, "succeeded", None)
        s.step += 1
        s.attempt = 0
        s.attempt_base = 0

    def _voided(self, step: Step, result: Any) -> None:
        """The participant's answer to a void: whether it had applied the step."""
        s = self.state
        applied = result.get("applied") if isinstance(result, dict) else None
        if not isinstance(applied, bool):
            # Not an answer to a void (a participant that does not know them, and may
            # have run the step now): nothing can be concluded, so it is a failure,
            # retried and then STUCK, never a "not applied".
            self._compensation_failed(
                step,
                f"the participant's answer to a void is not {{'applied': true|false}}: "
                f"{result!r} (does it handle sagaphase=void?)",
            )
            return
        answer: dict[str, Any] = result
        s.attempt = 0
        s.attempt_base = 0
        if not applied:
            # It had not, and refuses the command from now on: nothing to undo here.
            self.tx.log(s.step, step.name, VOID, "voided", "not applied; refused from now on")
            s.phase = COMPENSATION
            s.step -= 1
            return
        self.tx.log(s.step, step.name, VOID, "applied", "the participant had applied it")
        # Its result: what the saga goes on with, or what its compensation undoes.
        self._merge(step, answer.get("result"))
        if step.kind is StepKind.PIVOT:
            # Past the point of no return after all: the saga goes on, and the steps
            # before the pivot stay done.
            s.status = RUNNING
            s.phase = ACTION
            s.error = None
            self._succeeded(step)
            return
        s.phase = COMPENSATION  # applied: undone like any other step

    def _compensated(self, step: Step) -> None:
        s = self.state
        self.tx.log(s.step, step.name, COMPENSATION, "compensated", None)
        s.step -= 1
        s.attempt = 0
        s.attempt_base = 0

    def _action_failed(self, step: Step, error: str) -> None:
        s = self.state
        self.tx.log(s.step, step.name, ACTION, "failed", error)
        if not step.retry.exhausted(s.tries):
            delay = step.retry.delay(s.tries)
            self.tx.log(s.step, step.name, ACTION, "retrying", f"in {delay:.2f}s")
            self.tx.set_deadline("retry", delay)
            self._paused = True
            return
        if step.kind is StepKind.RETRIABLE:
            self._stuck(f"retriable step {step.name!r} failed {s.tries} times: {error}")
        else:
            # The failed step left nothing behind: compensate the ones before it.
            self._begin_compensation(s.step - 1, f"step {step.name!r} failed: {error}")

    def _compensation_failed(self, step: Step, error: str) -> None:
        s = self.state
        self.tx.log(s.step, step.name, s.phase, "failed", error)
        policy = self.saga.compensation_retry
        if policy.exhausted(s.tries):
            self._stuck(
                f"compensation of step {step.name!r} failed {s.tries} times; last error: {error}"
            )
            return
        delay = policy.delay(s.tries)
        self.tx.log(s.step, step.name, s.phase, "retrying", f"in {delay:.2f}s")
        self.tx.set_deadline("retry", delay)
        self._paused = True

    def _begin_compensation(self, from_step: int, reason: str, *, unknown: bool = False) -> None:
        """Compensate from ``from_step`` down. ``unknown``: that step's command is still
        out, applied or not; unless it has a compensating command of its own (which its
        participant refuses the late command after), its participant is asked first
        (:data:`VOID`)."""
        s = self.state
        s.status = COMPENSATING
        s.phase = COMPENSATION
        if unknown and 0 <= from_step < len(self.saga.steps):
            step = self.saga.steps[from_step]
            if isinstance(step.action, Command) and not isinstance(step.compensation, Command):
                s.phase = VOID
        s.step = from_step
        s.attempt = 0
        s.attempt_base = 0
        s.waiting = False
        s.error = reason
        self.tx.log(from_step, self._step_name(from_step), s.phase, "compensating", reason)

    def _stuck(self, reason: str) -> None:
        s = self.state
        s.status = STUCK
        s.waiting = False
        s.error = reason
        self.tx.clear_deadline()
        self.tx.log(s.step, self._step_name(s.step), s.phase, "stuck", reason)
        name, saga_id = self.saga.name, s.id

        def counted() -> None:
            SAGAS_STUCK.labels(name).inc()
            log.error("saga %s (%s) is STUCK: %s", saga_id, name, reason)

        self.committed.append(counted)

    def _end(self, status: str, error: str | None) -> None:
        s = self.state
        s.status = status
        s.error = error
        s.ended_at = self.tx.clock()
        self.tx.clear_deadline()
        step = max(0, min(s.step, len(self.saga.steps) - 1))
        self.tx.log(step, self._step_name(step), s.phase, f"saga_{status.lower()}", error)
        name, seconds = self.saga.name, (s.ended_at - s.created_at).total_seconds()

        def counted() -> None:
            SAGAS_ENDED.labels(name, status).inc()
            SAGA_DURATION.labels(name, status).observe(seconds)

        self.committed.append(counted)

    def _left_to_undo(self) -> bool:
        """Whether a step at or below the current one has a compensation to run."""
        steps = self.saga.steps
        return any(
            steps[i].compensation is not None for i in range(min(self.state.step + 1, len(steps)))
        )

    def _off_definition(self) -> bool:
        """Whether the instance is at a step its saga's definition no longer has (the
        definition lost steps while it ran)."""
        s = self.state
        count = len(self.saga.steps)
        return not (s.step < count or (s.phase == ACTION and s.step == count and not s.waiting))

    def _beyond_definition(self) -> bool:
        """:meth:`_off_definition`, and if so the instance is now STUCK, saying so."""
        if not self._off_definition():
            return False
        s = self.state
        count = len(self.saga.steps)
        self._stuck(
            f"the saga is at step {s.step} ({s.phase}) but its definition has {count} "
            "step(s) now (it changed while the saga ran): settle that step by hand, then "
            "abort the saga, or deploy the definition it started with and retry"
        )
        return True

    def _step_name(self, index: int) -> str:
        steps = self.saga.steps
        return steps[index].name if 0 <= index < len(steps) else "-"
