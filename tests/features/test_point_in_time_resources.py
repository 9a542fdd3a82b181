"""Chunked builds: the user-chunk size and DuckDB limits never change ``<ds>.examples``."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from pydantic import ValidationError

from recsys.features.config import FeatureConfig
from recsys.features.point_in_time import BuildResources, build_examples
from recsys.warehouse import Warehouse
from tests.features.conftest import (
    DAY,
    clicks_as_events,
    items_for,
    publish_dataset,
    random_events,
    random_impressions,
    users_for,
)

CFG = FeatureConfig(decay_half_lives_s=(DAY, 30 * DAY))


def _examples(wh: Warehouse, ds: str, key: list[str]) -> pl.DataFrame:
    return wh.table(f"{ds}.examples").sort(key)


def _assert_same(a: pl.DataFrame, b: pl.DataFrame) -> None:
    assert a.schema == b.schema
    assert a.height == b.height
    for c in a.columns:
        if a[c].dtype == pl.Float64:  # chunked prefix sums round differently in the last bits only
            diff = ((a[c] - b[c]).abs() <= 1e-12 * b[c].abs() + 1e-12) | (a[c].is_null() & b[c].is_null())
            assert diff.all(), c
        else:
            assert a[c].to_list() == b[c].to_list(), c


def test_tiny_chunks_give_the_same_event_examples(tmp_path: Path) -> None:
    ev = random_events(1_500, 40, 30, seed=11)
    ev = ev.with_columns(value=pl.when(pl.col("src_row") % 7 == 0).then(None).otherwise(pl.col("value")))
    key = ["user_id", "pos"]
    with Warehouse(tmp_path / "a.duckdb") as a, Warehouse(tmp_path / "b.duckdb") as b:
        publish_dataset(a, "rnd", ev, users=users_for(ev), items=items_for(ev))
        publish_dataset(b, "rnd", ev, users=users_for(ev), items=items_for(ev))
        build_examples(a, "rnd", CFG)
        small = BuildResources(chunk_events=37, memory_limit="256MB", temp_directory=tmp_path / "spill")
        build_examples(b, "rnd", CFG, small)
        got, want = _examples(b, "rnd", key), _examples(a, "rnd", key)
        assert got.height == ev.filter(pl.col("value").is_not_null()).height
        _assert_same(got, want)
        # The limits are the build's only: the connection gets its own setting back, parts are removed.
        assert b.con.execute("SELECT current_setting('memory_limit')").fetchall()[0][0] != "244.1 MiB"
        assert not list((tmp_path / "spill").glob("rnd-examples-*"))


def test_tiny_chunks_give_the_same_impression_examples(tmp_path: Path) -> None:
    imp = random_impressions(400, 5, 25, 30, seed=7)
    ev = clicks_as_events(imp)
    key = ["ts", "request_id", "position"]
    with Warehouse(tmp_path / "a.duckdb") as a, Warehouse(tmp_path / "b.duckdb") as b:
        for wh in (a, b):
            publish_dataset(wh, "syn", ev, users=users_for(imp), items=items_for(imp), impressions=imp)
        build_examples(a, "syn", CFG)
        build_examples(b, "syn", CFG, BuildResources(chunk_events=20))
        _assert_same(_examples(b, "syn", key), _examples(a, "syn", key))


def test_bad_memory_limit_is_named() -> None:
    with pytest.raises(ValidationError, match="memory_limit"):
        BuildResources(memory_limit="lots")
    with pytest.raises(ValidationError, match="chunk_events"):
        BuildResources(chunk_events=0)
