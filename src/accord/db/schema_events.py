"""Event store, snapshot, projection checkpoint tables (filled in by the event-store work)."""

from __future__ import annotations

from accord.db.schema import metadata

__all__ = ["metadata"]
