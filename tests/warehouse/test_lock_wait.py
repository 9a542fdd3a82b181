"""Opening the warehouse while another process holds it: DuckDB refuses at once; the warehouse waits (up to
``RECSYS_WAREHOUSE_LOCK_WAIT_S``), so a job that finishes while another one writes does not lose its write."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from recsys.warehouse import Warehouse
from recsys.warehouse.store import default_lock_wait_s

HOLDER = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1])
con.execute("CREATE TABLE IF NOT EXISTS held (x INTEGER)")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
con.close()
"""


def _hold(path: Path, seconds: float) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_an_open_waits_for_another_process_to_release_the_file(warehouse_path: Path) -> None:
    holder = _hold(warehouse_path, 1.5)
    try:
        start = time.monotonic()
        with Warehouse(warehouse_path) as wh, wh.transaction() as con:  # writes once the holder is done
            con.execute("CREATE TABLE mine AS SELECT 1 AS x")
        assert time.monotonic() - start > 0.5
    finally:
        holder.wait(timeout=30)
    with Warehouse(warehouse_path, read_only=True) as wh:
        assert wh.has_table("mine") and wh.has_table("held")


def test_the_wait_is_bounded_and_zero_fails_at_once(warehouse_path: Path, monkeypatch) -> None:
    Warehouse(warehouse_path).close()
    holder = _hold(warehouse_path, 5.0)
    try:
        start = time.monotonic()
        with pytest.raises(duckdb.IOException, match="lock"):
            Warehouse(warehouse_path, read_only=True, lock_wait_s=0.0)
        monkeypatch.setenv("RECSYS_WAREHOUSE_LOCK_WAIT_S", "0.3")
        with pytest.raises(duckdb.IOException, match="lock"):
            Warehouse(warehouse_path)
        assert time.monotonic() - start < 3.0
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_a_bad_wait_setting_names_the_variable(monkeypatch) -> None:
    monkeypatch.setenv("RECSYS_WAREHOUSE_LOCK_WAIT_S", "soon")
    with pytest.raises(ValueError, match="RECSYS_WAREHOUSE_LOCK_WAIT_S"):
        default_lock_wait_s()
    monkeypatch.setenv("RECSYS_WAREHOUSE_LOCK_WAIT_S", "-1")
    with pytest.raises(ValueError, match="RECSYS_WAREHOUSE_LOCK_WAIT_S"):
        default_lock_wait_s()
