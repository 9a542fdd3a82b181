"""HTTP load test of the recommendation service from a second process (asyncio + aiohttp), loopback only.

    python -m recsys.benchmarks.serving_load  # starts a server on a bench model, 32 clients, 60 s
    python -m recsys.benchmarks.serving_load --duration 20 --concurrency 16 --rank-candidates 500
    python -m recsys.benchmarks.serving_load --url http://127.0.0.1:3000 --api-key KEY  # a running server
    python -m recsys.benchmarks.serving_load --ranker rankmixer  # + a feature ranker (ML-100K features)
    python -m recsys.benchmarks.serving_load --rate 100,200,300   # open loop: Poisson arrivals at these rates
    python -m recsys.benchmarks.serving_load --retriever synthetic-retriever:latest \
        --ranker-tag synthetic-ranker:latest             # what the pipeline packaged (current store)
    python -m recsys.benchmarks.serving_load --compare-to 6b72956 --starlette \
        --loads c8,c16,c32,r500 --duration 15 --json load.json   # before/after + framework yardstick
    python -m recsys.benchmarks.serving_load --soak --duration 600   # 10-minute soak, 32 clients

Soak (``--soak``, a server started here): ``--concurrency`` clients send recommend and rank requests in
turn, back to back, for ``--duration`` seconds, warm-up included (every answer counts); the server's
resident memory (the whole process tree) is sampled every ``--rss-every`` seconds. Then the server is
stopped with SIGTERM (its impressions spool flushes on shutdown) and the spool is read back. It prints the
three figures a soak is judged on: errors (non-200 answers and transport errors), the RSS growth from the
first sample after ``--warmup`` seconds to the last one, and the request ids in the impressions spool
against the request ids of the answers served (equal sets: no list lost, none logged twice).

Scenarios, one after the other: ``recommend`` (k = 10, a random known user) and ``rank`` (1,000 random
catalogue items for a random known user). Each runs ``--concurrency`` clients that send requests back to
back for ``--duration`` seconds or until ``--max-requests`` have been sent (whichever comes first), after a
``--warmup``; it prints p50/p95/p99 latency, requests/s, the error count (non-200 answers and transport
errors) and, for a server started here, the CPU milliseconds per request of the server's processes and of
this client (what a request costs, which other jobs on a shared machine move far less than latency).
Request bodies are serialised before the clock starts, so the client spends its time on HTTP only.

Without ``--url`` the script starts ``bentoml serve`` itself, on a free port of 127.0.0.1, in a temporary
state directory, with a bench model registered there: HSTU base (2 blocks, d = 50, max_len 200, random
weights: latency does not depend on them) on the MovieLens-100K catalogue and user histories
(``../shared/data/ml-100k`` or ``RECSYS_ML100K_DIR``), or on a synthetic catalogue of the same size when
the files are missing. ``--retriever TAG`` serves a registered model of the current store instead. The
server and this client share the machine's cores: the figures are for both on one box.

Side by side, in one invocation: ``--compare-to REV`` also serves git revision REV (checked out into a
temporary ``git worktree``, its server started with that tree on ``PYTHONPATH``, the same model store) and
``--starlette`` the same model and engine behind a minimal uvicorn + Starlette app
(``benchmarks.serving_starlette``: BentoML left out). All servers run at once, idle but one: every load point
is run on each server in turn, so a change in the machine's load hits them alike. ``--loads`` mixes
closed-loop points (``c16``: 16 clients) and open-loop ones (``r500``: Poisson arrivals at 500 req/s, at most
``max(c..., --concurrency)`` in flight). A server that sends a ``server-timing`` header (this tree's service
and the Starlette app) gets a breakdown of its CPU per request: request checks (``job``), its share of the
model batch (``model``), impressions logging on the request path (``log``), the policy and response
(``respond``), the Starlette app's parsing (``parse``); the rest of the server's CPU per request is the
framework (HTTP, parsing and serialisation, middleware) and the background threads (the spool writer). The
summary gives, per server and scenario, the highest closed-loop throughput with p99 <= ``--p99-target`` ms,
the open-loop p99s, and the ratios to the first server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from recsys.core.atomic import atomic_path

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class Outcome:
    latencies_ms: list[float]
    errors: int
    wall_s: float
    server_cpu_s: float = float("nan")  # CPU seconds of the server's processes over the measured part
    client_cpu_s: float = float("nan")  # CPU seconds of this (client) process over the measured part
    error_kinds: dict[str, int] = field(default_factory=dict)  # "<status>: <body start>" or the exception
    timing_ms: dict[str, float] = field(default_factory=dict)  # mean server-timing parts of the OK answers

    def summary(self) -> dict[str, float]:
        lat = sorted(self.latencies_ms)

        def pct(p: float) -> float:
            return lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))] if lat else float("nan")

        return {
            "requests": float(len(lat) + self.errors),
            "ok": float(len(lat)),
            "errors": float(self.errors),
            "rps": len(lat) / self.wall_s if self.wall_s > 0 else 0.0,
            "p50_ms": pct(50),
            "p95_ms": pct(95),
            "p99_ms": pct(99),
            "mean_ms": statistics.fmean(lat) if lat else float("nan"),
            # CPU per answered request: unlike latency, barely moved by other jobs on a shared machine.
            "server_cpu_ms": self.server_cpu_s / len(lat) * 1e3 if lat else float("nan"),
            "client_cpu_ms": self.client_cpu_s / len(lat) * 1e3 if lat else float("nan"),
        }


async def run_load(
    url: str,
    path: str,
    bodies: list[bytes],
    *,
    concurrency: int,
    duration_s: float,
    max_requests: int,
    warmup_s: float,
    headers: dict[str, str],
    server_cpu: Callable[[], float] | None = None,
    rate: float | None = None,
) -> Outcome:
    """Closed loop (``rate`` None): ``concurrency`` clients send back to back. Open loop: requests arrive
    as a Poisson process of ``rate`` per second, at most ``concurrency`` in flight (an arrival that finds
    every connection busy waits, and its latency counts from its arrival: no coordinated omission)."""
    import aiohttp

    # aiohttp rather than httpx: ~4x less client CPU per request, which this shared box gives the server.
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60.0)
    latencies: list[float] = []
    errors = 0
    kinds: dict[str, int] = {}
    timing: dict[str, float] = {}
    sent = 0
    rng = random.Random(1)
    async with aiohttp.ClientSession(
        base_url=url, connector=connector, timeout=timeout, headers=headers
    ) as client:

        async def call(body: bytes, started: float) -> None:
            nonlocal errors
            try:
                async with client.post(path, data=body) as response:
                    text = await response.read()
                    ok = response.status == 200
                    kind = f"{response.status}: {text[:200].decode(errors='replace')}"
                    parts = response.headers.get("server-timing")
                    if ok and parts:
                        for part in parts.split(","):
                            name, _, dur = part.strip().partition(";dur=")
                            timing[name] = timing.get(name, 0.0) + float(dur)
            except (aiohttp.ClientError, TimeoutError) as exc:
                ok = False
                kind = f"{type(exc).__name__}: {exc}"[:200]
            if ok:
                latencies.append((time.perf_counter() - started) * 1e3)
            else:
                errors += 1
                kinds[kind] = kinds.get(kind, 0) + 1

        warm_end = time.perf_counter() + warmup_s
        while time.perf_counter() < warm_end:  # warm-up: not measured
            async with client.post(path, data=random.choice(bodies)) as response:
                await response.read()
        latencies.clear()
        errors = 0
        kinds.clear()
        timing.clear()
        cpu0 = server_cpu() if server_cpu else float("nan")
        client0 = time.process_time()
        started = time.perf_counter()
        stop = started + duration_s

        async def closed_client() -> None:
            nonlocal sent
            while time.perf_counter() < stop and sent < max_requests:
                sent += 1
                await call(random.choice(bodies), time.perf_counter())

        if rate is None:
            await asyncio.gather(*(closed_client() for _ in range(concurrency)))
        else:
            pending: set[asyncio.Task[None]] = set()
            next_at = started
            while next_at < stop and sent < max_requests:
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                sent += 1
                task = asyncio.create_task(call(random.choice(bodies), next_at))
                pending.add(task)
                task.add_done_callback(pending.discard)
                next_at += rng.expovariate(rate)
            if pending:
                await asyncio.gather(*pending)
        wall = time.perf_counter() - started
        client_cpu = time.process_time() - client0
        server = server_cpu() - cpu0 if server_cpu else float("nan")
    means = {name: total / len(latencies) for name, total in timing.items()} if latencies else {}
    return Outcome(latencies, errors, wall, server, client_cpu, kinds, means)


@dataclass
class SoakOutcome:
    served_ids: list[int]  # request ids of the 200 answers, in the order they arrived
    errors: int
    wall_s: float
    rss_samples: list[tuple[float, int]]  # (seconds since the start, bytes of the server's process tree)
    error_kinds: dict[str, int] = field(default_factory=dict)


async def run_soak(
    url: str,
    bodies: dict[str, list[bytes]],
    *,
    concurrency: int,
    duration_s: float,
    headers: dict[str, str],
    rss: Callable[[], int],
    rss_every_s: float,
) -> SoakOutcome:
    """``concurrency`` closed-loop clients, each sending the scenarios of ``bodies`` in turn, for
    ``duration_s``; every 200 answer's ``request_id`` is kept, ``rss()`` is sampled every ``rss_every_s``."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60.0)
    served: list[int] = []
    kinds: dict[str, int] = {}
    samples: list[tuple[float, int]] = []
    errors = 0
    started = time.perf_counter()
    stop = started + duration_s
    paths = sorted(bodies)
    async with aiohttp.ClientSession(
        base_url=url, connector=connector, timeout=timeout, headers=headers
    ) as client:

        async def one_client(offset: int) -> None:
            nonlocal errors
            turn = offset
            while time.perf_counter() < stop:
                path = paths[turn % len(paths)]
                turn += 1
                try:
                    async with client.post(f"/{path}", data=random.choice(bodies[path])) as response:
                        text = await response.read()
                        if response.status == 200:
                            served.append(int(json.loads(text)["request_id"]))
                            continue
                        kind = f"{response.status}: {text[:200].decode(errors='replace')}"
                except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
                    kind = f"{type(exc).__name__}: {exc}"[:200]
                errors += 1
                kinds[kind] = kinds.get(kind, 0) + 1

        async def sampler() -> None:
            while True:
                samples.append((time.perf_counter() - started, rss()))
                if time.perf_counter() + rss_every_s > stop:
                    return
                await asyncio.sleep(rss_every_s)

        await asyncio.gather(sampler(), *(one_client(i) for i in range(concurrency)))
        samples.append((time.perf_counter() - started, rss()))
    return SoakOutcome(served, errors, time.perf_counter() - started, samples, kinds)


