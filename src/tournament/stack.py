"""The processes of the tournament system and what each one runs.

=================  =============================================================
role               components
=================  =============================================================
match-api          the Match Engine's HTTP API (uvicorn)
match-relay        outbox relay of the Match Engine (``--workers`` of them)
match-saga         orchestrator, or the choreography consumer + flow tracker
score-api          the Score Engine's HTTP API (uvicorn)
score-relay        outbox relay of the Score Engine (``--workers`` of them)
score-consumer     the Score Engine's inbox consumer (``--workers`` of them)
score-projector    the leaderboard projection runner
=================  =============================================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from accord.db import Database
from accord.eventstore import EventStore
from accord.inbox import Consumer
from accord.outbox import Relay
from accord.projections import ProjectionRunner
from accord.runtime import Component
from accord.sagas import FlowTracker, Orchestrator
from accord.transports import Transport, from_url
from tournament.config import StackConfig
from tournament.contracts import PENDING
from tournament.match_engine import flow as match_flow
from tournament.match_engine.tables import metadata as match_metadata
from tournament.match_engine.tables import tournaments
from tournament.score_engine.handlers import register as register_score_handlers
from tournament.score_engine.leaderboard import leaderboard
from tournament.score_engine.tables import metadata as score_metadata

__all__ = [
    "API_ROLES",
    "SCALED_ROLES",
    "WORKER_ROLES",
    "components",
    "make_transport",
    "prepare",
]

API_ROLES = ("match-api", "score-api")
WORKER_ROLES = (
    "match-relay",
    "match-saga",
    "score-relay",
    "score-consumer",
    "score-projector",
)
#: Roles run ``--workers`` times.
SCALED_ROLES = ("match-relay", "match-saga", "score-relay", "score-consumer")

SCORE_CONSUMER = "score-engine"
MATCH_CONSUMER = "match-engine"
ORCHESTRATOR = "orchestrator"
FLOW_TRACKER = "flow-tracker"
FLOW_TOPICS = ("tournament.#", "scores.#")
#: Consumers apply what has arrived, up to this many messages, in one transaction.
BATCH_SIZE = 32

# On SQLite no wake-up crosses processes: what another process committed is found by
# polling, and each idle look costs 5 to 10 ms of CPU (a claim on the database). These
# trade the idle stack's CPU (51 % of a core at 50 ms each, 15 % with these) against
# the latency of each hop (a tournament crosses four polled hops to become ACTIVE).
#: How often the SQL transport's consumers look for messages, on SQLite (seconds).
SQLITE_CONSUMER_POLL = 0.2
#: How often a relay looks for outbox rows committed by another process, on SQLite.
SQLITE_RELAY_POLL = 0.4
#: How often the projector looks for new ledger events, on SQLite.
SQLITE_PROJECTOR_POLL = 0.25
#: How often the orchestrator fires due step timeouts (they are 60 s long).
SAGA_TIMER = 1.0


def make_transport(config: StackConfig) -> Transport:
    """The transport on ``config.broker`` (the SQL transport polls briskly on SQLite,
    where no wake-up crosses processes)."""
    assert config.broker is not None
    options: dict[str, Any] = {}
    if config.broker.startswith("sqlite"):
        options["poll_interval"] = SQLITE_CONSUMER_POLL
    return from_url(config.broker, channel=config.channel, **options)


def _relay(database: Database, transport: Transport) -> Relay:
    poll = 1.0 if database.is_postgres else SQLITE_RELAY_POLL
    return Relay(database, transport, poll_interval=poll, backoff_base=0.2, backoff_cap=10.0)


def score_consumer(database: Database, transport: Transport) -> Consumer:
    """The Score Engine's consumer with every handler registered."""
    consumer = Consumer(
        SCORE_CONSUMER,
        database,
        transport,
        max_attempts=5,
        backoff_base=0.2,
        batch_size=BATCH_SIZE,
    )
    register_score_handlers(consumer, EventStore(database), match_flow.choreography())
    return consumer


