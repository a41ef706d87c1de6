"""Private parts of the SQL transport: the statements and the consuming loop.

The public face is :class:`accord.transports.sql.SqlTransport`.
"""

from __future__ import annotations

__all__: list[str] = []
