"""The model both claims are checked against: the relay's claim of outbox rows and
the SQL transport's claim of deliveries (see tests/outbox/test_claim.py and
tests/transports/test_sql_claim.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, example, settings

from accord.db import Database
from accord.transports._sql import _queries as q

#: Hypothesis settings of the claims' model tests (a database per test, many examples).
SETTINGS = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def with_examples(
    parse: Callable[[str], Any], cases: Sequence[tuple[str, int]]
) -> Callable[[Any], Any]:
    """A decorator adding each ``(spec, limit)`` as an explicit example (``rows`` from
    ``parse(spec)``): shapes a random search finds rarely."""

    def decorate(test: Any) -> Any:
        for spec, limit in cases:
            test = example(rows=parse(spec), limit=limit)(test)
        return test

    return decorate


@dataclass(frozen=True)
class Slot:
    """One row as the model sees it, in seq order."""

    seq: int
    key: str | None
    ready: bool  # may go itself: due, nobody holds a lease on it
    held: bool = False  # locked right now by another transaction
    gone: bool = False  # settled already (an outbox row SENT): not in the way


def may_go(slots: Sequence[Slot]) -> list[int]:
    """The rows that may go now, in seq order: ready, not held, and every earlier
    row of their key may go too."""
    blocked: set[str] = set()
    out = []
    for slot in slots:
        if slot.gone:
            continue
        if slot.ready and not slot.held and slot.key not in blocked:
            out.append(slot.seq)
        elif slot.key is not None:
            blocked.add(slot.key)
    return out


def check_claim(
    slots: Sequence[Slot], claimed: Sequence[int], limit: int, *, in_order: bool = True
) -> None:
    """A claim takes at most ``limit`` rows, distinct and in seq order, each one that
    may go with every earlier row of its key; with ``in_order``, the first rows
    that may go, passing over none (a key with a held row aside: which rows another
    transaction holds shows only when the claim tries to lock them, so the key may
    be passed over whole), and at least one if any may go and nothing is held."""
    by_seq = {slot.seq: slot for slot in slots}
    seqs = list(claimed)
    assert seqs == sorted(set(seqs)), f"claimed rows must be distinct and in seq order: {seqs}"
    assert len(seqs) <= limit
    taken = set(seqs)
    for seq in seqs:
        slot = by_seq[seq]
        assert slot.ready and not slot.held and not slot.gone, f"{slot} may not go"
        if slot.key is not None:
            earlier = [s.seq for s in slots if s.seq < seq and s.key == slot.key and not s.gone]
            assert set(earlier) <= taken, f"row {seq} of {slot.key!r} overtakes {earlier}"
    if not in_order:
        return
    held = {slot.key for slot in slots if slot.held}
    model = [seq for seq in may_go(slots) if by_seq[seq].key not in held]
    free = [seq for seq in seqs if by_seq[seq].key not in held]
    assert free == model[: len(free)], f"claimed {seqs}; the rows that may go: {model}"
    if model and not held:
        assert seqs, f"nothing claimed; the rows that may go: {model}"


async def claim_deliveries(
    database: Database, channel: str, group: str, limit: int, now: datetime, *, keep: bool = True
) -> list[q.Claimed]:
    """One SQL-transport claim round of consumer "me" (leased for 30 s), committed
    or, with ``keep=False``, rolled back."""
    async with database.transaction() as conn:
        claimed = await q.claim(
            conn,
            channel,
            group,
            "me",
            limit,
            now,
            now + timedelta(seconds=30),
            is_postgres=database.is_postgres,
        )
        if not keep:
            await conn.rollback()
    return claimed
