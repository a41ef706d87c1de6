"""The Score Engine's HTTP API: bans, the leaderboard (live, read-your-writes, time
travel) and each ledger's audit trail."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import FastAPI, HTTPException, Query, Response

from accord.db import Database
from accord.eventstore import EventStore
from accord.projections import ProjectionRunner, ProjectionStopped, WaitTimeout, projection_status
from tournament.config import StackConfig
from tournament.contracts import BanRequest
from tournament.http import MAX_WAIT, Guard, Unprocessable, install_error_handlers
from tournament.score_engine.leaderboard import leaderboard, read_leaderboard
from tournament.score_engine.ledger import OPEN, fold, ranked, stream_id
from tournament.score_engine.tables import bans, ledgers, matches

__all__ = ["create_app"]


#: How long a leaderboard request waits for ``min_position`` / ``match_id`` by default.
DEFAULT_WAIT = 10.0
#: How often a request waiting for a match looks whether it was applied.
MATCH_POLL = 0.05


def _iso(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _parse_instant(text: str) -> datetime:
    """``as_of`` as an aware datetime in UTC (a naive one is taken as UTC)."""
    moment = _iso(text)
    if moment is None:
        hint = ""
        if " " in text and _iso("+".join(text.rsplit(" ", 1))) is not None:
            # A '+' left unencoded in a query string arrives as a space.
            hint = "; a '+' in a URL's query must be sent as %2B (unencoded it reads as a space)"
        raise Unprocessable(
            f"as_of: {text!r} is not an ISO-8601 date-time (e.g. 2024-05-01T12:00:00Z){hint}"
        )
    try:
        # In UTC, as it is stored; the calendar's edges can overflow it.
        return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)
    except OverflowError:
        raise Unprocessable(
            f"as_of: {text!r} is a valid date-time, but in UTC it falls outside the years "
            "1 to 9999 that can be stored (from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z)"
        ) from None


def _contradictions(
    as_of: str | None, min_position: int | None, match_id: str | None, wait: float | None
) -> list[str]:
    """The leaderboard parameters that make no sense together, each said once."""
    if as_of is not None:
        given = [
            name
            for name, value in (
                ("min_position", min_position),
                ("match_id", match_id),
                ("wait", wait),
            )
            if value is not None
        ]
        return [
            f"{name} cannot be combined with as_of: as_of computes the leaderboard from the "
            "ledgers' events as they stood then, there is nothing to wait for"
            for name in given
        ]
    if wait is not None and min_position is None and match_id is None:
        return [
            "wait applies only with min_position or match_id (it is how long to wait for "
            "them): add one, or drop wait"
        ]
    return []


def create_app(config: StackConfig) -> FastAPI:
    """The Score Engine app on ``config.score_db``; POST/DELETE need ``config.api_token``."""
    config = config.resolved()
    assert config.score_db is not None
    database = Database(config.score_db)
    store = EventStore(database)
    # Not started: used only to wait on the projector process's checkpoint.
    waiter = ProjectionRunner(database, [leaderboard], store=store)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await database.dispose()

    app = FastAPI(
        title="Score Engine",
        description="Event-sourced score ledgers and the leaderboard (Accord reference system).",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(Guard, token=config.api_token, routes=app.router.routes)

    async def participants_of(tournament_id: str) -> dict[str, str]:
        async with database.read() as conn:
            rows = await conn.execute(
                sa.select(ledgers.c.participant, ledgers.c.status)
                .where(ledgers.c.tournament_id == tournament_id)
                .order_by(ledgers.c.participant)
            )
            return {r.participant: r.status for r in rows}

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the process answers and its database is reachable."""
        async with database.read() as conn:
            await conn.execute(sa.text("SELECT 1"))
        return {"status": "ok", "service": "score-engine", "instance": config.instance}

    @app.post("/bans", status_code=201)
    async def ban(body: BanRequest) -> dict[str, Any]:
        """Ban a participant: tournaments including them cannot get scores."""
        # Insert-if-absent in one statement: concurrent bans of one participant all
        # succeed, and all answer with the first one's time.
        if database.is_postgres:
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
        now = datetime.now(UTC)
        row = {"participant": body.participant, "banned_at": now}
        async with database.transaction() as conn:
            await conn.execute(insert(bans).values(row).on_conflict_do_nothing())
            banned_at = await conn.scalar(
                sa.select(bans.c.banned_at).where(bans.c.participant == body.participant)
            )
        # None only if the ban was lifted between the two statements: then it was ours.
        when = banned_at or now
        return {"participant": body.participant, "banned_at": when.isoformat()}

    @app.delete("/bans/{participant}", status_code=204)
    async def lift_ban(participant: str) -> Response:
        """Lift a ban (404 if the participant is not banned)."""
        async with database.transaction() as conn:
            done = await conn.execute(bans.delete().where(bans.c.participant == participant))
        if done.rowcount == 0:
            raise HTTPException(404, f"participant {participant!r} is not banned")
        return Response(status_code=204)

    async def match_position(tournament_id: str, match_id: str, deadline: float) -> int:
        """The ledger position the match reached, once the Score Engine applied it."""
        query = sa.select(matches.c.tournament_id, matches.c.position).where(
            matches.c.match_id == match_id
        )
        while True:
            async with database.read() as conn:
                row = (await conn.execute(query)).first()
            if row is not None:
                if row.tournament_id != tournament_id:
                    raise Unprocessable(
                        f"match_id: match {match_id!r} is of tournament {row.tournament_id}, "
                        f"not {tournament_id}"
                    )
                return int(row.position)
            if time.monotonic() >= deadline:
                raise HTTPException(
                    504,
                    f"match {match_id!r} was not applied to the ledgers in time; retry, or "
                    "see `accord outbox status` / `accord inbox status` for where it is",
                )
            await asyncio.sleep(MATCH_POLL)

    @app.get("/tournaments/{tournament_id}/leaderboard")
    async def get_leaderboard(
        tournament_id: str,
        min_position: Annotated[int | None, Query(ge=0)] = None,
        match_id: Annotated[str | None, Query(pattern=r"^[0-9A-Za-z-]{1,36}$")] = None,
        as_of: str | None = None,
        wait: Annotated[float | None, Query(gt=0, le=MAX_WAIT)] = None,
    ) -> dict[str, Any]:
        """The ranked leaderboard from the projection. Read-your-writes: ``match_id``
        (the id ``POST /tournaments/{id}/matches`` answered) waits until that match
        counts in it; ``min_position`` until the projection applied that ledger
        position; both at most ``wait`` seconds (10 by default). ``as_of`` computes it
        from the ledgers' events as they stood then (and takes none of the others)."""
        problems = _contradictions(as_of, min_position, match_id, wait)
        if problems:
            raise Unprocessable(*problems)
        moment = _parse_instant(as_of) if as_of is not None else None
        participants = await participants_of(tournament_id)
        if not participants:
            raise HTTPException(
                404, f"the Score Engine has no ledger for tournament {tournament_id!r}"
            )
        if moment is not None:
            return await time_travel(tournament_id, list(participants), moment)
        if OPEN not in participants.values():
            raise HTTPException(
                404, f"the ledgers of tournament {tournament_id!r} were revoked (it was cancelled)"
            )
        timeout = DEFAULT_WAIT if wait is None else wait
        deadline = time.monotonic() + timeout
        target = min_position
        if match_id is not None:
            position = await match_position(tournament_id, match_id, deadline)
            target = max(position, target or 0)
        if target is not None:
            try:
                await waiter.wait_until(target, timeout=max(deadline - time.monotonic(), 0.001))
            except WaitTimeout:
                raise HTTPException(
                    504,
                    f"the leaderboard did not reach position {target} within {timeout}s; "
                    "retry, or see `accord projections status` for its lag",
                ) from None
            except ProjectionStopped as exc:
                raise HTTPException(503, f"the leaderboard projection is stopped: {exc}") from None
        async with database.read() as conn:
            entries = await read_leaderboard(conn, tournament_id)
        [status] = await projection_status(database, [leaderboard], store=store)
        return {
            "tournament_id": tournament_id,
            "entries": entries,
            "position": status.position,
            "lag": {"events": status.events_behind, "seconds": round(status.seconds_behind, 3)},
        }

    async def time_travel(
        tournament_id: str, participants: list[str], moment: datetime
    ) -> dict[str, Any]:
        standings = []
        position = 0
        for participant in participants:
            events = await store.read_stream(stream_id(tournament_id, participant), as_of=moment)
            position = max([position, *(e.position for e in events)])
            standing = fold(participant, events)
            if standing is not None and not standing.revoked:
                standings.append((participant, standing.points, standing.played))
        return {
            "tournament_id": tournament_id,
            "as_of": moment.isoformat(),
            "entries": ranked(standings),
            "position": position,
            "lag": {"events": 0, "seconds": 0.0},
        }

    @app.get("/tournaments/{tournament_id}/participants/{participant}/ledger")
    async def get_ledger(tournament_id: str, participant: str) -> dict[str, Any]:
        """The participant's ledger events in this tournament, oldest first."""
        stream = stream_id(tournament_id, participant)
        events = await store.read_stream(stream)
        if not events:
            raise HTTPException(
                404, f"no ledger for participant {participant!r} in tournament {tournament_id!r}"
            )
        standing = fold(participant, events)
        return {
            "tournament_id": tournament_id,
            "participant": participant,
            "stream_id": stream,
            "points": standing.points if standing else 0,
            "revoked": standing.revoked if standing else False,
            "events": [
                {
                    "version": e.version,
                    "position": e.position,
                    "type": e.type,
                    "data": e.data,
                    "recorded_at": e.recorded_at.isoformat(),
                }
                for e in events
            ],
        }

    return app
