"""A delivery for driving a handler directly in a unit test, without a broker."""

from __future__ import annotations

from collections.abc import Mapping

from accord.messages import Message, encode
from accord.transports.base import Delivery

__all__ = ["CapturedDelivery"]


class CapturedDelivery(Delivery):
    """A delivery of ``message`` that records how it was settled.

    Hand it to ``await consumer.handle(delivery)`` and check ``outcome``:
    ``"ack"``, ``"nack"`` (with ``delay``) or ``"reject"`` (with ``reason``).
    """

    def __init__(self, message: Message, attempt: int = 1) -> None:
        self._capture(*encode(message), attempt)

    @classmethod
    def raw(cls, headers: Mapping[str, str], body: bytes, attempt: int = 1) -> CapturedDelivery:
        """A delivery of ``headers`` and ``body`` exactly as they would arrive from a
        broker, to test what a consumer does with input no :class:`Message` makes."""
        delivery = cls.__new__(cls)
        delivery._capture(headers, body, attempt)
        return delivery

    def _capture(self, headers: Mapping[str, str], body: bytes, attempt: int) -> None:
        super().__init__(headers, body, attempt)
        self.outcome: str | None = None
        self.delay: float | None = None
        self.reason: str | None = None

    async def _ack(self) -> None:
        self.outcome = "ack"

    async def _nack(self, delay: float) -> None:
        self.outcome, self.delay = "nack", delay

    async def _reject(self, reason: str) -> None:
        self.outcome, self.reason = "reject", reason
