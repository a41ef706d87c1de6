"""Loading and saving aggregates: snapshot + tail, expected versions, time travel, retries."""

from __future__ import annotations

import asyncio
import copy
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection

from accord.errors import ConcurrencyError, ConfigurationError, NotFoundError
from accord.eventstore._aggregate import Aggregate, event_schema_version, event_type_name
from accord.eventstore._store import EventStore, Snapshot
from accord.eventstore._types import NO_STREAM, AppendResult

__all__ = ["Repository", "retry_on_conflict"]

log = logging.getLogger("accord.eventstore")

T = TypeVar("T", bound=Aggregate)
R = TypeVar("R")


class Repository(Generic[T]):
    """Loads and saves aggregates of one class from an :class:`EventStore`.

    The aggregate's id is its stream id. Loading uses the latest snapshot that
    fits the class (same ``snapshot_version``) and applies the events after
    it; a snapshot that does not fit, or fails to restore, is ignored and the
    aggregate is rebuilt from its events (which are upcast like on every read).

    Each event class must write the schema version the store's upcasters lift its
    type to (``__schema_version__``): one that does not is refused here and at
    :meth:`save`, since its events could never be loaded again.
    """

    def __init__(self, store: EventStore, aggregate_class: type[T]) -> None:
        self.store = store
        self.aggregate_class = aggregate_class
        self._check_schema_versions(entry[0] for entry in aggregate_class._handlers.values())

    def _check_schema_versions(self, event_classes: Iterable[type]) -> None:
        """Refuse an event class whose ``__schema_version__`` is not the latest its
        type's upcasters know: its events would be stored labelled with one version
        and shaped as another, and every later load would fail on them."""
        upcasters = self.store.upcasters
        known = upcasters.types()
        for cls in event_classes:
            name = event_type_name(cls)
            if name not in known:
                continue
            writes, latest = event_schema_version(cls), upcasters.latest(name)
            if writes != latest:
                raise ConfigurationError(
                    f"{cls.__qualname__} writes {name!r} as schema version {writes}, but the "
                    f"store's upcasters lift {name!r} to version {latest}: set "
                    f"`__schema_version__ = {latest}` on {cls.__qualname__} (its fields must be "
                    f"the version {latest} shape), or fix the upcasters"
                )

    def create(self, id: str) -> T:
        """A new, empty aggregate (version 0) to record the first events on."""
        return self.aggregate_class(id)

    async def load(
        self,
        id: str,
        *,
        version: int | None = None,
        as_of: datetime | None = None,
        conn: AsyncConnection | None = None,
    ) -> T:
        """The aggregate as it is now, or as it was at ``version`` or at time ``as_of``.

        Raises :class:`~accord.errors.NotFoundError` if it had no events (by then).
        """
        aggregate = self.aggregate_class(id)
        events = None
        if as_of is None:
            snapshot = await self.store.load_snapshot(id, conn=conn)
            if snapshot is not None and (version is None or snapshot.version <= version):
                if self._restore(aggregate, snapshot):
                    # Read from the snapshot's own version: the stream must have it. A
                    # snapshot beyond the stream (its events deleted, or taken of an
                    # aggregate whose save was rolled back) holds a state that never
                    # was, and its version would make every save a conflict.
                    events = await self.store.read_stream(
                        id, from_version=snapshot.version, to_version=version, conn=conn
                    )
                    if events and events[0].version == snapshot.version:
                        events = events[1:]
                    else:
                        log.warning(
                            "ignoring snapshot of %r at version %d: the stream has no "
                            "version %d; rebuilding from events",
                            id,
                            snapshot.version,
                            snapshot.version,
                        )
                        events = None
                if events is None:
                    aggregate = self.aggregate_class(id)
        if events is None:
            events = await self.store.read_stream(id, to_version=version, as_of=as_of, conn=conn)
        for event in events:
            aggregate._apply_recorded(event)
        if aggregate.version == 0:
            when = ""
            if version is not None:
                when = f" at version {version}"
            elif as_of is not None:
                when = f" as of {as_of}"
            raise NotFoundError(f"{self.aggregate_class.__name__} {id!r} has no events{when}")
        return aggregate

    def _restores_the_same(self, aggregate: T, state: dict[str, Any]) -> bool:
        """Whether loading through ``state`` gives the aggregate as it is: a snapshot
        must never change what a load returns (a datetime read back as text, a set as
        a list). One that would is not taken (logged), and loads replay the events."""
        probe = self.aggregate_class(aggregate.id)
        try:
            probe.restore_state(copy.deepcopy(state))
        except Exception:
            same = False
        else:
            same = _public(probe) == _public(aggregate)
        if not same:
            log.warning(
                "not snapshotting %s %r: its state does not come back the same from a "
                "snapshot (override snapshot_state/restore_state for its types)",
                type(aggregate).__name__,
                aggregate.id,
            )
        return same

    def _restore(self, aggregate: T, snapshot: Snapshot) -> bool:
        cls = self.aggregate_class
        if (
            snapshot.aggregate_type != cls.aggregate_type()
            or snapshot.schema_version != cls.snapshot_version
        ):
            log.info(
                "ignoring snapshot of %r (type %s v%s; code wants %s v%s): rebuilding from events",
                snapshot.stream_id,
                snapshot.aggregate_type,
                snapshot.schema_version,
                cls.aggregate_type(),
                cls.snapshot_version,
            )
            return False
        try:
            aggregate.restore_state(snapshot.state)
        except Exception as exc:
            log.warning(
                "snapshot of %r does not fit %s (%s): rebuilding",
                snapshot.stream_id,
                cls.__name__,
                exc,
            )
            return False
        aggregate.version = snapshot.version
        return True

    async def save(
        self,
        aggregate: T,
        *,
        conn: AsyncConnection | None = None,
        outbox: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> AppendResult | None:
        """Append the aggregate's pending events, expecting the version it was loaded at.

        Raises :class:`~accord.errors.ConcurrencyError` if someone else saved
        it in between. Takes a snapshot when the new version crosses a multiple
        of ``snapshot_every``. Returns None if nothing was pending.
        """
        pending = aggregate._pending
        if not pending:
            return None
        self._check_schema_versions({type(e) for e in pending})
        expected = aggregate.version
        result = await self.store.append(
            aggregate.id,
            aggregate._new_events(metadata or {}),
            expected_version=expected if expected > 0 else NO_STREAM,
            conn=conn,
            outbox=outbox,
        )
        aggregate._pending = []
        aggregate.version = result.version
        every = self.aggregate_class.snapshot_every
        if every and result.version // every > expected // every:
            if conn is not None:
                await self.snapshot(aggregate, conn=conn)  # the caller's transaction
            else:
                # The events are committed: the command succeeded. A snapshot is only
                # a shortcut for loading, so failing to take one must not say otherwise
                # (a caller that retried would apply the command twice).
                try:
                    await self.snapshot(aggregate)
                except Exception:
                    log.warning(
                        "saved %s at version %d, but could not snapshot it",
                        aggregate.id,
                        aggregate.version,
                        exc_info=True,
                    )
        return result

    async def snapshot(self, aggregate: T, *, conn: AsyncConnection | None = None) -> None:
        """Store a snapshot of ``aggregate`` at its current version now."""
        if aggregate._pending:
            raise ConfigurationError("save the aggregate before taking a snapshot of it")
        state = aggregate.snapshot_state()
        if not self._restores_the_same(aggregate, state):
            return
        await self.store.save_snapshot(
            Snapshot(
                stream_id=aggregate.id,
                aggregate_type=self.aggregate_class.aggregate_type(),
                version=aggregate.version,
                schema_version=self.aggregate_class.snapshot_version,
                state=state,
                created_at=datetime.now(UTC),
            ),
            conn=conn,
        )

    async def update(
        self, id: str, command: Callable[[T], Any], *, attempts: int = 5, create: bool = False
    ) -> T:
        """Load (or create), run ``command(aggregate)`` and save; on a concurrency
        conflict reload and run it again, up to ``attempts`` times."""

        async def once() -> T:
            try:
                aggregate = await self.load(id)
            except NotFoundError:
                if not create:
                    raise
                aggregate = self.create(id)
            outcome = command(aggregate)
            if asyncio.iscoroutine(outcome):
                await outcome
            await self.save(aggregate)
            return aggregate

        return await retry_on_conflict(once, attempts=attempts)


async def retry_on_conflict(
    command: Callable[[], Awaitable[R]], *, attempts: int = 5, backoff: float = 0.01
) -> R:
    """Run ``command()``; if it raises ConcurrencyError, run it again (it must reload
    its aggregate), with a short jittered backoff, up to ``attempts`` times in all."""
    if attempts < 1:
        raise ConfigurationError("retry_on_conflict needs attempts >= 1")
    for attempt in range(attempts):
        try:
            return await command()
        except ConcurrencyError:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(backoff * (2**attempt) * random.uniform(0.5, 1.5))
    raise AssertionError("unreachable")


def _public(aggregate: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(aggregate).items() if not k.startswith("_") and k != "version"}
