"""Orchestrated sagas end to end on a real database and broker: the happy path, a
failure at each step, compensations that fail, timeouts, STUCK and the operator."""

from __future__ import annotations

import pytest

from accord.sagas import SagaAdmin
from tests.sagas import app
from tests.sagas.conftest import World


async def saga_ledger(world: World, saga_id: str) -> list[tuple[int, str]]:
    return [(step, op) for sid, step, op in await app.ledger_rows(world.database) if sid == saga_id]


async def test_happy_path_completes_every_step_once(world: World) -> None:
    await world.start()
    saga_id = await world.begin(traveller="ada")
    assert await world.wait_status(saga_id) == "COMPLETED"
    assert await saga_ledger(world, saga_id) == app.expected_ops("COMPLETED", 5)
    state = await world.admin.get(saga_id)
    assert state.data["seat"] == "12A" and state.data["ref1"].startswith("hotels.reserve")
    assert state.ended_at is not None
