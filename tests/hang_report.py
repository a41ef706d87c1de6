"""What a test was waiting on when it hangs: printed shortly before pytest-timeout fails it.

pytest-timeout's own report shows only the event loop sitting in ``select``.
This report adds the stack of every pending asyncio task (the line each one is
awaiting) and, from PostgreSQL, every session that is not idle with the locks
it waits for and the sessions blocking it.
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading

import asyncpg

_SESSIONS = """
SELECT pid, datname, state, wait_event_type, wait_event, pg_blocking_pids(pid) AS blocked_by,
       now() - xact_start AS in_transaction_for, left(query, 160) AS query
FROM pg_stat_activity
WHERE pid <> pg_backend_pid() AND state IS NOT NULL AND state <> 'idle'
ORDER BY xact_start NULLS LAST
"""


def _print(text: str) -> None:
    # The file descriptor, not sys.stderr: pytest's capture keeps it for the report.
    os.write(2, (text + "\n").encode(errors="replace"))


def _print_tasks() -> None:
    tasks = [t for t in asyncio.all_tasks() if not t.done()]
    _print(f"--- {len(tasks)} pending asyncio tasks ---")
    for task in tasks:
        _print(f"{task.get_name()}:")
        for frame in task.get_stack():
            code = frame.f_code
            _print(f"    {code.co_filename}:{frame.f_lineno} in {code.co_name}")


async def _print_sessions(dsn: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        rows = await conn.fetch(_SESSIONS, timeout=5)
    finally:
        await conn.close()
    _print(f"--- {len(rows)} PostgreSQL sessions not idle ---")
    for row in rows:
        _print("    " + ", ".join(f"{k}={v}" for k, v in row.items()))


def _report(nodeid: str, dsn: str) -> None:
    _print(f"=== {nodeid} is about to time out: what it waits on ===")
    loops = {t.get_loop() for t in gc.get_objects() if isinstance(t, asyncio.Task)}
    for loop in loops:
        if loop.is_running():
            loop.call_soon_threadsafe(_print_tasks)
    try:
        asyncio.run(_print_sessions(dsn))
    except Exception as exc:
        _print(f"(could not read PostgreSQL's sessions: {exc!r})")


def watch(nodeid: str, limit: float, dsn: str) -> threading.Timer:
    """Print the report ten seconds before ``limit`` unless the timer is cancelled first."""
    timer = threading.Timer(max(limit - 10, limit * 0.8), _report, args=(nodeid, dsn))
    timer.daemon = True
    timer.start()
    return timer
