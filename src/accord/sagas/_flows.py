"""The flow tracker: records every message by correlation id, so the timeline of a flow
across services can be shown and flows that stopped making progress are reported."""

from __future__ import annotations

import asyncio
import builtins
import functools
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from accord._aio import wait_event
from accord._retention import checked_batch, prune_in_batches
from accord.db import Database
from accord.db.database import log_retried_failure, translate_errors
from accord.db.schema_sagas import flow_heads, flows, sagas
from accord.errors import ConfigurationError
from accord.inbox import Consumer, HandlerContext
from accord.sagas._definition import seconds
from accord.sagas._metrics import FLOWS_STALLED
from accord.sagas._store import ENDED as SAGA_ENDED
from accord.transports.base import GroupDeclaration, Transport

__all__ = ["FlowEntry", "FlowTracker", "Flows", "StalledFlow"]

log = logging.getLogger("accord.sagas.flows")

ENDS = ("completed", "compensated")
#: The outcome recorded for an orchestrator's command. Such a flow is an orchestrated
#: saga: its orchestrator drives it to an end with durable timeouts (or marks it
#: STUCK, which ``accord sagas list --status STUCK`` shows), and no message of it
#: says that it ended, so it is never reported as stalled.
COMMAND = "command"


@dataclass(frozen=True)
class FlowEntry:
    """One message of a flow: what happened, where (source) and when."""

    time: datetime
    recorded_at: datetime
    type: str
    source: str
    step: str | None
    outcome: str | None
    error: str | None
    message_id: str
    causation_id: str | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        return {
            "time": self.time.isoformat(),
            "recorded_at": self.recorded_at.isoformat(),
            "type": self.type,
            "source": self.source,
            "step": self.step,
            "outcome": self.outcome,
            "error": self.error,
            "message_id": self.message_id,
            "causation_id": self.causation_id,
        }


@dataclass(frozen=True)
class StalledFlow:
    """A flow whose last message is older than the stall threshold and that never ended."""

    correlation_id: str
    last_type: str
    last_at: datetime
    messages: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        return {
            "correlation_id": self.correlation_id,
            "last_type": self.last_type,
            "last_at": self.last_at.isoformat(),
            "messages": self.messages,
        }


def _is_reply(message_data: Any) -> bool:
    """Whether the message data is an orchestrated saga's reply."""
    return isinstance(message_data, dict) and "ok" in message_data and "saga_id" in message_data


def _orchestrated(message_data: Any, extensions: dict[str, str]) -> bool:
    """Whether the message is an orchestrated saga's command or reply."""
    return _is_reply(message_data) or "sagaid" in extensions


def _outcome(message_data: Any, extensions: dict[str, str]) -> str | None:
    if "flowoutcome" in extensions:
        return extensions["flowoutcome"]
    if _is_reply(message_data):
        return "ok" if message_data["ok"] else "failed"  # an orchestrated saga's reply
    if "sagaid" in extensions:
        return COMMAND  # an orchestrated saga's command
    return None


#: The columns of a recorded message, bound by name (see ``_recording``).
_ROW = (
    "correlation_id",
    "message_id",
    "causation_id",
    "type",
    "source",
    "step",
    "outcome",
    "error",
    "time",
    "recorded_at",
)
_HEAD = ("correlation_id", "messages", "last_id", "last_type", "last_at", "ended", "orchestrated")


@functools.cache
def _recording(dialect: str) -> tuple[Any, Any]:
    """The statements that record a message: its row in ``accord_flows``, then its
    count into the flow's head row (``accord_flow_heads``), created by a flow's first
    message. Two trackers recording messages of one flow at once queue on the head
    row; the later message (higher id) stays the last. On PostgreSQL one statement
    does both (the first of the pair is None): one round trip a message."""
    row = flows.insert().values({c: sa.bindparam(c) for c in _ROW})
    if dialect == "postgresql":
        written = row.returning(
            flows.c.id, flows.c.correlation_id, flows.c.type, flows.c.recorded_at
        ).cte("recorded")
        head = pg_insert(flow_heads).from_select(
            _HEAD,
            sa.select(
                written.c.correlation_id,
                sa.literal(1),
                written.c.id,
                written.c.type,
                written.c.recorded_at,
                sa.bindparam("ended", type_=sa.Boolean),
                sa.bindparam("orchestrated", type_=sa.Boolean),
            ),
        )
        return None, _counted(head, sa.func.greatest)
    values = sqlite_insert(flow_heads).values({c: sa.bindparam(c) for c in _HEAD})
    return row.returning(flows.c.id), _counted(values, sa.func.max)


