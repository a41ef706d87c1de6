"""The tournament system under odd input and odd operators: NUL characters, dot-segment
ids, concurrent bans and prepares, calendar edges, form-encoded JSON, clashing ports,
bad data dirs and log levels, a removed log folder, SIGTERM while starting, a demo
interrupted mid-run, and a switch of saga style with flows in flight.

Real servers and processes only: the engines' apps in process on real PostgreSQL /
SQLite databases, and ``accord up`` / ``accord demo`` as real subprocesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from accord.db import Database
from accord.eventstore import EventStore
from accord.testing import wait_for
from tests.tournament.conftest import (
    AUTH,
    TOKEN,
    alive,
    client_for,
    create_pg_database,
    drop_pg_database,
    engines,
    free_port,
    pg_url_of,
    running,
)
from tournament.config import StackConfig
from tournament.match_engine.app import create_app as create_match_app
from tournament.match_engine.tables import tournaments
from tournament.score_engine import ledger
from tournament.score_engine.tables import bans
from tournament.stack import prepare

# -- helpers -------------------------------------------------------------------------


def accord(*args: str) -> list[str]:
    return [sys.executable, "-m", "accord", *args]


def kill_children(data_dir: Path) -> None:
    """SIGKILL what our own ``accord up`` left running (pids from its processes.json)."""
    with contextlib.suppress(FileNotFoundError, ValueError):
        for pid in json.loads((data_dir / "processes.json").read_text()).values():
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.kill(int(pid), signal.SIGKILL)


@contextlib.contextmanager
def started(args: list[str], data_dir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A subprocess whose output goes to ``DATA_DIR.out`` beside it; always stopped after."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir.parent / f"{data_dir.name}.out", "wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        kill_children(data_dir)


def listing(directory: Path) -> list[str]:
    """The names in ``directory`` (none if it does not exist)."""
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def output_of(data_dir: Path) -> str:
    return (data_dir.parent / f"{data_dir.name}.out").read_text(errors="replace")


# -- HTTP input on PostgreSQL ---------------------------------------------------------


@pytest.mark.postgres
async def test_a_nul_character_in_the_tournament_name_gets_422_on_postgres(
    pg_url: str, tmp_path: Path
) -> None:
    """``POST /tournaments`` with a name holding U+0000 (valid JSON, ``"a\\u0000b"``)
    must be refused with 422 naming the field, and write nothing. PostgreSQL cannot
    store NUL in text or JSONB, and ``CreateTournament.name`` lets it through: the
    saga start fails inside the database and the client gets a bare 500."""
    async with engines(tmp_path, match_db=pg_url) as (match, _score, _config):
        r = await match.post(
            "/tournaments",
            content=b'{"name": "a\\u0000b", "participants": ["ann", "ben"]}',
            headers={**AUTH, "content-type": "application/json"},
        )
        assert r.status_code == 422, (r.status_code, r.text)
        assert "name" in r.json()["detail"]
        # The service keeps serving good requests.
        ok = await match.post(
            "/tournaments", json={"name": "ab", "participants": ["ann", "ben"]}, headers=AUTH
        )
        assert ok.status_code == 202
    async with Database(pg_url) as db, db.connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(tournaments)) == 1


@pytest.mark.postgres
async def test_ids_with_a_nul_character_get_404_on_postgres(pg_url: str, tmp_path: Path) -> None:
    """An id no tournament / saga / ledger / ban can have (it holds ``%00``) is an
    unknown id: 404, as on SQLite. On PostgreSQL every such lookup reaches the
    database with a NUL byte, asyncpg/PostgreSQL reject the parameter, and the
    client gets a 500."""
    async with engines(tmp_path, match_db=pg_url, score_db=pg_url) as (match, score, _c):
        answers = {
            "GET match /tournaments/a%00b": await match.get("/tournaments/a%00b"),
            "GET match /tournaments/a%00b/matches": await match.get("/tournaments/a%00b/matches"),
            "GET match /sagas/a%00b": await match.get("/sagas/a%00b"),
            "POST match /tournaments/a%00b/matches": await match.post(
                "/tournaments/a%00b/matches",
                json={"home": "ann", "away": "ben", "winner": None},
                headers=AUTH,
            ),
            "GET score /tournaments/a%00b/leaderboard": await score.get(
                "/tournaments/a%00b/leaderboard"
            ),
            "GET score ledger of a%00b": await score.get(
                "/tournaments/t/participants/a%00b/ledger"
            ),
            "DELETE score /bans/a%00b": await score.delete("/bans/a%00b", headers=AUTH),
        }
    codes = {what: r.status_code for what, r in answers.items()}
    assert all(code == 404 for code in codes.values()), codes


@pytest.mark.postgres
async def test_concurrent_bans_of_one_participant_all_get_201_on_postgres(
    pg_url: str, tmp_path: Path
) -> None:
    """``POST /bans`` is idempotent (a second ban of the same participant answers 201
    with the first ``banned_at``), so concurrent bans of one participant must all get
    201 and leave one row. The endpoint reads, then inserts: on PostgreSQL two
    requests both see no row, the second INSERT violates the primary key, and the
    client gets a 500."""
    async with engines(tmp_path, score_db=pg_url) as (_match, score, _config):
        answers = await asyncio.gather(
            *(score.post("/bans", json={"participant": "zed"}, headers=AUTH) for _ in range(20))
        )
        codes = [r.status_code for r in answers]
        assert codes == [201] * 20, codes
        stamps = {r.json()["banned_at"] for r in answers}
        assert len(stamps) == 1, stamps
    async with Database(pg_url) as db, db.connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(bans)) == 1


# -- HTTP input on both backends -----------------------------------------------------


async def test_an_as_of_at_the_edge_of_the_calendar_gets_422(db_url: str, tmp_path: Path) -> None:
    """``?as_of=`` that parses as ISO-8601 but cannot be expressed in UTC
    (``0001-01-01T00:00:00+01:00``, ``9999-12-31T23:59:59-01:00``) must get 422 with
    a message about ``as_of``. ``_parse_instant`` accepts it and the conversion to UTC
    (``UTCDateTime.process_bind_param``) raises OverflowError: a 500."""
    async with engines(tmp_path, score_db=db_url) as (_match, score, config):
        assert config.score_db is not None
        async with Database(config.score_db) as db, db.transaction() as conn:
            await ledger.initialise(conn, EventStore(db), "t-1", ["ann", "ben"])
        ok = await score.get("/tournaments/t-1/leaderboard", params={"as_of": "2000-01-01"})
        assert ok.status_code == 200
        for moment in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"):
            r = await score.get("/tournaments/t-1/leaderboard", params={"as_of": moment})
            assert r.status_code == 422, (moment, r.status_code, r.text)
            assert "as_of" in r.json()["detail"]


async def test_a_json_body_posted_as_form_data_is_told_to_send_json(tmp_path: Path) -> None:
    """``curl -d '{...}' URL`` (the most common first try) sends a valid JSON body as
    ``application/x-www-form-urlencoded``. The 422 must say what is wrong: the body
    must be sent as JSON (``Content-Type: application/json``). Before the fix, the detail is
    ``body: Input should be a valid dictionary or object to extract fields from``,
    which says the (perfectly valid) object is not an object."""
    async with engines(tmp_path) as (match, _score, _config):
        r = await match.post(
            "/tournaments",
            content=b'{"name": "cup", "participants": ["ann", "ben"]}',
            headers={**AUTH, "content-type": "application/x-www-form-urlencoded"},
        )
        assert r.status_code in (415, 422)
        assert "application/json" in r.json()["detail"], r.json()


async def test_participant_ids_that_are_dot_segments_are_refused(tmp_path: Path) -> None:
    """Participant ids are path segments of the API (``/bans/{pid}``,
    ``/tournaments/{id}/participants/{pid}/ledger``), and every standard client (curl,
    browsers, httpx) removes the dot-segments ``.`` and ``..`` from a URL (RFC 3986
    5.2.4). ``PARTICIPANT_PATTERN`` accepts ``.`` and ``..``: a ban of ``..`` is made
    with 201 but ``DELETE /bans/..`` becomes ``DELETE /`` and can never lift it, and
    such a participant's ledger cannot be read. Such ids must be refused with 422."""
    async with engines(tmp_path) as (match, score, _config):
        made = await score.post("/bans", json={"participant": ".."}, headers=AUTH)
        lifted = await score.delete("/bans/..", headers=AUTH)
        created = await match.post(
            "/tournaments", json={"name": "dots", "participants": [".", "ann"]}, headers=AUTH
        )
        assert (made.status_code, created.status_code) == (422, 422), (
            f"POST /bans '..' -> {made.status_code}, then DELETE /bans/.. -> "
            f"{lifted.status_code} {lifted.text}; POST /tournaments with '.' -> "
            f"{created.status_code}"
        )


