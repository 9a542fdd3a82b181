"""The scaling experiment: model sizes picked from the parameter count, the AUC-vs-FLOPs fit and its
verdicts, the end-to-end run on tiny data (report, CSV, chart, run records) and bad configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.core.config import PathsConfig
from recsys.experiments.ranking import build_model, prepare_data
from recsys.experiments.scaling import (
    ScalingExperimentConfig,
    count_parameters,
    fit_scaling,
    parse_sizes,
    run_scaling_experiment,
    size_overrides,
    verdict,
)
from recsys.training.ranking import RankingDataConfig, RankingTrainConfig
from recsys.warehouse.runs import RunLog
from tests.fixtures import EXPERIMENT_SYNTHETIC, one_epoch_loop


def tiny_config(**fields: object) -> ScalingExperimentConfig:
    base = {
        "dataset": "syn_scale",
        "synthetic": EXPERIMENT_SYNTHETIC,
        "data": RankingDataConfig(max_train_examples=300, max_valid_examples=120, max_test_examples=150),
        "models": ("hyformer", "longer-rankmixer"),
        "sizes": (2e4, 6e4),
        "seeds": (0, 1),
        "long_len": 16,
        "train": RankingTrainConfig(batch_size=64),
        "loop": one_epoch_loop(),
    }
    return ScalingExperimentConfig(**{**base, **fields})


def test_sizes_land_near_their_targets_and_the_preset_stands_for_its_own(tmp_path: Path) -> None:
    paths = PathsConfig(home=tmp_path / "home")
    config = tiny_config()
    data, _ = prepare_data(paths, config._ranking_config(config.models, config.seeds), lambda _m: None)
    sized = size_overrides("hyformer", data, 16, (3e4, 1e5, 3e5), tolerance=1.01)
    counts = [s.parameters for s in sized]
    assert counts == sorted(counts) and len(set(counts)) == 3
    for s in sized:
        assert 1 / 1.5 < s.parameters / s.target < 1.5, (s.target, s.parameters)
        assert s.overrides and s.run_name == f"hyformer@{s.label}"
        assert 0 < s.dense_parameters < s.parameters
    # A target at the preset's own size is the preset itself: no overrides, the model's own run name.
    preset, _ = count_parameters(build_model("hyformer", data, 16)[0])
    own = size_overrides("hyformer", data, 16, (preset * 1.2, preset * 10), tolerance=1.3)
    assert own[0].overrides == {} and own[0].factor == 1.0 and own[0].run_name == "hyformer"
    # Two targets below the smallest width resolve to one model: refused, naming the sizes.
    with pytest.raises(ValueError, match="sizes: 1k and 2k give the same hyformer"):
        size_overrides("hyformer", data, 16, (1e3, 2e3), tolerance=1.01)


def test_fit_recovers_the_gap_and_the_slopes() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for model, (a, b) in {"hy": (0.80, 0.010), "lrm": (0.79, 0.002)}.items():
        for flops in (1e6, 1e7, 1e8):
            for _seed in range(3):
                x = np.log10(flops) - 7.0
                rows.append({"model": model, "flops": flops, "auc": a + b * x + rng.normal(0, 1e-4)})
    fit = fit_scaling(pl.DataFrame(rows), "hy", "lrm")
    assert fit is not None and fit.n_runs == 18
    assert fit.centre_flops == pytest.approx(1e7)
    assert fit.gap_at_equal_flops == pytest.approx(0.01, abs=1e-3) and fit.gap_p < 0.001
    assert fit.slope_gap == pytest.approx(0.008, abs=1e-3) and fit.slope_gap_p < 0.001
    assert fit.slopes["hy"][0] == pytest.approx(0.010, abs=1e-3)
    assert fit.slopes["lrm"][0] == pytest.approx(0.002, abs=1e-3)
    assert verdict(fit.gap_at_equal_flops, fit.gap_p) == "HOLDS"
    assert verdict(-0.01, 0.001) == "CONTRADICTED" and verdict(0.01, 0.3).startswith("NOT SHOWN")
    # One size of a model gives no slope: no fit.
    one = pl.DataFrame(rows).filter((pl.col("model") == "hy") | (pl.col("flops") == 1e6))
    assert fit_scaling(one, "hy", "lrm") is None


def test_experiment_writes_table_chart_and_records_runs(tmp_path: Path) -> None:
    paths = PathsConfig(home=tmp_path / "home")
    result = run_scaling_experiment(tiny_config(), paths)
    assert set(result.runs) == {(m, s) for m in ("hyformer", "longer-rankmixer") for s in (2e4, 6e4)}
    assert all(len(r) == 2 for r in result.runs.values())
    assert result.fit is not None and result.fit.n_runs == 8
    points = pl.read_csv(paths.home / "reports" / "scaling_syn_scale.csv")
    assert points.height == 8 and set(points["size"]) == {"20k", "60k"}
    # FLOPs grow with the size, per model.
    for m in ("hyformer", "longer-rankmixer"):
        f = points.filter(pl.col("model") == m).group_by("size").agg(pl.col("flops").first())
        assert dict(f.rows())["60k"] > dict(f.rows())["20k"]
    report = (paths.home / "reports" / "scaling_syn_scale.md").read_text()
    assert "| HyFormer | 20k |" in report and "| LONGER+RankMixer | 60k |" in report
    assert "better AUC than LONGER+RankMixer at equal FLOPs" in report and "steeper curve" in report
    assert (paths.home / "reports" / "scaling_syn_scale.html").exists()
    names = set(RunLog(paths.warehouse).runs("ranking")["name"])
    assert names == {"hyformer@20k", "hyformer@60k", "longer-rankmixer@20k", "longer-rankmixer@60k"}


def test_bad_configs_name_the_field() -> None:
    with pytest.raises(ValueError, match="sizes: positive, distinct and ascending"):
        tiny_config(sizes=(6e4, 2e4))
    with pytest.raises(ValueError, match="sizes: give at least two"):
        tiny_config(sizes=(2e4,))
    with pytest.raises(ValueError, match="models: 'deepfm' has no model_dim"):
        tiny_config(models=("deepfm", "hyformer"))
    with pytest.raises(ValueError, match="models: unknown ranking model"):
        tiny_config(models=("hyformr",))
    assert parse_sizes("0.3M,1M,3e6") == (3e5, 1e6, 3e6) and parse_sizes("300k") == (3e5,)
    with pytest.raises(ValueError, match="sizes: 'big' is not a count"):
        parse_sizes("big")
