"""Participants' records of saga steps (``accord_saga_participations``): pruned by age,
from the consumer's loop and by hand; and a command of a saga older than the records
kept is answered only when a record says what happened to its step, never guessed."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from accord.db import Database
from accord.db.schema_sagas import participations
from accord.errors import ConfigurationError
from accord.inbox import Consumer, DeadLetters
from accord.sagas import CommandContext, Orchestrator, participant
from accord.sagas._engine import command_message
from accord.sagas._participant import prune_participations
from accord.sagas._store import load
from accord.testing import CapturedDelivery, wait_for
from accord.transports.sql import SqlTransport
from tests.sagas import app
from tests.sagas.test_replies import command, outcomes, replies

OLD = datetime.now(UTC) - timedelta(days=40)


def started_at(message: Any, started: datetime | str) -> Any:
    """``message`` saying its saga started at ``started``."""
    text = started if isinstance(started, str) else started.isoformat()
    extensions = {**message.extensions, "sagastarted": text}
    fields = {name: getattr(message, name) for name in message.__dataclass_fields__}
    return message.__class__(**{**fields, "extensions": extensions})


def old_command(saga_id: str, type: str, step: int, phase: str, attempt: int = 1) -> Any:
    """A command of a saga that started 40 days ago."""
    return started_at(command(saga_id, type, step, phase, attempt), OLD)


def new_command(saga_id: str, type: str, step: int, phase: str, attempt: int = 1) -> Any:
    """A command of a saga that started now."""
    return started_at(command(saga_id, type, step, phase, attempt), datetime.now(UTC))


async def pruned_up_to(database: Database, participant: str, days: float = 30) -> None:
    """Have ``participant``'s records pruned up to ``days`` ago (none of them is that old)."""
    cutoff = datetime.now(UTC) - timedelta(days=days)
    await prune_participations(database, participant, cutoff, 1000)


@pytest.fixture
async def hotels(database: Database) -> Consumer:
    """The hotels participant, its records pruned up to 30 days ago."""
    await app.create_tables(database)
    transport = SqlTransport(database.url, channel=f"p-{uuid.uuid4().hex[:8]}")
    consumer: Consumer = app.participant_consumers(database, transport, "p")[0]
    await pruned_up_to(database, consumer.name)
    return consumer


def consumer_on(database: Database, name: str) -> Consumer:
    transport = SqlTransport(database.url, channel=f"r-{uuid.uuid4().hex[:8]}")
    return Consumer(name, database, transport)


async def records(database: Database, participant: str | None = None) -> list[tuple[str, int, str]]:
    """The records of sagas (not the row noting how far they were pruned)."""
    c = participations.c
    query = sa.select(c.saga_id, c.step, c.phase).where(c.saga_id != "")
    if participant is not None:
        query = query.where(participations.c.participant == participant)
    async with database.connect() as conn:
        return sorted((r[0], r[1], r[2]) for r in (await conn.execute(query)).all())


async def age(database: Database, saga_id: str, days: float, phase: str | None = None) -> None:
    """Make ``saga_id``'s records (of ``phase`` only, if given) ``days`` old."""
    statement = participations.update().where(participations.c.saga_id == saga_id)
    if phase is not None:
        statement = statement.where(participations.c.phase == phase)
    async with database.transaction() as conn:
        await conn.execute(statement.values(at=datetime.now(UTC) - timedelta(days=days)))


async def ops(database: Database, saga_id: str) -> list[tuple[int, str]]:
    return [(step, op) for s, step, op in await app.ledger_rows(database) if s == saga_id]


# -- pruning ------------------------------------------------------------------------------


