"""A real tournament stack for the tests: ``accord up`` in a subprocess, talked to over HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from accord.testing import wait_for
from tests.conftest import _admin, _pg_url
from tournament.config import StackConfig
from tournament.match_engine.app import create_app as create_match_app
from tournament.score_engine.app import create_app as create_score_app
from tournament.stack import prepare

SAGA_GROUPS = ("score-engine", "orchestrator", "match-engine", "flow-tracker")
#: The API token of the engines' apps run in process (:func:`engines`).
TOKEN = "robustness-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def alive(pid: int) -> bool:
    """Running (a zombie, whose parent is gone and not yet reaped, counts as stopped)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return not any(line.startswith("State:\tZ") for line in status)
    except FileNotFoundError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    """A running ``accord up`` and an HTTP client for it."""

    data_dir: Path
    process: subprocess.Popen[bytes]
    match_url: str
    score_url: str
    token: str
    options: dict[str, Any]
    client: httpx.AsyncClient = field(init=False)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def pids(self) -> dict[str, int]:
        return {
            k: int(v) for k, v in json.loads((self.data_dir / "processes.json").read_text()).items()
        }

    def output(self) -> str:
        return (self.data_dir / "up.out").read_text(errors="replace")

    async def create(self, participants: list[str], name: str = "cup") -> dict[str, Any]:
        r = await self.client.post(
            f"{self.match_url}/tournaments",
            json={"name": name, "participants": participants},
            headers=self.auth,
        )
        assert r.status_code == 202, r.text
        return dict(r.json())

    async def tournament(self, tournament_id: str) -> dict[str, Any]:
        r = await self.client.get(f"{self.match_url}/tournaments/{tournament_id}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    async def settled(self, tournament_id: str, timeout: float = 30.0) -> dict[str, Any]:
        """The tournament once it is no longer PENDING."""
        found: dict[str, Any] = {}

        async def done() -> bool:
            found.update(await self.tournament(tournament_id))
            return found["status"] != "PENDING"

        await wait_for(done, timeout, interval=0.1)
        return found

    async def ban(self, participant: str) -> None:
        r = await self.client.post(
            f"{self.score_url}/bans", json={"participant": participant}, headers=self.auth
        )
        assert r.status_code == 201, r.text

    async def play(self, tournament_id: str, home: str, away: str, winner: str | None) -> str:
        r = await self.client.post(
            f"{self.match_url}/tournaments/{tournament_id}/matches",
            json={"home": home, "away": away, "winner": winner},
            headers=self.auth,
        )
        assert r.status_code == 202, r.text
        return str(r.json()["id"])

    async def ledger(self, tournament_id: str, participant: str) -> httpx.Response:
        return await self.client.get(
            f"{self.score_url}/tournaments/{tournament_id}/participants/{participant}/ledger"
        )

    async def applied(self, tournament_id: str, player: str, match_id: str) -> int:
        """Wait until the match is in the player's ledger; its ledger position."""
        position: list[int] = []

        async def found() -> bool:
            r = await self.ledger(tournament_id, player)
            events = r.json()["events"] if r.status_code == 200 else []
            position[:] = [e["position"] for e in events if e["data"].get("match_id") == match_id]
            return bool(position)

        await wait_for(found, 20.0, interval=0.1)
        return position[0]

    async def leaderboard(self, tournament_id: str, **params: Any) -> httpx.Response:
        return await self.client.get(
            f"{self.score_url}/tournaments/{tournament_id}/leaderboard", params=params
        )


def start_stack(tmp: Path, **options: Any) -> Stack:
    """Start ``accord up`` with ``options`` (CLI option names with underscores)."""
    match_port, score_port = free_port(), free_port()
    options = {"channel": f"t-{uuid.uuid4().hex[:10]}", **options}
    args = [
        sys.executable, "-m", "accord", "up",
        "--data-dir", str(tmp),
        "--match-port", str(match_port),
        "--score-port", str(score_port),
    ]  # fmt: skip
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    tmp.mkdir(parents=True, exist_ok=True)
    out = open(tmp / "up.out", "wb")  # noqa: SIM115
    process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    out.close()
    match_url, score_url = f"http://127.0.0.1:{match_port}", f"http://127.0.0.1:{score_port}"
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"accord up exited: {(tmp / 'up.out').read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if (
                httpx.get(f"{match_url}/health").status_code == 200
                and httpx.get(f"{score_url}/health").status_code == 200
                and "up:" in (tmp / "up.out").read_text()
            ):
                break
        if time.monotonic() > deadline:
            stop_stack(process)
            raise RuntimeError(f"accord up did not come up: {(tmp / 'up.out').read_text()}")
        time.sleep(0.2)
    token = (tmp / "api-token").read_text().strip()
    return Stack(tmp, process, match_url, score_url, token, options)


def stop_stack(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM ``accord up``; its exit code (SIGKILL after 30 s: then -9)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()
    return int(process.returncode)


@contextlib.contextmanager
def running(tmp: Path, **options: Any) -> Iterator[Stack]:
    """A stack for a block; checks it stops cleanly (exit 0, no child left)."""
    stack = start_stack(tmp, **options)
    pids = stack.pids()
    try:
        yield stack
    finally:
        code = stop_stack(stack.process)
        alive = []
        for name, pid in pids.items():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 0)
                alive.append(name)
                os.kill(pid, signal.SIGKILL)
        assert code == 0, f"accord up exited {code}:\n{stack.output()}"
        assert not alive, f"children left running after the stop: {alive}"


@contextlib.asynccontextmanager
async def client_for(stack: Stack) -> AsyncIterator[Stack]:
    async with httpx.AsyncClient(timeout=30.0) as client:
        stack.client = client
        yield stack


async def create_pg_database() -> str:
    """A new PostgreSQL database (the caller drops it with :func:`drop_pg_database`)."""
    name = f"accord_tour_{uuid.uuid4().hex[:10]}"
    await _admin(f'CREATE DATABASE "{name}"')
    return name


async def drop_pg_database(name: str) -> None:
    await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pg_url_of(name: str) -> str:
    return _pg_url(name)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tournament")


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[Stack]:
    """The module's stack with an HTTP client for this test (modules define ``stack``)."""
    async with client_for(stack) as ready:
        yield ready


@contextlib.asynccontextmanager
async def engines(
    tmp_path: Path,
    *,
    match_db: str | None = None,
    score_db: str | None = None,
    broker: str | None = None,
    saga_style: str = "orchestration",
    channel: str = "tournament",
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient, StackConfig]]:
    """Clients of both engines' apps in process (no worker runs), on real databases;
    a 500 comes back as a response (as uvicorn would answer it), not as an exception."""
    config = StackConfig(
        data_dir=str(tmp_path),
        match_db=match_db,
        score_db=score_db,
        broker=broker,
        saga_style=saga_style,
        channel=channel,
        api_token=TOKEN,
    ).resolved()
    await prepare(config)
    match_app, score_app = create_match_app(config), create_score_app(config)
    async with (
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=match_app, raise_app_exceptions=False),
            base_url="http://match",
        ) as match,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=score_app, raise_app_exceptions=False),
            base_url="http://score",
        ) as score,
    ):
        yield match, score, config
