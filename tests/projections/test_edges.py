"""Edges of the event store and projections: long projection names on PostgreSQL,
snapshots that would change a load, wrong argument types and sizes, upcasters that
return nothing, undecodable events in status, values JSONB cannot hold, and a rebuild
that fails."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import BaseModel

from accord.db import Database
from accord.errors import ConfigurationError, DecodeError
from accord.eventstore import (
    Aggregate,
    EventStore,
    NewEvent,
    RecordedEvent,
    Repository,
    Upcasters,
    applies,
)
from accord.projections import Projection, ProjectionContext, ProjectionRunner, rebuild
from accord.testing import wait_for

# --- 1. projection names PostgreSQL cannot hold ---------------------------------------


async def test_a_46_character_projection_name_runs_on_postgres(database: Database) -> None:
    """``Projection(name)`` accepts names of 1-200 characters (the bookkeeping columns
    hold 200), and the runner must then run it on either backend - or the definition
    be refused with ConfigurationError, naming the limit.

    The read-model tables are named ``<name>_<table>_v<n>`` verbatim; PostgreSQL
    identifiers hold 63 bytes, so ``tournament_player_ratings_by_season_and_region``
    (46 characters) with a table ``leaderboard_entries`` (69 characters in all)
    makes SQLAlchemy raise IdentifierError at ``create_tables``: ``_take_over`` raises
    DatabaseError, which ``ProjectionRunner._loop`` retries for ever (a warning every
    few seconds, the read model never built). SQLite runs the same projection."""
    name = "tournament_player_ratings_by_season_and_region"
    store = EventStore(database)
    try:
        try:
            p = Projection(name)
            p.table(
                "leaderboard_entries",
                sa.Column("player", sa.String(50), primary_key=True),
                sa.Column("points", sa.Integer, nullable=False),
            )
        except ConfigurationError:
            return  # refused up front: acceptable

        @p.on("score.changed")
        def changed(ctx: ProjectionContext, event: RecordedEvent) -> None:
            ctx.insert("leaderboard_entries", dict(event.data))

        runner = ProjectionRunner(database, [p], store=store, lease_ttl=5)
        await store.append("s", [NewEvent("score.changed", {"player": "a", "points": 2})])
        assert await runner.run_once() == 1
        async with database.connect() as conn:
            table = (await p.live_tables(conn))["leaderboard_entries"]
            rows = (await conn.execute(sa.select(table.c.player, table.c.points))).all()
        assert [tuple(r) for r in rows] == [("a", 2)]
    finally:
        await store.close()


# --- 2. snapshots change what a load returns ------------------------------------------


class Opened(BaseModel):
    at: datetime
    tag: str


class Box(Aggregate):
    snapshot_every = 2

    def __init__(self, id: str) -> None:
        super().__init__(id)
        self.opened_at: datetime | None = None
        self.tags: set[str] = set()

    def open(self, at: datetime, tag: str) -> None:
        self.record(Opened(at=at, tag=tag))

    @applies(Opened)
    def _opened(self, event: Opened) -> None:
        self.opened_at = event.at
        self.tags.add(event.tag)


async def test_a_snapshot_does_not_change_the_loaded_state(database: Database) -> None:
    """ "Snapshots never change what a load returns": an aggregate loaded through
    its snapshot equals the one rebuilt from its events (``load(as_of=...)`` skips
    the snapshot). The default ``snapshot_state`` dumps the state as JSON and
    ``restore_state`` sets the JSON values back as they are, so a ``datetime``
    comes back as a ``str`` and a ``set`` as a ``list`` (``box.tags.add`` then
    raises). Expected: the same state either way, or no snapshot taken (a
    warning) when the state does not survive the JSON round trip."""
    store = EventStore(database)
    repo = Repository(store, Box)
    try:
        box = repo.create("box-1")
        when = datetime(2024, 3, 1, 18, 15, tzinfo=UTC)
        box.open(when, "a")
        box.open(when, "b")
        await repo.save(box)
        from_snapshot = await repo.load("box-1")
        from_events = await repo.load("box-1", as_of=datetime.now(UTC))
        assert from_events.opened_at == when and from_events.tags == {"a", "b"}
        assert from_snapshot.opened_at == from_events.opened_at
        assert from_snapshot.tags == from_events.tags
    finally:
        await store.close()


# --- 3. expected_version of the wrong type ----------------------------------------------


@pytest.mark.parametrize("expected", [1.0, "1"])
async def test_an_expected_version_of_the_wrong_type_is_refused(
    database: Database, expected: Any
) -> None:
    """``expected_version`` is ANY, NO_STREAM, STREAM_EXISTS or an int >= 0; anything
    else is a ConfigurationError (as a negative int is), the same on both backends,
    with nothing written. Before the fix, SQLite raises ConcurrencyError ("expected version
    1.0") and PostgreSQL a bare KeyError from ``_APPEND_SQL[expected]``."""
    store = EventStore(database)
    try:
        await store.append("s", [NewEvent("x")])
        with pytest.raises(ConfigurationError):
            await store.append("s", [NewEvent("x")], expected_version=expected)
        assert await store.stream_version("s") == 1
    finally:
        await store.close()


# --- 4. an upcaster that returns no dict -----------------------------------------------


async def test_an_upcaster_returning_no_dict_is_a_decode_error(database: Database) -> None:
    """An upcaster takes the payload at version n and returns it at n + 1 (a dict).
    One that returns something else (None: it forgot ``return``) must fail the read
    like an upcaster that raises - DecodeError naming it - instead of handing every
    reader (aggregates, projections) an event whose ``data`` is None."""
    up = Upcasters()

    @up.register("thing", 1)
    def forgot_return(data: dict[str, Any]) -> dict[str, Any]:
        data["b"] = 1  # no return
        return None  # type: ignore[return-value]

    store = EventStore(database, up)
    try:
        await store.append("s", [NewEvent("thing", {"a": 1}, schema_version=1)])
        with pytest.raises(DecodeError):
            await store.read_stream("s")
        with pytest.raises(DecodeError):
            await store.read_all()
    finally:
        await store.close()


# --- 5. subscribe with batch_size=0 ----------------------------------------------------


async def test_subscribe_with_batch_size_zero_does_not_spin(database: Database) -> None:
    """``subscribe(batch_size=0)`` must either be refused (ConfigurationError) or
    deliver the events; today every read returns 0 events == batch_size, so the
    loop ``continue``s for ever without yielding or sleeping (a busy loop that
    starves the event loop's other tasks only between awaits, and never ends)."""
    store = EventStore(database)
    try:
        await store.append("s", [NewEvent("x")])

        async def first() -> Any:
            async for event in store.subscribe(0, batch_size=0):
                return event
            return None

        try:
            async with asyncio.timeout(3):
                event = await first()
        except ConfigurationError:
            return
        except TimeoutError:
            pytest.fail("subscribe(batch_size=0) neither refused nor delivered within 3 s")
        assert event is not None and event.type == "x"
    finally:
        await store.close()


# --- 6. a projection stopped by an event it cannot decode looks "running" -------------


def _things_behind_a_broken_upcaster() -> tuple[Upcasters, Projection]:
    """A projection of "thing" events, and upcasters whose v1 -> v2 always fails."""
    up = Upcasters()

    @up.register("thing", 1)
    def broken(data: dict[str, Any]) -> dict[str, Any]:
        raise KeyError("colour")

    p = Projection("things", batch_size=10)
    p.table("seen", sa.Column("position", sa.BigInteger, primary_key=True, autoincrement=False))

    @p.on("thing")
    def thing(ctx: ProjectionContext, event: RecordedEvent) -> None:
        ctx.insert("seen", {"position": event.position})

    return up, p


async def test_a_projection_stopped_on_an_undecodable_event_reports_it(
    database: Database,
) -> None:
    """When an event cannot be upcast (its upcaster raises, a link of the chain is
    missing, or it is newer than the code), ``ProjectionRunner._loop`` stops the
    projection on the DecodeError ("stop, say why") - but it only puts the reason in
    this process's ``runner.errors`` and releases the lease. The checkpoint keeps
    ``state='running'``, so ``wait_until`` waits its whole timeout and raises
    WaitTimeout (its docstring: ProjectionStopped "if a projection stopped"), and
    ``projection_status`` / ``accord projections status`` show it as running, with no
    error. Expected: the stop recorded on the checkpoint like ``on_poison="stop"``
    (``_state.set_state(..., "stopped", message)``), so both report it."""
    from accord.projections import ProjectionStopped, projection_status

    up, p = _things_behind_a_broken_upcaster()
    store = EventStore(database, up)
    runner = ProjectionRunner(database, [p], store=store, lease_ttl=5, poll_interval=0.05)
    try:
        result = await store.append("s", [NewEvent("thing", {"a": 1}, schema_version=1)])
        await runner.start()
        await wait_for(lambda: "things" in runner.errors, 10)
        [status] = await projection_status(database, ["things"])
        assert status.state == "stopped", status
        assert status.error and "colour" in status.error
        with pytest.raises(ProjectionStopped):
            await runner.wait_until(result.position, timeout=3)
    finally:
        await runner.stop()
        await store.close()


async def test_runner_status_survives_an_event_it_cannot_decode(database: Database) -> None:
    """``ProjectionRunner.status()`` must report a projection that is behind an event
    that cannot be upcast (that is when one needs it). ``_status._one`` computes
    ``seconds_behind`` with ``store.read_all(position, limit=1)`` on the runner's
    store, which upcasts - so the upcaster's DecodeError escapes and status() raises
    instead of returning the lag. Expected: status returned (the age from the raw
    ``recorded_at``, which needs no upcasting)."""
    up, p = _things_behind_a_broken_upcaster()
    store = EventStore(database, up)
    runner = ProjectionRunner(database, [p], store=store, lease_ttl=5)
    try:
        await store.append("s", [NewEvent("thing", {"a": 1}, schema_version=1)])
        with pytest.raises(DecodeError):
            await runner.run_once()
        [status] = await runner.status()
        assert status.events_behind == 1
    finally:
        await store.close()


# --- 7. an event payload that JSON/jsonb cannot hold ------------------------------------


@pytest.mark.parametrize("value", [float("nan"), "a\x00b"], ids=["nan", "nul"])
@pytest.mark.parametrize("in_transaction", [False, True])
async def test_a_payload_the_database_cannot_hold_is_a_value_error(
    database: Database, in_transaction: bool, value: Any
) -> None:
    """A payload the database cannot store as JSON (a NaN; on PostgreSQL also a string
    holding NUL, which jsonb refuses as ``\\u0000``) is the caller's error: either
    it is stored and reads back, or ``append`` raises ``ValueError`` ("a value cannot
    be stored", as ``translate_errors`` documents and SQLite's path does) with
    nothing written - never ``DatabaseError``, which callers and the worker loops
    treat as "the database is unavailable, retry" (a retry loop would retry it for
    ever). PostgreSQL's append serialises the payload itself (``json.dumps``, which
    writes the non-JSON token ``NaN``) and its driver/SQLAlchemy errors become
    DatabaseError."""
    store = EventStore(database)
    event = NewEvent("x", {"v": value})
    try:
        try:
            if in_transaction:
                async with database.transaction() as conn:
                    await store.append("s", [event], conn=conn)
            else:
                await store.append("s", [event])
        except ValueError:
            assert await store.stream_version("s") == 0
        else:
            [stored] = await store.read_stream("s")
            assert stored.data == {"v": value}
    finally:
        await store.close()


# --- 8. a failed rebuild still shows as running -----------------------------------------


async def test_a_failed_rebuild_is_not_reported_as_rebuilding(database: Database) -> None:
    """``projection_status(...).rebuilding`` is "the version a rebuild is filling".
    ``_prepare`` sets ``building_version`` on the pointer row and only the swap
    clears it: when the rebuild fails (here its handler stops on a poison event; a
    DecodeError, a lost lease or Ctrl-C do the same), the ``finally`` clears
    ``handoff_until`` but not ``building_version``, so ``accord projections status``
    reports v2 as being rebuilt - with its frozen ``rebuild_position`` - until the
    next rebuild. Expected: ``rebuilding`` None once the rebuild has ended."""
    from accord.projections import ProjectionStopped, projection_status
    from tests.projections import app

    store = EventStore(database)
    live = app.make_scores(batch_size=100)
    runner = ProjectionRunner(database, [live], store=store, lease_ttl=5)
    app.POISON["on"] = False
    try:
        await store.append("s", [NewEvent("score.changed", {"player": "a", "points": 1})])
        await store.append("s", [NewEvent("score.poison", {"x": 1})])
        while await runner.run_once():
            pass
        app.POISON["on"] = True  # the rebuild's (newer) handler fails on it
        with pytest.raises(ProjectionStopped):
            await rebuild(database, app.make_scores(on_poison="stop"), store=store)
        [status] = await projection_status(database, [live])
        assert status.live_version == 1
        assert status.rebuilding is None, status
    finally:
        app.POISON["on"] = True
        await store.close()
