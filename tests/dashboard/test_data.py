"""dashboard.data on a warehouse built here: runs through RunLog, lineage through publish, A/B tables from
simulation.stats / simulation.off_policy on generated data."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.dashboard import data
from recsys.simulation import stats
from recsys.simulation.off_policy import OPEConfig, evaluate_log
from recsys.warehouse import Warehouse
from recsys.warehouse.runs import RunLog

PROTOCOL = "leave-one-out, full ranking; history 50"
RETRIEVAL_TEST_NDCG = {  # (model, seed) -> test/ndcg@10 of the run that counts
    ("hstu", 1): 0.051,
    ("hstu", 2): 0.055,
    ("hstu", 3): 0.062,
    ("sasrec", 1): 0.047,  # re-run: the first run of this seed recorded 0.010
    ("sasrec", 2): 0.041,
    ("sasrec", 3): 0.044,
}
VALID_CURVE = [0.02, 0.035, 0.04]  # valid/ndcg@10 per epoch of hstu seed 1
# Slice metrics of every retrieval run: bucket -> (factor on the run's test/ndcg@10, bucket size n).
USER_ACTIVITY = {"21+": (1.3, 25), "1-5": (0.6, 40), "6-20": (1.0, 35)}  # recorded out of order on purpose
COLD_START = {"warm": (1.1, 90), "cold": (0.2, 10)}
DISTILL_TEST_AUC = {1: 0.735, 2: 0.745}  # a din student distilled from teacher scores, per seed
# Continual results: method -> A[step][eval_period] of auc, row i = after learning period i + 1, only the
# periods learned so far (as experiments.continual writes them); train_seconds per step.
CONTINUAL_AUC = {
    "incremental": [
        [0.760],
        [0.730, 0.770],
        [0.700, 0.740, 0.780],
        [0.680, 0.715, 0.750, 0.790],
    ],
    "replay": [
        [0.750],
        [0.748, 0.760],
        [0.752, 0.755, 0.765],
        [0.745, 0.750, 0.760, 0.770],
    ],
}
CONTINUAL_TRAIN_S = {"incremental": [2.0, 2.0, 2.0, 2.0], "replay": [3.0, 4.0, 5.0, 6.0]}


@dataclass
class Built:
    path: Path
    events_versions: list[str] = field(default_factory=list)
    run_ids: dict[str, str] = field(default_factory=dict)
    comparisons: pl.DataFrame | None = None
    cuped: pl.DataFrame | None = None
    srm_p: dict[str, float] = field(default_factory=dict)
    ope: pl.DataFrame | None = None
    true_value: float = math.nan


def _record_retrieval(log: RunLog, built: Built, model: str, seed: int, ndcg: float, version: str) -> str:
    run_id = log.start(
        "retrieval",
        model,
        config={"model": model, "dataset": "synthetic", "train": {"lr": 0.001}},
        data_version=version,
        protocol=f"{PROTOCOL}; seed {seed}",
        seed=seed,
    )
    # Each RunLog call opens the file (~0.1 s on a loaded box): one run gets full curves, the others 2 points.
    curve = VALID_CURVE if (model, seed) == ("hstu", 1) else [ndcg * 0.5, ndcg * 0.9]
    for epoch, value in enumerate(curve, start=1):
        if (model, seed) == ("hstu", 1):
            log.log_metrics(run_id, {"loss": 1.0 / epoch}, step=epoch, split="train")
        log.log_metrics(run_id, {"ndcg@10": value, "hr@10": 2 * value}, step=epoch, split="valid")
    log.finish(
        run_id,
        metrics={
            "best_epoch": 3,
            "stopped_early": False,
            "train_time_s": 12.5,
            "valid/ndcg@10": curve[-1],
            "test/ndcg@10": ndcg,
            "test/hr@10": 2 * ndcg,
            "test/mrr@10": ndcg / 2,
            "test": {
                "slice": {
                    "user_activity": {
                        b: {"ndcg@10": f * ndcg, "n": n} for b, (f, n) in USER_ACTIVITY.items()
                    },
                    "cold_start_items": {
                        b: {"ndcg@10": f * ndcg, "n": n} for b, (f, n) in COLD_START.items()
                    },
                }
            },
        },
    )
    return run_id


def continual_frame() -> pl.DataFrame:
    """``main.continual_results`` of one experiment from ``CONTINUAL_AUC`` (gauc = auc - 0.05)."""
    rows = [
        {
            "experiment_id": "cont-1",
            "dataset": "synthetic",
            "method": method,
            "step": step + 1,  # 1-based, as experiments.continual records them
            "eval_period": period + 1,
            "auc": auc,
            "gauc": auc - 0.05,
            "n_examples": 1000 + 100 * period,
            "train_seconds": CONTINUAL_TRAIN_S[method][step],
        }
        for method, matrix in CONTINUAL_AUC.items()
        for step, row in enumerate(matrix)
        for period, auc in enumerate(row)
    ]
    return pl.DataFrame(rows).with_columns(pl.col("step", "eval_period").cast(pl.Int32))


def _ab_tables(built: Built) -> dict[str, pl.DataFrame]:
    """Two experiments: 'exp-ok' with every table, 'exp-srm' with a broken split (SRM only)."""
    rng = np.random.default_rng(7)
    n = 4000
    user_ids = np.arange(1, n + 1)
    arm = stats.assign_arm(user_ids, ["control", "treatment"], salt="exp-ok")
    pre = rng.gamma(2.0, 0.05, n)
    ctr = 0.7 * pre + rng.normal(0.0, 0.02, n) + np.where(arm == "treatment", 0.006, 0.0)
    clicks = rng.poisson(5.0 + 20 * pre)
    users = pl.DataFrame({"user_id": user_ids, "arm": arm, "ctr": ctr, "clicks": clicks, "pre_ctr": pre})
    raw = stats.compare_arms(users, control="control", treatment="treatment", metrics=["ctr", "clicks"])
    adj = stats.compare_arms(
        users, control="control", treatment="treatment", metrics=["ctr"], covariates={"ctr": "pre_ctr"}
    )
    built.comparisons, built.cuped = raw, adj
    comparisons = raw.select(
        pl.lit("exp-ok").alias("experiment_id"),
        "metric",
        pl.lit("treatment").alias("arm"),
        pl.lit("control").alias("control"),
        "n_control",
        "n_treatment",
        "mean_control",
        "mean_treatment",
        "lift",
        pl.col("lift_ci_low").alias("ci_low"),
        pl.col("lift_ci_high").alias("ci_high"),
        "p_value",
    ).join(
        adj.select(
            "metric",
            pl.col("lift").alias("cuped_lift"),
            pl.col("lift_ci_low").alias("cuped_ci_low"),
            pl.col("lift_ci_high").alias("cuped_ci_high"),
            pl.col("p_value").alias("cuped_p_value"),
            "variance_reduction",
        ),
        on="metric",
        how="left",
    )
    metrics = stats.arm_metrics(users, ["ctr", "clicks"]).with_columns(
        pl.lit("exp-ok").alias("experiment_id")
    )

    order = rng.permutation(n)
    looks = np.arange(200, n + 1, 200)
    y, a = ctr[order], arm[order]
    tm = stats.Moments.running(y, a == "treatment", looks)
    cm = stats.Moments.running(y, a == "control", looks)
    seq = stats.msprt(tm, cm, tau2=1e-4, burn_in=100)
    naive = stats.running_welch_p_values(tm, cm, burn_in=100)
    sequential = pl.DataFrame(
        {
            "experiment_id": "exp-ok",
            "metric": "ctr",
            "arm": "treatment",
            "look": np.arange(looks.size),
            "users": looks,
            "sim_day": np.arange(looks.size) * 0.5,
            "diff": seq.diff,
            "p_value": seq.p_value,
            "ci_low": seq.ci_low,
            "ci_high": seq.ci_high,
            "naive_p_value": naive,
        }
    )

    srm_rows = []
    for eid, observed in (
        ("exp-ok", {a_: int((arm == a_).sum()) for a_ in ("control", "treatment")}),
        ("exp-srm", {"control": 2300, "treatment": 1700}),
    ):
        res = stats.srm_check(observed, {"control": 0.5, "treatment": 0.5})
        built.srm_p[eid] = res.p_value
        srm_rows += [
            {
                "experiment_id": eid,
                "arm": arm_,
                "observed": obs,
                "expected": exp,
                "chi2": res.chi2,
                "p_value": res.p_value,
                "threshold": res.threshold,
                "flagged": res.flagged,
            }
            for arm_, obs, exp in zip(res.arms, res.observed, res.expected, strict=True)
        ]

    # Off-policy: uniform logging over 5 items, a target policy that favours the best items.
    p_item = np.array([0.02, 0.04, 0.06, 0.08, 0.10])
    target = np.array([0.05, 0.05, 0.1, 0.3, 0.5])
    rows = 3000
    shown = rng.integers(0, 5, rows)
    click = rng.random(rows) < p_item[shown]
    q_hat = p_item[shown] * 1.1
    log = pl.DataFrame(
        {
            "click": click,
            "propensity": np.full(rows, 0.2),
            "target_propensity": target[shown],
            "q_hat": q_hat,
            "v_hat": np.full(rows, float(target @ (p_item * 1.1))),
        }
    )
    ope = evaluate_log(log, OPEConfig(cluster_col=None))
    built.ope, built.true_value = ope, float(target @ p_item)
    off_policy = ope.select(
        pl.lit("exp-ok").alias("experiment_id"),
        pl.lit("treatment").alias("policy"),
        "estimator",
        "value",
        "se",
        "ci_low",
        "ci_high",
        "ess",
        "n",
        pl.lit(built.true_value).alias("true_value"),
    )
    experiments = pl.DataFrame(
        {
            "experiment_id": ["exp-ok", "exp-srm"],
            "name": ["ranker v2 vs v1", "broken split"],
            "run_id": [None, None],
            "dataset": ["synthetic", "synthetic"],
            "control": ["control", "control"],
            "arms": [["control", "treatment"], ["control", "treatment"]],
            "design": ['{"control": 0.5, "treatment": 0.5}'] * 2,
            "alpha": [0.05, 0.05],
            "n_users": [n, 4000],
        },
        schema_overrides={"run_id": pl.String},
    )
    return {
        "ab_experiments": experiments,
        "ab_metrics": metrics,
        "ab_comparisons": comparisons,
        "ab_sequential": sequential,
        "ab_srm": pl.DataFrame(srm_rows),
        "ab_off_policy": off_policy,
    }


def build_warehouse(path: Path) -> Built:
    built = Built(path)
    with Warehouse(path) as wh:
        for n_rows in (3, 4):  # two versions of the same table
            events = pl.DataFrame({"user_id": list(range(n_rows)), "item_id": [1] * n_rows})
            built.events_versions.append(wh.publish("synthetic.events", events).version)
    version = built.events_versions[-1]
    log = RunLog(path)
    _record_retrieval(log, built, "sasrec", 1, 0.010, version)  # superseded by the re-run below
    for (model, seed), ndcg in RETRIEVAL_TEST_NDCG.items():
        built.run_ids[f"{model}-{seed}"] = _record_retrieval(log, built, model, seed, ndcg, version)
    for seed, auc in ((1, 0.71), (2, 0.73)):
        run_id = log.start(
            "ranking",
            "din",
            config={"model": "din", "dataset": "ml100k"},
            data_version="ex-v1",
            protocol=f"global temporal cut; seed {seed}",
            seed=seed,
        )
        log.log_metrics(run_id, {"auc": auc - 0.02}, step=1, split="valid")
        log.log_metrics(run_id, {"auc": auc - 0.01}, step=2, split="valid")
        log.finish(run_id, metrics={"test/auc": auc, "test/gauc": auc - 0.05, "test/logloss": 0.55})
        built.run_ids[f"din-{seed}"] = run_id
    for seed, auc in DISTILL_TEST_AUC.items():  # as training.distillation records a distilled student
        run_id = log.start(
            "distill",
            "din-distilled",
            config={"model": "din", "teacher": {"models": ["hyformer"]}, "dataset": "ml100k"},
            data_version="ex-v1",
            protocol=f"global temporal cut; seed {seed}; distilled from teacher scores t1 (tau 1, lambda 1)",
            seed=seed,
        )
        log.finish(run_id, metrics={"test/auc": auc, "test/gauc": auc - 0.05, "test/logloss": 0.54})
        built.run_ids[f"distill-{seed}"] = run_id
    failed = log.start("ranking", "dcn", config={"dataset": "ml100k"}, data_version="ex-v1", seed=1)
    log.finish(failed, status="failed", error="FloatingPointError: loss is nan")
    built.run_ids["failed"] = failed
    bench = log.start("benchmark", "serving_load", config={"concurrency": 32}, data_version=None)
    log.finish(
        bench,
        metrics={
            "recommend/p50_ms": 8.0,
            "recommend/p95_ms": 15.0,
            "recommend/p99_ms": 22.0,
            "recommend/rps": 410.0,
            "rank/p50_ms": 30.0,
            "rank/p99_s": 0.09,
            "rank/errors": 0,
        },
    )
    built.run_ids["bench"] = bench
    with Warehouse(path) as wh:
        wh.publish_many(_ab_tables(built), params={"simulation": "test"})
        wh.publish("continual_results", continual_frame())
    return built


_CACHE: dict[str, Built] = {}


def built_warehouse(factory: pytest.TempPathFactory) -> Built:
    """One warehouse per test session, shared read-only by test_data and test_pages."""
    if "built" not in _CACHE:
        _CACHE["built"] = build_warehouse(factory.mktemp("dashboard") / "warehouse.duckdb")
    return _CACHE["built"]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return built_warehouse(tmp_path_factory)


# ----------------------------------------------------------------------------------------------------------


def test_runs_are_listed_and_filtered(built: Built) -> None:
    runs = data.list_runs(built.path)
    assert runs.height == 7 + 2 + 2 + 1 + 1  # retrieval (with the re-run), distill, ranking, failed, bench
    distill = data.list_runs(built.path, kinds=["distill"])
    assert sorted(distill["seed"].to_list()) == [1, 2] and set(distill["dataset"]) == {"ml100k"}
    assert runs["started_at"].is_sorted(descending=True)
    ranking = data.list_runs(built.path, kinds=["ranking"])
    assert sorted(ranking["name"].to_list()) == ["dcn", "din", "din"]
    failed = data.list_runs(built.path, statuses=["failed"])
    assert failed["run_id"].to_list() == [built.run_ids["failed"]]
    assert failed["error"][0] == "FloatingPointError: loss is nan"
    assert data.list_runs(built.path, datasets=["ml100k"], names=["din"]).height == 2
    bench = data.list_runs(built.path, kinds=["benchmark"])
    assert bench["dataset"].to_list() == [data.NO_DATASET]
    assert bench["wall_time_s"][0] >= 0


def test_seeds_are_summarised_per_group_with_the_latest_rerun(built: Built) -> None:
    final = data.final_metrics(built.path, kinds=["retrieval"])
    summary = data.summarise(final, "test/ndcg@10")
    assert summary["group"].n_unique() == 1  # the seed is stripped from the protocol
    assert summary["group"][0] == f"synthetic · {PROTOCOL} · data {built.events_versions[-1]}"
    for model in ("hstu", "sasrec"):
        values = [v for (m, _), v in RETRIEVAL_TEST_NDCG.items() if m == model]
        row = summary.filter(pl.col("name") == model).row(0, named=True)
        assert row["n_seeds"] == 3
        assert row["seeds"] == [1, 2, 3]
        assert row["mean"] == pytest.approx(np.mean(values))
        assert row["std"] == pytest.approx(np.std(values, ddof=1))
        assert row["hi"] - row["lo"] == pytest.approx(2 * row["std"])
    # Failed runs carry no metrics and are not "finished": they never reach the comparison.
    assert "dcn" not in data.final_metrics(built.path, kinds=["ranking"])["name"].to_list()


def test_metric_names_come_from_the_data_defaults_first(built: Built) -> None:
    final = data.final_metrics(built.path)
    retrieval = data.metric_names(final, "retrieval")
    assert retrieval[0] == "test/ndcg@10"
    assert {"test/hr@10", "test/mrr@10", "valid/ndcg@10", "train_time_s", "best_epoch"} <= set(retrieval)
    assert "stopped_early" not in retrieval  # booleans are not metrics
    assert data.metric_names(final, "ranking") == ["test/auc", "test/gauc", "test/logloss"]


def test_training_curves_come_from_run_metrics(built: Built) -> None:
    run_id = built.run_ids["hstu-1"]
    curves = data.run_metrics(built.path, [run_id, built.run_ids["din-1"]])
    hstu = curves.filter((pl.col("run_id") == run_id) & (pl.col("series") == "valid/ndcg@10"))
    assert hstu["step"].to_list() == [1, 2, 3]
    assert hstu["value"].to_list() == pytest.approx(VALID_CURVE)
    assert hstu["label"][0] == f"hstu · seed 1 · {run_id[-6:]}"
    assert set(curves["series"]) == {"train/loss", "valid/ndcg@10", "valid/hr@10", "valid/auc"}
    assert data.default_curve_series(sorted(curves["series"].unique()), "test/hr@10") == "valid/hr@10"
    assert data.run_metrics(built.path, []).is_empty()


def test_lineage_shows_current_versions_and_resolves_a_data_version(built: Built) -> None:
    current = data.lineage(built.path)
    events = current.filter(pl.col("table_name") == "synthetic.events").row(0, named=True)
    assert events["version"] == built.events_versions[-1]
    assert events["n_versions"] == 2 and events["row_count"] == 4
    assert "ab_srm" in current["table_name"].to_list()
    old = data.lineage(built.path, version=built.events_versions[0])
    assert old["table_name"].to_list() == ["synthetic.events"] and old["row_count"].to_list() == [3]


def test_benchmark_figures_parse_latency_and_throughput(built: Built) -> None:
    figures = data.benchmark_figures(built.path)
    got = {(r["scenario"], r["measure"], r["stat"]): r["value"] for r in figures.iter_rows(named=True)}
    assert got == {
        ("recommend", "latency", "p50"): 8.0,
        ("recommend", "latency", "p95"): 15.0,
        ("recommend", "latency", "p99"): 22.0,
        ("recommend", "throughput", "req_s"): 410.0,
        ("rank", "latency", "p50"): 30.0,
        ("rank", "latency", "p99"): pytest.approx(90.0),  # recorded in seconds
    }


@pytest.mark.parametrize(
    ("key", "parsed"),
    [
        ("p50_ms", ("all", "latency", "p50", 1.0)),
        ("latency_p99.9_ms", ("all", "latency", "p99.9", 1.0)),
        ("recommend_p95_s", ("recommend", "latency", "p95", 1000.0)),
        ("a/b/mean_ms", ("a/b", "latency", "mean", 1.0)),
        ("rank/qps", ("rank", "throughput", "req_s", 1.0)),
        ("requests", None),
        ("max_len", None),
    ],
)
def test_parse_benchmark_key(key: str, parsed: tuple[str, str, str, float] | None) -> None:
    assert data.parse_benchmark_key(key) == parsed


def test_protocol_group_strips_only_the_seed() -> None:
    assert data.protocol_group("loo; history 200; seed 3") == "loo; history 200"
    assert data.protocol_group("seed=1; full ranking") == "full ranking"
    assert data.protocol_group(None) == ""


def test_ab_tables_read_back_the_statistics(built: Built) -> None:
    experiments = data.ab_experiments(built.path)
    assert sorted(experiments["experiment_id"]) == ["exp-ok", "exp-srm"]
    assert data.parse_design(experiments["design"][0]) == {"control": 0.5, "treatment": 0.5}
    assert experiments["arms"][0].to_list() == ["control", "treatment"]

    comparisons = data.ab_comparisons(built.path, "exp-ok")
    assert comparisons["metric"].to_list() == ["clicks", "ctr"]
    ctr = comparisons.filter(pl.col("metric") == "ctr").row(0, named=True)
    raw = built.comparisons.filter(pl.col("metric") == "ctr").row(0, named=True)
    adj = built.cuped.row(0, named=True)
    assert ctr["lift"] == pytest.approx(raw["lift"])
    assert (ctr["ci_low"], ctr["ci_high"]) == pytest.approx((raw["lift_ci_low"], raw["lift_ci_high"]))
    assert ctr["cuped_lift"] == pytest.approx(adj["lift"])
    assert (
        ctr["variance_reduction"] == pytest.approx(adj["variance_reduction"])
        and adj["variance_reduction"] > 0.5
    )
    clicks = comparisons.filter(pl.col("metric") == "clicks").row(0, named=True)
    assert clicks["cuped_lift"] is None  # no covariate for clicks

    sequential = data.ab_sequential(built.path, "exp-ok")
    p = sequential["p_value"].to_numpy()
    assert np.all(np.diff(p) <= 0)
    assert sequential["ci_low"][0] is None  # -inf before the burn-in reads as null
    assert sequential["users"].to_list() == list(range(200, 4001, 200))

    srm = data.ab_srm(built.path, "exp-srm")
    assert srm["flagged"].to_list() == [True, True]
    assert srm["p_value"][0] == pytest.approx(built.srm_p["exp-srm"])
    assert not data.ab_srm(built.path, "exp-ok")["flagged"].any()

    ope = data.ab_off_policy(built.path, "exp-ok")
    assert sorted(ope["estimator"]) == ["dr", "ips", "snips"]
    assert ope["true_value"].to_list() == pytest.approx([built.true_value] * 3)
    assert data.ab_metrics(built.path, "exp-srm").is_empty()
    assert data.ab_tables(built.path) == list(data.AB_CONTRACT)


def test_a_table_breaking_the_ab_contract_is_named(tmp_path: Path) -> None:
    path = tmp_path / "wh.duckdb"
    with Warehouse(path) as wh:
        wh.publish("ab_srm", pl.DataFrame({"experiment_id": ["e"], "arm": ["a"], "observed": [3]}))
    with pytest.raises(data.ABContractError, match=r"ab_srm is missing required column\(s\) \['expected'"):
        data.ab_srm(path, "e")


def test_ab_tables_with_only_required_columns_read_with_nulls(tmp_path: Path) -> None:
    path = tmp_path / "wh.duckdb"
    minimal = pl.DataFrame(
        {"experiment_id": ["e", "e"], "estimator": ["snips", "ips"], "value": [0.1, 0.2]}
    ).with_columns(ci_low=pl.col("value") - 0.01, ci_high=pl.col("value") + 0.01)
    with Warehouse(path) as wh:
        wh.publish("ab_off_policy", minimal)
    ope = data.ab_off_policy(path, "e")
    assert ope["estimator"].to_list() == ["ips", "snips"]
    assert ope["policy"].null_count() == 2 and ope["true_value"].null_count() == 2
    assert ope.columns == [c.name for c in data.AB_CONTRACT["ab_off_policy"]]


def test_a_missing_warehouse_gives_empty_frames(tmp_path: Path) -> None:
    path = tmp_path / "nothing.duckdb"
    assert not data.warehouse_status(path).exists
    assert data.list_runs(path).columns == list(data.RUNS_SCHEMA)
    assert data.final_metrics(path).is_empty()
    assert data.benchmark_figures(path).is_empty()
    assert data.lineage(path).is_empty()
    assert data.ab_experiments(path).is_empty() and "true_value" in data.ab_off_policy(path, "x").columns
    assert not path.exists()  # reading never creates the file


def test_default_path_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(data.WAREHOUSE_ENV, str(tmp_path / "elsewhere.duckdb"))
    assert data.default_warehouse_path() == tmp_path / "elsewhere.duckdb"
    monkeypatch.delenv(data.WAREHOUSE_ENV)
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    assert data.default_warehouse_path() == tmp_path.resolve() / "warehouse.duckdb"


def test_a_writer_holding_the_lock_reads_as_busy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "locked.duckdb"
    RunLog(path)
    holder = textwrap.dedent(
        f"""
        import duckdb, sys, time
        con = duckdb.connect({str(path)!r})
        print("locked", flush=True)
        sys.stdin.read()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        monkeypatch.setattr(data, "LOCK_ATTEMPTS", 2)
        monkeypatch.setattr(data, "LOCK_WAIT_S", 0.01)
        with pytest.raises(data.WarehouseBusy, match="locked by a process writing to it"):
            data.list_runs(path)
    finally:
        proc.communicate(input="", timeout=30)
    assert data.list_runs(path).is_empty()  # once released, the dashboard reads again


