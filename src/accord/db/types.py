"""Column types that behave the same on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

__all__ = [
    "BigId",
    "JSONType",
    "UTCDateTime",
    "json_text",
    "one_of",
    "rows_of_each",
    "tuple_ids_of_each",
]


class _SQLiteJSON(sa.TypeDecorator[Any]):
    """JSON on SQLite. A column declared JSON has NUMERIC affinity there: text that
    reads as a number is stored as one, so ``2.0`` would come back ``2`` and an
    integer past 64 bits rounded. A value that is a bare number is bound as bytes
    (stored as a BLOB, never converted); it reads back as the JSON it was."""

    impl = sa.JSON
    cache_ok = True

    def bind_processor(self, dialect: Any) -> Any:
        serialize = self.impl_instance.bind_processor(dialect)

        def process(value: Any) -> Any:
            text = serialize(value) if serialize is not None else value
            if isinstance(text, str) and text[:1] in _NUMBER_STARTS:
                return text.encode()
            return text

        return process


_NUMBER_STARTS = frozenset("-0123456789")

#: JSON on SQLite, JSONB on PostgreSQL.
JSONType = _SQLiteJSON().with_variant(postgresql.JSONB(), "postgresql")


def json_text(value: str | bytes | float | None) -> str:
    """A JSON column's value as JSON text, read raw (without its type's processing).
    On SQLite a bare number is stored as bytes (``_SQLiteJSON``), or, if written
    before that, as a number (a float exactly as stored)."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode()
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


def rows_of_each(
    table: sa.Table,
    column: sa.Column[Any],
    name: str,
    *also: sa.ColumnElement[bool],
    dialect: str,
    lock: bool = False,
) -> sa.Select[Any]:
    """The rows of ``table`` whose ``column`` is one of the list bound as ``name`` (and
    that meet ``also``), each row locked ``FOR UPDATE`` if ``lock``.

    PostgreSQL: one look-up per value, so that the index led by ``column`` is the
    only plan worth taking, whatever the planner knows of the table. A connection
    keeps the plan it made for ``column = ANY(:name)`` while the table was small (no
    statistics until autovacuum analyzes it): a scan of the whole table, which then
    grows with it (seen: 5-10 ms a batch of 64 sagas at 1,100-1,300 rows, from
    0.2 ms). Each look-up is a subquery of its own (``OFFSET`` keeps the planner
    from merging it back); rows are locked in the list's order: sort it. Elsewhere:
    ``column IN (...)``, locks taken by the transaction (SQLite's file lock).
    """
    if dialect != "postgresql":
        return sa.select(table).where(one_of(column, name, dialect), *also)
    values = (
        sa.func.unnest(sa.bindparam(name, type_=postgresql.ARRAY(column.type)))
        .table_valued("value")
        .render_derived(name="k")
    )
    one = sa.select(table).where(column == values.c.value, *also).offset(0)
    found = (one.with_for_update() if lock else one).lateral("r")
    return sa.select(found).select_from(values).join(found, sa.true())


def tuple_ids_of_each(table: str, column: str, values: str, where: str = "") -> str:
    """PostgreSQL: a subquery (column ``tid``) of the tuple ids of the rows of
    ``table`` whose ``column`` is one of the array ``values`` (an SQL expression, a
    cast parameter), found one index probe each as in :func:`rows_of_each`, and
    meeting ``where`` (an SQL condition on the row, alias ``t``), for an ``UPDATE
    ... FROM`` or ``DELETE ... USING`` joined on ``ctid = tid``: a Tid Scan per row.
    (Written ``WHERE ctid = ANY(ARRAY(...))``, a table planned as small is
    scanned instead, the scan looking cheaper than ten tuple fetches.)

    Only for rows no other transaction updates meanwhile (rows this one holds
    locked, or whose other writers would fail the statement's own conditions): a
    row updated after the statement's snapshot has a new tuple id, and the update
    or delete passes it by where ``WHERE key = ...`` would have waited and taken it.
    """
    also = f" AND {where}" if where else ""
    return (
        f"(SELECT r.ctid AS tid FROM unnest({values}) AS k(value) CROSS JOIN LATERAL "
        f"(SELECT t.ctid FROM {table} t WHERE t.{column} = k.value{also} OFFSET 0) r)"
    )
