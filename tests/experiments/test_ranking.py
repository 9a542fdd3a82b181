"""The ranking experiment end to end on tiny data: generate + load a synthetic run -> examples -> every model
over two seeds -> table, paired tests, report and run records; the CLI on MovieLens-100K; bad configs."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from recsys.core.config import PathsConfig
from recsys.experiments.ranking import (
    EXPECTED_PAIRS,
    RankingExperimentConfig,
    app,
    format_table,
    run_ranking_experiment,
)
from recsys.training.ranking import RankingDataConfig, RankingTrainConfig
from recsys.warehouse.runs import RunLog
from tests.fixtures import EXPERIMENT_SYNTHETIC, one_epoch_loop


def test_experiment_writes_the_report_and_records_runs(tmp_path: Path) -> None:
    paths = PathsConfig(home=tmp_path / "home")
    models = ("deepfm", "rankmixer", "longer-rankmixer", "hyformer")
    config = RankingExperimentConfig(
        dataset="syn_tiny",
        synthetic=EXPERIMENT_SYNTHETIC,
        data=RankingDataConfig(max_train_examples=400, max_valid_examples=150, max_test_examples=200),
        models=models,
        seeds=(0, 1),
        short_len=8,
        long_len=24,
        train=RankingTrainConfig(batch_size=64),
        loop=one_epoch_loop(),
    )
    result = run_ranking_experiment(config, paths)
    assert set(result.runs) == set(models) and all(len(r) == 2 for r in result.runs.values())
    assert {r.max_len for r in result.runs["deepfm"]} == {8} and {
        r.max_len for r in result.runs["hyformer"]
    } == {24}
    assert len(result.tests) == len(EXPECTED_PAIRS) * len(config.test_metrics)
    assert result.data.has_oracle and result.data.tasks == ("click", "like")

    report = (paths.home / "reports" / "ranking_syn_tiny.md").read_text()
    for name in ("DeepFM", "RankMixer", "LONGER+RankMixer", "HyFormer"):
        assert f"| {name} |" in report
    for column in ("AUC", "GAUC", "Log loss", "NE", "Calibration", "Oracle share", "Params", "FLOPs/example"):
        assert column in report
    assert "Oracle AUC" in report and "paired t-test over seeds" in report
    assert "hyformer vs longer-rankmixer" in report and "rankmixer vs deepfm" in report
    assert format_table(result) in report

    runs = RunLog(paths.warehouse).runs("ranking")
    assert runs.height == 8 and set(runs["status"]) == {"finished"}
    assert set(runs["data_version"]) == {result.data.data_version}
    assert set(runs["name"]) == set(models)

    again = run_ranking_experiment(config, paths)  # finished runs come back from their checkpoints
    assert RunLog(paths.warehouse).runs("ranking").height == 8
    assert again.runs["hyformer"][1].test == result.runs["hyformer"][1].test


def test_cli_on_movielens_prints_the_table(
    ml100k_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "cli-home"))
    args = [
        "run",
        "--dataset",
        "ml100k",
        "--source-dir",
        str(ml100k_dir),
        "--models",
        "deepfm,din",
        "--seeds",
        "1",
        "--short-len",
        "10",
        "--max-train",
        "400",
        "--max-valid",
        "200",
        "--max-test",
        "300",
        "--max-epochs",
        "1",
        "--no-progress",
    ]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "| DeepFM | 10 |" in out.output and "| DIN | 10 |" in out.output
    assert "Oracle share" not in out.output  # MovieLens has no ground truth
    report = tmp_path / "cli-home" / "reports" / "ranking_ml100k.md"
    assert report.exists() and "Per seed" in report.read_text()
    runs = RunLog(tmp_path / "cli-home" / "warehouse.duckdb").runs("ranking")
    assert runs.height == 2


def test_bad_configs_name_the_problem() -> None:
    with pytest.raises(ValueError, match="unknown ranking model"):
        RankingExperimentConfig(models=("deepfm", "transformer"), comparisons=())
    with pytest.raises(ValueError, match="comparisons"):
        RankingExperimentConfig(models=("deepfm",))
    out = CliRunner().invoke(app, ["run", "--models", "deepfm,nope"])
    assert out.exit_code != 0 and "unknown ranking model" in out.output
