"""The flow tracker's head rows (``accord_flow_heads``): one per flow, written with
each recorded message. Stalled flows are read from them, pruning removes old flows
whole, and a database whose flows were recorded before the table gets it filled in.
On both databases."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accord.db import Database
from accord.db.migrations import MIGRATIONS
from accord.db.schema import schema_version
from accord.db.schema_sagas import flow_heads, flows, sagas
from accord.errors import ConfigurationError
from accord.messages import Message
from accord.sagas import Flows, FlowTracker
from accord.sagas._flows import COMMAND, ENDS
from accord.testing import CapturedDelivery
from accord.transports.sql import SqlTransport

LATER = timedelta(days=30)
OUTCOMES = [None, "next", "failed", "compensating", *ENDS, COMMAND]


def tracker_for(database: Database) -> FlowTracker:
    return FlowTracker(database, SqlTransport(database.url, channel="unused"), retention=None)


def message(correlation_id: str, kind: str, outcome: str | None) -> Message:
    extensions = {"flowoutcome": outcome} if outcome and outcome != COMMAND else {}
    if outcome == COMMAND:
        extensions = {"sagaid": correlation_id}
    return Message(type=kind, correlationid=correlation_id, extensions=extensions)


async def record(tracker: FlowTracker, messages: Sequence[Message]) -> None:
    for m in messages:
        delivery = CapturedDelivery(m)
        await tracker.consumer.handle(delivery)
        assert delivery.outcome == "ack", delivery.reason


async def expected_stalled(database: Database) -> list[tuple[str, str, int, datetime]]:
    """Stalled flows (at any age) worked out from the recorded messages themselves:
    never a message that ended the flow or made it an orchestrated saga; the last
    message's type, how many, the latest recording time."""
    async with database.connect() as conn:
        rows = (await conn.execute(sa.select(flows).order_by(flows.c.id))).all()
    by_flow: dict[str, list[sa.Row[tuple[object, ...]]]] = {}
    for row in rows:
        by_flow.setdefault(row.correlation_id, []).append(row)
    return sorted(
        (cid, group[-1].type, len(group), max(r.recorded_at for r in group))
        for cid, group in by_flow.items()
        if not any(r.outcome in (*ENDS, COMMAND) for r in group)
    )


def as_tuples(found: Sequence[object]) -> list[tuple[str, str, int, datetime]]:
    return sorted((f.correlation_id, f.last_type, f.messages, f.last_at) for f in found)  # type: ignore[attr-defined]


recordings = st.lists(
    st.tuples(st.integers(0, 4), st.sampled_from(OUTCOMES)), min_size=1, max_size=25
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=recordings)
async def test_stalled_flows_are_what_the_recorded_messages_say(
    db_url: str, steps: list[tuple[int, str | None]]
) -> None:
    """Any sequence of messages over a few flows: the stalled flows read from the head
    rows are those the messages themselves give (the old whole-table grouping), with
    the same last type, count and time; pruning with ``stalled`` then leaves nothing
    of them."""
    async with Database(db_url) as database:
        await database.upgrade()
        tracker = tracker_for(database)
        run = uuid.uuid4().hex[:6]
        await record(
            tracker,
            [
                message(f"{run}-{flow}", f"t{n}.{outcome}", outcome)
                for n, (flow, outcome) in enumerate(steps)
            ],
        )
        later = datetime.now(UTC) + LATER
        found = await Flows(database).stalled(timedelta(0), now=later)
        assert as_tuples(found) == await expected_stalled(database)
        assert await Flows(database).stalled(timedelta(hours=1)) == []  # all just recorded
        # A flow starts with a message of a saga: one of plain messages is none.
        flows_seen = {f"{run}-{flow}" for flow, outcome in steps if outcome is not None}
        assert await Flows(database).prune(timedelta(0), stalled=True, now=later) == len(flows_seen)
        async with database.connect() as conn:
            for table in (flows, flow_heads):
                assert await conn.scalar(sa.select(sa.func.count()).select_from(table)) == 0


async def test_ordinary_messages_are_no_flow_but_count_in_one_they_continue(
    database: Database,
) -> None:
    """With its default topics the tracker sees every message: an ordinary event (and
    what a consumer publishes from it) was a flow that never ended, reported stalled
    after five minutes for ever. It is not recorded; a plain message carrying a
    saga's correlation id is, in that saga's timeline."""
    await database.upgrade()
    tracker = tracker_for(database)
    plain = Message(type="match.recorded")
    follow_up = Message(type="points.awarded", correlationid=plain.id, causationid=plain.id)
    flow = uuid.uuid4().hex
    await record(
        tracker,
        [
            plain,
            follow_up,
            message(flow, "trip.requested", "next"),
            Message(type="email.sent", correlationid=flow),
        ],
    )
    assert await Flows(database).timeline(plain.id) == []
    assert [e.type for e in await Flows(database).timeline(flow)] == [
        "trip.requested",
        "email.sent",
    ]
    stalled = await Flows(database).stalled(timedelta(0), now=datetime.now(UTC) + LATER)
    assert [f.correlation_id for f in stalled] == [flow]


