"""The Match Engine's own tables (beside Accord's, in the Match Engine's database)."""

from __future__ import annotations

import sqlalchemy as sa

from accord.db.types import JSONType, UTCDateTime

__all__ = ["idempotency_keys", "matches", "metadata", "tournaments"]

metadata = sa.MetaData()

# One row per tournament; ``status`` PENDING until its saga ends ACTIVE or CANCELLED.
tournaments = sa.Table(
    "match_tournaments",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("participants", JSONType, nullable=False),
    sa.Column("status", sa.String(10), nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("saga_id", sa.String(36), nullable=False, unique=True),
    sa.Column("saga_style", sa.String(20), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

# One row per match played; written with its ``match.recorded`` event (outbox).
matches = sa.Table(
    "match_matches",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("tournament_id", sa.String(36), nullable=False, index=True),
    sa.Column("home", sa.String(64), nullable=False),
    sa.Column("away", sa.String(64), nullable=False),
    sa.Column("winner", sa.String(64), nullable=True),
    sa.Column("played_at", UTCDateTime, nullable=False),
)

# One row per ``Idempotency-Key`` a create request came with: a retry with the key is
# answered as the first request was, and starts nothing (see the Match Engine's API).
idempotency_keys = sa.Table(
    "match_idempotency_keys",
    metadata,
    sa.Column("key", sa.String(255), primary_key=True),
    # SHA-256 of the request's body as validated: the same key with another body is refused.
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("tournament_id", sa.String(36), nullable=False),
    sa.Column("saga_id", sa.String(36), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)
