"""Transactional outbox: add messages in your transaction; the relay publishes them."""

from accord.outbox.writer import NOTIFY_CHANNEL, add

__all__ = ["NOTIFY_CHANNEL", "add"]
