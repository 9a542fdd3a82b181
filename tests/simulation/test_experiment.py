"""simulation.experiment end to end: an A/A test through the serving engine, a better arm, the six tables as
the dashboard reads them, and the run registry."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from recsys.dashboard import data
from recsys.models.registry import build_model
from recsys.serving.registry import register_model
from recsys.serving.schemas import RecommendRequest, RecommendResponse
from recsys.simulation.arms import InProcessArm, OracleArm, RandomArm
from recsys.simulation.experiment import AB_TABLES, ABExperimentConfig, format_lift_table, run_ab_experiment
from recsys.simulation.simulator import SimulationConfig
from recsys.warehouse.runs import RunLog
from tests.simulation.test_simulator import N_ITEMS, tiny_world

SIM = SimulationConfig(days=3, users_per_day=100, session_length=4, pre_period_days=1, k=5, ope_share=0.2)


def register_tiny_popularity(name: str = "sim-tiny-pop", reverse: bool = False) -> str:
    """A popularity retriever over the tiny world's catalogue (its exposure popularity as counts)."""
    world = tiny_world()
    pop = world.model.catalogue.popularity
    counts = np.round(1000 * (pop[::-1] if reverse else pop)) + 1
    items = pl.DataFrame(
        {
            "item_id": np.arange(N_ITEMS),
            "item_idx": np.arange(1, N_ITEMS + 1),
            "category": [f"cat_{c}" for c in world.model.catalogue.category],
            "popularity": counts,
        }
    )
    model = build_model("popularity", num_items=N_ITEMS)
    model.load_counts(torch.from_numpy(np.r_[0.0, counts]).float())
    return register_model(
        name, architecture="popularity", task="retrieval", model=model, items=items, data_version="tinyworld"
    )


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ab") / "warehouse.duckdb"


@pytest.fixture(scope="module")
def aa(warehouse: Path):  # noqa: ANN201
    tag = register_tiny_popularity()
    # Seeded request ids make the Plackett-Luce draws, hence every figure below, reproducible. Any one
    # A/A run rejects now and then by design (95% intervals); the calibration test below checks the rate.
    sim = SIM.model_copy(update={"seed": 1})
    arms = {name: InProcessArm.from_tag(tag, seed=sim.seed) for name in ("control", "treatment")}
    config = ABExperimentConfig(experiment_id="aa", name="A/A", simulation=sim)
    return run_ab_experiment(config, arms, tiny_world(), warehouse=warehouse, data_version="tinyworld")


@pytest.fixture(scope="module")
def better(warehouse: Path, aa):  # noqa: ANN001, ANN201  (after aa: both experiments share the warehouse)
    world = tiny_world()
    items = np.arange(N_ITEMS)
    arms = {"control": RandomArm(items), "treatment": OracleArm(world, items)}
    config = ABExperimentConfig(experiment_id="oracle", simulation=SIM.model_copy(update={"salt": "s2"}))
    return run_ab_experiment(config, arms, world, warehouse=warehouse)


def test_an_aa_test_through_the_serving_engine_finds_nothing(aa) -> None:  # noqa: ANN001
    t = aa.tables
    assert not t["ab_srm"]["flagged"].any() and t["ab_srm"]["p_value"][0] > 0.001
    comp = t["ab_comparisons"]
    assert set(comp["metric"]) == {"ctr", "clicks", "likes", "dwell", "requests"}
    for row in comp.iter_rows(named=True):
        assert row["ci_low"] < 0 < row["ci_high"], row["metric"]
        assert row["n_control"] + row["n_treatment"] == t["ab_experiments"]["n_users"][0]
    ctr = comp.filter(pl.col("metric") == "ctr").row(0, named=True)
    assert ctr["cuped_ci_low"] < 0 < ctr["cuped_ci_high"] and ctr["variance_reduction"] >= 0
    assert t["ab_sequential"]["p_value"].min() > 0.05  # the always-valid test never rejects either
    # The served impressions are the engine's: propensities of its Plackett-Luce policy.
    imp = aa.log.experiment()
    assert set(imp["source"]) <= {"popularity"} and (imp["propensity"] <= 1).all()
    # Off-policy with target == logger: the estimates cover the true value.
    ope = t["ab_off_policy"]
    assert sorted(ope["estimator"]) == ["dr", "ips", "snips"]
    for row in ope.iter_rows(named=True):
        assert row["ci_low"] <= row["true_value"] <= row["ci_high"], row["estimator"]


