"""The worker: runs components, restarts the ones that crash, stops them all on a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, runtime_checkable

from accord._aio import wait_event
from accord.errors import TransportUnavailable
from accord.transports.base import GroupDeclaration

__all__ = ["Component", "Worker"]

log = logging.getLogger("accord.runtime")


@runtime_checkable
class Component(Protocol):
    """Something a worker runs: a relay, a consumer, a projector, an orchestrator.

    ``run()`` works until ``stop()`` is called, then returns. ``stop()`` makes it
    stop taking new work, lets the work in flight finish, and returns.

    A component that consumes from a transport may also have
    ``async def declare() -> list[GroupDeclaration]``: it declares its consumer
    groups without consuming. The worker calls it before starting anything.
    """

    async def run(self) -> None: ...

    async def stop(self) -> None: ...


Declare = Callable[[], Awaitable[list[GroupDeclaration]]]


def _declarer(component: object) -> Declare | None:
    declare = getattr(component, "declare", None)
    return declare if callable(declare) else None


def _name(component: object) -> str:
    name = getattr(component, "name", None)
    kind = type(component).__name__
    return f"{kind}({name})" if isinstance(name, str) else kind


class Worker:
    """Runs components side by side until told to stop.

    * First it declares the consumer groups of every component that has a
      ``declare()`` (consumers, orchestrators, flow trackers, transport
      projectors), so that a relay of the same worker never publishes, before its
      consumers subscribed, what their groups would miss. A declaration that
      fails because the broker is out of reach is retried with the restart
      backoff below; the components start once every group is declared. Any
      other failure is logged, and the component's own start raises it again.
    * A component whose ``run()`` raises (or returns without being asked to stop)
      is logged and run again after an exponential backoff (``restart_base``
      doubling up to ``restart_cap`` seconds; reset after ``healthy_after``
      seconds of running without a crash).
    * On SIGTERM or SIGINT (when :meth:`run` installs signal handlers) or
      :meth:`stop`, every component's ``stop()`` is called at once; each gets
      ``stop_timeout`` seconds to finish its work in flight before its task is
      cancelled. :meth:`run` then returns 0.
    """

    def __init__(
        self,
        components: Sequence[Component],
        *,
        restart_base: float = 0.5,
        restart_cap: float = 30.0,
        healthy_after: float = 60.0,
        stop_timeout: float = 30.0,
    ) -> None:
        self.components = list(components)
        self.restart_base = restart_base
        self.restart_cap = restart_cap
        self.healthy_after = healthy_after
        self.stop_timeout = stop_timeout
        self.restarts: dict[int, int] = {}
        self._stopping = asyncio.Event()

    @property
    def stopping(self) -> bool:
        """Whether a stop was requested."""
        return self._stopping.is_set()

    def request_stop(self) -> None:
        """Ask the worker to stop (safe to call from a signal handler)."""
        if not self._stopping.is_set():
            log.info("stop requested: stopping %d component(s)", len(self.components))
        self._stopping.set()

    async def stop(self) -> None:
        """Ask the worker to stop; :meth:`run` returns once every component stopped."""
        self.request_stop()

    async def run(self, *, handle_signals: bool = True) -> int:
        """Run every component until a stop; return the exit code (0)."""
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, self.request_stop)
                    installed.append(sig)
        tasks: list[asyncio.Task[None]] = []
        try:
            if not await self._declare_until_stopped():
                log.info("worker stopped before it started")
                return 0
            tasks = [
                asyncio.create_task(self._supervise(index, c), name=f"accord-{_name(c)}")
                for index, c in enumerate(self.components)
            ]
            log.info(
                "worker started with %s",
                ", ".join(_name(c) for c in self.components) or "nothing",
            )
            await self._stopping.wait()
            await self._stop_all(tasks)
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        log.info("worker stopped")
        return 0

    async def declare(self) -> list[GroupDeclaration]:
        """Declare the consumer groups of every component that has a ``declare()``,
        in order; return what was declared. The first failure is raised."""
        declared: list[GroupDeclaration] = []
        for component in self.components:
            declare = _declarer(component)
            if declare is not None:
                declared.extend(await declare() or [])
        return declared

    async def _declare_until_stopped(self) -> bool:
        """The declaration phase of :meth:`run`; whether to go on (no stop came)."""
        phase = asyncio.create_task(self._declare_each())
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait((phase, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (phase, stopping):
                task.cancel()
            await asyncio.gather(phase, stopping, return_exceptions=True)
        return not self._stopping.is_set()

    async def _declare_each(self) -> None:
        for component in self.components:
            declare = _declarer(component)
            failures = 0
            while declare is not None and not self._stopping.is_set():
                try:
                    for declared in await declare() or []:
                        log.info("%s declared group %s", _name(component), declared)
                    declare = None
                except TransportUnavailable as exc:
                    failures += 1
                    delay = self._restart_delay(failures)
                    log.warning(
                        "%s cannot declare its consumer group(s) yet: %s; retrying in %.1fs "
                        "(nothing starts until it does)",
                        _name(component),
                        exc,
                        delay,
                    )
                    # Not a bare sleep: a driver may have swallowed the phase's cancellation.
                    await wait_event(self._stopping, delay)
                except Exception:
                    log.exception(
                        "%s failed to declare its consumer group(s); starting it anyway",
                        _name(component),
                    )
                    declare = None

    def _restart_delay(self, failures: int) -> float:
        """Seconds to wait after ``failures`` failures in a row: ``restart_base``
        doubling, up to ``restart_cap``."""
        return min(self.restart_cap, self.restart_base * 2.0 ** (failures - 1))

    async def _supervise(self, index: int, component: Component) -> None:
        failures = 0
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                await component.run()
            except asyncio.CancelledError:
                raise
            except Exception:
                if self._stopping.is_set():
                    log.exception("%s failed while stopping", _name(component))
                    return
                log.exception("%s crashed", _name(component))
            else:
                if self._stopping.is_set():
                    return
                log.error("%s returned without being stopped", _name(component))
            if time.monotonic() - started > self.healthy_after:
                failures = 0
            failures += 1
            self.restarts[index] = self.restarts.get(index, 0) + 1
            delay = self._restart_delay(failures)
            log.info("restarting %s in %.1fs", _name(component), delay)
            await wait_event(self._stopping, delay)

    async def _stop_all(self, tasks: list[asyncio.Task[None]]) -> None:
        async def stop_one(component: Component, task: asyncio.Task[None]) -> None:
            try:
                async with asyncio.timeout(self.stop_timeout):
                    await component.stop()
            except TimeoutError:
                log.error("%s did not stop within %.0fs", _name(component), self.stop_timeout)
            except Exception:
                log.exception("stopping %s failed", _name(component))
            try:
                async with asyncio.timeout(self.stop_timeout):
                    await asyncio.shield(task)
            except TimeoutError:
                log.error("%s still running after stop(); cancelling it", _name(component))
                task.cancel()
            except Exception:
                pass  # already logged by _supervise

        await asyncio.gather(*(stop_one(c, t) for c, t in zip(self.components, tasks, strict=True)))
