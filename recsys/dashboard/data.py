"""Every warehouse query of the dashboard, as plain typed functions that return Polars frames.

Each function opens the DuckDB file read-only, reads, and closes it before returning: DuckDB lets one process
hold a read-write handle, and a dashboard that kept even a read handle open would block every writer (a
training run's ``RunLog``, a flow's ``publish``). A writer holds its lock for milliseconds at a time, so a
refused open is retried briefly and then reported as ``WarehouseBusy``. A missing file or table is not an
error: the functions return an empty frame with the documented columns, and the pages explain how to
produce the data.

OPEN choices and what was picked:

- Seeds of one configuration: runs are grouped by ``(kind, config.dataset, protocol, data_version, name)``
  with the ``"; seed N"`` part of ``protocol`` removed (the trainers write the seed into it). When a seed was
  run more than once, the most recent run of that seed counts, so a re-run does not weigh twice.
- Final metrics are the numeric leaves of ``runs.metrics`` (nested objects flattened with ``/``; booleans and
  strings skipped). Curves are ``run_metrics`` rows, one series per ``split/name``.
- Slices (metrics on a subset of users or targets) are metric keys
  ``<split>/slice/<dimension>/<bucket>/<metric>`` in ``runs.metrics`` (equally the nested object
  ``{"test": {"slice": {"user_activity": {"1-5": {...}}}}}``),
  e.g. ``test/slice/user_activity/1-5/ndcg@10``, ``test/slice/item_popularity/tail/ndcg@10``,
  ``test/slice/cold_start_items/cold/ndcg@10``; the leaf ``n`` is the number of users or examples in the
  bucket. ``RunLog`` stores metrics with sorted keys, so the recorded order is lost: buckets are ordered by a
  leading number (``1-5``, ``6-20``, ``21+``), then by the usual words (head, torso, tail; cold, warm; low,
  mid, high), then alphabetically. Slice keys are kept out of the plain metric
  list and get their own section.
- Distillation runs (kind ``distill``) are their own kind; the offline page can put a distilled student
  beside the runs of another kind whose group it shares once the ``"; distilled from ..."`` clause that
  ``recsys.training.distillation`` adds is dropped from its protocol (names marked ``(distilled)``).
- Benchmarks (runs of kind ``benchmark``): latency figures are the metric keys whose last ``/`` part is
  ``p<q>``, ``mean`` or ``max``, optionally prefixed ``latency_`` and suffixed ``_ms`` (milliseconds, the
  default) or ``_s`` (seconds, converted); throughput keys are ``req_s``, ``rps``, ``qps`` or
  ``throughput``. What precedes the last ``/`` (or a ``<scenario>_`` prefix) names the scenario, e.g.
  ``{"recommend/p50_ms": 8.1, "recommend/rps": 410.0}`` as ``benchmarks/serving_load.py`` prints them.

A/B results contract
--------------------
The A/B simulator publishes these tables (schema ``main``) with ``Warehouse.publish_many``, one transaction
per experiment batch; every row carries ``experiment_id``. Required columns must be present (the dashboard
names the missing ones otherwise); optional columns are shown when present.

``ab_experiments`` -- one row per experiment:
    experiment_id VARCHAR (req), control VARCHAR (req, the control arm), arms VARCHAR[] (req, every arm,
    control included), design JSON (req, ``{arm: weight}``, the designed traffic split), name VARCHAR,
    run_id VARCHAR (``runs.run_id`` of the simulation run), dataset VARCHAR, alpha DOUBLE (default 0.05),
    n_users BIGINT, started_at TIMESTAMP, finished_at TIMESTAMP, config JSON.
``ab_metrics`` -- per experiment, metric and arm (``simulation.stats.arm_metrics`` plus ``experiment_id``):
    experiment_id, metric VARCHAR, arm VARCHAR, n_users BIGINT, mean DOUBLE, std DOUBLE (all req), se DOUBLE.
``ab_comparisons`` -- per experiment, metric and treatment arm, against the control:
    experiment_id, metric, arm (the treatment arm), lift DOUBLE (relative, ``mean_t / mean_c - 1``), ci_low,
    ci_high (the lift's CI), p_value (Welch) (all req); control, n_control, n_treatment, mean_control,
    mean_treatment, cuped_lift, cuped_ci_low, cuped_ci_high, cuped_p_value (NULL without a covariate),
    variance_reduction (``1 - se_cuped^2 / se_raw^2``).
``ab_sequential`` -- the mSPRT after each look:
    experiment_id, metric, arm, look BIGINT, users BIGINT (arrivals so far, all arms), p_value DOUBLE
    (always valid, non-increasing) (all req); sim_day DOUBLE (simulated days since the start), diff, ci_low,
    ci_high (always-valid CI of ``mean_t - mean_c``; NULL or infinite before the burn-in), naive_p_value
    (the fixed-horizon Welch p recomputed at each look, for contrast).
``ab_srm`` -- the sample-ratio check, one row per arm (experiment-level fields repeated):
    experiment_id, arm, observed BIGINT, expected DOUBLE, p_value DOUBLE, flagged BOOLEAN (all req); chi2,
    threshold.
``ab_off_policy`` -- off-policy estimates of a target policy from the logged data:
    experiment_id, estimator VARCHAR (``ips``, ``snips``, ``dr``), value, ci_low, ci_high (all req); policy
    VARCHAR (the target policy, e.g. the treatment arm), se, ess, n, true_value DOUBLE (the simulator's true
    value of the target policy, NULL for real logs).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from recsys.core.config import PathsConfig
from recsys.warehouse.store import Warehouse

WAREHOUSE_ENV = "RECSYS_WAREHOUSE"
BENCHMARK_KIND = "benchmark"
NO_DATASET = "(none)"
# Offered first in the metric selectbox when present; any other numeric key of runs.metrics is offered too.
DEFAULT_METRICS = (
    "test/ndcg@10",
    "test/auc",
    "valid/ndcg@10",
    "valid/auc",
    "test/hr@10",
    "test/gauc",
    "test/mrr@10",
    "test/logloss",
)


class WarehouseBusy(RuntimeError):
    """Another process kept the warehouse locked for longer than the dashboard waits."""


class ContractError(ValueError):
    """A table the dashboard reads lacks a column its contract requires."""


class ABContractError(ContractError):
    """An A/B table does not follow the contract in this module's docstring."""


