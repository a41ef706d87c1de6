"""The transport contract suite: every transport must pass it against its real server.

Subclass :class:`TransportContract` in a test module and provide the
``transport_factory`` fixture: a callable that takes a channel name and returns
a new, unconnected transport on that channel. Optionally override
:meth:`publish_raw` so the suite can check how undecodable bytes are delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from accord.errors import TransportError
from accord.messages import Message
from accord.testing._eventually import wait_for
from accord.transports.base import Delivery, Transport

__all__ = ["Collector", "TransportContract"]

TransportFactory = Callable[[str], Transport]


class Collector:
    """A handler that records each delivery's message and attempt."""

    def __init__(self, fail_first: int = 0, settle: str = "auto") -> None:
        self.received: list[tuple[Message | None, int]] = []
        self.deliveries: list[Delivery] = []
        self.fail_first = fail_first
        self.settle = settle

    async def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        self.received.append((delivery.message, delivery.attempt))
        if len(self.received) <= self.fail_first:
            raise RuntimeError("handler failure requested by the test")
        if self.settle == "nack":
            await delivery.nack(0.2)
        elif self.settle == "reject":
            await delivery.reject("rejected by the test")

    @property
    def ids(self) -> list[str]:
        return [m.id for m, _ in self.received if m is not None]

    async def wait(self, count: int, timeout: float = 15.0) -> None:
        def enough() -> bool:
            return len(self.received) >= count

        await wait_for(enough, timeout)


def _messages(n: int, type: str = "test.happened", key: str | None = None) -> list[Message]:
    return [Message(type=type, data={"n": i}, key=key) for i in range(n)]


