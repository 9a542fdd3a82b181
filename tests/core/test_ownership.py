"""Owner tags (pid + start time) and the sweep that removes only the temps of processes that are gone."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recsys.core.atomic import atomic_path
from recsys.core.ownership import is_alive, owner_tag, sweep_stale_temps, tag_in_name


def _dead_tag() -> str:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"])
    tag = owner_tag(proc.pid)
    proc.wait()
    return tag


def test_own_tag_is_alive_and_an_exited_process_is_not() -> None:
    assert is_alive(owner_tag())
    assert not is_alive(_dead_tag())
    # Same pid, another start time: a reused pid is not the owner.
    pid, _, start = owner_tag().partition("-")
    assert not is_alive(f"{pid}-{int(start) + 500}")
    with pytest.raises(ValueError, match="owner tag"):
        is_alive("1234")


def test_atomic_path_names_its_temp_after_the_owner(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "table.parquet") as tmp:
        assert tag_in_name(tmp.name) == owner_tag()
        tmp.write_text("x")
    assert (tmp_path / "table.parquet").read_text() == "x"


def test_sweep_keeps_live_temps_and_removes_dead_and_old_unowned_ones(tmp_path: Path) -> None:
    live = tmp_path / f".a.parquet.{owner_tag()}.r1.tmp"
    dead = tmp_path / "sub" / f".b.parquet.{_dead_tag()}.r2.tmp"
    dead_dir = tmp_path / f".last.{_dead_tag()}.r3.tmp"
    fresh_unowned = tmp_path / ".c.parquet.abc123.tmp"
    old_unowned = tmp_path / ".d.parquet.def456.tmp"
    dead.parent.mkdir()
    for p in (live, dead, fresh_unowned, old_unowned):
        p.write_text("x")
    dead_dir.mkdir()
    (dead_dir / "weights.safetensors").write_text("x")
    hour_ago = time.time() - 7200
    os.utime(old_unowned, (hour_ago, hour_ago))

    removed = set(sweep_stale_temps(tmp_path))

    assert removed == {dead, dead_dir, old_unowned}
    assert live.exists() and fresh_unowned.exists()


def test_a_cleanup_beside_a_live_writer_leaves_its_temp_and_run_alone_until_it_dies(tmp_path: Path) -> None:
    """Another process is mid-write (an owned temp file) and mid-run (a 'running' run): a second process's
    clean-up touches neither; once the writer is killed, the same clean-up removes and relabels both."""
    from recsys.flows.stage_cache import close_interrupted_runs
    from recsys.warehouse.runs import RunLog

    warehouse = tmp_path / "warehouse.duckdb"
    RunLog(warehouse)
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from recsys.core.atomic import atomic_path\n"
        "from recsys.warehouse.runs import RunLog\n"
        "run = RunLog(sys.argv[1]).start('ranking', 'din', config={}, data_version='v1')\n"
        "with atomic_path(Path(sys.argv[2]) / 'table.parquet') as tmp:\n"
        "    tmp.write_text('half written')\n"
        "    print(run, tmp, flush=True)\n"
        "    time.sleep(60)\n"
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", code, str(warehouse), str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        run_id, temp = writer.stdout.readline().split()
        assert sweep_stale_temps(tmp_path) == [] and close_interrupted_runs(warehouse) == 0
        assert Path(temp).exists()
        assert RunLog(warehouse).runs()["status"].to_list() == ["running"]
    finally:
        writer.kill()
        writer.wait()
    assert sweep_stale_temps(tmp_path) == [Path(temp)] and close_interrupted_runs(warehouse) == 1
    assert RunLog(warehouse).runs()["status"].to_list() == ["interrupted"]