def default_warehouse_path() -> Path:
    """``RECSYS_WAREHOUSE`` when set, else ``PathsConfig().warehouse`` (``$RECSYS_HOME/warehouse.duckdb``)."""
    env = os.environ.get(WAREHOUSE_ENV)
    return Path(env).expanduser() if env else PathsConfig().warehouse


# How long a refused open is retried before the page says the warehouse is busy (about 2 s in all).
LOCK_ATTEMPTS = 8
LOCK_WAIT_S = 0.25


@contextmanager
def _open(path: str | Path) -> Iterator[Warehouse | None]:
    """A read-only handle, or None when the file does not exist; closed on exit."""
    path = Path(path)
    attempts = LOCK_ATTEMPTS
    if not path.is_file():
        yield None
        return
    wh: Warehouse | None = None
    for attempt in range(attempts):
        try:
            wh = Warehouse(path, read_only=True, lock_wait_s=0.0)  # its own short retries below
            break
        except (duckdb.IOException, duckdb.ConnectionException) as exc:
            # A writer's lock ("Could not set lock"), or this process holding it read-write.
            text = str(exc)
            if "lock" not in text.lower() and "different configuration" not in text:
                raise
            if attempt == attempts - 1:
                raise WarehouseBusy(
                    f"the warehouse {path} is locked by a process writing to it ({text.splitlines()[0]}); "
                    "reload in a moment"
                ) from exc
            time.sleep(LOCK_WAIT_S)
    assert wh is not None
    try:
        yield wh
    finally:
        wh.close()


def _tables(wh: Warehouse) -> set[str]:
    rows = wh.con.execute("SELECT table_schema, table_name FROM information_schema.tables").fetchall()
    return {name if schema == "main" else f"{schema}.{name}" for schema, name in rows}


@dataclass(frozen=True)
class WarehouseStatus:
    path: Path
    exists: bool
    tables: tuple[str, ...]


def warehouse_status(path: str | Path) -> WarehouseStatus:
    """Whether the file exists and which tables it holds (``schema.table``, ``main`` tables bare)."""
    with _open(path) as wh:
        if wh is None:
            return WarehouseStatus(Path(path), False, ())
        return WarehouseStatus(Path(path), True, tuple(sorted(_tables(wh))))


# Tables written outside ``Warehouse.publish`` (so without a lineage version): their row count and newest
# timestamp stand in for a version.
_UNVERSIONED_STAMPS = {
    "runs": "count(*)::VARCHAR || '@' || coalesce(greatest(max(started_at), max(finished_at))::VARCHAR, '')",
    "run_metrics": "count(*)::VARCHAR || '@' || coalesce(max(recorded_at)::VARCHAR, '')",
    "pipeline_stages": "count(*)::VARCHAR || '@' || coalesce(max(finished_at)::VARCHAR, '')",
}


def table_versions(path: str | Path) -> tuple[tuple[str, str], ...]:
    """``(table, version)`` of every table the dashboard reads: the current lineage version of each
    published table, and a count-and-newest-time stamp of the run registry tables, which ``RunLog`` writes
    row by row. Equal tuples mean equal contents, so the pages' caches are keyed on it; empty for a
    missing file."""
    with _open(path) as wh:
        if wh is None:
            return ()
        tables = _tables(wh)
        out: list[tuple[str, str]] = []
        if "lineage" in tables:
            rows = wh.con.execute(
                "SELECT table_name, arg_max(version, created_at) FROM lineage GROUP BY table_name"
                " ORDER BY table_name"
            ).fetchall()
            out += [(str(t), str(v)) for t, v in rows]
        for table, stamp in _UNVERSIONED_STAMPS.items():
            if table in tables:
                (value,) = wh.con.execute(f"SELECT {stamp} FROM {table}").fetchall()[0]
                out.append((table, str(value)))
    return tuple(out)


# ----------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------

RUNS_SCHEMA: dict[str, pl.DataType] = {
    "run_id": pl.String(),
    "kind": pl.String(),
    "name": pl.String(),
    "status": pl.String(),
    "dataset": pl.String(),
    "seed": pl.Int32(),
    "data_version": pl.String(),
    "protocol": pl.String(),
    "hardware": pl.String(),
    "code_version": pl.String(),
    "started_at": pl.Datetime("us"),
    "finished_at": pl.Datetime("us"),
    "wall_time_s": pl.Float64(),
    "config": pl.String(),
    "metrics": pl.String(),
    "error": pl.String(),
}

# Where runs recorded before ``runs.dataset`` existed name their dataset in the config: at the top, under the
# training loop's ``task`` section, or under an experiment's ``experiment`` section.
_CONFIG_DATASET_PATHS = ("$.dataset", "$.task.dataset", "$.experiment.dataset")


def _empty(schema: dict[str, pl.DataType]) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


