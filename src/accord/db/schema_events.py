"""Event store and snapshot tables (projection checkpoint/parked tables go below them).

``accord_events.position`` is the global, gap-safe order (see
:mod:`accord.eventstore`): on PostgreSQL the store computes it from the
writing transaction's id, on SQLite it is the rowid.
"""

from __future__ import annotations

import sqlalchemy as sa

from accord.db.schema import metadata
from accord.db.types import BigId, JSONType, UTCDateTime

__all__ = [
    "events",
    "metadata",
    "projection_checkpoints",
    "projection_leases",
    "projection_parked",
    "projection_versions",
    "snapshots",
]

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

# Which version of each projection's read model readers use (the pointer row that a
# rebuild flips to swap in a new version atomically), and the one being built.
projection_versions = sa.Table(
    "accord_projection_versions",
    metadata,
    sa.Column("projection", sa.String(200), primary_key=True),
    sa.Column("live_version", sa.Integer, nullable=False),
    sa.Column("building_version", sa.Integer, nullable=True),
    sa.Column("swapped_at", UTCDateTime, nullable=True),
    # Set by a rebuild about to swap: the live runner pauses until then (or the swap).
    sa.Column("handoff_until", UTCDateTime, nullable=True),
)

# How far each version of a projection has applied the event log. Updated in the
# same transaction as the read-model writes of the batch it records.
projection_checkpoints = sa.Table(
    "accord_projection_checkpoints",
    metadata,
    sa.Column("projection", sa.String(200), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("position", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("handled", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("state", sa.String(20), nullable=False, server_default="running"),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

# Poison events a projection gave up on (after its retries) and stepped over.
projection_parked = sa.Table(
    "accord_projection_parked",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("projection", sa.String(200), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("position", sa.BigInteger, nullable=False),
    sa.Column("event_id", sa.Uuid, nullable=False),
    sa.Column("stream_id", sa.String(300), nullable=False),
    sa.Column("type", sa.String(200), nullable=False),
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("parked_at", UTCDateTime, nullable=False),
    sa.Column("replayed_at", UTCDateTime, nullable=True),
    sa.Index("ix_accord_projection_parked_projection", "projection", "version", "position"),
)

# One active runner per projection (or per rebuild): whoever holds an unexpired row.
projection_leases = sa.Table(
    "accord_projection_leases",
    metadata,
    sa.Column("name", sa.String(220), primary_key=True),
    sa.Column("owner", sa.String(200), nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
    sa.Column("acquired_at", UTCDateTime, nullable=False),
)
