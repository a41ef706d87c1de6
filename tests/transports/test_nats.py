"""NATS JetStream transport: the contract suite plus JetStream specifics, on the real server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import nats
import nats.js.errors
import pytest
from tests.conftest import NATS_URL
from tests.processes import a_killed_consumers_delivery_comes_back

from accord.errors import MessageTooLarge, PublishError, TransportError, TransportUnavailable
from accord.messages import Message
from accord.testing import Collector, TransportContract, wait_for
from accord.transports._nats_consume import header_size
from accord.transports.base import Delivery, Envelope, Transport
from accord.transports.nats import NatsTransport, durable_name, stream_name, subject_filter

pytestmark = pytest.mark.nats


async def _delete_stream(channel: str) -> None:
    nc = await nats.connect(NATS_URL)
    try:
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(stream_name(channel))
    finally:
        await nc.close()


class TestNatsTransport(TransportContract):
    timeout = 15.0

    @pytest.fixture
    async def transport_factory(self, channel: str) -> AsyncIterator[Callable[[str], Transport]]:
        # A short ack_wait so "a consumer that died" is redelivered quickly.
        yield lambda ch: NatsTransport(NATS_URL, channel=ch, ack_wait=3.0)
        await _delete_stream(channel)

    async def publish_raw(self, transport: Transport, headers: dict[str, str], body: bytes) -> None:
        assert isinstance(transport, NatsTransport)
        nc = await nats.connect(NATS_URL)
        try:
            await nc.jetstream().publish(f"{transport.channel}.raw", body, headers=headers)
        finally:
            await nc.close()


@pytest.fixture
async def nats_transport() -> AsyncIterator[NatsTransport]:
    transport = NatsTransport(NATS_URL, channel=f"nats-{uuid.uuid4().hex[:12]}", ack_wait=2.0)
    await transport.connect()
    yield transport
    await transport.close()
    await _delete_stream(transport.channel)


async def _stored(transport: NatsTransport) -> int:
    nc = await nats.connect(NATS_URL)
    try:
        info = await nc.jetstream().stream_info(transport.stream)
        return int(info.state.messages)
    finally:
        await nc.close()


def test_subject_filter_maps_what_one_subject_can_express() -> None:
    assert subject_filter("ch", ["#"]) == ("ch.>", True)
    assert subject_filter("ch", ["match.*"]) == ("ch.match.*", True)
    assert subject_filter("ch", ["match.recorded"]) == ("ch.match.recorded", True)
    # "#" also matches zero words; several topics need several subjects: go broad.
    assert subject_filter("ch", ["match.#"]) == ("ch.>", False)
    assert subject_filter("ch", ["a.*", "b.*"]) == ("ch.>", False)


async def test_republishing_the_same_id_is_stored_once(nats_transport: NatsTransport) -> None:
    collector = Collector()
    await nats_transport.subscribe("dedup", collector)
    message = Message(type="test.dup")
    await nats_transport.publish([message])
    await nats_transport.publish([message, message])  # a relay retrying after a crash
    await nats_transport.publish([Message(type="test.marker")])
    await collector.wait(2)
    assert await _stored(nats_transport) == 2
    assert collector.ids[0] == message.id
    assert collector.ids.count(message.id) == 1


async def test_publish_error_names_exactly_the_unconfirmed(nats_transport: NatsTransport) -> None:
    good, bad = Message(type="test.good"), Message(type="test.bad subject")
    with pytest.raises(PublishError) as raised:
        await nats_transport.publish([good, bad])
    assert set(raised.value.failed) == {bad.id}
    assert "NATS subject" in str(raised.value.failed[bad.id])
    assert await _stored(nats_transport) == 1


async def _limit_messages(transport: NatsTransport, size: int) -> None:
    """Set the stream's max_msg_size (JetStream then refuses larger messages)."""
    nc = await nats.connect(NATS_URL)
    try:
        js = nc.jetstream()
        config = (await js.stream_info(transport.stream)).config
        config.max_msg_size = size
        await js.update_stream(config)
    finally:
        await nc.close()


async def test_a_message_jetstream_refuses_fails_alone_with_its_reason(
    nats_transport: NatsTransport,
) -> None:
    await _limit_messages(nats_transport, 2048)
    small, big, after = (
        Message(type="test.small"),
        Message(type="test.big", data={"pad": "x" * 4096}),
        Message(type="test.after"),
    )
    with pytest.raises(PublishError) as raised:
        await nats_transport.publish([small, big, after])
    assert set(raised.value.failed) == {big.id}
    assert isinstance(raised.value.failed[big.id], MessageTooLarge)  # a relay: DEAD at once
    assert "JetStream refused" in str(raised.value.failed[big.id])
    assert "max_msg_size" in str(raised.value.failed[big.id])
    assert await _stored(nats_transport) == 2


