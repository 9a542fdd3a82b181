from __future__ import annotations

import json
from pathlib import Path

import pytest

from recsys.warehouse.runs import RunLog


def test_run_lifecycle_is_recorded(warehouse_path: Path) -> None:
    log = RunLog(warehouse_path)
    run_id = log.start("train", "hstu", config={"lr": 1e-3, "blocks": 2}, data_version="v1", seed=0)
    log.log_metrics(run_id, {"ndcg@10": 0.1, "hr@10": 0.2}, step=1, split="valid")
    log.log_metrics(run_id, {"ndcg@10": 0.15}, step=2, split="valid")
    log.finish(run_id, metrics={"ndcg@10": 0.15})

    runs = log.runs("train")
    assert runs.height == 1
    row = runs.row(0, named=True)
    assert row["status"] == "finished"
    assert row["data_version"] == "v1"
    assert json.loads(row["config"]) == {"blocks": 2, "lr": 0.001}
    assert json.loads(row["metrics"]) == {"ndcg@10": 0.15}
    assert row["wall_time_s"] >= 0
    assert row["hardware"].startswith(("CPU", "GPU"))
    metrics = log.metrics(run_id)
    assert metrics.filter(metrics["name"] == "ndcg@10")["value"].to_list() == [0.1, 0.15]


def test_unknown_status_is_rejected(warehouse_path: Path) -> None:
    log = RunLog(warehouse_path)
    run_id = log.start("eval", "x", config={}, data_version=None)
    with pytest.raises(ValueError, match="status must be one of"):
        log.finish(run_id, status="done")


def test_only_runs_of_gone_processes_are_marked_interrupted(tmp_path) -> None:
    import subprocess
    import sys

    path = tmp_path / "warehouse.duckdb"
    log = RunLog(path)
    mine = log.start("retrieval", "sasrec", config={}, data_version="v1")
    code = (
        "import sys; from recsys.warehouse.runs import RunLog; "
        "print(RunLog(sys.argv[1]).start('ranking', 'din', config={}, data_version='v1'))"
    )
    killed = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()

    assert log.close_orphaned() == [killed]
    status = dict(zip(log.runs()["run_id"], log.runs()["status"], strict=True))
    assert status == {mine: "running", killed: "interrupted"}
