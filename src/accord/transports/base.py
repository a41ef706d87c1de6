"""The transport port: what every broker module implements.

A transport moves :class:`~accord.messages.Message` objects from publishers to
consumer *groups*. Every group gets every message whose type matches one of
its topic patterns; inside a group, consumers compete (each message goes to
one of them). Messages travel in CloudEvents binary mode (see
:func:`accord.messages.encode`).

Topic patterns are AMQP-style, over the message ``type`` split on ``.``:
``*`` matches exactly one word, ``#`` matches zero or more words
(``match.*``, ``tournament.#``, ``#``).

Implementations: ``sql`` (broker-less), ``rabbitmq``, ``nats``, ``redis``,
``memory`` (users' unit tests only). Each passes
:class:`accord.testing.TransportContract` against its real server.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from accord._checks import is_count, is_seconds
from accord.errors import ConfigurationError, DecodeError, PublishError, TransportUnavailable
from accord.messages import SPECVERSION, Message, decode, encode

__all__ = [
    "DEFAULT_REDELIVERY_DELAY",
    "BatchHandler",
    "Delivery",
    "Envelope",
    "GroupDeclaration",
    "Handler",
    "Subscription",
    "Transport",
    "check_batching",
    "check_counts",
    "check_group",
    "check_seconds",
    "raise_unconfirmed",
    "topic_matches",
]

#: Delay before a delivery whose handler raised is offered again, in seconds.
DEFAULT_REDELIVERY_DELAY = 1.0
#: The longest delay a nack waits (a week; an infinite one overflowed the brokers).
MAX_REDELIVERY_DELAY = 7 * 86_400.0


def raise_unconfirmed(failed: dict[str, BaseException], total: int, broker: str) -> None:
    """What :meth:`Transport.publish_envelopes` promises once ``failed`` (message id ->
    error) of a batch of ``total`` are known: nothing if every message was confirmed,
    :class:`~accord.errors.TransportUnavailable` if none was and only because the
    broker was out of reach, else :class:`~accord.errors.PublishError` naming them."""
    if not failed:
        return
    if len(failed) == total and all(isinstance(e, TransportUnavailable) for e in failed.values()):
        first = next(iter(failed.values()))
        raise TransportUnavailable(
            f"{broker} confirmed none of {total} message(s): {first}"
        ) from first.__cause__
    raise PublishError(failed)


def check_group(group: str, topics: Sequence[str]) -> None:
    """Raise ConfigurationError unless ``group`` is a name and ``topics`` a non-empty
    list of patterns (what :meth:`Transport.declare` and subscribing take)."""
    if not group:
        raise ConfigurationError("a consumer group needs a non-empty name")
    if isinstance(topics, str) or not topics:
        raise ConfigurationError(
            f"group {group!r}: topics must be a non-empty list of patterns, e.g. ['match.*']"
        )


def check_seconds(owner: str, *, zero_ok: bool = False, **values: Any) -> None:
    """Raise ConfigurationError unless every value is a finite number of seconds above 0
    (or at least 0 with ``zero_ok``); ``None`` values are not checked (unset options).
    A bool is no number; NaN, an infinity or a negative wait broke each broker
    differently, late and often with the client library's own error."""
    for name, value in values.items():
        if value is None:
            continue
        if not is_seconds(value, zero_ok=zero_ok):
            least = "0 or more" if zero_ok else "more than 0"
            raise ConfigurationError(f"{owner}: {name} must be {least} seconds, not {value!r}")


def check_counts(owner: str, **values: Any) -> None:
    """Raise ConfigurationError unless every value is an int of at least 1; ``None``
    values are not checked (unset options)."""
    for name, value in values.items():
        if value is not None and not is_count(value):
            raise ConfigurationError(f"{owner}: {name} must be a whole number >= 1, not {value!r}")


def check_batching(prefetch: Any, max_batch: Any) -> None:
    """Raise ConfigurationError unless ``max_batch`` is an int of at least 1 and
    ``prefetch`` an int of at least 0 (what :meth:`Transport.subscribe_batches` takes,
    alike on every transport)."""
    check_counts("subscribe", max_batch=max_batch)
    if not (isinstance(prefetch, int) and not isinstance(prefetch, bool) and prefetch >= 0):
        raise ConfigurationError(
            f"subscribe: prefetch must be a whole number >= 0, not {prefetch!r}"
        )


@lru_cache(maxsize=1024)
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    parts = []
    for word in pattern.split("."):
        if word == "#":
            parts.append(r"(?:[^.]+(?:\.[^.]+)*)?")
        elif word == "*":
            parts.append(r"[^.]+")
        else:
            parts.append(re.escape(word))
    regex = r"\.".join(parts)
    # "#" may match zero words: let the dots around it collapse.
    regex = regex.replace(r"\.(?:[^.]+(?:\.[^.]+)*)?", r"(?:\.[^.]+)*")
    regex = regex.replace(r"(?:[^.]+(?:\.[^.]+)*)?\.", r"(?:[^.]+\.)*")
    return re.compile(regex + r"\Z")


