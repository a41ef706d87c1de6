"""``accord sagas list|show|retry|abort`` and ``accord flows show|stalled``, on both databases."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from typer.testing import CliRunner

from accord.cli.app import _register_subcommands, app
from accord.db import Database
from accord.messages import Message
from accord.sagas import Orchestrator, SagaAdmin
from accord.sagas._flows import FlowTracker
from accord.transports.sql import SqlTransport
from tests.sagas import app as trip_app
from tests.sagas.test_replies import Captured, reply

_register_subcommands()
runner = CliRunner()
LATER = datetime.now(UTC) + timedelta(days=1)


def accord(*args: str) -> Any:
    result = runner.invoke(app, list(args))
    return result


def orchestrator(database: Database) -> Orchestrator:
    transport = SqlTransport(database.url, channel=f"cli-{uuid.uuid4().hex[:8]}")
    return Orchestrator(database, transport, [trip_app.make_trip()], name="orch")


async def make_many_stuck(url: str, count: int) -> tuple[list[str], str]:
    """``count`` sagas STUCK compensating their local step 0, and one still running."""
    async with Database(url) as database:
        await trip_app.create_tables(database)
        orch = orchestrator(database)
        await trip_app.set_outage(database, 0, True)
        stuck = [await orch.start("trip", {}) for _ in range(count)]
        for saga_id in stuck:
            await orch.consumer.handle(Captured(reply(saga_id, 1, ok=False)))
        for _ in range(4):
            await orch.fire_due(LATER)
        running = await orch.start("trip", {})
        await trip_app.set_outage(database, 0, False)
    return stuck, running


async def make_stuck(url: str) -> tuple[str, str]:
    """A saga STUCK compensating its local step 0, and one waiting at step 1."""
    stuck, running = await make_many_stuck(url, 1)
    return stuck[0], running


async def drive(url: str) -> None:
    """One timer round far in the future: the orchestrator carries out operators' requests."""
    async with Database(url) as database:
        await orchestrator(database).fire_due(LATER)


def test_list_show_retry_abort(db_url: str) -> None:
    stuck, running = asyncio.run(make_stuck(db_url))

    listed = accord("sagas", "list", "--db", db_url, "--status", "STUCK", "--json")
    assert listed.exit_code == 0, listed.output
    document = json.loads(listed.output)
    assert [s["id"] for s in document["sagas"]] == [stuck]
    assert document["counts"] == {"STUCK": 1, "RUNNING": 1}
    table = accord("sagas", "list", "--db", db_url)
    assert table.exit_code == 0 and "STUCK" in table.output
    assert running in table.output and stuck in table.output  # whole, at 80 columns

    shown = accord("sagas", "show", stuck, "--db", db_url, "--json")
    steps = json.loads(shown.output)["steps"]
    assert [e["event"] for e in steps][-2:] == ["failed", "stuck"]
    assert "release_seat" not in shown.output  # the reason is the error, not a traceback
    assert "seat service flaky" in json.loads(shown.output)["error"]
    timeline = accord("sagas", "show", stuck, "--db", db_url)
    assert timeline.exit_code == 0 and "Timeline" in timeline.output and "stuck" in timeline.output

    assert accord("sagas", "retry", running, "--db", db_url).exit_code == 1  # not STUCK
    retried = accord("sagas", "retry", stuck, "--db", db_url, "--json")
    assert retried.exit_code == 0
    assert [s["status"] for s in json.loads(retried.output)["resumed"]] == ["COMPENSATING"]
    aborted = accord("sagas", "abort", running, "--db", db_url, "--reason", "fraud")
    assert aborted.exit_code == 0, aborted.output
    asyncio.run(drive(db_url))

    after = json.loads(accord("sagas", "list", "--db", db_url, "--json").output)
    assert after["counts"] == {"COMPENSATED": 1, "COMPENSATING": 1}
    events = [
        e["event"]
        for e in json.loads(accord("sagas", "show", running, "--db", db_url, "--json").output)[
            "steps"
        ]
    ]
    assert "abort_requested" in events and "aborted" in events
    missing = accord("sagas", "show", "nope", "--db", db_url)
    assert missing.exit_code == 1 and "no saga 'nope'" in missing.output