def soak_figures(outcome: SoakOutcome, logged_ids: list[int], warmup_s: float) -> dict[str, float]:
    """The soak's verdict figures: errors, RSS growth after the warm-up, logged vs served request ids."""
    after = [b for t, b in outcome.rss_samples if t >= warmup_s] or [outcome.rss_samples[-1][1]]
    served, logged = set(outcome.served_ids), set(logged_ids)
    return {
        "requests": float(len(outcome.served_ids) + outcome.errors),
        "errors": float(outcome.errors),
        "rps": len(outcome.served_ids) / outcome.wall_s if outcome.wall_s > 0 else 0.0,
        "rss_base_mib": after[0] / 2**20,
        "rss_end_mib": after[-1] / 2**20,
        "rss_max_mib": max(after) / 2**20,
        "rss_growth_pct": 100.0 * (after[-1] - after[0]) / after[0],
        "served": float(len(outcome.served_ids)),
        "served_unique": float(len(served)),
        "logged": float(len(logged)),
        "logged_rows_ids": float(len(logged_ids)),
        "missing": float(len(served - logged)),
        "extra": float(len(logged - served)),
    }


def _process_tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (the server's arbiter and its workers)."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total


def _process_tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants (the server and its workers)."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = proc.cpu_times()
            total += t.user + t.system
    return total


# -- a server of our own ----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _register_bench_model(ml100k: Path) -> tuple[str, list[int], list[int]]:
    """Register HSTU base on the MovieLens-100K catalogue (or a synthetic one); returns tag, users, items."""
    import numpy as np
    import polars as pl
    import torch

    from recsys.models.registry import build_model
    from recsys.serving.registry import register_model

    if (ml100k / "u.data").exists():
        events = pl.read_csv(
            ml100k / "u.data",
            separator="\t",
            has_header=False,
            new_columns=["user_id", "item_id", "rating", "ts"],
        )
    else:  # same size as MovieLens-100K: 943 users, 1,682 items, 100,000 events
        rng = np.random.default_rng(0)
        events = pl.DataFrame(
            {
                "user_id": rng.integers(1, 944, 100_000),
                "item_id": (rng.zipf(1.3, 100_000) % 1682) + 1,
                "ts": rng.integers(8 * 10**8, 9 * 10**8, 100_000),
            }
        )
    events = events.with_row_index("src_row").sort(["user_id", "ts", "src_row"])
    item_ids = np.sort(events["item_id"].unique().to_numpy())
    counts = events.group_by("item_id").len().sort("item_id")
    items = pl.DataFrame({"item_id": item_ids, "item_idx": np.arange(1, len(item_ids) + 1)}).join(
        counts.rename({"len": "popularity"}), on="item_id", how="left"
    )
    histories = events.group_by("user_id", maintain_order=True).agg(pl.col("item_id"), pl.col("ts"))
    torch.manual_seed(0)
    model = build_model("hstu", num_items=len(item_ids), max_len=200, dropout=0.0)
    tag = register_model(
        "bench-hstu",
        architecture="hstu",
        task="retrieval",
        model=model,
        items=items,
        data_version="bench",
        histories=histories,
    )
    return tag, histories["user_id"].to_list(), item_ids.tolist()


def _register_bench_ranker(ml100k: Path, architecture: str, max_len: int) -> str:
    """A feature-based ranker (random weights) on MovieLens-100K: ingest, point-in-time examples, the ranking
    data, then ``register_ranker`` (the featurizer is built from the same warehouse). Needs the files."""
    import torch

    from recsys.core.config import PathsConfig
    from recsys.experiments.ranking import build_model as build_ranker
    from recsys.features.config import FeatureConfig
    from recsys.features.point_in_time import build_examples
    from recsys.ingest.movielens import ingest_movielens
    from recsys.serving.registry import register_ranker
    from recsys.training.ranking import load_ranking_data
    from recsys.warehouse import Warehouse

    if not (ml100k / "u.data").exists():
        raise SystemExit(f"--ranker needs the MovieLens-100K files (not found in {ml100k})")
    with Warehouse(PathsConfig().warehouse) as wh:
        ingest_movielens(wh, ml100k, dataset="ml100k")
        build_examples(wh, "ml100k", FeatureConfig())
        data = load_ranking_data(wh, "ml100k")
        torch.manual_seed(0)
        model, _ = build_ranker(architecture, data, max_len)
        return register_ranker(
            f"bench-{architecture}", architecture=architecture, model=model, wh=wh, data=data
        )


ROOT = Path(__file__).resolve().parents[2]


def _start_server(
    tag: str,
    env_extra: dict[str, str],
    log: Path,
    root: Path = ROOT,
    app: Literal["bentoml", "starlette"] = "bentoml",
) -> tuple[subprocess.Popen[bytes], str]:
    """``bentoml serve`` of the tree at ``root`` (on PYTHONPATH), or the Starlette app of this tree under
    uvicorn with the service's worker count; returns once /readyz answers 200."""
    import httpx

    port = _free_port()
    env = {**os.environ, "RECSYS_SERVING_RETRIEVER": tag, **env_extra}
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])
    if app == "bentoml":
        command = [
            str(Path(sys.executable).with_name("bentoml")),
            "serve",
            "recsys.serving.service:RecommendationService",
            "--port",
            str(port),
        ]
    else:
        workers = env.get("RECSYS_SERVING_WORKERS") or "2"
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "recsys.benchmarks.serving_starlette:app",
            *("--host", "127.0.0.1", "--port", str(port), "--workers", workers),
            *("--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"),
        ]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command,
            cwd=root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                return process, url
        time.sleep(0.5)
    _stop(process)
    raise RuntimeError(f"server not ready after 300 s: {log.read_text()[-2000:]}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@dataclass
class Served:
    """One server under test: a label, its URL and (when started here) its process."""

    label: str
    url: str
    process: subprocess.Popen[bytes] | None = None

    def cpu(self) -> Callable[[], float] | None:
        process = self.process
        return (lambda: _process_tree_cpu(process.pid)) if process is not None else None


def parse_loads(text: str) -> list[tuple[str, float]]:
    """``c16,r500`` -> [("closed", 16), ("open", 500.0)]: closed-loop clients, open-loop request rates."""
    loads: list[tuple[str, float]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, value = part[0], part[1:]
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if kind not in "cr" or number <= 0 or (kind == "c" and not number.is_integer()):
            raise ValueError(
                f"--loads: {part!r} is neither c<clients> (closed loop) nor r<requests/s> (open loop)"
            )
        loads.append(("closed" if kind == "c" else "open", number))
    if not loads:
        raise ValueError("--loads: no load point given")
    return loads


def summarize(
    results: list[dict[str, object]], labels: list[str], p99_target: float
) -> list[dict[str, object]]:
    """Per server and scenario: the best closed-loop req/s with p99 <= target, the open-loop p99s, the
    server CPU per request, and the ratios to the first server (the reference)."""
    rows: list[dict[str, object]] = []
    for scenario in dict.fromkeys(str(r["scenario"]) for r in results):
        for label in labels:
            mine = [r for r in results if r["scenario"] == scenario and r["server"] == label]
            closed = [r for r in mine if r["mode"] == "closed"]
            good = [float(r["rps"]) for r in closed if float(r["p99_ms"]) <= p99_target and r["errors"] == 0]
            cpu = [float(r["server_cpu_ms"]) for r in closed]
            rows.append(
                {
                    "scenario": scenario,
                    "server": label,
                    "best_rps_at_p99": max(good) if good else 0.0,
                    "open_p99_ms": {
                        f"{float(r['load']):g}": float(r["p99_ms"]) for r in mine if r["mode"] == "open"
                    },
                    "server_cpu_ms": statistics.fmean(cpu) if cpu else float("nan"),
                }
            )
        reference = next(r for r in rows if r["scenario"] == scenario and r["server"] == labels[0])
        for row in rows:
            if row["scenario"] == scenario:
                ref_rps, ref_cpu = float(reference["best_rps_at_p99"]), float(reference["server_cpu_ms"])
                row["rps_ratio"] = float(row["best_rps_at_p99"]) / ref_rps if ref_rps > 0 else float("nan")
                row["cpu_ratio"] = float(row["server_cpu_ms"]) / ref_cpu if ref_cpu > 0 else float("nan")
    return rows


def _git_worktree(rev: str, scratch: Path) -> Path:
    """A detached checkout of ``rev`` under ``scratch`` (removed by ``_remove_worktree``)."""
    tree = scratch / f"tree-{rev.replace('/', '_')}"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(tree), rev],
        check=True,
        capture_output=True,
    )
    return tree