def list_runs(
    path: str | Path,
    *,
    kinds: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    statuses: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
) -> pl.DataFrame:
    """Every recorded run, newest first, with its ``dataset`` (the ``runs.dataset`` column that ``RunLog``
    records; for runs recorded before it existed, the dataset their config names; ``NO_DATASET`` for a run
    on none) and ``code_version``. A filter left at None (or empty) keeps everything."""
    with _open(path) as wh:
        if wh is None or "runs" not in _tables(wh):
            return _empty(RUNS_SCHEMA)
        present = {row[0] for row in wh.con.execute("DESCRIBE runs").fetchall()}
        from_config = ", ".join(f"json_extract_string(config, '{p}')" for p in _CONFIG_DATASET_PATHS)
        recorded = "dataset, " if "dataset" in present else ""
        code = "code_version" if "code_version" in present else "NULL::VARCHAR"
        frame = wh.sql(
            f"""
            SELECT run_id, kind, name, status,
                   coalesce({recorded}{from_config}, '{NO_DATASET}') AS dataset,
                   seed, data_version, protocol, hardware, {code} AS code_version, started_at, finished_at,
                   wall_time_s, config::VARCHAR AS config, metrics::VARCHAR AS metrics, error
            FROM runs ORDER BY started_at DESC, run_id
            """
        )
    frame = frame.cast(RUNS_SCHEMA)  # type: ignore[arg-type]
    for column, wanted in (("kind", kinds), ("name", names), ("status", statuses), ("dataset", datasets)):
        if wanted:
            frame = frame.filter(pl.col(column).is_in(list(wanted)))
    return frame


def flatten_metrics(text: str | None) -> dict[str, float]:
    """The finite numeric leaves of a metrics JSON object, nested keys joined by ``/``."""
    if not text:
        return {}
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return {}
    out: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[prefix] = float(value)

    walk("", obj)
    return out


def run_metrics(path: str | Path, run_ids: Sequence[str]) -> pl.DataFrame:
    """``run_metrics`` rows of these runs with the run's name and seed, a ``series`` (``split/name``) and a
    ``label`` naming the run (``name · seed s · id-suffix``), ordered by run and step."""
    schema: dict[str, pl.DataType] = {
        "run_id": pl.String(),
        "label": pl.String(),
        "name": pl.String(),
        "seed": pl.Int32(),
        "step": pl.Int64(),
        "split": pl.String(),
        "metric": pl.String(),
        "series": pl.String(),
        "value": pl.Float64(),
    }
    ids = list(run_ids)
    with _open(path) as wh:
        if wh is None or not ids or not {"runs", "run_metrics"} <= _tables(wh):
            return _empty(schema)
        frame = wh.sql(
            """
            SELECT m.run_id, r.name || ' · seed ' || coalesce(r.seed::VARCHAR, '?') || ' · '
                       || right(m.run_id, 6) AS label,
                   r.name, r.seed, m.step, m.split, m.name AS metric, m.split || '/' || m.name AS series,
                   m.value
            FROM run_metrics m JOIN runs r USING (run_id)
            WHERE m.run_id IN (SELECT unnest(?::VARCHAR[]))
            ORDER BY m.run_id, m.step, m.split, m.name
            """,
            [ids],
        )
    return frame.cast(schema)  # type: ignore[arg-type]


def protocol_group(protocol: str | None) -> str:
    """The protocol without its seed (``"...; history 200; seed 3"`` -> ``"...; history 200"``)."""
    if not protocol:
        return ""
    return re.sub(r"\s*;?\s*\bseed\s*[=:]?\s*-?\d+\s*", "", protocol).strip(" ;")


FINAL_SCHEMA: dict[str, pl.DataType] = {
    "run_id": pl.String(),
    "kind": pl.String(),
    "name": pl.String(),
    "dataset": pl.String(),
    "protocol": pl.String(),
    "data_version": pl.String(),
    "group": pl.String(),
    "seed": pl.Int32(),
    "started_at": pl.Datetime("us"),
    "metric": pl.String(),
    "value": pl.Float64(),
}


def group_label(dataset: str | None, protocol: str | None, data_version: str | None) -> str:
    """``"dataset · protocol · data <version>"``: the runs that share it are comparable."""
    return " · ".join(
        part for part in (dataset, protocol or "protocol not recorded", f"data {data_version or '?'}") if part
    )


def final_metrics(
    path: str | Path, *, kinds: Sequence[str] | None = None, statuses: Sequence[str] = ("finished",)
) -> pl.DataFrame:
    """Long frame of every run's final numeric metrics (one row per run and metric key).

    ``protocol`` has the seed removed and ``group`` = ``"dataset · protocol · data <version>"`` names the
    runs that are comparable. For a seed run more than once in a group, only its latest run is kept.
    """
    runs = list_runs(path, kinds=kinds, statuses=list(statuses) or None)
    records: list[dict[str, Any]] = []
    for row in runs.iter_rows(named=True):
        proto = protocol_group(row["protocol"])
        group = group_label(row["dataset"], proto, row["data_version"])
        for metric, value in flatten_metrics(row["metrics"]).items():
            records.append(
                {
                    "run_id": row["run_id"],
                    "kind": row["kind"],
                    "name": row["name"],
                    "dataset": row["dataset"],
                    "protocol": proto,
                    "data_version": row["data_version"],
                    "group": group,
                    "seed": row["seed"],
                    "started_at": row["started_at"],
                    "metric": metric,
                    "value": value,
                }
            )
    if not records:
        return _empty(FINAL_SCHEMA)
    frame = pl.DataFrame(records, schema=FINAL_SCHEMA)
    # A run without a seed stands for itself; a repeated seed keeps its latest run.
    seed_key = pl.coalesce(pl.col("seed").cast(pl.String), pl.col("run_id"))
    return (
        frame.with_columns(seed_key.alias("_seed_key"))
        .sort("started_at", "run_id")
        .unique(["kind", "group", "name", "_seed_key", "metric"], keep="last", maintain_order=True)
        .drop("_seed_key")
        .sort("kind", "group", "name", "seed", "metric")
    )