def test_retry_many_stuck_sagas_at_once(db_url: str) -> None:
    stuck, running = asyncio.run(make_many_stuck(db_url, 3))
    counts = json.loads(accord("sagas", "list", "--db", db_url, "--json").output)["counts"]
    assert counts == {"STUCK": 3, "RUNNING": 1}

    # Named ids: the STUCK one is resumed, the running one is reported and fails the command.
    mixed = accord("sagas", "retry", stuck[0], running, stuck[0], "--db", db_url, "--json")
    assert mixed.exit_code == 1
    document = json.loads(mixed.output)
    assert [s["id"] for s in document["resumed"]] == [stuck[0]]
    assert [f["id"] for f in document["failed"]] == [running]
    assert "RUNNING: only a STUCK saga can be retried" in document["failed"][0]["error"]

    # --all resumes every STUCK saga left (and only those); --name filters by saga.
    other = accord("sagas", "retry", "--all", "--name", "no-such-saga", "--db", db_url, "--json")
    assert other.exit_code == 0 and json.loads(other.output) == {"resumed": [], "failed": []}
    every = accord("sagas", "retry", "--all", "--name", "trip", "--db", db_url, "--json")
    assert every.exit_code == 0, every.output
    resumed = json.loads(every.output)["resumed"]
    assert sorted(s["id"] for s in resumed) == sorted(stuck[1:])
    assert {s["status"] for s in resumed} == {"COMPENSATING"}
    assert "0 saga(s) resumed" in accord("sagas", "retry", "--all", "--db", db_url).output

    # The orchestrator carries them on: the outage is over, so compensation completes.
    asyncio.run(drive(db_url))
    listed = json.loads(accord("sagas", "list", "--db", db_url, "--json").output)["sagas"]
    assert {s["id"]: s["status"] for s in listed if s["id"] in stuck} == dict.fromkeys(
        stuck, "COMPENSATED"
    )


def test_retry_needs_ids_or_all(db_url: str) -> None:
    neither = accord("sagas", "retry", "--db", db_url)
    assert neither.exit_code == 2 and "--all" in neither.output
    both = accord("sagas", "retry", "some-id", "--all", "--db", db_url)
    assert both.exit_code == 2 and "not both" in both.output
    name_with_ids = accord("sagas", "retry", "some-id", "--name", "trip", "--db", db_url)
    assert name_with_ids.exit_code == 2 and "--name" in name_with_ids.output


async def record_flow(url: str, source: str = "cars", error: str = "no cars") -> str:
    """A choreographed flow's first message and a failure from ``source``, recorded by
    a flow tracker; returns its correlation id."""
    async with Database(url) as database:
        tracker = FlowTracker(database, SqlTransport(url, channel="unused"))
        correlation = str(uuid.uuid4())
        first = Message(
            type="trip.requested",
            correlationid=correlation,
            source="web",
            extensions={"flowstep": "trip.start", "flowoutcome": "next"},
        )
        failed = first.caused(
            "car.failed",
            {"error": error},
            source=source,
            extensions={"flowstep": "rent_car", "flowoutcome": "failed"},
        )
        for message in (first, failed):
            await tracker.consumer.handle(Captured(message))
    return correlation


def test_flows_show_and_stalled(db_url: str) -> None:
    correlation = asyncio.run(record_flow(db_url))
    shown = accord("flows", "show", correlation, "--db", db_url, "--json")
    assert shown.exit_code == 0, shown.output
    messages = json.loads(shown.output)["messages"]
    assert [(m["type"], m["source"], m["outcome"]) for m in messages] == [
        ("trip.requested", "web", "next"),
        ("car.failed", "cars", "failed"),
    ]
    assert messages[1]["error"] == "no cars"
    table = accord("flows", "show", correlation, "--db", db_url)
    assert "rent_car" in table.output and "no cars" in table.output
    stalled = json.loads(
        accord("flows", "stalled", "--db", db_url, "--older-than", "0", "--json").output
    )
    assert [f["correlation_id"] for f in stalled["stalled"]] == [correlation]
    assert "No flow stalled" in accord("flows", "stalled", "--db", db_url).output
    assert accord("flows", "show", "nope", "--db", db_url).exit_code == 1


def test_flows_prune_keeps_a_stalled_flow_unless_asked(db_url: str) -> None:
    """The recorded flow failed and never ended: pruning leaves it (it is what
    ``flows stalled`` reports) until --stalled is given; then it is gone whole."""
    correlation = asyncio.run(record_flow(db_url))
    kept = accord("flows", "prune", "--db", db_url, "--older-than-days", "0", "--json")
    assert kept.exit_code == 0, kept.output
    assert json.loads(kept.output) == {"pruned": 0, "older_than_days": 0.0, "stalled": False}
    assert accord("flows", "show", correlation, "--db", db_url).exit_code == 0
    gone = accord("flows", "prune", "--db", db_url, "--older-than-days", "0", "--stalled")
    assert gone.exit_code == 0 and "Pruned 1 flow(s)." in gone.output, gone.output
    assert accord("flows", "show", correlation, "--db", db_url).exit_code == 1
    bad = accord("flows", "prune", "--db", db_url, "--older-than-days", "-1")
    assert bad.exit_code == 2 and "not a duration" in bad.output


