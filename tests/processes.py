"""Worker processes for fault tests, both sides of them.

In the worker: ``serve`` runs its parts, prints "ready" once they can receive, and stops
them cleanly on SIGTERM. In the test: ``Processes`` starts such workers
(``python -m MODULE ARGS``), returns each once it printed "ready", waits for them to exit
and kills whatever is still running at the end.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import IO, Protocol, Self

from accord.db import Database
from accord.inbox import Consumer
from accord.testing import wait_for
from accord.transports.base import Transport

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Part(Protocol):
    """What a worker runs: a relay, an orchestrator, a consumer."""

    async def run(self) -> None: ...

    async def stop(self) -> None: ...


async def serve(
    parts: Sequence[Part],
    consumers: Sequence[Consumer],
    transport: Transport,
    database: Database,
    on_sigterm: Callable[[], None] | None = None,
) -> None:
    """Run ``parts`` until SIGTERM, then stop them, close ``transport`` and dispose of
    ``database``. Prints "ready" once each of ``consumers`` is subscribed: from then on
    what is published for them reaches them, so a test may start its work.
    ``on_sigterm`` runs when SIGTERM comes, before anything stops."""
    tasks = [asyncio.create_task(part.run()) for part in parts]
    for consumer in consumers:
        while consumer._subscription is None:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    if on_sigterm is not None:
        on_sigterm()
    for part in parts:
        await part.stop()
    await asyncio.gather(*tasks, return_exceptions=True)
    await transport.close()
    await database.dispose()


class Processes:
    """The worker processes a test started; as an async context manager, kills those
    still running when it exits."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    async def spawn(
        self, module: str, *args: str, stderr: IO[str] | None = None
    ) -> subprocess.Popen[str]:
        """Start ``python -m module *args`` from the repository root; return it once it
        printed "ready" (fail if it printed anything else or exited first). ``stderr``:
        a file for what it logs (by default the test's own stderr)."""
        proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        command = " ".join(["python -m", module, *args])
        assert line.strip() == "ready", f"{command} did not start (exit {proc.poll()})"
        return proc

    async def exited(self, proc: subprocess.Popen[str], timeout: float) -> int:
        """Wait up to ``timeout`` seconds for ``proc`` to exit; its return code
        (``-signal.SIGKILL`` for a process killed that way)."""
        await wait_for(lambda: proc.poll() is not None, timeout)
        return proc.returncode

    def kill_all(self) -> None:
        """SIGKILL every process still running, and reap them all."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.kill_all)


_HOLDER = """
import asyncio, sys
{imports}

async def main():
    transport = {factory}
    await transport.connect()
    async def hang(delivery):
        print("got", delivery.message.id, flush=True)
        await asyncio.Event().wait()
    await transport.subscribe("crashy", hang)
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def a_killed_consumers_delivery_comes_back(
    transport: Transport, imports: str, factory: str, url: str, channel: str
) -> None:
    """Start a consumer of group "crashy" in a child process (its transport made by
    ``factory``, which sees the broker ``url`` and ``channel`` as ``sys.argv[1:3]``),
    publish one message on ``transport``, SIGKILL the child while it holds the
    delivery, and check that the group gets the message again, as attempt 2."""
    from accord.messages import Message
    from accord.testing import Collector

    code = _HOLDER.format(imports=imports, factory=factory)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, url, channel, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        assert (await asyncio.wait_for(child.stdout.readline(), 15)).startswith(b"ready")
        sent = Message(type="test.crash")
        await transport.publish([sent])
        line = await asyncio.wait_for(child.stdout.readline(), 15)
        assert line.decode().split() == ["got", sent.id]
        child.send_signal(signal.SIGKILL)
        await child.wait()
        survivor = Collector()
        await transport.subscribe("crashy", survivor)
        await survivor.wait(1, 15)
        message, attempt = survivor.received[0][0], survivor.received[0][1]
        assert message is not None and message.id == sent.id
        assert attempt == 2
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
