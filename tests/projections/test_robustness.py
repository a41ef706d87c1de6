"""The projection runner and the event store through faults: a failed read-ahead, a
handler's own OSError, an event this code cannot decode, concurrent replays of a
parked event, rebuilds that need upcasters, and a lost append race inside the
caller's transaction.

Every test runs against a real database (a SQLite file or a fresh PostgreSQL
database from tests/conftest.py). Only ``test_runner_recovers_from_a_failed_read_ahead``
injects a fault, and only one: a single transient ``DatabaseError`` from one read of a
real SQLite store (a dropped connection on PostgreSQL looks the same to the runner).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import Result
from typer.testing import CliRunner

from accord.cli.app import _register_subcommands, app
from accord.db import Database
from accord.errors import DatabaseError
from accord.eventstore import EventStore, NewEvent, RecordedEvent, Upcasters
from accord.eventstore._sqlite import SqliteEventStore
from accord.projections import (
    Projection,
    ProjectionContext,
    ProjectionRunner,
    list_parked,
    projection_status,
    replay_parked,
)
from accord.testing import wait_for

_register_subcommands()


async def _invoke(args: list[str]) -> Result:
    # Each CLI command runs its own event loop: give it a thread.
    return await asyncio.to_thread(CliRunner().invoke, app, args)


def _seen_projection(name: str, **kwargs: Any) -> Projection:
    """A projection that records the position of every event it applies."""
    p = Projection(name, **kwargs)
    p.table("seen", sa.Column("position", sa.BigInteger, primary_key=True))
    return p


async def _seen(database: Database, projection: Projection) -> list[int]:
    async with database.transaction() as conn:
        await projection.create_tables(conn, await projection.live_version(conn))
        tables = await projection.live_tables(conn)
        return sorted(r[0] for r in await conn.execute(sa.select(tables["seen"].c.position)))


# --- a failed read-ahead is read again, not awaited for ever ---------------------


class _FlakyReadAhead(SqliteEventStore):
    """A real SQLite store whose second read (the runner's read-ahead) fails once."""

    reads = 0

    async def _read_all(self, after: int, limit: int, types: Any, conn: Any) -> Any:
        self.reads += 1
        if self.reads == 2:
            raise DatabaseError("reading all events failed: connection reset (transient)")
        return await super()._read_all(after, limit, types, conn)


async def test_runner_recovers_from_a_failed_read_ahead(sqlite_url: str) -> None:
    """A read-ahead that failed once (a dropped connection) is not awaited again: the
    runner reads afresh and applies every event (before, it awaited the same failed
    task for ever while renewing its lease, and the projection never moved)."""
    async with Database(sqlite_url) as database:
        store = _FlakyReadAhead(database)
        for i in range(5):
            await store.append(f"s{i}", [NewEvent("thing.happened", {"i": i})])
        p = _seen_projection("readahead", batch_size=2)

        @p.on("thing.happened")
        def on_thing(ctx: ProjectionContext, event: RecordedEvent) -> None:
            ctx.insert("seen", {"position": event.position})

        runner = ProjectionRunner(database, [p], store=store, lease_ttl=3, poll_interval=0.05)
        await runner.start()
        try:

            async def all_applied() -> bool:
                return len(await _seen(database, p)) == 5

            try:
                await wait_for(all_applied, 6)
            except TimeoutError:
                pytest.fail(
                    f"runner stuck after one transient read-ahead failure: applied "
                    f"{await _seen(database, p)} of 5, store reads={store.reads} "
                    "(it never reads again)"
                )
        finally:
            await runner.stop()


# --- a handler's own OSError is the handler's failure ------------------------------


async def test_handler_oserror_is_parked_not_retried_for_ever(sqlite_url: str) -> None:
    """An OSError a *handler* raises (FileNotFoundError, its own asyncio.timeout) is
    the handler's failure, not a database outage: the event is parked and the rest
    are applied (before, the batch was retried for ever)."""
    async with Database(sqlite_url) as database:
        store = EventStore(database)
        await store.append("a", [NewEvent("doc.added", {"path": None})])
        bad = await store.append("b", [NewEvent("doc.added", {"path": "/nonexistent/x.tmpl"})])
        await store.append("c", [NewEvent("doc.added", {"path": None})])
        p = _seen_projection("docs", max_retries=1, retry_base=0.01)

        @p.on("doc.added")
        def on_doc(ctx: ProjectionContext, event: RecordedEvent) -> None:
            if event.data["path"]:
                with open(event.data["path"]) as f:  # deterministic poison: file missing
                    f.read()
            ctx.insert("seen", {"position": event.position})

        runner = ProjectionRunner(database, [p], store=store, lease_ttl=3, poll_interval=0.05)
        await runner.start()
        try:

            async def parked() -> list[Any]:
                return await list_parked(database, "docs")

            try:
                found = await wait_for(parked, 6)
            except TimeoutError:
                pytest.fail(
                    "a handler raising FileNotFoundError was never parked: the runner retries "
                    f"it for ever as a database outage; applied so far: {await _seen(database, p)}"
                )
            assert [x.position for x in found] == [bad.position]

            # The event after the parked one is applied in a batch of its own, which
            # may not have committed yet when the parked row shows.
            async def the_others() -> list[int]:
                seen = await _seen(database, p)
                return seen if len(seen) == 2 else []

            assert bad.position not in await wait_for(the_others, 6)
        finally:
            await runner.stop()
            await store.close()


# --- an undecodable event stops its projection, with the reason --------------------


async def test_undecodable_event_is_reported_not_silently_fatal(sqlite_url: str) -> None:
    """An event this code cannot decode (written by newer code) stops its projection
    with the error recorded, and the lease is released for a runner that can read it;
    before, the task died in silence with run() still running."""
    up = Upcasters()

    @up.register("profile.set", 1)
    def v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "lang": "en"}

    async with Database(sqlite_url) as database:
        store = EventStore(database, up)
        await store.append("p1", [NewEvent("profile.set", {"n": 1})])
        # A newer deployment already writes schema v3 of the same type (its upcasters
        # read up to v3; this store's would refuse to write what they cannot read).
        async with EventStore(database) as newer:
            await newer.append("p2", [NewEvent("profile.set", {"n": 2}, schema_version=3)])
        p = _seen_projection("profiles")

        @p.on("profile.set")
        def on_profile(ctx: ProjectionContext, event: RecordedEvent) -> None:
            ctx.insert("seen", {"position": event.position})

        runner = ProjectionRunner(database, [p], store=store, lease_ttl=3, poll_interval=0.05)
        await runner.start()
        task = runner._tasks[0]
        try:

            async def reported() -> bool:
                [status] = await projection_status(database, [p], store=store)
                return "profiles" in runner.errors or status.state == "stopped" or status.parked

            try:
                await wait_for(reported, 4)
            except TimeoutError:
                died = task.done() and not task.cancelled() and task.exception()
                pytest.fail(
                    "an undecodable event was neither parked nor reported: runner.errors="
                    f"{runner.errors}, projection task died with {died!r}"
                )
        finally:
            await runner.stop()
            await store.close()