def topic_matches(pattern: str, message_type: str) -> bool:
    """Whether an AMQP-style topic pattern matches a message type."""
    return _pattern_regex(pattern).match(message_type) is not None


@dataclass(frozen=True, slots=True)
class Envelope:
    """A message already in CloudEvents binary mode: what the outbox stores.

    ``headers`` are the ``ce-*`` attributes and ``content-type`` exactly as
    :func:`accord.messages.encode` makes them; ``body`` is the encoded data.
    """

    id: str
    type: str
    key: str | None
    headers: Mapping[str, str]
    body: bytes

    @classmethod
    def of(cls, message: Message) -> Envelope:
        """Encode a message."""
        headers, body = encode(message)
        return cls(message.id, message.type, message.key, headers, body)

    def message(self) -> Message:
        """Decode back into a message (raises DecodeError if the envelope is malformed)."""
        return decode(self.headers, self.body)

    def check(self) -> None:
        """Raise DecodeError unless the required CloudEvents attributes are present;
        cheap (no body parsing), for hot paths that publish envelopes as they are."""
        missing = [a for a in _REQUIRED if not self.headers.get(a)]
        if missing:
            names = ", ".join(a.removeprefix("ce-") for a in missing)
            raise DecodeError(f"not a CloudEvent: missing required attribute(s) {names}")
        if self.headers["ce-specversion"] != SPECVERSION:
            raise DecodeError(
                f"unsupported CloudEvents specversion {self.headers['ce-specversion']!r}"
            )


_REQUIRED = ("ce-id", "ce-source", "ce-type", "ce-specversion")


class Delivery(abc.ABC):
    """One delivery of one message to one consumer of a group.

    ``message`` is the decoded message, or ``None`` when the bytes could not be
    decoded; then ``decode_error`` says why and ``headers``/``body`` hold what
    arrived, so the consumer can dead-letter it with its reason.
    ``attempt`` is 1 on first delivery and grows with each redelivery.

    A delivery is settled exactly once, by :meth:`ack`, :meth:`nack` or
    :meth:`reject`; settling twice is a no-op.
    """

    def __init__(self, headers: Mapping[str, str], body: bytes, attempt: int) -> None:
        self.headers = dict(headers)
        self.body = body
        self.attempt = attempt
        self.settled = False
        self.message: Message | None
        self.decode_error: DecodeError | None
        try:
            self.message, self.decode_error = decode(self.headers, body), None
        except DecodeError as exc:
            self.message, self.decode_error = None, exc
        except Exception as exc:  # never the delivery loop's end: bad input, dead-lettered
            self.message = None
            self.decode_error = DecodeError(f"cannot decode: {type(exc).__name__}: {exc}")

    async def ack(self) -> None:
        """The message is done: it will not be delivered to this group again."""
        if not self.settled:
            self.settled = True
            await self._ack()

    async def nack(self, delay: float = DEFAULT_REDELIVERY_DELAY) -> None:
        """Give the message back: deliver it to the group again after ``delay`` seconds
        (at most a week; a negative or NaN delay is 0), with ``attempt`` one higher."""
        if not self.settled:
            self.settled = True
            await self._nack(min(delay, MAX_REDELIVERY_DELAY) if delay > 0 else 0.0)

    async def reject(self, reason: str) -> None:
        """Give up on the message: never redeliver it to this group. Where the broker
        has a dead-letter destination (RabbitMQ's dead-letter exchange, a dead-letter
        stream) the message goes there with ``reason``."""
        if not self.settled:
            self.settled = True
            await self._reject(reason)

    @abc.abstractmethod
    async def _ack(self) -> None: ...

    @abc.abstractmethod
    async def _nack(self, delay: float) -> None: ...

    @abc.abstractmethod
    async def _reject(self, reason: str) -> None: ...


Handler = Callable[[Delivery], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class GroupDeclaration:
    """A consumer group a component declared (see :meth:`Transport.declare`)."""

    transport: str
    group: str
    topics: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.group} on {self.transport} for {', '.join(self.topics)}"


#: A handler of several deliveries at once (see :meth:`Transport.subscribe_batches`).
BatchHandler = Callable[[Sequence[Delivery]], Awaitable[None]]


class Subscription(abc.ABC):
    """A running consumer of one group. Stop it to stop receiving."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop receiving. A handler call in progress is either let finish or cancelled
        (each transport documents which); any delivery not settled by then is
        redelivered later to this group, so stopping never loses a message."""


