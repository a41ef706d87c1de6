"""The Score Engine's own tables (its ledger itself is the event store's ``accord_events``)."""

from __future__ import annotations

import sqlalchemy as sa

from accord.db.types import UTCDateTime

__all__ = ["bans", "ledgers", "matches", "metadata"]

metadata = sa.MetaData()

# Participants who may not be given scores.
bans = sa.Table(
    "score_bans",
    metadata,
    sa.Column("participant", sa.String(64), primary_key=True),
    sa.Column("banned_at", UTCDateTime, nullable=False),
)

# An index of the ledger streams: which (tournament, participant) has one, and whether
# it is open or revoked. Written in the same transaction as the stream's events.
ledgers = sa.Table(
    "score_ledgers",
    metadata,
    sa.Column("tournament_id", sa.String(36), primary_key=True),
    sa.Column("participant", sa.String(64), primary_key=True),
    sa.Column("stream_id", sa.String(200), nullable=False),
    sa.Column("status", sa.String(10), nullable=False),
    sa.Column("opened_at", UTCDateTime, nullable=False),
    sa.Column("revoked_at", UTCDateTime, nullable=True),
)

# Where each applied match ended in the ledgers: the highest position of its
# ``PointsAwarded`` events, so a client that recorded a match can wait for exactly that
# (``GET /tournaments/{id}/leaderboard?match_id=``). Written with those events.
matches = sa.Table(
    "score_matches",
    metadata,
    sa.Column("match_id", sa.String(36), primary_key=True),
    sa.Column("tournament_id", sa.String(36), nullable=False),
    sa.Column("position", sa.BigInteger, nullable=False),
    sa.Column("applied_at", UTCDateTime, nullable=False),
)
