"""The process supervisor behind ``accord up`` and ``accord demo``.

It starts every process of the stack (:mod:`tournament.stack`) as a child,
restarts a child that dies (exponential backoff, reset once it has run a while)
and logs the restart, and on :meth:`Supervisor.stop` sends SIGTERM to every
child, waits for them, and SIGKILLs what is left after a grace period.

Children run in their own session, so a Ctrl-C in the terminal reaches only the
supervisor, which then stops them in order. Each child's output goes to
``DATA_DIR/logs/<name>.log``; ``DATA_DIR/processes.json`` lists the live pids.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx

from accord._aio import wait_event
from accord.errors import ConfigurationError
from tournament.config import SUPERVISOR_ENV, TOKEN_ENV, StackConfig
from tournament.stack import API_ROLES, SCALED_ROLES, WORKER_ROLES

__all__ = ["Child", "Supervisor"]


@dataclass
class Child:
    """One supervised process: its name, role, the running process and its restarts."""

    name: str
    role: str
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    exits: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        """The pid of the running process, if any."""
        return self.process.pid if self.process is not None else None


class Supervisor:
    """Runs the tournament stack's processes for ``config`` (resolved) with ``token``.

    ``say`` receives one line per notable event (a start, a restart, the stop).
    """

    def __init__(
        self,
        config: StackConfig,
        token: str,
        *,
        say: Callable[[str], None] = print,
        restart_base: float = 0.5,
        restart_cap: float = 15.0,
        healthy_after: float = 30.0,
        stop_grace: float = 15.0,
    ) -> None:
        self.config = replace(config.resolved(), instance=uuid.uuid4().hex)
        self.token = token
        self.say = say
        self.restart_base = restart_base
        self.restart_cap = restart_cap
        self.healthy_after = healthy_after
        self.stop_grace = stop_grace
        self.data_dir = Path(self.config.data_dir)
        self.log_dir = self.data_dir / "logs"
        self.children: list[Child] = []
        for role in (*API_ROLES, *WORKER_ROLES):
            count = self.config.workers if role in SCALED_ROLES else 1
            for index in range(1, count + 1):
                name = role if count == 1 else f"{role}-{index}"
                self.children.append(Child(name, role))
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # -- running ----------------------------------------------------------------

    async def start(self) -> None:
        """Start every child (and the watchers that restart them)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for child in self.children:
            await self._spawn(child)
        self._write_pids()
        self._tasks = [asyncio.create_task(self._watch(c)) for c in self.children]

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Return once both HTTP APIs answer ``/health``; raise ConfigurationError (with
        the end of the failing child's log) if they do not within ``timeout``."""
        deadline = time.monotonic() + timeout
        urls = {"match-api": self.config.match_url, "score-api": self.config.score_url}
        async with httpx.AsyncClient(timeout=2.0) as client:
            for role, url in urls.items():
                while True:
                    with contextlib.suppress(httpx.HTTPError, ValueError):
                        response = await client.get(f"{url}/health")
                        if response.json().get("instance") == self.config.instance:
                            break
                    if time.monotonic() > deadline:
                        raise ConfigurationError(
                            f"the {role} did not answer on {url} within {timeout:.0f}s "
                            f"(is the port free?); its log ends with:\n{self.tail(role)}"
                        )
                    await asyncio.sleep(0.1)

    async def wait_ready_or_stop(self, timeout: float = 30.0) -> bool:
        """:meth:`wait_ready`, unless SIGINT/SIGTERM (or :meth:`request_stop`) comes
        first: then every child is stopped and the answer is False. Starting can take
        a while (a busy port waits ``timeout``); a signal must not leave children."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop)
        ready = asyncio.ensure_future(self.wait_ready(timeout))
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (ready, stopping):
                task.cancel()
        if ready.done() and not ready.cancelled():
            ready.result()  # wait_ready's ConfigurationError, if it gave up
            return True
        await self.stop()
        return False

    async def run(self) -> int:
        """Run until SIGINT/SIGTERM (or :meth:`request_stop`), then stop everything; 0."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self._stopping.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await self.stop()
        return 0

    def request_stop(self) -> None:
        """Ask :meth:`run` to stop everything (safe from a signal handler)."""
        self._stopping.set()

    async def stop(self) -> None:
        """SIGTERM every child, wait up to ``stop_grace`` seconds, SIGKILL the rest."""
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        running = [c for c in self.children if c.process and c.process.returncode is None]
        for child in running:
            with contextlib.suppress(ProcessLookupError):
                assert child.process is not None
                child.process.send_signal(signal.SIGTERM)

        async def reap(child: Child) -> None:
            assert child.process is not None
            try:
                async with asyncio.timeout(self.stop_grace):
                    await child.process.wait()
            except TimeoutError:
                self.say(f"{child.name} did not stop within {self.stop_grace:.0f}s: killed")
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
                await child.process.wait()

        await asyncio.gather(*(reap(c) for c in running))
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / "processes.json").unlink()

    # -- children -----------------------------------------------------------------

    async def _spawn(self, child: Child) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)  # it may have been removed since
        log = open(self.log_dir / f"{child.name}.log", "ab")  # noqa: ASYNC230, SIM115
        try:
            child.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tournament.process",
                child.role,
                self.config.to_json(),
                env={**os.environ, TOKEN_ENV: self.token, SUPERVISOR_ENV: str(os.getpid())},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()

    async def _watch(self, child: Child) -> None:
        failures = 0
        while not self._stopping.is_set():
            assert child.process is not None
            started = time.monotonic()
            code = await child.process.wait()
            if self._stopping.is_set():
                return
            child.exits.append(code)
            if time.monotonic() - started > self.healthy_after:
                failures = 0
            failures += 1
            delay = min(self.restart_cap, self.restart_base * 2.0 ** (failures - 1))
            child.restarts += 1
            self.say(
                f"{child.name} (pid {child.pid}) exited with code {code}; restarting it in "
                f"{delay:.1f}s (restart #{child.restarts}, log: {self.log_dir / child.name}.log)"
            )
            await wait_event(self._stopping, delay)
            if self._stopping.is_set():
                return
            try:
                await self._spawn(child)
                self._write_pids()
            except OSError as exc:
                # Its old process stays the one watched: the next turn of the loop
                # counts this as another exit and tries again after a longer wait.
                self.say(f"{child.name} could not be restarted: {exc}")
                continue
            self.say(f"{child.name} restarted (pid {child.pid})")

    def _write_pids(self) -> None:
        pids = {c.name: c.pid for c in self.children}
        path = self.data_dir / "processes.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(pids, indent=2))
        tmp.replace(path)

    def tail(self, name: str, lines: int = 15) -> str:
        """The last ``lines`` lines of a child's log."""
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
