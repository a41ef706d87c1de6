"""``accord demo --once`` plays its whole scenario and exits 0 only if every step held."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
