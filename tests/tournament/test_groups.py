"""``prepare()`` declares the consumer groups of the saga style the stack runs (and of
the styles still in flight), never those of a style nothing consumes: such a group
would keep every message of its topics for good. On the SQL transport (SQLite and
PostgreSQL) and on RabbitMQ."""

from __future__ import annotations

import uuid
from pathlib import Path

import aio_pika
import pytest
import sqlalchemy as sa

from accord.db import Database
from accord.db.schema import queue_deliveries, queue_groups
from accord.outbox import Relay
from tests.brokers import delete_everything
from tests.conftest import RABBIT_URL
from tests.tournament.conftest import AUTH, SAGA_GROUPS, engines
from tournament.config import StackConfig
from tournament.stack import make_transport, prepare

ORCHESTRATION = {"score-engine", "orchestrator"}
CHOREOGRAPHY = {"score-engine", "match-engine", "flow-tracker"}


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("rabbitmq", marks=pytest.mark.rabbitmq),
    ]
)
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A broker URL: the SQL transport on SQLite or PostgreSQL, or RabbitMQ."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'broker.db'}"
    if request.param == "postgres":
        return str(request.getfixturevalue("pg_url"))
    return RABBIT_URL


async def messages_by_group(config: StackConfig) -> dict[str, int]:
    """Each declared group of the config's channel and how many messages it holds."""
    assert config.broker is not None
    if config.broker.startswith("amqp"):
        held: dict[str, int] = {}
        connection = await aio_pika.connect(RABBIT_URL)
        try:
            for group in SAGA_GROUPS:
                channel = await connection.channel()
                try:
                    queue = await channel.declare_queue(f"{config.channel}.{group}", passive=True)
                except aio_pika.exceptions.ChannelNotFoundEntity:
                    continue
                held[group] = int(queue.declaration_result.message_count or 0)
                await channel.close()
        finally:
            await connection.close()
        return held
    async with Database(config.broker) as db, db.connect() as conn:
        groups = await conn.scalars(
            sa.select(queue_groups.c.group_name).where(queue_groups.c.channel == config.channel)
        )
        held = dict.fromkeys(groups, 0)
        rows = await conn.execute(
            sa.select(queue_deliveries.c.group_name, sa.func.count())
            .where(queue_deliveries.c.channel == config.channel)
            .group_by(queue_deliveries.c.group_name)
        )
        held.update({group: int(count) for group, count in rows})
        return held


async def publish_outbox(config: StackConfig) -> None:
    """What the Match Engine's relay does: send the outbox's rows to the broker."""
    assert config.match_db is not None
    transport = make_transport(config)
    await transport.connect()
    try:
        async with Database(config.match_db) as db:
            relay = Relay(db, transport)
            while await relay.run_once():
                pass
    finally:
        await transport.close()


async def test_an_orchestrated_stack_declares_no_choreography_group(
    broker: str, tmp_path: Path
) -> None:
    """Before the fix ``flow-tracker`` (topics ``tournament.#``, ``scores.#``) and
    ``match-engine`` were declared for both styles: in an orchestrated stack nothing
    consumes them, and every ``scores.initialise`` command piled up in the tracker's."""
    channel = f"g-{uuid.uuid4().hex[:10]}"
    try:
        async with engines(tmp_path, broker=broker, channel=channel) as (match, _score, config):
            for i in range(5):
                r = await match.post(
                    "/tournaments", json={"name": f"cup {i}", "participants": ["a", "b"]},
                    headers=AUTH,
                )  # fmt: skip
                assert r.status_code == 202, r.text
            await publish_outbox(config)
            held = await messages_by_group(config)
            assert set(held) == ORCHESTRATION, held
            assert held["score-engine"] == 5, held

            # The same stack restarted as choreography while those five are PENDING:
            # both styles' groups, so the orchestrated flows can still finish.
            choreography = StackConfig(**{**vars(config), "saga_style": "choreography"})
            await prepare(choreography)
            assert set(await messages_by_group(config)) == ORCHESTRATION | CHOREOGRAPHY
    finally:
        if broker.startswith("amqp"):
            await delete_everything({channel: set(SAGA_GROUPS)})


async def test_a_choreographed_stack_declares_no_orchestrator_group(tmp_path: Path) -> None:
    config = StackConfig(data_dir=str(tmp_path), saga_style="choreography").resolved()
    await prepare(config)
    assert set(await messages_by_group(config)) == CHOREOGRAPHY
