"""Transactional outbox: add messages in your transaction; the relay publishes them."""

from accord.outbox.admin import OutboxAdmin, OutboxStatus
from accord.outbox.relay import Relay
from accord.outbox.writer import NOTIFY_CHANNEL, SCHEDULED, add, cancel_scheduled, transaction

__all__ = [
    "NOTIFY_CHANNEL",
    "SCHEDULED",
    "OutboxAdmin",
    "OutboxStatus",
    "Relay",
    "add",
    "cancel_scheduled",
    "transaction",
]