# --- two concurrent replays of a parked event apply it once ----------------------


@pytest.mark.postgres
async def test_concurrent_replays_apply_a_parked_event_once(pg_url: str) -> None:
    """Two replays of the same parked event at once (two operators, a retried CLI):
    the row is claimed in the handler's transaction, so the second waits for the first
    and then finds it replayed; the handler's writes happen once."""
    state = {"fail": True, "calls": 0}
    entered = asyncio.Event()
    gate = asyncio.Event()
    p = Projection("replay", max_retries=0, retry_base=0.01)
    p.table(
        "log",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("position", sa.BigInteger, nullable=False),
    )

    @p.on("order.placed")
    async def on_order(ctx: ProjectionContext, event: RecordedEvent) -> None:
        if state["fail"]:
            raise ValueError("bug in the handler")
        state["calls"] += 1
        if state["calls"] == 1:
            entered.set()
            await gate.wait()  # the first replay is slow (a big handler, a slow disk...)
        await ctx.execute(ctx.table("log").insert().values(position=event.position))

    async with Database(pg_url) as database:
        store = EventStore(database)
        try:
            placed = await store.append("o1", [NewEvent("order.placed", {"total": 10})])

            async def visible() -> bool:
                return await store.head() >= placed.position

            await wait_for(visible, 20)
            runner = ProjectionRunner(database, [p], store=store)
            while await runner.run_once():
                pass
            assert [x.position for x in await list_parked(database, "replay")] == [placed.position]
            state["fail"] = False  # the handler is fixed; operators replay
            first = asyncio.create_task(replay_parked(database, p, store=store))
            await wait_for(entered.is_set, 10)
            racing = asyncio.create_task(replay_parked(database, p, store=store))

            async def waits_for_the_first() -> bool:
                async with database.connect() as conn:
                    waiting = await conn.scalar(
                        sa.text(
                            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = "
                            "'Lock' AND datname = current_database()"
                        )
                    )
                return bool(waiting)

            await wait_for(waits_for_the_first, 10, interval=0.02)
            gate.set()
            first_outcomes = await first
            second = await racing
            async with database.connect() as conn:
                log = [
                    r[0]
                    for r in await conn.execute(
                        sa.select((await p.live_tables(conn))["log"].c.position)
                    )
                ]
            assert log == [placed.position], (
                f"parked event applied {len(log)} times; outcomes {first_outcomes} / {second}"
            )
        finally:
            gate.set()
            await store.close()


