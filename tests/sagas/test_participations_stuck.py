"""End to end, on a running system: a saga left STUCK past its participants'
``records_retention``, then retried by an operator, is not "compensated" by guessing.

The trip saga (see ``app``) fails at step 3 ("charge card") and compensates; the
compensation of step 2 ("cars.return") is down, so it ends STUCK with steps 0..2
applied. Then 40 days pass: the saga's ``created_at`` goes 40 days back and the
participants' records of it go (aged, then pruned by the participants' own
consumers or by an operator's ``prune-participations``). The outage is fixed and
an operator retries. With no record left, a participant cannot tell a step never
applied from one whose record was pruned: the compensation is refused (naming the
retention), nothing is undone, the saga is STUCK again, and the operator, having
checked by hand, aborts it.

The controls show what the refusal depends on: a young saga whose records went
another way (deleted by hand, not pruned) is compensated as before (no record
means "never applied here", answered without undoing); an old saga whose records
are kept is compensated for real.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from accord.db.schema_sagas import participations, sagas
from accord.testing import wait_for
from tests.sagas import app
from tests.sagas.conftest import World

FORTY_DAYS = timedelta(days=40)
APPLIED = [(0, "do"), (1, "do"), (2, "do")]  # steps 0..2 done, step 3 refused


async def saga_ledger(world: World, saga_id: str) -> list[tuple[int, str]]:
    return [(step, op) for sid, step, op in await app.ledger_rows(world.database) if sid == saga_id]


async def records(world: World, saga_id: str) -> list[tuple[str, int, str]]:
    """The participants' records of ``saga_id``: (service, step, phase)."""
    c = participations.c
    query = sa.select(c.participant, c.step, c.phase).where(c.saga_id == saga_id)
    async with world.database.connect() as conn:
        rows = (await conn.execute(query)).all()
    return sorted((r[0].removeprefix(f"{world.prefix}-"), r[1], r[2]) for r in rows)


async def log_after_retry(world: World, saga_id: str) -> list[tuple[int, str, str, str]]:
    """The step log from the operator's (last) retry on: (step, phase, event, detail)."""
    history = await world.admin.history(saga_id)
    entries = [(e.step, e.phase, e.event, e.detail or "") for e in history]
    last = max(i for i, e in enumerate(entries) if e[2] == "operator_retry")
    return entries[last + 1 :]


async def stuck_trip(world: World) -> str:
    """A trip saga STUCK compensating step 2, with steps 0..2 applied."""
    await world.start()
    await app.set_outage(world.database, 2, True)  # every cars.return fails
    saga_id = await world.begin(fail_at=3)
    assert await world.wait_status(saga_id) == "STUCK"
    state = await world.admin.get(saga_id)
    assert (state.phase, state.step) == ("compensation", 2)
    assert "compensation of step 'rent car' failed 4 times" in (state.error or "")
    assert "cars.return failed (injected)" in (state.error or "")
    assert await saga_ledger(world, saga_id) == APPLIED
    # What makes a re-sent command idempotent, and what a compensation consults.
    assert await records(world, saga_id) == [
        ("cars", 2, "action"),
        ("cars", 2, "compensation"),  # failed, attempt 4
        ("cars", 3, "action"),  # refused
        ("hotels", 1, "action"),
    ]
    return saga_id


async def execute(world: World, statement: Any) -> None:
    """Run ``statement`` in a transaction of its own."""
    async with world.database.transaction() as conn:
        await conn.execute(statement)


async def age_saga(world: World, saga_id: str) -> None:
    """The saga started 40 days ago (its commands' ``sagastarted`` says so)."""
    then = datetime.now(UTC) - FORTY_DAYS
    await execute(world, sagas.update().where(sagas.c.id == saga_id).values(created_at=then))


async def delete_records(world: World, saga_id: str) -> None:
    async with world.database.transaction() as conn:
        await conn.execute(participations.delete().where(participations.c.saga_id == saga_id))


async def age_records(world: World, saga_id: str) -> None:
    then = datetime.now(UTC) - FORTY_DAYS
    c = participations.c
    await execute(world, participations.update().where(c.saga_id == saga_id).values(at=then))


async def records_pruned_by_hand(world: World, saga_id: str) -> None:
    """``accord sagas prune-participations`` (30 days) after the records aged."""
    await age_records(world, saga_id)
    assert await world.admin.prune_participations(timedelta(days=30)) == 4


