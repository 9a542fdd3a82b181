"""The retrieval experiment end to end on a tiny generated events file: ingest -> sequences -> train ->
table, report and run records; objectives compared per model; the sweep (selection on validation, test once
for the winner); and the CLI commands."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from recsys.core.config import PathsConfig
from recsys.experiments.retrieval import (
    RetrievalExperimentConfig,
    SweepConfig,
    app,
    length_comparisons,
    length_variants,
    objective_variants,
    run_retrieval_experiment,
    run_sweep,
)
from recsys.models.losses import FullSoftmaxConfig
from recsys.synthetic.config import SyntheticConfig
from recsys.training.loop import LoopConfig
from recsys.training.retrieval import RetrievalTrainConfig
from recsys.warehouse.runs import RunLog


@pytest.fixture
def events_csv(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    lines = ["user_id,item_id,timestamp"]
    for user in range(1, 31):
        start, n = int(rng.integers(0, 10)), int(rng.integers(3, 9))
        lines += [f"{user},{100 + (start + i) % 10},{1_600_000_000 + 3600 * i}" for i in range(n)]
    path = tmp_path / "events.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_experiment_writes_the_table_and_records_runs(events_csv: Path, tmp_path: Path) -> None:
    paths = PathsConfig(home=tmp_path / "home")
    config = RetrievalExperimentConfig(
        dataset="tiny",
        events_path=events_csv,
        seeds=(0,),
        train=RetrievalTrainConfig(max_len=8, batch_size=16),
        loop=LoopConfig(max_epochs=2, patience=2, progress=False),
    )
    result = run_retrieval_experiment(config, paths)
    assert result.num_items == 10 and result.num_eval_users == 30
    assert set(result.runs) == {"popularity", "sasrec", "hstu", "hstu-large"}
    report = (paths.home / "reports" / "retrieval_tiny.md").read_text()
    for name in ("popularity", "sasrec", "hstu", "hstu-large"):
        assert f"| {name} |" in report
    assert "NDCG@10" in report and "HR@200" in report and "Time to quality" in report
    assert "paired t-test over seeds" in report and "Wilcoxon signed-rank over users" in report
    runs = RunLog(paths.warehouse).runs("retrieval")
    assert runs.height == 4 and set(runs["status"]) == {"finished"}
    assert set(runs["data_version"]) == {result.data_version}

    again = run_retrieval_experiment(config, paths)  # finished runs are reused, not retrained
    assert (
        RunLog(paths.warehouse).runs("retrieval").height == 4 + 1
    )  # only popularity re-runs (no checkpoint)
    assert again.runs["hstu"][0].test.metrics == result.runs["hstu"][0].test.metrics


def test_cli_runs_and_rejects_unknown_models(
    events_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "cli-home"))
    runner = CliRunner()
    args = [
        "run",
        "--dataset",
        "tiny",
        "--events",
        str(events_csv),
        "--seeds",
        "1",
        "--max-epochs",
        "1",
        "--max-len",
        "8",
        "--no-progress",
    ]
    out = runner.invoke(app, [*args, "--models", "popularity,sasrec,hstu"])
    assert out.exit_code == 0, out.output
    assert "| hstu |" in out.output and "hstu vs sasrec" in out.output
    assert (tmp_path / "cli-home" / "reports" / "retrieval_tiny.md").exists()
    bad = runner.invoke(app, [*args, "--models", "sasrec,bert4rec"])
    assert bad.exit_code != 0 and "bert4rec" in bad.output
    own = runner.invoke(app, [*args, "--models", "sasrec,genret"])  # refused up front, not in training
    assert own.exit_code != 0 and "recsys genret run" in own.output


def test_config_rejects_comparisons_of_models_not_run() -> None:
    with pytest.raises(ValueError, match="comparisons"):
        RetrievalExperimentConfig(models=("sasrec",), comparisons=(("hstu", "sasrec"),))


def test_objective_table_compares_objectives_per_model(events_csv: Path, tmp_path: Path) -> None:
    paths = PathsConfig(home=tmp_path / "home")
    config = RetrievalExperimentConfig(
        dataset="tiny",
        events_path=events_csv,
        models=("sasrec",),
        seeds=(0, 1),
        objectives=objective_variants("auto,gr,gbce"),
        train=RetrievalTrainConfig(max_len=8, batch_size=16),
        loop=LoopConfig(max_epochs=1, patience=1, progress=False),
    )
    result = run_retrieval_experiment(config, paths)
    assert set(result.runs) == {"sasrec/auto", "sasrec/gr", "sasrec/gbce"}
    # the rule on this data (10 items, ~6 events per user): full softmax, sparse defaults (d 64, dropout 0.5)
    auto = result.settings["sasrec/auto"]
    assert isinstance(auto.train.loss, FullSoftmaxConfig) and auto.train.max_len == 8
    assert auto.model_fields["embedding_dim"] == 64 and auto.model_fields["dropout"] == 0.5
    assert result.settings["sasrec/gr"].model_fields["embedding_dim"] == 50  # the GR recipe keeps d 50
    names = {(t.a, t.b) for t in result.tests}
    assert names == {("sasrec/gr", "sasrec/auto"), ("sasrec/gbce", "sasrec/auto")}
    report = (paths.home / "reports" / "retrieval_tiny.md").read_text()
    assert "| sasrec/gbce |" in report and "s/epoch" in report and "full_softmax" in report
    with pytest.raises(ValueError, match="unknown preset"):
        objective_variants("auto,softmax-of-doom")


def test_sweep_selects_on_validation_and_tests_only_the_winner(events_csv: Path, tmp_path: Path) -> None:
    paths = PathsConfig(home=tmp_path / "home")
    config = SweepConfig(
        dataset="tiny",
        events_path=events_csv,
        model="sasrec",
        objectives=objective_variants("auto,gr"),
        dims=(8,),
        dropouts=(0.0, 0.5),
        lrs=(1e-2,),
        train=RetrievalTrainConfig(max_len=8, batch_size=16),
        loop=LoopConfig(max_epochs=2, patience=2, progress=False),
    )
    result = run_sweep(config, paths)
    assert len(result.candidates) == 4
    best = max(c.run.valid["ndcg@10"] for c in result.candidates)
    assert result.winner.run.valid["ndcg@10"] == best
    assert all(c.run.test is None for c in result.candidates)  # candidates never touch the test set
    assert result.winner.run.test is not None
    log = RunLog(paths.warehouse)
    trained = log.runs("retrieval")
    assert trained.height == 4  # the winner's test evaluation reused its checkpoint: no fifth training
    with_test = [r for r in trained["run_id"] if "test" in set(log.metrics(r)["split"])]
    assert with_test == [result.winner.run.run_id]
    sweep = log.runs("retrieval-sweep")
    assert sweep.height == 1 and sweep["status"][0] == "finished"
    assert "(winner)" in result.report_path.read_text()  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="dropouts"):
        SweepConfig(dropouts=(1.5,))


def test_sweep_cli_prints_the_winner(
    events_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "cli-home"))
    args = ["sweep", "--dataset", "tiny", "--events", str(events_csv), "--objectives", "full,gbce"]
    args += ["--dims", "8", "--dropouts", "0.1", "--max-epochs", "1", "--max-len", "8"]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "Winner:" in out.output and "test NDCG@10" in out.output
    bad = CliRunner().invoke(app, [*args[:6], "--objectives", "nope"])
    assert bad.exit_code != 0 and "nope" in bad.output


def test_a_synthetic_preset_is_generated_loaded_and_reused(tmp_path: Path) -> None:
    paths = PathsConfig(home=tmp_path / "home")
    config = RetrievalExperimentConfig(
        dataset="syn_tiny",
        synthetic=SyntheticConfig.preset("tiny"),
        models=("popularity",),
        seeds=(0,),
    )
    result = run_retrieval_experiment(config, paths)
    assert result.num_items == 500 and result.num_users > 0
    generated = list((paths.home / "synthetic").iterdir())
    assert [p.name for p in generated] == [f"syn_tiny-{config.synthetic.data_version()}"]
    modified = (generated[0] / "manifest.json").stat().st_mtime_ns
    again = run_retrieval_experiment(config, paths)  # the generated run is reused, not written again
    assert again.data_version == result.data_version
    assert (generated[0] / "manifest.json").stat().st_mtime_ns == modified


def test_one_data_source_only(events_csv: Path) -> None:
    with pytest.raises(ValueError, match="events_path and synthetic: give one data source"):
        RetrievalExperimentConfig(events_path=events_csv, synthetic=SyntheticConfig.preset("tiny"))


def test_the_sparse_retrieval_preset_is_the_documented_size() -> None:
    config = SyntheticConfig.preset("sparse_retrieval")
    assert (config.catalogue.n_items, config.catalogue.n_creators, config.users.n_users) == (4000, 800, 5000)
    assert config.sessions.requests_per_user_mean == 7.0


def test_history_lengths_and_stochastic_length_twins(
    events_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    variants = length_variants(objective_variants("auto"), (4, 8), 1.6)
    assert [v.name for v in variants] == ["auto-L4", "auto-L4-sl1.6", "auto-L8", "auto-L8-sl1.6"]
    assert [v.max_len for v in variants] == [4, 4, 8, 8]
    assert [v.stochastic_length_alpha for v in variants] == [None, 1.6, None, 1.6]
    pairs = set(length_comparisons(("popularity", "sasrec", "hstu"), variants))
    assert ("sasrec/auto-L8-sl1.6", "sasrec/auto-L8") in pairs  # each twin against its plain run
    assert ("hstu/auto-L8", "hstu/auto-L4") in pairs  # the longer history against the shortest
    assert ("hstu/auto-L4", "sasrec/auto-L4") in pairs and ("hstu/auto-L8", "sasrec/auto-L8") in pairs
    assert not any(a.startswith("popularity") for a, _ in pairs)
    with pytest.raises(ValueError, match="lengths: give each history length once"):
        length_variants(variants[:1], (4, 4), None)

    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "cli-home"))
    args = ["run", "--dataset", "tiny", "--events", str(events_csv), "--seeds", "1", "--max-epochs", "1"]
    out = CliRunner().invoke(
        app, [*args, "--models", "sasrec", "--lengths", "4,8", "--stochastic-length", "1.6", "--no-progress"]
    )
    assert out.exit_code == 0, out.output
    assert "| sasrec/auto-L8-sl1.6 |" in out.output and "sasrec/auto-L8-sl1.6 vs sasrec/auto-L8" in out.output
    report = (tmp_path / "cli-home" / "reports" / "retrieval_tiny.md").read_text()
    assert "history 8; Stochastic Length alpha 1.6" in report
    runs = RunLog(tmp_path / "cli-home" / "warehouse.duckdb").runs("retrieval")
    assert runs.height == 4
    both = CliRunner().invoke(app, [*args, "--lengths", "4,8", "--max-len", "8"])
    assert both.exit_code != 0 and "--lengths or --max-len" in both.output
