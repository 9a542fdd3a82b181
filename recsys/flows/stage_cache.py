"""Stage-level caching and safety for the pipeline: results keyed on input hashes, one run at a time.

Why not Prefect's own result cache: it writes cache records in place (``LocalFileSystem.write_path`` opens
the target and writes), so a ``kill -9`` in the middle of that write leaves a truncated record that a later
run would trust. Here a stage's result is a small JSON document stored in the warehouse table
``main.pipeline_stages`` in one DuckDB transaction: either the whole record is there or none is, and an
interrupted stage simply runs again. The key is a ``stable_hash`` of the stage's config and the versions of
everything it reads, so a changed config or data version re-runs exactly the stages that depend on it.

``pipeline_lock`` keeps two pipelines from writing the same state directory at once. The clean-up after a
killed process (``recsys.core.ownership.sweep_stale_temps``, ``close_interrupted_runs``) needs no lock: it
removes only the temp files and relabels only the runs whose owning process is gone.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recsys.core.hashing import stable_hash
from recsys.warehouse import Warehouse
from recsys.warehouse.runs import RunLog

TABLE = "main.pipeline_stages"
_DDL = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    stage VARCHAR NOT NULL,
    cache_key VARCHAR NOT NULL,
    result JSON NOT NULL,
    seconds DOUBLE,
    finished_at TIMESTAMP NOT NULL
)
"""


class PipelineBusy(RuntimeError):
    """Another pipeline holds the state directory's lock."""


def stage_key(stage: str, *parts: Any) -> str:
    """The cache key of ``stage`` given everything its result depends on."""
    return stable_hash("pipeline-stage", stage, *parts, length=24)


def lookup(warehouse_path: Path, stage: str, key: str) -> dict[str, Any] | None:
    """The stored result of ``stage`` under ``key``, or None (never run, or interrupted)."""
    if not Path(warehouse_path).exists():
        return None
    with Warehouse(warehouse_path) as wh:
        if not wh.has_table(TABLE):
            return None
        rows = wh.con.execute(
            f"SELECT result FROM {TABLE} WHERE stage = ? AND cache_key = ? ORDER BY finished_at DESC LIMIT 1",
            [stage, key],
        ).fetchall()
    return json.loads(rows[0][0]) if rows else None


def store(warehouse_path: Path, stage: str, key: str, result: dict[str, Any], seconds: float) -> None:
    """Record ``result`` for (stage, key) in one transaction (replacing an older record of the same key)."""
    payload = json.dumps(result, sort_keys=True, default=str)
    with Warehouse(warehouse_path) as wh, wh.transaction() as con:
        con.execute(_DDL)
        con.execute(f"DELETE FROM {TABLE} WHERE stage = ? AND cache_key = ?", [stage, key])
        con.execute(
            f"INSERT INTO {TABLE} VALUES (?, ?, ?, ?, ?)",
            [stage, key, payload, seconds, datetime.now(UTC).replace(tzinfo=None)],
        )


def history(warehouse_path: Path) -> list[dict[str, Any]]:
    """Every stored stage record, newest first (what ``recsys runs`` and the dashboard can show)."""
    with Warehouse(warehouse_path, read_only=True) as wh:
        if not wh.has_table(TABLE):
            return []
        return wh.sql(f"SELECT * FROM {TABLE} ORDER BY finished_at DESC").to_dicts()


def ensure_free(home: Path) -> None:
    """Raise ``PipelineBusy`` now if another pipeline holds ``home``'s lock (the CLI asks before it starts
    Prefect, so a refused second run says so in a second, without a failed flow run's traceback)."""
    with pipeline_lock(home):
        pass


@contextmanager
def pipeline_lock(home: Path) -> Iterator[Path]:
    """Hold an exclusive lock on ``home`` for the pipeline's lifetime; the OS drops it if the process dies."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "pipeline.lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            raise PipelineBusy(
                f"another pipeline (pid {owner}) is running on {home}; wait for it or use another RECSYS_HOME"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield path
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def close_interrupted_runs(warehouse_path: Path) -> int:
    """Mark runs left 'running' by a killed process as 'interrupted'; live runs of other processes stay."""
    if not Path(warehouse_path).exists():
        return 0
    return len(RunLog(warehouse_path).close_orphaned())
