"""Crash recovery: ``kill -9`` the pipeline at seeded random points in every stage, re-run the same command,
and compare with an uninterrupted run.

    python -m recsys.benchmarks.crash_recovery --points 10 --seed 0
    python -m recsys.benchmarks.crash_recovery --points 10 --seed 0 --ephemeral   # a Prefect API per run

What it does, on the tiny synthetic preset (``TINY_CONFIG``, or ``--config`` with PipelineConfig fields):

1. A reference: ``recsys pipeline --config C`` in a fresh state directory (its own ``RECSYS_HOME`` and its
   own system temp dir, ``TMPDIR``), uninterrupted. The wall time of each stage is read off the run's own
   markers (``pipeline on ...`` opens the features stage, ``stage <name>: starting`` each later one).
2. The kill points: every stage gets one, the rest are drawn in proportion to the stages' reference times
   (seeded); each is "``offset`` seconds after the marker of stage S", the offset uniform in 5-95% of S's
   reference time.
3. Every point on a state directory of its own: the same command is started from a fresh state, SIGKILL
   goes to its whole process group (the pipeline, and with ``--ephemeral`` its Prefect server) ``offset``
   seconds after the first marker of S or of a later stage, then the same command runs to the end in that
   directory, which is then checked against the reference. Where each kill landed (the last marker before
   it) is printed. (On one shared directory a re-run would finish the later stages, and their points would
   find nothing left to interrupt.)
4. The checks: the same stages, metrics (every test figure of every model, the distillation figures, the
   A/B readout) and content-addressed model tags as the reference; the same latest content version of
   every table (A/B tables excepted: they carry their experiment id and clock times), each table holding the
   rows its lineage row says; no run left ``running``; and no leftovers: no hidden file or directory (the
   owned ``.*.tmp`` temps, staging directories) anywhere in the state directory, every checkpoint unit
   ``<tag>@<token>`` named by its link, the same set of files as the reference (tokens aside), and nothing
   in the interrupted run's temp dir that the reference's lacks.

Prefect: by default one local API server (``prefect server start``, state in the work dir) serves every
invocation, as in a deployment; it saves the 10-35 s an ephemeral API takes to start on a loaded 2-core
machine per invocation. ``--ephemeral`` gives every invocation its own temporary API, exactly as a bare
``recsys pipeline`` does (and SIGKILL then takes that server down with the pipeline).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

STAGES = ("features", "retrieval", "ranking", "distill", "package", "ab")
REPO_ROOT = Path(__file__).resolve().parents[2]
# The tiny synthetic preset, two retrievers and one ranker: the whole loop in about a minute on 2 cores.
TINY_CONFIG: dict[str, Any] = {
    "dataset": {"kind": "synthetic", "synthetic_preset": "tiny"},
    "retrieval_models": ["popularity", "sasrec"],
    "retrieval_loop": {"max_epochs": 3, "patience": 3, "progress": False},
    "ranking": {
        "models": ["deepfm"],
        "short_len": 20,
        "long_len": 50,
        "data": {"max_train_examples": 4000, "max_valid_examples": 2000, "max_test_examples": 2000},
        "loop": {"monitor": "auc", "mode": "max", "max_epochs": 1, "patience": 1, "progress": False},
    },
    "torch_threads": 1,
}
_TOKEN = re.compile(r"@[0-9a-f]{32}$")


# -- running the command -----------------------------------------------------------------------------------
_CLEANUP = re.compile(r"cleaned up after an interrupted run: (\d+) temp files, (\d+) runs")


def marker_stage(line: str) -> str | None:
    """The stage a pipeline log line opens (``features`` for ``pipeline on``, ``X`` for ``stage X: ...``,
    ``end`` for ``pipeline finished``), or None."""
    if " - pipeline on " in line:
        return "features"
    match = re.search(r" - stage (\w+): (starting|unchanged inputs)", line)
    if match:
        return match[1]
    if " - pipeline finished" in line:
        return "end"
    return None


@dataclass
class PipelineProcess:
    """``recsys pipeline --config C`` in its own process group, its output timestamped line by line."""

    process: subprocess.Popen[bytes]
    log: Path
    started: float
    markers: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time, stage opened)
    cleanup: tuple[int, int] = (0, 0)  # temp files swept and runs marked interrupted at its start
    _reader: threading.Thread | None = None

    @classmethod
    def start(cls, home: Path, tmpdir: Path, config: Path, log: Path, api_url: str | None) -> PipelineProcess:
        home.mkdir(parents=True, exist_ok=True)
        tmpdir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "BENTOML_"))}
        env |= {"RECSYS_HOME": str(home), "TMPDIR": str(tmpdir), "PYTHONUNBUFFERED": "1"}
        if api_url is not None:
            env["PREFECT_API_URL"] = api_url
        process = subprocess.Popen(
            [sys.executable, "-m", "recsys.flows.cli", "pipeline", "--config", str(config)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: SIGKILL reaches every process it started
            cwd=REPO_ROOT,
        )
        run = cls(process, log, time.monotonic())
        run._reader = threading.Thread(target=run._read, daemon=True)
        run._reader.start()
        return run

    def _read(self) -> None:
        assert self.process.stdout is not None
        with open(self.log, "ab") as out:
            for raw in self.process.stdout:
                out.write(raw)
                out.flush()
                line = raw.decode(errors="replace")
                cleaned = _CLEANUP.search(line)
                if cleaned:
                    self.cleanup = (int(cleaned[1]), int(cleaned[2]))
                stage = marker_stage(line)
                if stage is not None:
                    self.markers.append((time.monotonic(), stage))

    def wait_for_stage(self, stage: str, timeout: float) -> float | None:
        """Wait for the first marker of ``stage`` or a later one: its time (None if the process ended)."""
        order = {s: i for i, s in enumerate((*STAGES, "end"))}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, seen in list(self.markers):
                if order[seen] >= order[stage]:
                    return at
            if self.process.poll() is not None:
                return None
            time.sleep(0.02)
        raise TimeoutError(f"no marker of stage {stage} within {timeout:.0f} s; see {self.log}")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=60)
        if self._reader is not None:
            self._reader.join(timeout=10)

    def finish(self, timeout: float) -> int:
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        if self._reader is not None:
            self._reader.join(timeout=10)
        return code

    def stage_times(self) -> dict[str, float]:
        """Seconds each stage took, from its marker to the next one (this run's output)."""
        marks = self.markers
        return {stage: marks[i + 1][0] - at for i, (at, stage) in enumerate(marks[:-1]) if stage in STAGES}

    def landed(self, at: float) -> tuple[str, float]:
        """The stage in progress at monotonic time ``at`` and the seconds since its marker."""
        before = [(t, s) for t, s in self.markers if t <= at]
        if not before:
            return "start-up", at - self.started
        t, stage = before[-1]
        return stage, at - t


def run_to_end(
    home: Path, tmpdir: Path, config: Path, log: Path, api_url: str | None, timeout: float = 1800
) -> PipelineProcess:
    run = PipelineProcess.start(home, tmpdir, config, log, api_url)
    code = run.finish(timeout)
    if code != 0:
        raise RuntimeError(f"pipeline exited {code}; the end of {log}:\n{log.read_text()[-4000:]}")
    return run


@dataclass(frozen=True)
class KillPoint:
    stage: str  # the stage whose marker starts the clock
    offset_s: float  # seconds after that marker


def plan_kill_points(stage_s: dict[str, float], points: int, seed: int) -> list[KillPoint]:
    """One point per stage (as many as ``points`` allows, longest stages first), the rest drawn in
    proportion to the stages' times; offsets uniform in 5-95% of the stage's time. In pipeline order."""
    rng = random.Random(seed)
    stages = [s for s in STAGES if stage_s.get(s, 0.0) > 0.0]
    if not stages:
        raise ValueError("no stage times: the reference run printed no stage markers")
    chosen = sorted(stages, key=lambda s: -stage_s[s])[: min(points, len(stages))]
    chosen += rng.choices(stages, weights=[stage_s[s] for s in stages], k=points - len(chosen))
    plan = [KillPoint(s, round(rng.uniform(0.05, 0.95) * stage_s[s], 2)) for s in chosen]
    return sorted(plan, key=lambda p: (STAGES.index(p.stage), p.offset_s))


@dataclass(frozen=True)
class Kill:
    point: KillPoint
    landed: str  # the stage in progress when the kill was sent ("end" if after the last stage)
    into_s: float  # seconds into that stage
    killed: bool  # False: the command finished before the point came


def kill_at(
    home: Path, tmpdir: Path, config: Path, log: Path, api_url: str | None, point: KillPoint
) -> tuple[Kill, PipelineProcess]:
    """Start the command, SIGKILL its process group at ``point``; where the kill landed, and the run."""
    run = PipelineProcess.start(home, tmpdir, config, log, api_url)
    try:
        marked = run.wait_for_stage(point.stage, timeout=1800)
        if marked is not None:
            time.sleep(max(0.0, marked + point.offset_s - time.monotonic()))
    finally:
        alive = run.process.poll() is None
        at = time.monotonic()
        run.kill()
    stage, into = run.landed(at)
    if not alive and run.process.returncode != 0:
        raise RuntimeError(f"pipeline failed before the kill; the end of {log}:\n{log.read_text()[-4000:]}")
    return Kill(point, stage, round(into, 2), alive), run


# -- comparing state directories ---------------------------------------------------------------------------
def stage_records(home: Path) -> dict[str, dict[str, Any]]:
    """The newest record of each pipeline stage."""
    from recsys.flows.stage_cache import history

    out: dict[str, dict[str, Any]] = {}
    for row in history(home / "warehouse.duckdb"):
        out.setdefault(row["stage"], json.loads(row["result"]))
    return out


def table_versions(home: Path) -> dict[str, str]:
    """Latest content version per table; A/B tables carry their experiment id and clock times (compared
    through the stage's readout instead)."""
    from recsys.warehouse import Warehouse

    with Warehouse(home / "warehouse.duckdb", read_only=True) as wh:
        rows = wh.con.execute(
            "SELECT table_name, arg_max(version, created_at) FROM lineage GROUP BY table_name"
        ).fetchall()
    return {name: v for name, v in rows if not name.split(".")[-1].startswith("ab_")}


def results(home: Path) -> dict[str, Any]:
    """What a re-run must reproduce: every metric and model tag of the stage records."""
    rec = stage_records(home)
    out: dict[str, Any] = {"stages": sorted(rec)}
    if "retrieval" in rec:
        out["retrieval"] = {
            "best": rec["retrieval"]["best"],
            "models": {
                k: {"test": v["test"], "valid_ndcg@10": v["valid_ndcg@10"]}
                for k, v in rec["retrieval"]["models"].items()
            },
        }
    if "ranking" in rec:
        out["ranking"] = {k: v["test"] for k, v in rec["ranking"]["models"].items()}
    if "distill" in rec:
        d = rec["distill"]
        # Not the student checkpoint's sha256: each save stamps its file with a fresh token, so even two
        # uninterrupted runs differ there; the ranker's registered tag (a hash of the tensors) covers it.
        out["distill"] = {
            "auc": d["auc"],
            "flops_ratio": d["flops_ratio"],
            "lift_retained": d["lift_retained"],
            "goal_met": d["goal_met"],
            "student_test": (d.get("student") or {}).get("test"),
        }
    if "package" in rec:
        out["package"] = {k: rec["package"].get(k) for k in ("retriever", "served", "control", "ranker")}
    if "ab" in rec:
        out["ab"] = {"arms": rec["ab"]["arms"], "table": rec["ab"]["table"]}
    return out


def _diff(ref: Any, got: Any, path: str = "") -> list[str]:
    """Where two JSON-like values differ (floats to 1e-9 relative)."""
    if isinstance(ref, dict) and isinstance(got, dict):
        out = [f"{path}/{k}: missing" for k in ref if k not in got]
        out += [f"{path}/{k}: unexpected" for k in got if k not in ref]
        for k in ref:
            if k in got:
                out += _diff(ref[k], got[k], f"{path}/{k}")
        return out
    if isinstance(ref, float) and isinstance(got, float):
        return [] if abs(ref - got) <= 1e-9 * max(1.0, abs(ref)) else [f"{path}: {ref!r} != {got!r}"]
    return [] if ref == got else [f"{path}: {str(ref)[:80]!r} != {str(got)[:80]!r}"]


def _tree(home: Path) -> set[str]:
    """Relative paths under a state directory, checkpoint tokens masked; Prefect's own database and the
    built bentos (BentoML names each build afresh) left out."""
    skip = ("prefect", os.path.join("bentoml", "bentos"))
    out = set()
    for path in home.rglob("*"):
        rel = path.relative_to(home)
        if str(rel).startswith(skip):
            continue
        out.add("/".join(_TOKEN.sub("@<token>", part) for part in rel.parts))
    return out


def leftovers(home: Path) -> list[str]:
    """What an interrupted run left behind: hidden files and directories (owned temps, staging
    directories), checkpoint units their link does not name, a DuckDB write-ahead log."""
    found = []
    for path in home.rglob("*"):
        rel = path.relative_to(home)
        if path.name.startswith("."):
            found.append(f"hidden: {rel}")
        elif "@" in path.name and path.is_dir() and _TOKEN.search(path.name):
            link = path.with_name(path.name.split("@")[0])
            if not (link.is_symlink() and os.readlink(link) == path.name):
                found.append(f"unlinked checkpoint unit: {rel}")
        elif path.suffix == ".wal":
            found.append(f"write-ahead log: {rel}")
    return sorted(found)


def check_rows(home: Path) -> list[str]:
    """Tables whose row count differs from their lineage row; runs left 'running'."""
    from recsys.warehouse import Warehouse
    from recsys.warehouse.runs import RunLog

    problems = []
    with Warehouse(home / "warehouse.duckdb", read_only=True) as wh:
        for table_name, row_count in wh.con.execute(
            "SELECT table_name, arg_max(row_count, created_at) FROM lineage GROUP BY table_name"
        ).fetchall():
            (actual,) = wh.con.execute(f"SELECT count(*) FROM {table_name}").fetchall()[0]
            if actual != row_count:
                problems.append(f"{table_name}: {actual} rows, lineage says {row_count}")
    running = RunLog(home / "warehouse.duckdb").runs().filter(status="running")
    problems += [f"run left running: {r}" for r in running["run_id"].to_list()]
    return problems


def compare(reference: Path, ref_tmp: Path, home: Path, tmpdir: Path) -> dict[str, list[str]]:
    """Every check, by name: the differences found (empty lists: the check holds)."""
    return {
        "metrics and model tags": _diff(results(reference), results(home)),
        "table versions": _diff(table_versions(reference), table_versions(home)),
        "rows and runs": check_rows(home),
        "leftovers in RECSYS_HOME": leftovers(home),
        "files beside the reference's": sorted(
            [f"missing {p}" for p in _tree(reference) - _tree(home)]
            + [f"extra {p}" for p in _tree(home) - _tree(reference)]
        ),
        "leftovers in the temp dir": sorted(
            str(p.relative_to(tmpdir))
            for p in tmpdir.rglob("*")
            if not (ref_tmp / p.relative_to(tmpdir)).exists()
        ),
    }


# -- a Prefect API for every invocation --------------------------------------------------------------------
@contextlib.contextmanager
def prefect_server(state: Path, timeout: float = 300) -> Iterator[str]:
    """``prefect server start`` on a free loopback port with its own state; yields its API URL."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(state), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    prefect = Path(sys.executable).with_name("prefect")
    with open(state / "server.log", "wb") as out:
        process = subprocess.Popen(
            [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"prefect server exited {process.returncode}; see {state / 'server.log'}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefect server not up after {timeout:.0f} s; see {state / 'server.log'}")
            time.sleep(0.3)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


# -- the benchmark -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--points", type=int, default=10, help="Kill points (at least one per stage).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", type=Path, default=None, help="PipelineConfig fields (default: tiny).")
    parser.add_argument("--workdir", type=Path, default=None, help="Default: a fresh temp dir, removed.")
    parser.add_argument("--ephemeral", action="store_true", help="A temporary Prefect API per invocation.")
    parser.add_argument("--keep", action="store_true", help="Keep the work dir (state dirs and logs).")
    args = parser.parse_args(argv)
    if args.points < 1:
        parser.error(f"--points must be >= 1, got {args.points}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="recsys-crash-"))
    work.mkdir(parents=True, exist_ok=True)
    config = work / "pipeline.yaml"
    config.write_text(
        args.config.read_text() if args.config else yaml.safe_dump(TINY_CONFIG, sort_keys=False)
    )
    ref, ref_tmp = work / "reference", work / "reference-tmp"
    for path in (ref, ref_tmp, work / "interrupted-1"):
        if path.exists():
            parser.error(f"{path} exists: give a fresh --workdir")
    started = time.monotonic()
    ok = False
    try:
        with contextlib.ExitStack() as stack:
            api = None if args.ephemeral else stack.enter_context(prefect_server(work / "prefect-server"))
            print(
                f"work dir {work}; Prefect: {'an ephemeral API per run' if api is None else api}", flush=True
            )
            reference = run_to_end(ref, ref_tmp, config, work / "reference.log", api)
            stage_s = reference.stage_times()
            print(
                "reference run: "
                + ", ".join(f"{s} {t:.1f} s" for s, t in stage_s.items())
                + f"; {time.monotonic() - reference.started:.0f} s in all",
                flush=True,
            )
            plan = plan_kill_points(stage_s, args.points, args.seed)
            print(
                f"{'#':>3} {'kill point':>22} {'landed in':>16} {'seconds in':>10}   "
                "(then the same command: temps and runs it cleaned up; differences from the reference)",
                flush=True,
            )
            # Each point on a state directory of its own: killed from a fresh start at its point, then
            # re-run to the end and compared. On one shared directory a re-run finishes the later stages
            # and their points find nothing left to interrupt.
            kills: list[Kill] = []
            problems: dict[str, list[str]] = {}
            for i, point in enumerate(plan, 1):
                home, tmpdir, log = (
                    work / f"interrupted-{i}",
                    work / f"interrupted-{i}-tmp",
                    work / f"run-{i}.log",
                )
                kill, _ = kill_at(home, tmpdir, config, log, api, point)
                kills.append(kill)
                final = run_to_end(home, tmpdir, config, log, api)
                found = compare(ref, ref_tmp, home, tmpdir)
                for check, items in found.items():
                    problems.setdefault(check, []).extend(f"point {i}: {item}" for item in items)
                where = kill.landed if kill.killed else "(finished first)"
                bad = sum(len(v) for v in found.values())
                print(
                    f"{i:>3} {f'{point.stage} +{point.offset_s:.2f} s':>22} {where:>16} {kill.into_s:>10.2f}"
                    f"   {final.cleanup[0]} temps, {final.cleanup[1]} runs; "
                    f"{'identical' if not bad else f'{bad} differences'}",
                    flush=True,
                )
                if not args.keep and not bad:
                    shutil.rmtree(home, ignore_errors=True)
                    shutil.rmtree(tmpdir, ignore_errors=True)
        landed = sorted({k.landed for k in kills if k.killed}, key=lambda s: (*STAGES, "end").index(s))
        print(f"kills that landed: {sum(k.killed for k in kills)} of {len(kills)}; stages hit: {landed}")
        for check in (
            "metrics and model tags",
            "table versions",
            "rows and runs",
            "leftovers in RECSYS_HOME",
        ):
            problems.setdefault(check, [])
        for check, found in problems.items():
            print(f"{check + ':':<32} {'ok' if not found else f'FAIL ({len(found)})'}")
            for item in found[:20]:
                print(f"    {item}")
        missed = sorted(set(stage_s) - set(landed), key=STAGES.index)
        if missed:
            print(f"stages the reference ran that no kill landed in: {missed}")
        ok = not any(problems.values()) and not missed
        print(f"crash recovery: {'PASS' if ok else 'FAIL'} ({time.monotonic() - started:.0f} s)")
    finally:
        if args.keep or not ok:
            print(f"state directories and logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