async def test_prune_deletes_only_the_records_older_than_asked_of_the_participant_named(
    database: Database, hotels: Consumer
) -> None:
    from accord.sagas import SagaAdmin

    sagas = [str(uuid.uuid4()) for _ in range(4)]
    for saga_id in sagas:
        await hotels.handle(CapturedDelivery(command(saga_id, "hotels.reserve", 1, "action")))
    await hotels.handle(CapturedDelivery(command(sagas[0], "hotels.cancel", 1, "compensation")))
    await age(database, sagas[0], 40)
    await age(database, sagas[1], 31)
    await age(database, sagas[2], 29)
    async with database.transaction() as conn:  # another participant's, as old
        await conn.execute(
            participations.insert().values(
                participant="elsewhere",
                saga_id=sagas[0],
                step=2,
                phase="action",
                attempt=1,
                ok=True,
                at=OLD,
            )
        )
    seen: list[int] = []
    admin = SagaAdmin(database)
    pruned = await admin.prune_participations(
        timedelta(days=30), participant=hotels.name, batch=1, on_batch=seen.append
    )
    assert pruned == 3
    assert seen == [1, 2, 3, 3]  # one a transaction, then an empty one
    assert await records(database, hotels.name) == sorted((s, 1, "action") for s in sagas[2:])
    assert await records(database, "elsewhere") == [(sagas[0], 2, "action")]
    assert await admin.prune_participations(timedelta(days=30)) == 1  # every participant's
    assert await records(database, "elsewhere") == []
    assert await horizon(database, "elsewhere") is not None
    with pytest.raises(ConfigurationError, match="batch must be at least 1, got 0"):
        await admin.prune_participations(timedelta(days=30), batch=0)


async def test_a_running_consumer_prunes_its_participants_records_past_their_retention(
    database: Database,
) -> None:
    await app.create_tables(database)
    transport = SqlTransport(database.url, channel=f"p-{uuid.uuid4().hex[:8]}")
    consumer = Consumer("keeps-a-day", database, transport, replay_interval=0.05)
    calls: list[str] = []

    @participant(consumer, "hotels.reserve", records_retention=timedelta(days=1))
    async def reserve(ctx: CommandContext, data: Any) -> None:
        calls.append(ctx.saga_id)

    old, recent = str(uuid.uuid4()), str(uuid.uuid4())
    for saga_id in (old, recent):
        await consumer.handle(CapturedDelivery(command(saga_id, "hotels.reserve", 1, "action")))
    await age(database, old, 2)
    assert await horizon(database, consumer.name) is None
    await consumer.start()
    try:
        await wait_for(lambda: _gone(database, old), timeout=20)
        assert await records(database) == [(recent, 1, "action")]
        noted = await horizon(database, consumer.name)
        assert noted is not None
        assert abs(noted - (datetime.now(UTC) - timedelta(days=1))) < timedelta(minutes=1)
    finally:
        await consumer.stop()
        await transport.close()


async def horizon(database: Database, participant: str) -> datetime | None:
    """The time ``participant``'s records were pruned up to, if they ever were."""
    c = participations.c
    query = sa.select(c.at).where(c.participant == participant, c.saga_id == "", c.step == -1)
    async with database.connect() as conn:
        found: datetime | None = await conn.scalar(query)
        return found


async def _gone(database: Database, saga_id: str) -> bool:
    return all(s != saga_id for s, _, _ in await records(database))


async def test_participants_of_one_consumer_must_share_one_retention(database: Database) -> None:
    transport = SqlTransport(database.url, channel="unused")
    consumer = Consumer("two-minds", database, transport)

    async def func(ctx: CommandContext, data: Any) -> None:
        return None

    participant(consumer, "a.do", records_retention=timedelta(days=60))(func)
    participant(consumer, "a.undo", records_retention=timedelta(days=60))(func)  # agrees
    with pytest.raises(ConfigurationError, match=r"records_retention=datetime\.timedelta"):
        participant(consumer, "a.other")(func)
    assert "a.other" not in consumer.topics


async def test_a_refused_registration_sets_no_retention(database: Database) -> None:
    """A registration that the consumer refuses (its type already handled) changes
    nothing: it neither sets the retention nor adds a pruning of its own."""
    consumer = consumer_on(database, "refused-first")

    @consumer.handler("hotels.reserve")
    async def plain(ctx: Any, data: Any) -> None:
        return None

    async def func(ctx: CommandContext, data: Any) -> None:
        return None

    with pytest.raises(ConfigurationError, match="already handles"):
        participant(consumer, "hotels.reserve", records_retention=timedelta(days=2))(func)
    participant(consumer, "hotels.cancel")(func)  # 30 days
    kept = [p.retention for p in consumer._prunings if p.what.startswith("saga step records")]
    assert kept == [timedelta(days=30)]