def metric_names(final: pl.DataFrame, kind: str | None = None) -> list[str]:
    """The metric keys present (for one kind), the ``DEFAULT_METRICS`` that exist first, then the rest; slice
    keys (``.../slice/...``) are left out (see ``slice_metrics``)."""
    if kind is not None:
        final = final.filter(pl.col("kind") == kind)
    present = {m for m in final["metric"].unique().to_list() if parse_slice_key(m) is None}
    first = [m for m in DEFAULT_METRICS if m in present]
    return first + sorted(present - set(first))


def summarise(final: pl.DataFrame, metric: str) -> pl.DataFrame:
    """Mean and standard deviation (ddof = 1; 0 for a single seed) of ``metric`` across seeds, per kind, group
    and model ``name``, with ``n_seeds`` and the bounds ``lo = mean - std``, ``hi = mean + std``."""
    rows = final.filter(pl.col("metric") == metric)
    return (
        rows.group_by("kind", "group", "dataset", "protocol", "data_version", "name")
        .agg(
            pl.len().cast(pl.Int64).alias("n_seeds"),
            pl.col("value").mean().alias("mean"),
            pl.col("value").std(ddof=1).fill_null(0.0).alias("std"),
            pl.col("value").min().alias("min"),
            pl.col("value").max().alias("max"),
            pl.col("seed").sort().alias("seeds"),
        )
        .with_columns(
            (pl.col("mean") - pl.col("std")).alias("lo"), (pl.col("mean") + pl.col("std")).alias("hi")
        )
        .sort("kind", "group", "name")
    )


SLICE_MARKERS = ("slice", "slices")
SLICE_COUNT = "n"  # the slice leaf holding the bucket's number of users or examples

SLICE_SUMMARY_SCHEMA: dict[str, pl.DataType] = {
    "group": pl.String(),
    "name": pl.String(),
    "bucket": pl.String(),
    "bucket_order": pl.Int32(),
    "n_seeds": pl.Int64(),
    "mean": pl.Float64(),
    "std": pl.Float64(),
    "lo": pl.Float64(),
    "hi": pl.Float64(),
    "n": pl.Float64(),
}


def parse_slice_key(key: str) -> tuple[str, str, str, str] | None:
    """``(split, dimension, bucket, metric)`` of ``<split>/slice/<dimension>/<bucket>/<metric>`` (the split
    may be empty or hold ``/``), or None for any other key."""
    parts = key.split("/")
    if len(parts) < 4 or parts[-4] not in SLICE_MARKERS or not all(parts[-3:]):
        return None
    return "/".join(parts[:-4]), parts[-3], parts[-2], parts[-1]


_BUCKET_WORDS = {
    w: i
    for group in (("head", "torso", "tail"), ("cold", "warm", "hot"), ("low", "mid", "medium", "high"))
    for i, w in enumerate(group)
}
_LEADING_NUMBER = re.compile(r"^[<>=≤≥~]*\s*(-?\d+(?:\.\d+)?)")


def bucket_sort_key(bucket: str) -> tuple[int, float, str]:
    """Numbered buckets first, by their leading number (``<5`` < ``5-20`` < ``21+``), then the usual words
    in their natural order, then the rest alphabetically."""
    if m := _LEADING_NUMBER.match(bucket):
        # "<5" sorts just before "5-20": a bound below a number comes before the number itself.
        return 0, float(m[1]) - (0.5 if bucket.startswith(("<", "≤")) else 0.0), bucket
    word = bucket.lower().split("_")[0].split("-")[0]
    if word in _BUCKET_WORDS:
        return 1, float(_BUCKET_WORDS[word]), bucket
    return 2, 0.0, bucket


def slice_metrics(final: pl.DataFrame) -> pl.DataFrame:
    """The slice rows of a ``final_metrics`` frame, the key split into ``split``, ``dimension``, ``bucket``
    and ``metric``, with ``bucket_order`` (the bucket's rank by ``bucket_sort_key`` within its dimension)."""
    parsed = {k: parse_slice_key(k) for k in final["metric"].unique().to_list()}
    keys = {k: v for k, v in parsed.items() if v is not None}
    mapping = pl.DataFrame(
        {
            "key": list(keys),
            "split": [v[0] for v in keys.values()],
            "dimension": [v[1] for v in keys.values()],
            "bucket": [v[2] for v in keys.values()],
            "slice_metric": [v[3] for v in keys.values()],
        },
        schema={
            "key": pl.String,
            "split": pl.String,
            "dimension": pl.String,
            "bucket": pl.String,
            "slice_metric": pl.String,
        },
    )
    ranks = {
        (dim, bucket): rank
        for dim in {v[1] for v in keys.values()}
        for rank, bucket in enumerate(
            sorted({v[2] for v in keys.values() if v[1] == dim}, key=bucket_sort_key)
        )
    }
    order = pl.DataFrame(
        {
            "dimension": [d for d, _ in ranks],
            "bucket": [b for _, b in ranks],
            "bucket_order": list(ranks.values()),
        },
        schema={"dimension": pl.String, "bucket": pl.String, "bucket_order": pl.Int32},
    )
    rows = (
        final.rename({"metric": "key"})
        .join(mapping, on="key", how="inner")
        .drop("key")
        .rename({"slice_metric": "metric"})
    )
    return rows.join(order, on=["dimension", "bucket"], how="left").sort(
        "kind", "group", "split", "dimension", "bucket_order", "name", "seed"
    )


def slice_metric_names(slices: pl.DataFrame, split: str, dimension: str) -> list[str]:
    """The metrics recorded on one slice dimension, the leaves of ``DEFAULT_METRICS`` first, bucket sizes
    (``n``) left out."""
    rows = slices.filter((pl.col("split") == split) & (pl.col("dimension") == dimension))
    present = set(rows["metric"].unique().to_list()) - {SLICE_COUNT}
    first = list(dict.fromkeys(m.split("/")[-1] for m in DEFAULT_METRICS if m.split("/")[-1] in present))
    return first + sorted(present - set(first))