class Transport(abc.ABC):
    """A broker connection that publishes with confirms and consumes by group.

    Contract an implementation must keep:

    * :meth:`publish` returns only after the broker confirmed (persisted) every
      message of the batch. It sends them pipelined (many in flight at once),
      and messages of one batch reach a group in batch order unless the
      transport documents otherwise. If some are not confirmed it raises
      :class:`~accord.errors.PublishError` whose ``failed`` names exactly those;
      if the broker cannot be reached it raises
      :class:`~accord.errors.TransportUnavailable` (nothing was confirmed).
    * A message published after a group's first :meth:`subscribe` reaches that
      group even if no consumer of the group is running at the time (groups
      are durable).
    * :meth:`declare` makes a group durable without consuming it, with the same
      effect as a first subscribe: messages published after it are kept for the
      group until a consumer subscribes.
    * :meth:`subscribe` calls ``handler`` for each delivery, one at a time per
      subscription, in the order the broker delivers. If the handler returns
      without settling, the delivery is acked; if it raises, it is nacked with
      :data:`DEFAULT_REDELIVERY_DELAY`. A delivery that is never settled (the
      process died) is redelivered. Redelivery is at-least-once: consumers
      deduplicate by message id (the inbox does).
    * :meth:`subscribe_batches` is the same with a handler of lists: each call gets
      the deliveries that have arrived (1 to ``max_batch``, in broker order; it never
      waits to fill a batch), one call at a time per subscription. After the call
      every delivery it left unsettled is acked; if it raised, every one it left
      unsettled is nacked with :data:`DEFAULT_REDELIVERY_DELAY`.
    * Broker errors are raised as :class:`~accord.errors.TransportError`
      subclasses, never as the client library's own exceptions.
    """

    #: Short name of the backend ("rabbitmq", "nats", "redis", "sql", "memory").
    name: str = "transport"

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open the connection and declare what the channel needs. Idempotent."""

    @abc.abstractmethod
    async def publish(self, messages: Sequence[Message]) -> None:
        """Publish a batch; return once every message is confirmed (see class doc)."""

    async def publish_envelopes(self, envelopes: Sequence[Envelope]) -> None:
        """Publish already-encoded messages, under the same contract as :meth:`publish`.

        The relay calls this so that rows stored encoded are not decoded and encoded
        again. The default decodes and calls :meth:`publish`; a transport overrides it
        when it can put the headers and body on the wire as they are. An envelope
        that cannot be decoded is reported in ``PublishError.failed``.
        """
        messages: list[Message] = []
        failed: dict[str, BaseException] = {}
        for envelope in envelopes:
            try:
                messages.append(envelope.message())
            except DecodeError as exc:
                failed[envelope.id] = exc
        if messages:
            try:
                await self.publish(messages)
            except PublishError as exc:
                failed.update(exc.failed)
        if failed:
            raise PublishError(failed)

    @abc.abstractmethod
    async def declare(self, group: str, *, topics: Sequence[str] = ("#",)) -> None:
        """Declare ``group`` durably for message types matching ``topics``, without
        consuming: messages published from now on are kept for it until a member
        subscribes. Idempotent; :meth:`subscribe` declares too, with its own topics.

        Without it, what is published before a group's first subscribe never reaches
        the group. Workers declare their consumers' groups before starting any relay,
        and ``accord worker --declare-only`` does it at deploy time, before the
        services that publish to the group start.
        """

    async def subscribe(
        self,
        group: str,
        handler: Handler,
        *,
        topics: Sequence[str] = ("#",),
        prefetch: int = 64,
    ) -> Subscription:
        """Start consuming as a member of ``group``, for message types matching ``topics``.

        Declares the group durably first, so messages published after this call
        are kept for the group. ``prefetch`` bounds the unacked deliveries held.
        """

        async def one(deliveries: Sequence[Delivery]) -> None:
            await handler(deliveries[0])

        return await self.subscribe_batches(
            group, one, topics=topics, prefetch=prefetch, max_batch=1
        )

    @abc.abstractmethod
    async def subscribe_batches(
        self,
        group: str,
        handler: BatchHandler,
        *,
        topics: Sequence[str] = ("#",),
        prefetch: int = 64,
        max_batch: int = 64,
    ) -> Subscription:
        """Like :meth:`subscribe`, but ``handler`` gets lists of deliveries: what has
        arrived, up to ``max_batch`` (at most ``prefetch``), in broker order, one call
        at a time. Unsettled deliveries are acked after the call, or nacked if it
        raised. Consumers use it to handle many messages in one transaction.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop every subscription and close the connection. Idempotent."""

    async def __aenter__(self) -> Transport:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