@pytest.mark.parametrize("retention", [timedelta(hours=23), timedelta(0)])
def test_a_retention_under_a_day_is_refused(database: Database, retention: timedelta) -> None:
    """Under the clock margin, every saga (one started a second ago too) would read
    as older than the records kept; a record must outlive its saga anyway."""
    consumer = consumer_on(database, "keeps-briefly")
    with pytest.raises(ConfigurationError, match="records_retention must be at least a day"):
        participant(consumer, "hotels.reserve", records_retention=retention)


# -- a saga older than the records kept ---------------------------------------------------


async def test_a_compensation_of_an_old_saga_with_no_record_is_refused_not_taken_as_done(
    database: Database, hotels: Consumer, caplog: pytest.LogCaptureFixture
) -> None:
    """The step's records may have been pruned: it may have been applied, so a
    success without undoing it could leave it applied under a COMPENSATED saga."""
    saga_id = str(uuid.uuid4())
    with caplog.at_level("WARNING", logger="accord.sagas.participant"):
        await hotels.handle(
            CapturedDelivery(old_command(saga_id, "hotels.cancel", 1, "compensation"))
        )
    assert any(
        "saga command refused" in r.getMessage() and saga_id in r.getMessage()
        for r in caplog.records
    )
    (sent,) = await replies(database, saga_id)
    assert sent["ok"] is False
    assert "cannot tell whether step 1" in sent["error"]
    assert "pruned up to" in sent["error"] and "(records_retention)" in sent["error"]
    assert await records(database) == []  # nothing recorded: a later retry asks again
    # The same command of a saga started now: its step cannot have been pruned, so
    # no record means never applied here, and the compensation succeeds at once.
    fresh = str(uuid.uuid4())
    await hotels.handle(CapturedDelivery(new_command(fresh, "hotels.cancel", 1, "compensation")))
    assert await outcomes(database, fresh) == [("compensation", True)]
    assert await ops(database, saga_id) == await ops(database, fresh) == []


async def test_an_old_saga_of_a_participant_whose_records_were_never_pruned_is_as_ever(
    database: Database,
) -> None:
    """Nothing was ever pruned here (``records_retention=None``, no prune by hand): a
    step with no record was never applied, however old its saga."""
    await app.create_tables(database)
    consumer = consumer_on(database, "keeps-all")
    calls: list[str] = []

    @participant(consumer, "hotels.cancel", records_retention=None)
    async def cancel(ctx: CommandContext, data: Any) -> None:
        calls.append(ctx.saga_id)

    saga_id = str(uuid.uuid4())
    await consumer.handle(
        CapturedDelivery(old_command(saga_id, "hotels.cancel", 1, "compensation"))
    )
    assert await outcomes(database, saga_id) == [("compensation", True)]
    assert calls == []
    assert consumer._prunings[1:] == []  # only the inbox's


async def test_records_pruned_by_hand_count_whatever_the_participants_retention(
    database: Database,
) -> None:
    """``accord sagas prune-participations`` (30 days by default) under a participant
    that keeps its records for ever: a compensation of a step it applied, whose
    record the prune took, is refused, not answered "never applied"."""
    from accord.sagas import SagaAdmin

    await app.create_tables(database)
    consumer = consumer_on(database, "keeps-long")
    calls: list[str] = []

    @participant(consumer, "hotels.reserve", records_retention=None)
    async def reserve(ctx: CommandContext, data: Any) -> None:
        calls.append("do")

    @participant(consumer, "hotels.cancel", records_retention=None)
    async def cancel(ctx: CommandContext, data: Any) -> None:
        calls.append("undo")

    saga_id = str(uuid.uuid4())
    await consumer.handle(CapturedDelivery(old_command(saga_id, "hotels.reserve", 1, "action")))
    await age(database, saga_id, 40)
    assert await SagaAdmin(database).prune_participations(timedelta(days=30)) == 1
    await consumer.handle(
        CapturedDelivery(old_command(saga_id, "hotels.cancel", 1, "compensation"))
    )
    assert calls == ["do"]
    assert (await replies(database, saga_id))[-1]["ok"] is False


