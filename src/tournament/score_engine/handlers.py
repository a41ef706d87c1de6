"""The Score Engine's message handlers: saga commands (both styles) and matches."""

from __future__ import annotations

from typing import Any

from accord.eventstore import EventStore
from accord.inbox import Consumer, HandlerContext
from accord.sagas import Choreography, CommandContext, participant
from tournament.contracts import (
    MATCH_RECORDED,
    SCORES_INITIALISE,
    SCORES_REVOKE,
    Choreo,
    InitialiseScores,
    MatchRecorded,
)
from tournament.score_engine import ledger

__all__ = ["register"]


def register(consumer: Consumer, store: EventStore, flow: Choreography) -> None:
    """Register every Score Engine handler on ``consumer``: ``match.recorded``, the
    orchestrated saga's commands and the choreographed flow's steps (both styles are
    served, so a stack can switch style without stranding flows in progress)."""

    @consumer.handler(MATCH_RECORDED, schema=MatchRecorded)
    async def on_match(ctx: HandlerContext, data: MatchRecorded) -> None:
        await ledger.award(ctx.conn, store, data)

    @participant(consumer, SCORES_INITIALISE, schema=InitialiseScores)
    async def initialise(ctx: CommandContext, data: InitialiseScores) -> dict[str, Any]:
        opened = await ledger.initialise(
            ctx.conn, store, data.tournament_id, data.participants, correlation_id=ctx.saga_id
        )
        return {"ledgers_opened": opened}

    @participant(consumer, SCORES_REVOKE, schema=InitialiseScores)
    async def revoke(ctx: CommandContext, data: InitialiseScores) -> dict[str, Any]:
        revoked = await ledger.revoke(
            ctx.conn, store, data.tournament_id, "tournament cancelled", correlation_id=ctx.saga_id
        )
        return {"ledgers_revoked": revoked}

    @flow.on(
        consumer,
        Choreo.REQUESTED,
        emits=Choreo.SCORES_INITIALISED,
        fails=Choreo.SCORES_REFUSED,
        schema=InitialiseScores,
    )
    async def open_ledgers(ctx: HandlerContext, data: InitialiseScores) -> None:
        await ledger.initialise(
            ctx.conn,
            store,
            data.tournament_id,
            data.participants,
            correlation_id=ctx.message.correlationid,
        )

    @flow.compensate(
        consumer, Choreo.ACTIVATION_FAILED, emits=Choreo.SCORES_REVOKED, schema=InitialiseScores
    )
    async def revoke_ledgers(ctx: HandlerContext, data: InitialiseScores) -> None:
        await ledger.revoke(
            ctx.conn,
            store,
            data.tournament_id,
            "tournament could not be activated",
            correlation_id=ctx.message.correlationid,
        )
