from __future__ import annotations

import json

import polars as pl
import pytest

from recsys.features.config import FeatureConfig
from recsys.features.point_in_time import build_examples
from recsys.features.sequences import build_sequences, load_sequences
from recsys.features.splits import build_split_loo, temporal_cut
from recsys.warehouse import Warehouse
from tests.features.conftest import publish_dataset, random_events


def test_leave_one_out_positions(tiny: Warehouse) -> None:
    build_sequences(tiny, "tiny")
    v = build_split_loo(tiny, "tiny", FeatureConfig())
    loo = tiny.table("tiny.split_loo").sort("user_idx")
    # user 10 has 4 events -> valid = 3rd (pos 2), test = last (pos 3); users 20 (2) and 30 (1): train only.
    assert loo.select("user_id", "n_events", "valid_pos", "test_pos").rows() == [
        (10, 4, 2, 3),
        (20, 2, None, None),
        (30, 1, None, None),
    ]
    seq = load_sequences(tiny, "tiny").row(0, named=True)
    assert seq["ts"][3] == max(seq["ts"])  # the test target is the latest event
    assert v.params["protocol"] == "leave-one-out" and v.inputs == {
        "tiny.sequences": tiny.version("tiny.sequences")
    }


def test_leave_one_out_min_events_is_configurable(tiny: Warehouse) -> None:
    build_sequences(tiny, "tiny")
    build_split_loo(tiny, "tiny", FeatureConfig(loo_min_events=5))
    assert tiny.table("tiny.split_loo")["valid_pos"].null_count() == 3
    with pytest.raises(ValueError, match="loo_min_events"):
        FeatureConfig(loo_min_events=2)


def test_temporal_split_is_a_global_cut_recorded_in_lineage(wh: Warehouse) -> None:
    ev = random_events(2_000, 30, 40, seed=9)
    publish_dataset(wh, "rnd", ev)
    cfg = FeatureConfig(split_quantiles=(0.7, 0.85))
    v = build_examples(wh, "rnd", cfg)
    ex = wh.table("rnd.examples")
    t1, t2 = v.params["split"]["t1"], v.params["split"]["t2"]
    assert ex.filter(pl.col("split") == "train")["ts"].max() < t1
    assert ex.filter(pl.col("split") == "valid")["ts"].min() >= t1
    assert ex.filter(pl.col("split") == "valid")["ts"].max() < t2
    assert ex.filter(pl.col("split") == "test")["ts"].min() >= t2
    share = ex.group_by("split").len().to_dict(as_series=False)
    shares = dict(zip(share["split"], share["len"], strict=True))
    assert shares["train"] / ex.height == pytest.approx(0.7, abs=0.03)
    # The cut and the data version it was computed on sit together in the lineage row.
    row = wh.sql("SELECT inputs, params FROM lineage WHERE table_name = 'rnd.examples'").row(0)
    assert json.loads(row[0])["rnd.events"] == wh.version("rnd.events")
    assert json.loads(row[1])["split"] == {
        "protocol": "global-temporal-cut",
        "t1": t1,
        "t2": t2,
        "q1": 0.7,
        "q2": 0.85,
    }


def test_temporal_cut_refuses_an_empty_split(wh: Warehouse) -> None:
    ev = random_events(200, 5, 5, seed=1).with_columns(ts=pl.lit(1_000, pl.Int64))  # one timestamp for all
    publish_dataset(wh, "flat", ev)
    with pytest.raises(ValueError, match="split would be empty"):
        temporal_cut(wh, "SELECT ts FROM flat.events", FeatureConfig())
    with pytest.raises(ValueError, match="split_quantiles"):
        FeatureConfig(split_quantiles=(0.9, 0.8))
