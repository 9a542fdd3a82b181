"""The impressions log: every list the service serves, with the propensity of each shown item.

Serving policy (what the propensities mean; the same definition as ``synthetic.policy``): the served order
is a Plackett-Luce draw over the final scores of the candidate pool with temperature T
(``ServingConfig.policy_temperature``), drawn by Gumbel-top-k with a seed derived from the request id, so a
logged request can be replayed. The propensity of the item at position p is

    exp(s_p / T) / sum over pool items not yet placed at positions 0..p-1 of exp(s / T)

i.e. its probability of being picked at p given the pool and the items above it; the product over a list
is the probability of that ordered list given the pool. With T = 0 the policy is greedy (sorted by score)
and every logged propensity is 1.0 (a deterministic policy: inverse-propensity estimators then have no
support outside the served lists). The pool is what the policy chose from: recommend's candidate pool
(retrieval top-N, re-scored by the ranker if any) or rank's candidate list.

Spool: rows are buffered in memory and written by a background thread as one Parquet file per batch under
``<state dir>/serving/impressions/`` (``part-<utc time>-<pid>-<seq>.parquet``), each written to a hidden
temporary file beside it and renamed, so a reader never sees half a file and several worker processes can
write at once.

The writer is supervised: a failed flush (disk full, directory gone) is logged, counted and retried every
``flush_interval_s`` with the rows kept; ``failure()`` reports the last error until a flush succeeds again
(the service's readiness probe answers 503 with it). Memory stays bounded: ``log()`` never waits for the
writer; a served list that would take the buffer past ``max_buffered_rows`` is dropped and counted
(``dropped_rows``, ``dropped_lists``), as are the oldest rows when rows kept after a failed flush overflow
it. The counters are exported as Prometheus text by ``prometheus()``.

``publish_impressions`` loads the spool into the warehouse table ``serving_impressions`` (the
``<ds>.impressions`` columns plus the serving ones) through ``Warehouse.publish``; the service itself never
opens the warehouse, so it never holds DuckDB's write lock.
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys.core.atomic import atomic_path
from recsys.core.environment import state_dir
from recsys.core.hashing import stable_hash
from recsys.warehouse import TableVersion, Warehouse

SPOOL_GLOB = "part-*.parquet"
log = logging.getLogger(__name__)

SPOOL_SCHEMA = pa.schema(
    [
        ("request_id", pa.int64()),
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("ts", pa.int64()),
        ("position", pa.int32()),
        ("propensity", pa.float64()),
        ("score", pa.float64()),
        ("endpoint", pa.string()),
        ("model_version", pa.string()),
        ("cold_start", pa.string()),
        ("policy_temperature", pa.float64()),
    ]
)

# ``<ds>.impressions`` columns (docs/data-contracts.md); outcomes are unknown at serving time (NULL).
OUTCOME_COLUMNS = {"click": pl.Boolean, "like": pl.Boolean, "dwell": pl.Float64, "p_click": pl.Float64}


def default_spool_dir() -> Path:
    return state_dir() / "serving" / "impressions"


def plackett_luce_order(
    scores: np.ndarray, temperature: float, k: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Draw the served order of ``k`` of the pool's items (see the module docstring).

    scores [C] finite floats; returns (indices into the pool [k], propensities [k]).
    """
    c = scores.shape[0]
    if not 1 <= k <= c:
        raise ValueError(f"k must be in [1, {c}] (the pool size), got {k}")
    if temperature == 0.0:
        order = np.argsort(-scores, kind="stable")[:k]
        return order, np.ones(k, dtype=np.float64)
    logits = scores.astype(np.float64) / temperature
    gumbel = np.random.default_rng(seed).gumbel(size=c)
    keys = logits + gumbel
    order = np.argsort(-keys, kind="stable")[:k]
    weights = np.exp(logits - logits.max())
    picked = weights[order]
    before = np.cumsum(picked) - picked
    remaining = np.maximum(weights.sum() - before, picked)  # guards the subtraction's rounding
    return order, picked / remaining


