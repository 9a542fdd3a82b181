"""The crash-recovery benchmark's own logic: where kill points go, how a kill's landing is read from the
run's markers, and what counts as a leftover. (The real kills: tests/flows/test_pipeline_e2e.py.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from recsys.benchmarks.crash_recovery import STAGES, leftovers, marker_stage, plan_kill_points

TIMES = {"features": 4.3, "retrieval": 5.2, "ranking": 2.2, "distill": 22.2, "package": 3.3, "ab": 6.5}


def test_every_stage_gets_a_point_and_the_plan_is_seeded() -> None:
    plan = plan_kill_points(TIMES, 10, seed=0)
    assert len(plan) == 10
    assert {p.stage for p in plan} == set(STAGES)
    assert plan == sorted(plan, key=lambda p: (STAGES.index(p.stage), p.offset_s))
    for p in plan:
        assert 0.05 * TIMES[p.stage] <= p.offset_s <= 0.95 * TIMES[p.stage]
    assert plan_kill_points(TIMES, 10, seed=0) == plan
    assert plan_kill_points(TIMES, 10, seed=1) != plan
    # Fewer points than stages: the longest stages first.
    assert {p.stage for p in plan_kill_points(TIMES, 2, seed=0)} == {"distill", "ab"}
    with pytest.raises(ValueError, match="no stage times"):
        plan_kill_points({}, 3, seed=0)


def test_markers_name_the_stage_a_line_opens() -> None:
    prefix = "00:43:50.486 | INFO    | Flow run 'normal-mushroom' - "
    assert marker_stage(prefix + "pipeline on synthetic: stages features -> retrieval") == "features"
    assert marker_stage(prefix + "stage retrieval: starting") == "retrieval"
    assert marker_stage(prefix + "stage ab: unchanged inputs (key 0a17), skipped") == "ab"
    assert marker_stage(prefix + "pipeline finished: {'features': 4.3}") == "end"
    assert marker_stage(prefix + "retrieval: sasrec done (1/2, 50%)") is None


def test_leftovers_are_hidden_entries_unlinked_units_and_wal_files(tmp_path: Path) -> None:
    run = tmp_path / "artifacts" / "sasrec" / "seed0-abc"
    run.mkdir(parents=True)
    token, stale = "a" * 32, "b" * 32
    for name in (f"last@{token}", f"best@{token}", f"best@{stale}"):
        (run / name).mkdir()
    os.symlink(f"last@{token}", run / "last")
    os.symlink(f"best@{token}", run / "best")
    (tmp_path / "warehouse.duckdb").write_text("")
    assert leftovers(tmp_path) == [f"unlinked checkpoint unit: artifacts/sasrec/seed0-abc/best@{stale}"]

    (tmp_path / "exports").mkdir()
    (tmp_path / "exports" / ".v1.123-456.abcd.tmp").mkdir()
    (tmp_path / "warehouse.duckdb.wal").write_text("")
    assert leftovers(tmp_path) == [
        "hidden: exports/.v1.123-456.abcd.tmp",
        f"unlinked checkpoint unit: artifacts/sasrec/seed0-abc/best@{stale}",
        "write-ahead log: warehouse.duckdb.wal",
    ]
