"""One simulated A/B experiment: simulate, analyse, publish the six ``ab_*`` tables, record the run.

``run_ab_experiment`` runs ``simulation.simulator.simulate``, turns its log into the A/B results tables of
docs/data-contracts.md with ``analyse`` (all statistics come from ``recsys.simulation.stats``,
``simulation.power`` and ``simulation.off_policy``), publishes them with ONE ``Warehouse.publish_many``
(rows of other experiments are kept: each table is rewritten as the other experiments' rows plus this
one's) and records the run in the run registry (``RunLog`` kind ``ab``).

Analysis, per experiment-period user (the unit of randomisation):

- metrics: ``ctr`` (the user's clicks / impressions; 0 for a user who was served nothing), ``clicks``,
  ``likes``, ``dwell`` (seconds), ``requests`` (slates requested: longer sessions show here);
- ``ab_metrics``: per arm mean, std, se; ``ab_comparisons``: Welch lift with its delta-method CI, and the
  CUPED lift with the same metric in the pre-period as covariate (users absent from the pre-period get the
  pre-period mean, so they add no adjustment);
- ``ab_sequential``: one look per simulated day, the per-user metrics recomputed from the data up to that
  day; mSPRT always-valid p-values and CIs, plus the naive Welch p at each look for contrast;
- ``ab_srm``: users per arm against the design; ``ab_off_policy``: IPS, SNIPS and DR of each treatment
  policy from the control arm's logged slots, with the world's true value (synthetic data only);
- power: the relative MDE of each metric at 80% power for the arm sizes observed (run metrics and the
  printed table; the six tables carry only their contract columns).

OPEN choices and what was picked: the mSPRT mixing variance of a metric is ``ABTestConfig.msprt_tau2`` when
given, else ``(msprt_relative_effect * baseline mean)^2`` with the pre-period mean as baseline (the control
arm's final mean without a pre-period) -- the effect size one hopes to detect.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from pydantic import Field, field_validator

from recsys.core.config import FrozenModel, PathsConfig
from recsys.simulation.arms import ArmClient
from recsys.simulation.off_policy import OPEConfig, evaluate_log
from recsys.simulation.power import MeanMetric, minimum_detectable_effect
from recsys.simulation.response import ResponseModel
from recsys.simulation.simulator import EXPERIMENT, PRE, SimulationConfig, SimulationLog, simulate
from recsys.simulation.stats import (
    ABTestConfig,
    Moments,
    arm_metrics,
    compare_arms,
    msprt,
    running_welch_p_values,
    srm_check,
    user_metrics,
)
from recsys.warehouse import Warehouse
from recsys.warehouse.runs import RunLog

AB_TABLES = ("ab_experiments", "ab_metrics", "ab_comparisons", "ab_sequential", "ab_srm", "ab_off_policy")
METRICS = ("ctr", "clicks", "likes", "dwell", "requests")


class ABExperimentConfig(FrozenModel):
    """A simulated experiment: the simulation, the analysis and how it is named in the warehouse."""

    name: str | None = Field(None, description="A readable name (default: the arms, 'treatment vs control').")
    experiment_id: str | None = Field(None, description="Default: ab-<utc time>-<random>.")
    dataset: str = Field("synthetic", description="The dataset whose world is simulated (recorded).")
    simulation: SimulationConfig = SimulationConfig()
    analysis: ABTestConfig = ABTestConfig()
    metrics: tuple[str, ...] = METRICS
    msprt_relative_effect: float = Field(
        0.05, gt=0.0, description="Without msprt_tau2: tau = this x the metric's baseline mean."
    )
    power: float = Field(0.8, gt=0.0, lt=1.0, description="Power of the reported MDE.")
    ope_max_weight: float | None = Field(None, gt=0.0, description="Clip off-policy importance weights.")

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or set(v) - set(METRICS) or len(set(v)) != len(v):
            raise ValueError(f"metrics must be distinct names from {METRICS}, got {v}")
        return v

    @classmethod
    def quick(cls, **overrides: Any) -> ABExperimentConfig:
        """The preset the default pipeline calls: a few thousand requests, well under a minute."""
        return cls(**({"simulation": SimulationConfig.quick()} | overrides))


@dataclass
class ABExperimentResult:
    experiment_id: str
    run_id: str | None
    tables: dict[str, pl.DataFrame]
    log: SimulationLog
    mde: dict[str, float]  # metric -> relative MDE at the configured power (first treatment vs control)
    lift_table: str


# ----------------------------------------------------------------------------------------------------------
# Per-user metrics
# ----------------------------------------------------------------------------------------------------------


def period_users(log: SimulationLog, period: str, *, last_day: int | None = None) -> pl.DataFrame:
    """One row per user who arrived in ``period`` (up to ``last_day``): arm and every metric of METRICS."""
    arrivals = log.arrivals.filter(pl.col("period") == period)
    imps = log.impressions.filter(pl.col("period") == period)
    if last_day is not None:
        arrivals = arrivals.filter(pl.col("day") <= last_day)
        imps = imps.filter(pl.col("day") <= last_day)
    users = arrivals.group_by("user_id").agg(
        pl.col("arm").first(),
        pl.col("arm").n_unique().alias("_arms"),
        pl.col("requests").sum().cast(pl.Float64),
        pl.col("day").min().alias("first_day"),
        pl.col("arrival_ts").min().alias("first_arrival"),
    )
    if users.filter(pl.col("_arms") > 1).height:
        raise ValueError(f"{period}: a user was served by more than one arm; assignment must be per user")
    per_user = (
        user_metrics(imps)
        if imps.height
        else pl.DataFrame(
            schema={"user_id": pl.Int64, "impressions": pl.Int64, "clicks": pl.Float64, "likes": pl.Float64}
            | {"dwell": pl.Float64, "ctr": pl.Float64}
        )
    )
    return (
        users.drop("_arms")
        .join(per_user.drop("arm", strict=False), on="user_id", how="left")
        .with_columns(pl.col("impressions", "clicks", "likes", "dwell", "ctr").fill_null(0.0))
        .sort("user_id")
    )


def _with_covariates(users: pl.DataFrame, pre: pl.DataFrame | None, metrics: tuple[str, ...]) -> pl.DataFrame:
    if pre is None or pre.height == 0:
        return users
    means = {m: float(pre[m].mean()) for m in metrics}  # type: ignore[arg-type]
    cov = pre.select("user_id", *[pl.col(m).alias(f"pre_{m}") for m in metrics])
    return users.join(cov, on="user_id", how="left").with_columns(
        [pl.col(f"pre_{m}").fill_null(means[m]) for m in metrics]
    )


# ----------------------------------------------------------------------------------------------------------
# The six tables
# ----------------------------------------------------------------------------------------------------------


def _comparisons(
    users: pl.DataFrame, config: ABExperimentConfig, control: str, treatment: str, cuped: bool
) -> pl.DataFrame:
    alpha = config.analysis.alpha
    rows = []
    for m in config.metrics:
        raw = compare_arms(users, control=control, treatment=treatment, metrics=[m], alpha=alpha).row(
            0, named=True
        )
        row: dict[str, Any] = {
            "metric": m,
            "arm": treatment,
            "lift": raw["lift"],
            "ci_low": raw["lift_ci_low"],
            "ci_high": raw["lift_ci_high"],
            "p_value": raw["p_value"],
            "control": control,
            "n_control": raw["n_control"],
            "n_treatment": raw["n_treatment"],
            "mean_control": raw["mean_control"],
            "mean_treatment": raw["mean_treatment"],
            "cuped_lift": None,
            "cuped_ci_low": None,
            "cuped_ci_high": None,
            "cuped_p_value": None,
            "variance_reduction": None,
        }
        if cuped:
            try:
                adj = compare_arms(
                    users,
                    control=control,
                    treatment=treatment,
                    metrics=[m],
                    covariates={m: f"pre_{m}"},
                    alpha=alpha,
                ).row(0, named=True)
            except ValueError:  # a covariate constant in both arms (e.g. nobody liked anything before)
                adj = None
            if adj is not None:
                row |= {
                    "cuped_lift": adj["lift"],
                    "cuped_ci_low": adj["lift_ci_low"],
                    "cuped_ci_high": adj["lift_ci_high"],
                    "cuped_p_value": adj["p_value"],
                    "variance_reduction": adj["variance_reduction"],
                }
        rows.append(row)
    floats = ["lift", "ci_low", "ci_high", "p_value", "mean_control", "mean_treatment", "cuped_lift"]
    floats += ["cuped_ci_low", "cuped_ci_high", "cuped_p_value", "variance_reduction"]
    return pl.DataFrame(rows, schema_overrides={c: pl.Float64 for c in floats}).with_columns(
        pl.col("n_control", "n_treatment").cast(pl.Int64)
    )


def _moments_by_look(values: list[np.ndarray]) -> Moments:
    n = np.array([v.size for v in values], dtype=np.float64)
    mean = np.array([v.mean() if v.size else np.nan for v in values])
    var = np.array([v.var(ddof=1) if v.size > 1 else np.nan for v in values])
    return Moments(n, mean, var)


def _sequential(
    log: SimulationLog,
    config: ABExperimentConfig,
    control: str,
    baseline: Mapping[str, float],
) -> pl.DataFrame:
    looks = [period_users(log, EXPERIMENT, last_day=d) for d in range(log.config.days)]
    analysis = config.analysis
    parts = []
    for treatment in log.config.treatments:
        for m in config.metrics:
            t_vals = [u.filter(pl.col("arm") == treatment)[m].to_numpy().astype(np.float64) for u in looks]
            c_vals = [u.filter(pl.col("arm") == control)[m].to_numpy().astype(np.float64) for u in looks]
            tm, cm = _moments_by_look(t_vals), _moments_by_look(c_vals)
            if m in analysis.msprt_tau2:
                tau2 = analysis.tau2_for(m)
            else:
                base = abs(baseline.get(m, 0.0))
                tau2 = (config.msprt_relative_effect * base) ** 2 if base > 0 else 1e-6
            seq = msprt(tm, cm, tau2=tau2, alpha=analysis.alpha, burn_in=analysis.msprt_burn_in)
            naive = running_welch_p_values(
                Moments(tm.n, np.nan_to_num(tm.mean), np.nan_to_num(tm.var, nan=1.0)),
                Moments(cm.n, np.nan_to_num(cm.mean), np.nan_to_num(cm.var, nan=1.0)),
                burn_in=analysis.msprt_burn_in,
            )
            parts.append(
                pl.DataFrame(
                    {
                        "metric": m,
                        "arm": treatment,
                        "look": np.arange(len(looks), dtype=np.int64),
                        "users": np.array([u.height for u in looks], dtype=np.int64),
                        "p_value": seq.p_value,
                        "sim_day": np.arange(1, len(looks) + 1, dtype=np.float64),
                        "diff": seq.diff,
                        "ci_low": seq.ci_low,
                        "ci_high": seq.ci_high,
                        "naive_p_value": naive,
                    }
                )
            )
    return pl.concat(parts)


def _off_policy(log: SimulationLog, config: ABExperimentConfig) -> pl.DataFrame:
    parts = []
    for policy, rows in log.off_policy.partition_by("policy", as_dict=True).items():
        if rows["request_id"].n_unique() < 2:
            continue
        if rows["q_hat"].is_nan().any() or rows["v_hat"].is_nan().any():
            rows = rows.drop("q_hat", "v_hat")  # no reward model (no pre-period): IPS and SNIPS only
        est = evaluate_log(
            rows,
            OPEConfig(
                max_weight=config.ope_max_weight, alpha=config.analysis.alpha, cluster_col="request_id"
            ),
        )
        true_value = float(rows["true_value"].mean()) if log.is_truth else None  # type: ignore[arg-type]
        parts.append(
            est.select(
                pl.lit(policy[0]).alias("policy"),
                "estimator",
                "value",
                "se",
                "ci_low",
                "ci_high",
                "ess",
                pl.col("n").cast(pl.Int64),
                pl.lit(true_value, dtype=pl.Float64).alias("true_value"),
            )
        )
    if not parts:
        return pl.DataFrame(
            schema={"policy": pl.String, "estimator": pl.String, "value": pl.Float64, "se": pl.Float64}
            | {"ci_low": pl.Float64, "ci_high": pl.Float64, "ess": pl.Float64, "n": pl.Int64}
            | {"true_value": pl.Float64}
        )
    return pl.concat(parts)


def analyse(
    log: SimulationLog,
    config: ABExperimentConfig,
    *,
    experiment_id: str,
    run_id: str | None = None,
    started_at: datetime | None = None,
    finished_at: datetime | None = None,
) -> tuple[dict[str, pl.DataFrame], dict[str, float]]:
    """The six ``ab_*`` tables of one simulated experiment (every row carries ``experiment_id``), and the
    relative MDE per metric of the first treatment against the control."""
    sim = log.config
    control = sim.control_arm
    users = period_users(log, EXPERIMENT)
    pre = period_users(log, PRE) if sim.pre_period_days else None
    users = _with_covariates(users, pre, config.metrics)
    counts = {a: users.filter(pl.col("arm") == a).height for a in sim.arms}
    for arm, n in counts.items():
        if n < 2:
            raise ValueError(
                f"arm {arm!r} has {n} user(s) in the experiment; each arm needs 2 (raise days, users_per_day)"
            )
    eid = pl.lit(experiment_id).alias("experiment_id")
    metrics = arm_metrics(users, list(config.metrics)).select(eid, pl.all())
    comparisons = pl.concat(
        [_comparisons(users, config, control, t, pre is not None) for t in sim.treatments],
        how="diagonal_relaxed",
    ).select(eid, pl.all())
    baseline = {
        m: float(pre[m].mean())
        if pre is not None and pre.height
        else float(  # type: ignore[arg-type]
            users.filter(pl.col("arm") == control)[m].mean()  # type: ignore[arg-type]
        )
        for m in config.metrics
    }
    sequential = _sequential(log, config, control, baseline).select(eid, pl.all())
    srm = srm_check(counts, sim.design(), threshold=config.analysis.srm_threshold)
    srm_frame = pl.DataFrame(
        {
            "arm": list(srm.arms),
            "observed": np.array(srm.observed, dtype=np.int64),
            "expected": np.array(srm.expected, dtype=np.float64),
            "p_value": [srm.p_value] * len(srm.arms),
            "flagged": [srm.flagged] * len(srm.arms),
            "chi2": [srm.chi2] * len(srm.arms),
            "threshold": [srm.threshold] * len(srm.arms),
        }
    ).select(eid, pl.all())
    off_policy = _off_policy(log, config).select(eid, pl.all())
    mde: dict[str, float] = {}
    if sim.treatments:
        t0 = sim.treatments[0]
        n_c, n_t = counts[control], counts[t0]
        for m in config.metrics:
            c = users.filter(pl.col("arm") == control)[m]
            std, mean = float(c.std() or 0.0), float(c.mean() or 0.0)  # type: ignore[arg-type]
            if std > 0 and mean != 0:
                mde[m] = minimum_detectable_effect(
                    MeanMetric(std, mean),
                    n_c,
                    relative=True,
                    alpha=config.analysis.alpha,
                    power=config.power,
                    ratio=n_t / n_c,
                )
    name = config.name or " vs ".join([*sim.treatments, control])
    experiments = pl.DataFrame(
        {
            "experiment_id": [experiment_id],
            "control": [control],
            "arms": [list(sim.arms)],
            "design": [json.dumps(sim.design())],
            "name": [name],
            "run_id": [run_id],
            "dataset": [config.dataset],
            "alpha": [config.analysis.alpha],
            "n_users": [users.height],
            "started_at": [started_at],
            "finished_at": [finished_at],
            "config": [
                json.dumps(
                    {
                        "experiment": config.model_dump(mode="json"),
                        "arms": log.arm_names,
                        "world": log.response_name,
                        "start_ts": log.start_ts,
                    }
                )
            ],
        },
        schema_overrides={
            "run_id": pl.String,
            "started_at": pl.Datetime("us"),
            "finished_at": pl.Datetime("us"),
            "n_users": pl.Int64,
        },
    )
    tables = {
        "ab_experiments": experiments,
        "ab_metrics": metrics,
        "ab_comparisons": comparisons,
        "ab_sequential": sequential,
        "ab_srm": srm_frame,
        "ab_off_policy": off_policy,
    }
    return tables, mde


def publish_ab_tables(wh: Warehouse, tables: Mapping[str, pl.DataFrame], experiment_id: str) -> None:
    """Publish the six tables in ONE transaction, keeping the rows of every other experiment."""
    missing = [t for t in AB_TABLES if t not in tables]
    if missing:
        raise ValueError(f"tables is missing {missing}; all six A/B tables are published together")
    merged: dict[str, pl.DataFrame] = {}
    for name in AB_TABLES:
        new = tables[name]
        if wh.has_table(name):
            old = wh.table(name).filter(pl.col("experiment_id") != experiment_id)
            if old.height:
                new = pl.concat([old, new], how="diagonal_relaxed")
        merged[name] = new
    wh.publish_many(merged, inputs={}, params={"experiment_id": experiment_id, "source": "simulation"})


def format_lift_table(tables: Mapping[str, pl.DataFrame], mde: Mapping[str, float] | None = None) -> str:
    """Markdown: per metric and treatment the arm means, the lift with its CI and p, CUPED, MDE."""
    mde = mde or {}
    lines = [
        "| metric | arm | control mean | arm mean | lift [95% CI] | p | CUPED lift [95% CI] | CUPED p "
        "| var. red. | MDE (80%) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(x: float | None) -> str:
        return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:+.1f}%"

    def num(x: float | None, fmt: str = ".4g") -> str:
        return "n/a" if x is None or not math.isfinite(x) else format(x, fmt)

    for r in tables["ab_comparisons"].iter_rows(named=True):
        cuped = (
            f"{pct(r['cuped_lift'])} [{pct(r['cuped_ci_low'])}, {pct(r['cuped_ci_high'])}]"
            if r["cuped_lift"] is not None
            else "n/a"
        )
        lines.append(
            f"| {r['metric']} | {r['arm']} | {num(r['mean_control'])} | {num(r['mean_treatment'])} "
            f"| {pct(r['lift'])} [{pct(r['ci_low'])}, {pct(r['ci_high'])}] | {num(r['p_value'], '.3g')} "
            f"| {cuped} | {num(r['cuped_p_value'], '.3g')} | {pct(r['variance_reduction'])} "
            f"| {pct(mde.get(r['metric']))} |"
        )
    srm = tables["ab_srm"]
    if srm.height:
        obs = ", ".join(f"{a} {o}" for a, o in zip(srm["arm"], srm["observed"], strict=True))
        lines += ["", f"SRM: {obs} users; chi-square p = {srm['p_value'][0]:.3g}"
                  + (" (FLAGGED)" if srm["flagged"][0] else " (ok)")]  # fmt: skip
    seq = tables["ab_sequential"]
    if seq.height:
        last = seq.filter(pl.col("look") == seq["look"].max())
        parts = [f"{r['metric']} {r['p_value']:.3g}" for r in last.iter_rows(named=True)]
        lines.append("mSPRT always-valid p after the last look: " + ", ".join(parts))
    ope = tables["ab_off_policy"]
    if ope.height:
        lines += ["", "| policy | estimator | value [95% CI] | ESS | true value |", "|---|---|---|---|---|"]
        for r in ope.iter_rows(named=True):
            lines.append(
                f"| {r['policy']} | {r['estimator']} | {num(r['value'])} [{num(r['ci_low'])}, "
                f"{num(r['ci_high'])}] | {num(r['ess'], '.0f')} | {num(r['true_value'])} |"
            )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------


def run_ab_experiment(
    config: ABExperimentConfig,
    arms: Mapping[str, ArmClient],
    response: ResponseModel,
    *,
    warehouse: str | Path | None = None,
    data_version: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ABExperimentResult:
    """Simulate, analyse, publish the six tables (one transaction) and record the run (kind ``ab``)."""
    path = Path(warehouse) if warehouse is not None else PathsConfig().warehouse
    experiment_id = config.experiment_id or (
        f"ab-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    )
    run_log = RunLog(path)
    sim = config.simulation
    run_id = run_log.start(
        "ab",
        config.name or " vs ".join([*sim.treatments, sim.control_arm]),
        config={
            "experiment_id": experiment_id,
            "dataset": config.dataset,
            "experiment": config.model_dump(mode="json"),
            "arms": {a: getattr(c, "name", a) for a, c in arms.items()},
            "world": response.name,
        },
        data_version=data_version,
        protocol=f"simulated A/B: {sim.days} days x {sim.users_per_day} users/day, "
        f"{sim.pre_period_days} pre-period days",
        seed=sim.seed,
    )
    started = datetime.now(UTC).replace(tzinfo=None)
    try:
        log = simulate(sim, arms, response, progress=progress)
        finished = datetime.now(UTC).replace(tzinfo=None)
        tables, mde = analyse(
            log, config, experiment_id=experiment_id, run_id=run_id, started_at=started, finished_at=finished
        )
        with Warehouse(path) as wh:
            publish_ab_tables(wh, tables, experiment_id)
    except BaseException as exc:
        run_log.finish(run_id, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    summary: dict[str, Any] = {
        "experiment_id": experiment_id,
        "n_users": int(tables["ab_experiments"]["n_users"][0]),
    }
    for r in tables["ab_comparisons"].iter_rows(named=True):
        key = f"{r['arm']}/{r['metric']}"
        summary |= {f"{key}/lift": r["lift"], f"{key}/p_value": r["p_value"]}
        if r["cuped_lift"] is not None:
            summary[f"{key}/cuped_lift"] = r["cuped_lift"]
    summary |= {f"mde/{m}": v for m, v in mde.items()}
    summary["srm_p_value"] = float(tables["ab_srm"]["p_value"][0])
    summary["impressions"] = log.experiment().height
    run_log.finish(run_id, metrics=summary)
    return ABExperimentResult(experiment_id, run_id, tables, log, mde, format_lift_table(tables, mde))
