"""The messaging tables: outbox, inbox, consumer dead letters, the SQL transport.

Every Accord table lives in :data:`metadata` (re-exported as
``accord.db.metadata``) so users can include them in their own Alembic
migrations. Other areas (event store, projections, sagas) declare their tables
in sibling ``schema_*.py`` modules on the same metadata.
"""

from __future__ import annotations

import sqlalchemy as sa

from accord.db.types import BigId, JSONType, UTCDateTime

__all__ = [
    "dead_letters",
    "inbox",
    "inbox_holds",
    "metadata",
    "outbox",
    "queue",
    "queue_deliveries",
    "queue_groups",
    "schema_version",
]

metadata = sa.MetaData()

schema_version = sa.Table(
    "accord_schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("applied_at", UTCDateTime, nullable=False),
)

# The seed's ``outbox_messages`` grown up. ``seq`` is the commit-order key the
# relay claims by; ``id`` is the message id, stable across retries.
outbox = sa.Table(
    "accord_outbox",
    metadata,
    sa.Column("seq", BigId, primary_key=True, autoincrement=True),
    sa.Column("id", sa.Uuid, nullable=False, unique=True),
    sa.Column("event_type", sa.String(200), nullable=False),
    sa.Column("key", sa.String(200), nullable=True),
    sa.Column("payload", JSONType, nullable=True),
    sa.Column("headers", JSONType, nullable=False),
    sa.Column("status", sa.String(10), nullable=False, server_default="PENDING"),
    sa.Column("retry_count", sa.Integer, nullable=False, server_default="0"),
    sa.Column("available_at", UTCDateTime, nullable=False),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("sent_at", UTCDateTime, nullable=True),
    sa.Index(
        "ix_accord_outbox_pending",
        "seq",
        postgresql_where=sa.text("status = 'PENDING'"),
        sqlite_where=sa.text("status = 'PENDING'"),
    ),
    sa.Index(
        "ix_accord_outbox_pending_key",
        "key",
        "seq",
        postgresql_where=sa.text("status = 'PENDING' AND key IS NOT NULL"),
        sqlite_where=sa.text("status = 'PENDING' AND key IS NOT NULL"),
    ),
    # Only the retention clean-up reads SENT rows by age; partial, so adding a
    # PENDING row (the business transaction's cost) does not maintain it.
    sa.Index(
        "ix_accord_outbox_sent",
        "sent_at",
        postgresql_where=sa.text("status = 'SENT'"),
        sqlite_where=sa.text("status = 'SENT'"),
    ),
    # Rows added for later (SCHEDULED), by due time: relays release the due ones.
    # Kept out of the PENDING indexes, so claims never read past them.
    sa.Index(
        "ix_accord_outbox_scheduled",
        "available_at",
        "seq",
        postgresql_where=sa.text("status = 'SCHEDULED'"),
        sqlite_where=sa.text("status = 'SCHEDULED'"),
    ),
)

# One row per message a consumer has applied, written in the handler's transaction.
inbox = sa.Table(
    "accord_inbox",
    metadata,
    sa.Column("consumer", sa.String(200), primary_key=True),
    sa.Column("message_id", sa.String(200), primary_key=True),
    sa.Column("message_type", sa.String(200), nullable=True),
    sa.Column("processed_at", UTCDateTime, nullable=False),
    sa.Index("ix_accord_inbox_processed", "consumer", "processed_at"),
)

# How many times a consumer gave a message back without trying it (held back behind
# a failed message with its key): redeliveries that were not failures, so they do
# not count against the message's attempts. Written only on that path.
inbox_holds = sa.Table(
    "accord_inbox_holds",
    metadata,
    sa.Column("consumer", sa.String(200), primary_key=True),
    sa.Column("message_id", sa.String(200), primary_key=True),
    sa.Column("holds", sa.Integer, nullable=False),
    sa.Column("held_at", UTCDateTime, nullable=False),
)

# How many times a consumer started the handler of a *redelivered* message (a first
# delivery writes nothing here); the row goes once the message is applied or
# dead-lettered. A message whose handler kills the process is never settled: its
# starts, not the transport's delivery count (which also grows for messages that
# were only prefetched when the process died), are what max_deliveries limits.
inbox_starts = sa.Table(
    "accord_inbox_starts",
    metadata,
    sa.Column("consumer", sa.String(200), primary_key=True),
    sa.Column("message_id", sa.String(200), primary_key=True),
    sa.Column("starts", sa.Integer, nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=False),
)

