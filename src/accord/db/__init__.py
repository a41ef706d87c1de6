"""Databases: the async engine, every Accord table, and migrations.

``accord.db.metadata`` holds every Accord table, for use in your own Alembic
environment; ``await Database(url).upgrade()`` (or ``accord db upgrade``)
creates them.
"""

from accord.db import schema_events as _schema_events  # noqa: F401  (registers tables)
from accord.db import schema_sagas as _schema_sagas  # noqa: F401  (registers tables)
from accord.db.clock import ServerClock
from accord.db.database import Database, normalize_url, translate_errors
from accord.db.schema import metadata

__all__ = ["Database", "ServerClock", "metadata", "normalize_url", "translate_errors"]
