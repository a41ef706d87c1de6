"""The flow tracker: records every message by correlation id, so the timeline of a flow
across services can be shown and flows that stopped making progress are reported."""

from __future__ import annotations

import asyncio
import builtins
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from accord._aio import wait_event
from accord.db import Database
from accord.db.database import translate_errors
from accord.db.schema_sagas import flows
from accord.inbox import Consumer, HandlerContext
from accord.sagas._metrics import FLOWS_STALLED
from accord.transports.base import Transport

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


def _outcome(message_data: Any, extensions: dict[str, str]) -> str | None:
    if "flowoutcome" in extensions:
        return extensions["flowoutcome"]
    if isinstance(message_data, dict) and "ok" in message_data and "saga_id" in message_data:
        return "ok" if message_data["ok"] else "failed"  # an orchestrated saga's reply
    if "sagaid" in extensions:
        return COMMAND  # an orchestrated saga's command
    return None


class FlowTracker:
    """A consumer (group ``name``) that records every message matching ``topics`` in
    ``accord_flows``, and every ``check_interval`` seconds reports (log + the
    ``accord_flows_stalled`` gauge) flows without progress for ``stalled_after``."""

    def __init__(
        self,
        database: Database,
        transport: Transport,
        *,
        name: str = "flow-tracker",
        topics: tuple[str, ...] = ("#",),
        stalled_after: timedelta = timedelta(minutes=5),
        check_interval: float = 30.0,
    ) -> None:
        self.name = name
        self.database = database
        self.stalled_after = stalled_after
        self.check_interval = check_interval
        self.consumer = Consumer(name, database, transport)
        for topic in topics:
            self.consumer.add_handler(topic, self._record)
        self._stop = asyncio.Event()
        self._reported: set[str] = set()

    async def _record(self, ctx: HandlerContext, data: Any) -> None:
        m = ctx.message
        ext = dict(m.extensions)
        error = data.get("error") if isinstance(data, dict) else None
        await ctx.conn.execute(
            flows.insert().values(
                correlation_id=m.correlationid or m.id,
                message_id=m.id,
                causation_id=m.causationid,
                type=m.type,
                source=m.source,
                step=ext.get("flowstep") or m.subject,
                outcome=_outcome(data, ext),
                error=str(error)[:4000] if error else None,
                time=m.time,
                recorded_at=datetime.now(UTC),
            )
        )

    async def check(self) -> list[StalledFlow]:
        """Report the stalled flows now (log each new one once; set the gauge)."""
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

    async def run(self) -> None:
        """Record messages and check for stalled flows until :meth:`stop`."""
        self._stop.clear()
        await self.consumer.start()
        try:
            while not self._stop.is_set():
                try:
                    await self.check()
                except Exception:
                    log.exception("checking for stalled flows failed; will retry")
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
        query = (
            sa.select(flows).where(flows.c.correlation_id == correlation_id).order_by(flows.c.id)
        )
        with translate_errors("reading a flow"):
            async with self.database.connect() as conn:
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
        are left out: their orchestrator ends them or marks them STUCK."""
        cutoff = (now or datetime.now(UTC)) - older_than
        ended = sa.func.sum(sa.case((flows.c.outcome.in_((*ENDS, COMMAND)), 1), else_=0))
        last_id = sa.func.max(flows.c.id)
        query = (
            sa.select(flows.c.correlation_id, last_id, sa.func.count())
            .group_by(flows.c.correlation_id)
            .having(sa.and_(ended == 0, sa.func.max(flows.c.recorded_at) < cutoff))
            .order_by(sa.func.max(flows.c.recorded_at))
            .limit(limit)
        )
        with translate_errors("finding stalled flows"):
            async with self.database.connect() as conn:
                groups = (await conn.execute(query)).all()
                if not groups:
                    return []
                lasts = {
                    r.id: r
                    for r in (
                        await conn.execute(
                            sa.select(flows.c.id, flows.c.type, flows.c.recorded_at).where(
                                flows.c.id.in_([g[1] for g in groups])
                            )
                        )
                    ).all()
                }
        return [
            StalledFlow(
                correlation_id=g[0],
                last_type=lasts[g[1]].type,
                last_at=lasts[g[1]].recorded_at,
                messages=int(g[2]),
            )
            for g in groups
        ]
