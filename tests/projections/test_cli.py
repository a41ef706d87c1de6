"""``accord projections status / rebuild / parked list / parked replay`` on a real database."""

from __future__ import annotations

import asyncio
import json

from click.testing import Result
from typer.testing import CliRunner

from accord.cli.app import _register_subcommands, app
from accord.db import Database
from accord.eventstore import EventStore, NewEvent
from accord.projections import ProjectionRunner
from tests.projections import app as defs
from tests.projections.helpers import append_scores, expected_totals, read_model, visible

_register_subcommands()
APP = "tests.projections.app:projections"


async def invoke(args: list[str]) -> Result:
    # Each command runs its own event loop: give it a thread.
    return await asyncio.to_thread(CliRunner().invoke, app, args)


async def test_status_rebuild_and_parked(db_url: str) -> None:
    async with Database(db_url) as database:
        store = EventStore(database)
        defs.POISON["on"] = True
        await append_scores(store, 30)
        bad = await store.append("bad", [NewEvent("score.poison", {"player": "z"})])
        scores = defs.make_scores()
        runner = ProjectionRunner(database, [scores], store=store)
        while await runner.run_once():
            pass
        last = await append_scores(store, 10, start=30)
        await visible(store, last)

        out = await invoke(["projections", "status", "--db", db_url, "--app", APP, "--json"])
        assert out.exit_code == 0, out.output
        [status] = json.loads(out.output)
        assert status["name"] == "scores" and status["events_behind"] == 10
        assert status["parked"] == 1 and status["live_version"] == 1
        out = await invoke(["projections", "status", "--db", db_url])
        assert out.exit_code == 0 and "scores" in out.output

        out = await invoke(["projections", "parked", "list", "--db", db_url, "--json"])
        [parked] = json.loads(out.output)
        assert parked["position"] == bad.position and "cannot score" in parked["error"]
        args = ["projections", "parked", "replay", "scores", "--db", db_url, "--app", APP]
        out = await invoke(args)
        assert out.exit_code == 1 and "failed again" in out.output
        defs.POISON["on"] = False
        try:
            out = await invoke([*args, "--id", str(parked["id"]), "--json"])
        finally:
            defs.POISON["on"] = True
        assert out.exit_code == 0, out.output
        assert json.loads(out.output)[0]["ok"] is True

        # Rebuild (nothing runs live here: it replays what v1 has seen). The poison
        # event is parked again, so v2 would lack it: not swapped in, exit 1.
        rebuild_args = ["projections", "rebuild", "scores", "--db", db_url, "--app", APP]
        out = await invoke(rebuild_args)
        assert out.exit_code == 1, out.output
        said = " ".join(out.output.split())
        assert (
            "parked 1 event(s)" in said
            and "v2 lacks their data and was not swapped in (v1 stays live)" in said
        )
        out = await invoke(["projections", "status", "--db", db_url, "--app", APP, "--json"])
        assert json.loads(out.output)[0]["live_version"] == 1
        # Allowed: swapped in, and the parked count said.
        out = await invoke([*rebuild_args, "--allow-parked", "--json"])
        assert out.exit_code == 0, out.output
        assert {k: v for k, v in json.loads(out.output).items() if k != "seconds"} == {
            "projection": "scores",
            "version": 3,
            "previous": 1,
            "events": 31,  # up to the live checkpoint
            "parked": 1,
        }
        while await runner.run_once():
            pass
        model = await read_model(database, scores)
        assert model["totals"] == expected_totals(40)
        out = await invoke(["projections", "status", "--db", db_url, "--app", APP, "--json"])
        [status] = json.loads(out.output)
        assert (status["live_version"], status["events_behind"], status["parked"]) == (3, 0, 1)
        out = await invoke([*rebuild_args, "--allow-parked"])
        assert out.exit_code == 0, out.output
        said = " ".join(out.output.split())
        assert "v4 of scores is live" in said and "1 event(s) parked" in said
        for size in ("0", "-5"):
            out = await invoke([*rebuild_args, "--batch-size", size])
            assert out.exit_code == 2 and "--batch-size" in out.output, out.output

        out = await invoke(["projections", "rebuild", "nope", "--db", db_url, "--app", APP])
        assert out.exit_code == 1 and "no projection 'nope'" in out.output
        out = await invoke(["projections", "rebuild", "scores", "--db", db_url])
        assert out.exit_code == 1 and "--app" in out.output
        await store.close()


async def test_status_help_says_lag_needs_the_definitions() -> None:
    out = await invoke(["projections", "status", "--help"])
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.replace("\u2502", " ").split())  # Rich's box borders
    assert "Give --app for a true lag" in text and "counts every event" in text
