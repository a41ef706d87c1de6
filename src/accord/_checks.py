"""What a setting's value must be, checked alike everywhere (a bool is no number)."""

from __future__ import annotations

import math
from typing import Any

from accord.errors import ConfigurationError

__all__ = ["MAX_BIGINT", "checked_limit", "is_count", "is_finite", "is_seconds"]

#: The largest whole number both databases store (BIGINT) and take as a LIMIT: past
#: it SQLite's driver raises OverflowError and asyncpg a DataError.
MAX_BIGINT = 2**63 - 1


def is_count(value: Any) -> bool:
    """Whether ``value`` is an int of at least 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def is_finite(value: Any) -> bool:
    """Whether ``value`` is a finite int or float."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_seconds(value: Any, *, zero_ok: bool = False, longest: float = math.inf) -> bool:
    """Whether ``value`` is a finite number of seconds above 0 (or from 0 with
    ``zero_ok``), up to ``longest``."""
    return is_finite(value) and (value >= 0 if zero_ok else value > 0) and value <= longest


def checked_limit(limit: Any) -> int:
    """A listing's ``limit``: a whole number of at least 1 (ConfigurationError
    otherwise); one past BIGINT means all rows, and is sent as the largest it holds."""
    if not is_count(limit):
        raise ConfigurationError(f"limit must be a whole number of at least 1, not {limit!r}")
    return min(int(limit), MAX_BIGINT)