def test_slices_are_parsed_ordered_and_summarised_over_seeds(built: Built) -> None:
    final = data.final_metrics(built.path, kinds=["retrieval"])
    assert not any("/slice/" in m for m in data.metric_names(final, "retrieval"))
    slices = data.slice_metrics(final)
    assert set(slices["dimension"]) == {"user_activity", "cold_start_items"}
    assert set(slices["split"]) == {"test"}
    assert data.slice_metric_names(slices, "test", "user_activity") == ["ndcg@10"]
    summary = data.summarise_slices(slices, "test", "user_activity", "ndcg@10")
    hstu = summary.filter(pl.col("name") == "hstu")
    assert hstu["bucket"].to_list() == ["1-5", "6-20", "21+"]  # numeric order, not the recorded one
    values = np.array([v for (m, _), v in RETRIEVAL_TEST_NDCG.items() if m == "hstu"])
    for row in hstu.iter_rows(named=True):
        factor, size = USER_ACTIVITY[row["bucket"]]
        assert row["n_seeds"] == 3 and row["n"] == size
        assert row["mean"] == pytest.approx(factor * values.mean())
        assert row["std"] == pytest.approx(factor * values.std(ddof=1))
    cold = data.summarise_slices(slices, "test", "cold_start_items", "ndcg@10")
    assert cold.filter(pl.col("name") == "sasrec")["bucket"].to_list() == ["cold", "warm"]
    assert data.summarise_slices(slices, "valid", "user_activity", "ndcg@10").is_empty()