def summarise_slices(slices: pl.DataFrame, split: str, dimension: str, metric: str) -> pl.DataFrame:
    """Mean and standard deviation across seeds (as ``summarise``) of ``metric`` per group, model and bucket
    of one slice dimension, with ``n`` = the mean bucket size where the runs recorded it (else null)."""
    of_dim = slices.filter((pl.col("split") == split) & (pl.col("dimension") == dimension))
    rows = of_dim.filter(pl.col("metric") == metric)
    if rows.is_empty():
        return _empty(SLICE_SUMMARY_SCHEMA)
    sizes = (
        of_dim.filter(pl.col("metric") == SLICE_COUNT)
        .group_by("group", "name", "bucket")
        .agg(pl.col("value").mean().alias("n"))
    )
    summary = (
        rows.group_by("group", "name", "bucket")
        .agg(
            pl.col("bucket_order").min(),
            pl.len().cast(pl.Int64).alias("n_seeds"),
            pl.col("value").mean().alias("mean"),
            pl.col("value").std(ddof=1).fill_null(0.0).alias("std"),
        )
        .with_columns(
            (pl.col("mean") - pl.col("std")).alias("lo"), (pl.col("mean") + pl.col("std")).alias("hi")
        )
        .join(sizes, on=["group", "name", "bucket"], how="left")
    )
    return (
        summary.select(list(SLICE_SUMMARY_SCHEMA))
        .cast(SLICE_SUMMARY_SCHEMA)
        .sort(  # type: ignore[arg-type]
            "group", "bucket_order", "name"
        )
    )


DISTILL_KIND = "distill"
DISTILLED_SUFFIX = " (distilled)"


# The clause ``training.distillation`` appends to a distilled student's protocol; without it the student's
# protocol is the one of the runs trained on the same split without a teacher.
_DISTILL_CLAUSE = re.compile(r"\s*;\s*distilled from\b.*$")


def with_distilled(final: pl.DataFrame, kind: str) -> pl.DataFrame:
    """The rows of ``kind`` plus the distillation runs (kind ``distill``) that fit one of its comparable
    groups once the distillation clause (``"; distilled from teacher scores ..."``) is dropped from their
    protocol, so a distilled student sits beside the same student trained without a teacher. Their names
    are marked ``(distilled)`` unless they already say so."""
    own = final.filter(pl.col("kind") == kind)
    students = final.filter(pl.col("kind") == DISTILL_KIND)
    if students.is_empty():
        return own
    protocol = [_DISTILL_CLAUSE.sub("", p or "") for p in students["protocol"].to_list()]
    students = students.with_columns(
        pl.Series("protocol", protocol, dtype=pl.String),
        pl.Series(
            "group",
            [
                group_label(d, p, v)
                for d, p, v in zip(students["dataset"], protocol, students["data_version"], strict=True)
            ],
            dtype=pl.String,
        ),
        pl.when(pl.col("name").str.contains("(?i)distil"))
        .then(pl.col("name"))
        .otherwise(pl.col("name") + DISTILLED_SUFFIX)
        .alias("name"),
    ).filter(pl.col("group").is_in(own["group"].unique().to_list()))
    return pl.concat([own, students])


def default_curve_series(series: Sequence[str], metric: str | None = None) -> str | None:
    """The curve to show first: ``valid/<leaf of metric>`` when recorded, else a validation series, else the
    first one."""
    if not series:
        return None
    if metric:
        leaf = metric.split("/")[-1]
        if f"valid/{leaf}" in series:
            return f"valid/{leaf}"
    valid = [s for s in series if s.startswith("valid/")]
    return valid[0] if valid else series[0]


# ----------------------------------------------------------------------------------------------------------
# Lineage
# ----------------------------------------------------------------------------------------------------------

LINEAGE_SCHEMA: dict[str, pl.DataType] = {
    "table_name": pl.String(),
    "version": pl.String(),
    "input_key": pl.String(),
    "row_count": pl.Int64(),
    "created_at": pl.Datetime("us"),
    "n_versions": pl.Int64(),
    "inputs": pl.String(),
    "params": pl.String(),
}


def lineage(path: str | Path, *, version: str | None = None) -> pl.DataFrame:
    """The current version of every published table (with how many versions it has had), or, given
    ``version``, every lineage row with that content version (the tables a run's ``data_version`` names)."""
    with _open(path) as wh:
        if wh is None or "lineage" not in _tables(wh):
            return _empty(LINEAGE_SCHEMA)
        select = (
            "SELECT table_name, version, input_key, row_count, created_at,"
            " count(*) OVER (PARTITION BY table_name) AS n_versions, inputs::VARCHAR AS inputs,"
            " params::VARCHAR AS params FROM lineage"
        )
        if version is None:
            frame = wh.sql(
                f"{select} QUALIFY row_number() OVER (PARTITION BY table_name"
                " ORDER BY created_at DESC, rowid DESC) = 1 ORDER BY table_name"
            )
        else:
            frame = wh.sql(f"SELECT * FROM ({select}) WHERE version = ? ORDER BY created_at DESC", [version])
    return frame.cast(LINEAGE_SCHEMA)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------
# Serving benchmarks
# ----------------------------------------------------------------------------------------------------------

BENCHMARK_SCHEMA: dict[str, pl.DataType] = {
    "run_id": pl.String(),
    "name": pl.String(),
    "label": pl.String(),
    "status": pl.String(),
    "started_at": pl.Datetime("us"),
    "hardware": pl.String(),
    "scenario": pl.String(),
    "measure": pl.String(),  # "latency" (value in ms) or "throughput" (requests per second)
    "stat": pl.String(),  # p50, p95, p99, mean, max (latency) or req_s (throughput)
    "value": pl.Float64(),
}

