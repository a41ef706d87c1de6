"""Broker-safe names for channels and groups (shared by the NATS and Redis transports)."""

from __future__ import annotations

import hashlib
import re

__all__ = ["safe_name"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def safe_name(name: str) -> str:
    """``name`` with anything but letters, digits, ``-`` and ``_`` replaced by ``_``.

    When something had to be replaced, a short hash of the original is appended, so two
    different names (``a.b`` and ``a_b``) never map to the same broker object.
    """
    cleaned = _UNSAFE.sub("_", name)
    if cleaned != name or not cleaned:
        cleaned += "_" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return cleaned
