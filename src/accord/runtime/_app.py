"""Loading a service's components from ``module:attribute`` and running them."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

from accord.errors import ConfigurationError
from accord.observability import configure_logging, start_metrics_server
from accord.runtime._settings import Settings
from accord.runtime._worker import Component, Worker
from accord.transports.base import GroupDeclaration

__all__ = ["declare_groups", "load_app", "make_components", "serve"]

log = logging.getLogger("accord.runtime")


def load_app(spec: str) -> Callable[..., Any]:
    """Import ``module:attribute`` (the current directory is importable, as with uvicorn)
    and return the attribute; a clear :class:`ConfigurationError` if that fails."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigurationError(
            f"--app {spec!r} must look like module:attribute, e.g. myservice.worker:components"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"cannot import app module {module_name!r} (from --app {spec!r}): {exc}. "
            "Run from the directory that contains it, or install it / add it to PYTHONPATH."
        ) from None
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigurationError(
                f"module {module_name!r} has no attribute {attribute!r} (from --app {spec!r})"
            ) from None
    if not callable(target):
        raise ConfigurationError(
            f"--app {spec!r} is a {type(target).__name__}, not a callable returning components"
        )
    return target  # type: ignore[no-any-return]


async def make_components(factory: Callable[..., Any], settings: Settings) -> list[Component]:
    """Call the app factory (with ``settings`` if it takes an argument; sync or async) and
    check that what it returns are components."""
    try:
        takes_settings = bool(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        takes_settings = True
    result = factory(settings) if takes_settings else factory()
    if inspect.isawaitable(result):
        result = await result
    items = [result] if isinstance(result, Component) else list(_iterable(result))
    for item in items:
        if not isinstance(item, Component):
            raise ConfigurationError(
                f"the app returned {item!r}, which is not a component: a component has "
                "`async def run()` and `async def stop()`"
            )
    if not items:
        raise ConfigurationError("the app returned no components to run")
    return items


def _iterable(value: Any) -> Iterable[Any]:
    if isinstance(value, Iterable):
        return value
    raise ConfigurationError(
        f"the app returned {value!r}: return a component or a list of components"
    )


async def serve(app: str | Callable[..., Any], settings: Settings) -> int:
    """Configure logging (and metrics), upgrade the database if asked, build the app's
    components, run them in a :class:`Worker` until SIGTERM/SIGINT; return 0. A
    signal while it starts stops it too (what it opened is closed), also with 0."""
    async with contextlib.AsyncExitStack() as stack:
        try:
            with _signals_cancel_this_task() as received:
                worker = await stack.enter_async_context(_worker(app, settings, metrics=True))
        except asyncio.CancelledError:
            if not received:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            log.info("stopped by %s while starting", received[0].name)
            return 0
        return await worker.run()


@contextlib.contextmanager
def _signals_cancel_this_task() -> Iterator[list[signal.Signals]]:
    """While the block runs, SIGTERM or SIGINT cancels the task running it (as they
    stop a running :class:`Worker`); yields the signals received."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    received: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        if not received and task is not None:
            task.cancel()
        received.append(sig)

    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
    try:
        yield received
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def declare_groups(
    app: str | Callable[..., Any], settings: Settings
) -> list[GroupDeclaration]:
    """Build the app's components and declare their consumer groups, without running
    them (``accord worker --declare-only``): run it for each service at deploy time,
    before any service that publishes to them starts. Upgrades the database if asked
    (the SQL transport's groups are rows in it)."""
    async with _worker(app, settings, metrics=False) as worker:
        return await worker.declare()


@contextlib.asynccontextmanager
async def _worker(
    app: str | Callable[..., Any], settings: Settings, *, metrics: bool
) -> AsyncIterator[Worker]:
    """A worker of the app's components, with logging configured and the database
    upgraded if asked; the settings' resources are closed after."""
    configure_logging(settings.log_level, json_logs=settings.log_json, service=settings.service)
    factory = load_app(app) if isinstance(app, str) else app
    if metrics and settings.metrics_port:
        try:
            start_metrics_server(settings.metrics_port)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot serve metrics on port {settings.metrics_port}: "
                f"{exc.strerror or exc}; free it, or set another metrics_port "
                "(ACCORD_METRICS_PORT)"
            ) from None
    try:
        if settings.upgrade:
            await settings.database().upgrade()
        yield Worker(await make_components(factory, settings))
    finally:
        await settings.aclose()