async def test_a_message_over_max_payload_fails_alone_and_the_connection_stays(
    nats_transport: NatsTransport,
) -> None:
    """The server takes at most max_payload bytes, headers included, and closes the
    connection on a larger message (failing every other one in flight). The one
    whose body is over the limit, and the one whose headers take it over, fail
    alone with MessageTooLarge naming the setting; the others are stored, and the
    connection still publishes."""
    limit = nats_transport._nc.max_payload  # type: ignore[union-attr]
    over = Message(type="test.over", data="x" * limit)
    edge = Message(type="test.edge", data="x" * (limit - 12))  # its JSON body: limit - 10
    assert len(edge.data) + 2 < limit
    small, after = Message(type="test.small"), Message(type="test.after")
    with pytest.raises(PublishError) as raised:
        await nats_transport.publish([small, over, edge, after])
    assert set(raised.value.failed) == {over.id, edge.id}
    for error in raised.value.failed.values():
        assert isinstance(error, MessageTooLarge) and "max_payload" in str(error)
    await nats_transport.publish([Message(type="test.later")])
    assert await _stored(nats_transport) == 3


async def test_a_rejected_message_near_max_payload_is_dead_lettered_with_a_shorter_reason(
    nats_transport: NatsTransport,
) -> None:
    """The dead copy carries the reason in a header, and the server closes the
    connection on a message over max_payload, headers included: for a message near
    the limit the reason is cut to fit, and the copy is stored."""
    limit = nats_transport._nc.max_payload  # type: ignore[union-attr]
    near = Message(type="test.near", data="x" * (limit - 2000))

    class Refuse(Collector):
        async def __call__(self, delivery: Delivery) -> None:
            await super().__call__(delivery)
            await delivery.reject("projection failed: " + "why " * 1000)

    await nats_transport.subscribe("near group", Refuse())
    await nats_transport.publish([near])
    copy = await _dead_copy(nats_transport, "near group")
    assert copy.headers["ce-id"] == near.id
    reason = copy.headers["accord-dead-reason"]
    assert reason.startswith("projection failed: why") and len(reason) < 2000
    await nats_transport.publish([Message(type="test.later")])  # still connected


def _wire_size(message: Message) -> int:
    """Body and headers as the transport sends them (what max_payload counts)."""
    envelope = Envelope.of(message)
    headers = {**envelope.headers, "Nats-Msg-Id": envelope.id}
    return len(envelope.body) + header_size(headers)


def _sized(type_: str, total: int) -> Message:
    """A message of exactly ``total`` bytes on the wire, headers included."""
    probe = Message(type=type_, data="")  # a JSON string: one more byte a character
    sized = dataclasses.replace(probe, data="x" * (total - _wire_size(probe)))
    assert _wire_size(sized) == total
    return sized


async def _dead_copy(transport: NatsTransport, group: str) -> Any:
    nc = await nats.connect(NATS_URL)
    try:
        subject = f"{transport.channel}._dead.{durable_name(group)}"

        async def dead_copy() -> Any:
            client = transport._nc
            assert client is not None and not client.is_closed, "the client was closed"
            with contextlib.suppress(nats.js.errors.NotFoundError):
                return await nc.jetstream().get_last_msg(transport.stream, subject)
            return None

        return await wait_for(dead_copy, 12)
    finally:
        await nc.close()


async def test_a_rejected_message_at_max_payload_leaves_a_copy_that_points_to_it(
    nats_transport: NatsTransport,
) -> None:
    """A message of exactly max_payload bytes: a copy with the dead-letter headers
    would be larger, and the server would close the client for good. The copy is
    left empty, its reason saying where the original stays; the client publishes on."""
    limit = nats_transport._nc.max_payload  # type: ignore[union-attr]
    edge = _sized("test.edge", limit)
    await nats_transport.subscribe("edge group", Collector(settle="reject"))
    await nats_transport.publish([edge])
    copy = await _dead_copy(nats_transport, "edge group")
    assert copy.headers["ce-id"] == edge.id and not copy.data
    reason = copy.headers["accord-dead-reason"]
    assert reason.startswith("rejected by the test") and "max_payload" in reason
    assert f"stream sequence {copy.seq - 1}" in reason  # stored just before its copy
    original = await _stored_message(nats_transport, copy.seq - 1)
    assert original.headers["ce-id"] == edge.id
    await nats_transport.publish([Message(type="test.later")])


