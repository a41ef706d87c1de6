"""CloudEvents interoperability on RabbitMQ, checked with the official ``cloudevents`` SDK.

A message Accord publishes parses with the SDK (its RabbitMQ binding, and its HTTP
binary-mode converter), and an event the SDK serialises in binary mode is accepted by
an Accord subscriber with every attribute intact.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pytest
from cloudevents.core.bindings import rabbitmq as ce_rabbitmq
from cloudevents.core.v1.event import CloudEvent
from cloudevents.v1 import http as ce_http
from cloudevents.v1.conversion import to_binary as http_to_binary

from accord.messages import Message
from accord.testing import Collector, wait_for
from accord.transports.rabbitmq import RabbitTransport
from tests.conftest import RABBIT_URL
from tests.transports.test_rabbitmq import delete_everything

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
async def transport() -> AsyncIterator[RabbitTransport]:
    transport = RabbitTransport(RABBIT_URL, channel=f"ce-{uuid.uuid4().hex[:12]}")
    await transport.connect()
    yield transport
    await transport.close()
    await delete_everything({transport.channel: set(transport.groups)})


@pytest.fixture
async def raw_channel() -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect(RABBIT_URL)
    try:
        yield await connection.channel()
    finally:
        await connection.close()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


SENT = Message(
    type="match.recorded",
    data={"match": 42, "score": [3, 1], "players": {"home": "Ana", "away": "Bo"}},
    source="/match-engine",
    subject="match-42",
    key="tournament-7",
    correlationid="corr-123",
    causationid="cause-456",
    traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    extensions={"tenant": "acme"},
    time=datetime(2024, 5, 17, 12, 30, 45, 123456, tzinfo=UTC),
)


async def test_a_message_we_publish_parses_with_the_sdk(
    transport: RabbitTransport, raw_channel: aio_pika.abc.AbstractChannel
) -> None:
    queue = await raw_channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(transport.channel, routing_key="#")
    await transport.publish([SENT])

    async def arrived() -> aio_pika.abc.AbstractIncomingMessage | None:
        return await queue.get(no_ack=True, fail=False)

    incoming = await wait_for(arrived, 10)
    headers = {name: _text(value) for name, value in (incoming.headers or {}).items()}
    assert incoming.message_id == SENT.id
    assert incoming.delivery_mode == aio_pika.DeliveryMode.PERSISTENT

    # The SDK's RabbitMQ protocol binding (binary content mode).
    event = ce_rabbitmq.from_binary_event(
        ce_rabbitmq.RabbitMQMessage(
            headers=headers, content_type=incoming.content_type, body=incoming.body
        )
    )
    assert event.get_specversion() == "1.0"
    assert event.get_id() == SENT.id
    assert event.get_type() == SENT.type
    assert event.get_source() == SENT.source
    assert event.get_subject() == SENT.subject
    assert event.get_time() == SENT.time
    assert event.get_datacontenttype() == "application/json"
    assert event.get_extension("partitionkey") == SENT.key
    assert event.get_extension("correlationid") == SENT.correlationid
    assert event.get_extension("causationid") == SENT.causationid
    assert event.get_extension("traceparent") == SENT.traceparent
    assert event.get_extension("tenant") == "acme"
    assert event.get_data() == SENT.data

    # The SDK's HTTP binary-mode converter reads the same headers.
    http_event = ce_http.from_http(
        {**headers, "content-type": incoming.content_type}, incoming.body
    )
    assert http_event["id"] == SENT.id
    assert http_event["type"] == SENT.type
    assert http_event["source"] == SENT.source
    assert http_event["partitionkey"] == SENT.key
    assert http_event["tenant"] == "acme"
    assert http_event.data == SENT.data


def _sdk_event() -> CloudEvent:
    return CloudEvent(
        attributes={
            "type": "score.awarded",
            "source": "https://example.com/score-engine",
            "id": f"sdk-{uuid.uuid4()}",
            "time": datetime(2024, 6, 1, 8, 0, 0, tzinfo=UTC),
            "subject": "player-9",
            "datacontenttype": "application/json",
            "partitionkey": "player-9",
            "correlationid": "corr-sdk",
            "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "tenant": "globex",
            "region": "eu1",
        },
        data={"points": 3, "bonus": None, "tags": ["win", "away"]},
    )


def _via_rabbitmq_binding(event: CloudEvent) -> tuple[dict[str, Any], str | None, bytes]:
    message = ce_rabbitmq.to_binary_event(event)
    return dict(message.headers), message.content_type, message.body


def _via_http_binding(event: CloudEvent) -> tuple[dict[str, Any], str | None, bytes]:
    legacy = ce_http.CloudEvent(
        {
            k: v.isoformat() if isinstance(v, datetime) else v
            for k, v in event.get_attributes().items()
        },
        event.get_data(),
    )
    headers, body = http_to_binary(legacy)
    content_type = headers.pop("content-type", None)
    assert isinstance(body, bytes)
    return dict(headers), content_type, body


@pytest.mark.parametrize("serialise", [_via_rabbitmq_binding, _via_http_binding])
async def test_an_event_made_by_the_sdk_is_accepted_by_our_subscriber(
    transport: RabbitTransport, raw_channel: aio_pika.abc.AbstractChannel, serialise: Any
) -> None:
    collector = Collector()
    await transport.subscribe("sdk-reader", collector)
    event = _sdk_event()
    headers, content_type, body = serialise(event)
    exchange = await raw_channel.get_exchange(transport.channel, ensure=False)
    await exchange.publish(
        aio_pika.Message(body, headers=headers, content_type=content_type),
        routing_key=event.get_type(),
    )
    await collector.wait(1, 10)
    delivery = collector.deliveries[0]
    assert delivery.decode_error is None
    got = delivery.message
    assert got is not None
    assert got.id == event.get_id()
    assert got.type == "score.awarded"
    assert got.source == "https://example.com/score-engine"
    assert got.subject == "player-9"
    assert got.time == event.get_time()
    assert got.datacontenttype == "application/json"
    assert got.key == "player-9"
    assert got.correlationid == "corr-sdk"
    assert got.causationid is None
    assert got.traceparent == "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert dict(got.extensions) == {"tenant": "globex", "region": "eu1"}
    assert got.data == {"points": 3, "bonus": None, "tags": ["win", "away"]}
    assert delivery.attempt == 1