@pytest.mark.parametrize(
    ("key", "parsed"),
    [
        ("test/slice/user_activity/1-5/ndcg@10", ("test", "user_activity", "1-5", "ndcg@10")),
        ("slices/item_popularity/tail/n", ("", "item_popularity", "tail", "n")),
        ("test/ndcg@10", None),
        ("test/slice/user_activity/ndcg@10", None),
    ],
)
def test_parse_slice_key(key: str, parsed: tuple[str, str, str, str] | None) -> None:
    assert data.parse_slice_key(key) == parsed


def test_bucket_order_is_numeric_then_natural_words() -> None:
    buckets = ["21+", "tail", "6-20", "<1", "head", "1-5", "torso"]
    assert sorted(buckets, key=data.bucket_sort_key) == ["<1", "1-5", "6-20", "21+", "head", "torso", "tail"]


def test_distilled_students_join_their_comparison_group(built: Built) -> None:
    final = data.final_metrics(built.path)
    distill = final.filter(pl.col("kind") == "distill")
    assert distill["group"].n_unique() == 1 and "distilled from" in distill["group"][0]  # a group of its own
    summary = data.summarise(data.with_distilled(final, "ranking"), "test/auc")
    assert summary["group"].to_list() == ["ml100k · global temporal cut · data ex-v1"] * 2
    student = summary.filter(pl.col("name") == "din-distilled").row(0, named=True)  # already says "distilled"
    assert student["kind"] == "distill" and student["n_seeds"] == 2
    assert student["mean"] == pytest.approx(np.mean(list(DISTILL_TEST_AUC.values())))
    # A kind whose groups no student shares gets none.
    assert set(data.with_distilled(final, "retrieval")["kind"]) == {"retrieval"}


