"""Waiting for a condition instead of sleeping a guess."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ["assert_eventually", "wait_for"]

T = TypeVar("T")


async def wait_for(
    check: Callable[[], T | Awaitable[T]], timeout: float = 10.0, interval: float = 0.02
) -> T:
    """Call ``check`` until it returns a truthy value; return it. Raise TimeoutError after
    ``timeout`` seconds, naming the check and its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            name = getattr(check, "__name__", repr(check))
            raise TimeoutError(f"{name} still false after {timeout}s (last value: {value!r})")
        await asyncio.sleep(interval)


async def assert_eventually(
    check: Callable[[], object], timeout: float = 10.0, interval: float = 0.02
) -> None:
    """Retry ``check`` (sync or async) until it stops raising AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if inspect.isawaitable(result):
                await result
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(interval)
