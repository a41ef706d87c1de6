"""``accord demo``: start the whole system and tell its story, checking every step.

Every step prints what happens and checks what should be true; the scenario
passes only if every check does. The steps talk to the engines over HTTP like
any client, except the operator's dead-letter replay, which uses the same
library call as ``accord inbox dead replay``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from accord.db import Database
from accord.inbox import DEAD, DeadLetters
from tournament.config import StackConfig
from tournament.stack import SCORE_CONSUMER, prepare
from tournament.supervisor import Supervisor

__all__ = ["Scenario", "run_demo"]

TIMEOUT = 20.0


class StepFailedCheck(Exception):
    """A check of the scenario did not hold."""


@dataclass
class Scenario:
    """The narrated scenario against a running stack."""

    config: StackConfig
    token: str
    console: Console
    client: httpx.AsyncClient = field(init=False)
    results: list[tuple[str, bool, str]] = field(default_factory=list)

    # -- plumbing ---------------------------------------------------------------

    async def post(self, url: str, body: dict[str, Any]) -> httpx.Response:
        return await self.client.post(
            url, json=body, headers={"Authorization": f"Bearer {self.token}"}
        )

    async def get_json(self, url: str, **params: Any) -> Any:
        response = await self.client.get(url, params=params)
        response.raise_for_status()
        return response.json()

    async def until(self, what: str, probe: Callable[[], Awaitable[Any]]) -> Any:
        """Poll ``probe`` until it returns something truthy (or fail after TIMEOUT)."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            value = await probe()
            if value:
                return value
            if time.monotonic() > deadline:
                raise StepFailedCheck(f"{what}: not within {TIMEOUT:.0f}s")
            await asyncio.sleep(0.1)

    def check(self, condition: bool, claim: str) -> None:
        self.console.print(f"  {'[green]✔' if condition else '[red]✘'}[/] {claim}")
        if not condition:
            raise StepFailedCheck(claim)

    async def step(self, title: str, body: Callable[[], Awaitable[None]]) -> None:
        self.console.rule(f"[bold]{title}")
        started = time.monotonic()
        try:
            await body()
        except (StepFailedCheck, httpx.HTTPError) as exc:
            self.results.append((title, False, str(exc)))
            self.console.print(f"  [red]step failed:[/] {exc}")
            return
        except KeyError as exc:  # what an earlier, failed step should have made
            self.results.append((title, False, f"skipped: needs {exc} from an earlier step"))
            self.console.print("  [red]skipped:[/] an earlier step failed")
            return
        self.results.append((title, True, f"{time.monotonic() - started:.1f}s"))

    # -- helpers of the story ------------------------------------------------------

    async def create(self, name: str, participants: list[str]) -> dict[str, Any]:
        response = await self.post(
            f"{self.config.match_url}/tournaments", {"name": name, "participants": participants}
        )
        self.check(response.status_code == 202, f"POST /tournaments {name!r} → 202 PENDING")
        created: dict[str, Any] = response.json()

        async def ended() -> Any:
            url = f"{self.config.match_url}/tournaments/{created['id']}"
            t = await self.get_json(url, wait=5)  # long polling: answered once it settles
            return t if t["status"] != "PENDING" else None

        return dict(await self.until(f"tournament {name!r} leaves PENDING", ended))

    async def saga_timeline(self, saga_id: str) -> None:
        saga = await self.get_json(f"{self.config.match_url}/sagas/{saga_id}")
        table = Table(title=f"saga {saga_id[:8]}… ({saga['style']}): {saga['status']}")
        for column in ("step", "phase", "event", "detail"):
            table.add_column(column)
        for entry in saga["steps"]:
            if saga["style"] == "orchestration":
                row = (entry["step_name"], entry["phase"], entry["event"], entry["detail"] or "")
            else:
                row = (
                    entry["step"] or "",
                    entry["outcome"] or "",
                    entry["type"],
                    entry["error"] or "",
                )
            table.add_row(*row)
        self.console.print(table)

    async def play(self, tournament_id: str, home: str, away: str, winner: str | None) -> str:
        response = await self.post(
            f"{self.config.match_url}/tournaments/{tournament_id}/matches",
            {"home": home, "away": away, "winner": winner},
        )
        self.check(response.status_code == 202, f"{home} v {away} ({winner or 'draw'}) recorded")
        return str(response.json()["id"])

    async def leaderboard(self, tournament_id: str, **params: Any) -> dict[str, Any]:
        """The leaderboard, printed; with ``match_id`` once that match counts in it
        (read-your-writes: the Score Engine waits for it, up to ``wait`` seconds)."""
        url = f"{self.config.score_url}/tournaments/{tournament_id}/leaderboard"
        if "match_id" in params:
            params = {"wait": TIMEOUT, **params}
        board: dict[str, Any] = await self.get_json(url, **params)
        title = "leaderboard" + (f" as of {params['as_of']}" if "as_of" in params else "")
        table = Table(title=title)
        for column in ("rank", "participant", "points", "played"):
            table.add_column(column, justify="right" if column != "participant" else "left")
        for e in board["entries"]:
            table.add_row(str(e["rank"]), e["participant"], str(e["points"]), str(e["played"]))
        self.console.print(table)
        return board

    @staticmethod
    def points(board: dict[str, Any]) -> dict[str, int]:
        return {e["participant"]: e["points"] for e in board["entries"]}

    # -- the story ------------------------------------------------------------------

    async def run(self) -> bool:
        async with httpx.AsyncClient(timeout=30.0) as self.client:
            state: dict[str, Any] = {}
            # A run stopped in the poison step left dave banned; every run starts clean
            # (404 when he is not banned).
            await self.client.delete(
                f"{self.config.score_url}/bans/dave",
                headers={"Authorization": f"Bearer {self.token}"},
            )

            async def activation() -> None:
                self.console.print(
                    "The Match Engine records the tournament PENDING and, in a saga, asks the "
                    "Score Engine to open a ledger for every participant; then activates it."
                )
                t = await self.create("Spring Cup", ["alice", "bob", "carol", "dave"])
                self.check(t["status"] == "ACTIVE", "the tournament is ACTIVE")
                await self.saga_timeline(t["saga_id"])
                board = await self.get_json(
                    f"{self.config.score_url}/tournaments/{t['id']}/participants/dave/ledger"
                )
                self.check(board["events"][0]["type"] == "ScoresInitialized", "dave has a ledger")
                state["cup"] = t["id"]

            async def compensation() -> None:
                self.console.print("mallory is banned; a tournament with mallory must not start.")
                response = await self.post(
                    f"{self.config.score_url}/bans", {"participant": "mallory"}
                )
                self.check(response.status_code == 201, "POST /bans mallory → 201")
                t = await self.create("Shady Open", ["alice", "mallory"])
                self.check(t["status"] == "CANCELLED", "the tournament is CANCELLED")
                self.console.print(f"  reason: [italic]{t['reason']}[/]")
                self.check("mallory" in (t["reason"] or ""), "the reason names the ban")
                await self.saga_timeline(t["saga_id"])
                url = f"{self.config.score_url}/tournaments/{t['id']}/leaderboard"
                gone = (await self.client.get(url)).status_code == 404
                self.check(gone, "the Score Engine kept no ledger of it (leaderboard → 404)")
                blocked = await self.post(
                    f"{self.config.match_url}/tournaments/{t['id']}/matches",
                    {"home": "alice", "away": "mallory", "winner": None},
                )
                self.check(blocked.status_code == 409, "matches are refused (409)")

            async def matches() -> None:
                cup = state["cup"]
                self.console.print(
                    "Each match commits with its match.recorded event (outbox); "
                    "the Score Engine's inbox applies it once to the ledgers."
                )
                await self.play(cup, "alice", "bob", "alice")
                m2 = await self.play(cup, "carol", "dave", None)
                # A tournament's matches are applied in order: m2 counts, so does m1.
                await self.leaderboard(cup, match_id=m2)
                await asyncio.sleep(0.05)
                state["round1"] = datetime.now(UTC).isoformat()
                await asyncio.sleep(0.05)
                await self.play(cup, "alice", "carol", None)
                m4 = await self.play(cup, "bob", "dave", "bob")
                board = await self.leaderboard(cup, match_id=m4)
                expected = {"alice": 4, "bob": 3, "carol": 2, "dave": 1}
                self.check(
                    self.points(board) == expected,
                    f"read-your-writes (?match_id= of the last match): points are {expected}",
                )

            async def time_travel() -> None:
                cup = state["cup"]
                self.console.print(
                    "The ledger keeps every event: the leaderboard as it stood "
                    "after the first round, computed from the events."
                )
                board = await self.leaderboard(cup, as_of=state["round1"])
                expected = {"alice": 3, "bob": 0, "carol": 1, "dave": 1}
                self.check(
                    self.points(board) == expected, f"after round 1 the points were {expected}"
                )

            async def poison() -> None:
                cup = state["cup"]
                self.console.print(
                    "dave is banned mid-tournament; his next match cannot be "
                    "scored: the Score Engine retries it, then dead-letters it."
                )
                await self.post(f"{self.config.score_url}/bans", {"participant": "dave"})
                match_id = await self.play(cup, "dave", "alice", "dave")
                letter = await self.until("the dead letter", lambda: self.dead_letter(match_id))
                self.console.print(
                    Panel(
                        letter.summary,
                        title=f"dead letter #{letter.id}",
                        subtitle=f"{letter.attempts} attempts",
                    )
                )
                self.check(letter.status == DEAD, "the match.recorded message is dead-lettered")
                lifted = await self.client.delete(
                    f"{self.config.score_url}/bans/dave",
                    headers={"Authorization": f"Bearer {self.token}"},
                )
                self.check(lifted.status_code == 204, "the ban is lifted (DELETE /bans/dave)")
                self.console.print(
                    f"  operator: accord inbox dead replay {letter.id} --db {self.config.score_db}"
                )
                async with Database(str(self.config.score_db)) as db:
                    await DeadLetters(db).replay(letter.id)
                board = await self.leaderboard(cup, match_id=match_id)
                self.check(self.points(board)["dave"] == 4, "replayed: dave's win counts, once")

            for title, body in (
                ("1. A tournament is created and activated (saga)", activation),
                ("2. A banned player: the saga compensates", compensation),
                ("3. Matches and the leaderboard (outbox → inbox → projection)", matches),
                ("4. Time travel: the leaderboard as of an earlier time", time_travel),
                ("5. A poison message: dead-lettered, then replayed", poison),
            ):
                await self.step(title, body)
        return self.report()

    async def dead_letter(self, match_id: str) -> Any:
        async with Database(str(self.config.score_db)) as db:
            for letter in await DeadLetters(db).list(SCORE_CONSUMER, status=DEAD, limit=1000):
                try:
                    if json.loads(letter.body).get("match_id") == match_id:
                        return letter
                except ValueError:
                    continue
        return None

    def report(self) -> bool:
        table = Table(title="scenario")
        table.add_column("step")
        table.add_column("result")
        for title, ok, detail in self.results:
            table.add_row(title, f"[green]ok[/] {detail}" if ok else f"[red]FAILED[/] {detail}")
        self.console.print(table)
        return all(ok for _, ok, _ in self.results) and len(self.results) == 5


