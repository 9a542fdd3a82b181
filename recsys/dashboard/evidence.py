"""The Evidence page's figures, computed from the recorded runs alone, so any experiment that records its
runs through ``RunLog`` shows up without code here:

- Comparison tables: per kind and group of comparable runs (``data.final_metrics``: same dataset,
  protocol and data version), each model's mean ± std over seeds of the chosen metrics, with its cost
  (parameters, FLOPs per example, time to quality) where the runs recorded it.
- Paired tests: for every two models of a group, the paired t-test over the seeds both ran
  (``evaluation.significance.paired_t_over_seeds``, runs paired by seed), and a verdict at ``alpha``.
  A metric's direction is read from its name (losses, errors, times and costs: lower is better;
  calibration: closer to 1; else higher is better).
- Scaling: quality against cost, one point per model (mean over seeds), plus the figures that summary runs
  record per role as ``<role>/<metric>`` next to ``<role>/num_parameters`` (the distillation experiment's
  teacher, students and baseline).
- Verdicts that experiments record themselves: a run metric named ``goal_met`` or ``<something>_met``
  (1 = met), shown with the run's other top-level figures.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Any

import polars as pl

from recsys.dashboard import data
from recsys.evaluation.significance import paired_t_over_seeds

COSTS = {
    "num_parameters": "parameters",
    "flops_per_example": "FLOPs per example",
    "time_to_quality_s": "time to quality (s)",
    "train_time_s": "training time (s)",
}
_LOWER = re.compile(r"(loss|^ne$|ece|mse|rmse|mae|error|time|_s$|latency|flops|num_parameters|forgetting)")
VERDICT_KEY = re.compile(r"(^|/)(goal_met|\w+_met)$")


def direction(metric: str) -> int:
    """+1 when higher is better, -1 when lower is better, 0 when the best value is 1 (calibration)."""
    leaf = metric.split("/")[-1].lower()
    if leaf.startswith("calibration"):
        return 0
    return -1 if _LOWER.search(leaf) else 1


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def comparison_table(final: pl.DataFrame, kind: str, group: str, metrics: list[str]) -> pl.DataFrame:
    """One row per model of a group: seeds, ``mean ± std`` of each metric (text, 4 decimals), and the
    cost columns the runs recorded (mean over seeds)."""
    rows = final.filter((pl.col("kind") == kind) & (pl.col("group") == group))
    costs = [c for c in COSTS if c in set(rows["metric"].to_list())]
    records: list[dict[str, Any]] = []
    for name in rows["name"].unique(maintain_order=True).to_list():
        own = rows.filter(pl.col("name") == name)
        record: dict[str, Any] = {"model": name, "seeds": own["seed"].drop_nulls().n_unique() or 1}
        for metric in metrics:
            values = own.filter(pl.col("metric") == metric)["value"].to_list()
            record[metric] = f"{sum(values) / len(values):.4f} ± {_std(values):.4f}" if values else "-"
        for cost in costs:
            values = own.filter(pl.col("metric") == cost)["value"].to_list()
            record[COSTS[cost]] = sum(values) / len(values) if values else None
        records.append(record)
    schema = {"model": pl.String, "seeds": pl.Int64} | {m: pl.String for m in metrics}
    schema |= {COSTS[c]: pl.Float64 for c in costs}
    frame = pl.DataFrame(records, schema=schema)
    if metrics and frame.height:
        first = metrics[0]
        key = frame[first].str.split(" ").list.first().cast(pl.Float64, strict=False)
        frame = frame.with_columns(key.alias("_k")).sort(
            "_k", descending=direction(first) >= 0, nulls_last=True
        )
        frame = frame.drop("_k")
    return frame


PAIRED_SCHEMA: dict[str, pl.DataType] = {
    "kind": pl.String(),
    "group": pl.String(),
    "metric": pl.String(),
    "a": pl.String(),
    "b": pl.String(),
    "seeds": pl.Int64(),
    "mean_a": pl.Float64(),
    "mean_b": pl.Float64(),
    "diff": pl.Float64(),
    "statistic": pl.Float64(),
    "p_value": pl.Float64(),
    "test": pl.String(),
    "verdict": pl.String(),
}


def verdict(metric: str, a: str, b: str, mean_a: float, mean_b: float, p: float, n: int, alpha: float) -> str:
    """The sentence a reader takes away from one paired comparison."""
    if n < 2 or math.isnan(p):
        return f"{n} shared seed{'s' if n != 1 else ''}: no test (record more seeds)"
    if p >= alpha:
        return f"no significant difference (p = {p:.3g} ≥ {alpha:g})"
    d = direction(metric)
    if d == 0:
        better = a if abs(mean_a - 1) < abs(mean_b - 1) else b
    else:
        better = a if (mean_a - mean_b) * d > 0 else b
    return f"{better} is better (p = {p:.3g} < {alpha:g})"


def paired_tests(final: pl.DataFrame, metric: str, alpha: float = 0.05) -> pl.DataFrame:
    """Every pair of models within each kind and group, on ``metric``, paired over their shared seeds;
    ``a`` is the better model by mean."""
    rows = final.filter((pl.col("metric") == metric) & pl.col("seed").is_not_null())
    records: list[dict[str, Any]] = []
    for (kind, group), part in rows.group_by("kind", "group", maintain_order=True):
        by_model = {
            name: dict(zip(sub["seed"].to_list(), sub["value"].to_list(), strict=True))
            for (name,), sub in part.group_by("name", maintain_order=True)
        }
        for x, y in itertools.combinations(sorted(by_model), 2):
            seeds = sorted(set(by_model[x]) & set(by_model[y]))
            if not seeds:
                continue
            va, vb = [by_model[x][s] for s in seeds], [by_model[y][s] for s in seeds]
            mean_x, mean_y = sum(va) / len(va), sum(vb) / len(vb)
            d = direction(metric)
            swap = (mean_y - mean_x) * d > 0 if d else abs(mean_y - 1) < abs(mean_x - 1)
            a, b, va, vb = (y, x, vb, va) if swap else (x, y, va, vb)
            test = paired_t_over_seeds(va, vb, metric=metric, a_name=a, b_name=b)
            records.append(
                {
                    "kind": kind,
                    "group": group,
                    "metric": metric,
                    "a": a,
                    "b": b,
                    "seeds": test.n,
                    "mean_a": test.mean_a,
                    "mean_b": test.mean_b,
                    "diff": test.mean_diff,
                    "statistic": test.statistic if math.isfinite(test.statistic) else None,
                    "p_value": test.p_value if not math.isnan(test.p_value) else None,
                    "test": test.test,
                    "verdict": verdict(metric, a, b, test.mean_a, test.mean_b, test.p_value, test.n, alpha),
                }
            )
    return pl.DataFrame(records, schema=PAIRED_SCHEMA)


SCALING_SCHEMA: dict[str, pl.DataType] = {
    "kind": pl.String(),
    "group": pl.String(),
    "model": pl.String(),
    "source": pl.String(),
    "cost": pl.Float64(),
    "value": pl.Float64(),
    "n_seeds": pl.Int64(),
}


def scaling_points(final: pl.DataFrame, metric: str, cost: str) -> pl.DataFrame:
    """Quality (``metric``) against ``cost`` (a key of ``COSTS``): one point per kind, group and model
    (means over seeds), and one per role of summary runs that record ``<role>/<leaf of metric>`` beside
    ``<role>/<cost>``."""
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {sorted(COSTS)}, got {cost!r}")
    records: list[dict[str, Any]] = []
    keys = ["kind", "group", "name"]
    quality = (
        final.filter(pl.col("metric") == metric)
        .group_by(keys)
        .agg(pl.col("value").mean(), pl.col("seed").n_unique().cast(pl.Int64).alias("n_seeds"))
    )
    spend = final.filter(pl.col("metric") == cost).group_by(keys).agg(pl.col("value").mean().alias("cost"))
    for r in quality.join(spend, on=keys, how="inner").iter_rows(named=True):
        records.append(
            {
                "kind": r["kind"],
                "group": r["group"],
                "model": r["name"],
                "source": "runs",
                "cost": r["cost"],
                "value": r["value"],
                "n_seeds": r["n_seeds"],
            }
        )
    leaf = metric.split("/")[-1]
    roles = final.filter(pl.col("metric").str.contains("/")).with_columns(
        pl.col("metric").str.replace(r"/[^/]+$", "").alias("role"),
        pl.col("metric").str.extract(r"/([^/]+)$").alias("leaf"),
    )
    for (kind, group, name, run_id), part in roles.group_by("kind", "group", "name", "run_id"):
        figures = {(r, lf): v for r, lf, v in part.select("role", "leaf", "value").iter_rows()}
        for role in sorted({r for r, _ in figures}):
            if (role, leaf) in figures and (role, cost) in figures:
                records.append(
                    {
                        "kind": kind,
                        "group": group,
                        "model": f"{name} · {role}",
                        "source": f"summary run {run_id[-6:]}",
                        "cost": figures[(role, cost)],
                        "value": figures[(role, leaf)],
                        "n_seeds": 1,
                    }
                )
    frame = pl.DataFrame(records, schema=SCALING_SCHEMA)
    return frame.filter(pl.col("cost") > 0).sort("kind", "group", "cost")


VERDICT_SCHEMA: dict[str, pl.DataType] = {
    "run_id": pl.String(),
    "kind": pl.String(),
    "name": pl.String(),
    "dataset": pl.String(),
    "started_at": pl.Datetime("us"),
    "goal": pl.String(),
    "met": pl.Boolean(),
    "figures": pl.String(),
}


def recorded_verdicts(runs: pl.DataFrame) -> pl.DataFrame:
    """The goals runs record themselves (``goal_met`` and ``*_met`` metrics, 1 = met), newest first, each
    with the run's other top-level figures as ``key=value`` text."""
    records: list[dict[str, Any]] = []
    for r in runs.filter(pl.col("status") == "finished").iter_rows(named=True):
        flat = data.flatten_metrics(r["metrics"])
        goals = [k for k in flat if VERDICT_KEY.search(k)]
        figures = ", ".join(
            f"{k}={v:.4g}" for k, v in flat.items() if "/" not in k and k not in goals and k != "wall_time_s"
        )
        for goal in goals:
            records.append(
                {
                    "run_id": r["run_id"],
                    "kind": r["kind"],
                    "name": r["name"],
                    "dataset": r["dataset"],
                    "started_at": r["started_at"],
                    "goal": goal,
                    "met": flat[goal] >= 0.5,
                    "figures": figures,
                }
            )
    return pl.DataFrame(records, schema=VERDICT_SCHEMA)


def reports(home: Path) -> list[Path]:
    """The markdown reports the experiments wrote under ``home`` (``reports/*.md`` and
    ``artifacts/**/report_*.md``), newest first."""
    found = list((home / "reports").glob("*.md")) if (home / "reports").is_dir() else []
    if (home / "artifacts").is_dir():
        found += list((home / "artifacts").rglob("report_*.md"))
    return sorted((p for p in found if p.is_file()), key=lambda p: p.stat().st_mtime, reverse=True)
