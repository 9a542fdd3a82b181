"""The retrieval experiment end to end on a tiny generated events file: ingest -> sequences -> train ->
table, report and run records; and the CLI command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from recsys.core.config import PathsConfig
from recsys.experiments.retrieval import RetrievalExperimentConfig, app, run_retrieval_experiment
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


def test_config_rejects_comparisons_of_models_not_run() -> None:
    with pytest.raises(ValueError, match="comparisons"):
        RetrievalExperimentConfig(models=("sasrec",))
