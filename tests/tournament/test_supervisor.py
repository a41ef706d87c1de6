"""A killed supervisor must not leave its children running (holding the ports)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.tournament.conftest import alive, start_stack


def test_children_stop_when_accord_up_is_killed(tmp_path: Path) -> None:
    stack = start_stack(tmp_path / "up")
    children = stack.pids()
    assert children and all(alive(pid) for pid in children.values())
    stack.process.kill()  # SIGKILL: no chance to stop its children itself
    stack.process.wait()
    deadline = time.monotonic() + 30
    left = dict(children)
    while left and time.monotonic() < deadline:
        left = {name: pid for name, pid in left.items() if alive(pid)}
        time.sleep(0.2)
    for pid in left.values():  # never leave them behind, even when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not left, f"children still running after their supervisor was killed: {sorted(left)}"
