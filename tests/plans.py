"""Reading the plan a PostgreSQL connection keeps for a prepared statement.

asyncpg prepares every statement, and after five runs a connection may keep a generic
plan, made from the table as it was then. The plan tests prepare a statement while its
table is small, run it past those five, grow the table, and read with
``EXPLAIN (ANALYZE) EXECUTE`` what the kept plan does now."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.dialects import postgresql


def literal(value: Any) -> str:
    """A statement's argument written out: ``EXECUTE`` in ``EXPLAIN`` takes no
    parameters."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        kind = "text" if value and all(isinstance(v, str) for v in value) else "bigint"
        return "ARRAY[" + ", ".join(literal(v) for v in value) + f"]::{kind}[]"
    if isinstance(value, datetime):
        return f"'{value.isoformat()}'::timestamptz"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(int(value))


async def explain(driver: Any, prepared: Any, args: Sequence[Any]) -> dict[str, Any]:
    """Run ``prepared`` with ``args`` under ``EXPLAIN (ANALYZE)``: its kept plan, and
    how it ran. (ANALYZE runs it: an update or delete takes effect.)"""
    values = ", ".join(literal(value) for value in args)
    [plan] = json.loads(
        await driver.fetchval(
            f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE {prepared.get_name()}({values})"
        )
    )
    return dict(plan)


def nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    """Every node of a plan, depth first."""
    return [node, *(n for child in node.get("Plans", []) for n in nodes(child))]


def reads(plan: dict[str, Any], prefix: str) -> list[dict[str, Any]]:
    """The plan's reads of the tables whose names start with ``prefix`` (not the
    update or delete of their rows)."""
    return [
        n
        for n in nodes(plan["Plan"])
        if n.get("Relation Name", "").startswith(prefix) and n["Node Type"] != "ModifyTable"
    ]


class Kept:
    """A SQLAlchemy statement prepared on one asyncpg connection, run with named
    parameters."""

    def __init__(self, driver: Any, statement: Any) -> None:
        self.driver = driver
        self.compiled = statement.compile(dialect=postgresql.asyncpg.dialect())

    async def prepare(self) -> None:
        self.prepared = await self.driver.prepare(str(self.compiled))

    def args(self, params: dict[str, Any]) -> list[Any]:
        bound = self.compiled.construct_params(params)
        return [bound[name] for name in self.compiled.positiontup or []]

    async def run(self, params: dict[str, Any]) -> list[Any]:
        return list(await self.prepared.fetch(*self.args(params)))

    async def explain(self, params: dict[str, Any]) -> dict[str, Any]:
        return await explain(self.driver, self.prepared, self.args(params))