def test_a_a_intervals_are_calibrated_over_many_seeded_runs(tmp_path: Path) -> None:
    """Over 30 A/A runs (new users, responses and policy draws each time), the 95% intervals of the CTR lift
    and of the off-policy estimates miss at about the nominal rate: at most 4 of 30 (expected 1.5; a
    Binomial(30, 0.05) reaches 5 with probability 0.02), for each readout a user acts on. Seeded, so it is
    as reproducible as any other test here."""
    tag = register_tiny_popularity()
    misses = {"ctr": 0, "ips": 0, "snips": 0, "dr": 0}
    widths: list[float] = []
    for seed in range(30):
        sim = SIM.model_copy(update={"seed": seed, "salt": f"aa{seed}"})
        arms = {name: InProcessArm.from_tag(tag, seed=seed) for name in ("control", "treatment")}
        config = ABExperimentConfig(experiment_id=f"aa{seed}", simulation=sim)
        t = run_ab_experiment(config, arms, tiny_world(), warehouse=tmp_path / "w.duckdb").tables
        ctr = t["ab_comparisons"].filter(pl.col("metric") == "ctr").row(0, named=True)
        misses["ctr"] += not ctr["ci_low"] < 0 < ctr["ci_high"]
        widths.append(ctr["ci_high"] - ctr["ci_low"])
        for row in t["ab_off_policy"].iter_rows(named=True):
            misses[row["estimator"]] += not row["ci_low"] <= row["true_value"] <= row["ci_high"]
    assert max(misses.values()) <= 4, misses
    # ...and not by being wide: about +-20% of relative CTR lift at 300 users a day (0.32-0.70 measured).
    assert float(np.mean(widths)) < 0.6


def test_a_better_arm_shows_a_positive_lift(better) -> None:  # noqa: ANN001
    comp = better.tables["ab_comparisons"]
    for metric in ("ctr", "clicks"):
        row = comp.filter(pl.col("metric") == metric).row(0, named=True)
        assert row["lift"] > 0.2 and row["ci_low"] > 0 and row["p_value"] < 1e-3, metric
        assert row["cuped_lift"] > 0 and row["cuped_ci_low"] > 0
    seq = better.tables["ab_sequential"].filter(pl.col("metric") == "ctr")
    assert seq["p_value"][-1] < 0.05 and np.all(np.diff(seq["p_value"].to_numpy()) <= 0)
    assert seq["users"].to_list() == sorted(seq["users"].to_list())
    assert better.mde["ctr"] > 0
    ope = better.tables["ab_off_policy"]
    assert ope["true_value"].null_count() == 0 and (ope["true_value"] > 0).all()
    table = format_lift_table(better.tables, better.mde)
    assert "| ctr | treatment |" in table and "SRM:" in table and "| treatment | ips |" in table


def test_the_dashboard_reads_both_experiments(warehouse: Path, aa, better) -> None:  # noqa: ANN001
    experiments = data.ab_experiments(warehouse)
    assert sorted(experiments["experiment_id"]) == ["aa", "oracle"]  # publishing one kept the other
    row = experiments.filter(pl.col("experiment_id") == "aa").row(0, named=True)
    assert data.parse_design(row["design"]) == {"control": 0.5, "treatment": 0.5}
    assert (
        row["arms"] == ["control", "treatment"] and row["control"] == "control" and row["run_id"] == aa.run_id
    )
    for eid, result in (("aa", aa), ("oracle", better)):
        assert data.ab_comparisons(warehouse, eid)["lift"].to_list() == pytest.approx(
            result.tables["ab_comparisons"].sort("metric", "arm")["lift"].to_list()
        )
        assert data.ab_metrics(warehouse, eid).height == 5 * 2
        assert data.ab_srm(warehouse, eid).height == 2
        assert data.ab_sequential(warehouse, eid).height == 5 * SIM.days
        assert data.ab_off_policy(warehouse, eid).height == 3
    assert data.ab_tables(warehouse) == list(AB_TABLES)
    runs = RunLog(warehouse).runs("ab")
    assert runs.height == 2 and set(runs["status"]) == {"finished"}
    assert '"experiment_id": "oracle"' in runs.filter(pl.col("run_id") == better.run_id)["metrics"][0]


class BrokenArm(RandomArm):
    def recommend_many(self, requests: Sequence[RecommendRequest]) -> list[RecommendResponse]:
        raise RuntimeError("arm is down")


def test_a_failed_simulation_is_recorded_and_publishes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "wh.duckdb"
    items = np.arange(N_ITEMS)
    config = ABExperimentConfig(experiment_id="broken", simulation=SIM)
    with pytest.raises(RuntimeError, match="arm is down"):
        run_ab_experiment(config, {"control": RandomArm(items), "treatment": BrokenArm(items)}, tiny_world(),
                          warehouse=path)  # fmt: skip
    runs = RunLog(path).runs("ab")
    assert runs["status"].to_list() == ["failed"] and "arm is down" in runs["error"][0]
    assert data.ab_experiments(path).is_empty()


def test_bad_experiment_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="metrics must be distinct names from"):
        ABExperimentConfig(metrics=("ctr", "revenue"))
