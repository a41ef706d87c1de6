"""RabbitMQ transport: the transport contract, plus what only RabbitMQ does (dead-letter
exchange, publisher nacks, delay buckets, a broker restart), against the real broker."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import aio_pika
import pytest
from tests.brokers import delete_everything, rabbit_max_message_size
from tests.conftest import RABBIT_URL

from accord.errors import (
    ConfigurationError,
    MessageTooLarge,
    PublishError,
    TransportError,
    TransportUnavailable,
)
from accord.messages import Message
from accord.testing import Collector, TransportContract, wait_for
from accord.transports import from_url
from accord.transports._rabbitmq_support import message_properties
from accord.transports.base import Delivery, Transport
from accord.transports.rabbitmq import RabbitTransport

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
async def rabbit() -> AsyncIterator[Callable[..., RabbitTransport]]:
    """Make RabbitTransports; close them and delete what they declared afterwards."""
    made: list[RabbitTransport] = []

    def make(channel: str | None = None, **options: Any) -> RabbitTransport:
        transport = RabbitTransport(
            RABBIT_URL, channel=channel or f"test-{uuid.uuid4().hex[:12]}", **options
        )
        made.append(transport)
        return transport

    yield make
    channels: dict[str, set[str]] = {}
    for transport in made:
        with contextlib.suppress(Exception):
            await transport.close()
        channels.setdefault(transport.channel, set()).update(transport.groups)
    await delete_everything(channels)


async def ready_count(queue: str) -> int:
    """How many messages of a queue wait to be delivered (not those held unacked)."""
    connection = await aio_pika.connect(RABBIT_URL)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0
    finally:
        await connection.close()


async def raw_publish(
    exchange: str, routing_key: str, body: bytes, headers: dict[str, Any], **props: Any
) -> None:
    """Publish with plain aio-pika, bypassing Accord's encoding."""
    connection = await aio_pika.connect(RABBIT_URL)
    try:
        channel = await connection.channel()
        target = await channel.get_exchange(exchange, ensure=False)
        await target.publish(
            aio_pika.Message(body, headers=headers, **props), routing_key=routing_key
        )
    finally:
        await connection.close()


class TestRabbitTransport(TransportContract):
    timeout = 15.0

    @pytest.fixture
    def transport_factory(self, rabbit: Callable[..., RabbitTransport]) -> Any:
        return lambda channel: rabbit(channel)

    async def publish_raw(self, transport: Transport, headers: dict[str, str], body: bytes) -> None:
        assert isinstance(transport, RabbitTransport)
        await raw_publish(transport.channel, headers.get("ce-type", "raw"), body, dict(headers))