# -- configuration errors of `accord up` ------------------------------------------------


def test_the_same_port_for_both_engines_is_refused(tmp_path: Path) -> None:
    """``accord up --match-port P --score-port P`` must be refused at once (exit 2,
    naming both options), like any other bad option. ``StackConfig.resolved`` does
    not compare the ports: the Score Engine takes P, the Match Engine crash-loops on
    ``address already in use``, and ``wait_ready`` — which checks only that *a*
    process of this instance answers on each URL — prints "up" anyway."""
    port = free_port()
    data = tmp_path / "same"
    with started(
        accord("up", "--data-dir", str(data), "--match-port", str(port), "--score-port", str(port)),
        data,
    ) as process:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(20)
        out = output_of(data)
        assert process.returncode == 2, f"exit {process.returncode}:\n{out}"
        assert "--match-port" in out and "--score-port" in out, out


def test_a_data_dir_that_cannot_be_a_directory_is_refused_clearly(tmp_path: Path) -> None:
    """``accord up --data-dir FILE`` (a file where the directory should be) must end
    with a one-line error naming ``--data-dir`` and the path, and no Python
    traceback. Before the fix, ``ensure_token``'s ``mkdir`` raises FileExistsError out of the
    command (and with ``--api-token``, ``Database``'s ``mkdir`` does the same)."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file, not a directory\n")
    for extra in ([], ["--api-token", "x"]):
        result = subprocess.run(
            accord(
                "up", "--data-dir", str(blocker),
                "--match-port", str(free_port()), "--score-port", str(free_port()), *extra,
            ),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        out = result.stdout + result.stderr
        assert result.returncode != 0
        assert "Traceback" not in out, out
        assert "--data-dir" in out and str(blocker) in out.replace("\n", ""), out


def test_an_unknown_log_level_is_refused_at_once(tmp_path: Path) -> None:
    """``accord up --log-level LOUD`` must be refused before anything starts (exit 2,
    naming the levels it accepts). Before the fix, the option is not checked: every child
    dies in ``configure_logging`` with ValueError and is restarted again and again,
    and only after 30 s does ``wait_ready`` give up with "is the port free?" — the
    wrong hint."""
    data = tmp_path / "loud"
    with started(
        accord(
            "up", "--data-dir", str(data), "--log-level", "LOUD",
            "--match-port", str(free_port()), "--score-port", str(free_port()),
        ),
        data,
    ) as process:  # fmt: skip
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(15)
        out = output_of(data)
        assert process.returncode == 2, f"exit {process.returncode}:\n{out}"
        assert "--log-level" in out and "INFO" in out, out


@pytest.mark.parametrize("dirname", ["cup?2024", "cup-100%25"])
async def test_the_embedded_databases_live_in_the_data_dir_whatever_its_name(
    tmp_path: Path, dirname: str
) -> None:
    """With the embedded default, each engine's SQLite file and the broker's are
    ``DATA_DIR/match-engine.db``, ``score-engine.db`` and ``broker.db`` — three
    files, one database per engine. ``StackConfig.resolved`` pastes the path into a
    URL unquoted: in ``--data-dir "cup?2024"`` everything after ``?`` is read as the
    URL's query, and all three databases become one file ``cup`` beside the data
    dir (both engines in one database); ``%25`` is decoded, so ``cup-100%25`` puts
    them in ``cup-100%``."""
    data = tmp_path / dirname
    config = StackConfig(data_dir=str(data)).resolved()
    await prepare(config)
    assert listing(data) == ["broker.db", "match-engine.db", "score-engine.db"], (
        listing(data),
        listing(tmp_path),
    )


# -- the supervisor ---------------------------------------------------------------------


@pytest.mark.slow
async def test_a_dead_child_is_restarted_after_its_log_directory_was_removed(
    tmp_path: Path,
) -> None:
    """A child that dies is restarted (with backoff), whatever happened to
    ``DATA_DIR/logs`` meanwhile (say an operator cleared the logs with ``rm -r``).
    Before the fix, ``Supervisor._spawn`` opens ``logs/<name>.log`` without creating the
    directory; the FileNotFoundError ends that child's ``_watch`` task silently:
    the child stays dead for good, after "restarting it in 0.5s" was announced."""
    with running(tmp_path / "data") as stack:
        async with client_for(stack) as api:
            shutil.rmtree(api.data_dir / "logs")
            victim = api.pids()["score-consumer"]
            os.kill(victim, signal.SIGKILL)
            await wait_for(lambda: "restarting" in api.output(), 20.0, interval=0.1)
            try:
                await wait_for(
                    lambda: (
                        alive(api.pids()["score-consumer"])
                        and api.pids()["score-consumer"] != victim
                    ),
                    20.0,
                    interval=0.2,
                )
            except Exception:
                pytest.fail(f"score-consumer was never restarted:\n{api.output()}")
            t = await api.create(["ann", "ben"])
            assert (await api.settled(t["id"]))["status"] == "ACTIVE"


@pytest.mark.slow
def test_sigterm_while_starting_stops_everything_and_exits_0(tmp_path: Path) -> None:
    """README: "Ctrl-C or SIGTERM stops all and exits 0". A SIGTERM that arrives
    while ``accord up`` still waits for its APIs (here: the Match Engine's port is
    busy, so ``wait_ready`` waits up to 30 s) must also stop every child in order
    and exit 0. Before the fix, the signal handlers are installed only in ``Supervisor.run``,
    after ``wait_ready``: the supervisor dies of the signal (exit -15) without
    stopping its children, which linger until their own watchdog notices."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    data = tmp_path / "starting"
    try:
        with started(
            accord(
                "up", "--data-dir", str(data),
                "--match-port", str(busy.getsockname()[1]), "--score-port", str(free_port()),
            ),
            data,
        ) as process:  # fmt: skip
            deadline = time.monotonic() + 30
            while not (data / "processes.json").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)
            children = json.loads((data / "processes.json").read_text())
            process.send_signal(signal.SIGTERM)
            code = process.wait(30)
            left = sorted(name for name, pid in children.items() if alive(int(pid)))
            assert code == 0, f"exit {code}:\n{output_of(data)}"
            assert not left, f"children still running when accord up returned: {left}"
    finally:
        busy.close()


