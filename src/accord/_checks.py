"""What a setting's value must be, checked alike everywhere (a bool is no number)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["is_count", "is_finite"]


def is_count(value: Any) -> bool:
    """Whether ``value`` is an int of at least 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def is_finite(value: Any) -> bool:
    """Whether ``value`` is a finite int or float."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
