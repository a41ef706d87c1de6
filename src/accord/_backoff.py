"""The one retry delay Accord uses: exponential, capped, jittered."""

from __future__ import annotations

import random

__all__ = ["backoff_delay"]

# Past this many doublings every cap is reached (2.0 ** 1024 is past a float).
_DOUBLINGS = 1000


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (from 1): a random point
    between half and all of ``min(cap, base * 2**(attempt-1))``, so that many retries
    spread out instead of arriving together."""
    ceiling = min(cap, base * 2.0 ** min(max(0, attempt - 1), _DOUBLINGS))
    return random.uniform(ceiling / 2, ceiling)
