from __future__ import annotations

import multiprocessing as mp
import os
import signal
from pathlib import Path

import polars as pl
import pytest

from recsys.warehouse import Warehouse, WarehouseError


def test_publish_records_version_and_lineage(warehouse_path: Path) -> None:
    with Warehouse(warehouse_path) as wh:
        v = wh.publish("ds.events", "SELECT range AS x FROM range(5)", inputs={"src": "abc"}, params={"k": 1})
        assert wh.table("ds.events")["x"].to_list() == [0, 1, 2, 3, 4]
        assert wh.version("ds.events") == v.version
        assert v.row_count == 5
        assert wh.is_fresh("ds.events", v.input_key)
        assert not wh.is_fresh("ds.events", "other-key")


def test_version_is_a_content_hash(warehouse_path: Path) -> None:
    with Warehouse(warehouse_path) as wh:
        a = wh.publish("a", "SELECT range AS x FROM range(10)")
        b = wh.publish("b", pl.DataFrame({"x": list(reversed(range(10)))}))
        c = wh.publish("c", "SELECT range + 1 AS x FROM range(10)")
    assert a.version == b.version  # same rows, other order
    assert a.version != c.version


def test_failed_publish_keeps_previous_version(warehouse_path: Path) -> None:
    with Warehouse(warehouse_path) as wh:
        good = wh.publish("t", "SELECT 1 AS x")
        with pytest.raises(Exception, match="no_such_table"):
            wh.publish("t", "SELECT * FROM no_such_table")
        assert wh.table("t")["x"].to_list() == [1]
        assert wh.version("t") == good.version


def _publish_then_die(path: str) -> None:
    wh = Warehouse(path)
    wh.con.execute("BEGIN TRANSACTION")
    wh.con.execute("CREATE OR REPLACE TABLE t AS SELECT range AS x FROM range(1000)")
    os.kill(os.getpid(), signal.SIGKILL)  # killed mid-transaction, as `kill -9` would


def test_killed_writer_leaves_previous_version(warehouse_path: Path) -> None:
    with Warehouse(warehouse_path) as wh:
        wh.publish("t", "SELECT 1 AS x")
    proc = mp.get_context("spawn").Process(target=_publish_then_die, args=(str(warehouse_path),))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    with Warehouse(warehouse_path) as wh:
        assert wh.table("t")["x"].to_list() == [1]


def test_bad_names_and_missing_tables_are_clear_errors(warehouse_path: Path) -> None:
    with Warehouse(warehouse_path) as wh:
        with pytest.raises(WarehouseError, match="must be 'table' or 'schema.table'"):
            wh.publish("drop table x; --", "SELECT 1")
        with pytest.raises(WarehouseError, match="'nope' is not in the warehouse"):
            wh.table("nope")
        with pytest.raises(WarehouseError, match="no published version"):
            wh.version("nope")


def test_read_only_handle_needs_an_existing_file(tmp_path: Path) -> None:
    with pytest.raises(WarehouseError, match="does not exist"):
        Warehouse(tmp_path / "missing.duckdb", read_only=True)


def test_publish_many_commits_all_or_nothing(warehouse_path: Path) -> None:
    with Warehouse(warehouse_path) as wh:
        wh.publish_many({"ds.a": "SELECT 1 AS x", "ds.b": "SELECT x + 1 AS y FROM ds.a"}, inputs={"s": "1"})
        assert wh.table("ds.b")["y"].to_list() == [2]
        assert wh.latest("ds.a").input_key == wh.latest("ds.b").input_key
        with pytest.raises(Exception, match="missing"):
            wh.publish_many({"ds.a": "SELECT 5 AS x", "ds.b": "SELECT * FROM missing"})
        assert wh.table("ds.a")["x"].to_list() == [1]
        wh.publish_many({"ds.c": "SELECT 1 AS z"}, drop=["ds.b"])
        assert not wh.has_table("ds.b")
