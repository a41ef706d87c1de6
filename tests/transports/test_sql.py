"""The SQL transport on SQLite and PostgreSQL: the contract suite plus its own promises."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from accord.testing import TransportContract
from accord.transports.base import Transport
from accord.transports.sql import SqlTransport


class TestSqlTransportOnSqlite(TransportContract):
    timeout = 15.0

    @pytest.fixture
    def transport_factory(self, tmp_path: Path) -> Any:
        url = f"sqlite+aiosqlite:///{tmp_path / 'queue.db'}"
        return lambda channel: SqlTransport(url, channel=channel, poll_interval=0.1, lease=2.0)

    async def publish_raw(self, transport: Transport, headers: dict[str, str], body: bytes) -> None:
        assert isinstance(transport, SqlTransport)
        await transport.publish_raw(headers, body)


@pytest.mark.postgres
class TestSqlTransportOnPostgres(TransportContract):
    timeout = 15.0

    @pytest.fixture
    def transport_factory(self, pg_url: str) -> Any:
        return lambda channel: SqlTransport(pg_url, channel=channel, poll_interval=0.1, lease=2.0)

    async def publish_raw(self, transport: Transport, headers: dict[str, str], body: bytes) -> None:
        assert isinstance(transport, SqlTransport)
        await transport.publish_raw(headers, body)
