"""JSON for Accord's hot paths.

``loads`` is pydantic-core's Rust parser (already a dependency through Pydantic):
it gives the same values as :func:`json.loads` — arbitrary-precision integers,
exact floats, unicode — about four times faster, which matters where every
event or message read is parsed. ``dumps`` is compact :func:`json.dumps`.
"""

from __future__ import annotations

import json
from typing import Any

import pydantic_core

__all__ = ["dumps", "loads"]


def loads(text: str | bytes) -> Any:
    """Parse a JSON document; raises ValueError if it is not valid JSON."""
    return pydantic_core.from_json(text)


def dumps(value: Any) -> str:
    """Compact JSON text for a value (non-JSON types are written with ``str``)."""
    return json.dumps(value, separators=(",", ":"), default=str)
