"""Saga, saga step, deadline and flow tables (filled in by the saga work)."""

from __future__ import annotations

from accord.db.schema import metadata

__all__ = ["metadata"]
