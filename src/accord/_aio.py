"""asyncio helpers that keep cancellation working on Python 3.11.

Accord does not use ``asyncio.wait_for``: on Python 3.11, when a task is
cancelled just as the awaitable it waits for completes, ``wait_for`` returns
normally and the cancellation is lost (CPython gh-86296, fixed in 3.12). A
loop that waits for a wake-up that way and is cancelled as a NOTIFY arrives
goes on running, and whoever awaits it hangs. ``asyncio.timeout`` has no such
race; ruff bans ``asyncio.wait_for`` in the package (``TID251``). The drivers
(nats-py, aio-pika, redis-py) still use it inside; loops around their calls also
check a stop flag.
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["wait_event"]


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait until ``event`` is set, at most ``seconds``; return whether it is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    return event.is_set()
