"""CQRS projections: read models fed from the event store, exactly once, with measured lag.

- :class:`Projection` declares handlers per event type and the read-model tables it
  owns (one copy per version, suffixed ``_v<n>``; readers resolve the live one with
  :meth:`Projection.live_tables`).
- :class:`ProjectionRunner` (a worker component) feeds projections from
  ``EventStore.read_all`` in batches; each batch's writes and the checkpoint commit
  in one transaction, guarded by a compare-and-set on the checkpoint, so an event
  is applied exactly once even if the process is killed mid-batch. A lease row per
  projection makes one runner active; another takes over within ``lease_ttl``
  seconds of the holder dying.
- Lag is measured: :func:`projection_status` / ``accord projections status`` give
  the events behind the head and the age of the oldest unprocessed event.
- Read-your-writes: ``await runner.wait_until(append_result.position)``.
- Poison events: retried with backoff, then parked (:func:`list_parked`,
  :func:`replay_parked`) or the projection stops with its error in the status.
- :class:`TransportProjector` feeds a projection from a transport group instead
  (exactly once through the inbox table, as messages carry no global position).
- :func:`rebuild` fills a new version beside the live one from position 0 while
  writes go on, then swaps the version pointer atomically (``ctx.replaying`` is
  True meanwhile, so handlers can skip side effects).
"""

from accord.projections._driver import ProjectionStopped
from accord.projections._parked import ReplayOutcome, list_parked, replay_parked
from accord.projections._projection import Handler, OnPoison, Projection, ProjectionContext
from accord.projections._rebuild import Progress, RebuildRefused, RebuildResult, rebuild
from accord.projections._runner import ProjectionRunner, WaitTimeout
from accord.projections._state import Checkpoint, ParkedEvent
from accord.projections._status import ProjectionStatus, projection_status
from accord.projections._transport import TransportProjector, event_from_message

__all__ = [
    "Checkpoint",
    "Handler",
    "OnPoison",
    "ParkedEvent",
    "Progress",
    "Projection",
    "ProjectionContext",
    "ProjectionRunner",
    "ProjectionStatus",
    "ProjectionStopped",
    "RebuildRefused",
    "RebuildResult",
    "ReplayOutcome",
    "TransportProjector",
    "WaitTimeout",
    "event_from_message",
    "list_parked",
    "projection_status",
    "rebuild",
    "replay_parked",
]
