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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest

from accord.errors import ConfigurationError, MessageTooLarge, PublishError, TransportError
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


class _Batches:
    """A batch handler that records every call, then lets ``react`` (if given) act on
    the batch: ``react(batch, call_number)``. Notes if two calls ever overlap."""

    def __init__(self, react: Callable[[list[Delivery], int], Awaitable[None]] | None = None):
        self.calls: list[list[Delivery]] = []
        self.react = react
        self.running = 0
        self.overlapped = False

    async def __call__(self, deliveries: Sequence[Delivery]) -> None:
        batch = list(deliveries)
        self.calls.append(batch)
        self.running += 1
        self.overlapped |= self.running > 1
        try:
            if self.react is not None:
                await self.react(batch, len(self.calls))
            await asyncio.sleep(0)  # a concurrent call would start here
        finally:
            self.running -= 1

    @property
    def received(self) -> list[tuple[str, int]]:
        """(message id, attempt) of every delivery, in the order of the calls."""
        return [(d.message.id, d.attempt) for b in self.calls for d in b if d.message is not None]

    @property
    def ids(self) -> list[str]:
        return [i for i, _ in self.received]

    async def wait(self, message: Message, timeout: float, attempt: int = 1) -> None:
        def arrived() -> bool:
            return (message.id, attempt) in self.received

        await wait_for(arrived, timeout)


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

    async def test_a_declared_group_keeps_what_is_published_before_its_first_subscribe(
        self, open_transport: Any
    ) -> None:
        publisher = await open_transport()
        await publisher.declare("declared", topics=["order.*"])
        await publisher.declare("declared", topics=["order.*"])  # idempotent
        wanted = _messages(3, type="order.placed")
        await publisher.publish([*wanted, Message(type="invoice.sent")])
        consumer = await open_transport()
        late = Collector()
        await consumer.subscribe("declared", late, topics=["order.*"])
        await late.wait(3, self.timeout)
        await asyncio.sleep(0.3)
        assert late.ids == [m.id for m in wanted]

    async def test_declaring_a_group_without_topics_says_what_is_wrong(
        self, open_transport: Any
    ) -> None:
        transport = await open_transport()
        with pytest.raises(ConfigurationError, match="topics must be a non-empty list"):
            await transport.declare("no-topics", topics=[])
        with pytest.raises(ConfigurationError, match="non-empty name"):
            await transport.declare("", topics=["#"])

    @pytest.mark.parametrize(
        ("prefetch", "max_batch"), [(64, 0), (64, 2.5), (64, True), (-1, 8), (2.5, 8)]
    )
    async def test_subscribing_with_a_batch_size_or_prefetch_that_is_none_says_so(
        self, open_transport: Any, prefetch: Any, max_batch: Any
    ) -> None:
        """The same refusal on every transport (a max_batch of 0 was refused by some and
        taken as 1 by others; a prefetch of 2.5 made a read loop fail for ever)."""
        transport = await open_transport()
        with pytest.raises(ConfigurationError, match=r"prefetch|max_batch"):
            await transport.subscribe_batches(
                "odd-sizes", _Batches(), prefetch=prefetch, max_batch=max_batch
            )

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
            # It never finishes: a handler that returned would have its delivery acked
            # (a transport that lets the handler finish on stop acks what it handled).
            raise RuntimeError("the process died before it settled")

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

    async def test_a_message_whose_headers_the_broker_cannot_take_fails_alone(
        self, open_transport: Any
    ) -> None:
        """Headers of 300 kB (one long extension): a broker that takes them delivers them
        whole; one that cannot (an AMQP frame, NATS's 64 kB of headers) fails that
        message alone with MessageTooLarge. Either way the messages around it arrive and
        the connection carries on (RabbitMQ closed it on such a frame)."""
        transport = await open_transport()
        collector = Collector()
        await transport.subscribe("large-headers", collector)
        before, after = Message(type="test.before"), Message(type="test.after")
        large = Message(type="test.large", extensions={"long": "x" * 300_000})
        try:
            await transport.publish([before, large, after])
        except PublishError as exc:
            assert set(exc.failed) == {large.id}, exc.failed
            assert isinstance(exc.failed[large.id], MessageTooLarge), exc.failed[large.id]
        marker = Message(type="test.marker")
        await transport.publish([marker])

        def marker_arrived() -> bool:
            return marker.id in collector.ids

        await wait_for(marker_arrived, self.timeout)
        assert {before.id, after.id} <= set(collector.ids)
        for message, _ in collector.received:
            if message is not None and message.id == large.id:
                assert message.extensions == large.extensions

    async def test_a_reject_with_a_very_long_reason_settles_the_delivery(
        self, open_transport: Any
    ) -> None:
        """A reason of 300 kB (a whole traceback, say) is kept, cut or left out where the
        broker has a dead letter, but the delivery is settled once and for all: it never
        comes back, and the connection carries on."""
        transport = await open_transport()
        seen: list[tuple[str, int]] = []

        async def refuse(delivery: Delivery) -> None:
            assert delivery.message is not None
            seen.append((delivery.message.id, delivery.attempt))
            if delivery.message.type == "test.refused":
                await delivery.reject("it went wrong: " + "why " * 75_000)

        await transport.subscribe("long-reasons", refuse)
        refused = Message(type="test.refused")
        await transport.publish([refused])
        # Longer than a held delivery takes to come back in the shipped test modules
        # (NATS's ack_wait, a Redis claim_idle, a SQL lease: 3 s at most).
        await asyncio.sleep(4.0)
        marker = Message(type="test.marker")
        await transport.publish([marker])

        def marker_arrived() -> bool:
            return (marker.id, 1) in seen

        await wait_for(marker_arrived, self.timeout)
        assert [s for s in seen if s[0] == refused.id] == [(refused.id, 1)]

    async def test_publish_after_close_raises_a_transport_error(self, open_transport: Any) -> None:
        transport = await open_transport()
        await transport.close()
        with pytest.raises(TransportError):
            await transport.publish([Message(type="test.closed")])

    # subscribe_batches: subscribe() is its max_batch=1 case, so every test above
    # covers it too; these check what only batches can show.

    async def _waiting_messages(self, transport: Transport, group: str, n: int) -> list[Message]:
        """Create ``group`` with a first subscribe, stop it, then publish ``n`` messages:
        they wait at the broker for the next consumer, so it can take several at once."""
        await (await transport.subscribe_batches(group, _Batches())).stop()
        sent = _messages(n)
        await transport.publish(sent)
        return sent

    async def _publish_marker(self, transport: Transport, batches: _Batches) -> Message:
        """Publish a message behind the others and wait until ``batches`` got it."""
        marker = Message(type="test.marker")
        await transport.publish([marker])
        await batches.wait(marker, self.timeout)
        return marker

    @pytest.mark.parametrize(("max_batch", "prefetch"), [(8, 64), (64, 5)])
    async def test_batches_keep_broker_order_each_message_once_bounded_one_call_at_a_time(
        self, open_transport: Any, max_batch: int, prefetch: int
    ) -> None:
        transport = await open_transport()
        sent = await self._waiting_messages(transport, "batched", 40)

        async def dawdle_first(batch: list[Delivery], call: int) -> None:
            if call == 1:
                await asyncio.sleep(0.2)  # more pile up behind the first call

        batches = _Batches(dawdle_first)
        await transport.subscribe_batches(
            "batched", batches, prefetch=prefetch, max_batch=max_batch
        )
        await batches.wait(sent[-1], self.timeout)
        marker = await self._publish_marker(transport, batches)
        assert batches.received == [(m.id, 1) for m in [*sent, marker]]
        sizes = [len(batch) for batch in batches.calls]
        assert all(1 <= size <= min(max_batch, prefetch) for size in sizes), sizes
        assert any(size > 1 for size in sizes), f"waiting messages never came batched: {sizes}"
        assert not batches.overlapped, "two handler calls of one subscription overlapped"

    async def test_deliveries_a_returning_batch_handler_left_unsettled_are_acked(
        self, open_transport: Any
    ) -> None:
        transport = await open_transport()
        first = _Batches()
        subscription = await transport.subscribe_batches("returns", first, prefetch=4)
        sent = _messages(10)
        await transport.publish(sent)
        # Where the broker bounds unacked deliveries by prefetch, the last ones arrive
        # only if the earlier ones were acked.
        await first.wait(sent[-1], self.timeout)
        # The call that gets the marker starts after every call holding `sent` returned.
        await self._publish_marker(transport, first)
        await subscription.stop()  # anything still unacked goes back to the group now
        second = _Batches()
        await transport.subscribe_batches("returns", second)
        await self._publish_marker(transport, second)  # the group is live again
        await asyncio.sleep(0.5)  # a given-back delivery could still be on its way
        assert [i for i in first.ids if i in {m.id for m in sent}] == [m.id for m in sent]
        assert not {m.id for m in sent} & set(second.ids), "an unsettled delivery came back"

    async def test_raising_batch_handler_gets_back_what_it_left_unsettled_not_what_it_acked(
        self, open_transport: Any
    ) -> None:
        transport = await open_transport()
        sent = await self._waiting_messages(transport, "raises", 6)
        failed: list[Delivery] = []

        async def ack_one_then_raise(batch: list[Delivery], call: int) -> None:
            if not failed and len(batch) > 1:
                failed.extend(batch)
                await batch[0].ack()
                raise RuntimeError("handler failure requested by the test")
            if call == 1:
                await asyncio.sleep(0.2)  # more pile up behind the first call

        batches = _Batches(ack_one_then_raise)
        await transport.subscribe_batches("raises", batches)

        def a_batch_of_several_failed() -> bool:
            return bool(failed)

        await wait_for(a_batch_of_several_failed, self.timeout)
        acked, *unsettled = [d.message for d in failed if d.message is not None]
        for message in unsettled:
            await batches.wait(message, self.timeout, attempt=2)
        marker = await self._publish_marker(transport, batches)

        def attempts(message: Message) -> list[int]:
            return [attempt for i, attempt in batches.received if i == message.id]

        assert attempts(acked) == [1], "the delivery the handler acked came back"
        assert {m.id: attempts(m) for m in unsettled} == {m.id: [1, 2] for m in unsettled}
        others = [m for m in [*sent, marker] if m.id not in {d.id for d in unsettled}]
        assert {m.id: attempts(m) for m in others} == {m.id: [1] for m in others}

    async def test_nacking_one_delivery_of_a_batch_brings_back_only_that_one(
        self, open_transport: Any
    ) -> None:
        transport = await open_transport()
        sent = await self._waiting_messages(transport, "nacks-one", 6)
        nacked: list[Message] = []

        async def nack_the_second(batch: list[Delivery], call: int) -> None:
            if not nacked and len(batch) > 1:
                assert batch[1].message is not None
                nacked.append(batch[1].message)
                await batch[1].nack(0.2)
            elif call == 1:
                await asyncio.sleep(0.2)  # more pile up behind the first call

        batches = _Batches(nack_the_second)
        await transport.subscribe_batches("nacks-one", batches)

        def a_batch_of_several_came() -> bool:
            return bool(nacked)

        await wait_for(a_batch_of_several_came, self.timeout)
        await batches.wait(nacked[0], self.timeout, attempt=2)
        marker = await self._publish_marker(transport, batches)
        expected = {m.id: [1] for m in [*sent, marker]}
        expected[nacked[0].id] = [1, 2]
        got: dict[str, list[int]] = {}
        for i, attempt in batches.received:
            got.setdefault(i, []).append(attempt)
        assert got == expected

    async def test_topics_filter_batches_too(self, open_transport: Any) -> None:
        transport = await open_transport()
        matches, several = _Batches(), _Batches()
        await transport.subscribe_batches("matches", matches, topics=["match.*"])
        await transport.subscribe_batches("several", several, topics=["match.recorded", "score.*"])
        types = [
            "match.recorded",
            "score.awarded",
            "match.deep.nested",
            "other.thing",
            "match.cancelled",
        ]
        await transport.publish([Message(type=t) for t in types])
        # Markers behind the rest: once a group has its marker, it has had the rest too.
        match_end, score_end = Message(type="match.end"), Message(type="score.end")
        await transport.publish([match_end, score_end])
        await matches.wait(match_end, self.timeout)
        await several.wait(score_end, self.timeout)

        def types_of(batches: _Batches) -> list[str]:
            return [d.message.type for b in batches.calls for d in b if d.message is not None]

        assert types_of(matches) == ["match.recorded", "match.cancelled", "match.end"]
        assert types_of(several) == ["match.recorded", "score.awarded", "score.end"]
        assert all(matches.calls) and all(several.calls), "a handler got an empty batch"
