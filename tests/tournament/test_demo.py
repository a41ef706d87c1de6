"""``accord demo --once`` plays its whole scenario and exits 0 only if every step held."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from accord.transports import from_url
from tests.brokers import cleanup
from tests.conftest import NATS_URL, REDIS_URL
from tests.tournament.conftest import free_port

pytestmark = pytest.mark.slow


def test_demo_once_checks_out_and_exits_0(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "accord",
            "demo",
            "--once",
            "--data-dir",
            str(tmp_path / "data"),
            "--match-port",
            str(free_port()),
            "--score-port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        env={"COLUMNS": "120", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "every step checked out" in out
    for words in ("ACTIVE", "CANCELLED", "mallory", "leaderboard as of", "dead letter #"):
        assert words in out, words
    assert "FAILED" not in out


def test_a_bad_option_is_refused_clearly(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "accord",
            "up",
            "--saga-style",
            "telepathy",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "orchestration, choreography" in result.stdout + result.stderr


@pytest.mark.parametrize(
    "broker",
    [
        pytest.param(NATS_URL, marks=pytest.mark.nats, id="nats"),
        pytest.param(REDIS_URL, marks=pytest.mark.redis, id="redis"),
    ],
)
async def test_demo_once_over_nats_and_redis(tmp_path: Path, broker: str) -> None:
    channel = f"t-{uuid.uuid4().hex[:10]}"
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "accord", "demo", "--once",
            "--broker", broker, "--channel", channel,
            "--data-dir", str(tmp_path / "data"),
            "--match-port", str(free_port()),
            "--score-port", str(free_port()),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "120"},
        )  # fmt: skip
        out, _ = await asyncio.wait_for(process.communicate(), 90)
        assert process.returncode == 0, out.decode()
        assert "every step checked out" in out.decode()
    finally:
        transport = from_url(broker, channel=channel)
        await transport.connect()
        await cleanup([transport])