class ImpressionLogger:
    """Buffers served lists and spools them to Parquet (one file per flush); thread-safe."""

    def __init__(
        self,
        directory: str | Path | None = None,
        *,
        flush_rows: int = 50_000,
        flush_interval_s: float = 2.0,
        max_buffered_rows: int = 500_000,
    ) -> None:
        if flush_rows < 1 or flush_interval_s <= 0 or max_buffered_rows < 1:
            raise ValueError("flush_rows and max_buffered_rows must be >= 1 and flush_interval_s > 0")
        self.directory = Path(directory) if directory is not None else default_spool_dir()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.flush_rows = flush_rows
        self.flush_interval_s = flush_interval_s
        self.max_buffered_rows = max_buffered_rows
        # Counters (read by prometheus() and tests; written under self._lock or by the spool thread only).
        self.rows_written = 0
        self.files_written = 0
        self.flush_errors = 0
        self.dropped_rows = 0
        self.dropped_lists = 0
        self._error: str | None = None  # the last flush error, until a flush succeeds
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._parts: list[dict[str, Any]] = []
        self._rows = 0
        self._seq = 0
        self._stop = threading.Event()
        self._full = threading.Event()  # set by log() when flush_rows are buffered: the thread writes them
        self._warm_up()
        self._thread = threading.Thread(target=self._run, name="impression-spool", daemon=True)
        self._thread.start()

    def log(
        self,
        *,
        request_id: int,
        user_id: int | None,
        ts: int,
        item_ids: np.ndarray,
        scores: np.ndarray,
        propensities: np.ndarray,
        endpoint: str,
        model_version: str,
        cold_start: str | None,
        policy_temperature: float,
    ) -> None:
        """One served list: ``item_ids[p]`` shown at position p with its score and propensity."""
        n = len(item_ids)
        if not (len(scores) == len(propensities) == n):
            raise ValueError("item_ids, scores and propensities must have the same length")
        part = {
            "request_id": request_id,
            "user_id": user_id,
            "ts": ts,
            "item_id": np.asarray(item_ids, dtype=np.int64),
            "score": np.asarray(scores, dtype=np.float64),
            "propensity": np.asarray(propensities, dtype=np.float64),
            "endpoint": endpoint,
            "model_version": model_version,
            "cold_start": cold_start,
            "policy_temperature": float(policy_temperature),
        }
        with self._lock:
            if self._rows + n > self.max_buffered_rows:
                self.dropped_rows += n
                self.dropped_lists += 1
                first = self.dropped_lists == 1
                full = True
            else:
                self._parts.append(part)
                self._rows += n
                full = self._rows >= self.flush_rows
                first = False
        if first:
            log.error(
                "impressions buffer full (%d rows): dropping served lists until the spool writer catches up "
                "(counted in recsys_impressions_dropped_rows_total)",
                self.max_buffered_rows,
            )
        if full:  # written by the spool thread: a request never waits for a Parquet write
            self._full.set()

    def _warm_up(self) -> None:
        """Build (and drop) a one-row table: Arrow's first table build costs ~0.2 s of one-off set-up, which
        would otherwise stall the service at its first flush, under load."""
        one = np.zeros(1)
        self.log(
            request_id=0,
            user_id=None,
            ts=0,
            item_ids=one.astype(np.int64),
            scores=one,
            propensities=one,
            endpoint="warm-up",
            model_version="",
            cold_start=None,
            policy_temperature=1.0,
        )
        with self._lock:
            parts, self._parts, self._rows = self._parts, [], 0
        self._table(parts)

    def _table(self, parts: list[dict[str, Any]]) -> pa.Table:
        sizes = np.fromiter((len(p["item_id"]) for p in parts), dtype=np.int64, count=len(parts))

        owner = pa.array(np.repeat(np.arange(len(parts), dtype=np.int64), sizes))  # row -> its request

        def repeat(key: str, dtype: pa.DataType) -> pa.Array:
            # One value a request, spread over its rows by Arrow's take (C++, GIL released): Python touches
            # requests, not rows, so a flush does not stall the service's event loop.
            return pc.take(pa.array([p[key] for p in parts], type=dtype), owner)

        return pa.table(
            {
                "request_id": repeat("request_id", pa.int64()),
                "user_id": repeat("user_id", pa.int64()),
                "item_id": pa.array(np.concatenate([p["item_id"] for p in parts]), pa.int64()),
                "ts": repeat("ts", pa.int64()),
                "position": pa.array(
                    np.concatenate([np.arange(s, dtype=np.int32) for s in sizes]), pa.int32()
                ),
                "propensity": pa.array(np.concatenate([p["propensity"] for p in parts]), pa.float64()),
                "score": pa.array(np.concatenate([p["score"] for p in parts]), pa.float64()),
                "endpoint": repeat("endpoint", pa.string()),
                "model_version": repeat("model_version", pa.string()),
                "cold_start": repeat("cold_start", pa.string()),
                "policy_temperature": repeat("policy_temperature", pa.float64()),
            },
            schema=SPOOL_SCHEMA,
        )

    def flush(self) -> Path | None:
        """Write everything buffered as one new spool file; its path, or None when nothing was buffered.

        On an error the rows go back to the front of the buffer (the oldest dropped past
        ``max_buffered_rows``), the error is recorded for ``failure()`` and raised."""
        with self._flush_lock:
            with self._lock:
                parts, self._parts, self._rows = self._parts, [], 0
            if not parts:
                return None
            rows = sum(len(p["item_id"]) for p in parts)
            try:
                table = self._table(parts)
                self._seq += 1
                stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
                target = self.directory / f"part-{stamp}-{os.getpid()}-{self._seq:06d}.parquet"
                with atomic_path(target) as tmp:
                    # LZ4: spool files live until they are published into the warehouse, and LZ4 costs half
                    # zstd's CPU (10 vs 21 ms a 50k-row flush) on a box the service shares with its requests.
                    pq.write_table(table, tmp, compression="lz4")
            except Exception as exc:
                self._requeue(parts, rows)
                self.flush_errors += 1
                # The type only: /readyz answers without a key and the message may name paths (logged).
                self._error = f"impressions spool writer failing ({type(exc).__name__}; see the service log)"
                raise
            self.rows_written += rows
            self.files_written += 1
            if self._error is not None:
                log.warning("impressions spool writer recovered: wrote %d rows to %s", rows, target)
            self._error = None
            return target

    def _requeue(self, parts: list[dict[str, Any]], rows: int) -> None:
        with self._lock:
            self._parts = parts + self._parts
            self._rows += rows
            while self._rows > self.max_buffered_rows and self._parts:  # keep the newest rows
                oldest = self._parts.pop(0)
                self._rows -= len(oldest["item_id"])
                self.dropped_rows += len(oldest["item_id"])
                self.dropped_lists += 1

    def failure(self) -> str | None:
        """Why the spool is not being written (None: healthy): the last flush error, or a dead writer."""
        if self._error is not None:
            return self._error
        if not self._thread.is_alive() and not self._stop.is_set():
            return "impressions spool writer thread is not running"
        return None

    @property
    def buffered_rows(self) -> int:
        return self._rows

    def prometheus(self, labels: dict[str, str] | None = None) -> str:
        """The counters in Prometheus text format (``recsys_impressions_*``)."""
        tag = "{" + ",".join(f'{k}="{v}"' for k, v in (labels or {}).items()) + "}" if labels else ""
        series = [
            ("rows_written_total", "counter", "Impression rows written to spool files.", self.rows_written),
            ("files_written_total", "counter", "Spool files written.", self.files_written),
            ("flush_errors_total", "counter", "Failed spool flushes (retried).", self.flush_errors),
            ("dropped_rows_total", "counter", "Impression rows dropped (buffer full).", self.dropped_rows),
            ("dropped_lists_total", "counter", "Served lists dropped (buffer full).", self.dropped_lists),
            ("buffered_rows", "gauge", "Rows waiting for the spool writer.", self._rows),
            (
                "writer_healthy",
                "gauge",
                "1 while the spool is being written, else 0.",
                int(self.failure() is None),
            ),
        ]
        lines = []
        for name, kind, help_text, value in series:
            lines += [
                f"# HELP recsys_impressions_{name} {help_text}",
                f"# TYPE recsys_impressions_{name} {kind}",
                f"recsys_impressions_{name}{tag} {value}",
            ]
        return "\n".join(lines) + "\n"

    def _run(self) -> None:
        while not self._stop.is_set():
            self._full.wait(self.flush_interval_s)
            self._full.clear()
            if self._stop.is_set():
                break
            try:
                self.flush()
            except Exception:  # recorded by flush(); the rows are kept and the next round retries
                log.exception("impressions spool flush failed (%d rows kept, retrying)", self._rows)

    def close(self) -> None:
        """Stop the background thread and write what is left (logged and counted as dropped if that
        last write fails: a shutdown does not wait on a broken disk)."""
        self._stop.set()
        self._full.set()  # wake the thread now, not at the end of its wait
        self._thread.join(timeout=10.0)
        try:
            self.flush()
        except Exception:
            with self._lock:
                lost, self._parts, self._rows = self._rows, [], 0
                self.dropped_rows += lost
            log.exception("impressions spool: the last flush failed at close; %d rows lost", lost)


