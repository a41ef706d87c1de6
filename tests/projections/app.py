"""The projections the tests run (also loaded by the CLI with ``--app`` and by subprocesses).

``scores``: per-player totals plus a log row per applied event (a second apply of
the same event shows as a duplicate position in the log). Event types:
``score.changed`` {player, points} and ``score.poison`` (fails while ``POISON`` is
True). Side effects (outside the database) are counted in ``SIDE_EFFECTS`` unless
replaying. ``ACCORD_TEST_KILL_AT=n`` SIGKILLs the process inside the n-th handler
call, i.e. in the middle of a batch.
"""

from __future__ import annotations

import os
import signal

import sqlalchemy as sa

from accord.eventstore import RecordedEvent
from accord.projections import OnPoison, Projection, ProjectionContext

POISON = {"on": True}
SIDE_EFFECTS: list[int] = []
_calls = {"n": 0}


def make_scores(
    name: str = "scores", *, batch_size: int = 50, on_poison: OnPoison = "park"
) -> Projection:
    """A fresh ``scores`` projection definition."""
    p = Projection(name, batch_size=batch_size, on_poison=on_poison, max_retries=2, retry_base=0.01)
    p.table(
        "totals",
        sa.Column("player", sa.String(50), primary_key=True),
        sa.Column("points", sa.Integer, nullable=False),
        sa.Column("games", sa.Integer, nullable=False),
    )
    p.table(
        "log",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("position", sa.BigInteger, nullable=False, index=True),
        sa.Index("ix_log_both", "id", "position"),
    )
    kill_at = int(os.environ.get("ACCORD_TEST_KILL_AT", "0"))

    @p.on("score.changed")
    def changed(ctx: ProjectionContext, event: RecordedEvent) -> None:
        _calls["n"] += 1
        if kill_at and _calls["n"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        ctx.upsert(
            "totals",
            {"player": event.data["player"], "points": event.data["points"], "games": 1},
            key=["player"],
            add=["points", "games"],
        )
        ctx.insert("log", {"position": event.position})
        if not ctx.replaying:
            SIDE_EFFECTS.append(event.position)

    @p.on("score.poison")
    async def poison(ctx: ProjectionContext, event: RecordedEvent) -> None:
        if POISON["on"]:
            raise ValueError(f"cannot score {event.data!r}")
        await ctx.execute(ctx.table("log").insert().values(position=event.position))

    return p


def projections() -> list[Projection]:
    """What ``accord projections ... --app tests.projections.app:projections`` loads."""
    return [make_scores()]
