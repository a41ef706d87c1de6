"""The score ledger, event-sourced: one stream per (tournament, participant).

Events: ``ScoresInitialized``, ``PointsAwarded``, ``ScoresRevoked``. Every write
goes through :class:`accord.eventstore.EventStore` in the caller's transaction
(the inbox's or the saga participant's), together with the ``score_ledgers``
index row, so a command or a ``match.recorded`` is applied exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from accord.eventstore import NO_STREAM, EventStore, NewEvent, RecordedEvent
from accord.sagas import StepFailed
from tournament.contracts import MatchRecorded
from tournament.score_engine.tables import bans, ledgers, matches

__all__ = [
    "INITIALIZED",
    "OPEN",
    "POINTS_AWARDED",
    "REVOKED",
    "LedgerMissing",
    "Standing",
    "award",
    "banned",
    "fold",
    "initialise",
    "revoke",
    "stream_id",
]

INITIALIZED, POINTS_AWARDED, SCORES_REVOKED = "ScoresInitialized", "PointsAwarded", "ScoresRevoked"
EVENT_TYPES = (INITIALIZED, POINTS_AWARDED, SCORES_REVOKED)
OPEN, REVOKED = "OPEN", "REVOKED"


class LedgerMissing(LookupError):
    """A match names a participant who has no open ledger in that tournament."""


def stream_id(tournament_id: str, participant: str) -> str:
    """The ledger stream of ``participant`` in ``tournament_id``."""
    return f"ledger/{tournament_id}/{participant}"


async def banned(conn: AsyncConnection, participants: Sequence[str]) -> list[str]:
    """Which of ``participants`` are banned, in the given order."""
    found: set[str] = set()
    for start in range(0, len(participants), 500):
        chunk = list(participants[start : start + 500])
        rows = await conn.execute(
            sa.select(bans.c.participant).where(bans.c.participant.in_(chunk))
        )
        found.update(r[0] for r in rows)
    return [p for p in participants if p in found]


def _ban_message(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:10]) + (" ..." if len(names) > 10 else "")
    noun = "participant" if len(names) == 1 else "participants"
    verb = "is" if len(names) == 1 else "are"
    return f"{noun} {shown} {verb} banned"


async def initialise(
    conn: AsyncConnection,
    store: EventStore,
    tournament_id: str,
    participants: Sequence[str],
    *,
    correlation_id: str | None = None,
) -> int:
    """Open a ledger (``ScoresInitialized``) for every participant, or none: raises
    :class:`StepFailed` naming the banned ones. Idempotent: a tournament whose ledgers
    exist already is left as it is. Returns how many ledgers were opened."""
    refused = await banned(conn, participants)
    if refused:
        raise StepFailed(_ban_message(refused))
    existing = await conn.scalar(
        sa.select(sa.func.count())
        .select_from(ledgers)
        .where(ledgers.c.tournament_id == tournament_id)
    )
    if existing:
        return 0
    now = datetime.now(UTC)
    metadata = {"correlation_id": correlation_id} if correlation_id else {}
    for participant in participants:
        await store.append(
            stream_id(tournament_id, participant),
            [
                NewEvent(
                    INITIALIZED,
                    {"tournament_id": tournament_id, "participant": participant},
                    metadata,
                )
            ],
            expected_version=NO_STREAM,
            conn=conn,
        )
    await conn.execute(
        ledgers.insert(),
        [
            {
                "tournament_id": tournament_id,
                "participant": p,
                "stream_id": stream_id(tournament_id, p),
                "status": OPEN,
                "opened_at": now,
                "revoked_at": None,
            }
            for p in participants
        ],
    )
    return len(participants)


async def revoke(
    conn: AsyncConnection,
    store: EventStore,
    tournament_id: str,
    reason: str,
    *,
    correlation_id: str | None = None,
) -> int:
    """Close every open ledger of the tournament (``ScoresRevoked``); return how many."""
    rows = await conn.execute(
        sa.select(ledgers.c.participant).where(
            ledgers.c.tournament_id == tournament_id, ledgers.c.status == OPEN
        )
    )
    participants = [r[0] for r in rows]
    metadata = {"correlation_id": correlation_id} if correlation_id else {}
    for participant in participants:
        await store.append(
            stream_id(tournament_id, participant),
            [
                NewEvent(
                    SCORES_REVOKED,
                    {"tournament_id": tournament_id, "participant": participant, "reason": reason},
                    metadata,
                )
            ],
            conn=conn,
        )
    if participants:
        await conn.execute(
            ledgers.update()
            .where(ledgers.c.tournament_id == tournament_id, ledgers.c.status == OPEN)
            .values(status=REVOKED, revoked_at=datetime.now(UTC))
        )
    return len(participants)


async def award(conn: AsyncConnection, store: EventStore, match: MatchRecorded) -> list[int]:
    """Append ``PointsAwarded`` to both players' ledgers (win 3, draw 1, loss 0) and
    record the match's highest position in ``score_matches``; return the positions.
    Raises :class:`LedgerMissing` if a player has no open ledger and
    :class:`StepFailed` if a player is banned (the inbox retries, then dead-letters)."""
    players = [match.home, match.away]
    open_ = {
        r[0]
        for r in await conn.execute(
            sa.select(ledgers.c.participant).where(
                ledgers.c.tournament_id == match.tournament_id,
                ledgers.c.participant.in_(players),
                ledgers.c.status == OPEN,
            )
        )
    }
    missing = [p for p in players if p not in open_]
    if missing:
        raise LedgerMissing(
            f"no open ledger for {', '.join(repr(p) for p in missing)} in tournament "
            f"{match.tournament_id}: the tournament is unknown here, or was revoked"
        )
    refused = await banned(conn, players)
    if refused:
        raise StepFailed(
            f"{_ban_message(refused)}: points are not awarded while the ban stands "
            "(lift it, then replay this message)"
        )
    positions: list[int] = []
    for player, (points, result) in match.points().items():
        opponent = match.away if player == match.home else match.home
        appended = await store.append(
            stream_id(match.tournament_id, player),
            [
                NewEvent(
                    POINTS_AWARDED,
                    {
                        "tournament_id": match.tournament_id,
                        "participant": player,
                        "match_id": match.match_id,
                        "opponent": opponent,
                        "result": result,
                        "points": points,
                    },
                )
            ],
            conn=conn,
        )
        positions.extend(appended.positions)
    await conn.execute(
        matches.insert().values(
            match_id=match.match_id,
            tournament_id=match.tournament_id,
            position=max(positions),
            applied_at=datetime.now(UTC),
        )
    )
    return positions


@dataclass
class Standing:
    """One participant's standing, folded from ledger events."""

    participant: str
    points: int = 0
    played: int = 0
    revoked: bool = False
    matches: list[str] = field(default_factory=list)


def fold(participant: str, events: Sequence[RecordedEvent]) -> Standing | None:
    """A participant's standing from its ledger events (None if there is no ledger yet)."""
    standing: Standing | None = None
    for event in events:
        if event.type == INITIALIZED:
            standing = Standing(participant)
        elif standing is not None and event.type == POINTS_AWARDED:
            standing.points += int(event.data["points"])
            standing.played += 1
            standing.matches.append(str(event.data["match_id"]))
        elif standing is not None and event.type == SCORES_REVOKED:
            standing.revoked = True
    return standing


def ranked(standings: Sequence[tuple[str, int, int]]) -> list[dict[str, Any]]:
    """Entries ``(participant, points, played)`` sorted and ranked (ties share a rank,
    the next rank skips: 1, 1, 3)."""
    ordered = sorted(standings, key=lambda s: (-s[1], s[0]))
    entries: list[dict[str, Any]] = []
    previous: int | None = None
    rank = 0
    for index, (participant, points, played) in enumerate(ordered, start=1):
        if points != previous:
            rank, previous = index, points
        entries.append(
            {"participant": participant, "points": points, "played": played, "rank": rank}
        )
    return entries
