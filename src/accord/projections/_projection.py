"""A projection: handlers per event type, the read-model tables it owns, and their context."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from accord.db.database import translate_errors
from accord.db.schema_events import projection_versions
from accord.errors import ConfigurationError
from accord.eventstore import RecordedEvent

__all__ = ["Handler", "OnPoison", "Projection", "ProjectionContext"]

#: A handler: ``(ctx, event)``, a coroutine function or a plain function.
Handler = Callable[["ProjectionContext", RecordedEvent], Awaitable[None] | None]
#: What a runner does with an event whose handler keeps failing after its retries.
OnPoison = Literal["park", "stop"]

_NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Projection:
    """A read model built from events: handlers per event type plus the tables it owns.

    Declare tables with :meth:`table` (by their base name; the database holds one
    copy per read-model *version*, named ``<projection>_<table>_v<n>``, so that a rebuild
    can fill a new version beside the live one) and handlers with :meth:`on`::

        leaderboard = Projection("leaderboard")
        leaderboard.table("scores", sa.Column("player", sa.String(100), primary_key=True),
                          sa.Column("points", sa.Integer, nullable=False))

        @leaderboard.on("score.changed")
        def changed(ctx: ProjectionContext, event: RecordedEvent) -> None:
            scores = ctx.table("scores")
            ctx.defer(upsert(scores), {"player": event.data["player"], ...})

    A handler runs inside the runner's batch transaction; it either writes at once
    through ``ctx.conn`` / ``await ctx.execute(...)`` or defers writes with
    :meth:`ProjectionContext.defer` (flushed in order, as executemany, before the
    batch commits). It must write only through the context (its effects are
    then applied exactly once) and check ``ctx.replaying`` before firing any
    side effect outside the database. A handler that raises makes the runner
    retry, then park or stop (``on_poison``).
    """

    def __init__(
        self,
        name: str,
        *,
        batch_size: int = 1000,
        on_poison: OnPoison = "park",
        max_retries: int = 3,
        retry_base: float = 0.1,
        retry_cap: float = 5.0,
    ) -> None:
        if not name or len(name) > 200:
            raise ConfigurationError(f"a projection name must be 1-200 characters, got {name!r}")
        if on_poison not in ("park", "stop"):
            raise ConfigurationError(f"on_poison must be 'park' or 'stop', got {on_poison!r}")
        if batch_size < 1:
            raise ConfigurationError(f"batch_size must be >= 1, got {batch_size}")
        self.name = name
        self.batch_size = batch_size
        self.on_poison: OnPoison = on_poison
        self.max_retries = max_retries
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.handlers: dict[str, tuple[Handler, bool]] = {}
        self._templates = sa.MetaData()
        self._versions: dict[int, sa.MetaData] = {}
        self._statements: dict[tuple[str, int], dict[tuple[Any, ...], Any]] = {}

    # --- declaring ---------------------------------------------------------

    def table(self, name: str, *columns: Any, **kwargs: Any) -> sa.Table:
        """Declare a read-model table (columns, constraints, indexes as for ``sa.Table``).

        Returns the *template* table: use :meth:`ProjectionContext.table` or
        :meth:`tables` to get the one of a given version.
        """
        if self._versions:
            raise ConfigurationError(
                f"projection {self.name!r}: declare table {name!r} before the projection runs"
            )
        return sa.Table(name, self._templates, *columns, **kwargs)

    def on(self, *event_types: str) -> Callable[[Handler], Handler]:
        """Decorator: handle these event types with the decorated function."""
        if not event_types:
            raise ConfigurationError("Projection.on() needs at least one event type")

        def register(fn: Handler) -> Handler:
            for event_type in event_types:
                if event_type in self.handlers:
                    raise ConfigurationError(
                        f"projection {self.name!r} already has a handler for {event_type!r}"
                    )
                self.handlers[event_type] = (fn, inspect.iscoroutinefunction(fn))
            return fn

        return register

    @property
    def event_types(self) -> list[str]:
        """The event types this projection handles (the runner reads only these)."""
        return sorted(self.handlers)

    # --- versions of the read model ----------------------------------------

    def metadata_for(self, version: int) -> sa.MetaData:
        """The tables of read-model ``version``, named ``<projection>_<table>_v<version>``."""
        md = self._versions.get(version)
        if md is None:
            md = sa.MetaData(naming_convention=_NAMING)
            suffix = f"_{self.name}_v{version}"
            for template in self._templates.sorted_tables:
                copy = template.to_metadata(md, name=self.physical_name(template.name, version))
                items: list[Any] = [*copy.indexes, *copy.constraints]
                for item in items:
                    # Index and constraint names are schema-wide: suffix them too.
                    if isinstance(item.name, str) and item.name:
                        item.name = sa.sql.elements.conv(_fit(item.name + suffix))
            self._versions[version] = md
        return md

    def tables(self, version: int) -> dict[str, sa.Table]:
        """Base table name -> table of read-model ``version``."""
        md = self.metadata_for(version)
        return {
            t.name: md.tables[self.physical_name(t.name, version)]
            for t in self._templates.sorted_tables
        }

    def physical_name(self, table: str, version: int) -> str:
        """The database name of ``table`` in read-model ``version`` (cut to 63 bytes
        with a hash of the whole, PostgreSQL's limit, when it is longer)."""
        return _fit(f"{self.name}_{table}_v{version}")

    async def create_tables(self, conn: AsyncConnection, version: int) -> None:
        """Create the tables of ``version`` if they do not exist."""
        with translate_errors(f"creating the tables of projection {self.name!r} v{version}"):
            await conn.run_sync(self.metadata_for(version).create_all)

    async def drop_tables(self, conn: AsyncConnection, version: int) -> None:
        """Drop the tables of ``version`` (those that exist)."""
        with translate_errors(f"dropping the tables of projection {self.name!r} v{version}"):
            await conn.run_sync(self.metadata_for(version).drop_all)

    async def live_tables(self, conn: AsyncConnection) -> dict[str, sa.Table]:
        """The tables readers should query now: resolved through the version pointer row.

        Call it in the reader's own transaction/connection, so that the pointer and
        the rows are read together; before the first run it is version 1.
        """
        return self.tables(await self.live_version(conn))

    async def live_version(self, conn: AsyncConnection) -> int:
        """The read-model version readers use (1 before the projection first ran)."""
        with translate_errors(f"resolving the live version of projection {self.name!r}"):
            version = await conn.scalar(
                sa.select(projection_versions.c.live_version).where(
                    projection_versions.c.projection == self.name
                )
            )
        return int(version) if version is not None else 1

    def __repr__(self) -> str:
        return f"Projection({self.name!r}, types={self.event_types})"


class ProjectionContext:
    """What a handler gets besides the event: the batch transaction and the tables.

    ``conn`` is the batch's transaction (its writes commit with the checkpoint);
    ``replaying`` is True while a rebuild replays history into a new version (do
    not fire external side effects then); ``version`` is the read-model version
    being written.
    """

    def __init__(
        self, projection: Projection, conn: AsyncConnection, version: int, replaying: bool
    ) -> None:
        self.projection = projection
        self._conn = conn
        self.version = version
        self.replaying = replaying
        self._tables = projection.tables(version)
        self._dialect = conn.dialect.name
        # Statements built for this version and dialect, reused batch after batch.
        self._statements = projection._statements.setdefault((self._dialect, version), {})
        self._pending: list[tuple[Any, list[dict[str, Any]]]] = []
        self._last: dict[sa.Table, tuple[Any, list[dict[str, Any]]]] = {}
        self._merged: dict[int, dict[tuple[Any, ...], dict[str, Any]]] = {}

    @property
    def conn(self) -> AsyncConnection:
        """The batch transaction. Deferred writes are *not* flushed by touching it:
        use :meth:`execute` when a read must see them."""
        return self._conn

    def table(self, name: str) -> sa.Table:
        """The table ``name`` (its base name) of the version being written."""
        try:
            return self._tables[name]
        except KeyError:
            raise ConfigurationError(
                f"projection {self.projection.name!r} has no table {name!r}; "
                f"it declares {sorted(self._tables)}"
            ) from None

    def defer(self, statement: Any, params: dict[str, Any]) -> None:
        """Queue a write, run before the batch commits; the fast path.

        Queued writes to one table keep their order; the parameters of a run of
        one statement object (with no other write to that table in between) go
        to the database as one executemany, so writes to *different* tables may
        be reordered. Statements without a single target table (``text()``) are
        barriers that keep everything in order.
        """
        table = getattr(statement, "table", None)
        key = table if isinstance(table, sa.Table) else None
        entry = self._last.get(key) if key is not None else None
        if entry is not None and entry[0] is statement:
            entry[1].append(params)
            return
        entry = (statement, [params])
        self._pending.append(entry)
        if key is None:
            self._last.clear()
        else:
            self._last[key] = entry

    def insert(self, table: sa.Table | str, values: dict[str, Any]) -> None:
        """Defer an insert of ``values`` into ``table``; consecutive inserts of one shape
        batch together."""
        target = self.table(table) if isinstance(table, str) else table
        shape = ("insert", target.name, *values)
        cache = self._statements
        statement = cache.get(shape)
        if statement is None:
            statement = cache[shape] = target.insert()
        self.defer(statement, values)

    def upsert(
        self,
        table: sa.Table | str,
        values: dict[str, Any],
        *,
        key: Sequence[str],
        add: Sequence[str] = (),
    ) -> None:
        """Defer an insert-or-update of ``values`` keyed on the ``key`` columns: on
        conflict the ``add`` columns are incremented by the new values and every other
        non-key column is replaced.

        Upserts of one shape batch together, and upserts of the same key within a
        run are merged before they reach the database (``add`` columns summed, the
        others last-wins), which is exactly what applying them one by one gives."""
        key = tuple(key)
        add = tuple(add)
        shape = (table if isinstance(table, str) else table.name, key, add, *values)
        statement = self._statements.get(shape)
        if statement is None:
            target = self.table(table) if isinstance(table, str) else table
            statement = _upsert(self._dialect, target, values, key, add)
            self._statements[shape] = statement
        else:
            target = statement.table
        row = tuple([values[c] for c in key])
        entry = self._last.get(target)
        if entry is not None and entry[0] is statement:
            merged = self._merged[id(entry[1])]
            existing = merged.get(row)
            if existing is None:
                merged[row] = fresh = dict(values)
                entry[1].append(fresh)
            else:
                for column, value in values.items():
                    existing[column] = existing[column] + value if column in add else value
            return
        fresh = dict(values)
        self.defer(statement, fresh)
        self._merged[id(self._last[target][1])] = {row: fresh}

    async def flush(self) -> None:
        """Run the queued writes now (in order)."""
        pending, self._pending = self._pending, []
        self._last = {}
        self._merged = {}
        for statement, params in pending:
            await self._conn.execute(statement, params)

    async def execute(self, statement: Any, params: Any = None) -> Any:
        """Flush queued writes, then execute ``statement`` in the batch transaction."""
        await self.flush()
        return await self._conn.execute(statement, params)


def _upsert(
    dialect: str, table: sa.Table, values: dict[str, Any], key: Sequence[str], add: Sequence[str]
) -> Any:
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    stmt = insert(table)
    updates: dict[str, Any] = {}
    for column in values:
        if column in key:
            continue
        if column in add:
            updates[column] = table.c[column] + stmt.excluded[column]
        else:
            updates[column] = stmt.excluded[column]
    if not updates:
        return stmt.on_conflict_do_nothing(index_elements=list(key))
    return stmt.on_conflict_do_update(index_elements=list(key), set_=updates)


def handled_types(projections: Iterable[Projection]) -> Sequence[str]:
    """Every event type handled by any of ``projections``."""
    return sorted({t for p in projections for t in p.handlers})


# PostgreSQL's identifiers hold 63 bytes (a longer one is an error, not a new name).
_IDENTIFIER_BYTES = 63


def _fit(name: str) -> str:
    """``name``, or for a longer one its start and a hash of the whole: distinct
    names stay distinct, and the same name always gives the same identifier."""
    if len(name.encode()) <= _IDENTIFIER_BYTES:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:12]
    start = name.encode()[: _IDENTIFIER_BYTES - len(digest) - 1].decode(errors="ignore")
    return f"{start}_{digest}"
