"""The projection runner: keeps projections up to date, one active runner per projection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from accord._aio import wait_event
from accord.db.database import Database
from accord.errors import AccordError, ConfigurationError, DatabaseError, DecodeError
from accord.eventstore import NOTIFY_CHANNEL, EventStore, RecordedEvent
from accord.projections import _state
from accord.projections._driver import (
    BatchDriver,
    LeaseLost,
    Paused,
    ProjectionStopped,
    Swapped,
)
from accord.projections._projection import Projection
from accord.projections._status import ProjectionStatus, caught_up, projection_status

__all__ = ["ProjectionRunner", "WaitTimeout"]

log = logging.getLogger("accord.projections")


class WaitTimeout(AccordError, TimeoutError):
    """:meth:`ProjectionRunner.wait_until` ran out of time."""


def _cancel(ahead: tuple[int, asyncio.Task[Any]] | None) -> None:
    """Drop a read-ahead that is no longer wanted."""
    if ahead is None:
        return
    task = ahead[1]
    if task.done():
        if not task.cancelled():
            task.exception()  # retrieved: a failed read-ahead is simply read again
    else:
        task.cancel()


def default_owner() -> str:
    """A name for this runner in the lease table: host, pid and a random tag."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class ProjectionRunner:
    """Runs projections from the event store (a worker component: ``run``/``stop``).

    For each projection it competes for a lease (``lease_ttl`` seconds, renewed every
    third of it); the holder reads the events the projection handles after its
    checkpoint, ``batch_size`` at a time, and commits each batch's read-model writes
    together with the checkpoint. Other runners wait and take over within
    ``lease_ttl`` (plus one poll) of the holder dying. A live-version swap made by a
    rebuild is followed at the next batch.
    """

    name = "projections"

    def __init__(
        self,
        database: Database,
        projections: Sequence[Projection],
        *,
        store: EventStore | None = None,
        lease_ttl: float = 10.0,
        poll_interval: float | None = None,
        owner: str | None = None,
    ) -> None:
        names = [p.name for p in projections]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"projection names must be unique, got {names}")
        if lease_ttl <= 0:
            raise ConfigurationError(f"lease_ttl must be > 0, got {lease_ttl}")
        self.database = database
        self.projections = list(projections)
        self.store = store or EventStore(database)
        self.lease_ttl = lease_ttl
        self.poll_interval = poll_interval or (0.5 if database.is_postgres else 0.1)
        self.owner = owner or default_owner()
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._unlisten: Callable[[], Any] | None = None
        self.errors: dict[str, str] = {}
        self._drivers: dict[str, BatchDriver] = {}

    # --- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Start one task per projection (idempotent)."""
        if self._tasks:
            return
        self._stopping.clear()
        if self.database.is_postgres:
            self._unlisten = await self.database.listen(NOTIFY_CHANNEL, self._on_notify)
        self._tasks = [asyncio.create_task(self._loop(p)) for p in self.projections]

    async def run(self) -> None:
        """Run until :meth:`stop`, or until cancelled: either way the batches in
        flight finish and the leases are given up before it returns."""
        try:
            await self.start()
            await self._stopping.wait()
        finally:
            # Cancelled, the loops would go on in their own tasks, holding the leases.
            await self.stop()

    async def stop(self) -> None:
        """Stop after the batches in flight, give the leases up, return."""
        self._stopping.set()
        self._wake.set()
        await self._join()

    async def _join(self) -> None:
        tasks, self._tasks = self._tasks, []
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._unlisten is not None:
            unlisten, self._unlisten = self._unlisten, None
            await unlisten()

    async def run_once(self) -> int:
        """One round without the background loop (for tests and scripts): for each
        projection whose lease this runner gets, apply one batch. Returns the number
        of events applied (parked ones included)."""
        applied = 0
        for projection in self.projections:
            if not await self._lease(projection.name):
                continue
            driver = await self._take_over(projection)
            events = await self.store.read_all(
                driver.position, limit=projection.batch_size, types=projection.event_types
            )
            if events:
                try:
                    await driver.apply_safely(events)
                except Paused:
                    continue
                applied += len(events)
                self._progress.set()
        return applied

    def _on_notify(self, _payload: str) -> None:
        self._wake.set()

    def wake(self) -> None:
        """Look for new events now instead of at the next poll."""
        self._wake.set()

    # --- one projection ----------------------------------------------------

    async def _loop(self, projection: Projection) -> None:
        lease = projection.name
        driver: BatchDriver | None = None
        renew_at = 0.0
        types = projection.event_types
        ahead: tuple[int, asyncio.Task[list[RecordedEvent]]] | None = None
        while not self._stopping.is_set():
            try:
                if driver is None or time.monotonic() >= renew_at:
                    held = await self._lease(lease)
                    renew_at = time.monotonic() + self.lease_ttl / 3
                    if not held:
                        driver = None
                        await self._sleep(min(self.poll_interval, self.lease_ttl / 3))
                        continue
                    if driver is None:
                        driver = await self._take_over(projection)
                if ahead is not None and ahead[0] == driver.position:
                    # Taken before it is awaited: a read-ahead that failed is not
                    # awaited again (it would raise the same error for ever).
                    task, ahead = ahead[1], None
                    events = await task
                else:
                    events = await self.store.read_all(
                        driver.position, limit=projection.batch_size, types=types
                    )
                _cancel(ahead)
                ahead = None
                if len(events) == projection.batch_size:
                    # Read the next batch while this one is applied (catch-up speed).
                    after = events[-1].position
                    ahead = (after, asyncio.create_task(self._read(after, projection)))
                if events:
                    await driver.apply_safely(events)
                    self._progress.set()
                    if len(events) == projection.batch_size:
                        continue
                else:
                    await driver.apply([])  # notices a swap even when idle
                await self._sleep(self.poll_interval)
            except Swapped:
                log.info("projection %s: a rebuild swapped in a new version", projection.name)
                driver = await self._take_over(projection)
            except Paused:
                await self._sleep(min(self.poll_interval, 0.05))
            except LeaseLost as exc:
                log.warning("%s", exc)
                driver = None
            except (ProjectionStopped, DecodeError) as exc:
                # A poison event (on_poison="stop"), or one this code cannot read
                # (written by newer code, an upcaster missing), which it will not read
                # later either: stop, say why, and leave the lease to another runner.
                message = str(exc)
                if isinstance(exc, DecodeError):
                    message = f"projection {projection.name!r} stopped: {exc}"
                    if driver is not None:  # on the checkpoint, as a poison stop is
                        await self._mark_stopped(projection.name, driver.version, message)
                log.error("%s", message)
                self.errors[projection.name] = message
                self._progress.set()
                _cancel(ahead)
                await self._release(lease)
                return
            except DatabaseError as exc:
                log.warning("projection %s: %s; retrying", projection.name, exc)
                await self._sleep(min(self.poll_interval * 4, self.lease_ttl / 3))
            except Exception:
                # A bug or an error nobody translated: never let it end this task in
                # silence while run() goes on; log it and try again.
                log.exception("projection %s: unexpected error; retrying", projection.name)
                _cancel(ahead)
                ahead = None
                await self._sleep(min(self.poll_interval * 4, self.lease_ttl / 3))
        _cancel(ahead)
        if driver is not None:
            await self._release(lease)

    async def _read(self, after: int, projection: Projection) -> list[RecordedEvent]:
        return await self.store.read_all(
            after, limit=projection.batch_size, types=projection.event_types
        )

    async def _sleep(self, seconds: float) -> None:
        await wait_event(self._wake, seconds)
        self._wake.clear()

    async def _lease(self, name: str) -> bool:
        async with self.database.transaction() as conn:
            return await _state.acquire_lease(conn, name, self.owner, self.lease_ttl)

    async def _mark_stopped(self, name: str, version: int, message: str) -> None:
        """Say on the checkpoint that ``name`` stopped and why: status, the CLI and
        ``wait_until`` (ProjectionStopped) read it there, in every process."""
        with contextlib.suppress(AccordError):
            async with self.database.transaction() as conn:
                await _state.set_state(conn, name, version, "stopped", message)

    async def _release(self, name: str) -> None:
        with contextlib.suppress(AccordError):
            async with self.database.transaction() as conn:
                await _state.release_lease(conn, name, self.owner)

    async def _take_over(self, projection: Projection) -> BatchDriver:
        """Prepare the live version (tables, checkpoint) and a driver at its checkpoint."""
        async with self.database.transaction() as conn:
            versions = await _state.ensure_versions(conn, projection.name)
            await projection.create_tables(conn, versions.live)
            checkpoint = await _state.ensure_checkpoint(conn, projection.name, versions.live)
            if checkpoint.state != "running":
                # A restart retries the event the projection stopped on.
                await _state.set_state(conn, projection.name, versions.live, "running", None)
        log.info(
            "projection %s: active on v%d from position %d (owner %s)",
            projection.name,
            versions.live,
            checkpoint.position,
            self.owner,
        )
        driver = BatchDriver(
            self.database,
            projection,
            versions.live,
            checkpoint.position,
            replaying=False,
            live=True,
        )
        self._drivers[projection.name] = driver
        return driver

    # --- reading the state -------------------------------------------------

    async def wait_until(
        self, position: int, timeout: float = 10.0, *, projections: Sequence[str] | None = None
    ) -> None:
        """Return once every projection (or those named) has applied every event it
        handles up to ``position`` (read-your-writes: pass the position an append
        returned). Raises :class:`WaitTimeout` after ``timeout`` seconds, or
        :class:`ProjectionStopped` if a projection stopped on a poison event.
        Works for any runner process, active or not: it reads the checkpoints."""
        wanted = [p for p in self.projections if projections is None or p.name in projections]
        if projections is not None and len(wanted) != len(set(projections)):
            raise ConfigurationError(f"unknown projection in {list(projections)}")
        deadline = time.monotonic() + timeout
        pending = list(wanted)
        pause = 0.01
        while True:
            still = []
            for p in pending:
                local = self._drivers.get(p.name)
                if local is not None and local.position >= position:
                    continue  # this runner applied it (no need to ask the database)
                done, stopped = await caught_up(self.database, self.store, p, position)
                if stopped:
                    raise ProjectionStopped(f"projection {p.name!r} is stopped: {stopped}")
                if not done:
                    still.append(p)
            pending = still
            if not pending:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout(
                    f"projections {[p.name for p in pending]} did not reach position {position} "
                    f"within {timeout}s; see `accord projections status` for their lag"
                )
            self._progress.clear()
            await wait_event(self._progress, min(left, pause))
            pause = min(pause * 2, 0.2)

    async def status(self) -> list[ProjectionStatus]:
        """Position, lag (events and seconds behind), lease and parked events of each."""
        return await projection_status(self.database, self.projections, store=self.store)