async def test_prune_takes_ended_flows_past_retention_and_keeps_the_rest(
    database: Database,
) -> None:
    """Pruning deletes the messages and head rows of ended flows recorded before the
    cutoff, a batch at a time; a flow that never ended stays (it is still reported
    as stalled) unless ``stalled`` is asked for, and a recent ended flow stays."""
    await database.upgrade()
    tracker = tracker_for(database)
    ended = [f"ended-{n}" for n in range(5)]
    for cid in ended:
        await record(tracker, [message(cid, "a", "next"), message(cid, "b", "completed")])
    await record(tracker, [message("orchestrated", "cmd", COMMAND)])
    await record(tracker, [message("open", "a", "next")])
    flows_ = Flows(database)
    later = datetime.now(UTC) + timedelta(days=8)
    assert await flows_.prune(timedelta(days=7), batch=2) == 0  # nothing old enough yet
    seen: list[int] = []
    assert await flows_.prune(timedelta(days=7), now=later, batch=2, on_batch=seen.append) == 6
    assert seen == [2, 4, 6, 6]  # so far, after each batch (the last one found none)
    assert await remaining(database) == {"open": 1}
    assert [f.correlation_id for f in await flows_.stalled(timedelta(days=7), now=later)] == [
        "open"
    ]
    assert await flows_.prune(timedelta(days=7), now=later, stalled=True) == 1
    assert await remaining(database) == {}


async def seed_saga(database: Database, saga_id: str, status: str) -> None:
    now = datetime.now(UTC)
    row = {"id": saga_id, "name": "trip", "status": status, "phase": "action", "step": 0}
    async with database.transaction() as conn:
        await conn.execute(sagas.insert().values(**row, data={}, created_at=now, updated_at=now))


def reply_to(saga_id: str) -> Message:
    """A participant's reply to an orchestrated saga's command (outcome "ok")."""
    data = {"saga_id": saga_id, "ok": True}
    return Message(type="trip.ask.reply", correlationid=saga_id, data=data)


async def test_an_orchestrated_sagas_flow_is_pruned_once_its_saga_ended_or_is_elsewhere(
    database: Database,
) -> None:
    """An orchestrated saga's flow never says it ended: it goes once its instance in
    this database ended, or when there is none here (its orchestrator keeps another
    database); a RUNNING or STUCK saga here keeps its timeline, old as it is."""
    await database.upgrade()
    tracker = tracker_for(database)
    for status in ("RUNNING", "STUCK", "COMPLETED", "COMPENSATED", "ABORTED"):
        await seed_saga(database, status.lower(), status)
    flows_here = ("running", "stuck", "completed", "compensated", "aborted", "elsewhere")
    for saga_id in flows_here:
        await record(tracker, [message(saga_id, "trip.ask", COMMAND), reply_to(saga_id)])
    later = datetime.now(UTC) + timedelta(days=8)
    assert await Flows(database).prune(timedelta(days=7), now=later) == 4
    assert await remaining(database) == {"running": 2, "stuck": 2}
    assert await Flows(database).stalled(timedelta(0), now=later) == []


async def test_a_reply_after_its_flow_was_pruned_is_not_a_stalled_flow(database: Database) -> None:
    """A step that waits longer than the retention (its saga's instance lives in the
    orchestrator's own database, not here): the flow is pruned meanwhile, and the
    reply that comes at last starts a new head row, of an orchestrated saga, so it
    is never reported as stalled."""
    await database.upgrade()
    tracker = tracker_for(database)
    await record(tracker, [message("slow", "trip.ask", COMMAND)])
    later = datetime.now(UTC) + timedelta(days=8)
    assert await Flows(database).prune(timedelta(days=7), now=later) == 1
    await record(tracker, [reply_to("slow")])
    assert await Flows(database).stalled(timedelta(0), now=later) == []
    assert await remaining(database) == {"slow": 1}


async def test_a_prune_refuses_a_batch_below_one(database: Database) -> None:
    """A batch of 0 would return 0 rows for ever, never fewer than the batch: the
    prune would loop without end."""
    with pytest.raises(ConfigurationError, match="batch must be at least 1, got 0"):
        await Flows(database).prune(timedelta(days=7), batch=0)


