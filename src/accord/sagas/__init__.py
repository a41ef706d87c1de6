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
"""

from accord.sagas._admin import SagaAdmin, StepLogEntry
from accord.sagas._choreography import Choreography, FlowHandler
from accord.sagas._definition import Command, Retry, Saga, Step, StepContext, StepKind, command
from accord.sagas._flows import FlowEntry, Flows, FlowTracker, StalledFlow
from accord.sagas._orchestrator import Orchestrator
from accord.sagas._participant import CommandContext, StepFailed, participant
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
