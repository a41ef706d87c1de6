"""Event store and snapshot tables (projection checkpoint/parked tables go below them).

``accord_events.position`` is the global, gap-safe order (see
:mod:`accord.eventstore`): on PostgreSQL the store computes it from the
writing transaction's id, on SQLite it is the rowid.
"""

from __future__ import annotations

import sqlalchemy as sa

from accord.db.schema import metadata
from accord.db.types import BigId, JSONType, UTCDateTime

__all__ = ["events", "metadata", "snapshots"]

# One row per event. (stream_id, version) is unique: that constraint is the
# optimistic-concurrency check between writers of the same stream.
events = sa.Table(
    "accord_events",
    metadata,
    sa.Column("position", BigId, primary_key=True, autoincrement=False),
    sa.Column("stream_id", sa.String(300), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("id", sa.Uuid, nullable=False),
    sa.Column("type", sa.String(200), nullable=False),
    sa.Column("schema_version", sa.Integer, nullable=False, server_default="1"),
    sa.Column("data", JSONType, nullable=False),
    sa.Column("metadata", JSONType, nullable=False),
    sa.Column("recorded_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("stream_id", "version", name="uq_accord_events_stream_version"),
    sa.Index("ix_accord_events_type_position", "type", "position"),
)

# The latest snapshot of each aggregate stream. ``schema_version`` is the
# aggregate class's snapshot version: a snapshot written by other code is ignored.
snapshots = sa.Table(
    "accord_snapshots",
    metadata,
    sa.Column("stream_id", sa.String(300), primary_key=True),
    sa.Column("aggregate_type", sa.String(200), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("schema_version", sa.Integer, nullable=False),
    sa.Column("state", JSONType, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

# --- projections (owned by the projections work) -------------------------------