_LATENCY = re.compile(
    r"^(?:(?P<scenario>.+?)_)??(?:latency_)?(?P<stat>p\d+(?:\.\d+)?|mean|max)(?P<unit>_ms|_s)?$"
)
_THROUGHPUT = re.compile(r"^(?:(?P<scenario>.+?)_)??(?P<stat>req_s|rps|qps|throughput(?:_rps)?)$")


def parse_benchmark_key(key: str) -> tuple[str, str, str, float] | None:
    """``(scenario, measure, stat, scale)`` of a benchmark metric key, or None when it is neither a latency
    nor a throughput figure; ``scale`` converts the value to milliseconds (latency) or requests/s."""
    prefix, _, leaf = key.rpartition("/")
    if m := _LATENCY.match(leaf):
        scenario = "/".join(p for p in (prefix, m["scenario"] or "") if p) or "all"
        return scenario, "latency", m["stat"], 1000.0 if m["unit"] == "_s" else 1.0
    if m := _THROUGHPUT.match(leaf):
        scenario = "/".join(p for p in (prefix, m["scenario"] or "") if p) or "all"
        return scenario, "throughput", "req_s", 1.0
    return None


def benchmark_figures(path: str | Path) -> pl.DataFrame:
    """Latency percentiles (ms) and throughput (req/s) of every ``benchmark`` run, one row per figure."""
    runs = list_runs(path, kinds=[BENCHMARK_KIND])
    records: list[dict[str, Any]] = []
    for row in runs.iter_rows(named=True):
        label = f"{row['name']} · {row['started_at']:%Y-%m-%d %H:%M} · {row['run_id'][-6:]}"
        for key, value in flatten_metrics(row["metrics"]).items():
            parsed = parse_benchmark_key(key)
            if parsed is None:
                continue
            scenario, measure, stat, scale = parsed
            records.append(
                {
                    "run_id": row["run_id"],
                    "name": row["name"],
                    "label": label,
                    "status": row["status"],
                    "started_at": row["started_at"],
                    "hardware": row["hardware"],
                    "scenario": scenario,
                    "measure": measure,
                    "stat": stat,
                    "value": value * scale,
                }
            )
    if not records:
        return _empty(BENCHMARK_SCHEMA)
    return pl.DataFrame(records, schema=BENCHMARK_SCHEMA).sort("started_at", "scenario", "stat")


# ----------------------------------------------------------------------------------------------------------
# A/B results (contract in the module docstring)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # DuckDB type
    required: bool
    meaning: str


def _c(name: str, type_: str, meaning: str, required: bool = False) -> Column:
    return Column(name, type_, required, meaning)


_EID = _c("experiment_id", "VARCHAR", "the experiment", True)
AB_CONTRACT: dict[str, tuple[Column, ...]] = {
    "ab_experiments": (
        _EID,
        _c("control", "VARCHAR", "the control arm", True),
        _c("arms", "VARCHAR[]", "every arm, control included", True),
        _c("design", "JSON", "designed traffic split {arm: weight}", True),
        _c("name", "VARCHAR", "a readable name"),
        _c("run_id", "VARCHAR", "runs.run_id of the simulation run"),
        _c("dataset", "VARCHAR", "the dataset simulated"),
        _c("alpha", "DOUBLE", "significance level of tests and CIs (0.05 when absent)"),
        _c("n_users", "BIGINT", "users in the experiment"),
        _c("started_at", "TIMESTAMP", "when the simulation started"),
        _c("finished_at", "TIMESTAMP", "when it finished"),
        _c("config", "JSON", "the simulator's config"),
    ),
    "ab_metrics": (
        _EID,
        _c("metric", "VARCHAR", "per-user metric (ctr, clicks, dwell, ...)", True),
        _c("arm", "VARCHAR", "the arm", True),
        _c("n_users", "BIGINT", "users of the arm", True),
        _c("mean", "DOUBLE", "mean of the per-user metric", True),
        _c("std", "DOUBLE", "its standard deviation (ddof = 1)", True),
        _c("se", "DOUBLE", "standard error of the mean"),
    ),
    "ab_comparisons": (
        _EID,
        _c("metric", "VARCHAR", "the metric", True),
        _c("arm", "VARCHAR", "the treatment arm compared with the control", True),
        _c("lift", "DOUBLE", "relative lift mean_t / mean_c - 1 (Welch, unadjusted)", True),
        _c("ci_low", "DOUBLE", "lower bound of the lift's CI", True),
        _c("ci_high", "DOUBLE", "upper bound of the lift's CI", True),
        _c("p_value", "DOUBLE", "Welch two-sided p-value", True),
        _c("control", "VARCHAR", "the control arm"),
        _c("n_control", "BIGINT", "users in control"),
        _c("n_treatment", "BIGINT", "users in the treatment arm"),
        _c("mean_control", "DOUBLE", "control mean"),
        _c("mean_treatment", "DOUBLE", "treatment mean"),
        _c("cuped_lift", "DOUBLE", "CUPED-adjusted relative lift (NULL without a covariate)"),
        _c("cuped_ci_low", "DOUBLE", "its CI, lower"),
        _c("cuped_ci_high", "DOUBLE", "its CI, upper"),
        _c("cuped_p_value", "DOUBLE", "CUPED Welch p-value"),
        _c("variance_reduction", "DOUBLE", "1 - se_cuped^2 / se_raw^2"),
    ),
    "ab_sequential": (
        _EID,
        _c("metric", "VARCHAR", "the metric", True),
        _c("arm", "VARCHAR", "the treatment arm", True),
        _c("look", "BIGINT", "0-based look index", True),
        _c("users", "BIGINT", "users arrived so far (all arms)", True),
        _c("p_value", "DOUBLE", "always-valid mSPRT p-value (non-increasing)", True),
        _c("sim_day", "DOUBLE", "simulated days since the start"),
        _c("diff", "DOUBLE", "mean_t - mean_c at this look"),
        _c("ci_low", "DOUBLE", "always-valid CI of the difference, lower (NULL/-inf before burn-in)"),
        _c("ci_high", "DOUBLE", "upper"),
        _c("naive_p_value", "DOUBLE", "fixed-horizon Welch p recomputed at each look (not valid)"),
    ),
    "ab_srm": (
        _EID,
        _c("arm", "VARCHAR", "the arm", True),
        _c("observed", "BIGINT", "users observed in the arm", True),
        _c("expected", "DOUBLE", "users the design expects", True),
        _c("p_value", "DOUBLE", "chi-square p-value of the whole split", True),
        _c("flagged", "BOOLEAN", "p_value < threshold", True),
        _c("chi2", "DOUBLE", "chi-square statistic"),
        _c("threshold", "DOUBLE", "the flagging threshold (0.001)"),
    ),
    "ab_off_policy": (
        _EID,
        _c("estimator", "VARCHAR", "ips, snips or dr", True),
        _c("value", "DOUBLE", "estimated value of the target policy (reward per logged slot)", True),
        _c("ci_low", "DOUBLE", "CI lower", True),
        _c("ci_high", "DOUBLE", "CI upper", True),
        _c("policy", "VARCHAR", "the target policy (e.g. the treatment arm)"),
        _c("se", "DOUBLE", "standard error"),
        _c("ess", "DOUBLE", "Kish effective sample size"),
        _c("n", "BIGINT", "logged rows"),
        _c("true_value", "DOUBLE", "the simulator's true value of the policy (NULL for real logs)"),
    ),
}