def _counted(insert: Any, newest: Any) -> Any:
    new = insert.excluded
    h = flow_heads.c
    return insert.on_conflict_do_update(
        index_elements=[h.correlation_id],
        set_={
            "messages": h.messages + 1,
            "last_type": sa.case((new.last_id > h.last_id, new.last_type), else_=h.last_type),
            "last_id": newest(h.last_id, new.last_id),
            "last_at": newest(h.last_at, new.last_at),
            "ended": sa.or_(h.ended, new.ended),
            "orchestrated": sa.or_(h.orchestrated, new.orchestrated),
        },
    )


#: The widths of the columns a recorded message's texts go to.
_NAME_WIDTH = 200
_OUTCOME_WIDTH = 20


def stored_correlation_id(correlation_id: str) -> str:
    """A flow's correlation id as ``accord_flows`` holds it: one longer than the column
    (a message's correlation id has no limit) by its start and a digest of the whole,
    so that each such flow still has a row of its own and ``timeline`` finds it by the
    id its messages carry."""
    if len(correlation_id) <= _NAME_WIDTH:
        return correlation_id
    digest = hashlib.sha256(correlation_id.encode()).hexdigest()
    return f"{correlation_id[:100]}~sha256:{digest}"


def _fit(text: str | None, width: int) -> str | None:
    # A message's source, subject and extensions have no limit: recorded cut to the
    # column (PostgreSQL refused the whole row, and the tracker dead-lettered it).
    return text if text is None or len(text) <= width else text[:width]


def _cutoff(older_than: timedelta, now: datetime | None) -> datetime:
    """The time ``older_than`` before ``now`` (default: the current time), checked: a
    negative age would take flows that are moving for stalled ones (and prune them
    with ``stalled``); one that reaches before year 1 takes nothing."""
    if not isinstance(older_than, timedelta) or older_than < timedelta(0):
        raise ConfigurationError(
            f"older_than must be a timedelta of 0 or more, not {older_than!r}: a negative "
            "age selects flows that are still moving"
        )
    if now is not None and (not isinstance(now, datetime) or now.utcoffset() is None):
        raise ConfigurationError(
            f"now must be a timezone-aware datetime (datetime.now(UTC)), not {now!r}"
        )
    try:
        return (now or datetime.now(UTC)) - older_than
    except OverflowError:
        return datetime.min.replace(tzinfo=UTC)


def _positive_age(what: str, age: Any) -> None:
    if not isinstance(age, timedelta) or age <= timedelta(0):
        raise ConfigurationError(f"{what} must be a positive timedelta, not {age!r}")


async def _flow_exists(ctx: HandlerContext, correlation_id: str) -> bool:
    query = sa.select(flow_heads.c.correlation_id).where(
        flow_heads.c.correlation_id == correlation_id
    )
    return (await ctx.conn.scalar(query)) is not None