async def records_pruned_by_the_participants(world: World, saga_id: str) -> None:
    """The records were written 40 days ago; the participants' consumers, restarted
    (a deploy), prune what is past their ``records_retention`` (30 days) themselves."""
    await world.stop_participants()
    await age_records(world, saga_id)
    await world.start_participants()

    async def gone() -> bool:
        return await records(world, saga_id) == []

    await wait_for(gone, 10, interval=0.05)


async def operator_fixes_the_outage_and_retries(world: World, saga_id: str) -> None:
    await app.set_outage(world.database, 2, False)
    await world.admin.retry(saga_id)  # COMPENSATING once this returns


@pytest.mark.parametrize("records_go", ["pruned by hand", "pruned by the participants"])
async def test_a_stuck_saga_retried_after_its_records_were_pruned_is_stuck_again_not_guessed(
    world: World, records_go: str
) -> None:
    saga_id = await stuck_trip(world)
    await age_saga(world, saga_id)
    if records_go == "pruned by hand":
        await records_pruned_by_hand(world, saga_id)
    else:
        await records_pruned_by_the_participants(world, saga_id)
    assert await records(world, saga_id) == []

    await operator_fixes_the_outage_and_retries(world, saga_id)
    assert await world.wait_status(saga_id) == "STUCK"

    state = await world.admin.get(saga_id)
    assert (state.phase, state.step) == ("compensation", 2)
    error = state.error or ""
    assert "compensation of step 'rent car' failed 4 times" in error
    assert "cannot tell whether step 2" in error
    assert "pruned up to" in error and "(records_retention)" in error
    # Every fresh attempt was refused by the cars service for the same reason; no
    # step was taken as compensated, and step 1 was never asked.
    after = await log_after_retry(world, saga_id)
    failed = [e for e in after if e[:3] == (2, "compensation", "failed")]
    assert len(failed) == 4
    assert all("cannot tell whether step 2" in detail for *_, detail in failed)
    assert not [e for e in after if e[2] == "compensated"]
    assert not [e for e in after if e[0] != 2]
    # Nothing was undone (nor guessed undone), and the refusals recorded nothing:
    # the next retry asks again.
    assert await saga_ledger(world, saga_id) == APPLIED
    assert await records(world, saga_id) == []

    # The operator checks by hand (the car and hotel are the business's now) and
    # aborts: the saga ends ABORTED, still without anything undone by the system.
    await world.admin.abort(saga_id, "checked by hand after the records were pruned")
    assert await world.wait_status(saga_id, "ABORTED") == "ABORTED"  # STUCK is an end too
    assert (await world.admin.get(saga_id)).ended_at is not None
    assert await saga_ledger(world, saga_id) == APPLIED


async def test_control_a_young_saga_whose_records_went_is_compensated_without_undoing(
    world: World,
) -> None:
    """The saga started just now: a participant's records of it cannot have been
    pruned, so no record of a step means its command never came, and the
    compensation is answered "done" without running. Records lost another way (here
    deleted by hand) are thus taken at their word: steps 2 and 1 end COMPENSATED
    without being undone; only step 0, the orchestrator's own, is undone."""
    saga_id = await stuck_trip(world)
    await delete_records(world, saga_id)

    await operator_fixes_the_outage_and_retries(world, saga_id)
    assert await world.wait_status(saga_id) == "COMPENSATED"

    events = [e[:3] for e in await log_after_retry(world, saga_id)]
    assert (2, "compensation", "compensated") in events
    assert (1, "compensation", "compensated") in events
    assert (0, "compensation", "compensated") in events
    assert not [e for e in events if e[2] == "failed"]
    assert await saga_ledger(world, saga_id) == [*APPLIED, (0, "undo")]


async def test_control_an_old_saga_whose_records_are_kept_is_compensated_for_real(
    world: World,
) -> None:
    """The saga is 40 days old but its records are here (the participants were
    given a longer retention, say): the refusal is about a missing record, not age."""
    saga_id = await stuck_trip(world)
    await age_saga(world, saga_id)

    await operator_fixes_the_outage_and_retries(world, saga_id)
    assert await world.wait_status(saga_id) == "COMPENSATED"
    assert await saga_ledger(world, saga_id) == app.expected_ops("COMPENSATED", 3)
    assert await saga_ledger(world, saga_id) == [*APPLIED, (2, "undo"), (1, "undo"), (0, "undo")]
