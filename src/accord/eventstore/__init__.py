"""Event sourcing: an append-only event store, aggregates, snapshots, upcasting.

The store
=========

``EventStore(database, upcasters=None)`` keeps every event in ``accord_events``.
Each stream (a string id) is a sequence of versions 1, 2, 3, ...; ``append``
checks the expected version atomically and raises
:class:`accord.errors.ConcurrencyError` (with ``.actual``) on a conflict.

The global order: ``position`` is itself the safe cursor
---------------------------------------------------------

Every event has an integer ``position``. **Following ``position`` is gap-safe
on every backend**: a reader that keeps calling
``read_all(after=<position of the last event it got>)`` (or uses
``subscribe(after=...)``) sees every event exactly once, in one total order,
even when transactions commit out of order. Positions only ever grow in the
order ``read_all`` returns them, so ``checkpoint >= p`` means "event ``p`` has
been processed" and ``store.head()`` is the highest position a reader can see.

Positions are **not dense** on PostgreSQL (they jump by large steps between
transactions): never compute "events behind" as ``head - checkpoint``; use
``await store.count(after=checkpoint)`` instead.

How it is made safe on PostgreSQL, without a table lock
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~

A sequence is not enough: a transaction can take position 10, stay open while
another one takes 11 and commits; a reader that sees 11 and moves its cursor
past 10 would miss 10 for ever.

So a position is made of the writing transaction's id and the event's index
inside that transaction::

    position = pg_current_xact_id() * 2**20 + index_in_transaction

and a reader only sees positions of transactions that have *finished*::

    position < pg_snapshot_xmin(pg_current_snapshot()) * 2**20

``pg_snapshot_xmin`` is the oldest transaction id still running; every
transaction below it has committed or aborted, and every transaction that may
still commit has an id at or above it, hence positions above everything a
reader could have seen. Writers never wait for one another (only two writers
of the *same stream* collide, on the unique ``(stream_id, version)``). One
transaction may append at most 2**20 (1,048,576) events.

Cost of this choice: ``xmin`` is **cluster-wide**. A long-running transaction
that has written anything - in any database of the same PostgreSQL server -
holds every reader back until it ends (readers wait; they never skip). Keep
transactions short, and watch ``pg_stat_activity`` for old ``backend_xid``.

On SQLite there is one writer at a time and commits happen in position order,
so ``position`` is a plain autoincrementing integer (dense, 1, 2, 3...).

Everything else
===============

- :class:`Aggregate`, :func:`applies`, :class:`Repository` (snapshot + tail,
  save with the expected version, time travel), :func:`retry_on_conflict`.
- :class:`Upcasters`: per event type, a chain v1 -> v2 -> v3 applied on every
  read path (stream reads, ``read_all``, ``subscribe``, aggregates).
"""

from accord.eventstore._aggregate import Aggregate, applies, event_type_name
from accord.eventstore._repository import Repository, retry_on_conflict
from accord.eventstore._store import NOTIFY_CHANNEL, EventStore, Snapshot, message_key
from accord.eventstore._types import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    AppendResult,
    ExpectedVersion,
    NewEvent,
    RecordedEvent,
)
from accord.eventstore._upcasting import Upcaster, Upcasters

__all__ = [
    "ANY",
    "NOTIFY_CHANNEL",
    "NO_STREAM",
    "STREAM_EXISTS",
    "Aggregate",
    "AppendResult",
    "EventStore",
    "ExpectedVersion",
    "NewEvent",
    "RecordedEvent",
    "Repository",
    "Snapshot",
    "Upcaster",
    "Upcasters",
    "applies",
    "event_type_name",
    "message_key",
    "retry_on_conflict",
]