class FlowTracker:
    """A consumer (group ``name``) that records the messages of flows matching
    ``topics`` in ``accord_flows``, and every ``check_interval`` seconds reports (log +
    the ``accord_flows_stalled`` gauge) flows without progress for ``stalled_after``.

    A flow is a choreographed saga (its events carry the flow extensions
    :class:`Choreography` sets) or an orchestrated one (its commands and replies);
    a message with their correlation id is recorded as part of them (a service's
    plain event in reaction to one). An ordinary message of no flow is acknowledged
    and not recorded: with the default ``topics`` (every message) it is not reported
    as a flow that never ended. (So a plain message that reaches the tracker before
    the first message of its flow is not in that flow's timeline.)

    Each round also prunes the flows whose last message is more than ``retention``
    old (None keeps them) and that ended: a message said it completed or
    compensated, or it is an orchestrated saga whose instance in this database
    ended or is not here (its orchestrator keeps another database). Flows that
    never ended are kept, to be reported, until they end or ``accord flows prune
    --stalled`` removes them; so is the timeline of a saga still running or STUCK
    here. ``inbox_retention`` is the tracker's consumer's (see
    :class:`~accord.inbox.Consumer`).
    """

    def __init__(
        self,
        database: Database,
        transport: Transport,
        *,
        name: str = "flow-tracker",
        topics: tuple[str, ...] = ("#",),
        stalled_after: timedelta = timedelta(minutes=5),
        check_interval: float = 30.0,
        retention: timedelta | None = timedelta(days=7),
        inbox_retention: timedelta | None = timedelta(days=7),
    ) -> None:
        _positive_age("stalled_after", stalled_after)
        if retention is not None and (
            not isinstance(retention, timedelta) or retention < timedelta(0)
        ):
            raise ConfigurationError(
                f"retention must be a timedelta of 0 or more, or None (keep every flow), "
                f"not {retention!r}"
            )
        seconds("check_interval", check_interval)
        self.name = name
        self.database = database
        self.stalled_after = stalled_after
        self.check_interval = check_interval
        self.retention = retention
        self.consumer = Consumer(name, database, transport, inbox_retention=inbox_retention)
        for topic in topics:
            self.consumer.add_handler(topic, self._record)
        self._stop = asyncio.Event()
        self._reported: set[str] = set()

    async def _record(self, ctx: HandlerContext, data: Any) -> None:
        m = ctx.message
        ext = dict(m.extensions)
        error = data.get("error") if isinstance(data, dict) else None
        correlation_id = stored_correlation_id(m.correlationid or m.id)
        outcome = _outcome(data, ext)
        orchestrated = _orchestrated(data, ext)
        if outcome is None and not orchestrated and not await _flow_exists(ctx, correlation_id):
            return  # a message of no flow (an ordinary event): not a saga to track
        values: dict[str, Any] = {
            "correlation_id": correlation_id,
            "message_id": m.id,
            "causation_id": _fit(m.causationid, _NAME_WIDTH),
            "type": m.type,
            "source": _fit(m.source, _NAME_WIDTH),
            "step": _fit(ext.get("flowstep") or m.subject, _NAME_WIDTH),
            "outcome": _fit(outcome, _OUTCOME_WIDTH),
            "error": str(error)[:4000] if error else None,
            "time": m.time,
            "recorded_at": datetime.now(UTC),
            "ended": outcome in ENDS,
            "orchestrated": orchestrated,
        }
        row, head = _recording(ctx.conn.dialect.name)
        if row is not None:
            values.update(
                messages=1,
                last_id=await ctx.conn.scalar(row, values),
                last_type=m.type,
                last_at=values["recorded_at"],
            )
        await ctx.conn.execute(head, values)

    async def check(self) -> list[StalledFlow]:
        """Prune the flows past ``retention``, then report the stalled flows now (log
        each new one once; set the gauge)."""
        if self.retention is not None:
            await Flows(self.database).prune(self.retention)
        stalled = await Flows(self.database).stalled(self.stalled_after)
        FLOWS_STALLED.labels(self.name).set(len(stalled))
        for flow in stalled:
            if flow.correlation_id not in self._reported:
                log.warning(
                    "flow %s stalled: last message %s at %s, nothing since",
                    flow.correlation_id,
                    flow.last_type,
                    flow.last_at.isoformat(),
                )
        self._reported = {f.correlation_id for f in stalled}
        return stalled

    async def declare(self) -> list[GroupDeclaration]:
        """Declare the tracker's group without consuming (see
        :meth:`accord.inbox.Consumer.declare`)."""
        return await self.consumer.declare()

    async def run(self) -> None:
        """Record messages and check for stalled flows until :meth:`stop`."""
        self._stop.clear()
        await self.consumer.start()
        try:
            while not self._stop.is_set():
                try:
                    await self.check()
                except Exception as exc:
                    log_retried_failure(log, exc, "checking for stalled flows failed; will retry")
                await wait_event(self._stop, self.check_interval)
        finally:
            await self.consumer.stop()

    async def stop(self) -> None:
        """Stop recording and checking."""
        self._stop.set()


