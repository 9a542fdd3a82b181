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
