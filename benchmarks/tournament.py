"""Tournament benchmark, end to end over HTTP with the real processes (``accord up``'s
supervisor): tournaments created per second until ACTIVE, and matches recorded per
second until the leaderboard shows them, with p50/p99 latencies.

Runs on PostgreSQL (one database per engine) + RabbitMQ with ``--workers``
relay/consumer processes per engine (default 1: on two cores a second set of
processes measured slower, 54-59 against 81-86 tournaments/s); baseline in the same
run: the same workload on the embedded default (SQLite files + SQL transport, one
process each), and the HTTP floor (a GET of /health) on the same machine. Then the
share of a core the embedded stack uses idle, beside a bare Python process.

    .venv/bin/python -m benchmarks.tournament [--quick] [--tournaments 200] [--matches 400]
        [--concurrency 16] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from tests.brokers import delete_everything

from benchmarks._common import RABBIT_URL, ScratchDatabase, percentile, report
from tournament.config import StackConfig, ensure_token
from tournament.stack import prepare
from tournament.supervisor import Supervisor

GROUPS = {"score-engine", "orchestrator", "match-engine", "flow-tracker"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def stack(**options: Any) -> AsyncIterator[tuple[StackConfig, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        config = StackConfig(
            data_dir=tmp, match_port=_port(), score_port=_port(), **options
        ).resolved()
        token, _ = ensure_token(config.data_dir, None)
        await prepare(config)
        supervisor = Supervisor(config, token, say=lambda _line: None)
        await supervisor.start()
        try:
            await supervisor.wait_ready(60)
            yield config, token
        finally:
            await supervisor.stop()


async def measure(
    count: int, concurrency: int, one: Callable[[int], Awaitable[None]]
) -> dict[str, float]:
    """Run ``one(i)`` for i < count, ``concurrency`` at a time; rate and latencies (ms)."""
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            started = time.perf_counter()
            await one(i)
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "per_s": count / elapsed,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
    }


async def workload(
    label: str, config: StackConfig, token: str, tournaments: int, matches: int, concurrency: int
) -> list[dict[str, Any]]:
    auth = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def until(url: str, ok: Callable[[httpx.Response], bool]) -> httpx.Response:
            while True:
                response = await client.get(url)
                if ok(response):
                    return response
                await asyncio.sleep(0.01)

        async def create(_i: int) -> None:
            tag = uuid.uuid4().hex[:6]
            body = {"name": "bench", "participants": [f"a-{tag}", f"b-{tag}", f"c-{tag}"]}
            r = await client.post(f"{config.match_url}/tournaments", json=body, headers=auth)
            url = f"{config.match_url}/tournaments/{r.json()['id']}?wait=30"
            await until(url, lambda resp: resp.json()["status"] == "ACTIVE")

        async def health(_i: int) -> None:
            await client.get(f"{config.match_url}/health")

        floor = await measure(200, concurrency, health)
        created = await measure(tournaments, concurrency, create)

        players = [f"p{i}-{uuid.uuid4().hex[:4]}" for i in range(32)]
        r = await client.post(
            f"{config.match_url}/tournaments",
            json={"name": "league", "participants": players},
            headers=auth,
        )
        league = r.json()["id"]
        await until(
            f"{config.match_url}/tournaments/{league}", lambda x: x.json()["status"] == "ACTIVE"
        )

        async def play(i: int) -> None:
            home, away = players[i % 32], players[(i * 7 + 1) % 32]
            if home == away:
                away = players[(i + 1) % 32]
            r = await client.post(
                f"{config.match_url}/tournaments/{league}/matches",
                json={"home": home, "away": away, "winner": home},
                headers=auth,
            )
            match_id = r.json()["id"]
            ledger = f"{config.score_url}/tournaments/{league}/participants/{home}/ledger"
            found = await until(
                ledger,
                lambda x: any(e["data"].get("match_id") == match_id for e in x.json()["events"]),
            )
            position = max(e["position"] for e in found.json()["events"])
            board = f"{config.score_url}/tournaments/{league}/leaderboard"
            await client.get(board, params={"min_position": position, "wait": 30})

        played = await measure(matches, concurrency, play)
    return [
        {"benchmark": f"{label}: HTTP floor (GET /health)", **floor},
        {"benchmark": f"{label}: tournaments until ACTIVE", **created},
        {"benchmark": f"{label}: matches until on the leaderboard", **played},
    ]


def _pids(config: StackConfig) -> dict[str, int]:
    """The stack's processes by role, as its supervisor lists them."""
    listed = json.loads(Path(config.data_dir, "processes.json").read_text())
    return {name: int(pid) for name, pid in listed.items()}


def _cpu_ticks(pid: int) -> int:
    """User + system CPU time of the process so far, in clock ticks."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


async def idle_cpu(config: StackConfig, seconds: float) -> list[dict[str, Any]]:
    """The share of one core the embedded stack's processes use with nothing to do
    (after the workload settled), against a bare Python process idling beside them:
    what looking for work costs (relays, consumers, projector and timer poll)."""
    pids = _pids(config)
    bare = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(3600)"
    )
    try:
        await asyncio.sleep(2.0)
        watched = {**pids, "bare python": bare.pid}
        before = {name: _cpu_ticks(pid) for name, pid in watched.items()}
        await asyncio.sleep(seconds)
        used = {name: _cpu_ticks(pid) - before[name] for name, pid in watched.items()}
    finally:
        bare.kill()
        await bare.wait()
    tick = os.sysconf("SC_CLK_TCK")
    share = {name: 100 * ticks / tick / seconds for name, ticks in used.items()}
    stack_share = sum(v for k, v in share.items() if k != "bare python")
    return [
        {
            "benchmark": "idle, bare python process (baseline), % of a core",
            "per_s": share["bare python"],
        },
        {
            "benchmark": f"idle, embedded stack ({len(pids)} processes), % of a core",
            "per_s": stack_share,
        },
        *(
            {"benchmark": f"idle, {name}, % of a core", "per_s": value}
            for name, value in sorted(share.items())
            if name != "bare python"
        ),
    ]


async def main(args: argparse.Namespace) -> None:
    tournaments = 40 if args.quick else args.tournaments
    matches = 80 if args.quick else args.matches
    rows: list[dict[str, Any]] = []
    async with ScratchDatabase("bench_match") as mdb, ScratchDatabase("bench_score") as sdb:
        channel = f"bench-{uuid.uuid4().hex[:8]}"
        try:
            async with stack(
                match_db=mdb.url,
                score_db=sdb.url,
                broker=RABBIT_URL,
                channel=channel,
                workers=args.workers,
            ) as (config, token):
                rows += await workload(
                    "PostgreSQL + RabbitMQ", config, token, tournaments, matches, args.concurrency
                )
        finally:
            await delete_everything({channel: GROUPS})
    async with stack() as (config, token):
        rows += await workload(
            "embedded (SQLite)", config, token, tournaments, matches, args.concurrency
        )
        rows += await idle_cpu(config, 5.0 if args.quick else 20.0)
    report(
        "tournament",
        f"tournament end to end over HTTP ({tournaments} tournaments, {matches} matches, "
        f"{args.concurrency} clients)",
        rows,
        ["benchmark", "per_s", "p50_ms", "p99_ms"],
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="40 tournaments, 80 matches.")
    parser.add_argument("--tournaments", type=int, default=200)
    parser.add_argument("--matches", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16, help="HTTP clients.")
    parser.add_argument(
        "--workers", type=int, default=1, help="Relay/consumer processes per engine role."
    )
    asyncio.run(main(parser.parse_args()))
