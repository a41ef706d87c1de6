"""What the two engines say to the world and to each other.

* HTTP request bodies (pydantic models, strict: unknown fields are refused).
* Message types on the broker and the schemas of their data. The Match Engine
  and the Score Engine share nothing else: no table, no import of each other.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "ACTIVE",
    "CANCELLED",
    "DRAW_POINTS",
    "FLOW",
    "LOSS_POINTS",
    "MATCH_RECORDED",
    "MAX_BODY_BYTES",
    "PARTICIPANT_PATTERN",
    "PENDING",
    "SCORES_INITIALISE",
    "SCORES_REVOKE",
    "WIN_POINTS",
    "BanRequest",
    "Choreo",
    "CreateTournament",
    "InitialiseScores",
    "MatchRecorded",
    "RecordMatch",
]

#: Tournament statuses (the Match Engine's record).
PENDING, ACTIVE, CANCELLED = "PENDING", "ACTIVE", "CANCELLED"

#: Points per result.
WIN_POINTS, DRAW_POINTS, LOSS_POINTS = 3, 1, 0

#: Request bodies larger than this are refused with 413.
MAX_BODY_BYTES = 1024 * 1024

PARTICIPANT_PATTERN = r"[A-Za-z0-9_.-]{1,64}"
_PARTICIPANT = re.compile(PARTICIPANT_PATTERN)

#: Event a recorded match publishes (Match Engine outbox -> Score Engine inbox).
MATCH_RECORDED = "match.recorded"
#: Orchestrated saga commands the Score Engine takes part in.
SCORES_INITIALISE = "scores.initialise"
SCORES_REVOKE = "scores.revoke"
#: Name of the "create tournament" flow (saga definition and choreography).
FLOW = "create-tournament"


class Choreo:
    """Event types of the choreographed "create tournament" flow."""

    REQUESTED = "tournament.requested"  # Match Engine: record PENDING, ask for scores
    SCORES_INITIALISED = "scores.initialised"  # Score Engine: every ledger opened
    SCORES_REFUSED = "scores.refused"  # Score Engine: refused (a ban); nothing written
    ACTIVATION_FAILED = "tournament.activation_failed"  # Match Engine could not activate
    SCORES_REVOKED = "scores.revoked"  # Score Engine: ledgers revoked after a failure
    ACTIVATED = "tournament.activated"  # end: ACTIVE with every ledger
    CANCELLED = "tournament.cancelled"  # end: CANCELLED, no ledger left


def _check_participant(value: str, what: str) -> str:
    if not _PARTICIPANT.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} is not a valid participant id: use 1 to 64 characters "
            "among letters, digits, '_', '.' and '-'"
        )
    if set(value) == {"."}:
        # HTTP clients drop "." and ".." from a URL path: /bans/.. would be /.
        raise ValueError(f"{what} {value!r} is not a valid participant id: not only dots")
    return value


# Characters that reorder the text around them when it is displayed (the "Trojan
# Source" trick): a name holding one shows something other than what it is.
_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f"  # Arabic letter mark, left-to-right and right-to-left marks
    "\u202a\u202b\u202c\u202d\u202e"  # embeddings, pop, overrides
    "\u2066\u2067\u2068\u2069"  # isolates
)


def _check_display_text(value: str) -> str:
    """``value`` if it shows as itself: no control character (ANSI escapes, NUL, line
    breaks, tabs), no bidirectional override, and at least one visible character
    (pydantic already refuses a lone surrogate). Refused rather than cleaned: what is
    stored is what the caller sent."""
    for index, char in enumerate(value):
        category = unicodedata.category(char)
        if category in ("Cc", "Zl", "Zp"):
            raise ValueError(
                f"must not contain control characters or line breaks: U+{ord(char):04X} "
                f"at position {index}"
            )
        if char in _BIDI_CONTROLS:
            raise ValueError(
                f"must not contain bidirectional formatting characters: U+{ord(char):04X} "
                f"({unicodedata.name(char, 'bidi control').lower()}) at position {index}"
            )
    if all(char.isspace() or unicodedata.category(char) in ("Zs", "Cf") for char in value):
        raise ValueError("must contain a visible character, not only whitespace")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class CreateTournament(_Strict):
    """``POST /tournaments``: a name and 2 to 1,024 distinct participant ids."""

    name: Annotated[str, Field(min_length=1, max_length=200)]
    participants: Annotated[list[str], Field(min_length=2, max_length=1024)]

    @field_validator("name")
    @classmethod
    def _displayable_name(cls, value: str) -> str:
        return _check_display_text(value)

    @field_validator("participants")
    @classmethod
    def _valid_and_unique(cls, value: list[str]) -> list[str]:
        seen: set[str] = set()
        for participant in value:
            _check_participant(participant, "participant")
            if participant in seen:
                raise ValueError(f"participants must be unique; {participant!r} appears twice")
            seen.add(participant)
        return value


class RecordMatch(_Strict):
    """``POST /tournaments/{id}/matches``: two different players; ``winner`` null is a draw."""

    home: str
    away: str
    winner: str | None

    @field_validator("home", "away")
    @classmethod
    def _valid_player(cls, value: str) -> str:
        return _check_participant(value, "player")

    @model_validator(mode="after")
    def _consistent(self) -> RecordMatch:
        if self.home == self.away:
            raise ValueError(f"a player cannot play itself: home and away are both {self.home!r}")
        if self.winner is not None and self.winner not in (self.home, self.away):
            raise ValueError(
                f"winner {self.winner!r} is neither player: use {self.home!r}, "
                f"{self.away!r}, or null for a draw"
            )
        return self


class BanRequest(_Strict):
    """``POST /bans``: ban one participant from being given scores."""

    participant: str

    @field_validator("participant")
    @classmethod
    def _valid(cls, value: str) -> str:
        return _check_participant(value, "participant")


class MatchRecorded(BaseModel):
    """Data of ``match.recorded``: one played match of an ACTIVE tournament."""

    model_config = ConfigDict(extra="ignore")

    match_id: str
    tournament_id: str
    home: str
    away: str
    winner: str | None
    played_at: str

    def points(self) -> dict[str, tuple[int, str]]:
        """Points and result ("win"/"loss"/"draw") per player."""
        if self.winner is None:
            return {self.home: (DRAW_POINTS, "draw"), self.away: (DRAW_POINTS, "draw")}
        loser = self.away if self.winner == self.home else self.home
        return {self.winner: (WIN_POINTS, "win"), loser: (LOSS_POINTS, "loss")}


class InitialiseScores(BaseModel):
    """Data of the score commands / events: which tournament, which participants."""

    model_config = ConfigDict(extra="ignore")

    tournament_id: str
    participants: list[str]
    name: str = ""


def jsonable(model: BaseModel) -> dict[str, Any]:
    """A model as a JSON-ready dict."""
    return model.model_dump(mode="json")
