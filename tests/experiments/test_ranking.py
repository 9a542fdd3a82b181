"""The ranking experiment end to end on tiny data: generate + load a synthetic run -> examples -> every model
over two seeds -> table, paired tests, report and run records; the CLI on MovieLens-100K; bad configs."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from recsys.core.config import PathsConfig
from recsys.experiments.common import evidence_profile
from recsys.experiments.ranking import (
    EXPECTED_PAIRS,
    RankingExperimentConfig,
    RankingExperimentResult,
    app,
    claim_verdicts,
    format_table,
    paired_tests,
    run_ranking_experiment,
)
from recsys.synthetic.generator import SyntheticManifest
from recsys.training.ranking import RankingDataConfig, RankingRunResult, RankingTrainConfig
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
    assert "## Claims" in report and "- RankMixer > DeepFM:" in report
    # The dial-off tiny data: the long-range claim is checked and its share printed.
    assert "of the achievable lift needs the longer history" in report

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


def _runs(aucs: dict[str, list[float]]) -> dict[str, list[RankingRunResult]]:
    def run(name: str, seed: int, value: float) -> RankingRunResult:
        return RankingRunResult(name, seed, 10, {}, {"auc": value}, 1, 1.0, 1.0, 1.0, 1, 1, None)

    return {m: [run(m, s, v) for s, v in enumerate(values)] for m, values in aucs.items()}


def _verdicts(aucs: dict[str, list[float]], share: float | None) -> list[str]:
    config = RankingExperimentConfig(models=tuple(aucs), seeds=tuple(range(3)))
    runs = _runs(aucs)
    manifest = None if share is None else SyntheticManifest.model_construct(long_range_share=share)
    result = RankingExperimentResult(config=config, data=None, runs=runs, manifest=manifest)  # type: ignore[arg-type]
    result.tests = paired_tests(runs, config)
    return claim_verdicts(result)


def test_claim_verdicts_follow_the_paired_tests() -> None:
    ordered = {
        "deepfm": [0.700, 0.702, 0.701],
        "rankmixer": [0.710, 0.711, 0.713],
        "longer-rankmixer": [0.730, 0.729, 0.732],
        "hyformer": [0.729, 0.731, 0.730],
    }
    lines = _verdicts(ordered, share=0.2)
    assert lines[0].startswith("- HyFormer >= LONGER+RankMixer: HOLDS (not significantly lower)")
    assert lines[1].startswith("- LONGER+RankMixer > RankMixer: HOLDS")
    assert lines[2].startswith("- RankMixer > DeepFM: HOLDS")
    assert "long-history models ahead (long-range dial on: 20.0% of the lift" in lines[3]
    assert lines[3].endswith(": HOLDS") and "best short-history model RankMixer" in lines[4]
    # Dial off: long models ahead contradicts the claim that they should not be.
    assert _verdicts(ordered, share=0.0)[3].endswith(": CONTRADICTED")
    flat = {m: [0.70, 0.71, 0.705] for m in ordered}
    flat["deepfm"] = [0.71, 0.70, 0.704]
    lines = _verdicts(flat, share=0.0)
    assert "RankMixer > DeepFM: NOT SHOWN" in lines[2] and lines[3].endswith(
        "not ahead (long-range dial off: 0.0% of the lift needs > 100 events): HOLDS"
    )
    worse = dict(ordered, rankmixer=[0.690, 0.691, 0.689])
    assert "RankMixer > DeepFM: CONTRADICTED" in _verdicts(worse, share=None)[2]
    assert len(_verdicts(worse, share=None)) == 3  # no manifest: no long-range claim


def test_evidence_profiles() -> None:
    paper = evidence_profile("paper", seeds=1, max_epochs=2, patience=1)
    assert (
        paper.all_examples and paper.seeds >= 3 and paper.patience >= 3 and paper.max_epochs > paper.patience
    )
    budget = evidence_profile("budget", seeds=1, max_epochs=2, patience=1)
    assert (budget.seeds, budget.max_epochs, budget.patience, budget.all_examples) == (1, 2, 1, False)
    with pytest.raises(ValueError, match="profile must be one of"):
        evidence_profile("fast", seeds=1, max_epochs=1, patience=1)
    out = CliRunner().invoke(app, ["run", "--profile", "fast"])
    assert out.exit_code != 0 and "profile must be one of" in out.output
