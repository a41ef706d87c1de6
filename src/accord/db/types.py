"""Column types that behave the same on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

__all__ = ["BigId", "JSONType", "UTCDateTime", "json_text", "one_of"]

#: JSON on SQLite, JSONB on PostgreSQL.
JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def json_text(value: str | float | None) -> str:
    """A JSON column's value as JSON text, read raw (without its type's processing):
    a column declared JSON has NUMERIC affinity on SQLite, which stores a bare
    number (``5``, ``2.5``) as a number and gives it back as one (a float exactly as
    stored)."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return value
    return json.dumps(value)


#: A 64-bit auto-incrementing key; SQLite only auto-increments INTEGER PRIMARY KEY.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite stores no zone)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given where a timezone-aware one is required")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def one_of(column: sa.ColumnElement[Any], name: str, dialect: str) -> sa.ColumnElement[bool]:
    """``column`` is one of the values of the list bound as ``name``.

    PostgreSQL: ``column = ANY(:name)``, one SQL text whatever the list's length, so
    the statement is prepared once per connection; an expanding ``IN`` is new SQL
    for each length, prepared again (one more round trip) whenever the length is
    new or fell out of the statement cache. Elsewhere: an expanding ``IN``.
    """
    if dialect == "postgresql":
        return column == sa.any_(sa.bindparam(name, type_=postgresql.ARRAY(column.type)))
    return column.in_(sa.bindparam(name, expanding=True))
