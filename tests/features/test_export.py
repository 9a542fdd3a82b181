from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.features.config import FeatureConfig
from recsys.features.export import (
    export_features,
    history_window,
    latest_export,
    read_examples,
    read_manifest,
    read_sequences,
)
from recsys.features.point_in_time import build_examples
from recsys.features.sequences import load_sequences
from recsys.features.splits import build_split_loo
from recsys.warehouse import Warehouse
from tests.features.conftest import items_for, publish_dataset, random_events, users_for

CFG = FeatureConfig(max_seq_len=8)


@pytest.fixture
def built(wh: Warehouse) -> Warehouse:
    ev = random_events(1_500, 25, 40, seed=4)
    publish_dataset(wh, "rnd", ev, users=users_for(ev), items=items_for(ev))
    build_examples(wh, "rnd", CFG)
    build_split_loo(wh, "rnd", CFG)
    return wh


def test_export_files_types_and_manifest(built: Warehouse, tmp_path: Path) -> None:
    out = export_features(built, "rnd", CFG, root=tmp_path)
    assert out.parent == tmp_path / "rnd" and latest_export("rnd", root=tmp_path) == out
    assert sorted(p.name for p in out.iterdir()) == [
        "examples_test.parquet",
        "examples_train.parquet",
        "examples_valid.parquet",
        "manifest.json",
        "sequences.parquet",
    ]
    seq = read_sequences(out)
    assert seq.schema["item_idx"] == pl.List(pl.Int32)
    assert seq.schema["ts"] == pl.List(pl.Int64)
    assert seq.schema["value"] == pl.List(pl.Float32)
    assert seq.schema["user_idx"] == pl.Int32
    # Whole histories: equal to the warehouse sequences (max_seq_len applies when models read them).
    assert seq["item_idx"].to_list() == load_sequences(built, "rnd")["item_idx"].to_list()
    m = read_manifest(out)
    assert m["n_items"] == 40 and m["n_users"] == 25 and m["max_seq_len"] == 8
    assert m["tables"]["rnd.examples"] == built.version("rnd.examples")
    rows = m["splits"]["ranking"]["rows"]
    assert sum(rows.values()) == built.table("rnd.examples").height
    train = read_examples(out, "train")
    assert train.height == rows["train"]
    assert {"user_idx", "item_idx", "seq_offset", "label", "u_decay_1d", "i_cnt"} <= set(train.columns)
    assert "split" not in train.columns
    assert train.select("ts", "user_idx", "pos").rows() == sorted(
        train.select("ts", "user_idx", "pos").rows()
    )
    assert set(m["columns"]["numeric"]) <= set(train.columns)


def test_export_is_reused_and_histories_index_correctly(built: Warehouse, tmp_path: Path) -> None:
    first = export_features(built, "rnd", CFG, root=tmp_path)
    stamp = (first / "manifest.json").stat().st_mtime_ns
    assert export_features(built, "rnd", CFG, root=tmp_path) == first
    assert (first / "manifest.json").stat().st_mtime_ns == stamp  # not rewritten
    assert not [p for p in (tmp_path / "rnd").iterdir() if p.name.startswith(".")]  # no temp dirs left
    seq = read_sequences(first)
    by_user = {r["user_idx"]: r for r in seq.iter_rows(named=True)}
    test = read_examples(first, "test")
    for ex in test.head(50).iter_rows(named=True):
        hist = history_window(
            np.asarray(by_user[ex["user_idx"]]["item_idx"]), ex["seq_offset"], CFG.max_seq_len
        )
        ts = by_user[ex["user_idx"]]["ts"][: ex["seq_offset"]]
        assert len(hist) == min(CFG.max_seq_len, ex["seq_offset"])
        assert all(t < ex["ts"] for t in ts)
    loo = seq.filter(pl.col("test_pos").is_not_null()).row(0, named=True)
    assert loo["test_pos"] == len(loo["item_idx"]) - 1 and loo["valid_pos"] == loo["test_pos"] - 1


def test_history_window_bounds() -> None:
    items = np.arange(1, 11)
    assert history_window(items, 10, 3).tolist() == [8, 9, 10]
    assert history_window(items, 2, 5).tolist() == [1, 2]
    assert history_window(items, 0, 5).tolist() == []
    with pytest.raises(ValueError, match="outside"):
        history_window(items, 11, 3)
