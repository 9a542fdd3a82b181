"""The run registry: every training, evaluation, distillation, A/B or benchmark run, with its dataset, config,
data version, code version, hardware and metrics, where the dashboard reads them.

``dataset`` (the warehouse schema the run read, NULL for runs on no dataset such as a serving benchmark) and
``code_version`` (``git:<commit>`` of the checkout, ``+dirty`` with uncommitted changes, else
``package:<version>``) are columns of their own, so runs group by dataset whatever their config looks like.

Each call opens the warehouse briefly and closes it again, because DuckDB lets only one process hold a
read-write handle; a training loop that kept it open would lock the dashboard out for hours.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from recsys.core.hashing import _canonical
from recsys.core.ownership import is_alive, owner_tag
from recsys.warehouse.store import Warehouse

_RUNS_DDL = """
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY,
    kind VARCHAR NOT NULL,
    name VARCHAR NOT NULL,
    status VARCHAR NOT NULL,
    config JSON,
    data_version VARCHAR,
    protocol VARCHAR,
    seed INTEGER,
    hardware VARCHAR,
    started_at TIMESTAMP NOT NULL,
    finished_at TIMESTAMP,
    wall_time_s DOUBLE,
    metrics JSON,
    error VARCHAR,
    dataset VARCHAR,
    code_version VARCHAR
);
-- The process that runs it (pid + start time, recsys.core.ownership): only a gone owner's run is interrupted.
ALTER TABLE runs ADD COLUMN IF NOT EXISTS owner VARCHAR;
CREATE TABLE IF NOT EXISTS run_metrics (
    run_id VARCHAR NOT NULL,
    step BIGINT NOT NULL,
    split VARCHAR NOT NULL,
    name VARCHAR NOT NULL,
    value DOUBLE,
    recorded_at TIMESTAMP NOT NULL
);
-- Warehouses written before these columns existed gain them (NULL for their old runs).
ALTER TABLE runs ADD COLUMN IF NOT EXISTS dataset VARCHAR;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS code_version VARCHAR;
"""

RUN_STATUSES = ("running", "finished", "failed", "interrupted")


def hardware_description() -> str:
    """CPU model and core count, or the GPU name: recorded with every result row (evaluation spec, Cost)."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"GPU {torch.cuda.get_device_name(0)}"
    except ImportError:  # pragma: no cover - torch is a core dependency
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {cpu} x{os.cpu_count()}"


PACKAGE = "recsys-platform"
_REPO = Path(__file__).resolve().parents[2]


@functools.cache
def code_version() -> str:
    """``git:<commit>`` (``+dirty`` when tracked files changed) of the checkout the code runs from, else
    ``package:<installed version>``: what a run's figures can be traced back to."""
    if not (_REPO / "pyproject.toml").is_file():  # an installed package, not a source checkout
        return _package_version()
    try:
        commit = subprocess.run(
            ["git", "-C", str(_REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode == 0 and commit.stdout.strip():
            status = subprocess.run(
                ["git", "-C", str(_REPO), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            dirty = "+dirty" if status.returncode == 0 and status.stdout.strip() else ""
            return f"git:{commit.stdout.strip()}{dirty}"
    except (OSError, subprocess.TimeoutExpired):  # no git binary, or a hung filesystem
        pass
    return _package_version()


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"package:{version(PACKAGE)}"
    except PackageNotFoundError:
        return "package:unknown"


def dataset_of(config: Mapping[str, Any] | Any) -> str | None:
    """The ``dataset`` a run config names: its own ``dataset`` field, else that of a nested section (the
    training loop records ``{"loop": ..., "task": {"dataset": ...}}``); a ``dataset`` that is itself a
    mapping (a dataset spec) gives its ``dataset`` or ``name``."""
    obj = _canonical(config)
    if not isinstance(obj, dict):
        return None
    candidates = [obj] + [v for v in obj.values() if isinstance(v, dict)]
    for section in candidates:
        value = section.get("dataset")
        if isinstance(value, dict):
            value = value.get("dataset") or value.get("name")
        if isinstance(value, str) and value:
            return value
    return None


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class RunLog:
    """Records runs into the warehouse at ``path``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with Warehouse(self.path) as wh:
            wh.con.execute(_RUNS_DDL)

    def start(
        self,
        kind: str,
        name: str,
        *,
        config: Mapping[str, Any] | Any,
        data_version: str | None,
        protocol: str | None = None,
        seed: int | None = None,
        dataset: str | None = None,
    ) -> str:
        """Record a run as 'running' and return its id. ``dataset`` defaults to the one the config names
        (``dataset_of``); a run on no dataset (a benchmark of the service) records NULL."""
        run_id = f"{kind}-{name}-{uuid.uuid4().hex[:12]}"
        if dataset is None:
            dataset = dataset_of(config)
        with Warehouse(self.path) as wh:
            wh.con.execute(
                "INSERT INTO runs (run_id, kind, name, status, config, data_version, protocol, seed,"
                " hardware, dataset, code_version, started_at, owner)"
                " VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    run_id,
                    kind,
                    name,
                    json.dumps(_canonical(config), default=str),
                    data_version,
                    protocol,
                    seed,
                    hardware_description(),
                    dataset,
                    code_version(),
                    _now(),
                    owner_tag(),
                ],
            )
        return run_id

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], *, step: int, split: str) -> None:
        rows = [(run_id, step, split, k, float(v), _now()) for k, v in metrics.items()]
        if not rows:
            return
        with Warehouse(self.path) as wh:
            wh.con.executemany("INSERT INTO run_metrics VALUES (?, ?, ?, ?, ?, ?)", rows)

    def finish(
        self,
        run_id: str,
        *,
        metrics: Mapping[str, Any] | None = None,
        status: str = "finished",
        error: str | None = None,
    ) -> None:
        if status not in RUN_STATUSES:
            raise ValueError(f"status must be one of {RUN_STATUSES}, got {status!r}")
        with Warehouse(self.path) as wh:
            wh.con.execute(
                "UPDATE runs SET status = ?, finished_at = ?, metrics = ?, error = ?,"
                " wall_time_s = date_diff('millisecond', started_at, ?::TIMESTAMP) / 1000.0 WHERE run_id = ?",
                [status, _now(), json.dumps(_canonical(metrics or {}), default=str), error, _now(), run_id],
            )

    def close_orphaned(self) -> list[str]:
        """Mark 'interrupted' the runs left 'running' by a process that is gone; returns their ids.

        A run whose owner still runs (another pipeline, the nightly job, a benchmark) is never touched, so
        any process may call this at any time. Runs recorded before owners were (owner NULL) count as gone.
        """
        with Warehouse(self.path) as wh:
            rows = wh.con.execute("SELECT run_id, owner FROM runs WHERE status = 'running'").fetchall()
        stale = [run_id for run_id, owner in rows if owner is None or not is_alive(owner)]
        for run_id in stale:
            self.finish(run_id, status="interrupted", error="its process ended without finishing it")
        return stale

    def runs(self, kind: str | None = None) -> pl.DataFrame:
        with Warehouse(self.path) as wh:
            if kind is None:
                return wh.sql("SELECT * FROM runs ORDER BY started_at")
            return wh.sql("SELECT * FROM runs WHERE kind = ? ORDER BY started_at", [kind])

    def metrics(self, run_id: str) -> pl.DataFrame:
        with Warehouse(self.path) as wh:
            return wh.sql("SELECT * FROM run_metrics WHERE run_id = ? ORDER BY step, name", [run_id])
