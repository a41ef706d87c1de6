"""Pruning in batches: by hand (:func:`prune_in_batches`, every batch until the
backlog is gone) and by retention from a component's own loop (:class:`Pruning`:
one batch when due, the next at once after a full batch, else after an interval)."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta

from accord.errors import ConfigurationError

__all__ = ["PRUNE_INTERVAL", "Pruning", "checked_batch", "prune_each", "prune_in_batches"]

#: Seconds between prunes once nothing is left past the retention.
PRUNE_INTERVAL = 600.0


def checked_batch(batch: int) -> int:
    """``batch`` if it is at least 1: a batch of 0 would delete nothing for ever,
    never fewer than the batch, and its prune would never end."""
    if batch < 1:
        raise ConfigurationError(f"batch must be at least 1, got {batch}")
    return batch


async def prune_in_batches(
    prune: Callable[[int], Awaitable[int]],
    batch: int,
    on_batch: Callable[[int], None] | None = None,
    *,
    before: int = 0,
) -> int:
    """Call ``prune(batch)`` (one transaction deleting up to ``batch`` rows, returning
    how many) until a batch is not full; return ``before`` plus how many went, and
    call ``on_batch`` with that running total after each batch."""
    pruned = before
    while True:
        count = await prune(batch)
        pruned += count
        if on_batch is not None:
            on_batch(pruned)
        if count < batch:
            return pruned


async def prune_each(
    names: Iterable[str],
    prune: Callable[[str, int], Awaitable[int]],
    batch: int,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """:func:`prune_in_batches` of ``prune(name, batch)`` for each of ``names`` in
    turn (each consumer's rows, say); return how many went in all, ``on_batch``
    called with the running total across names."""
    pruned = 0
    for name in names:
        one = functools.partial(prune, name)
        pruned = await prune_in_batches(one, batch, on_batch, before=pruned)
    return pruned


class Pruning:
    """Calls ``prune(cutoff, batch)`` (deleting up to ``batch`` rows older than
    ``cutoff`` and returning how many) when due; ``retention`` None never prunes.
    ``what`` names the rows in logs ("inbox rows of scores")."""

    def __init__(
        self,
        what: str,
        retention: timedelta | None,
        prune: Callable[[datetime, int], Awaitable[int]],
        batch: int,
    ) -> None:
        self.what = what
        self.retention = retention
        self.batch = batch
        self._prune = prune
        self._due = 0.0  # event loop time of the next prune

    async def when_due(self) -> int:
        """One batch if a prune is due; how many rows went. Errors are logged (the
        next try is an interval later), never raised: the caller's loop goes on."""
        now = asyncio.get_running_loop().time()
        if self.retention is None or now < self._due:
            return 0
        try:
            pruned = await self._prune(datetime.now(UTC) - self.retention, self.batch)
        except Exception:
            logging.getLogger("accord").exception("pruning %s failed; will retry", self.what)
            pruned = 0
        if pruned:
            logging.getLogger("accord").info("pruned %d %s", pruned, self.what)
        self._due = now + (0.0 if self.full(pruned) else PRUNE_INTERVAL)
        return pruned

    def full(self, pruned: int) -> bool:
        """Whether ``pruned`` was a full batch (more may be left)."""
        return pruned >= self.batch
