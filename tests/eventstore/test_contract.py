"""The event store contract suite, on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from accord.db import Database
from accord.eventstore import EventStore, Upcasters
from accord.testing.eventstore_contract import EventStoreContract


class TestEventStoreContract(EventStoreContract):
    @pytest.fixture
    async def event_store(
        self, database: Database, contract_upcasters: Upcasters
    ) -> AsyncIterator[EventStore]:
        store = EventStore(database, contract_upcasters, poll_interval=0.2)
        yield store
        await store.close()
