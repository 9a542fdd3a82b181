"""Partitioned feature build (serial map here; tests/flows/test_parallel_features.py runs it on Dask)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from pydantic import ValidationError

from recsys.features.config import FeatureConfig
from recsys.features.partitioned import PartitionConfig, build_partitioned, user_partition
from recsys.features.point_in_time import build_examples
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


def _assert_same(got: pl.DataFrame, want: pl.DataFrame) -> None:
    """Same schema, rows and order; float64 columns within 1e-12 relative (features.partitioned doc)."""
    assert got.schema == want.schema
    assert got.height == want.height
    for c in got.columns:
        if got[c].dtype == pl.Float64:
            close = (got[c] - want[c]).abs() <= 1e-12 * want[c].abs() + 1e-12
            assert (close | (got[c].is_null() & want[c].is_null())).all(), c
        else:
            assert got[c].to_list() == want[c].to_list(), c


def _two_warehouses(tmp_path: Path, ev: pl.DataFrame, imp: pl.DataFrame | None) -> tuple[Path, Path]:
    paths = tmp_path / "single.duckdb", tmp_path / "parts.duckdb"
    for path in paths:
        with Warehouse(path) as wh:
            who = imp if imp is not None else ev
            publish_dataset(wh, "ds", ev, users=users_for(who), items=items_for(who), impressions=imp)
    return paths


@pytest.mark.parametrize("partitions", [1, 3, 7])
def test_event_examples_equal_the_single_process_build(tmp_path: Path, partitions: int) -> None:
    ev = random_events(2_000, 50, 40, seed=5)
    ev = ev.with_columns(value=pl.when(pl.col("src_row") % 7 == 0).then(None).otherwise(pl.col("value")))
    single, parts = _two_warehouses(tmp_path, ev, None)
    with Warehouse(single) as wh:
        build_examples(wh, "ds", CFG)
        want_seq, want_ex = wh.table("ds.sequences"), wh.table("ds.examples").sort("user_id", "pos")
        want_seq_version = wh.version("ds.sequences")
    built = build_partitioned(
        parts, "ds", CFG, PartitionConfig(partitions=partitions, work_dir=tmp_path / "w")
    )
    assert built.sequences.version == want_seq_version  # identical content
    assert built.examples.row_count == ev["value"].is_not_null().sum()
    assert not list((tmp_path / "w").iterdir())  # temp parts removed
    with Warehouse(parts) as wh:
        assert wh.table("ds.sequences").equals(want_seq)  # same rows in the same (user_idx) order
        _assert_same(wh.table("ds.examples").sort("user_id", "pos"), want_ex)
        # Same cache keys as the single-process build: it finds the tables fresh and rebuilds nothing.
        assert build_examples(wh, "ds", CFG).version == built.examples.version
        lineage = int(wh.con.execute("SELECT count(*) FROM lineage").fetchall()[0][0])
    again = build_partitioned(parts, "ds", CFG, PartitionConfig(partitions=partitions))
    assert again.examples.version == built.examples.version
    with Warehouse(parts, read_only=True) as wh:
        assert int(wh.con.execute("SELECT count(*) FROM lineage").fetchall()[0][0]) == lineage


def test_impression_examples_equal_the_single_process_build(tmp_path: Path) -> None:
    imp = random_impressions(300, 5, 30, 25, seed=9)
    ev = clicks_as_events(imp)
    single, parts = _two_warehouses(tmp_path, ev, imp)
    key = ["ts", "request_id", "position"]
    with Warehouse(single) as wh:
        build_examples(wh, "ds", CFG)
        want_ex, want_seq = wh.table("ds.examples").sort(key), wh.version("ds.sequences")
    built = build_partitioned(parts, "ds", CFG, PartitionConfig(partitions=4))
    assert built.sequences.version == want_seq
    with Warehouse(parts, read_only=True) as wh:
        got = wh.table("ds.examples").sort(key)
    assert got.height == imp.height  # users with impressions but no click keep their examples
    _assert_same(got, want_ex)


def test_user_partition_is_stable_and_spread() -> None:
    ids = np.arange(1, 20_001, dtype=np.int64)
    parts = user_partition(ids, 4)
    assert parts.dtype == np.int32 and set(parts.tolist()) == {0, 1, 2, 3}
    assert np.bincount(parts).min() > 4_500  # sequential ids spread evenly
    # Pinned values: a user must land in the same partition on every machine and library version.
    assert user_partition(np.array([1, 2, 3, -5, 2**62]), 8).tolist() == [1, 6, 5, 2, 3]
    assert (user_partition(ids, 1) == 0).all()
    with pytest.raises(ValueError, match="partitions"):
        user_partition(ids, 0)


def test_bad_partition_config_is_named() -> None:
    with pytest.raises(ValidationError, match="partitions"):
        PartitionConfig(partitions=0)
    with pytest.raises(ValidationError, match="memory_limit"):
        PartitionConfig(memory_limit="plenty")


def test_missing_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with Warehouse(tmp_path / "w.duckdb"):
        pass
    with pytest.raises(Exception, match="ingest the dataset first"):
        build_partitioned(tmp_path / "w.duckdb", "nope", CFG)
