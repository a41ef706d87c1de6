"""Apps that tests run with ``accord worker --app tests.runtime.apps:<name>``."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from accord.inbox import Consumer, HandlerContext
from accord.outbox import Relay
from accord.runtime import Settings
from accord.transports.base import Transport
from accord.transports.sql import SqlTransport
from tests.inbox.conftest import create_business_tables, effects

log = logging.getLogger("tests.app")


def _transport(settings: Settings) -> Transport:
    url = settings.broker_url
    if url.startswith(("sqlite", "postgresql")):
        # Short lease so a killed consumer's delivery comes back quickly.
        return SqlTransport(url, channel=settings.channel, poll_interval=0.05, lease=1.5)
    return settings.transport()


async def effect_consumer(settings: Settings) -> list[Any]:
    """One consumer (named after the service) writing an effect row per ``test.work``.

    With ``TEST_HANG_MARKER`` set, the first handler call writes its effect, creates
    that file and then hangs before its transaction commits (to be SIGKILLed).
    """
    database = settings.database()
    await create_business_tables(database)
    consumer = Consumer(settings.service, database, _transport(settings), replay_interval=0.1)

    @consumer.handler("test.work")
    async def on_work(ctx: HandlerContext, data: Any) -> None:
        log.info("working on %s", data["n"])
        await ctx.conn.execute(effects.insert().values(message_id=ctx.message.id, value=data["n"]))
        marker = os.environ.get("TEST_HANG_MARKER")
        if marker and not await asyncio.to_thread(Path(marker).exists):
            await asyncio.to_thread(Path(marker).write_text, str(os.getpid()))
            await asyncio.Event().wait()

    return [consumer]


def relay_only(settings: Settings) -> list[Any]:
    """A relay of the service's outbox, and no consumer."""
    return [Relay(settings.database(), _transport(settings))]


def not_a_component(settings: Settings) -> list[Any]:
    return ["hello"]


async def slow_start(settings: Settings) -> list[Any]:
    """An app whose building takes a minute (a slow dependency at startup): it
    creates the file ``TEST_STARTING_MARKER`` names, then waits."""
    await asyncio.to_thread(Path(os.environ["TEST_STARTING_MARKER"]).write_text, "starting")
    await asyncio.sleep(60)
    return relay_only(settings)
