"""README "Use your own data": its commands, run as written on a generated click log (string ids, ISO
times, an event type; no rating, no impressions): `recsys features build`, then `recsys pipeline` (with a
tiny config appended that keeps only the ranking stage). Real Prefect runs in subprocesses."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recsys.flows.stage_cache import history
from recsys.warehouse import Warehouse
from tests.conftest import REPO_ROOT
from tests.features.test_implicit import write_click_log

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TINY = {
    "stages": ["ranking"],
    "ranking": {
        "models": ["deepfm"],
        "short_len": 8,
        "long_len": 16,
        "data": {"max_train_examples": 2000, "max_valid_examples": 500, "max_test_examples": 500},
        "loop": {"monitor": "auc", "mode": "max", "max_epochs": 1, "patience": 1, "progress": False},
    },
    "torch_threads": 1,
}


def readme_commands(section: str = "## Use your own data") -> list[list[str]]:
    """The ``.venv/bin/recsys`` lines of the section's bash block, continuations joined."""
    text = (REPO_ROOT / "README.md").read_text()
    body = text.split(section, 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", body, flags=re.S)
    assert block, f"README {section!r} has no bash block"
    joined = block.group(1).replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines() if line.startswith(".venv/bin/recsys ")]


def _run(argv: list[str], cwd: Path, home: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "BENTOML_"))}
    env |= {"RECSYS_HOME": str(home), "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "recsys.flows.cli", *argv[1:]]  # argv[0] is .venv/bin/recsys
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (
        f"{shlex.join(argv)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout


def test_the_readme_commands_run_a_click_log_through_features_and_ranking(tmp_path: Path) -> None:
    commands = readme_commands()
    assert [c[1] for c in commands] == ["features", "pipeline"]
    write_click_log(tmp_path / "clicks.csv", n=800)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    home = tmp_path / "home"

    out = _run(commands[0], tmp_path, home)
    figures = dict(line.split(None, 1) for line in out.splitlines() if line and not line.startswith(" "))
    assert figures["dataset"] == "clicks" and int(figures["events"]) == 800
    # 800 positives, about 4 sampled negatives each (none for the very first interactions).
    assert 3_500 < int(figures["examples"]) <= 4_000
    assert 0.19 < float(figures["positive_rate"]) < 0.25

    _run([*commands[1], "--config", "tiny.yaml"], tmp_path, home)
    stages = {row["stage"]: json.loads(row["result"]) for row in history(home / "warehouse.duckdb")}
    assert set(stages) == {"ranking"}
    test = stages["ranking"]["models"]["deepfm"]["test"]
    assert 0.0 < test["auc"] < 1.0 and test["log_loss"] > 0
    with Warehouse(home / "warehouse.duckdb", read_only=True) as wh:
        ids = wh.sql("SELECT raw_id FROM clicks.user_ids ORDER BY user_id LIMIT 1")["raw_id"][0]
        runs = wh.sql("SELECT kind, name, status FROM runs WHERE kind = 'ranking'")
    assert ids.startswith("u-")  # the string ids were mapped, the mapping kept
    assert runs.rows() == [("ranking", "deepfm", "finished")]