async def test_a_rejected_message_near_the_streams_max_msg_size_leaves_a_copy(
    nats_transport: NatsTransport,
) -> None:
    """The stream's max_msg_size counts headers too: the full copy of a message just
    under it is refused (before, the delivery was rejected again and again); an
    empty copy pointing to it is stored instead."""
    await _limit_messages(nats_transport, 4096)
    near = _sized("test.near", 4096 - 8)
    await nats_transport.subscribe("near group", Collector(settle="reject"))
    await nats_transport.publish([near])
    copy = await _dead_copy(nats_transport, "near group")
    assert copy.headers["ce-id"] == near.id and not copy.data
    assert "max_msg_size" in copy.headers["accord-dead-reason"]


async def _stored_message(transport: NatsTransport, seq: int) -> Any:
    nc = await nats.connect(NATS_URL)
    try:
        return await nc.jetstream().get_msg(transport.stream, seq)
    finally:
        await nc.close()


async def test_publishing_without_the_stream_is_an_outage_not_a_bad_message(
    nats_transport: NatsTransport,
) -> None:
    await _delete_stream(nats_transport.channel)
    with pytest.raises(TransportUnavailable, match="NoStreamResponse"):
        await nats_transport.publish([Message(type="test.one"), Message(type="test.two")])


async def test_a_batch_not_confirmed_in_time_fails_whole_and_late_acks_are_ignored(
    nats_transport: NatsTransport,
) -> None:
    nats_transport.publish_timeout = 0.0  # no PubAck can beat it
    first = [Message(type="test.late") for _ in range(3)]
    with pytest.raises(TransportUnavailable, match="no PubAck"):
        await nats_transport.publish(first)
    nats_transport.publish_timeout = 10.0
    await asyncio.sleep(0.2)  # the late PubAcks of the first batch arrive meanwhile
    await nats_transport.publish([Message(type="test.next")])
    assert await _stored(nats_transport) == 4
    assert nats_transport._acks is not None and not nats_transport._acks._waiting


async def test_a_publish_in_flight_when_the_transport_closes_ends_with_it() -> None:
    """close() closes the connection, so no PubAck can come any more: a publish waiting
    for its batch's PubAcks fails then, as an outage (retried, deduplicated by
    Nats-Msg-Id), instead of waiting out publish_timeout for nothing."""
    channel = f"nats-{uuid.uuid4().hex[:12]}"
    transport = NatsTransport(NATS_URL, channel=channel, publish_timeout=120.0)
    await transport.connect()
    try:
        publishing = asyncio.create_task(
            transport.publish([Message(type="test.closing", data=i) for i in range(2000)])
        )
        await asyncio.sleep(0.005)
        assert not publishing.done(), "the batch was confirmed before close(): try more"
        await transport.close()
        async with asyncio.timeout(15):  # not the 120 s of publish_timeout
            # TransportUnavailable, or PublishError if some PubAcks made it before close().
            with pytest.raises(TransportError, match="closed before JetStream confirmed"):
                await publishing
    finally:
        await transport.close()
        await _delete_stream(channel)


async def test_every_copy_of_a_message_in_one_batch_is_confirmed_and_forgotten(
    nats_transport: NatsTransport,
) -> None:
    message = Message(type="test.twice")
    await nats_transport.publish([message, Message(type="test.other"), message])
    assert await _stored(nats_transport) == 2
    assert nats_transport._acks is not None and not nats_transport._acks._waiting


async def test_reject_copies_to_the_dead_subject_with_the_reason(
    nats_transport: NatsTransport,
) -> None:
    collector = Collector(settle="reject")
    await nats_transport.subscribe("picky group", collector)
    sent = Message(type="test.poison", data={"x": 1})
    await nats_transport.publish([sent])
    await collector.wait(1)
    copy = await _dead_copy(nats_transport, "picky group")
    assert copy.headers["accord-dead-reason"] == "rejected by the test"
    assert copy.headers["accord-dead-group"] == "picky group"
    assert copy.headers["ce-id"] == sent.id
    assert copy.data == b'{"x":1}'