_POLARS_TYPES: dict[str, pl.DataType] = {
    "VARCHAR": pl.String(),
    "JSON": pl.String(),
    "DOUBLE": pl.Float64(),
    "BIGINT": pl.Int64(),
    "INTEGER": pl.Int32(),
    "BOOLEAN": pl.Boolean(),
    "TIMESTAMP": pl.Datetime("us"),
    "VARCHAR[]": pl.List(pl.String()),
}


def _contract_markdown(table: str, columns: Sequence[Column]) -> str:
    """One table's contract as a bold name and a Markdown table of its columns."""
    lines = [f"**`{table}`**", "", "| column | type | required | meaning |", "|---|---|---|---|"]
    lines += [f"| {c.name} | {c.type} | {'yes' if c.required else ''} | {c.meaning} |" for c in columns]
    return "\n".join(lines)


def ab_contract_markdown() -> str:
    """The A/B table contract as Markdown tables (shown on the A/B page when results are missing)."""
    return "\n\n".join(_contract_markdown(table, columns) for table, columns in AB_CONTRACT.items())


def ab_tables(path: str | Path) -> list[str]:
    """The A/B contract tables present in the warehouse."""
    status = warehouse_status(path)
    return [t for t in AB_CONTRACT if t in status.tables]


def _read_contract(
    path: str | Path,
    table: str,
    columns: Sequence[Column],
    experiment_id: str | None,
    order: Sequence[str],
    error: type[ContractError] = ContractError,
) -> pl.DataFrame:
    """``table`` cast to its contract: missing optional columns read as nulls, a missing required column
    raises ``error`` naming it; an absent table or file gives an empty frame."""
    schema = {c.name: _POLARS_TYPES[c.type] for c in columns}
    with _open(path) as wh:
        if wh is None or table not in _tables(wh):
            return _empty(schema)
        present = [row[0] for row in wh.con.execute(f"DESCRIBE {table}").fetchall()]
        missing = [c.name for c in columns if c.required and c.name not in present]
        if missing:
            raise error(
                f"table {table} is missing required column(s) {missing}; it has {present} "
                "(see the contracts in dashboard/data.py)"
            )
        casts = ", ".join(
            f'"{c.name}"::{c.type if c.type != "JSON" else "VARCHAR"} AS "{c.name}"'
            if c.name in present
            else f'NULL::{c.type if c.type != "JSON" else "VARCHAR"} AS "{c.name}"'
            for c in columns
        )
        where, params = (
            ("WHERE experiment_id = ?", [experiment_id]) if experiment_id is not None else ("", [])
        )
        order_by = ", ".join(f'"{c}"' for c in order)
        frame = wh.sql(f"SELECT {casts} FROM {table} {where} ORDER BY {order_by}", params)
    return frame.cast(schema)  # type: ignore[arg-type]


def _ab_table(path: str | Path, table: str, experiment_id: str | None, order: Sequence[str]) -> pl.DataFrame:
    return _read_contract(path, table, AB_CONTRACT[table], experiment_id, order, ABContractError)


def ab_experiments(path: str | Path) -> pl.DataFrame:
    """Every experiment, newest first when ``started_at`` is recorded."""
    frame = _ab_table(path, "ab_experiments", None, ["experiment_id"])
    return frame.sort("started_at", "experiment_id", descending=[True, False], nulls_last=True)


def ab_metrics(path: str | Path, experiment_id: str) -> pl.DataFrame:
    return _ab_table(path, "ab_metrics", experiment_id, ["metric", "arm"])


def ab_comparisons(path: str | Path, experiment_id: str) -> pl.DataFrame:
    return _ab_table(path, "ab_comparisons", experiment_id, ["metric", "arm"])


def ab_sequential(path: str | Path, experiment_id: str) -> pl.DataFrame:
    """The looks of the experiment; infinite CI bounds (looks before the burn-in) read as null."""
    frame = _ab_table(path, "ab_sequential", experiment_id, ["metric", "arm", "look"])
    finite = [
        pl.when(pl.col(c).is_finite()).then(pl.col(c)).otherwise(None).alias(c) for c in ("ci_low", "ci_high")
    ]
    return frame.with_columns(finite)