async def remaining(database: Database) -> dict[str, int]:
    """Messages left per flow; every flow left has its head row, and no head is left
    without its messages."""
    async with database.connect() as conn:
        counts = dict(
            (
                await conn.execute(
                    sa.select(flows.c.correlation_id, sa.func.count()).group_by(
                        flows.c.correlation_id
                    )
                )
            ).all()
        )
        heads = dict(
            (
                await conn.execute(sa.select(flow_heads.c.correlation_id, flow_heads.c.messages))
            ).all()
        )
    assert heads == counts
    return counts


async def test_a_tracker_round_prunes_with_its_retention(database: Database) -> None:
    await database.upgrade()
    tracker = FlowTracker(
        database, SqlTransport(database.url, channel="unused"), retention=timedelta(0)
    )
    await record(tracker, [message("done", "a", "completed"), message("open", "a", "next")])
    await asyncio.sleep(0.01)  # past a retention of 0 on a coarse clock
    stalled = await tracker.check()
    assert [f.correlation_id for f in stalled] == []  # stalled_after is five minutes
    assert await remaining(database) == {"open": 1}


@pytest.mark.postgres
async def test_trackers_recording_one_flow_at_once_keep_its_head_exact(pg_url: str) -> None:
    """Competing trackers record messages of one flow at the same time: the head row
    counts every message, names the latest as last and ends the flow once any message
    ended it, whatever order the transactions commit in."""
    async with Database(pg_url, pool_size=12) as database:
        await database.upgrade()
        trackers = [tracker_for(database) for _ in range(4)]
        messages = [message("busy", f"t{n}", "completed" if n == 17 else "next") for n in range(40)]
        await asyncio.gather(*(record(trackers[n % 4], [m]) for n, m in enumerate(messages)))
        assert await remaining(database) == {"busy": 40}
        async with database.connect() as conn:
            head = (await conn.execute(sa.select(flow_heads))).one()
            last = (
                await conn.execute(
                    sa.select(flows.c.id, flows.c.type).order_by(flows.c.id.desc()).limit(1)
                )
            ).one()
        assert (head.last_id, head.last_type, head.ended) == (last.id, last.type, True)


async def test_upgrade_from_version_6_fills_in_the_heads_of_recorded_flows(
    database: Database,
) -> None:
    """A database of version 6 has flows but no head rows: the upgrade fills them in
    from the messages, so flows recorded before it are still reported as stalled
    (and the ended ones are not)."""
    await database.upgrade()
    tracker = tracker_for(database)
    await record(tracker, [message("old-open", "a", "next"), message("old-open", "b", "failed")])
    await record(
        tracker, [message("old-done", "a", "next"), message("old-done", "b", "compensated")]
    )
    await record(tracker, [message("old-saga", "a", COMMAND), reply_to("old-saga")])
    # Only a failed reply recorded (the tracker's topics left the command out): the
    # outcome alone ("failed") does not say it is a saga's; its instance here does.
    await seed_saga(database, "old-reply", "COMPENSATED")
    failed = {"saga_id": "old-reply", "ok": False, "error": "no"}
    await record(tracker, [Message(type="r", correlationid="old-reply", data=failed)])
    async with database.transaction() as conn:  # back to what version 6 left
        await conn.execute(sa.text("DROP TABLE accord_flow_heads"))
        await conn.execute(schema_version.delete().where(schema_version.c.version > 6))
    assert await database.upgrade() == MIGRATIONS[-1][0]
    assert await remaining(database) == {
        "old-open": 2,
        "old-done": 2,
        "old-saga": 2,
        "old-reply": 1,
    }
    later = datetime.now(UTC) + LATER
    found = await Flows(database).stalled(timedelta(0), now=later)
    expected = [f for f in await expected_stalled(database) if f[0] != "old-reply"]
    assert as_tuples(found) == expected
    assert [(f.correlation_id, f.last_type) for f in found] == [("old-open", "b")]
    await record(tracker, [message("old-open", "c", "completed")])  # heads go on counting
    assert await Flows(database).stalled(timedelta(0), now=later) == []
    assert await remaining(database) == {
        "old-open": 3,
        "old-done": 2,
        "old-saga": 2,
        "old-reply": 1,
    }
    async with database.connect() as conn:
        query = sa.select(flow_heads).order_by(flow_heads.c.correlation_id)
        heads = (await conn.execute(query)).all()
    assert [(h.correlation_id, h.ended, h.orchestrated) for h in heads] == [
        ("old-done", True, False),
        ("old-open", True, False),
        ("old-reply", False, True),
        ("old-saga", False, True),
    ]
