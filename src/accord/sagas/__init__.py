"""Sagas: orchestrated (a coordinator drives the steps and their compensations) and
choreographed (services chain through events), with a flow tracker.

::

    book_trip = (
        Saga("book-trip")
        .step("reserve seat", command("seats.reserve"), compensate=command("seats.release"),
              timeout=10)
        .pivot("charge card", command("payments.charge"), timeout=30)
        .retriable("issue ticket", issue_ticket)          # a local action
    )
    orchestrator = Orchestrator(database, transport, [book_trip])
    saga_id = await orchestrator.start(book_trip, {"seat": "12A"})

    # in the seats service
    @participant(seats_consumer, "seats.reserve")
    async def reserve(ctx: CommandContext, data: dict) -> dict:
        ...                                   # raise StepFailed("sold out") to refuse

Semantic lock (Richardson's countermeasure for the missing isolation between sagas):
a compensatable step writes its resource in a *pending* state owned by the saga
(``room 7: PENDING, saga_id=...``); other sagas that meet a pending resource refuse
(``raise StepFailed("room 7 is PENDING")``) or wait; a retriable step after the
pivot turns it final (``BOOKED``) and the step's compensation deletes it. Since
every saga ends COMPLETED or COMPENSATED (or STUCK, visible to an operator), no
lock is left behind silently. ``tests/sagas/test_semantic_lock.py`` is a complete
example.

Choreography is as short (:class:`Choreography`); a :class:`FlowTracker` records
every message by correlation id (``accord flows show ID``, ``accord flows stalled``).
Operators use ``accord sagas list|show|retry|abort``.
"""

from accord.sagas._admin import SagaAdmin, StepLogEntry
from accord.sagas._choreography import Choreography, FlowHandler
from accord.sagas._definition import Command, Retry, Saga, Step, StepContext, StepKind, command
from accord.sagas._flows import FlowEntry, Flows, FlowTracker, StalledFlow
from accord.sagas._orchestrator import Orchestrator
from accord.sagas._participant import CommandContext, RecordsPruned, StepFailed, participant
from accord.sagas._store import (
    ABORTED,
    COMPENSATED,
    COMPENSATING,
    COMPLETED,
    RUNNING,
    STATUSES,
    STUCK,
    SagaState,
)

__all__ = [
    "ABORTED",
    "COMPENSATED",
    "COMPENSATING",
    "COMPLETED",
    "RUNNING",
    "STATUSES",
    "STUCK",
    "Choreography",
    "Command",
    "CommandContext",
    "FlowEntry",
    "FlowHandler",
    "FlowTracker",
    "Flows",
    "Orchestrator",
    "RecordsPruned",
    "Retry",
    "Saga",
    "SagaAdmin",
    "SagaState",
    "StalledFlow",
    "Step",
    "StepContext",
    "StepFailed",
    "StepKind",
    "StepLogEntry",
    "command",
    "participant",
]
