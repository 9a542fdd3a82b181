from __future__ import annotations

import polars as pl
import pytest

from recsys.features.sequences import (
    build_item_index,
    build_sequences,
    build_user_index,
    load_sequences,
    num_items,
    num_users,
)
from recsys.warehouse import Warehouse, WarehouseError
from tests.features.conftest import publish_dataset, random_events, tiny_events


def test_indexes_are_dense_by_id_and_cover_the_catalogue(tiny: Warehouse) -> None:
    build_item_index(tiny, "tiny")
    build_user_index(tiny, "tiny")
    items = tiny.table("tiny.item_index").sort("item_idx")
    # item 1000 is only in the items table (never rated): still a candidate, so it is indexed.
    assert items["item_id"].to_list() == [300, 500, 700, 900, 1_000]
    assert items["item_idx"].to_list() == [1, 2, 3, 4, 5]
    assert items.schema["item_idx"] == pl.Int32
    users = tiny.table("tiny.user_index").sort("user_idx")
    assert users["user_id"].to_list() == [10, 20, 30]
    assert users["user_idx"].to_list() == [1, 2, 3]
    assert num_items(tiny, "tiny") == 5
    assert num_users(tiny, "tiny") == 3


def test_sequences_follow_ts_then_src_row(tiny: Warehouse) -> None:
    build_sequences(tiny, "tiny")
    seq = load_sequences(tiny, "tiny")
    assert seq["user_idx"].to_list() == [1, 2, 3]
    u10 = seq.row(0, named=True)
    # ts 900 first; the two ts=1000 events ordered by src_row (1 -> item 300, 3 -> item 500); then ts 5000.
    assert u10["ts"] == [900, 1_000, 1_000, 5_000]
    assert u10["item_idx"] == [3, 1, 2, 1]
    assert u10["value"] == [4.0, 2.0, 5.0, 3.0]
    assert seq.row(2, named=True)["value"] == [None]  # a NULL value is kept, not dropped
    assert seq.schema["item_idx"] == pl.List(pl.Int32)
    assert seq.schema["ts"] == pl.List(pl.Int64)
    assert seq.schema["value"] == pl.List(pl.Float64)


def test_load_sequences_max_len_keeps_the_most_recent(tiny: Warehouse) -> None:
    build_sequences(tiny, "tiny")
    seq = load_sequences(tiny, "tiny", max_len=2)
    u10 = seq.row(0, named=True)
    assert u10["item_idx"] == [2, 1]
    assert u10["ts"] == [1_000, 5_000]
    with pytest.raises(ValueError, match="max_len"):
        load_sequences(tiny, "tiny", max_len=0)


def test_sequences_match_a_python_sort_on_random_data(wh: Warehouse) -> None:
    ev = random_events(3_000, 40, 60, seed=1)
    publish_dataset(wh, "rnd", ev)
    build_sequences(wh, "rnd")
    seq = load_sequences(wh, "rnd")
    idx = dict(zip(*wh.table("rnd.item_index").select("item_id", "item_idx").to_dict().values(), strict=True))
    expected = (
        ev.sort("user_id", "ts", "src_row").group_by("user_id", maintain_order=True).agg("item_id", "ts")
    )
    got = seq.select("user_id", "item_idx", "ts").sort("user_id")
    assert got["user_id"].to_list() == expected["user_id"].to_list()
    assert got["ts"].to_list() == expected["ts"].to_list()
    assert got["item_idx"].to_list() == [[idx[i] for i in items] for items in expected["item_id"].to_list()]


def test_rebuild_is_skipped_when_inputs_are_unchanged(tiny: Warehouse) -> None:
    first = build_sequences(tiny, "tiny")
    n_lineage = tiny.con.execute("SELECT count(*) FROM lineage").fetchall()[0][0]
    again = build_sequences(tiny, "tiny")
    assert again.version == first.version and again.created_at == first.created_at
    assert tiny.con.execute("SELECT count(*) FROM lineage").fetchall()[0][0] == n_lineage
    # New events -> new events version -> everything downstream rebuilds.
    ev = pl.concat(
        [
            tiny_events(),
            tiny_events().head(1).with_columns(ts=pl.lit(9_000, pl.Int64), src_row=pl.lit(99, pl.Int64)),
        ]
    )
    tiny.publish("tiny.events", ev)
    rebuilt = build_sequences(tiny, "tiny")
    assert rebuilt.version != first.version
    assert load_sequences(tiny, "tiny").row(0, named=True)["ts"][-1] == 9_000


def test_missing_events_or_columns_are_named(wh: Warehouse) -> None:
    with pytest.raises(WarehouseError, match="nope.events"):
        build_sequences(wh, "nope")
    wh.publish("bad.events", tiny_events().drop("src_row"))
    with pytest.raises(WarehouseError, match="src_row"):
        build_sequences(wh, "bad")
    with pytest.raises(ValueError, match="schema name"):
        build_sequences(wh, "bad; DROP TABLE x")
