"""Shared fixtures: a fresh database per test (a copy of a migrated SQLite file, or a
PostgreSQL database cloned from a migrated template), and the URLs of the real
brokers; which tests run in the suite's serial part, and in what order the rest
go to the workers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from accord.db import Database
from tests.hang_report import watch

PG_ADMIN_DSN = os.environ.get("ACCORD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
RABBIT_URL = os.environ.get("ACCORD_TEST_RABBIT", "amqp://guest:guest@127.0.0.1:5672/")
NATS_URL = os.environ.get("ACCORD_TEST_NATS", "nats://127.0.0.1:4222")
REDIS_URL = os.environ.get("ACCORD_TEST_REDIS", "redis://127.0.0.1:6379/0")


def _pg_url(database: str) -> str:
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{base}/{database}"


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


#: Test databases are dropped by this thread, one after another, while the next tests
#: run: PostgreSQL 15 makes each DROP DATABASE wait for a checkpoint (0.1-0.2 s, more
#: under load), which each test's end used to wait for.
_DROPPER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drop-test-database")
_DROPS: list[Future[None]] = []


def _drop_later(name: str) -> None:
    sql = f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
    _DROPS.append(_DROPPER.submit(lambda: asyncio.run(_admin(sql))))


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A PostgreSQL database with every Accord table, cloned for each test."""
    name = f"accord_tmpl_{uuid.uuid4().hex[:10]}"

    async def create() -> None:
        await _admin(f'CREATE DATABASE "{name}"')
        async with Database(_pg_url(name)) as db:
            await db.upgrade()

    asyncio.run(create())
    yield name
    _drop_later(name)
    _DROPPER.shutdown(wait=True)
    for drop in _DROPS:
        drop.result()  # a drop that failed fails here


@contextlib.asynccontextmanager
async def fresh_pg_database(template: str) -> AsyncIterator[str]:
    """The URL of a new copy of ``template``, dropped soon after exit (its sessions
    cut off)."""
    name = f"accord_t_{uuid.uuid4().hex[:12]}"
    await _admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        yield _pg_url(name)
    finally:
        _drop_later(name)


@pytest.fixture
async def pg_url(pg_template: str) -> AsyncIterator[str]:
    """URL of a fresh, migrated PostgreSQL database for this test alone."""
    async with fresh_pg_database(pg_template) as url:
        yield url


@pytest.fixture
async def host(pg_url: str) -> AsyncIterator[Callable[[], Database]]:
    """Make Databases on the test's PostgreSQL database, one per simulated host (see
    ``tests/clocks.py``); disposed of after the test."""
    made: list[Database] = []

    def make() -> Database:
        made.append(Database(pg_url))
        return made[-1]

    yield make
    for database in made:
        await database.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file, copied for each test: a copy takes well under a
    millisecond, running the migrations 0.2-0.4 s."""
    path = tmp_path_factory.mktemp("sqlite_template") / "accord.db"

    async def create() -> None:
        async with Database(f"sqlite+aiosqlite:///{path}") as db:
            await db.upgrade()

    asyncio.run(create())
    # Closing the last connection checkpoints the write-ahead log into the file.
    assert not path.with_name(f"{path.name}-wal").exists(), "the template kept a WAL file"
    return path


@pytest.fixture
def sqlite_url(sqlite_template: Path, tmp_path: Path) -> str:
    """URL of a fresh, migrated SQLite file for this test alone."""
    path = tmp_path / "accord.db"
    shutil.copyfile(sqlite_template, path)
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each store test runs twice: on SQLite and on PostgreSQL."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
async def database(db_url: str) -> AsyncIterator[Database]:
    """A Database on a fresh SQLite file or PostgreSQL database (both, by parametrisation)."""
    db = Database(db_url)
    yield db
    await db.dispose()


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist starts its workers with COLUMNS=80, and a Rich console made at
    # import keeps the width it found then: the CLI tests set the width they need.
    os.environ.pop("COLUMNS", None)


#: Tests that read the PostgreSQL event store and expect at once what they appended.
#: Readers see only events below the oldest transaction still writing anywhere on the
#: server (``accord.eventstore``), so one open in a test on the other worker holds them
#: back: they run in the suite's serial part.
_READS_EVENTS = ("tests/eventstore/", "tests/projections/", "tests/tournament/test_ledger.py")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the event-store readers on PostgreSQL ``serial``; put first the modules
    with the most slow and fault tests, so that the workers do not end on one of them
    (the order is otherwise kept)."""
    weight: Counter[Path] = Counter()
    for item in items:
        if item.get_closest_marker("postgres") and item.nodeid.startswith(_READS_EVENTS):
            item.add_marker(pytest.mark.serial)
        if item.get_closest_marker("slow") or item.get_closest_marker("fault"):
            weight[item.path] += 1
    items.sort(key=lambda item: -weight[item.path])


_WATCHDOG = pytest.StashKey[threading.Timer]()


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> None:
    """When pytest-timeout arms its timer, arm ours for shortly before it: it prints
    what the test was waiting on. Returning None leaves pytest-timeout's own timer on."""
    if settings.timeout and settings.timeout > 0:
        item.stash[_WATCHDOG] = watch(item.nodeid, settings.timeout, PG_ADMIN_DSN)


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_cancel_timer(item: pytest.Item) -> None:
    timer = item.stash.get(_WATCHDOG, None)
    if timer is not None:
        timer.cancel()