# --- `accord projections rebuild --upcasters` ----------------------------------

UPCASTERS = Upcasters()


@UPCASTERS.register("player.named", 1)
def _name_to_title(data: dict[str, Any]) -> dict[str, Any]:
    return {"title": data["name"]}


def make_titles() -> Projection:
    p = Projection("titles", max_retries=0, retry_base=0.01)
    p.table(
        "people",
        sa.Column("player", sa.String(50), primary_key=True),
        sa.Column("title", sa.String(50), nullable=False),
    )

    @p.on("player.named")
    def named(ctx: ProjectionContext, event: RecordedEvent) -> None:
        ctx.upsert(
            "people", {"player": event.stream_id, "title": event.data["title"]}, key=["player"]
        )

    return p


def cli_projections() -> list[Projection]:
    """What the rebuild CLI loads (--app tests.projections.test_robustness:cli_projections)."""
    return [make_titles()]


async def _people(database: Database, projection: Projection) -> dict[str, str]:
    async with database.connect() as conn:
        tables = await projection.live_tables(conn)
        return {r.player: r.title for r in await conn.execute(sa.select(tables["people"]))}


async def test_cli_rebuild_gives_handlers_the_same_upcast_events_as_the_runner(
    sqlite_url: str,
) -> None:
    """`accord projections rebuild --upcasters module:attr` builds the new version from
    events upcast as the live runner's store gives them, so the rebuilt read model is
    the live one (without it, v1 events reached handlers written for v2 and were
    parked, and their rows lost)."""
    async with Database(sqlite_url) as database:
        store = EventStore(database, UPCASTERS)
        await store.append("ann", [NewEvent("player.named", {"name": "Ann"}, schema_version=1)])
        await store.append("bob", [NewEvent("player.named", {"title": "Bob"})])  # v2
        titles = make_titles()
        runner = ProjectionRunner(database, [titles], store=store)
        while await runner.run_once():
            pass
        live = await _people(database, titles)
        assert live == {"ann": "Ann", "bob": "Bob"}
        assert await list_parked(database, "titles") == []

        out = await _invoke(
            [
                "projections",
                "rebuild",
                "titles",
                "--db",
                sqlite_url,
                "--app",
                "tests.projections.test_robustness:cli_projections",
                "--upcasters",
                "tests.projections.test_robustness:UPCASTERS",
                "--json",
            ]
        )
        assert out.exit_code == 0, out.output
        assert json.loads(out.output)["version"] == 2
        rebuilt = await _people(database, make_titles())
        parked = [x.error for x in await list_parked(database, "titles")]
        assert rebuilt == live, f"rebuilt read model {rebuilt} != live {live}; parked {parked}"
        await store.close()


# --- PostgreSQL: a lost append race leaves the caller's transaction usable ---------


@pytest.mark.postgres
async def test_pg_version_conflict_keeps_callers_transaction_usable(pg_url: str) -> None:
    """On PostgreSQL, losing an exact-version race inside the caller's transaction
    raises ConcurrencyError and leaves that transaction usable (a savepoint), as on
    SQLite; before, the unique violation aborted the caller's whole transaction."""
    from accord.errors import ConcurrencyError

    async with Database(pg_url) as database:
        store = EventStore(database)
        try:
            first_in = asyncio.Event()
            release = asyncio.Event()

            async def winner() -> None:
                async with database.transaction() as conn:
                    await store.append("race", [NewEvent("a")], expected_version=0, conn=conn)
                    first_in.set()
                    await release.wait()

            task = asyncio.create_task(winner())
            await first_in.wait()
            async with database.transaction() as conn:
                loser = asyncio.create_task(
                    store.append("race", [NewEvent("b")], expected_version=0, conn=conn)
                )
                await asyncio.sleep(0.3)  # blocked on the winner's uncommitted version 1
                release.set()
                await task
                with pytest.raises(ConcurrencyError):
                    await loser
                # The caller handles the conflict and carries on in its transaction:
                await store.append("other-stream", [NewEvent("c")], conn=conn)
            assert await store.stream_version("other-stream") == 1
        finally:
            release.set()
            await store.close()
