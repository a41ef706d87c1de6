"""One exception hierarchy for Accord.

Every error raised by Accord derives from :class:`AccordError`. Errors coming
from database drivers and broker clients are translated into the classes
below (the original is kept as ``__cause__``), so callers never need to catch
asyncpg, aiosqlite, aio-pika, nats-py or redis-py exceptions.
"""

from __future__ import annotations

__all__ = [
    "AccordError",
    "ConcurrencyError",
    "ConfigurationError",
    "DatabaseError",
    "DecodeError",
    "DuplicateError",
    "MessageTooLarge",
    "MissingExtraError",
    "NotFoundError",
    "PublishError",
    "TransportError",
    "TransportUnavailable",
]


class AccordError(Exception):
    """Base class of every error Accord raises."""


class ConfigurationError(AccordError):
    """A setting, URL or definition is invalid; the message says which and how to fix it."""


class MissingExtraError(ImportError, AccordError):
    """An optional driver is not installed; the message names the extra to install."""

    def __init__(self, feature: str, extra: str, module: str) -> None:
        super().__init__(
            f"{feature} needs the '{module}' package, which is not installed. "
            f"Install it with: pip install 'accord[{extra}]'"
        )
        self.extra = extra


class DatabaseError(AccordError):
    """A database operation failed (connection lost, constraint, timeout...)."""


class NotFoundError(AccordError):
    """The requested record (message, stream, saga, projection) does not exist."""


class DuplicateError(AccordError):
    """A record with the same identity already exists."""


class ConcurrencyError(AccordError):
    """An optimistic concurrency check failed.

    ``expected`` is what the caller asserted and ``actual`` what the store holds.
    """

    def __init__(self, message: str, *, expected: object = None, actual: object = None) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class DecodeError(AccordError):
    """Bytes or headers received from a broker are not a valid Accord/CloudEvents message."""


class TransportError(AccordError):
    """A broker operation failed."""


class TransportUnavailable(TransportError):
    """The broker cannot be reached right now; retrying later may succeed.

    Publishing failures of this kind do not count against a message's attempts:
    a broker outage must never dead-letter the backlog.
    """


class MessageTooLarge(TransportError):
    """The broker will never take this message: it is larger than the broker's limit
    (NATS ``max_payload``, a JetStream stream's ``max_msg_size``, RabbitMQ
    ``max_message_size``). A relay marks its row DEAD at once, with this error,
    instead of spending its attempts."""


class PublishError(TransportError):
    """Some messages of a batch were not confirmed by the broker.

    ``failed`` maps the id of each message that was not confirmed to the error.
    Every message of the batch whose id is not in ``failed`` was confirmed.
    """

    def __init__(self, failed: dict[str, BaseException]) -> None:
        first = next(iter(failed.values()), None)
        super().__init__(
            f"{len(failed)} message(s) not confirmed by the broker; first error: {first!r}"
        )
        self.failed = failed