class Flows:
    """Read what flow trackers recorded in ``database``."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def timeline(self, correlation_id: str) -> builtins.list[FlowEntry]:
        """Every message of the flow, in the order the tracker received them."""
        stored = stored_correlation_id(correlation_id)
        query = sa.select(flows).where(flows.c.correlation_id == stored).order_by(flows.c.id)
        with translate_errors("reading a flow"):
            async with self.database.read() as conn:
                rows = (await conn.execute(query)).all()
        return [
            FlowEntry(
                time=r.time,
                recorded_at=r.recorded_at,
                type=r.type,
                source=r.source,
                step=r.step,
                outcome=r.outcome,
                error=r.error,
                message_id=r.message_id,
                causation_id=r.causation_id,
            )
            for r in rows
        ]

    async def stalled(
        self, older_than: timedelta, *, now: datetime | None = None, limit: int = 100
    ) -> builtins.list[StalledFlow]:
        """Flows that never ended (no completed/compensated event) and whose last message
        was recorded more than ``older_than`` ago, oldest first. Orchestrated sagas
        are left out: their orchestrator ends them or marks them STUCK. ``now``, if
        given, is timezone-aware."""
        cutoff = _cutoff(older_than, now)
        h = flow_heads.c
        query = (
            sa.select(h.correlation_id, h.last_type, h.last_at, h.messages)
            .where(h.ended == sa.false(), h.orchestrated == sa.false(), h.last_at < cutoff)
            .order_by(h.last_at)
            .limit(limit)
        )
        with translate_errors("finding stalled flows"):
            async with self.database.read() as conn:
                rows = (await conn.execute(query)).all()
        return [
            StalledFlow(
                correlation_id=r.correlation_id,
                last_type=r.last_type,
                last_at=r.last_at,
                messages=int(r.messages),
            )
            for r in rows
        ]

    async def prune(
        self,
        older_than: timedelta,
        *,
        stalled: bool = False,
        now: datetime | None = None,
        batch: int = 1000,
        on_batch: Callable[[int], None] | None = None,
    ) -> int:
        """Delete the flows (their messages and head rows) whose last message was
        recorded more than ``older_than`` ago and that ended (see
        :class:`FlowTracker`); with ``stalled``, every one that old. Returns how many
        flows; ``batch`` flows a transaction, ``on_batch(pruned so far)`` called after
        each.

        A message arriving for a flow while it is pruned starts it again (on
        PostgreSQL the tracker's write waits for the prune's transaction)."""
        batch = checked_batch(batch)
        cutoff = _cutoff(older_than, now)
        h = flow_heads.c
        pick = sa.select(h.correlation_id).where(h.last_at < cutoff)
        if not stalled:
            # An orchestrated saga's flow goes once its instance here ended or if it
            # is not here at all; a running or STUCK one keeps its timeline.
            live = sa.exists().where(
                sagas.c.id == h.correlation_id, sagas.c.status.not_in(SAGA_ENDED)
            )
            pick = pick.where(
                sa.or_(h.ended == sa.true(), sa.and_(h.orchestrated == sa.true(), ~live))
            )
        if self.database.is_postgres:
            pick = pick.with_for_update(skip_locked=True)

        async def one(limit: int) -> int:
            async with self.database.transaction() as conn:
                ids = (await conn.execute(pick.limit(limit))).scalars().all()
                if ids:
                    await conn.execute(flows.delete().where(flows.c.correlation_id.in_(ids)))
                    await conn.execute(flow_heads.delete().where(h.correlation_id.in_(ids)))
            return len(ids)

        with translate_errors("pruning flows"):
            return await prune_in_batches(one, batch, on_batch)
