"""A small score-ledger aggregate used by the tests (and its upcasters)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from accord.eventstore import Aggregate, Upcasters, applies


class PlayerRegistered(BaseModel):
    player: str


class ScoreChanged(BaseModel):
    __schema_version__ = 3
    player: str
    points: int
    reason: str


@dataclass
class Closed:
    by: str


def ledger_upcasters() -> Upcasters:
    up = Upcasters()

    @up.register("ScoreChanged", 1)
    def add_reason(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "reason": "unknown"}

    @up.register("ScoreChanged", 2)
    def delta_to_points(data: dict[str, Any]) -> dict[str, Any]:
        data = dict(data)
        data["points"] = data.pop("delta")
        return data

    return up


class Ledger(Aggregate):
    snapshot_every = 5

    def __init__(self, id: str) -> None:
        super().__init__(id)
        self.scores: dict[str, int] = {}
        self.closed = False

    def register(self, player: str) -> None:
        if player in self.scores:
            raise ValueError(f"{player} is already registered")
        self.record(PlayerRegistered(player=player))

    def score(self, player: str, points: int, reason: str = "play") -> None:
        if self.closed:
            raise ValueError("ledger closed")
        self.record(ScoreChanged(player=player, points=points, reason=reason))

    @applies(PlayerRegistered)
    def _registered(self, event: PlayerRegistered) -> None:
        self.scores[event.player] = 0

    @applies(ScoreChanged)
    def _scored(self, event: ScoreChanged) -> None:
        self.scores[event.player] += event.points

    @applies(Closed)
    def _closed(self, event: Closed) -> None:
        self.closed = True
