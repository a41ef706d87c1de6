"""RabbitMQ transport internals: names of what it declares, header mapping, error translation.

Imported only by :mod:`accord.transports.rabbitmq`, after it checked that aio-pika is
installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiormq
import aiormq.exceptions as amqp_errors
import pamqp.frame
from aiormq.abc import ChannelFrame
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader
from yarl import URL

from accord.errors import ConfigurationError, MessageTooLarge, TransportError, TransportUnavailable
from accord.messages import Message
from accord.transports.base import Envelope

__all__ = [
    "ATTEMPT_HEADER",
    "DELIVERY_COUNT_HEADER",
    "GROUP_HEADER",
    "REASON_HEADER",
    "RETRY_BUCKETS_MS",
    "RabbitTopology",
    "attempt_of",
    "check_names",
    "delivery_headers",
    "encode_publish",
    "envelope_properties",
    "fit_header_frame",
    "message_properties",
    "redact",
    "refused_size",
    "republish_properties",
    "send_confirmed",
    "translate",
    "translated",
]

#: Header carrying the delivery attempt of a message Accord put back for redelivery.
ATTEMPT_HEADER = "x-accord-attempt"
#: Header a quorum queue sets on a delivery: how many times it was delivered before.
DELIVERY_COUNT_HEADER = "x-delivery-count"
#: Header carrying the reason of a rejected (dead-lettered) message.
REASON_HEADER = "x-accord-reason"
#: Header naming the consumer group that rejected a dead-lettered message.
GROUP_HEADER = "x-accord-group"

#: Upper bounds (milliseconds) of the retry queues' delay buckets: 0.25 s, 0.5 s, 1 s, ...
#: about 12 days, past the longest delay a nack waits (a week). A delay goes to the
#: smallest bucket that holds it. Per-message TTL only expires at the head of a queue,
#: so a message can be held up by one ahead of it in the *same* bucket - never by more
#: than the bucket's bound, which is at most twice the delay asked for. (Buckets used to
#: end at 4096 s, longer delays sharing one queue: two hours waited behind a week.)
RETRY_BUCKETS_MS: tuple[int, ...] = tuple(250 << k for k in range(23))

# Headers RabbitMQ adds when it dead-letters or (quorum queues) redelivers; a
# republished copy must not carry them.
_BROKER_HEADERS = ("x-death", "x-first-death-", "x-last-death-", DELIVERY_COUNT_HEADER)


@dataclass(frozen=True)
class RabbitTopology:
    """The names of every exchange and queue a RabbitTransport on ``channel`` declares.

    * ``{channel}`` - topic exchange; messages are routed by their ``type``.
    * ``{channel}.dead`` - direct exchange for rejected messages, routed by group.
    * ``{channel}.{group}`` - the group's durable queue, bound with its topic patterns.
    * ``{channel}.{group}.retry.{ms}ms`` - delay queues for ``nack(delay)``,
      dead-lettering back into the group queue when a message expires (older versions
      also declared ``.retry.long``, for delays past 4096 s).
    * ``{channel}.{group}.dead`` - the group's dead-letter queue.
    """

    channel: str

    @property
    def exchange(self) -> str:
        """The topic exchange publishers send to."""
        return self.channel

    @property
    def dead_exchange(self) -> str:
        """The direct exchange rejected messages go to (routing key = group)."""
        return f"{self.channel}.dead"

    def queue(self, group: str) -> str:
        """The durable queue of a consumer group."""
        return f"{self.channel}.{group}"

    def dead_queue(self, group: str) -> str:
        """The durable queue holding the messages a group rejected."""
        return f"{self.channel}.{group}.dead"

    def retry_queue(self, group: str, delay: float) -> str:
        """The delay queue for redelivering to ``group`` after ``delay`` seconds."""
        bucket = _bucket(delay)
        suffix = "long" if bucket is None else f"{bucket}ms"
        return f"{self.channel}.{group}.retry.{suffix}"

    def queues(self, group: str) -> list[str]:
        """Every queue the transport may declare for ``group`` (to delete a group)."""
        retry = [f"{self.channel}.{group}.retry.{ms}ms" for ms in RETRY_BUCKETS_MS]
        return [
            self.queue(group),
            self.dead_queue(group),
            *retry,
            f"{self.channel}.{group}.retry.long",
        ]


# What the client (pamqp) lets an exchange or queue name hold, and the most bytes AMQP
# carries of one (a short string).
_NAME = re.compile(r"[a-zA-Z0-9\-_.:@#,/+ ]+")
_NAME_BYTES = 255
_ALLOWED = "letters a-z and A-Z, digits, spaces and - _ . : @ # , / +"


def check_names(channel: str, group: str | None = None) -> None:
    """Raise ConfigurationError unless RabbitMQ can name the exchanges of ``channel``
    (and the queues of ``group``, if given) after them: the client refused other
    characters with its own ValueError, and the broker keeps ``amq.`` to itself."""
    if not channel or not _NAME.fullmatch(channel) or channel.startswith("amq."):
        raise ConfigurationError(
            f"RabbitMQ channel {channel!r} cannot name an exchange: use {_ALLOWED}, "
            "and do not start it with 'amq.' (RabbitMQ's own)"
        )
    topology = RabbitTopology(channel)
    if len(topology.dead_exchange) > _NAME_BYTES:
        raise ConfigurationError(
            f"RabbitMQ channel {channel[:40]!r}... is {len(channel)} characters long; "
            f"its exchange names must fit {_NAME_BYTES} (use at most "
            f"{_NAME_BYTES - len('.dead')})"
        )
    if group is None:
        return
    longest = max(topology.queues(group), key=len)
    if not _NAME.fullmatch(group):
        raise ConfigurationError(
            f"consumer group {group!r} cannot name a RabbitMQ queue: use {_ALLOWED}"
        )
    if len(longest) > _NAME_BYTES:
        raise ConfigurationError(
            f"consumer group {group[:40]!r}... is too long for RabbitMQ on channel "
            f"{channel!r}: its delay queue names must fit {_NAME_BYTES} characters, "
            f"so the group may have at most {len(group) - len(longest) + _NAME_BYTES}"
        )


def _bucket(delay: float) -> int | None:
    millis = delay * 1000
    for bound in RETRY_BUCKETS_MS:
        if millis <= bound:
            return bound
    return None


def _header_frame(channel: aiormq.Channel, properties: Any, body_size: int) -> bytes:
    return pamqp.frame.marshal(
        ContentHeader(properties=properties, body_size=body_size), channel.number
    )


def _frame_room(channel: aiormq.Channel, header: bytes) -> int | None:
    """Bytes to spare in the frame of a content ``header`` (negative: too large), or
    None when the broker sets no frame size limit (frame_max 0)."""
    frame_max = channel.max_content_size + channel.CONTENT_FRAME_SIZE
    return frame_max - len(header) if frame_max > 0 else None


def _checked_header_frame(channel: aiormq.Channel, properties: Any, body_size: int) -> bytes:
    """The content header frame of a message: its properties and headers, which must
    fit one frame (the body is split over as many as it needs), else RabbitMQ closes
    the whole connection on it (FRAME_ERROR), failing every message in flight."""
    header = _header_frame(channel, properties, body_size)
    room = _frame_room(channel, header)
    if room is not None and room < 0:
        raise MessageTooLarge(
            f"the properties and headers of message {properties.message_id} take "
            f"{len(header):,} bytes; RabbitMQ takes them in one frame, at most "
            f"{len(header) + room:,} bytes (frame_max): keep long values in the data"
        )
    return header


def fit_header_frame(channel: aiormq.Channel, properties: Any, body_size: int) -> Any:
    """``properties`` of a copy (retry or dead letter), with its ``x-accord-reason``
    header cut if the header frame would not fit otherwise; raises MessageTooLarge
    if even that is not enough."""
    room = _frame_room(channel, _header_frame(channel, properties, body_size))
    reason = (properties.headers or {}).get(REASON_HEADER)
    if room is not None and room < 0 and isinstance(reason, str):
        marker = " [cut to fit RabbitMQ's frame_max]"
        kept = reason.encode()[: max(0, len(reason.encode()) + room - len(marker))]
        properties = Basic.Properties(
            content_type=properties.content_type,
            delivery_mode=properties.delivery_mode,
            message_id=properties.message_id,
            headers={**properties.headers, REASON_HEADER: kept.decode(errors="ignore") + marker},
            expiration=properties.expiration,
        )
    _checked_header_frame(channel, properties, body_size)
    return properties


def encode_publish(
    channel: aiormq.Channel, exchange: str, routing_key: str, properties: Any, body: bytes
) -> bytes:
    """The frames of one ``basic.publish`` on ``channel``, ready for the socket. Raises
    if the message cannot be encoded (a routing key over 255 bytes, a bad header), and
    MessageTooLarge if its properties and headers do not fit one frame."""
    limit = channel.max_content_size
    if limit <= 0:  # the broker set no frame size limit
        limit = max(1, len(body))
    frames: list[Any] = [
        Basic.Publish(exchange=exchange, routing_key=routing_key),
        *(ContentBody(body[i : i + limit]) for i in range(0, len(body), limit)),
    ]
    method, *bodies = (pamqp.frame.marshal(frame, channel.number) for frame in frames)
    return b"".join([method, _checked_header_frame(channel, properties, len(body)), *bodies])


async def send_confirmed(
    channel: aiormq.Channel, publishes: Sequence[bytes], confirms: list[asyncio.Future[Any]]
) -> None:
    """Send encoded ``publishes`` (see :func:`encode_publish`) on a confirming channel
    as one write, in order, appending each one's confirmation future to ``confirms``
    as it is registered. Hold ``channel.lock``.

    aiormq's ``basic_publish`` writes each message on its own and waits for the
    socket between them. This registers every delivery tag the way it does (its
    public ``delivery_tag`` and ``confirmations``, so its reader settles the futures:
    a ``basic.ack`` with ``multiple`` at once, and every one fails if the channel
    closes), but only once the frame is in the connection's write queue: waiting for
    room there (the queue is short and shared) can be cancelled with nothing
    registered, and nothing yields between the put and the registration. Then it
    waits until the socket took the frame, as ``basic_publish`` does, so a broker
    that blocks publishers holds the caller back instead of its memory growing.
    """
    drained = channel.create_future()
    await channel.write_queue.put(
        ChannelFrame(b"".join(publishes), should_close=False, drain_future=drained)
    )
    for _ in publishes:
        channel.delivery_tag += 1
        confirm = channel.create_future()
        channel.confirmations[channel.delivery_tag] = confirm
        confirms.append(confirm)
    await drained


def message_properties(message: Message) -> tuple[Basic.Properties, bytes]:
    """AMQP properties and body of a message (see :func:`envelope_properties`)."""
    return envelope_properties(Envelope.of(message))


def envelope_properties(envelope: Envelope) -> tuple[Basic.Properties, bytes]:
    """AMQP properties and body of an encoded message: CloudEvents binary mode, persistent.

    The ``ce-*`` attributes are AMQP headers; ``datacontenttype`` is the AMQP
    ``content_type`` property and the id is also the AMQP ``message_id`` (as the
    CloudEvents RabbitMQ binding does).
    """
    headers: dict[str, Any] = dict(envelope.headers)
    content_type = headers.pop("content-type", None)
    properties = Basic.Properties(
        content_type=content_type,
        delivery_mode=2,
        message_id=envelope.id,
        headers=headers,
    )
    return properties, envelope.body


def republish_properties(
    properties: Basic.Properties | Any,
    headers: Mapping[str, Any] | None,
    extra: Mapping[str, Any],
    expiration_ms: int | None = None,
) -> Basic.Properties:
    """Properties for a copy of a received message (retry or dead letter)."""
    kept = {
        name: value
        for name, value in (headers or {}).items()
        if not name.startswith(_BROKER_HEADERS)
    }
    kept.update(extra)
    return Basic.Properties(
        content_type=properties.content_type,
        delivery_mode=2,
        # A copy that comes back unroutable is matched to its publish by message_id.
        message_id=properties.message_id or uuid.uuid4().hex,
        headers=kept,
        expiration=None if expiration_ms is None else str(expiration_ms),
    )


def delivery_headers(headers: Mapping[str, Any] | None, content_type: str | None) -> dict[str, str]:
    """The headers a consumer sees: scalar AMQP headers as text, plus ``content-type``."""
    result: dict[str, str] = {}
    for name, value in (headers or {}).items():
        if isinstance(value, bytes | bytearray):
            result[name] = bytes(value).decode("utf-8", "replace")
        elif isinstance(value, str | int | float | bool):
            result[name] = str(value)
        # Tables and arrays (x-death) carry no CloudEvents attribute; leave them out.
    if content_type is not None:
        result["content-type"] = content_type
    return result


def attempt_of(
    headers: Mapping[str, Any] | None, redelivered: bool, *, quorum: bool = False
) -> int:
    """The attempt of a delivery: Accord's attempt header (1 if absent), plus the
    deliveries of this copy before it — a quorum queue counts them
    (``x-delivery-count``); a classic queue only flags a redelivery, counted as one."""
    raw = (headers or {}).get(ATTEMPT_HEADER)
    try:
        attempt = max(1, int(raw.decode() if isinstance(raw, bytes) else raw))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        attempt = 1
    if not redelivered:
        # A first delivery, whatever count a copied header may carry (a message moved
        # from another quorum queue keeps its count there).
        return attempt
    count = (headers or {}).get(DELIVERY_COUNT_HEADER) if quorum else None
    if isinstance(count, int) and not isinstance(count, bool):
        return attempt + max(1, count)
    return attempt + 1


def redact(url: str) -> str:
    """The URL with its password hidden, for error messages."""
    try:
        parsed = URL(url)
    except (TypeError, ValueError):
        return "<invalid URL>"
    return str(parsed.with_password("***")) if parsed.password else url


def translate(exc: BaseException, what: str) -> TransportError:
    """The Accord error for an aio-pika/aiormq/socket error raised while doing ``what``."""
    if isinstance(exc, TransportError):
        return exc
    error: TransportError
    if isinstance(exc, amqp_errors.ProbableAuthenticationError | amqp_errors.AuthenticationError):
        error = TransportError(
            f"{what}: RabbitMQ refused the login ({exc}); check the user and password in the URL"
        )
    elif isinstance(exc, amqp_errors.ChannelPreconditionFailed) and refused_size(exc):
        error = MessageTooLarge(
            f"{what}: RabbitMQ refused a message larger than its max_message_size ({exc}); "
            "raise it in rabbitmq.conf (at most 512 MiB), or send less"
        )
    elif isinstance(exc, amqp_errors.ChannelPreconditionFailed):
        error = TransportError(
            f"{what}: RabbitMQ refused a declaration ({exc}); an exchange or queue of that "
            "name already exists with other settings - delete it or use another channel name"
        )
    elif isinstance(exc, amqp_errors.ChannelAccessRefused):
        error = TransportError(
            f"{what}: RabbitMQ denied access ({exc}); give the user configure/write/read "
            "permissions on the vhost"
        )
    elif isinstance(exc, amqp_errors.ChannelNotFoundEntity):
        error = TransportError(f"{what}: an exchange or queue does not exist ({exc})")
    elif isinstance(exc, amqp_errors.DeliveryError):
        error = TransportError(f"{what}: the broker refused the message ({exc.frame!r})")
    elif isinstance(
        exc,
        amqp_errors.AMQPConnectionError
        | amqp_errors.ChannelInvalidStateError
        | amqp_errors.ChannelClosed
        | ConnectionError
        | OSError
        | TimeoutError,
    ):
        error = TransportUnavailable(
            f"{what}: RabbitMQ is unreachable or the connection was lost ({exc!r}); retry later"
        )
    else:
        error = TransportError(f"{what}: {exc!r}")
    error.__cause__ = exc
    return error


# RabbitMQ closing a channel on a message over its max_message_size.
_TOO_LARGE = re.compile(r"message size (\d+) is larger than configured max size (\d+)")


def refused_size(exc: BaseException | None) -> int | None:
    """The broker's max_message_size, if ``exc`` (or what it was translated from) is
    RabbitMQ refusing a message over it; else None."""
    while exc is not None:
        found = _TOO_LARGE.search(str(exc))
        if found:
            return int(found.group(2))
        exc = exc.__cause__
    return None


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """Raise any client-library error inside the block as an Accord TransportError."""
    try:
        yield
    except TransportError:
        raise
    except Exception as exc:
        raise translate(exc, what) from exc
