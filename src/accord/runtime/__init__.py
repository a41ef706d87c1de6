"""The worker runtime: run a service's relays, consumers and other components.

``accord worker --app myservice.worker:components`` imports ``components``,
calls it with the :class:`Settings` and runs what it returns in a
:class:`Worker` until SIGTERM or SIGINT.
"""

from accord.runtime._app import declare_groups, load_app, make_components, serve
from accord.runtime._settings import Settings, load_settings
from accord.runtime._worker import Component, Worker

__all__ = [
    "Component",
    "Settings",
    "Worker",
    "declare_groups",
    "load_app",
    "load_settings",
    "make_components",
    "serve",
]
