"""Saga tables: instances, their step log, durable deadlines, participants' replies, flows.

* ``accord_sagas``: one row per saga instance. ``phase``/``step``/``attempt``
  say where it is (running step 2, attempt 1; or compensating step 0);
  ``version`` is bumped by every transition, and a transition only commits if
  the version it read is still there (two replies racing cannot both win).
* ``accord_saga_steps``: the append-only step log, the saga's timeline.
* ``accord_deadlines``: at most one per saga: when a step times out or a retry
  is due. A timer claims due rows, so deadlines survive any restart. Each row
  names its saga, so a timer reads only its own sagas' due rows (a range of
  ``(saga_name, due_at)``) however many another service's orchestrator left.
* ``accord_saga_participations``: a participant's record of each (saga, step,
  phase) it handled, with the reply it sent (idempotency per saga step). Kept
  for the participant's ``records_retention``: pruning reads a range of its
  ``(participant, at)`` index of records (partial: not the marks), and leaves a row
  of saga ``''``, step -1 whose ``at`` is the time the participant's records were
  pruned up to.
* ``accord_flows``: every message a flow tracker saw, by correlation id.
* ``accord_flow_heads``: one row per flow, kept with its messages: how many, the
  last one, whether the flow ended and whether it is an orchestrated saga's.
  Stalled flows are a range of its ``(ended, orchestrated, last_at)`` index, and
  pruning finds old flows there.
"""

from __future__ import annotations

import sqlalchemy as sa

from accord.db.schema import metadata
from accord.db.types import BigId, JSONType, UTCDateTime

__all__ = [
    "deadlines",
    "flow_heads",
    "flows",
    "metadata",
    "participations",
    "saga_steps",
    "sagas",
]

sagas = sa.Table(
    "accord_sagas",
    metadata,
    sa.Column("id", sa.String(100), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    # RUNNING, COMPENSATING, COMPLETED, COMPENSATED, STUCK, ABORTED
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("phase", sa.String(20), nullable=False),  # "action" or "compensation"
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
    # Attempts are numbered on across an operator's retry (so that a late reply to
    # an old attempt is never mistaken for a new one); the retry budget counts from here.
    sa.Column("attempt_base", sa.Integer, nullable=False, server_default="0"),
    sa.Column("waiting", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("data", JSONType, nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    # Set by an operator's abort; the next transition of the instance carries it out.
    sa.Column("abort_reason", sa.Text, nullable=True),
    sa.Column("version", sa.Integer, nullable=False, server_default="1"),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("ended_at", UTCDateTime, nullable=True),
    sa.Index("ix_accord_sagas_status", "status", "updated_at"),
)

saga_steps = sa.Table(
    "accord_saga_steps",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("saga_id", sa.String(100), nullable=False),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("step_name", sa.String(200), nullable=False),
    sa.Column("phase", sa.String(20), nullable=False),
    # started, succeeded, failed, timed_out, retrying, compensated, stuck, ignored ...
    sa.Column("event", sa.String(20), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
    sa.Column("detail", sa.Text, nullable=True),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Index("ix_accord_saga_steps_saga", "saga_id", "id"),
)

deadlines = sa.Table(
    "accord_deadlines",
    metadata,
    sa.Column("saga_id", sa.String(100), primary_key=True),
    sa.Column("kind", sa.String(10), nullable=False),  # "timeout" or "retry"
    sa.Column("phase", sa.String(20), nullable=False),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("due_at", UTCDateTime, nullable=False),
    # The saga's name (its definition). NULL on rows an Accord older than schema
    # version 6 wrote: before the migration (whose saga was gone by then), or
    # after it, still running in a rolling upgrade.
    sa.Column("saga_name", sa.String(200), nullable=True),
    sa.Index("ix_accord_deadlines_name_due", "saga_name", "due_at"),
)

participations = sa.Table(
    "accord_saga_participations",
    metadata,
    sa.Column("participant", sa.String(200), primary_key=True),
    sa.Column("saga_id", sa.String(100), primary_key=True),
    sa.Column("step", sa.Integer, primary_key=True),
    sa.Column("phase", sa.String(20), primary_key=True),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("ok", sa.Boolean, nullable=False),
    sa.Column("result", JSONType, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("at", UTCDateTime, nullable=False),
    # Pruning's range: a participant's records, not its pruning marks (step -1).
    # Lookups by saga do not exclude the marks, so they cannot take it (an index led
    # by ``participant`` that they could take, they took, with no statistics, and
    # scanned every record of the participant).
    sa.Index(
        "ix_accord_saga_participations_prune",
        "participant",
        "at",
        postgresql_where=sa.text("step <> -1"),
        sqlite_where=sa.text("step <> -1"),
    ),
)

flows = sa.Table(
    "accord_flows",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("correlation_id", sa.String(200), nullable=False),
    sa.Column("message_id", sa.String(200), nullable=False),
    sa.Column("causation_id", sa.String(200), nullable=True),
    sa.Column("type", sa.String(200), nullable=False),
    sa.Column("source", sa.String(200), nullable=False),
    sa.Column("step", sa.String(200), nullable=True),
    # "next", "failed", "compensating", "completed", "compensated" (choreography);
    # "command", "ok", "failed" (an orchestrated saga's commands and replies); or NULL
    sa.Column("outcome", sa.String(20), nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("time", UTCDateTime, nullable=False),
    sa.Column("recorded_at", UTCDateTime, nullable=False),
    sa.Index("ix_accord_flows_correlation", "correlation_id", "id"),
    sa.Index("ix_accord_flows_recorded", "recorded_at"),
)

flow_heads = sa.Table(
    "accord_flow_heads",
    metadata,
    sa.Column("correlation_id", sa.String(200), primary_key=True),
    sa.Column("messages", sa.Integer, nullable=False),
    # The flow's latest message (highest accord_flows.id) and its type.
    sa.Column("last_id", BigId, nullable=False),
    sa.Column("last_type", sa.String(200), nullable=False),
    # When the tracker recorded its latest message (the stall clock).
    sa.Column("last_at", UTCDateTime, nullable=False),
    # A message said the flow completed or compensated.
    sa.Column("ended", sa.Boolean, nullable=False),
    # An orchestrated saga's command or reply was seen: its orchestrator ends it or
    # marks it STUCK, no message says so, and it is never reported as stalled.
    sa.Column("orchestrated", sa.Boolean, nullable=False),
    sa.Index("ix_accord_flow_heads_stall", "ended", "orchestrated", "last_at"),
)