async def run_demo(config: StackConfig, token: str, *, console: Console, once: bool) -> int:
    """Start the stack, play the scenario; with ``once`` stop and return 0 iff it passed,
    otherwise keep serving until Ctrl-C."""
    config = config.resolved()
    console.print(
        Panel.fit(
            "[bold]Accord demo[/]: a Match Engine and a Score Engine, each with its own database, "
            "kept in agreement by an outbox, an inbox, a saga, an event-sourced ledger and a "
            "projection.",
            border_style="cyan",
        )
    )
    started = time.monotonic()
    await prepare(config)
    supervisor = Supervisor(config, token, say=lambda line: console.print(f"[dim]{line}[/]"))
    await supervisor.start()
    try:
        await supervisor.wait_ready()
        console.print(
            f"{len(supervisor.children)} processes up in {time.monotonic() - started:.1f}s: "
            + ", ".join(f"{c.name} ({c.pid})" for c in supervisor.children)
            + f"; saga style: {config.saga_style}; logs in {supervisor.log_dir}"
        )
        passed = await Scenario(config, token, console).run()
        console.print(
            "[bold green]every step checked out[/]" if passed else "[bold red]some steps failed[/]"
        )
        if once:
            return 0 if passed else 1
        console.print(
            f"Serving: Match Engine {config.match_url}/docs, Score Engine {config.score_url}/docs. "
            "Ctrl-C stops everything."
        )
        await supervisor.run()
        return 0 if passed else 1
    finally:
        await supervisor.stop()