def _remove_worktree(tree: Path) -> None:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)


def main(argv: list[str] | None = None) -> None:
    from recsys.ingest.movielens import find_movielens_100k  # the client itself stays light

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="A running server (loopback only); default: start one.")
    parser.add_argument("--api-key", default=None)
    parser.add_argument(
        "--retriever", help="Serve this registered tag (current store) instead of the bench model."
    )
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--rate",
        default=None,
        help="Open loop: Poisson arrivals at this many requests/s (at most --concurrency in flight); a "
        "comma list runs each rate in turn (e.g. 100,200,300). Default: closed loop, --concurrency "
        "clients back to back.",
    )
    parser.add_argument(
        "--loads",
        default=None,
        help="Load points, run in turn (overrides --concurrency/--rate): c<N> = N closed-loop clients, "
        "r<R> = open loop at R req/s (at most max(N, --concurrency) in flight), e.g. c8,c16,c32,r500.",
    )
    parser.add_argument("--duration", type=float, default=60.0, help="Seconds per scenario.")
    parser.add_argument("--max-requests", type=int, default=200_000, help="Per scenario.")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rank-candidates", type=int, default=1000)
    parser.add_argument("--scenarios", default="recommend,rank")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="Intra-op threads of a server started here (0: torch default).",
    )
    parser.add_argument(
        "--compare-to",
        default=None,
        metavar="REV",
        help="Also serve git revision REV (a temporary git worktree) and run every load point on both.",
    )
    parser.add_argument(
        "--starlette",
        action="store_true",
        help="Also serve the same model and engine behind a minimal uvicorn + Starlette app.",
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="Extra environment of this tree's servers (e.g. RECSYS_SERVING_LOG_IMPRESSIONS=false).",
    )
    parser.add_argument("--p99-target", type=float, default=50.0, help="ms, for the summary.")
    parser.add_argument("--json", type=Path, default=None, help="Write every figure here.")
    parser.add_argument(
        "--ranker",
        default=None,
        help="A server started here also serves a feature-based ranker of this architecture (rankmixer, "
        "deepfm, din, ...; random weights) built on MovieLens-100K with register_ranker.",
    )
    parser.add_argument("--ranker-max-len", type=int, default=100, help="History steps of --ranker.")
    parser.add_argument(
        "--ranker-tag",
        default=None,
        help="A server started here also serves this registered ranker of the current store (e.g. the "
        "pipeline's <dataset>-ranker:latest, with --retriever <dataset>-retriever:latest).",
    )
    parser.add_argument(
        "--soak",
        action="store_true",
        help="Soak mode (a server started here): recommend and rank in turn for --duration seconds, then "
        "errors, RSS growth after --warmup and impressions logged vs responses served.",
    )
    parser.add_argument("--rss-every", type=float, default=10.0, help="--soak: seconds between RSS samples.")
    parser.add_argument("--keep-state", action="store_true", help="Keep the server log and bench state.")
    parser.add_argument(
        "--record",
        type=Path,
        default=None,
        help="Record the figures as a 'benchmark' run in this warehouse (the dashboard's Serving page).",
    )
    parser.add_argument(
        "--ml100k",
        type=Path,
        default=find_movielens_100k() or Path(__file__).resolve().parents[3] / "shared/data/ml-100k",
    )
    args = parser.parse_args(argv)
    try:
        if args.loads:
            loads = parse_loads(args.loads)
        elif args.rate:
            loads = [("open", float(r)) for r in args.rate.split(",")]
        else:
            loads = [("closed", float(args.concurrency))]
    except ValueError as exc:
        parser.error(
            str(exc) if args.loads else f"--rate: expected numbers separated by commas, got {args.rate!r}"
        )
    if any(value <= 0 for _, value in loads):
        parser.error(f"--rate: rates must be > 0, got {args.rate!r}")
    in_flight = int(max([args.concurrency, *(v for kind, v in loads if kind == "closed")]))
    if args.url and urlparse(args.url).hostname not in LOOPBACK:
        parser.error(
            f"--url must be a loopback address ({', '.join(sorted(LOOPBACK))}): this is a local benchmark"
        )
    if args.url and (args.compare_to or args.starlette):
        parser.error("--compare-to and --starlette start servers: not with --url")
    extra_env: dict[str, str] = {}
    for item in args.server_env:
        name, eq, value = item.partition("=")
        if not eq or not name.startswith("RECSYS_SERVING_"):
            parser.error(f"--server-env: expected RECSYS_SERVING_<NAME>=<value>, got {item!r}")
        extra_env[name] = value
    if args.soak and (args.compare_to or args.starlette):
        parser.error("--soak measures one server: not with --compare-to or --starlette")
    if args.soak and args.url:
        parser.error("--soak starts its own server (it stops it to read the impressions spool): drop --url")
    if args.soak and any(kind == "open" for kind, _ in loads):
        parser.error("--soak is a closed loop: drop --rate and open-loop --loads")
    scratch = Path(tempfile.mkdtemp(prefix="recsys-load-"))  # server log (+ state of a bench model)
    if not args.url and not args.retriever and "RECSYS_HOME" not in os.environ:
        os.environ["RECSYS_HOME"] = str(scratch / "home")
    import recsys.core  # noqa: F401  (state dir and BentoML home, after RECSYS_HOME is decided)

    servers: list[Served] = []
    tree: Path | None = None
    try:
        if args.url:
            servers.append(Served("server", args.url.rstrip("/")))
            users, items = [], []
        else:
            if args.retriever:
                from recsys.serving.registry import load_model

                loaded = load_model(args.retriever)
                tag, users = loaded.tag, list(loaded.histories)
                items = loaded.catalog.item_ids[1:].tolist()
            else:
                tag, users, items = _register_bench_model(args.ml100k)
            env = {"RECSYS_SERVING_MAX_CANDIDATES": "5000"}
            if args.ranker and args.ranker_tag:
                parser.error("--ranker and --ranker-tag: give one")
            if args.ranker_tag:
                env["RECSYS_SERVING_RANKER"] = args.ranker_tag
            elif args.ranker:
                env["RECSYS_SERVING_RANKER"] = _register_bench_ranker(
                    args.ml100k, args.ranker, args.ranker_max_len
                )
            env["RECSYS_SERVING_TORCH_THREADS"] = str(args.torch_threads)
            if args.api_key:
                env["RECSYS_SERVING_API_KEY"] = args.api_key
            if args.soak:
                env["RECSYS_SERVING_IMPRESSIONS_DIR"] = str(scratch / "impressions")
            if args.compare_to:  # the reference first: the summary's ratios are to it
                tree = _git_worktree(args.compare_to, scratch)
                process, url = _start_server(tag, env, scratch / "server-ref.log", root=tree)
                servers.append(Served(f"bentoml@{args.compare_to}", url, process))
            process, url = _start_server(tag, env | extra_env, scratch / "server.log")
            servers.append(Served("bentoml" if args.compare_to or args.starlette else "server", url, process))
            if args.starlette:
                process, url = _start_server(
                    tag, env | extra_env, scratch / "server-starlette.log", app="starlette"
                )
                servers.append(Served("starlette", url, process))
            ranker = env.get("RECSYS_SERVING_RANKER")
            for server in servers:
                print(f"{server.label}: {server.url} serving {tag}" + (f" + {ranker}" if ranker else ""))
        import httpx
        import uvloop

        headers = {
            "content-type": "application/json",
            **({"x-api-key": args.api_key} if args.api_key else {}),
        }
        if not users:  # a foreign server: ask it for its catalogue size, use ids 1..n and anonymous histories
            meta = httpx.post(f"{servers[0].url}/metadata", headers=headers, timeout=30).json()
            n = int(meta["retriever"]["num_items"])
            items, users = list(range(1, n + 1)), []
        rng = random.Random(0)

        def who() -> dict[str, object]:
            if users:
                return {"user_id": rng.choice(users)}
            return {"history": [{"item_id": rng.choice(items), "ts": 10**9 + i} for i in range(50)]}

        bodies = {
            "recommend": [json.dumps({**who(), "k": args.k}).encode() for _ in range(256)],
            "rank": [
                json.dumps(
                    {**who(), "candidates": rng.sample(items, min(args.rank_candidates, len(items)))}
                ).encode()
                for _ in range(256)
            ],
        }
        if args.soak:
            assert process is not None
            _soak(args, url, bodies, headers, process, scratch / "impressions")
            return
        print(
            f"{'server':>18} {'scenario':>16} {'load':>8} {'requests':>9} {'errors':>7} {'req/s':>8} "
            f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'srv cpu':>9} {'cli cpu':>9}   ({args.duration:g} s "
            "each; load = closed-loop clients or open-loop req/s; cpu = ms of CPU per request)"
        )
        figures: dict[str, float] = {}
        results: list[dict[str, object]] = []
        for scenario, (mode, value) in [(sc, load) for sc in args.scenarios.split(",") for load in loads]:
            for server in servers:  # each load point on every server in turn: drift hits them alike
                outcome = uvloop.run(  # uvloop: the client's own CPU is taken from the server's cores
                    run_load(
                        server.url,
                        f"/{scenario}",
                        bodies[scenario],
                        concurrency=int(value) if mode == "closed" else in_flight,
                        duration_s=args.duration,
                        max_requests=args.max_requests,
                        warmup_s=args.warmup,
                        headers=headers,
                        server_cpu=server.cpu(),
                        rate=value if mode == "open" else None,
                    )
                )
                s = outcome.summary()
                label = f"rank@{args.rank_candidates}" if scenario == "rank" else f"rec@k={args.k}"
                load = f"c{value:g}" if mode == "closed" else f"{value:g}/s"
                print(
                    f"{server.label:>18} {label:>16} {load:>8} {int(s['requests']):>9} {int(s['errors']):>7} "
                    f"{s['rps']:>8.1f} {s['p50_ms']:>8.1f} {s['p95_ms']:>8.1f} {s['p99_ms']:>8.1f} "
                    f"{s['server_cpu_ms']:>9.2f} {s['client_cpu_ms']:>9.2f}"
                )
                if outcome.timing_ms:
                    parts = "  ".join(f"{k} {v:.3f}" for k, v in outcome.timing_ms.items())
                    rest = s["server_cpu_ms"] - sum(outcome.timing_ms.values())
                    print(f"{'':>18} server-timing ms/request: {parts}  (rest of srv cpu {rest:.3f})")
                for kind, count in outcome.error_kinds.items():
                    print(f"{'':>10} error x{count}: {kind}")
                keys = ("p50_ms", "p95_ms", "p99_ms", "rps", "server_cpu_ms", "client_cpu_ms", "errors")
                name = (
                    scenario
                    if (mode, value) == ("closed", args.concurrency)
                    else f"{scenario}@{load.removesuffix('/s')}"
                )
                prefix = "" if server.label == "server" else f"{server.label}/"
                figures |= {f"{prefix}{name}/{key}": float(s[key]) for key in keys}
                results.append(
                    {
                        "server": server.label,
                        "scenario": scenario,
                        "mode": mode,
                        "load": value,
                        **{k: float(v) for k, v in s.items()},
                        "timing_ms": outcome.timing_ms,
                    }
                )
        labels = [server.label for server in servers]
        summary = summarize(results, labels, args.p99_target)
        print(
            f"\nsummary: best closed-loop req/s with p99 <= {args.p99_target:g} ms and no errors; "
            f"open-loop p99 ms; server CPU ms/request (closed-loop mean); ratios to {labels[0]}"
        )
        for row in summary:
            opened = ", ".join(f"p99@{r}/s {v:.1f}" for r, v in row["open_p99_ms"].items())  # type: ignore[union-attr]
            print(
                f"{row['server']:>18} {row['scenario']:>10}: {row['best_rps_at_p99']:.0f} req/s "
                f"(x{row['rps_ratio']:.2f}); {opened or 'no open loop'}; cpu {row['server_cpu_ms']:.2f} ms "
                f"(x{row['cpu_ratio']:.2f})"
            )
        if args.json is not None:
            with atomic_path(args.json) as tmp:
                Path(tmp).write_text(
                    json.dumps(
                        {
                            "args": {k: str(v) for k, v in vars(args).items() if k != "api_key"},
                            "results": results,
                            "summary": summary,
                        },
                        indent=1,
                    )
                )
            print(f"figures written to {args.json}")
        if args.record is not None:
            from recsys.warehouse.runs import RunLog

            log = RunLog(args.record)
            config = {k: str(v) for k, v in vars(args).items() if k != "api_key"}
            run_id = log.start("benchmark", "serving_load", config=config, data_version=None)
            log.finish(run_id, metrics=figures)
            print(f"recorded as run {run_id} in {args.record}")
    finally:
        for server in servers:
            if server.process is not None:
                _stop(server.process)
        if tree is not None:
            _remove_worktree(tree)
        if args.keep_state:
            print(f"server logs and state kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def _soak(
    args: argparse.Namespace,
    url: str,
    bodies: dict[str, list[bytes]],
    headers: dict[str, str],
    process: subprocess.Popen[bytes],
    spool: Path,
) -> None:
    import uvloop

    from recsys.serving.impressions import read_spool

    scenarios = {name: bodies[name] for name in args.scenarios.split(",")}
    print(
        f"soak: {args.concurrency} clients, {' and '.join(scenarios)} in turn, {args.duration:g} s, "
        f"RSS sampled every {args.rss_every:g} s (growth measured from {args.warmup:g} s on)",
        flush=True,
    )
    outcome = uvloop.run(
        run_soak(
            url,
            scenarios,
            concurrency=args.concurrency,
            duration_s=args.duration,
            headers=headers,
            rss=lambda: _process_tree_rss(process.pid),
            rss_every_s=args.rss_every,
        )
    )
    _stop(process)  # SIGTERM: the service closes its impressions logger, which flushes the spool
    if process.returncode not in (0, -signal.SIGTERM):
        print(f"server exited with {process.returncode}")
    logged = read_spool(spool)["request_id"].to_list() if any(spool.glob("part-*.parquet")) else []
    figures = soak_figures(outcome, logged, args.warmup)
    print("RSS samples (s, MiB): " + ", ".join(f"{t:.0f}:{b / 2**20:.0f}" for t, b in outcome.rss_samples))
    print(
        f"errors: {int(figures['errors'])} of {int(figures['requests'])} requests "
        f"({figures['rps']:.1f} answered/s)"
    )
    for kind, count in outcome.error_kinds.items():
        print(f"    error x{count}: {kind}")
    print(
        f"RSS growth: {figures['rss_growth_pct']:+.1f}% ({figures['rss_base_mib']:.0f} MiB at "
        f"{args.warmup:g} s -> {figures['rss_end_mib']:.0f} MiB at the end; "
        f"max {figures['rss_max_mib']:.0f} MiB)"
    )
    print(
        f"impressions: {int(figures['logged'])} request ids logged, "
        f"{int(figures['served'])} responses served "
        f"({int(figures['served_unique'])} distinct ids); missing {int(figures['missing'])}, "
        f"extra {int(figures['extra'])}"
    )
    ok = (
        figures["errors"] == 0
        and figures["rss_growth_pct"] < 10.0
        and figures["missing"] == figures["extra"] == 0
        and figures["served_unique"] == figures["served"]
    )
    print("soak: PASS" if ok else "soak: FAIL")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
