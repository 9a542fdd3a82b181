"""Several processes on one state directory at once, as an operator runs them: the service answering
requests, the nightly continual job, a pipeline, and a second pipeline started while the first runs.

Every process is real (``recsys serve``, the nightly flow, ``recsys pipeline`` twice), each in its own
process group, all on one ``RECSYS_HOME`` and one local Prefect API. The interleaving that matters is pinned
with SIGSTOP/SIGCONT instead of left to timing: the nightly job is frozen while its run is ``running`` (a
live run of a live process), then the first pipeline starts and does its start-up clean-up (the owner-aware
temp sweep and the relabelling of orphaned runs), then that pipeline is frozen, holding the state
directory's lock, while the second pipeline starts. Then both are resumed and everything runs to the end.

Outcomes checked: the nightly run is still ``running`` after the pipeline's clean-up and ends ``finished``
with its period's results written; the pipeline cleaned up nothing (nothing here was ever killed) and
finished its stages; the second pipeline was refused (exit 2, the lock's message), leaving no record; every
answer the service gave is in its impressions spool (no lost write); no run is left ``running`` or marked
``interrupted`` and no temp file is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import httpx
import pytest
import yaml

from recsys.benchmarks.crash_recovery import PipelineProcess, prefect_server, stage_records
from recsys.serving.impressions import read_spool
from tests.serving.test_operations import free_port, kill_tree, start_cli_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO_ROOT = Path(__file__).resolve().parents[2]
PIPELINE = {
    "dataset": {"kind": "synthetic", "synthetic_preset": "tiny"},
    "stages": ["features", "ranking"],
    "ranking": {
        "models": ["deepfm"],
        "short_len": 20,
        "long_len": 50,
        "data": {"max_train_examples": 4000, "max_valid_examples": 2000, "max_test_examples": 2000},
        "loop": {"monitor": "auc", "mode": "max", "max_epochs": 1, "patience": 1, "progress": False},
    },
    "torch_threads": 1,
}
# Two of three periods learned up front, so that the nightly job has one to learn; many epochs per period
# keep its run 'running' for a few seconds.
SETUP = """
import json, sys
from pathlib import Path
from recsys.experiments.continual import ContinualConfig, run_continual
from recsys.synthetic.config import CatalogueConfig, SessionConfig, SyntheticConfig, UserConfig
from recsys.training.continual import ContinualTrainConfig
from recsys.benchmarks.serving_load import _register_bench_model

synthetic = SyntheticConfig(
    seed=7,
    catalogue=CatalogueConfig(n_items=120, n_categories=4, n_creators=15),
    users=UserConfig(n_users=20),
    sessions=SessionConfig(requests_per_user_mean=15, horizon_days=30, slate_size=5, pool_size=10),
)
train = ContinualTrainConfig(
    n_periods=3, served_len=4, privileged_len=16, batch_size=64, epochs_first=1, epochs=10
)
config = ContinualConfig(
    dataset="syn_night", synthetic=synthetic, methods=("finetune",), train=train, stop_after=2
)
run_continual(config, echo=lambda message: None)
tag, users, _ = _register_bench_model(Path(sys.argv[1]))
print(json.dumps({"tag": tag, "users": users[:100], "experiment_id": config.experiment_id}))
"""
NIGHTLY = (
    "from recsys.flows.continual import nightly_incremental_flow as f; print(f('syn_night', 'finetune'))"
)


def _env(home: Path, api: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "BENTOML_", "RECSYS_"))}
    return env | {"RECSYS_HOME": str(home), "PREFECT_API_URL": api, "PYTHONUNBUFFERED": "1"} | extra


def _query(home: Path, sql: str) -> list[tuple]:
    """A read-only look at the warehouse, waiting while a writer holds its lock."""
    deadline = time.monotonic() + 60
    while True:
        try:
            with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as con:
                return con.execute(sql).fetchall()
        except (duckdb.IOException, duckdb.CatalogException):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _freeze_while_running(process: subprocess.Popen[bytes], home: Path, sql: str, log: Path) -> str:
    """SIGSTOP ``process`` at a moment its run is 'running' and it holds no warehouse handle; the run id.

    Frozen while holding DuckDB's lock it would block every other process, so such a freeze is undone
    and tried again; the run's training is short, so there is no fixed wait for a quiet moment."""
    deadline = time.monotonic() + 300
    while True:
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the nightly job's run was never caught running"
        if _query(home, sql):
            os.killpg(process.pid, signal.SIGSTOP)
            try:
                with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as con:
                    rows = con.execute(sql).fetchall()
            except duckdb.IOException:  # frozen holding the warehouse
                rows = []
            if rows:
                return str(rows[0][0])
            os.killpg(process.pid, signal.SIGCONT)
        time.sleep(0.005)


