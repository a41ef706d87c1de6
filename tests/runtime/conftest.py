"""Helpers to run ``accord worker`` as a real subprocess (killed in teardown)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


class Workers:
    """Starts ``accord worker`` processes; kills whatever is still running at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []

    @staticmethod
    def environment(env: dict[str, str] | None = None) -> dict[str, str]:
        """This process's environment, with the tests importable and ``env`` on top."""
        return {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        environment = self.environment(env)
        index = len(self.procs)
        proc = subprocess.Popen(
            [sys.executable, "-c", "from accord.cli import main; main()", "worker", *args],
            cwd=ROOT,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=open(self.tmp_path / f"worker-{index}.log", "wb"),  # noqa: SIM115
        )
        self.procs.append(proc)
        return proc

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        return (self.tmp_path / f"worker-{self.procs.index(proc)}.log").read_text()

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    made = Workers(tmp_path)
    yield made
    made.kill_all()
