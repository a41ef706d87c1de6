"""The leaderboard: a CQRS read model of the score ledgers (an accord projection)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from accord.eventstore import RecordedEvent
from accord.projections import Projection, ProjectionContext
from tournament.score_engine.ledger import INITIALIZED, POINTS_AWARDED, SCORES_REVOKED, ranked

__all__ = ["leaderboard", "make_leaderboard", "read_leaderboard"]

NAME = "leaderboard"


def make_leaderboard() -> Projection:
    """A fresh leaderboard projection (one row per tournament and participant)."""
    projection = Projection(NAME)
    projection.table(
        "standings",
        sa.Column("tournament_id", sa.String(36), primary_key=True),
        sa.Column("participant", sa.String(64), primary_key=True),
        sa.Column("points", sa.Integer, nullable=False),
        sa.Column("played", sa.Integer, nullable=False),
    )

    @projection.on(INITIALIZED)
    def initialised(ctx: ProjectionContext, event: RecordedEvent) -> None:
        row = {
            "tournament_id": event.data["tournament_id"],
            "participant": event.data["participant"],
            "points": 0,
            "played": 0,
        }
        ctx.upsert("standings", row, key=("tournament_id", "participant"))

    @projection.on(POINTS_AWARDED)
    def awarded(ctx: ProjectionContext, event: RecordedEvent) -> None:
        row = {
            "tournament_id": event.data["tournament_id"],
            "participant": event.data["participant"],
            "points": int(event.data["points"]),
            "played": 1,
        }
        ctx.upsert("standings", row, key=("tournament_id", "participant"), add=("points", "played"))

    @projection.on(SCORES_REVOKED)
    async def revoked(ctx: ProjectionContext, event: RecordedEvent) -> None:
        standings = ctx.table("standings")
        await ctx.execute(
            standings.delete().where(
                standings.c.tournament_id == event.data["tournament_id"],
                standings.c.participant == event.data["participant"],
            )
        )

    return projection


#: The projection both the projector process and the API use.
leaderboard = make_leaderboard()


async def read_leaderboard(conn: AsyncConnection, tournament_id: str) -> list[dict[str, Any]]:
    """The tournament's ranked entries as the read model has them now."""
    standings = (await leaderboard.live_tables(conn))["standings"]
    rows = await conn.execute(
        sa.select(standings.c.participant, standings.c.points, standings.c.played).where(
            standings.c.tournament_id == tournament_id
        )
    )
    return ranked([(r.participant, int(r.points), int(r.played)) for r in rows])