# -- the demo -------------------------------------------------------------------------------


@pytest.mark.slow
async def test_the_demo_runs_again_after_a_run_interrupted_in_its_poison_step(
    tmp_path: Path,
) -> None:
    """``accord demo`` on a data dir whose last run was stopped during step 5 (after
    it banned dave, before it lifted the ban — a Ctrl-C there, or step 5 failing)
    must still check out: the scenario should start from the state it needs. Before the fix,
    dave's ban is left in the Score Engine, and every later demo on that data dir
    fails from step 1 on ("Spring Cup" includes dave, so it is CANCELLED)."""
    data = tmp_path / "data"
    # What the interrupted run left: the stack's databases, and dave banned over HTTP
    # exactly as step 5 does it.
    with running(data) as stack:
        async with client_for(stack) as api:
            await api.ban("dave")
    result = await asyncio.to_thread(
        subprocess.run,
        accord(
            "demo", "--once", "--data-dir", str(data),
            "--match-port", str(free_port()), "--score-port", str(free_port()),
        ),
        capture_output=True, text=True, timeout=90,
        env={**os.environ, "COLUMNS": "120"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "every step checked out" in result.stdout


# -- switching the saga style -------------------------------------------------------------


@pytest.mark.slow
async def test_a_tournament_started_under_orchestration_settles_after_a_switch_to_choreography(
    tmp_path: Path,
) -> None:
    """The Score Engine serves both styles "so a stack can switch style without
    stranding flows in progress" (``score_engine/handlers.py``). A tournament whose
    orchestrated saga is still running when the stack is restarted with
    ``--saga-style choreography`` must still settle (ACTIVE here). Before the fix, the
    Match Engine's ``match-saga`` process runs only the current style's consumers
    (``stack.match_consumers``): no orchestrator consumes the Score Engine's reply,
    nor fires the step's timeout, and the tournament stays PENDING for good."""
    data = tmp_path / "data"
    # A tournament created under orchestration while no worker runs (the stack was
    # stopped, or the POST came just before the restart): its saga waits for a reply.
    config = StackConfig(data_dir=str(data), api_token=TOKEN, channel="switch").resolved()
    await prepare(config)
    app = create_match_app(config)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://match"
    ) as match:
        r = await match.post(
            "/tournaments", json={"name": "switch", "participants": ["ann", "ben"]}, headers=AUTH
        )
        assert r.status_code == 202
        created = r.json()
    with running(data, saga_style="choreography", channel="switch") as stack:
        async with client_for(stack) as api:
            try:
                t = await api.settled(created["id"], timeout=30.0)
            except Exception:
                t = await api.tournament(created["id"])
            assert t["status"] == "ACTIVE", t
            r = await api.ledger(created["id"], "ann")
            assert r.status_code == 200


# -- preparing the databases --------------------------------------------------------------


@pytest.mark.postgres
async def test_concurrent_prepares_of_fresh_postgres_databases_all_succeed(
    tmp_path: Path,
) -> None:
    """``tournament.stack.prepare`` ("Idempotent") is what every ``accord up`` /
    ``accord demo`` runs first; two of them started together against the same fresh
    PostgreSQL databases (scale-out on one PostgreSQL, a compose file starting
    replicas) must both succeed. Accord's own ``upgrade`` serialises itself with an
    advisory lock, but the engines' ``metadata.create_all`` and the leaderboard's
    tables are created without one: concurrent ``CREATE TABLE``s collide
    (``duplicate key value violates unique constraint "pg_type_typname_nsp_index"``
    / ``type "match_tournaments" already exists``) and those commands exit 1."""
    match_name, score_name = await create_pg_database(), await create_pg_database()
    try:
        configs = [
            StackConfig(
                data_dir=str(tmp_path / f"d{i}"),
                match_db=pg_url_of(match_name),
                score_db=pg_url_of(score_name),
                broker=pg_url_of(match_name),
                channel="prepare-race",
            ).resolved()
            for i in range(3)
        ]
        outcomes = await asyncio.gather(*(prepare(c) for c in configs), return_exceptions=True)
        failures = [repr(o)[:300] for o in outcomes if isinstance(o, BaseException)]
        assert not failures, failures
    finally:
        await drop_pg_database(match_name)
        await drop_pg_database(score_name)