async def test_topics_one_subject_cannot_express_are_filtered_client_side(
    nats_transport: NatsTransport,
) -> None:
    deep, several = Collector(), Collector()
    await nats_transport.subscribe("deep", deep, topics=["match.#"])
    await nats_transport.subscribe("several", several, topics=["match.recorded", "score.*"])
    everything = Collector()
    await nats_transport.subscribe("everything", everything)
    types = ["match", "match.recorded", "match.a.b", "score.awarded", "other.thing"]
    await nats_transport.publish([Message(type=t) for t in types])
    await everything.wait(5)
    await deep.wait(3)
    await several.wait(2)
    await nats_transport.publish([Message(type="match.end")])  # a marker behind the rest
    await deep.wait(4)
    assert [m.type for m, _ in deep.received if m] == [
        "match",
        "match.recorded",
        "match.a.b",
        "match.end",
    ]
    assert [m.type for m, _ in several.received if m] == ["match.recorded", "score.awarded"]


async def test_nack_delay_is_honoured(nats_transport: NatsTransport) -> None:
    times: list[float] = []

    async def handler(delivery: Delivery) -> None:
        times.append(time.monotonic())
        if len(times) == 1:
            await delivery.nack(1.0)

    await nats_transport.subscribe("later", handler)
    await nats_transport.publish([Message(type="test.later")])
    await wait_for(lambda: len(times) >= 2, 10)
    assert times[1] - times[0] >= 0.9


async def test_unreachable_server_raises_transport_unavailable() -> None:
    transport = NatsTransport("nats://127.0.0.1:1", connect_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(TransportUnavailable, match="cannot connect to NATS"):
        await transport.connect()
    assert time.monotonic() - started < 10
    with pytest.raises(TransportUnavailable):
        await transport.publish([Message(type="test.nowhere")])


def test_importing_without_the_driver_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['nats'] = None\n"
        "try:\n    import accord.transports.nats\n"
        "except ImportError as exc:\n    print(type(exc).__name__, exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "MissingExtraError" in out.stdout
    assert "accord[nats]" in out.stdout


@pytest.mark.fault
async def test_delivery_held_by_a_killed_process_comes_back_after_ack_wait(
    nats_transport: NatsTransport,
) -> None:
    await a_killed_consumers_delivery_comes_back(
        nats_transport,
        "from accord.transports.nats import NatsTransport",
        "NatsTransport(sys.argv[1], channel=sys.argv[2], ack_wait=2.0)",
        NATS_URL,
        nats_transport.channel,
    )


def _nats_server_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-x", "nats-server"], capture_output=True, text=True)
    return [int(pid) for pid in out.stdout.split()]


def _start_nats_server() -> None:
    subprocess.run(_NATS_START, check=True)


_NATS_START = [
    "start-stop-daemon", "--start", "--oknodo", "--background", "--exec", "/usr/sbin/nats-server",
    "--", "-a", "127.0.0.1", "-p", "4222", "-js", "-sd", "/var/lib/nats-server",
    "-l", "/var/log/nats-server.log",
]  # fmt: skip


@pytest.mark.serial
@pytest.mark.fault
@pytest.mark.slow
async def test_survives_a_server_restart_without_losing_confirmed_messages(
    nats_transport: NatsTransport,
) -> None:
    collector = Collector()
    await nats_transport.subscribe("restart", collector)
    # A group with no consumer running: what it was sent must survive the crash on disk.
    await (await nats_transport.subscribe("offline", Collector())).stop()
    before = [Message(type="test.before", data={"n": i}) for i in range(20)]
    await nats_transport.publish(before)
    held = [Message(type="test.held", data={"n": i}) for i in range(20)]
    try:
        for pid in _nats_server_pids():
            os.kill(pid, signal.SIGKILL)
        await wait_for(lambda: not _nats_server_pids(), 10)
        with pytest.raises(TransportUnavailable):
            await nats_transport.publish(held)
    finally:
        _start_nats_server()

    async def published_after_restart() -> bool:
        try:
            await nats_transport.publish(held)
        except TransportUnavailable:
            return False
        return True

    await wait_for(published_after_restart, 60, interval=0.2)
    after = [Message(type="test.after", data={"n": i}) for i in range(20)]
    await nats_transport.publish(after)
    expected = {m.id for m in before + held + after}
    await wait_for(lambda: expected <= set(collector.ids), 30)
    assert set(collector.ids) == expected
    offline = Collector()
    await nats_transport.subscribe("offline", offline)
    await wait_for(lambda: expected <= set(offline.ids), 30)
