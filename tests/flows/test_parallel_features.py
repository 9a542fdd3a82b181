"""The Prefect flow on a real local Dask cluster (2 worker processes) builds the single-process tables."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from recsys.features.config import FeatureConfig
from recsys.features.partitioned import PartitionConfig
from recsys.features.point_in_time import build_examples
from recsys.features.splits import build_split_loo
from recsys.flows.parallel_features import run_parallel_features
from recsys.warehouse import Warehouse
from tests.features.conftest import (
    clicks_as_events,
    items_for,
    publish_dataset,
    random_impressions,
    users_for,
)

CFG = FeatureConfig()
KEY = ["ts", "request_id", "position"]


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


def test_two_dask_workers_build_the_single_process_tables(tmp_path: Path) -> None:
    imp = random_impressions(300, 5, 40, 30, seed=3)
    ev = clicks_as_events(imp)
    single, parallel = tmp_path / "single.duckdb", tmp_path / "parallel.duckdb"
    for path in (single, parallel):
        with Warehouse(path) as wh:
            publish_dataset(wh, "syn", ev, users=users_for(imp), items=items_for(imp), impressions=imp)
    with Warehouse(single) as wh:
        build_examples(wh, "syn", CFG)
        build_split_loo(wh, "syn", CFG)
        want = {t: wh.table(f"syn.{t}") for t in ("sequences", "split_loo")}
        want["examples"] = wh.table("syn.examples").sort(KEY)
        seq_version = wh.version("syn.sequences")

    out = run_parallel_features(
        "syn",
        features=CFG,
        partition=PartitionConfig(partitions=4, work_dir=tmp_path / "parts"),
        n_workers=2,
        warehouse_path=parallel,
        export_root=tmp_path / "exports",
    )

    assert out["partitions"] == 4 and not out["skipped"]
    assert sum(out["users_per_partition"]) == imp["user_id"].n_unique()
    assert sum(out["events_per_partition"]) == ev.height
    assert out["versions"]["syn.sequences"] == seq_version  # the very same table (content hash)
    assert (Path(out["export_dir"]) / "manifest.json").exists()
    assert not list((tmp_path / "parts").iterdir())  # the parts are removed
    with Warehouse(parallel, read_only=True) as wh:
        assert wh.table("syn.sequences").equals(want["sequences"])
        assert wh.table("syn.split_loo").equals(want["split_loo"])
        _assert_same(wh.table("syn.examples").sort(KEY), want["examples"])
