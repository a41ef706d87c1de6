"""A projection fed from a transport group (the SQL transport on the same database)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from accord import Relay
from accord.cli.app import _register_subcommands
from accord.cli.app import app as cli
from accord.db import Database
from accord.errors import ConfigurationError
from accord.eventstore import EventStore, NewEvent, RecordedEvent
from accord.messages import Message
from accord.projections import (
    Projection,
    ProjectionContext,
    TransportProjector,
    event_from_message,
    projection_status,
    rebuild,
)
from accord.testing import wait_for
from accord.transports import from_url
from tests.projections import app
from tests.projections.helpers import read_model, visible

_register_subcommands()


async def test_transport_fed_projection_applies_each_message_once(db_url: str) -> None:
    channel = f"proj-{uuid.uuid4().hex[:8]}"
    database = Database(db_url)
    transport = from_url(db_url, channel=channel)
    scores = app.make_scores("scores_bus")
    projector = TransportProjector(database, scores, transport)
    await projector.start()
    try:
        messages = [
            Message(type="score.changed", data={"player": f"p{i % 3}", "points": i}, source="t")
            for i in range(20)
        ]
        await transport.publish(messages)
        await transport.publish(messages[:5])  # duplicates (same ids): applied once

        async def applied() -> bool:
            model = await read_model(database, scores)
            return sum(games for _, games in model["totals"].values()) == 20

        await wait_for(applied, 20)
        model = await read_model(database, scores)
        expected: dict[str, tuple[int, int]] = {}
        for i in range(20):
            points, games = expected.get(f"p{i % 3}", (0, 0))
            expected[f"p{i % 3}"] = (points + i, games + 1)
        assert model["totals"] == expected
        # The duplicates have been delivered (and skipped) by now too.
        marker = Message(type="score.changed", data={"player": "end", "points": 0}, source="t")
        await transport.publish([marker])

        async def ended() -> bool:
            return "end" in (await read_model(database, scores))["totals"]

        await wait_for(ended, 20)
        totals = (await read_model(database, scores))["totals"]
        assert sum(games for _, games in totals.values()) == 21
    finally:
        await projector.stop()
        await transport.close()
        await database.dispose()


async def test_a_transport_fed_projection_is_not_rebuilt_into_an_empty_read_model(
    sqlite_url: str,
) -> None:
    """The broker holds no history to replay: a rebuild would build nothing from the
    event store and swap the empty version in. It is refused, and the live read
    model is left as it was."""
    channel = f"proj-{uuid.uuid4().hex[:8]}"
    database = Database(sqlite_url)
    transport = from_url(sqlite_url, channel=channel)
    scores = app.make_scores("scores_bus")
    projector = TransportProjector(database, scores, transport)
    await projector.start()
    try:
        await transport.publish([Message(type="score.changed", data={"player": "p", "points": 3})])
        await wait_for(lambda: _has_totals(database, scores), 20)
        with pytest.raises(ConfigurationError, match="fed by a transport"):
            await rebuild(database, scores)
        assert (await read_model(database, scores))["totals"] == {"p": (3, 1)}
    finally:
        await projector.stop()
        await transport.close()
        await database.dispose()


async def _has_totals(database: Database, scores: Any) -> bool:
    return bool((await read_model(database, scores))["totals"])


async def test_cancelling_run_stops_the_subscription(db_url: str) -> None:
    """As stop() does: a projector cancelled must not go on consuming in the
    transport's tasks."""
    channel = f"proj-{uuid.uuid4().hex[:8]}"
    database = Database(db_url)
    transport = from_url(db_url, channel=channel)
    scores = app.make_scores("scores_bus")
    projector = TransportProjector(database, scores, transport)
    await projector.declare()
    task = asyncio.create_task(projector.run())
    try:
        await wait_for(lambda: projector._subscription is not None, 20)  # tables made
        await transport.publish([Message(type="score.changed", data={"player": "p", "points": 1})])
        await wait_for(lambda: _has_totals(database, scores), 20)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert projector._subscription is None
        late = Message(type="score.changed", data={"player": "late", "points": 1})
        await transport.publish([late])
        await asyncio.sleep(0.5)  # several polls of a subscription, had it survived
        assert "late" not in (await read_model(database, scores))["totals"]
    finally:
        await projector.stop()
        await transport.close()
        await database.dispose()