class TransportContract:
    """What every transport promises (see :class:`accord.transports.base.Transport`)."""

    #: Seconds a test waits for something that should happen promptly.
    timeout = 15.0

    @pytest.fixture
    def transport_factory(self) -> TransportFactory:
        raise NotImplementedError("subclass TransportContract and provide transport_factory")

    async def publish_raw(self, transport: Transport, headers: dict[str, str], body: bytes) -> None:
        """Put arbitrary bytes on the channel, bypassing encoding (override per backend)."""
        pytest.skip("this backend's test module does not provide publish_raw")

    @pytest.fixture
    def channel(self) -> str:
        return f"contract-{uuid.uuid4().hex[:12]}"

    @pytest.fixture
    async def open_transport(
        self, transport_factory: TransportFactory, channel: str
    ) -> AsyncIterator[Callable[[], Any]]:
        opened: list[Transport] = []

        async def open_one() -> Transport:
            transport = transport_factory(channel)
            await transport.connect()
            opened.append(transport)
            return transport

        yield open_one
        for transport in opened:
            with contextlib.suppress(Exception):
                await transport.close()

    async def test_published_message_arrives_with_every_attribute(
        self, open_transport: Any
    ) -> None:
        transport = await open_transport()
        collector = Collector()
        await transport.subscribe("g1", collector)
        sent = Message(
            type="order.placed",
            data={"order": 7, "items": ["a", "b"], "nested": {"x": 1.5}},
            source="tests/contract",
            subject="order-7",
            key="order-7",
            correlationid="corr-1",
            causationid="cause-1",
            traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            extensions={"tenant": "acme"},
        )
        await transport.publish([sent])
        await collector.wait(1, self.timeout)
        got, attempt = collector.received[0]
        assert attempt == 1
        assert got is not None
        assert got.id == sent.id
        assert got.type == sent.type
        assert got.source == sent.source
        assert got.subject == sent.subject
        assert got.key == sent.key
        assert got.correlationid == "corr-1"
        assert got.causationid == "cause-1"
        assert got.traceparent == sent.traceparent
        assert got.extensions.get("tenant") == "acme"
        assert got.data == sent.data
        assert abs((got.time - sent.time).total_seconds()) < 0.001

    async def test_every_group_gets_every_message(self, open_transport: Any) -> None:
        transport = await open_transport()
        first, second = Collector(), Collector()
        await transport.subscribe("first", first)
        await transport.subscribe("second", second)
        sent = _messages(20)
        await transport.publish(sent)
        await first.wait(20, self.timeout)
        await second.wait(20, self.timeout)
        assert sorted(first.ids) == sorted(m.id for m in sent)
        assert sorted(second.ids) == sorted(m.id for m in sent)

    async def test_consumers_of_one_group_compete(self, open_transport: Any) -> None:
        one, two = await open_transport(), await open_transport()
        a, b = Collector(), Collector()
        await one.subscribe("workers", a)
        await two.subscribe("workers", b)
        sent = _messages(60)
        await one.publish(sent)

        def all_arrived() -> bool:
            return len(set(a.ids) | set(b.ids)) == 60

        await wait_for(all_arrived, self.timeout)
        await asyncio.sleep(0.3)  # give a wrongly duplicated delivery time to show up
        assert sorted(a.ids + b.ids) == sorted(m.id for m in sent), "a message went to both members"

    async def test_topics_filter_by_type(self, open_transport: Any) -> None:
        transport = await open_transport()
        matches, everything = Collector(), Collector()
        await transport.subscribe("matches", matches, topics=["match.*"])
        await transport.subscribe("everything", everything, topics=["#"])
        await transport.publish(
            [
                Message(type="match.recorded"),
                Message(type="score.awarded"),
                Message(type="match.deep.nested"),
                Message(type="match.cancelled"),
            ]
        )
        await everything.wait(4, self.timeout)
        await matches.wait(2, self.timeout)
        await asyncio.sleep(0.3)
        assert sorted(m.type for m, _ in matches.received if m) == [
            "match.cancelled",
            "match.recorded",
        ]

    async def test_batch_order_is_kept_for_one_consumer(self, open_transport: Any) -> None:
        transport = await open_transport()
        collector = Collector()
        await transport.subscribe("ordered", collector)
        sent = _messages(300, key="k")
        for start in range(0, 300, 100):
            await transport.publish(sent[start : start + 100])
        await collector.wait(300, self.timeout)
        assert collector.ids == [m.id for m in sent]

    async def test_handler_error_redelivers_with_higher_attempt(self, open_transport: Any) -> None:
        transport = await open_transport()
        collector = Collector(fail_first=1)
        await transport.subscribe("retry", collector)
        sent = Message(type="test.retry")
        await transport.publish([sent])
        await collector.wait(2, self.timeout)
        assert [(m.id if m else None, a) for m, a in collector.received[:2]] == [
            (sent.id, 1),
            (sent.id, 2),
        ]

    async def test_nack_redelivers_after_delay(self, open_transport: Any) -> None:
        transport = await open_transport()
        collector = Collector(settle="nack")
        await transport.subscribe("nacked", collector)
        await transport.publish([Message(type="test.nack")])
        await collector.wait(3, self.timeout)
        assert [a for _, a in collector.received[:3]] == [1, 2, 3]

    async def test_acked_message_is_not_redelivered(self, open_transport: Any) -> None:
        transport = await open_transport()
        collector = Collector()
        subscription = await transport.subscribe("acked", collector)
        await transport.publish([Message(type="test.once")])
        await collector.wait(1, self.timeout)
        await asyncio.sleep(0.5)
        await subscription.stop()
        again = Collector()
        await transport.subscribe("acked", again)
        await asyncio.sleep(1.5)
        assert len(collector.received) == 1
        assert again.received == []

    async def test_rejected_message_is_not_redelivered(self, open_transport: Any) -> None:
        transport = await open_transport()
        collector = Collector(settle="reject")
        await transport.subscribe("rejects", collector)
        await transport.publish([Message(type="test.reject")])
        await collector.wait(1, self.timeout)
        await asyncio.sleep(1.5)
        assert len(collector.received) == 1

    async def test_group_keeps_messages_while_no_consumer_runs(self, open_transport: Any) -> None:
        publisher = await open_transport()
        early = Collector()
        subscription = await publisher.subscribe("durable", early)
        await subscription.stop()
        sent = _messages(5)
        await publisher.publish(sent)
        consumer = await open_transport()
        late = Collector()
        await consumer.subscribe("durable", late)
        await late.wait(5, self.timeout)
        assert sorted(late.ids) == sorted(m.id for m in sent)

    async def test_unsettled_delivery_comes_back_after_consumer_dies(
        self, open_transport: Any
    ) -> None:
        publisher = await open_transport()
        doomed = await open_transport()
        hold = asyncio.Event()
        seen: list[str] = []

        async def hang(delivery: Delivery) -> None:
            assert delivery.message is not None
            seen.append(delivery.message.id)
            await hold.wait()

        await doomed.subscribe("crashy", hang)
        sent = Message(type="test.crash")
        await publisher.publish([sent])

        def received() -> bool:
            return bool(seen)

        await wait_for(received, self.timeout)
        # Closing without settling stands in for the consumer's process dying.
        close = asyncio.create_task(doomed.close())
        await asyncio.sleep(0.1)
        hold.set()
        with contextlib.suppress(Exception):
            await close
        survivor = Collector()
        replacement = await open_transport()
        await replacement.subscribe("crashy", survivor)
        await survivor.wait(1, max(self.timeout, 30.0))
        assert survivor.ids[0] == sent.id
        assert survivor.received[0][1] >= 1

    async def test_undecodable_bytes_are_delivered_with_the_reason(
        self, open_transport: Any
    ) -> None:
        transport = await open_transport()
        collector = Collector()
        await transport.subscribe("raw", collector)
        await self.publish_raw(transport, {"ce-type": "x.y"}, b"\xff not json")
        await collector.wait(1, self.timeout)
        delivery = collector.deliveries[0]
        assert delivery.message is None
        assert delivery.decode_error is not None
        assert "missing required attribute" in str(delivery.decode_error)
        assert delivery.body == b"\xff not json"

    async def test_publish_after_close_raises_a_transport_error(self, open_transport: Any) -> None:
        transport = await open_transport()
        await transport.close()
        with pytest.raises(TransportError):
            await transport.publish([Message(type="test.closed")])