async def test_the_refusal_states_the_sagas_start_in_utc(
    database: Database, hotels: Consumer
) -> None:
    saga_id = str(uuid.uuid4())
    message = started_at(
        command(saga_id, "hotels.cancel", 1, "compensation"), "2020-01-01T23:30:00-05:00"
    )
    await hotels.handle(CapturedDelivery(message))
    (sent,) = await replies(database, saga_id)
    assert sent["ok"] is False
    assert "started 2020-01-02 04:30 UTC" in sent["error"], sent["error"]


async def test_two_prunes_at_once_both_finish(database: Database) -> None:
    """Replicas of one consumer prune its records at the same time: on PostgreSQL,
    each skips the rows the other locked and deletes only its own (deleting by saga
    deadlocked on a saga whose records were in both picks)."""
    now = datetime.now(UTC)
    await database.upgrade()
    async with database.transaction() as conn:
        await conn.execute(
            participations.insert(),
            [
                {
                    "participant": "p",
                    "saga_id": f"saga-{i % 7}",
                    "step": i,
                    "phase": "action",
                    "attempt": 1,
                    "ok": True,
                    "at": now - timedelta(days=40, minutes=i),
                }
                for i in range(60)
            ],
        )
    cutoff = now - timedelta(days=30)

    async def prune_all() -> int:
        total = 0
        while count := await prune_participations(database, "p", cutoff, 5):
            total += count
        return total

    counts = await asyncio.wait_for(asyncio.gather(prune_all(), prune_all(), prune_all()), 30)
    assert sum(counts) == 60
    assert await records(database, "p") == []


async def test_an_old_sagas_step_whose_records_are_here_is_handled_as_ever(
    database: Database, hotels: Consumer
) -> None:
    saga_id = str(uuid.uuid4())
    await hotels.handle(CapturedDelivery(old_command(saga_id, "hotels.reserve", 1, "action")))
    await hotels.handle(CapturedDelivery(old_command(saga_id, "hotels.cancel", 1, "compensation")))
    assert await outcomes(database, saga_id) == [("action", True), ("compensation", True)]
    assert await ops(database, saga_id) == [(1, "do"), (1, "undo")]


async def test_a_step_whose_action_record_was_pruned_and_failed_compensation_kept_is_refused(
    database: Database, hotels: Consumer
) -> None:
    """Pruning by age can take the action's record and leave a later one of the same
    step: what is left must not read as "never applied"."""
    saga_id = str(uuid.uuid4())
    await app.set_outage(database, 1, True)  # every compensation of step 1 fails
    await hotels.handle(CapturedDelivery(old_command(saga_id, "hotels.reserve", 1, "action")))
    await hotels.handle(CapturedDelivery(old_command(saga_id, "hotels.cancel", 1, "compensation")))
    await app.set_outage(database, 1, False)
    async with database.transaction() as conn:
        await conn.execute(
            participations.delete().where(
                participations.c.saga_id == saga_id, participations.c.phase == "action"
            )
        )
    retry = old_command(saga_id, "hotels.cancel", 1, "compensation", attempt=2)
    await hotels.handle(CapturedDelivery(retry))
    assert await outcomes(database, saga_id) == [
        ("action", True),
        ("compensation", False),
        ("compensation", False),
    ]
    assert "cannot tell whether step 1" in (await replies(database, saga_id))[-1]["error"]
    assert await ops(database, saga_id) == [(1, "do")]


