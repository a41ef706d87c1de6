"""The README's Python examples run, unchanged, as part of the suite."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
ACCORD = Path(sys.executable).with_name("accord")
# The batch participant of *Sagas* is a fragment (`hotels`, `bookings`, `booking` are
# the reader's): this harness gives it them and runs three sagas through it.
BATCH_PARTICIPANT = re.findall(r"```\n(@participant\(hotels.*?)```", README.read_text(), re.DOTALL)
BATCH_HARNESS = """import asyncio

import sqlalchemy as sa

from accord import Consumer, Database, Relay
from accord.sagas import CommandContext, Orchestrator, Saga, SagaAdmin, command, participant
from accord.testing import wait_for
from accord.transports import from_url

FRAGMENT = open("fragment.py").read()  # the README's, as it stands

bookings = sa.Table(
    "bookings", sa.MetaData(), sa.Column("saga_id", sa.String(36)), sa.Column("city", sa.Text)
)


def booking(ctx: CommandContext, data: dict) -> dict:
    return {"saga_id": ctx.saga_id, "city": data["city"]}


async def main() -> None:
    database = Database("sqlite+aiosqlite:///trips.db")
    await database.upgrade()
    async with database.transaction() as conn:
        await conn.run_sync(bookings.metadata.create_all)
    broker = from_url("sqlite+aiosqlite:///broker.db")
    await broker.connect()
    hotels = Consumer("hotels", database, broker, batch_size=16)
    exec(FRAGMENT, {"participant": participant, "hotels": hotels, "bookings": bookings,
                    "booking": booking})
    trip = Saga("trip").pivot("reserve hotel", command("hotels.reserve"), timeout=10)
    orchestrator = Orchestrator(database, broker, [trip])
    relay = Relay(database, broker)
    await hotels.start()
    await orchestrator.connect()
    workers = [asyncio.create_task(c.run()) for c in (orchestrator, relay)]
    admin = SagaAdmin(database)
    ids = [await orchestrator.start(trip, {"city": city}) for city in ("Paris", "Rome", "Oslo")]
    for saga_id in ids:
        async def completed(saga_id: str = saga_id) -> bool:
            return (await admin.get(saga_id)).status == "COMPLETED"
        await wait_for(completed, timeout=20)
        assert (await admin.get(saga_id)).data["booking"] == f"H-{saga_id[:8]}"
    async with database.connect() as conn:
        rows = (await conn.execute(sa.select(bookings.c.saga_id, bookings.c.city))).all()
    assert sorted(rows) == sorted(zip(ids, ("Paris", "Rome", "Oslo"))), rows
    for component in (orchestrator, relay, hotels):
        await component.stop()
    await asyncio.gather(*workers)
    await broker.close()
    await database.dispose()


asyncio.run(main())
"""


def test_the_readme_has_python_examples() -> None:
    assert BLOCKS, "the README lost its Python examples"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index: int, tmp_path: Path) -> None:
    script = tmp_path / f"readme_{index}.py"
    script.write_text(BLOCKS[index])
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"README example {index} failed:\n{result.stderr[-3000:]}"


def test_readme_worker_app_is_what_accord_worker_runs(tmp_path: Path) -> None:
    """The `--app` example of *Operating it*, as `myservice/app.py`, is taken by
    `accord worker --declare-only` with the database and broker from the environment."""
    [app] = [block for block in BLOCKS if block.startswith("# myservice/app.py")]
    (tmp_path / "myservice").mkdir()
    (tmp_path / "myservice" / "__init__.py").write_text("")
    (tmp_path / "myservice" / "app.py").write_text(app)
    env = {
        **os.environ,
        "ACCORD_DB": f"sqlite+aiosqlite:///{tmp_path / 'service.db'}",
        "ACCORD_BROKER": f"sqlite+aiosqlite:///{tmp_path / 'broker.db'}",
    }
    result = subprocess.run(
        [str(ACCORD), "worker", "--app", "myservice.app:components", "--declare-only", "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout) == [
        {"transport": "sql", "group": "score-engine", "topics": ["match.recorded"]}
    ]


def test_readme_batch_participant_runs(tmp_path: Path) -> None:
    [fragment] = BATCH_PARTICIPANT
    (tmp_path / "fragment.py").write_text(fragment)
    script = tmp_path / "batch_participant.py"
    script.write_text(BATCH_HARNESS)
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"the batch participant failed:\n{result.stderr[-3000:]}"
