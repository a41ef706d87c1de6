"""The in-memory transport ships for users' unit tests; it must keep the same contract."""

from __future__ import annotations

from typing import Any

import pytest

from accord.testing import TransportContract
from accord.transports.base import Transport
from accord.transports.memory import MemoryBroker, MemoryTransport


class TestMemoryTransport(TransportContract):
    timeout = 5.0

    @pytest.fixture
    def transport_factory(self) -> Any:
        broker = MemoryBroker()
        return lambda channel: MemoryTransport(broker)

    async def publish_raw(self, transport: Transport, headers: dict[str, str], body: bytes) -> None:
        assert isinstance(transport, MemoryTransport)
        await transport.publish_raw(headers, body)
