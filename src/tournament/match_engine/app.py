"""The Match Engine's HTTP API: tournaments, matches, and the sagas that create them."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import FastAPI, Header, HTTPException, Query, Response
from sqlalchemy.ext.asyncio import AsyncConnection

from accord.db import Database
from accord.db.types import one_of
from accord.errors import NotFoundError
from accord.messages import Message
from accord.outbox import add as add_to_outbox
from accord.outbox import transaction as outbox_transaction
from accord.sagas import Flows, Orchestrator, SagaAdmin
from accord.transports import from_url
from tournament.config import StackConfig
from tournament.contracts import (
    ACTIVE,
    CANCELLED,
    MATCH_RECORDED,
    PENDING,
    Choreo,
    CreateTournament,
    RecordMatch,
)
from tournament.http import MAX_WAIT, Guard, Unprocessable, install_error_handlers
from tournament.match_engine.flow import (
    choreography,
    create_tournament_saga,
    human_reason,
    insert_pending,
)
from tournament.match_engine.tables import idempotency_keys, matches, tournaments

__all__ = ["create_app"]

SOURCE = "match-engine"

log = logging.getLogger("tournament.match_engine")

#: The namespace of the tournament and saga ids derived from an ``Idempotency-Key``.
KEY_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:accord:tournament:idempotency-key")


def _fingerprint(body: CreateTournament) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


async def _claim_key(
    conn: AsyncConnection, row: dict[str, Any], *, postgres: bool
) -> dict[str, Any] | None:
    """Record the key's row, or return the row recorded for it before (the insert waits
    for a concurrent transaction that holds the same key, then finds its row)."""
    if postgres:
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    done = await conn.execute(insert(idempotency_keys).values(row).on_conflict_do_nothing())
    if done.rowcount == 1:
        return None
    found = (
        await conn.execute(sa.select(idempotency_keys).where(idempotency_keys.c.key == row["key"]))
    ).first()
    assert found is not None  # keys are never deleted
    return dict(found._mapping)


class _Settled:
    """Wakes the requests waiting for PENDING tournaments to be settled (ACTIVE or
    CANCELLED): while any request waits, one query every ``interval`` seconds looks
    at all their tournaments at once, whatever the number of waiters."""

    def __init__(self, database: Database, interval: float = 0.01) -> None:
        self.database = database
        self.interval = interval
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}
        self._poller: asyncio.Task[None] | None = None

    async def wait(self, tournament_id: str, timeout: float) -> None:
        """Return once the tournament left PENDING, or after ``timeout`` seconds."""
        settled = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(tournament_id, []).append(settled)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll())
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await settled
        finally:
            waiters = self._waiting.get(tournament_id, [])
            if settled in waiters:
                waiters.remove(settled)
                if not waiters:
                    del self._waiting[tournament_id]

    async def _poll(self) -> None:
        query = sa.select(tournaments.c.id).where(
            one_of(tournaments.c.id, "ids", self.database.dialect),
            tournaments.c.status != PENDING,
        )
        failing = False
        while self._waiting:
            await asyncio.sleep(self.interval * (50 if failing else 1))
            try:
                async with self.database.read() as conn:
                    result = await conn.execute(query, {"ids": list(self._waiting)})
                    settled = result.scalars().all()
            except Exception:  # the waiters time out; try again a little later
                if not failing:
                    log.warning("could not read tournament statuses", exc_info=True)
                failing = True
                continue
            failing = False
            for tournament_id in settled:
                for waiter in self._waiting.pop(tournament_id, []):
                    if not waiter.done():
                        waiter.set_result(None)

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller


def _not_found(what: str, ident: str) -> HTTPException:
    return HTTPException(404, f"no {what} with id {ident!r}")


def create_app(config: StackConfig) -> FastAPI:
    """The Match Engine app on ``config.match_db``; POSTs need ``config.api_token``."""
    config = config.resolved()
    assert config.match_db is not None and config.broker is not None
    database = Database(config.match_db)
    saga = create_tournament_saga()
    # The API only *starts* sagas (in its own transaction); the orchestrator process
    # consumes the replies, so this transport is never connected here.
    orchestrator = Orchestrator(database, from_url(config.broker, channel=config.channel), [saga])
    flow = choreography()
    admin = SagaAdmin(database)
    settled = _Settled(database)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await settled.close()
        await database.dispose()

    app = FastAPI(
        title="Match Engine",
        description="Tournaments and match records (the Accord reference system).",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(Guard, token=config.api_token, routes=app.router.routes)

    async def load(tournament_id: str) -> dict[str, Any]:
        async with database.read() as conn:
            row = (
                await conn.execute(sa.select(tournaments).where(tournaments.c.id == tournament_id))
            ).first()
        if row is None:
            raise _not_found("tournament", tournament_id)
        return dict(row._mapping)

    async def view(row: dict[str, Any]) -> dict[str, Any]:
        reason = row["reason"]
        if row["status"] == CANCELLED and reason is None:
            try:
                reason = human_reason((await admin.get(row["saga_id"])).error)
            except NotFoundError:
                reason = "cancelled"
        return {
            "id": row["id"],
            "name": row["name"],
            "participants": row["participants"],
            "status": row["status"],
            "reason": reason,
            "saga_id": row["saga_id"],
            "saga_style": row["saga_style"],
            "created_at": row["created_at"].isoformat(),
            "updated_at": row["updated_at"].isoformat(),
        }

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the process answers and its database is reachable."""
        async with database.read() as conn:
            await conn.execute(sa.text("SELECT 1"))
        return {
            "status": "ok",
            "service": SOURCE,
            "saga_style": config.saga_style,
            "instance": config.instance,
        }

    @app.post("/tournaments", status_code=202)
    async def create_tournament(
        body: CreateTournament,
        response: Response,
        idempotency_key: Annotated[
            str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)
        ] = None,
    ) -> dict[str, Any]:
        """Start the "create tournament" saga; the tournament is PENDING until it ends.
        With an ``Idempotency-Key`` header, a retry with the same key and body gets the
        first answer again (202, the same ids, header ``Idempotent-Replayed: true``) and
        starts nothing; the same key with another body is refused (422)."""
        if idempotency_key is None:
            tournament_id, saga_id = str(uuid.uuid4()), str(uuid.uuid4())
        else:
            tournament_id = str(uuid.uuid5(KEY_NAMESPACE, f"tournament/{idempotency_key}"))
            saga_id = str(uuid.uuid5(KEY_NAMESPACE, f"saga/{idempotency_key}"))
        answer = {"id": tournament_id, "status": "PENDING", "saga_id": saga_id}
        data = {
            "tournament_id": tournament_id,
            "name": body.name,
            "participants": body.participants,
        }
        async with outbox_transaction(database) as conn:
            if idempotency_key is not None:
                fingerprint = _fingerprint(body)
                first = await _claim_key(
                    conn,
                    {
                        "key": idempotency_key,
                        "fingerprint": fingerprint,
                        "tournament_id": tournament_id,
                        "saga_id": saga_id,
                        "created_at": datetime.now(UTC),
                    },
                    postgres=database.is_postgres,
                )
                if first is not None:
                    if first["fingerprint"] != fingerprint:
                        raise Unprocessable(
                            f"Idempotency-Key {idempotency_key!r} was already used with a "
                            f"different body (for tournament {first['tournament_id']}): use a "
                            "new key for a new request"
                        )
                    response.headers["Idempotent-Replayed"] = "true"
                    return answer
            if config.saga_style == "orchestration":
                await orchestrator.start(saga, data, saga_id=saga_id, conn=conn)
            else:
                await insert_pending(conn, data, saga_id, "choreography")
                await flow.start(
                    conn, Choreo.REQUESTED, data, correlation_id=saga_id, source=SOURCE
                )
        return answer

    @app.get("/tournaments/{tournament_id}")
    async def get_tournament(
        tournament_id: str,
        wait: Annotated[float, Query(ge=0, le=MAX_WAIT)] = 0.0,
    ) -> dict[str, Any]:
        """The tournament: PENDING, ACTIVE, or CANCELLED with a reason. With ``wait``
        (seconds, long polling), a PENDING tournament is answered as soon as its saga
        settles it, or still PENDING once ``wait`` runs out: no need to poll."""
        row = await load(tournament_id)
        if wait > 0 and row["status"] == PENDING:
            await settled.wait(tournament_id, wait)
            row = await load(tournament_id)
        return await view(row)

    @app.post("/tournaments/{tournament_id}/matches", status_code=202)
    async def record_match(tournament_id: str, body: RecordMatch) -> dict[str, Any]:
        """Record a match of an ACTIVE tournament; its ``match.recorded`` event commits
        with it (outbox) and reaches the Score Engine."""
        match_id = str(uuid.uuid4())
        now = datetime.now(UTC)
        async with outbox_transaction(database) as conn:
            row = (
                await conn.execute(
                    sa.select(tournaments.c.status, tournaments.c.participants).where(
                        tournaments.c.id == tournament_id
                    )
                )
            ).first()
            if row is None:
                raise _not_found("tournament", tournament_id)
            if row.status != ACTIVE:
                raise HTTPException(
                    409,
                    f"tournament {tournament_id} is {row.status}: matches are accepted only "
                    "once it is ACTIVE",
                )
            strangers = [
                f"{side}: {player!r} is not a participant of tournament {tournament_id}"
                for side, player in (("home", body.home), ("away", body.away))
                if player not in set(row.participants)
            ]
            if strangers:
                raise Unprocessable(*strangers)
            values = {
                "id": match_id,
                "tournament_id": tournament_id,
                "home": body.home,
                "away": body.away,
                "winner": body.winner,
                "played_at": now,
            }
            await conn.execute(matches.insert().values(**values))
            await add_to_outbox(
                conn,
                Message(
                    type=MATCH_RECORDED,
                    data={**values, "match_id": match_id, "played_at": now.isoformat()},
                    source=SOURCE,
                    subject=match_id,
                    # Per-tournament order: the ledgers see a tournament's matches in order.
                    key=tournament_id,
                ),
            )
        return {"id": match_id}

    @app.get("/tournaments/{tournament_id}/matches")
    async def list_matches(tournament_id: str) -> dict[str, Any]:
        """The matches recorded for the tournament, oldest first."""
        await load(tournament_id)
        async with database.read() as conn:
            rows = (
                await conn.execute(
                    sa.select(matches)
                    .where(matches.c.tournament_id == tournament_id)
                    .order_by(matches.c.played_at)
                )
            ).all()
        return {
            "tournament_id": tournament_id,
            "matches": [{**dict(r._mapping), "played_at": r.played_at.isoformat()} for r in rows],
        }

    @app.get("/sagas/{saga_id}")
    async def get_saga(saga_id: str) -> dict[str, Any]:
        """The saga's state and step timeline (orchestrated), or the flow's events in
        order (choreographed)."""
        try:
            state = await admin.get(saga_id)
        except NotFoundError:
            state = None
        if state is not None:
            history = await admin.history(saga_id)
            return {
                "id": saga_id,
                "style": "orchestration",
                "name": state.name,
                "status": state.status,
                "error": state.error,
                "data": state.data,
                "created_at": state.created_at.isoformat(),
                "ended_at": state.ended_at.isoformat() if state.ended_at else None,
                "steps": [entry.as_dict() for entry in history],
            }
        timeline = await Flows(database).timeline(saga_id)
        async with database.read() as conn:
            row = (
                await conn.execute(
                    sa.select(tournaments.c.status, tournaments.c.reason).where(
                        tournaments.c.saga_id == saga_id
                    )
                )
            ).first()
        if row is None and not timeline:
            raise _not_found("saga", saga_id)
        # The tournament's record says how the flow ended (the tracker may lag behind).
        ends = {ACTIVE: "COMPLETED", CANCELLED: "COMPENSATED"}
        status = ends.get(row.status, "RUNNING") if row is not None else "RUNNING"
        return {
            "id": saga_id,
            "style": "choreography",
            "name": "create-tournament",
            "status": status,
            "error": row.reason if row is not None else None,
            "steps": [entry.as_dict() for entry in timeline],
        }

    return app