class Client(threading.Thread):
    """Sends /recommend requests back to back until stopped; keeps every answered request id."""

    def __init__(self, url: str, users: list[int]) -> None:
        super().__init__(daemon=True)
        self.url, self.users = url, users
        self.served: list[int] = []
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30.0) as client:
            i = 0
            while not self.stop.is_set():
                response = client.post(
                    "/recommend", json={"user_id": self.users[i % len(self.users)], "k": 5}
                )
                i += 1
                if response.status_code == 200:
                    self.served.append(response.json()["request_id"])
                else:
                    self.errors.append(f"{response.status_code}: {response.text[:200]}")


@pytest.fixture
def api(tmp_path: Path) -> Iterator[str]:
    with prefect_server(tmp_path / "prefect-server") as url:
        yield url


def test_service_nightly_job_and_two_pipelines_share_one_home(tmp_path: Path, api: str) -> None:
    home = tmp_path / "home"
    home.mkdir()
    setup = subprocess.run(
        [sys.executable, "-c", SETUP, str(tmp_path / "no-ml100k")],
        env=_env(home, api),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert setup.returncode == 0, setup.stderr[-3000:]
    prepared = json.loads(setup.stdout.strip().splitlines()[-1])
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(PIPELINE))

    port = free_port()
    server = start_cli_server(
        _env(home, api, RECSYS_SERVING_WORKERS="1", RECSYS_SERVING_TORCH_THREADS="1"),
        port,
        tmp_path / "serve.log",
        prepared["tag"],
    )
    client = Client(f"http://127.0.0.1:{port}", prepared["users"])
    nightly = pipeline = None
    try:
        client.start()
        # The nightly job, frozen while its run is 'running'.
        with open(tmp_path / "nightly.log", "wb") as out:
            nightly = subprocess.Popen(
                [sys.executable, "-c", NIGHTLY],
                env=_env(home, api),
                cwd=REPO_ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        running_sql = "SELECT run_id FROM runs WHERE kind = 'continual' AND status = 'running'"
        nightly_run = _freeze_while_running(nightly, home, running_sql, tmp_path / "nightly.log")

        # The first pipeline starts (and cleans up) while the nightly run is live; it is frozen in its
        # first stage, holding the state directory's lock.
        pipeline = PipelineProcess.start(home, tmp_path / "tmp", config, tmp_path / "pipeline.log", api)
        assert pipeline.wait_for_stage("features", timeout=300) is not None, pipeline.log.read_text()[-3000:]
        assert _query(home, f"SELECT status FROM runs WHERE run_id = '{nightly_run}'") == [("running",)]
        os.killpg(pipeline.process.pid, signal.SIGSTOP)

        # The second pipeline is refused by the lock and records nothing.
        second = PipelineProcess.start(home, tmp_path / "tmp", config, tmp_path / "second.log", api)
        assert second.finish(timeout=300) == 2
        refusal = second.log.read_text()
        assert "another pipeline" in refusal and "Traceback" not in refusal

        os.killpg(pipeline.process.pid, signal.SIGCONT)
        os.killpg(nightly.pid, signal.SIGCONT)
        assert pipeline.finish(timeout=600) == 0, pipeline.log.read_text()[-3000:]
        assert nightly.wait(timeout=600) == 0, (tmp_path / "nightly.log").read_text()[-3000:]
    finally:
        client.stop.set()
        client.join(timeout=60)
        for process in (nightly, pipeline.process if pipeline else None):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        # SIGTERM: a graceful stop, which flushes the impressions spool.
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            kill_tree(server)

    log = pipeline.log.read_text()
    assert "cleaned up after an interrupted run" not in log  # nothing here was killed: nothing to clean
    assert "stage ranking: starting" in log and set(stage_records(home)) == {"ranking"}
    assert _query(home, f"SELECT status FROM runs WHERE run_id = '{nightly_run}'") == [("finished",)]
    steps = _query(home, "SELECT DISTINCT step FROM main.continual_results ORDER BY step")
    assert steps == [(1,), (2,), (3,)]  # the nightly job wrote the third period's results
    assert _query(home, "SELECT count(*) FROM runs WHERE status IN ('running', 'interrupted')") == [(0,)]

    assert client.errors == [] and len(client.served) > 0
    logged = set(read_spool(home / "serving" / "impressions")["request_id"].to_list())
    assert set(client.served) == logged  # every answer served was logged, and nothing else
    assert not [p for p in home.rglob(".*.tmp")]
