"""The main job as a user runs it: `recsys pipeline` in a subprocess, interrupted with kill -9, re-run.

Three homes' worth of real runs on the tiny synthetic preset: an uninterrupted reference; a run killed with
SIGKILL in the middle of the retrieval stage (after its first epoch checkpoint) and then re-run to the end;
and a third invocation on that home with nothing changed, which must skip every stage. The interrupted home
must end with the same tables (content versions), the same metrics and the same registered model tags
(content-addressed) as the reference, and with no temp file, no half-written table and no run left
'running'.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from recsys.flows.stage_cache import history
from recsys.warehouse import Warehouse
from recsys.warehouse.runs import RunLog

pytestmark = pytest.mark.timeout(1500)

CONFIG = {
    "dataset": {"kind": "synthetic", "synthetic_preset": "tiny"},
    "retrieval_models": ["popularity", "sasrec"],
    "retrieval_loop": {"max_epochs": 3, "patience": 3, "progress": False},
    "ranking": {
        "models": ["deepfm"],
        "short_len": 20,
        "long_len": 50,
        "data": {"max_train_examples": 4000, "max_valid_examples": 2000, "max_test_examples": 2000},
        "loop": {"monitor": "auc", "mode": "max", "max_epochs": 1, "patience": 1, "progress": False},
    },
    "torch_threads": 1,
}
RECSYS = [sys.executable, "-m", "recsys.flows.cli"]


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "BENTOML_"))}
    env["RECSYS_HOME"] = str(home)
    return env


def _start(home: Path, config: Path, log: Path) -> subprocess.Popen[bytes]:
    home.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            [*RECSYS, "pipeline", "--config", str(config)],
            env=_env(home),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: kill -9 reaches the Prefect server child too
            cwd=Path(__file__).resolve().parents[2],
        )


def _run(home: Path, config: Path, log: Path, timeout: float = 900) -> None:
    proc = _start(home, config, log)
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 0, f"pipeline exited {code}:\n{log.read_text()[-4000:]}"


def _stages(home: Path) -> dict[str, dict]:
    """The newest record of each stage."""
    out: dict[str, dict] = {}
    for row in history(home / "warehouse.duckdb"):
        out.setdefault(row["stage"], json.loads(row["result"]))
    return out


def _table_versions(home: Path) -> dict[str, str]:
    """Latest content version per table; the A/B tables carry their experiment's id and clock times, so
    they are compared through the stage's readout instead."""
    with Warehouse(home / "warehouse.duckdb", read_only=True) as wh:
        rows = wh.con.execute(
            "SELECT table_name, arg_max(version, created_at) FROM lineage GROUP BY table_name"
        ).fetchall()
    return {name: v for name, v in rows if not name.split(".")[-1].startswith("ab_")}


@pytest.fixture(scope="module")
def homes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    reference, interrupted = root / "reference", root / "interrupted"
    _run(reference, config, root / "reference.log")

    log = root / "interrupted.log"
    proc = _start(interrupted, config, log)
    deadline = time.monotonic() + 900
    checkpoints = interrupted / "artifacts" / "retrieval" / "synthetic" / "sasrec"
    try:
        while not list(checkpoints.glob("*/last/state.pt")):
            tail = log.read_text()[-3000:]
            assert proc.poll() is None, f"pipeline ended before it could be interrupted:\n{tail}"
            assert time.monotonic() < deadline, "the retrieval stage never wrote its first checkpoint"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert "retrieval" not in _stages(interrupted), "the kill landed after the retrieval stage had finished"
    _run(interrupted, config, log)
    return {"root": root, "config": config, "reference": reference, "interrupted": interrupted}


def test_interrupted_run_ends_with_the_reference_results(homes: dict[str, Path]) -> None:
    ref, got = _stages(homes["reference"]), _stages(homes["interrupted"])
    assert set(ref) == set(got) == {"retrieval", "ranking", "distill", "package", "ab"}
    for name in ("popularity", "sasrec"):
        for metric, value in ref["retrieval"]["models"][name]["test"].items():
            assert got["retrieval"]["models"][name]["test"][metric] == pytest.approx(value, abs=1e-6), metric
    assert got["ranking"]["models"]["deepfm"]["test"]["auc"] == pytest.approx(
        ref["ranking"]["models"]["deepfm"]["test"]["auc"], abs=1e-6
    )
    assert got["distill"]["auc"] == pytest.approx(ref["distill"]["auc"], abs=1e-6)
    # The in-process arms draw their request ids (which seed the served slates) from the simulation's seed,
    # so the A/B readout is reproduced to the last digit.
    assert got["ab"]["arms"] == ref["ab"]["arms"]
    assert got["ab"]["table"] == ref["ab"]["table"]
    # Registered models are content-addressed: equal tags mean byte-identical weights and catalogue.
    assert got["package"]["retriever"] == ref["package"]["retriever"]
    assert got["package"]["control"] == ref["package"]["control"]
    # The bento's ranker is the distilled student, registered under the stable name and reproduced exactly.
    assert ref["package"]["ranker"].startswith("synthetic-ranker:")
    assert ref["package"]["ranker_architecture"] == ref["distill"]["student"]["architecture"]
    assert got["package"]["ranker"] == ref["package"]["ranker"]
    report = (homes["reference"] / "reports" / "pipeline_synthetic.md").read_text()
    assert f"ranker `{ref['package']['ranker']}`" in report
    assert _table_versions(homes["interrupted"]) == _table_versions(homes["reference"])


def test_interrupted_run_leaves_nothing_half_written(homes: dict[str, Path]) -> None:
    home = homes["interrupted"]
    assert not [p for p in home.rglob(".*.tmp") if p.is_file()]
    runs = RunLog(home / "warehouse.duckdb").runs()
    assert "running" not in runs["status"].to_list()
    with Warehouse(home / "warehouse.duckdb", read_only=True) as wh:
        for table_name, row_count in wh.con.execute(
            "SELECT table_name, arg_max(row_count, created_at) FROM lineage GROUP BY table_name"
        ).fetchall():
            (actual,) = wh.con.execute(f"SELECT count(*) FROM {table_name}").fetchall()[0]
            assert actual == row_count, table_name


def test_second_run_with_nothing_changed_skips_every_stage(homes: dict[str, Path]) -> None:
    home = homes["reference"]
    before = len(history(home / "warehouse.duckdb"))
    log = homes["root"] / "rerun.log"
    _run(home, homes["config"], log)
    text = log.read_text()
    for stage in ("retrieval", "ranking", "distill", "package", "ab"):
        assert f"stage {stage}: unchanged inputs" in text, stage
    assert len(history(home / "warehouse.duckdb")) == before  # no stage re-ran, so none re-recorded


def test_changed_config_reruns_only_the_stages_that_depend_on_it(homes: dict[str, Path]) -> None:
    home = homes["reference"]
    changed = dict(CONFIG, ranking={**CONFIG["ranking"], "short_len": 10})
    config = homes["root"] / "changed.yaml"
    config.write_text(yaml.safe_dump(changed))
    log = homes["root"] / "changed.log"
    _run(home, config, log)
    text = log.read_text()
    for stage in ("retrieval", "distill", "package", "ab"):
        assert f"stage {stage}: unchanged inputs" in text, stage
    assert "stage ranking: unchanged inputs" not in text
