"""Relay options no round could work with are refused when the relay is made, by
name; a message that keeps failing for days keeps its batch moving."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from accord import Database, Message, add_to_outbox
from accord.db.schema import outbox
from accord.errors import ConfigurationError
from accord.outbox import Relay
from accord.testing import FaultyTransport
from accord.transports import Transport, from_url
from tests.outbox.conftest import statuses

NAN, INF = math.nan, math.inf


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("batch_size", NAN),
        ("batch_size", 2.5),
        ("batch_size", True),
        ("concurrency", 2.5),
        ("max_attempts", 0),
        ("max_attempts", NAN),
        ("backoff_base", NAN),
        ("backoff_base", -1),
        ("backoff_cap", INF),
        ("poll_interval", 0),
        ("poll_interval", NAN),
        ("poll_interval", -1),
        ("lease", NAN),
        ("lease", INF),
        ("lease", True),
        ("lease", 1e12),
        ("cleanup_interval", NAN),
        ("retention", 7),
        ("retention", timedelta(days=-1)),
        ("retention", timedelta.max),
    ],
)
async def test_relay_options_no_round_could_use_are_refused_by_name(
    database: Database, option: str, value: Any
) -> None:
    """Relay options are checked when the relay is made, as the transports' are:
    counts are whole numbers >= 1, times finite seconds (above 0, or 0 or more for
    the backoff) up to ten years, the retention a timedelta of 0 or more.

    Before, it failed because only batch_size, concurrency and lease were compared
    with 1 or 0, which NaN, 2.5 and True pass: on SQLite a NaN lease or batch size
    failed every round (ValueError, IntegrityError) and nothing was ever published;
    a NaN backoff failed the round after its publishes (with locks on PostgreSQL
    the batch was sent again every round); a NaN max_attempts never let a message
    go DEAD; a poll_interval of 0 spun; a lease of 1e12 s overflowed every round."""
    with pytest.raises(ConfigurationError, match=f"Relay {option} must be"):
        Relay(database, from_url("memory://"), **{option: value})


async def test_relay_options_at_their_limits_are_taken(database: Database) -> None:
    """A retry at once (backoff 0) and SENT rows deleted at once (retention 0) are
    choices, not mistakes."""
    relay = Relay(
        database,
        from_url("memory://"),
        backoff_base=0,
        backoff_cap=0,
        retention=timedelta(0),
        max_attempts=1,
        lease=10 * 365 * 24 * 3600.0,
    )
    assert relay.retention == timedelta(0)


class CountingTransport(FaultyTransport):
    """A real transport; the ids in ``fail_ids`` fail; counts what reached the broker."""

    def __init__(self, inner: Transport, fail_ids: set[str]) -> None:
        super().__init__(inner, fail_ids=fail_ids)
        self.sent: Counter[str] = Counter()

    async def publish_envelopes(self, envelopes: Sequence[Any]) -> None:
        self.sent.update(e.id for e in envelopes if e.id not in self.fail_ids)
        await super().publish_envelopes(envelopes)


async def test_a_message_that_failed_over_a_thousand_times_is_retried_and_its_batch_sent_once(
    database: Database, db_url: str, make_transport: Callable[[str], Transport]
) -> None:
    """With a large ``max_attempts`` (retry for days), a message past its 1,024th
    failure waits ``backoff_cap`` like any other, and the rest of its batch is SENT
    once.

    Before, it failed because the backoff is ``base * 2.0 ** (attempt - 1)``, which
    raises OverflowError past 1,024 attempts: the round failed after its publishes,
    so with locks (PostgreSQL) every other row of the batch was rolled back and
    published again every round, and with leases it came back after the lease to
    fail again."""
    broken, fine = Message(type="t.broken"), Message(type="t.fine")
    async with database.transaction() as conn:
        await add_to_outbox(conn, broken, fine)
        await conn.execute(
            outbox.update().where(outbox.c.event_type == "t.broken").values(retry_count=1100)
        )
    transport = CountingTransport(make_transport(db_url), fail_ids={broken.id})
    await transport.connect()
    relay = Relay(database, transport, max_attempts=1_000_000, backoff_base=0.5, backoff_cap=60)
    assert await relay.run_once() == 1
    assert await relay.run_once() == 0  # the broken one waits 30-60 s
    assert transport.sent == {fine.id: 1}
    async with database.connect() as conn:
        row = (
            await conn.execute(
                sa.select(outbox.c.status, outbox.c.retry_count, outbox.c.available_at).where(
                    outbox.c.event_type == "t.broken"
                )
            )
        ).one()
    assert (row.status, row.retry_count) == ("PENDING", 1101)
    assert row.available_at > datetime.now(UTC) + timedelta(seconds=25)
    assert (await statuses(database))[fine.id] == "SENT"