async def test_a_void_of_an_old_saga_with_no_record_is_refused(
    database: Database, hotels: Consumer
) -> None:
    saga_id = str(uuid.uuid4())
    await hotels.handle(CapturedDelivery(old_command(saga_id, "hotels.reserve", 1, "void")))
    (sent,) = await replies(database, saga_id)
    assert (sent["ok"], sent["result"]) == (False, None)
    assert "cannot tell whether step 1" in sent["error"]
    # Nothing recorded: the command itself is not refused from now on (it may have run).
    assert await records(database) == []


async def test_a_resent_action_of_an_old_saga_with_no_record_is_never_run(
    database: Database, hotels: Consumer
) -> None:
    """Attempt 2 means attempt 1 was sent: it may have been applied here, its record
    pruned since. No reply (a failure would say "not applied"): the delivery fails
    until dead-lettered with why, and the saga's timeout takes over."""
    saga_id = str(uuid.uuid4())
    resent = old_command(saga_id, "hotels.reserve", 1, "action", attempt=2)
    first = CapturedDelivery(resent)
    await hotels.handle(first)
    assert first.outcome == "nack"
    last = CapturedDelivery(resent, attempt=hotels.max_attempts)
    await hotels.handle(last)
    assert last.outcome == "ack"
    (letter,) = [d for d in await DeadLetters(database).list() if d.message_id == resent.id]
    assert "RecordsPruned" in letter.reason and "cannot tell whether step 1" in letter.reason
    assert await replies(database, saga_id) == []
    assert await ops(database, saga_id) == []
    # Its first attempt is the step's first command: nothing can have been pruned.
    await hotels.handle(CapturedDelivery(old_command(saga_id, "hotels.reserve", 1, "action")))
    assert await ops(database, saga_id) == [(1, "do")]


async def test_a_command_from_an_orchestrator_that_does_not_say_when_the_saga_started(
    database: Database, hotels: Consumer
) -> None:
    """An Accord before ``sagastarted`` (a rolling upgrade): handled as before."""
    saga_id = str(uuid.uuid4())
    await hotels.handle(CapturedDelivery(command(saga_id, "hotels.cancel", 1, "compensation")))
    await hotels.handle(CapturedDelivery(command(saga_id, "hotels.reserve", 1, "action", 2)))
    assert await outcomes(database, saga_id) == [("compensation", True), ("action", False)]


async def test_in_a_batch_an_old_sagas_unknown_step_is_refused_and_the_others_go_on(
    database: Database,
) -> None:
    await app.create_tables(database)
    transport = SqlTransport(database.url, channel=f"p-{uuid.uuid4().hex[:8]}")
    hotels, _ = app.participant_consumers(database, transport, "b", batch_size=8)
    old, fresh = str(uuid.uuid4()), str(uuid.uuid4())
    await pruned_up_to(database, hotels.name)
    batch = [
        CapturedDelivery(new_command(fresh, "hotels.reserve", 1, "action")),
        CapturedDelivery(old_command(old, "hotels.cancel", 1, "compensation")),
        CapturedDelivery(old_command(old, "hotels.reserve", 1, "action", attempt=3)),
    ]
    await hotels.handle_batch(batch)
    assert [d.outcome for d in batch] == ["ack", "ack", "nack"]
    assert await outcomes(database, fresh) == [("action", True)]
    assert await outcomes(database, old) == [("compensation", False)]
    assert await ops(database, fresh) == [(1, "do")] and await ops(database, old) == []


async def test_the_orchestrators_commands_say_when_their_saga_started(database: Database) -> None:
    """What the participant compares with its retention comes from the saga's row."""
    await app.create_tables(database)
    transport = SqlTransport(database.url, channel=f"o-{uuid.uuid4().hex[:8]}")
    trip = app.make_trip()
    orchestrator = Orchestrator(database, transport, [trip], name="orch")
    saga_id = await orchestrator.start("trip", {})
    async with database.transaction() as conn:
        state = await load(conn, saga_id)
    assert state is not None
    action = trip.steps[1].action
    message = command_message(trip, state, action)  # type: ignore[arg-type]
    started = datetime.fromisoformat(message.extensions["sagastarted"])
    assert started == state.created_at
    assert abs(started - datetime.now(UTC)) < timedelta(minutes=1)