# Messages a consumer gave up on, with the reason; replayable. ``status`` is
# DEAD, or REPLAY once an operator asked for a replay: the running consumer of
# that name picks REPLAY rows (``available_at`` due) up and dispatches them again.
# ``kind`` says why: undecodable, unknown_type, invalid_data, handler_failed or
# delivery_limit.
dead_letters = sa.Table(
    "accord_dead_letters",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("consumer", sa.String(200), nullable=False),
    sa.Column("message_id", sa.String(200), nullable=True),
    sa.Column("message_type", sa.String(200), nullable=True),
    sa.Column("headers", JSONType, nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("kind", sa.String(20), nullable=False, server_default="handler_failed"),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("status", sa.String(10), nullable=False, server_default="DEAD"),
    sa.Column("available_at", UTCDateTime, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=True),
    sa.Index("ix_accord_dead_letters_consumer", "consumer", "id"),
    sa.Index("ix_accord_dead_letters_status", "status", "consumer", "available_at"),
    # Dead-lettering a message looks for its earlier letter: one probe, not a read
    # of every letter of the consumer (quadratic in a storm of poison messages).
    sa.Index("ix_accord_dead_letters_message", "consumer", "message_id", "status"),
    # A consumer takes its due replays in id order, straight off this index.
    sa.Index("ix_accord_dead_letters_replay", "consumer", "status", "id"),
)

# The broker-less SQL transport (accord.transports.sql): one row per published
# message, one delivery row per (consumer group, message) so every group gets
# every message. A message row goes once its last delivery is settled.
queue = sa.Table(
    "accord_queue",
    metadata,
    sa.Column("seq", BigId, primary_key=True, autoincrement=True),
    sa.Column("channel", sa.String(200), nullable=False),
    sa.Column("message_id", sa.String(200), nullable=False),
    sa.Column("type", sa.String(200), nullable=False),
    sa.Column("key", sa.String(200), nullable=True),
    sa.Column("headers", JSONType, nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    # A message id published twice while its row exists is stored once.
    sa.UniqueConstraint("channel", "message_id", name="uq_accord_queue_message"),
    sa.Index("ix_accord_queue_channel", "channel", "seq"),
    # SQLite reuses the highest rowid once its row is deleted; deliveries are named by
    # seq, so a settle that comes late must never meet a newer message under it.
    sqlite_autoincrement=True,
)

# A consumer group, registered durably on first subscribe; ``patterns`` is the
# JSON list of topic patterns (the union of every subscribe's topics).
queue_groups = sa.Table(
    "accord_queue_groups",
    metadata,
    sa.Column("channel", sa.String(200), primary_key=True),
    sa.Column("group_name", sa.String(200), primary_key=True),
    sa.Column("patterns", JSONType, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

# ``attempts`` counts claims so far; ``key`` is copied from the message so the
# claim can hold back a delivery while an earlier one with the same key is out.
queue_deliveries = sa.Table(
    "accord_queue_deliveries",
    metadata,
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("group_name", sa.String(200), primary_key=True),
    sa.Column("channel", sa.String(200), nullable=False),
    sa.Column("key", sa.String(200), nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("available_at", UTCDateTime, nullable=False),
    sa.Column("locked_until", UTCDateTime, nullable=True),
    sa.Column("locked_by", sa.String(100), nullable=True),
    sa.Index("ix_accord_queue_deliveries_ready", "channel", "group_name", "seq"),
    sa.Index(
        "ix_accord_queue_deliveries_key",
        "channel",
        "group_name",
        "key",
        "seq",
        postgresql_where=sa.text("key IS NOT NULL"),
        sqlite_where=sa.text("key IS NOT NULL"),
    ),
    sa.Index(
        "ix_accord_queue_deliveries_locked",
        "locked_by",
        postgresql_where=sa.text("locked_by IS NOT NULL"),
        sqlite_where=sa.text("locked_by IS NOT NULL"),
    ),
)