def ab_srm(path: str | Path, experiment_id: str) -> pl.DataFrame:
    return _ab_table(path, "ab_srm", experiment_id, ["arm"])


def ab_off_policy(path: str | Path, experiment_id: str) -> pl.DataFrame:
    return _ab_table(path, "ab_off_policy", experiment_id, ["policy", "estimator"])


def parse_design(value: str | dict[str, float] | None) -> dict[str, float]:
    """``ab_experiments.design`` as ``{arm: weight}`` (JSON text or an already decoded mapping)."""
    if value is None:
        return {}
    obj = json.loads(value) if isinstance(value, str) else value
    if not isinstance(obj, dict):
        raise ABContractError(f"ab_experiments.design must be a JSON object {{arm: weight}}, got {value!r}")
    return {str(k): float(v) for k, v in obj.items()}


# ----------------------------------------------------------------------------------------------------------
# Continual training
# ----------------------------------------------------------------------------------------------------------

CONTINUAL_TABLE = "continual_results"
CONTINUAL_CONTRACT: tuple[Column, ...] = (
    _EID,
    _c("method", "VARCHAR", "the continual-training method (e.g. full retrain, incremental, replay)", True),
    _c("step", "INTEGER", "the period the model has just learned (1-based)", True),
    _c("eval_period", "INTEGER", "the period evaluated (1-based, <= step)", True),
    _c("auc", "DOUBLE", "AUC on the evaluated period", True),
    _c("dataset", "VARCHAR", "the dataset"),
    _c("gauc", "DOUBLE", "GAUC on the evaluated period"),
    _c("n_examples", "BIGINT", "examples in the evaluated period"),
    _c("train_seconds", "DOUBLE", "wall time of learning this step"),
)
CONTINUAL_METRICS = ("auc", "gauc")

CONTINUAL_SUMMARY_SCHEMA: dict[str, pl.DataType] = {
    "method": pl.String(),
    "periods": pl.Int64(),
    "new_period": pl.Float64(),
    "final_mean": pl.Float64(),
    "avg_forgetting": pl.Float64(),
    "bwt": pl.Float64(),
    "train_seconds": pl.Float64(),
    "issue": pl.String(),
}


def continual_contract_markdown() -> str:
    """The ``continual_results`` contract as a Markdown table (shown on the continual page without data)."""
    return _contract_markdown(CONTINUAL_TABLE, CONTINUAL_CONTRACT)


def continual_results(path: str | Path, experiment_id: str | None = None) -> pl.DataFrame:
    """``main.continual_results`` (one row per experiment, method, step just learned and period evaluated),
    ordered by experiment, method, step and period; empty when the table is absent."""
    return _read_contract(
        path,
        CONTINUAL_TABLE,
        CONTINUAL_CONTRACT,
        experiment_id,
        ["experiment_id", "method", "step", "eval_period"],
    )


def _none_if_nan(x: float) -> float | None:
    return x if math.isfinite(x) else None


def continual_summary(results: pl.DataFrame, metric: str = "auc") -> pl.DataFrame:
    """Per method of one experiment, the figures of ``evaluation.forgetting.summarize_forgetting`` on the
    matrix A[step, eval_period] of ``metric`` (1-based; cells above the diagonal are ignored):
    ``new_period`` = mean of A[i, i], ``final_mean`` = mean of A[k, j], ``avg_forgetting`` = mean over j < k
    of max_{j <= i < k} A[i, j] - A[k, j], ``bwt`` = mean over j < k of A[k, j] - A[j, j]; and
    ``train_seconds`` = the sum over steps of ``train_seconds`` (recorded once per step, repeated per row).
    A method whose matrix is incomplete (a run still going) gets null figures and the reason in ``issue``.
    """
    from recsys.evaluation.forgetting import forgetting_matrix, summarize_forgetting

    if metric not in CONTINUAL_METRICS:
        raise ValueError(f"metric must be one of {CONTINUAL_METRICS}, got {metric!r}")
    records: list[dict[str, Any]] = []
    for method in results["method"].unique(maintain_order=True).to_list():
        rows = results.filter(
            (pl.col("method") == method)
            & (pl.col("eval_period") <= pl.col("step"))
            & pl.col(metric).is_finite()
        )
        per_step = (
            results.filter(pl.col("method") == method).group_by("step").agg(pl.col("train_seconds").first())
        )
        seconds = per_step["train_seconds"]
        record: dict[str, Any] = {
            "method": method,
            "train_seconds": seconds.sum() if seconds.null_count() < seconds.len() else None,
        }
        try:
            cells = zip(
                rows["step"].to_list(), rows["eval_period"].to_list(), rows[metric].to_list(), strict=True
            )
            summary = summarize_forgetting(forgetting_matrix(list(cells)))
        except ValueError as exc:
            records.append(record | {"issue": str(exc)})
            continue

        records.append(
            record
            | {
                "periods": summary.n_periods,
                "new_period": summary.new_period_auc,
                "final_mean": summary.average_final_auc,
                # NaN with a single period: nothing can have been forgotten yet.
                "avg_forgetting": _none_if_nan(summary.average_forgetting),
                "bwt": _none_if_nan(summary.backward_transfer),
            }
        )
    return pl.DataFrame(records, schema=CONTINUAL_SUMMARY_SCHEMA)


def seen_average(results: pl.DataFrame, metric: str = "auc") -> pl.DataFrame:
    """Per method and step t, the mean of R[t, p] over the periods already learned (p <= t): the usual
    "average accuracy" curve of continual learning."""
    return (
        results.filter((pl.col("eval_period") <= pl.col("step")) & pl.col(metric).is_not_null())
        .group_by("method", "step")
        .agg(pl.col(metric).mean().alias("value"), pl.len().cast(pl.Int64).alias("periods"))
        .sort("method", "step")
    )