def spool_files(directory: str | Path | None = None) -> list[Path]:
    """Completed spool files, oldest first (hidden temporary files are never matched)."""
    root = Path(directory) if directory is not None else default_spool_dir()
    return sorted(root.glob(SPOOL_GLOB)) if root.exists() else []


def read_spool(directory: str | Path | None = None) -> pl.DataFrame:
    """All spooled impressions as the ``serving_impressions`` frame (impressions columns first)."""
    files = spool_files(directory)
    frame = (
        pl.from_arrow(pa.concat_tables([pq.read_table(f, schema=SPOOL_SCHEMA) for f in files]))
        if files
        else pl.from_arrow(SPOOL_SCHEMA.empty_table())
    )
    assert isinstance(frame, pl.DataFrame)
    frame = frame.with_columns(pl.lit(None, dtype=t).alias(c) for c, t in OUTCOME_COLUMNS.items())
    first = ["request_id", "user_id", "item_id", "ts", "position", "propensity", *OUTCOME_COLUMNS]
    rest = [c for c in frame.columns if c not in first]
    return frame.select(first + rest).sort(["ts", "request_id", "position"])


def publish_impressions(
    warehouse_path: str | Path,
    directory: str | Path | None = None,
    *,
    table: str = "serving_impressions",
) -> TableVersion:
    """Load the whole spool into ``table`` (replacing it) in one ``Warehouse.publish`` transaction.

    Skipped (the current version returned) when the spool has not changed since the last publish.
    """
    files = spool_files(directory)
    params = {
        "spool": str(Path(directory) if directory is not None else default_spool_dir()),
        "files": len(files),
        "key": stable_hash([(f.name, f.stat().st_size) for f in files]),
    }
    with Warehouse(warehouse_path) as wh:
        # The same key Warehouse.publish records: hash of (inputs, params), inputs being empty here.
        if wh.is_fresh(table, stable_hash({}, params)):
            latest = wh.latest(table)
            assert latest is not None
            return latest
        return wh.publish(table, read_spool(directory), inputs={}, params=params)
