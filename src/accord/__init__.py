"""Accord: keep independent services consistent without distributed transactions.

Transactional outbox with relay and dead letters, idempotent inbox, sagas,
event sourcing and CQRS projections, on SQLite or PostgreSQL, over RabbitMQ,
NATS JetStream, Redis Streams or a broker-less SQL transport.
"""

from accord import errors
from accord.db import Database, metadata
from accord.inbox import Consumer, DeadLetters, HandlerContext
from accord.messages import Message
from accord.outbox import OutboxAdmin, Relay, cancel_scheduled
from accord.outbox import add as add_to_outbox
from accord.outbox import transaction as outbox_transaction

__all__ = [
    "Consumer",
    "Database",
    "DeadLetters",
    "HandlerContext",
    "Message",
    "OutboxAdmin",
    "Relay",
    "add_to_outbox",
    "cancel_scheduled",
    "errors",
    "metadata",
    "outbox_transaction",
]

__version__ = "0.1.0.dev0"