async def test_events_the_store_sent_keep_their_full_stream_id_and_metadata(
    db_url: str,
) -> None:
    """A stream id over 200 characters travels as a digest in the message's key and
    whole in its subject: handlers get the stream id the store holds, and the
    event's whole metadata (an actor, not only the correlation id)."""
    channel = f"proj-{uuid.uuid4().hex[:8]}"
    database = Database(db_url)
    transport = from_url(db_url, channel=channel)
    seen = Projection("streams_bus")
    seen.table(
        "seen",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("stream_id", sa.String(300), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("correlation_id", sa.String(50)),
        sa.Column("actor", sa.String(50)),
    )

    @seen.on("stream.touched")
    def touched(ctx: ProjectionContext, event: RecordedEvent) -> None:
        ctx.insert(
            "seen",
            {
                "stream_id": event.stream_id,
                "version": event.version,
                "correlation_id": event.correlation_id,
                "actor": event.metadata.get("actor"),
            },
        )

    projector = TransportProjector(database, seen, transport)
    store = EventStore(database)
    long = "S" * 250
    await projector.start()
    try:
        meta = {"correlation_id": "c-1", "actor": "Ann-Sofie Ørsted"}
        await store.append(long, [NewEvent("stream.touched", {}, meta)], outbox=True)
        await store.append("short", [NewEvent("stream.touched")], outbox=True)
        await Relay(database, transport).run_once()

        async def rows() -> list[Any]:
            async with database.connect() as conn:
                table = (await seen.live_tables(conn))["seen"]
                columns = ("stream_id", "version", "correlation_id", "actor")
                query = sa.select(*(table.c[c] for c in columns))
                return list((await conn.execute(query.order_by(table.c.id))).all())

        await wait_for(lambda: _at_least(rows, 2), 20)
        assert sorted(tuple(r) for r in await rows()) == [
            (long, 1, "c-1", "Ann-Sofie Ørsted"),
            ("short", 1, None, None),
        ]
    finally:
        await projector.stop()
        await store.close()
        await transport.close()
        await database.dispose()


async def _at_least(rows: Any, n: int) -> bool:
    return len(await rows()) >= n


async def test_status_shows_a_transport_fed_projection_as_such(db_url: str) -> None:
    """No checkpoint follows the event store's log for it: status says it is fed by a
    transport, with no lag, instead of 'new' and every event of its types behind."""
    channel = f"proj-{uuid.uuid4().hex[:8]}"
    database = Database(db_url)
    transport = from_url(db_url, channel=channel)
    scores = app.make_scores("scores_bus")
    projector = TransportProjector(database, scores, transport)
    store = EventStore(database)
    await projector.start()
    try:
        await transport.publish([Message(type="score.changed", data={"player": "p", "points": 3})])
        await wait_for(lambda: _has_totals(database, scores), 20)
        logged = await store.append("s", [NewEvent("score.changed", {"player": "q", "points": 1})])
        await visible(store, logged.position)
        [status] = await projection_status(database, [scores], store=store)
        assert (status.state, status.events_behind) == ("transport", 0)
        assert status.transport_fed
        shown = status.as_dict()
        assert (shown["position"], shown["events_behind"], shown["seconds_behind"]) == (
            None,
            None,
            None,
        )
        args = ["projections", "status", "--db", db_url]
        out = await asyncio.to_thread(CliRunner().invoke, cli, args)
        assert out.exit_code == 0, out.output
        assert "transport" in out.output and "fed by a TransportProjector" in out.output
    finally:
        await projector.stop()
        await store.close()
        await transport.close()
        await database.dispose()


def test_a_message_whose_metadata_extension_is_not_an_object_keeps_its_ids() -> None:
    for text in ("[1, 2]", "not json", '"text"'):
        message = Message(
            type="stream.touched",
            correlationid="c-9",
            extensions={"eventmetadata": text},
        )
        assert event_from_message(message).metadata == {
            "correlation_id": "c-9",
            "causation_id": None,
        }
    sent = Message(type="stream.touched", extensions={"eventmetadata": '{"actor":"bo"}'})
    assert event_from_message(sent).metadata == {
        "actor": "bo",
        "correlation_id": None,
        "causation_id": None,
    }
