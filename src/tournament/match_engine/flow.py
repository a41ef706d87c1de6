""" "Create tournament" on the Match Engine's side, in both styles.

Orchestrated (:func:`create_tournament_saga`, run by an :class:`accord.sagas.Orchestrator`
in the Match Engine): record the tournament PENDING (local), have the Score Engine
initialise every participant's ledger (remote; compensated by revoking them),
then activate (the pivot). A failure compensates: the tournament is CANCELLED.

Choreographed (:func:`register_choreography`): the Match Engine publishes
``tournament.requested``; the Score Engine answers ``scores.initialised`` or
``scores.refused``; the Match Engine activates or cancels.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from accord.inbox import Consumer, HandlerContext
from accord.sagas import Choreography, Saga, StepContext, command
from tournament.contracts import (
    ACTIVE,
    CANCELLED,
    FLOW,
    PENDING,
    SCORES_INITIALISE,
    SCORES_REVOKE,
    Choreo,
)
from tournament.match_engine.tables import tournaments

__all__ = [
    "activate",
    "cancel",
    "choreography",
    "create_tournament_saga",
    "human_reason",
    "insert_pending",
    "register_choreography",
]

#: How long the Score Engine may take to answer a command before the step counts as failed.
SCORES_TIMEOUT = 60.0


def human_reason(error: str | None) -> str:
    """A sentence for people from a saga's or flow's technical error text."""
    if not error:
        return "cancelled"
    text = re.sub(r"^step '([^']+)' failed: ", "", error)
    text = re.sub(r"^(StepFailed|[A-Za-z]*Error): ", "", text)
    if "banned" in text:
        return f"the Score Engine refused to open the score ledgers: {text}"
    return f"cancelled because {text}"


async def insert_pending(
    conn: AsyncConnection, data: dict[str, Any], saga_id: str, style: str
) -> None:
    """Record the tournament PENDING (does nothing if it is recorded already)."""
    found = await conn.scalar(
        sa.select(tournaments.c.id).where(tournaments.c.id == data["tournament_id"])
    )
    if found is not None:
        return
    now = datetime.now(UTC)
    await conn.execute(
        tournaments.insert().values(
            id=data["tournament_id"],
            name=data["name"],
            participants=list(data["participants"]),
            status=PENDING,
            reason=None,
            saga_id=saga_id,
            saga_style=style,
            created_at=now,
            updated_at=now,
        )
    )


async def activate(conn: AsyncConnection, tournament_id: str) -> None:
    """PENDING -> ACTIVE; raises if the tournament is not PENDING (the flow compensates)."""
    done = await conn.execute(
        tournaments.update()
        .where(tournaments.c.id == tournament_id, tournaments.c.status == PENDING)
        .values(status=ACTIVE, updated_at=datetime.now(UTC))
    )
    if done.rowcount != 1:
        status = await conn.scalar(
            sa.select(tournaments.c.status).where(tournaments.c.id == tournament_id)
        )
        if status == ACTIVE:
            return
        raise RuntimeError(f"tournament {tournament_id} is {status}, it cannot become ACTIVE")


async def cancel(conn: AsyncConnection, tournament_id: str, reason: str | None) -> None:
    """Anything but ACTIVE -> CANCELLED with ``reason`` (None: read from the saga)."""
    await conn.execute(
        tournaments.update()
        .where(tournaments.c.id == tournament_id, tournaments.c.status != ACTIVE)
        .values(status=CANCELLED, reason=reason, updated_at=datetime.now(UTC))
    )


# -- orchestration ---------------------------------------------------------------


async def _record(ctx: StepContext) -> None:
    await insert_pending(ctx.conn, ctx.data, ctx.saga_id, "orchestration")


async def _cancel(ctx: StepContext) -> None:
    # The saga's error (why it compensates) is not given to a local compensation; the
    # API reads it from the saga when the tournament's reason is empty.
    await cancel(ctx.conn, ctx.data["tournament_id"], None)


async def _activate(ctx: StepContext) -> None:
    await activate(ctx.conn, ctx.data["tournament_id"])


def _scores_payload(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "tournament_id": data["tournament_id"],
        "name": data["name"],
        "participants": data["participants"],
    }


def create_tournament_saga() -> Saga:
    """The orchestrated "create tournament" saga."""
    return (
        Saga(FLOW, compensation_timeout=SCORES_TIMEOUT)
        .step("record tournament", _record, compensate=_cancel)
        .step(
            "initialise scores",
            command(SCORES_INITIALISE, _scores_payload),
            compensate=command(SCORES_REVOKE, _scores_payload),
            timeout=SCORES_TIMEOUT,
        )
        .pivot("activate", _activate)
    )


# -- choreography ------------------------------------------------------------------


def choreography() -> Choreography:
    """The choreographed "create tournament" flow (both engines declare their part on it)."""
    return Choreography(FLOW, completed=Choreo.ACTIVATED, compensated=Choreo.CANCELLED)


def register_choreography(flow: Choreography, consumer: Consumer) -> None:
    """The Match Engine's handlers: activate on ``scores.initialised``; cancel on
    ``scores.refused`` / ``scores.revoked``."""

    @flow.on(
        consumer, Choreo.SCORES_INITIALISED, emits=Choreo.ACTIVATED, fails=Choreo.ACTIVATION_FAILED
    )
    async def activate_tournament(ctx: HandlerContext, data: Any) -> None:
        await activate(ctx.conn, data["tournament_id"])

    @flow.compensate(consumer, Choreo.SCORES_REFUSED, Choreo.SCORES_REVOKED, emits=Choreo.CANCELLED)
    async def cancel_tournament(ctx: HandlerContext, data: Any) -> None:
        await cancel(ctx.conn, data["tournament_id"], human_reason(data.get("error")))