def match_consumers(
    database: Database, transport: Transport, style: str
) -> list[Consumer | Orchestrator | FlowTracker]:
    """What consumes on the Match Engine's side for the saga ``style``."""
    if style == "orchestration":
        return [
            Orchestrator(
                database,
                transport,
                [match_flow.create_tournament_saga()],
                name=ORCHESTRATOR,
                timer_interval=SAGA_TIMER,
                batch_size=BATCH_SIZE,
            )
        ]
    consumer = Consumer(
        MATCH_CONSUMER,
        database,
        transport,
        max_attempts=10,
        backoff_base=0.1,
        batch_size=BATCH_SIZE,
    )
    match_flow.register_choreography(match_flow.choreography(), consumer)
    tracker = FlowTracker(database, transport, name=FLOW_TRACKER, topics=FLOW_TOPICS)
    return [consumer, tracker]


async def styles_in_flight(config: StackConfig) -> set[str]:
    """The saga styles of the tournaments still PENDING: a stack restarted with the
    other ``--saga-style`` must still finish the flows the first style started."""
    assert config.match_db is not None
    async with Database(config.match_db) as database, database.read() as conn:
        query = sa.select(tournaments.c.saga_style).where(tournaments.c.status == PENDING)
        return set((await conn.scalars(query.distinct())).all())


def components(
    role: str, config: StackConfig, transport: Transport, *, also_styles: Sequence[str] = ()
) -> list[Component]:
    """The worker components of ``role`` (see the table above), on ``transport`` (which
    the caller connects: a relay publishes on a connected transport). ``match-saga``
    serves ``config.saga_style`` and ``also_styles`` (see :func:`styles_in_flight`)."""
    assert config.match_db is not None and config.score_db is not None
    database = Database(config.match_db if role.startswith("match-") else config.score_db)
    if role in ("match-relay", "score-relay"):
        return [_relay(database, transport)]
    if role == "match-saga":
        styles = [config.saga_style, *(s for s in also_styles if s != config.saga_style)]
        return [c for style in styles for c in match_consumers(database, transport, style)]
    if role == "score-consumer":
        return [score_consumer(database, transport)]
    if role == "score-projector":
        return [
            ProjectionRunner(
                database,
                [leaderboard],
                poll_interval=SQLITE_PROJECTOR_POLL if database.is_sqlite else 0.5,
            )
        ]
    raise ValueError(f"unknown worker role {role!r}; roles: {', '.join(WORKER_ROLES)}")


# The advisory lock that serialises prepare() on one PostgreSQL database.
_LOCK = 0x746F75726E  # "tourn"


async def prepare(config: StackConfig) -> None:
    """Create or migrate both engines' databases (Accord's tables, the engines' own,
    the leaderboard's) and declare the consumer groups on the broker: the Score
    Engine's, and the Match Engine's of ``config.saga_style`` and of the styles still
    in flight (:func:`styles_in_flight`). A group of a style nothing runs would keep
    every message of its topics for good. Idempotent."""
    assert config.match_db is not None and config.score_db is not None
    for url, metadata in ((config.match_db, match_metadata), (config.score_db, score_metadata)):
        async with Database(url) as database:
            await database.upgrade()
            async with database.transaction() as conn:
                if database.is_postgres:  # two processes preparing at once take turns
                    await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK})
                await conn.run_sync(metadata.create_all)
                if metadata is score_metadata:
                    await leaderboard.create_tables(conn, await leaderboard.live_version(conn))
    transport = make_transport(config)
    try:
        await transport.connect()
        match_db = Database(config.match_db)
        score_db = Database(config.score_db)
        try:
            groups: list[Consumer] = [score_consumer(score_db, transport)]
            styles = {config.saga_style, *await styles_in_flight(config)}
            for style in sorted(styles):
                for item in match_consumers(match_db, transport, style):
                    groups.append(item if isinstance(item, Consumer) else item.consumer)
            for consumer in groups:  # a group gets only what is published after it exists
                await consumer.declare()
        finally:
            await match_db.dispose()
            await score_db.dispose()
    finally:
        with contextlib.suppress(Exception):
            await transport.close()
