"""The continual experiment end to end on tiny synthetic data: three methods learn two periods, the nightly
mode learns the third from the checkpoint; the contract table, the runs, the report; presets and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from recsys.core.config import PathsConfig
from recsys.experiments.continual import (
    PAPER_EPOCHS,
    RESULT_COLUMNS,
    RESULTS_TABLE,
    ContinualConfig,
    app,
    continue_from_latest,
    paper_config,
    publish_results,
    read_results,
    run_continual,
    run_continual_paper,
)
from recsys.synthetic.config import SyntheticConfig
from recsys.warehouse import Warehouse
from recsys.warehouse.runs import RunLog
from tests.fixtures import tiny_continual_train, tiny_synthetic

TINY = tiny_synthetic(seed=6, n_items=120, n_users=20, requests_per_user=15, horizon_days=30, n_creators=15)
TRAIN = tiny_continual_train(replay_buffer=200)


def test_stream_then_nightly_step_fill_the_contract_table(tmp_path: Path) -> None:
    paths = PathsConfig(home=tmp_path / "home")
    # Rows of another experiment already in the table must survive (append semantics).
    other = pl.DataFrame(
        {
            "experiment_id": ["continual-other"],
            "dataset": ["other"],
            "method": ["finetune"],
            "step": [1],
            "eval_period": [1],
            "auc": [0.6],
            "gauc": [0.55],
            "n_examples": [10],
            "train_seconds": [1.0],
        },
        schema_overrides={"step": pl.Int32, "eval_period": pl.Int32, "n_examples": pl.Int64},
    )
    publish_results(paths.warehouse, other, inputs={})

    config = ContinualConfig(dataset="syn_cont", synthetic=TINY, train=TRAIN, stop_after=2)
    result = run_continual(config, paths, echo=None)
    assert set(result.methods) == {"finetune", "replay", "sdft"}
    for r in result.methods.values():
        assert r.auc.shape == (2, 2) and np.isfinite(r.auc[1]).all() and np.isnan(r.auc[0, 1])
        assert r.run_id is not None and r.train_seconds > 0
    sdft_cost = result.methods["sdft"].steps[0].cost
    assert sdft_cost.forward_passes == 3 * result.methods["finetune"].steps[0].cost.forward_passes

    with Warehouse(paths.warehouse) as wh:
        types = {r[0]: r[1] for r in wh.con.execute(f"DESCRIBE {RESULTS_TABLE}").fetchall()}
    assert types == RESULT_COLUMNS
    table = read_results(paths.warehouse, result.experiment_id)
    assert table.height == 3 * 3  # 3 methods x cells (1,1), (2,1), (2,2)
    ft = table.filter(pl.col("method") == "finetune").sort(["step", "eval_period"])
    assert ft["auc"].to_list() == pytest.approx(
        [result.methods["finetune"].auc[i, j] for i, j in ((0, 0), (1, 0), (1, 1))]
    )
    assert read_results(paths.warehouse, "continual-other").height == 1

    report = result.report_path.read_text()  # type: ignore[union-attr]
    assert "| after step | period 1 | period 2 |" in report and "Oracle AUC" in report
    assert "SDFT privileged-mode check" in report and "Claim (SDFT forgets less" in report

    # The nightly mode: the sdft checkpoint learns period 3 only, and its rows join the same experiment.
    nightly = continue_from_latest("syn_cont", "sdft", paths, echo=None)
    assert nightly.step == 3 and nightly.experiment_id == result.experiment_id
    assert [m.period for m in nightly.metrics] == [1, 2, 3]
    assert nightly.auc is not None and np.isfinite(nightly.auc[2]).all()
    np.testing.assert_array_equal(nightly.auc[:2, :2], result.methods["sdft"].auc)
    sd = read_results(paths.warehouse, result.experiment_id).filter(pl.col("method") == "sdft")
    assert sorted(zip(sd["step"], sd["eval_period"], strict=True)) == [
        (1, 1),
        (2, 1),
        (2, 2),
        (3, 1),
        (3, 2),
        (3, 3),
    ]
    again = continue_from_latest("syn_cont", "sdft", paths, echo=None)
    assert again.step is None and "up to date" in again.message

    runs = RunLog(paths.warehouse).runs("continual")
    assert sorted(runs["name"].to_list()) == ["finetune", "replay", "sdft", "sdft-incremental"]
    assert set(runs["status"]) == {"finished"}
    with pytest.raises(FileNotFoundError, match="no continual checkpoint"):
        continue_from_latest("syn_other", "sdft", paths, echo=None)


def test_presets_and_bad_configs_name_the_problem() -> None:
    quick = ContinualConfig.quick("synthetic")
    assert quick.synthetic == SyntheticConfig.quick() and quick.train.n_periods == 4
    assert (quick.train.served_len, quick.train.privileged_len) == (5, 100)
    assert ContinualConfig.quick("ml100k").train.privileged_len == 200
    assert ContinualConfig.quick("synthetic_item_drift").synthetic == SyntheticConfig.item_drift()
    assert (
        ContinualConfig.quick("synthetic_item_drift_control").synthetic
        == SyntheticConfig.item_drift_control()
    )
    # The id names the protocol: adding methods or stopping early keeps it, changing a knob does not.
    assert (
        quick.experiment_id == quick.model_copy(update={"methods": ("sdft",), "stop_after": 2}).experiment_id
    )
    assert quick.experiment_id != ContinualConfig.quick("synthetic", model="deepfm").experiment_id
    with pytest.raises(ValueError, match="no quick preset"):
        ContinualConfig.quick("nope")
    with pytest.raises(ValueError, match="unknown ranking model"):
        ContinualConfig(model="gpt")
    with pytest.raises(ValueError, match="stop_after"):
        ContinualConfig(stop_after=9)
    out = CliRunner().invoke(app, ["run", "--methods", "finetune,ewc"])
    assert out.exit_code != 0 and "ewc" in out.output


def test_paper_profile_runs_every_seed_and_method_once_and_tests_against_finetune(tmp_path: Path) -> None:
    paths = PathsConfig(home=tmp_path / "home")
    base = ContinualConfig(dataset="syn_paper", synthetic=TINY, train=TRAIN, methods=("finetune", "replay"))
    first = run_continual_paper(base, (0, 1), paths, echo=None)
    assert {m: len(c) for m, c in first.cells.items()} == {"finetune": 2, "replay": 2}
    for cells in first.cells.values():
        assert all(np.isfinite(c["average_forgetting"]) and c["train_seconds"] > 0 for c in cells)
        assert cells[0]["num_parameters"] == cells[1]["num_parameters"] > 0
    assert first.flops["served"] > 0 and first.flops["privileged"] > first.flops["served"]
    assert {(t.a, t.b, t.metric) for t in first.tests} == {
        ("replay", "finetune", "average_forgetting"),
        ("replay", "finetune", "new_period_auc"),
    }
    # Every example, PAPER_EPOCHS passes, the seed: the paper config of a cell.
    cell = paper_config(base, 1, "replay")
    assert cell.train.max_train_per_period is None and cell.train.epochs == PAPER_EPOCHS
    assert cell.train.seed == 1 and cell.methods == ("replay",)
    n_runs = RunLog(paths.warehouse).runs("continual").height
    assert n_runs == 4
    # A second invocation finds every cell finished: nothing is trained again, the figures are the same.
    messages: list[str] = []
    again = run_continual_paper(base, (0, 1), paths, echo=messages.append)
    assert again.cells == first.cells and RunLog(paths.warehouse).runs("continual").height == n_runs
    assert sum("finished earlier" in m for m in messages) == 4
    report = first.report_path.read_text()
    assert "Avg forgetting" in report and "replay vs finetune" in report and "## Claims" in report
