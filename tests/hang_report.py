"""What a test was waiting on when it hangs: printed shortly before pytest-timeout fails it.

pytest-timeout's own report shows only the event loop sitting in ``select``.
This report adds, for every pending asyncio task, the chain of awaits down to
the one it is stuck in, and, from PostgreSQL, every session that is not idle
with what it waits for and the sessions blocking it.
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
from typing import Any

import asyncpg

_SESSIONS = """
SELECT pid, datname, state, wait_event_type, wait_event, pg_blocking_pids(pid) AS blocked_by,
       now() - xact_start AS in_transaction_for, left(query, 160) AS query
FROM pg_stat_activity
WHERE pid <> pg_backend_pid() AND state IS NOT NULL AND state <> 'idle'
ORDER BY xact_start NULLS LAST
"""
_TASK_TYPES = tuple({asyncio.Task, getattr(asyncio.tasks, "_PyTask", asyncio.Task)})


def _print(lines: list[str]) -> None:
    # One write per section, to the file descriptor: pytest's capture keeps it.
    os.write(2, ("\n".join(lines) + "\n").encode(errors="replace"))


def _awaits(task: asyncio.Task[Any]) -> list[str]:
    """The task's chain of awaits, outermost first (``get_stack`` shows only the top)."""
    lines = []
    awaited: Any = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is None:
            lines.append(f"    awaiting {awaited!r}")  # a future: its repr names its callbacks
            break
        lines.append(f"    {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return lines


def _print_tasks(answered: threading.Event) -> None:
    answered.set()
    tasks = [t for t in asyncio.all_tasks() if not t.done()]
    lines = [f"--- {len(tasks)} pending asyncio tasks ---"]
    for task in tasks:
        lines += [f"{task.get_name()}:", *_awaits(task)]
    _print(lines)


async def _sessions(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn, timeout=3)
    try:
        rows = await conn.fetch(_SESSIONS, timeout=3)
    finally:
        await conn.close(timeout=2)
    lines = [f"--- {len(rows)} PostgreSQL sessions not idle ---"]
    lines += ["    " + ", ".join(f"{k}={v}" for k, v in row.items()) for row in rows]
    return lines


def _report(nodeid: str, dsn: str) -> None:
    _print([f"=== {nodeid} is about to time out: what it waits on ==="])
    try:
        loops = {o.get_loop() for o in gc.get_objects() if type(o) in _TASK_TYPES}
    except Exception as exc:
        loops = set()
        _print([f"(could not find the event loops: {exc!r})"])
    for loop in loops:
        answered = threading.Event()
        try:
            loop.call_soon_threadsafe(_print_tasks, answered)
        except RuntimeError:
            continue  # closed meanwhile
        if not answered.wait(2):
            _print(["(the event loop did not answer in 2 s: a synchronous call blocks it)"])
    try:
        _print(asyncio.run(asyncio.wait_for(_sessions(dsn), 6)))
    except Exception as exc:
        _print([f"(could not read PostgreSQL's sessions: {exc!r})"])


def watch(nodeid: str, limit: float, dsn: str) -> threading.Timer:
    """Print the report ten seconds before ``limit`` unless the timer is cancelled first."""
    timer = threading.Timer(max(limit - 10, limit * 0.8), _report, args=(nodeid, dsn))
    timer.name = f"hang-report {nodeid}"
    timer.daemon = True
    timer.start()
    return timer