class TestRabbitSpecifics:
    def test_from_url_builds_a_rabbit_transport(self) -> None:
        transport = from_url(RABBIT_URL, channel="orders")
        assert isinstance(transport, RabbitTransport)
        assert transport.channel == "orders"

    def test_import_without_aio_pika_names_the_extra(self) -> None:
        code = (
            "import sys; sys.modules['aio_pika'] = None\n"
            "try:\n"
            "    import accord.transports.rabbitmq\n"
            "except ImportError as exc:\n"
            "    from accord.errors import MissingExtraError\n"
            "    assert isinstance(exc, MissingExtraError), type(exc)\n"
            "    print(exc)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert "pip install 'accord[rabbitmq]'" in result.stdout
        assert "aio-pika" in result.stdout

    async def test_rejected_message_lands_in_the_dead_letter_queue_with_its_reason(
        self, rabbit: Callable[..., RabbitTransport]
    ) -> None:
        transport = rabbit()
        await transport.connect()

        async def refuse(delivery: Delivery) -> None:
            await delivery.reject("amount must be positive")

        await transport.subscribe("payments", refuse)
        sent = Message(type="payment.requested", data={"amount": -5})
        await transport.publish([sent])

        connection = await aio_pika.connect(RABBIT_URL)
        try:
            channel = await connection.channel()
            dead = await channel.get_queue(transport.topology.dead_queue("payments"))

            async def dead_letter() -> aio_pika.abc.AbstractIncomingMessage | None:
                return await dead.get(no_ack=True, fail=False)

            got = await wait_for(dead_letter, 10)
            assert got.headers["x-accord-reason"] == "amount must be positive"
            assert got.headers["x-accord-group"] == "payments"
            assert got.headers["ce-id"] == sent.id
            assert got.message_id == sent.id
            assert got.content_type == "application/json"
            assert got.body == b'{"amount":-5}'
        finally:
            await connection.close()

    async def test_a_reason_longer_than_a_frame_is_cut_in_the_dead_letter(
        self, rabbit: Callable[..., RabbitTransport]
    ) -> None:
        """Headers travel in one AMQP frame (frame_max, 128 kB by default) and RabbitMQ
        closes the connection on a larger one: the copy failed, the delivery came back,
        and every reject of it closed the connection again. The reason is cut to fit."""
        transport = rabbit()
        await transport.connect()
        long_reason = "it went wrong: " + "why " * 75_000

        async def refuse(delivery: Delivery) -> None:
            await delivery.reject(long_reason)

        await transport.subscribe("verbose", refuse)
        sent = Message(type="verbose.failure")
        await transport.publish([sent])
        connection = await aio_pika.connect(RABBIT_URL)
        try:
            channel = await connection.channel()
            dead = await channel.get_queue(transport.topology.dead_queue("verbose"))

            async def dead_letter() -> aio_pika.abc.AbstractIncomingMessage | None:
                return await dead.get(no_ack=True, fail=False)

            got = await wait_for(dead_letter, 10)
            reason = got.headers["x-accord-reason"]
            assert isinstance(reason, str) and reason.startswith("it went wrong: why why")
            assert reason.endswith("[cut to fit RabbitMQ's frame_max]")
            assert 100_000 < len(reason) < 131_072
            assert got.headers["ce-id"] == sent.id
        finally:
            await connection.close()

    async def test_publisher_nacks_are_reported_per_message(
        self, rabbit: Callable[..., RabbitTransport]
    ) -> None:
        transport = rabbit()
        await transport.connect()
        limited = f"{transport.channel}.limited"
        connection = await aio_pika.connect(RABBIT_URL)
        try:
            channel = await connection.channel()
            queue = await channel.declare_queue(
                limited,
                arguments={"x-max-length": 3, "x-overflow": "reject-publish"},
            )
            await queue.bind(transport.channel, routing_key="limited.#")
            batch = [Message(type="limited.item", data=i) for i in range(5)]
            unrouted = Message(type="nobody.listens")
            with pytest.raises(PublishError) as caught:
                await transport.publish([*batch, unrouted])
            assert set(caught.value.failed) == {batch[3].id, batch[4].id}
            assert all(isinstance(e, TransportError) for e in caught.value.failed.values())
            assert (await queue.declare()).message_count == 3
        finally:
            with contextlib.suppress(Exception):
                await channel.queue_delete(limited)
            await connection.close()

    async def test_unreachable_broker_raises_transport_unavailable(self) -> None:
        transport = RabbitTransport(
            "amqp://guest:guest@127.0.0.1:1/", connect_timeout=2.0, publish_timeout=2.0
        )
        started = time.monotonic()
        with pytest.raises(TransportUnavailable):
            await transport.connect()
        with pytest.raises(TransportUnavailable):
            await transport.publish([Message(type="test.unreachable")])
        assert time.monotonic() - started < 10
        await transport.close()

    async def test_a_conflicting_declaration_is_a_transport_error(self) -> None:
        name = f"test-{uuid.uuid4().hex[:12]}"
        connection = await aio_pika.connect(RABBIT_URL)
        try:
            channel = await connection.channel()
            await channel.declare_exchange(name, aio_pika.ExchangeType.FANOUT, auto_delete=True)
            transport = RabbitTransport(RABBIT_URL, channel=name)
            with pytest.raises(TransportError, match="other settings"):
                await transport.connect()
            await transport.close()
        finally:
            with contextlib.suppress(Exception):
                channel = await connection.channel()
                await channel.exchange_delete(name)
            await connection.close()

    async def test_short_delay_is_not_stuck_behind_a_long_one(
        self, rabbit: Callable[..., RabbitTransport]
    ) -> None:
        transport = rabbit()
        await transport.connect()
        slow, quick = Message(type="retry.slow"), Message(type="retry.quick")
        seen: list[tuple[str, int]] = []

        async def nack(delivery: Delivery) -> None:
            assert delivery.message is not None
            seen.append((delivery.message.type, delivery.attempt))
            if delivery.attempt == 1:
                delay = 20.0 if delivery.message.type == "retry.slow" else 0.3
                await delivery.nack(delay)

        await transport.subscribe("delays", nack)
        await transport.publish([slow, quick])

        def quick_came_back() -> bool:
            return ("retry.quick", 2) in seen

        await wait_for(quick_came_back, 10)
        assert ("retry.slow", 2) not in seen
        assert seen[:2] == [("retry.slow", 1), ("retry.quick", 1)]

    async def test_attempt_grows_over_requeue_and_over_a_dead_consumer(
        self, rabbit: Callable[..., RabbitTransport]
    ) -> None:
        channel = f"test-{uuid.uuid4().hex[:12]}"
        first, second = rabbit(channel), rabbit(channel)
        await first.connect()
        await second.connect()
        attempts: list[int] = []
        hold = asyncio.Event()

        async def nack_then_hang(delivery: Delivery) -> None:
            attempts.append(delivery.attempt)
            if delivery.attempt == 1:
                await delivery.nack(0)  # straight back to the group queue
            else:
                await hold.wait()  # left unsettled when its transport closes:
                raise RuntimeError("the process died")  # it never returns normally

        await first.subscribe("attempts", nack_then_hang)
        await first.publish([Message(type="test.attempts")])
        await wait_for(lambda: len(attempts) == 2, 10)
        closing = asyncio.create_task(first.close())
        await asyncio.sleep(0.1)
        hold.set()
        await closing
        survivor = Collector()
        await second.subscribe("attempts", survivor)
        await survivor.wait(1, 10)
        assert attempts == [1, 2]
        assert survivor.received[0][1] == 3  # header said 2; the broker redelivered it

    async def test_client_errors_are_translated_per_message(
        self, rabbit: Callable[..., RabbitTransport]
    ) -> None:
        transport = rabbit()
        await transport.connect()
        # 200 characters (Message's limit), 400 bytes: over AMQP's 255 for a routing key.
        fine, too_long = Message(type="ok.type"), Message(type="é" * 200)
        with pytest.raises(PublishError) as caught:
            await transport.publish([fine, too_long])
        assert list(caught.value.failed) == [too_long.id]
        assert type(caught.value.failed[too_long.id]) is TransportError

    async def test_a_message_over_max_message_size_fails_alone_before_it_is_sent(
        self, rabbit: Callable[..., RabbitTransport]
    ) -> None:
        # RabbitMQ closes the channel on a message over its max_message_size, failing
        # every message sent after it in the batch: the transport keeps it back.
        transport = rabbit(max_message_size=4096)
        await transport.connect()
        collector = Collector()
        await transport.subscribe("sized", collector)
        small, after = Message(type="sized.small"), Message(type="sized.after")
        big = Message(type="sized.big", data={"pad": "x" * 5000})
        with pytest.raises(PublishError) as caught:
            await transport.publish([small, big, after])
        assert list(caught.value.failed) == [big.id]
        error = caught.value.failed[big.id]
        assert isinstance(error, MessageTooLarge) and "max_message_size=4,096" in str(error)
        await collector.wait(2)
        assert collector.ids == [small.id, after.id]

    async def test_a_large_batch_goes_out_whole_in_order_with_a_body_over_the_frame_size(
        self, rabbit: Callable[..., RabbitTransport]
    ) -> None:
        # One write for the whole batch: a body larger than the broker's frame size
        # (128 KiB by default) is split into frames, and a message that cannot be
        # encoded between the others fails alone.
        transport = rabbit()
        await transport.connect()
        collector = Collector()
        await transport.subscribe("large", collector, prefetch=500)
        big = Message(type="large.big", data={"pad": "x" * 300_000})
        batch = [Message(type="large.item", data={"n": n}) for n in range(400)]
        too_long = Message(type="é" * 200)  # a routing key over AMQP's 255 bytes
        batch[200:200] = [big, too_long]
        with pytest.raises(PublishError) as caught:
            await transport.publish(batch)
        assert list(caught.value.failed) == [too_long.id]
        sent = [m for m in batch if m is not too_long]
        await collector.wait(len(sent))
        assert collector.ids == [m.id for m in sent]
        [received] = [m for m, _ in collector.received if m is not None and m.id == big.id]
        assert received.data == big.data

    async def test_batch_ack_covers_the_leftovers_but_no_settlement_under_way(
        self, rabbit: Callable[..., RabbitTransport]
    ) -> None:
        # What a batch handler leaves unsettled is acked with one basic.ack (multiple),
        # which settles every lower tag of the channel. It must cover every leftover
        # (else they come back on stop), skip over ones already settled, and never
        # cover a nack still under way when the handler returns (started from a task of
        # its own): its own ack would be a double ack, and the broker closes the channel.
        transport = rabbit()
        await transport.connect()
        queue = transport.topology.queue("in-flight")
        released = [asyncio.Event(), asyncio.Event()]
        batches: list[list[Delivery]] = []

        async def handler(deliveries: Sequence[Delivery]) -> None:
            batches.append(list(deliveries))
            if len(batches) == 1:
                await released[0].wait()  # the next ones arrive meanwhile
            elif len(batches) == 2:
                await deliveries[1].reject("settled before the batch ack")
                await released[1].wait()
            elif len(batches) == 3:
                asyncio.create_task(deliveries[0].nack(0.3))  # noqa: RUF006 - done by its ack
                await asyncio.sleep(0)  # started: settled, not yet at the broker

        async def all_handed_to_the_consumer() -> bool:
            return await ready_count(queue) == 0

        subscription = await transport.subscribe_batches(
            "in-flight", handler, prefetch=20, max_batch=20
        )
        await transport.publish([Message(type="batch.first")])
        await wait_for(lambda: batches, 10)
        await transport.publish([Message(type="batch.item", data=i) for i in range(9)])
        await wait_for(all_handed_to_the_consumer, 10)
        released[0].set()
        await wait_for(lambda: len(batches) == 2, 10)  # held: the next nine queue up
        await transport.publish([Message(type="batch.item", data=i) for i in range(9)])
        await wait_for(all_handed_to_the_consumer, 10)
        released[1].set()
        await wait_for(lambda: len(batches) >= 4, 10)
        assert [len(b) for b in batches[:3]] == [1, 9, 9]
        nacked = batches[2][0]
        assert nacked.message is not None
        assert [(d.message.id if d.message else None, d.attempt) for d in batches[3]] == [
            (nacked.message.id, 2)
        ]
        # Every delivery came on one channel, still open: the broker never closed it.
        assert len({id(d._incoming.channel) for b in batches for d in b}) == 1  # type: ignore[attr-defined]
        await subscription.stop()
        # Nothing went back to the queue on stop: the batch acks covered every leftover.
        assert await ready_count(queue) == 0
        assert await ready_count(transport.topology.dead_queue("in-flight")) == 1

    async def test_a_batch_its_handler_finishes_during_stop_is_acked_not_requeued(
        self, rabbit: Callable[..., RabbitTransport]
    ) -> None:
        # stop() lets the handler call in progress finish; what that call handled (a
        # consumer's committed batch) is acked, not handed back to be delivered again.
        transport = rabbit()
        await transport.connect()
        queue = transport.topology.queue("finishing")
        entered, release = asyncio.Event(), asyncio.Event()
        handled: list[str] = []

        async def handler(deliveries: Sequence[Delivery]) -> None:
            entered.set()
            await release.wait()
            handled.extend(d.message.id for d in deliveries if d.message is not None)

        subscription = await transport.subscribe_batches("finishing", handler, max_batch=8)
        sent = [Message(type="batch.item", data=i) for i in range(3)]
        await transport.publish(sent)
        await asyncio.wait_for(entered.wait(), 10)
        stopping = asyncio.create_task(subscription.stop())
        await asyncio.sleep(0.2)  # stop() is waiting for the handler
        release.set()
        await stopping
        assert handled  # the batch in the handler's hands (1 to 3 of them)
        # Those it handled are gone; only those it never got (prefetched) are back.
        assert await ready_count(queue) == len(sent) - len(handled)

    async def test_a_delay_queue_deleted_under_the_transport_loses_nothing(
        self, rabbit: Callable[..., RabbitTransport]
    ) -> None:
        # A nack's delayed copy goes to a delay queue the transport declared once. An
        # operator deletes that queue: the copy is returned (mandatory), not confirmed
        # and dropped, so the message is not acked away; the queue is declared again.
        transport = rabbit()
        await transport.connect()
        seen: list[tuple[str, int]] = []

        async def handler(delivery: Delivery) -> None:
            assert delivery.message is not None
            seen.append((delivery.message.id, delivery.attempt))
            if delivery.attempt == 1:
                await delivery.nack(0.3)

        await transport.subscribe("delays", handler)
        first = Message(type="delay.me")
        await transport.publish([first])
        await wait_for(lambda: (first.id, 2) in seen, 15)
        connection = await aio_pika.connect(RABBIT_URL)
        try:
            channel = await connection.channel()
            await channel.queue_delete(transport.topology.retry_queue("delays", 0.3))
        finally:
            await connection.close()
        second = Message(type="delay.me")
        await transport.publish([second])
        await wait_for(lambda: any(i == second.id and a >= 2 for i, a in seen), 15)


async def rabbitmqctl(*args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(90):
            _out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, f"rabbitmqctl {' '.join(args)} failed: {err.decode()}"


@pytest.mark.serial
@pytest.mark.fault
@pytest.mark.slow
async def test_subscription_and_publishing_survive_a_broker_restart(
    rabbit: Callable[..., RabbitTransport],
) -> None:
    transport = rabbit(publish_timeout=3.0)
    await transport.connect()
    gate = asyncio.Event()
    seen: list[str] = []

    async def handler(delivery: Delivery) -> None:
        assert delivery.message is not None
        seen.append(delivery.message.id)
        await gate.wait()  # holds the first delivery (and the prefetched rest) unsettled

    await transport.subscribe("survivor", handler, prefetch=10)
    before = [Message(type="restart.before", data=i) for i in range(30)]
    await transport.publish(before)
    await wait_for(lambda: seen, 10)

    await rabbitmqctl("stop_app")
    try:
        with pytest.raises(TransportUnavailable):
            await transport.publish([Message(type="restart.during")])
        gate.set()  # the handler returns; its ack cannot reach the broker
    finally:
        await rabbitmqctl("start_app")

    after = [Message(type="restart.after", data=i) for i in range(30)]

    async def published() -> bool:
        try:
            await transport.publish(after)
        except TransportUnavailable:
            return False
        return True

    await wait_for(published, 30, interval=0.5)

    def everything_confirmed_arrived() -> bool:
        return {m.id for m in before + after} <= set(seen)

    await wait_for(everything_confirmed_arrived, 30)


@pytest.mark.serial
@pytest.mark.fault
@pytest.mark.slow
async def test_a_broker_that_blocks_publishers_times_a_batch_out_and_confirms_stay_in_step(
    rabbit: Callable[..., RabbitTransport],
) -> None:
    # A memory alarm makes RabbitMQ stop taking publishes: a batch must fail within
    # publish_timeout (not hang, nothing claimed confirmed), and once the alarm clears
    # every later confirm must be matched to its own message. A nack reported as an
    # ack would be a message lost by the relay, so the later batch overfills a
    # reject-publish queue: exactly its last two must fail.
    transport = rabbit(publish_timeout=2.0)
    await transport.connect()
    limited = f"{transport.channel}.blocked"
    connection = await aio_pika.connect(RABBIT_URL)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(
            limited, arguments={"x-max-length": 5, "x-overflow": "reject-publish"}
        )
        await queue.bind(transport.channel, routing_key="blocked.#")
        await rabbitmqctl("set_vm_memory_high_watermark", "0.0000001")
        try:
            held = [Message(type="elsewhere.held", data=i) for i in range(50)]
            with pytest.raises(TransportUnavailable, match="confirm"):
                await transport.publish(held)
        finally:
            await rabbitmqctl("set_vm_memory_high_watermark", "0.4")

        batch = [Message(type="blocked.item", data=i) for i in range(7)]

        async def answered() -> PublishError | None:
            try:
                await transport.publish(batch)
            except PublishError as exc:
                return exc
            except TransportUnavailable:
                return None  # the alarm is still clearing
            raise AssertionError("the queue holds 5: two of 7 must be refused")

        refused = await wait_for(answered, 30, interval=0.5)
        assert set(refused.failed) == {batch[5].id, batch[6].id}
        assert (await queue.declare()).message_count == 5
    finally:
        with contextlib.suppress(Exception):
            await channel.queue_delete(limited)
        await connection.close()


@pytest.mark.serial
async def test_a_broker_that_takes_less_than_max_message_size_refuses_one_message_alone(
    rabbit: Callable[..., RabbitTransport],
) -> None:
    """RabbitMQ set to take less than the transport believes closes the channel on the
    message over its limit, failing those sent after it in the batch. The one over it
    is MessageTooLarge; the others are an outage (tried again, no attempt spent); the
    transport takes the broker's limit from then on, and publishes again at once."""
    limit = 1024 * 1024
    async with rabbit_max_message_size(limit):
        transport = rabbit()  # max_message_size 16 MiB
        await transport.connect()
        collector = Collector()
        await transport.subscribe("sized", collector)
        small, after = Message(type="sized.small"), Message(type="sized.after")
        big = Message(type="sized.big", data="x" * (limit + 1), datacontenttype="text/plain")
        with pytest.raises(PublishError) as caught:
            await transport.publish([small, big, after])
        failed = caught.value.failed
        # The broker took `small`; its confirm may or may not beat the channel's close
        # (unconfirmed, it is an outage too: sent again, a duplicate the inbox drops).
        assert {big.id, after.id} <= set(failed) <= {small.id, big.id, after.id}
        assert isinstance(failed[big.id], MessageTooLarge)
        assert f"{limit + 1:,} bytes" in str(failed[big.id])
        assert f"max_message_size={limit:,}" in str(failed[big.id])
        assert all(type(failed[i]) is TransportUnavailable for i in set(failed) - {big.id})
        assert transport.message_size_limit == limit
        assert transport.max_message_size == 16 * 1024 * 1024  # as configured

        await transport.publish([after])  # the channel the broker closed is open again
        again, last = (
            Message(type="sized.big", data=big.data, datacontenttype="text/plain"),
            (Message(type="sized.last")),
        )
        with pytest.raises(PublishError) as caught:
            await transport.publish([again, last])  # kept back: the channel stays open
        assert list(caught.value.failed) == [again.id]
        await collector.wait(3)
        assert collector.ids == [small.id, after.id, last.id]


class TestRabbitQuorumTransport(TransportContract):
    """The contract on quorum queues (replicated; the broker counts redeliveries)."""

    timeout = 15.0

    @pytest.fixture
    def transport_factory(self, rabbit: Callable[..., RabbitTransport]) -> Any:
        return lambda channel: rabbit(channel, queue_type="quorum")

    async def publish_raw(self, transport: Transport, headers: dict[str, str], body: bytes) -> None:
        assert isinstance(transport, RabbitTransport)
        await raw_publish(transport.channel, headers.get("ce-type", "raw"), body, dict(headers))


@pytest.mark.parametrize(("queue_type", "third"), [("quorum", 3), ("classic", 2)])
async def test_a_message_whose_consumers_keep_dying_counts_each_delivery_on_quorum_queues(
    rabbit: Callable[..., RabbitTransport], queue_type: str, third: int
) -> None:
    """Two consumers take the message and go away without settling it. A quorum
    queue counts the deliveries (``x-delivery-count``): the third consumer sees
    attempt 3. A classic queue only flags a redelivery: attempt 2, as on the second."""
    channel = f"test-{uuid.uuid4().hex[:12]}"
    seen: list[int] = []
    for _ in range(2):
        dying = rabbit(channel, queue_type=queue_type)
        hold = asyncio.Event()

        async def hang(delivery: Delivery, hold: asyncio.Event = hold) -> None:
            seen.append(delivery.attempt)
            await hold.wait()
            raise RuntimeError("the process died")  # never settles

        count = len(seen)
        await dying.subscribe("dying", hang)
        if not count:
            await dying.publish([Message(type="test.dying")])
        await wait_for(lambda count=count: len(seen) == count + 1, 10)  # type: ignore[misc]
        closing = asyncio.create_task(dying.close())
        await asyncio.sleep(0.1)
        hold.set()
        await closing
    survivor = Collector()
    await rabbit(channel, queue_type=queue_type).subscribe("dying", survivor)
    await survivor.wait(1, 10)
    assert seen == [1, 2]
    assert survivor.received[0][1] == third


async def test_a_nack_of_hours_does_not_wait_behind_one_of_a_week(
    rabbit: Callable[..., RabbitTransport],
) -> None:
    """A delay queue's messages expire only at its head: every delay past 4096 s shared
    one queue, so a delivery nacked for two hours behind one nacked for a week waited
    the week. Each delay up to the week nack allows has a bucket of its own size."""
    transport = rabbit()
    await transport.connect()
    delays = {"test.week": 7 * 86_400.0, "test.hours": 2 * 3_600.0}

    async def put_off(delivery: Delivery) -> None:
        assert delivery.message is not None
        await delivery.nack(delays[delivery.message.type])

    await transport.subscribe("patient", put_off)
    await transport.publish([Message(type="test.week")])
    await transport.publish([Message(type="test.hours")])
    week, hours = (transport.topology.retry_queue("patient", d) for d in delays.values())
    assert week != hours

    async def both_waiting() -> bool:
        return await ready_count(week) == 1 and await ready_count(hours) == 1

    await wait_for(both_waiting, 10, interval=0.2)


@pytest.mark.parametrize("channel", ["amq.orders", "orders*", "orders>", "bestell-ü", "c" * 260])
def test_a_channel_rabbitmq_cannot_name_an_exchange_after_is_refused(channel: str) -> None:
    """The client refused such a name at connect() with its own 'Invalid value for
    exchange', and an 'amq.' one was reported as missing permissions on the vhost."""
    with pytest.raises(ConfigurationError, match="channel"):
        RabbitTransport(RABBIT_URL, channel=channel)


@pytest.mark.parametrize("group", ["grüppe", "a*b", "g" * 240])
async def test_a_group_rabbitmq_cannot_name_a_queue_after_is_refused(
    rabbit: Callable[..., RabbitTransport], group: str
) -> None:
    """Refused as a mistake in the code (ConfigurationError naming what is allowed)
    before anything is declared, not as the client's 'Invalid value for queue'."""
    transport = rabbit()
    await transport.connect()
    with pytest.raises(ConfigurationError, match="group"):
        await transport.declare(group)
    with pytest.raises(ConfigurationError, match="group"):
        await transport.subscribe(group, Collector())
    assert transport.groups == frozenset()


async def test_a_queue_type_rabbitmq_does_not_have_is_refused(
    rabbit: Callable[..., RabbitTransport],
) -> None:
    with pytest.raises(ConfigurationError, match="queue_type must be 'classic' or 'quorum'"):
        rabbit(queue_type="stream")


@pytest.mark.serial
async def test_a_limit_learned_from_the_broker_does_not_outlive_the_connection(
    rabbit: Callable[..., RabbitTransport],
) -> None:
    """The refusal's own advice is to raise max_message_size in rabbitmq.conf, which
    takes a broker restart, i.e. a new connection. The limit the transport learned
    from the old broker setting must not keep refusing, before it is sent, a message
    the broker now takes: that MessageTooLarge is final (the relay marks the row DEAD
    at once, no retry): the learned limit goes with the connection."""
    limit = 1024 * 1024
    transport = rabbit()  # max_message_size 16 MiB, as configured
    async with rabbit_max_message_size(limit):
        await transport.connect()  # its channel opens under the 1 MiB limit
        big = Message(type="sized.big", data="x" * (limit + 1), datacontenttype="text/plain")
        with pytest.raises(PublishError):
            await transport.publish([big])
        assert transport.message_size_limit == limit  # learned, for this connection
    # The operator raised the broker's limit back (128 MiB) and the broker restarted:
    # a new connection, whose channels take messages up to 128 MiB again.
    await transport.close()
    await transport.connect()
    collector = Collector()
    await transport.subscribe("sized", collector)
    again = Message(type="sized.big", data=big.data, datacontenttype="text/plain")
    await transport.publish([again])  # the broker takes it again
    await collector.wait(1, 10)
    assert collector.ids == [again.id]


async def test_a_first_delivery_with_a_copied_x_delivery_count_is_attempt_1_on_quorum(
    rabbit: Callable[..., RabbitTransport],
) -> None:
    """RabbitMQ sets x-delivery-count only on a redelivery (redelivered=True), and
    leaves a header of that name that arrived with the message alone on its first
    delivery. A message moved from another quorum queue (a shovel, the management
    UI's "move messages", e.g. dead letters replayed after someone looked at them
    with "get messages" / requeue) carries the old queue's count: on a quorum group
    queue its first delivery is still attempt 1 (counted as N + 1, the inbox would
    dead-letter it on its first failure once N + 1 >= max_attempts)."""
    transport = rabbit(queue_type="quorum")
    collector = Collector()
    await transport.subscribe("moved", collector)
    sent = Message(type="test.moved", data={"n": 1})
    properties, body = message_properties(sent)

    connection = await aio_pika.connect(RABBIT_URL)
    try:
        channel = await connection.channel()
        side = await channel.declare_queue(
            f"{transport.channel}.side", durable=True, arguments={"x-queue-type": "quorum"}
        )
        try:
            await channel.default_exchange.publish(
                aio_pika.Message(
                    body,
                    headers=dict(properties.headers or {}),
                    content_type=properties.content_type,
                    message_id=properties.message_id,
                ),
                routing_key=side.name,
            )
            # Someone looks at it and puts it back (x-delivery-count becomes 1) ...
            looked = None
            for _ in range(50):
                looked = await side.get(no_ack=False, fail=False)
                if looked is not None:
                    break
                await asyncio.sleep(0.05)
            assert looked is not None
            await looked.nack(requeue=True)
            moved = await side.get(no_ack=False)
            assert moved.redelivered and moved.headers["x-delivery-count"] == 1
            # ... then moves it to the group, properties and headers as they are.
            exchange = await channel.get_exchange(transport.channel, ensure=False)
            await exchange.publish(
                aio_pika.Message(
                    moved.body,
                    headers=dict(moved.headers),
                    content_type=moved.content_type,
                    message_id=moved.message_id,
                ),
                routing_key=sent.type,
            )
            await moved.ack()
        finally:
            await channel.queue_delete(side.name)
    finally:
        await connection.close()

    await collector.wait(1, 10)
    assert collector.ids == [sent.id]
    assert collector.received[0][1] == 1  # its first delivery to this group


@pytest.mark.parametrize("closes", [1, 2])
async def test_closing_while_a_handler_runs_lets_it_finish_and_settle(
    rabbit: Callable[..., RabbitTransport], closes: int
) -> None:
    """close() waits for the handler in flight and acks its message; a second close()
    at the same time closed the connection under it (its ack lost: delivered again)."""
    transport = rabbit()
    await transport.connect()
    started, finished = asyncio.Event(), asyncio.Event()

    async def slow(delivery: Delivery) -> None:
        started.set()
        await asyncio.sleep(1.0)
        finished.set()

    await transport.subscribe("closing", slow)
    await transport.publish([Message(type="test.slow")])
    await asyncio.wait_for(started.wait(), 15)
    await asyncio.gather(*(transport.close() for _ in range(closes)))
    assert finished.is_set()
    again = rabbit(channel=transport.channel)
    await again.connect()
    collector = Collector()
    await again.subscribe("closing", collector)
    await asyncio.sleep(2)
    assert collector.received == []