def test_a_student_without_distilled_in_its_name_is_marked() -> None:
    final = pl.DataFrame(
        {
            "kind": ["ranking", "distill"],
            "name": ["mlp", "mlp"],
            "dataset": ["d", "d"],
            "protocol": ["cut", "cut; distilled from teacher scores v (tau 2.0, lambda 0.5)"],
            "data_version": ["v", "v"],
            "group": ["d · cut · data v", "d · cut; distilled from teacher scores v · data v"],
        }
    )
    both = data.with_distilled(final, "ranking")
    assert both["name"].to_list() == ["mlp", "mlp" + data.DISTILLED_SUFFIX]
    assert both["group"].n_unique() == 1


def test_continual_results_summarise_forgetting(built: Built) -> None:
    results = data.continual_results(built.path)
    assert results.height == 2 * (1 + 2 + 3 + 4) and results["step"].dtype == pl.Int32
    summary = {r["method"]: r for r in data.continual_summary(results, "auc").iter_rows(named=True)}
    inc, rep = summary["incremental"], summary["replay"]
    assert inc["periods"] == 4 and inc["issue"] is None
    assert inc["new_period"] == pytest.approx((0.76 + 0.77 + 0.78 + 0.79) / 4)
    assert inc["final_mean"] == pytest.approx((0.68 + 0.715 + 0.75 + 0.79) / 4)
    # max over steps j..3 of A[i, j] minus A[4, j], for j = 1, 2, 3
    assert inc["avg_forgetting"] == pytest.approx((0.08 + 0.055 + 0.03) / 3)
    assert inc["bwt"] == pytest.approx(-(0.08 + 0.055 + 0.03) / 3)
    # replay's best score on period 1 came after it was learned: forgetting and BWT differ
    assert rep["avg_forgetting"] == pytest.approx((0.007 + 0.01 + 0.005) / 3)
    assert rep["bwt"] == pytest.approx(-(0.005 + 0.01 + 0.005) / 3)
    assert rep["train_seconds"] == pytest.approx(18.0) and inc["train_seconds"] == pytest.approx(8.0)
    gauc = data.continual_summary(results, "gauc").filter(pl.col("method") == "replay")
    assert gauc["final_mean"][0] == pytest.approx(rep["final_mean"] - 0.05)
    seen = data.seen_average(results, "auc").filter(pl.col("method") == "incremental")
    assert seen["value"].to_list() == pytest.approx(
        [0.76, (0.73 + 0.77) / 2, (0.70 + 0.74 + 0.78) / 3, (0.68 + 0.715 + 0.75 + 0.79) / 4]
    )
    with pytest.raises(ValueError, match="metric must be one of"):
        data.continual_summary(results, "ndcg")


def test_an_incomplete_forgetting_matrix_is_reported_not_summarised() -> None:
    results = continual_frame().filter(
        ~((pl.col("method") == "replay") & (pl.col("step") == 4) & (pl.col("eval_period") == 2))
    )
    summary = data.continual_summary(results).sort("method")
    assert summary["issue"].to_list()[0] is None
    replay = summary.row(1, named=True)
    assert replay["final_mean"] is None and "missing cells" in replay["issue"] and "(4, 2)" in replay["issue"]


def test_continual_contract_names_a_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "wh.duckdb"
    with Warehouse(path) as wh:
        wh.publish("continual_results", continual_frame().drop("eval_period"))
    with pytest.raises(
        data.ContractError, match=r"continual_results is missing required column\(s\) \['eval_"
    ):
        data.continual_results(path)
    assert data.continual_results(tmp_path / "none.duckdb").is_empty()