def test_sagas_prune_removes_ended_ones_and_a_late_reply_is_then_ignored(db_url: str) -> None:
    async def setup() -> tuple[str, str]:
        async with Database(db_url) as database:
            await trip_app.create_tables(database)
            orch = orchestrator(database)
            ended = await orch.start("trip", {})
            await orch.consumer.handle(Captured(reply(ended, 1, ok=False)))
            await orch.fire_due(LATER)
            assert (await SagaAdmin(database).get(ended)).status == "COMPENSATED"
            return ended, await orch.start("trip", {})

    ended, running = asyncio.run(setup())
    kept = accord("sagas", "prune", "--db", db_url, "--json")  # 30 days by default
    assert json.loads(kept.output) == {"pruned": 0, "older_than_days": 30.0, "name": None}
    pruned = accord("sagas", "prune", "--db", db_url, "--older-than-days", "0")
    assert pruned.exit_code == 0 and "Pruned 1 ended saga(s)." in pruned.output, pruned.output
    assert accord("sagas", "show", ended, "--db", db_url).exit_code == 1
    assert accord("sagas", "show", running, "--db", db_url).exit_code == 0

    async def late_reply() -> str | None:
        async with Database(db_url) as database:
            delivery = Captured(reply(ended, 1))
            await orchestrator(database).consumer.handle(delivery)
            return delivery.outcome

    assert asyncio.run(late_reply()) == "ack"


def test_retry_stuck_goes_oldest_first_and_leaves_alone_a_saga_no_longer_stuck(
    db_url: str,
) -> None:
    async def scenario() -> None:
        stuck, _running = await make_many_stuck(db_url, 3)
        async with Database(db_url) as database:
            admin = SagaAdmin(database)
            found = await admin.list(status="STUCK")
            oldest_first = [s.id for s in sorted(found, key=lambda s: (s.updated_at, s.id))]
            assert sorted(oldest_first) == sorted(stuck)
            seen: list[tuple[int, int]] = []

            async def another_operator_retries(saga_id: str) -> None:
                async with Database(db_url) as elsewhere:
                    await SagaAdmin(elsewhere).retry(saga_id)

            def progress(done: int, total: int) -> None:
                seen.append((done, total))
                if done == 1:  # meanwhile another operator retries the last one
                    other = threading.Thread(
                        target=asyncio.run, args=(another_operator_retries(oldest_first[-1]),)
                    )
                    other.start()
                    other.join()

            resumed = await admin.retry_stuck(on_progress=progress)
            assert [s.id for s in resumed] == oldest_first[:2]
            assert seen == [(1, 3), (2, 3), (3, 3)]
            assert {s.status for s in await admin.list()} == {"COMPENSATING", "RUNNING"}

    asyncio.run(scenario())


def test_sagas_prune_participations_deletes_a_participants_old_records(db_url: str) -> None:
    from accord.db.schema_sagas import participations
    from tests.sagas.test_replies import command

    async def setup() -> list[str]:
        async with Database(db_url) as database:
            await trip_app.create_tables(database)
            transport = SqlTransport(db_url, channel=f"c{uuid.uuid4().hex[:8]}")
            hotels, _ = trip_app.participant_consumers(database, transport, "cli")
            sagas = [str(uuid.uuid4()) for _ in range(3)]
            for saga_id in sagas:
                await hotels.handle(Captured(command(saga_id, "hotels.reserve", 1, "action")))
            async with database.transaction() as conn:
                await conn.execute(
                    participations.update()
                    .where(participations.c.saga_id.in_(sagas[:2]))
                    .values(at=datetime.now(UTC) - timedelta(days=31))
                )
            return sagas

    async def left() -> list[str]:
        async with Database(db_url) as database, database.connect() as conn:
            c = participations.c
            rows = await conn.scalars(sa.select(c.saga_id).where(c.saga_id != ""))
            return list(rows.all())

    sagas = asyncio.run(setup())
    other = accord(
        "sagas", "prune-participations", "--db", db_url, "--participant", "cli-cars", "--json"
    )
    assert other.exit_code == 0, other.output
    assert json.loads(other.output) == {
        "pruned": 0,
        "older_than_days": 30.0,
        "participant": "cli-cars",
    }
    pruned = accord("sagas", "prune-participations", "--db", db_url)  # 30 days by default
    assert pruned.exit_code == 0 and "Pruned 2 participant record(s)." in pruned.output
    assert asyncio.run(left()) == sagas[2:]
    helped = accord("sagas", "prune-participations", "--help")
    assert "records_retention" in helped.output and "--participant" in helped.output
