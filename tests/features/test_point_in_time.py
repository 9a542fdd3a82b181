"""The leakage guarantee, proved two ways: brute force from earlier events only, and perturbing the future."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from recsys.features.config import FeatureConfig
from recsys.features.point_in_time import build_examples, feature_columns, with_attributes_sql
from recsys.features.sequences import load_sequences
from recsys.warehouse import Warehouse, WarehouseError
from tests.features.conftest import (
    DAY,
    clicks_as_events,
    items_for,
    publish_dataset,
    random_events,
    random_impressions,
    tiny_events,
    users_for,
)

CFG = FeatureConfig(decay_half_lives_s=(DAY, 30 * DAY))
BEHAVIOUR = [
    "seq_offset",
    "u_cnt",
    "u_value_mean",
    "u_secs_since_last",
    "u_decay_1d",
    "u_decay_30d",
    "i_cnt",
    "i_value_mean",
    "i_secs_since_first",
]


def brute_force(events: pl.DataFrame, user_id: int, item_id: int, ts: int, cfg: FeatureConfig) -> dict:
    """Features of one example from the events strictly before ``ts``, the obvious way."""
    past = events.filter(pl.col("ts") < ts)
    u = past.filter(pl.col("user_id") == user_id)
    i = past.filter(pl.col("item_id") == item_id)
    out = {
        "seq_offset": u.height,
        "u_cnt": u.height,
        "u_value_mean": u["value"].mean() if u["value"].drop_nulls().len() else None,
        "u_secs_since_last": ts - u["ts"].max() if u.height else None,
        "i_cnt": i.height,
        "i_value_mean": i["value"].mean() if i["value"].drop_nulls().len() else None,
        "i_secs_since_first": ts - i["ts"].min() if i.height else None,
    }
    for hl in cfg.decay_half_lives_s:
        out[cfg.decay_column(hl)] = math.fsum(2.0 ** (-(ts - t) / hl) for t in u["ts"].to_list())
    return out


def assert_features_equal(row: dict, expected: dict) -> None:
    for name, want in expected.items():
        got = row[name]
        if want is None:
            assert got is None, name
        else:
            assert got == pytest.approx(want, rel=1e-9, abs=1e-12), (name, row, expected)


def assert_same_features(after: dict, before: dict, cols: list[str]) -> None:
    """Equal, up to the last bits of float sums (parallel aggregation order is not fixed)."""
    for c in cols:
        if isinstance(before[c], float):
            assert after[c] == pytest.approx(before[c], rel=1e-12), c
        else:
            assert after[c] == before[c], c


def test_examples_match_brute_force_from_earlier_events(wh: Warehouse) -> None:
    ev = random_events(2_000, 30, 40, seed=3)
    publish_dataset(wh, "rnd", ev, users=users_for(ev), items=items_for(ev))
    build_examples(wh, "rnd", CFG)
    ex = wh.table("rnd.examples")
    assert ex.height == ev.height  # every rating is an example
    assert (ex["label"] == (ex["value"] >= 4.0)).all()
    seq = load_sequences(wh, "rnd").select("user_id", "item_idx", "ts")
    seq_by_user = {r["user_id"]: r for r in seq.iter_rows(named=True)}
    idx = dict(wh.table("rnd.item_index").select("item_id", "item_idx").iter_rows())
    for row in ex.sample(150, seed=0).iter_rows(named=True):
        assert_features_equal(row, brute_force(ev, row["user_id"], row["item_id"], row["ts"], CFG))
        # The history slice the models read is exactly the user's earlier events, in (ts, src_row) order.
        earlier = ev.filter((pl.col("user_id") == row["user_id"]) & (pl.col("ts") < row["ts"])).sort(
            "ts", "src_row"
        )
        hist = seq_by_user[row["user_id"]]["item_idx"][: row["seq_offset"]]
        assert hist == [idx[i] for i in earlier["item_id"].to_list()]
        assert all(t < row["ts"] for t in seq_by_user[row["user_id"]]["ts"][: row["seq_offset"]])


def test_features_ignore_every_event_at_or_after_the_example(wh: Warehouse) -> None:
    ev = random_events(1_500, 20, 30, seed=5)
    users, items = users_for(ev), items_for(ev)
    publish_dataset(wh, "base", ev, users=users, items=items)
    build_examples(wh, "base", CFG)
    base = wh.table("base.examples")
    rng = np.random.default_rng(0)
    cols = BEHAVIOUR + ["hour", "weekday", "label", "value"]
    for n, row in enumerate(base.sample(4, seed=1).iter_rows(named=True)):
        t, user = row["ts"], row["user_id"]
        # The example's own event: position `pos` of the user's (ts, src_row)-ordered history.
        own = ev.filter(pl.col("user_id") == user).sort("ts", "src_row")["src_row"][row["pos"]]
        future = ev.filter((pl.col("ts") >= t) & (pl.col("src_row") != own))
        # Rewrite the future: other items and values, and extra events for this user and item at exactly ts.
        future = future.with_columns(
            item_id=pl.Series(rng.choice(items["item_id"].to_numpy(), future.height)),
            value=pl.Series(rng.integers(1, 6, future.height).astype(np.float64)),
        )
        ties = pl.DataFrame(
            {
                "user_id": [row["user_id"]] * 3,
                "item_id": [row["item_id"]] * 3,
                "ts": [t, t, t + 1],
                "event": ["rating"] * 3,
                "value": [1.0, 5.0, 2.0],
                "src_row": [10_000, 10_001, 10_002],
            }
        )
        perturbed = pl.concat([ev.filter((pl.col("ts") < t) | (pl.col("src_row") == own)), future, ties])
        ds = f"p{n}"
        publish_dataset(wh, ds, perturbed, users=users, items=items)
        build_examples(wh, ds, FeatureConfig(split_quantiles=(0.5, 0.9)))
        # Same position: the rewritten events keep their (ts, src_row) and the ties sort after it.
        after = wh.table(f"{ds}.examples").filter((pl.col("user_id") == user) & (pl.col("pos") == row["pos"]))
        assert after["ts"].to_list() == [t]
        assert_same_features(after.row(0, named=True), row, cols)
        # Deleting the whole future (the example's own event stays) changes nothing either.
        publish_dataset(
            wh, ds, ev.filter((pl.col("ts") < t) | (pl.col("src_row") == own)), users=users, items=items
        )
        if wh.sql(f"SELECT count(DISTINCT ts) AS n FROM {ds}.events")["n"][0] >= 5:
            build_examples(wh, ds, FeatureConfig(split_quantiles=(0.3, 0.6)))
            # The own event is now the user's only one at ts.
            after = wh.table(f"{ds}.examples").filter((pl.col("user_id") == user) & (pl.col("ts") == t))
            assert after.height == 1
            assert_same_features(after.row(0, named=True), row, cols)


def test_impressions_get_features_from_earlier_clicks_only(wh: Warehouse) -> None:
    imp = random_impressions(400, 5, 25, 30, seed=7)
    ev = clicks_as_events(imp)
    publish_dataset(wh, "syn", ev, users=users_for(imp), items=items_for(imp), impressions=imp)
    build_examples(wh, "syn", CFG)
    ex = wh.table("syn.examples")
    assert ex.height == imp.height  # every impression is an example
    assert (ex["label"] == ex["click"]).all()
    assert {"like", "propensity", "position", "request_id", "p_click"} <= set(ex.columns)
    for row in ex.sample(100, seed=2).iter_rows(named=True):
        assert_features_equal(row, brute_force(ev, row["user_id"], row["item_id"], row["ts"], CFG))
    # A clicked impression does not see its own click (same ts), nor any click of the same request.
    clicked = ex.filter(pl.col("click")).row(0, named=True)
    same_time = ev.filter((pl.col("user_id") == clicked["user_id"]) & (pl.col("ts") < clicked["ts"]))
    assert clicked["seq_offset"] == same_time.height


def test_decayed_counters_stay_finite_over_thousands_of_half_lives(wh: Warehouse) -> None:
    # One hour half-life over ~3 years: exp(l * t) would overflow a double ~30 times over.
    rng = np.random.default_rng(11)
    n = 400
    ts = np.sort(rng.integers(0, 3 * 365 * DAY, n)).astype(np.int64) + 1_000_000_000
    ev = pl.DataFrame(
        {
            "user_id": np.ones(n, dtype=np.int64),
            "item_id": rng.integers(1, 5, n).astype(np.int64),
            "ts": ts,
            "event": ["rating"] * n,
            "value": np.full(n, 4.0),
            "src_row": np.arange(n, dtype=np.int64),
        }
    )
    ts[-5:] = ts[-6] + np.arange(1, 6)  # a burst at the end: the last one sees 5 events seconds old
    ev = ev.with_columns(ts=pl.Series(ts))
    publish_dataset(wh, "long", ev)
    cfg = FeatureConfig(decay_half_lives_s=(3_600.0, 400 * DAY))
    build_examples(wh, "long", cfg)
    ex = wh.table("long.examples").sort("ts", "pos")
    assert ex["u_decay_1h"].is_finite().all() and ex["u_decay_400d"].is_finite().all()
    for row in ex.sample(60, seed=0).iter_rows(named=True):
        assert_features_equal(
            row,
            {
                k: v
                for k, v in brute_force(ev, 1, row["item_id"], row["ts"], cfg).items()
                if k.startswith("u_decay")
            },
        )
    assert ex["u_decay_1h"][-1] == pytest.approx(5.0, rel=0.01)  # ts[-6] and 4 burst events, seconds old


def test_context_columns_are_utc(tiny: Warehouse) -> None:
    ev = tiny_events().with_columns(ts=pl.col("ts") + 1_700_000_000)  # 2023-11-14 22:13:20 UTC is a Tuesday
    tiny.publish("tiny.events", ev)
    build_examples(tiny, "tiny", FeatureConfig(split_quantiles=(0.3, 0.6)))
    first = tiny.table("tiny.examples").sort("ts").row(0, named=True)
    assert first["ts"] == 1_700_000_900
    assert (first["hour"], first["weekday"]) == (22, 2)


def test_attributes_are_joined_and_classified(tiny: Warehouse) -> None:
    build_examples(tiny, "tiny", FeatureConfig(split_quantiles=(0.3, 0.6)))
    ex = tiny.table("tiny.examples")
    assert ex.height == 6  # user 30's only event has no value: no label, no example
    roles = feature_columns(tiny, "tiny")
    assert {"u_age_bucket", "u_gender", "i_category", "i_creator", "hour", "weekday"} <= set(
        roles["categorical"]
    )
    assert {"u_age", "i_age_s", "u_decay_1d", "i_cnt"} <= set(roles["numeric"])
    assert roles["lists"] == ["i_genres"]
    assert roles["labels"] == ["label"]
    # Static attributes are joined on export, not stored in every example.
    assert not {"u_age_bucket", "i_category"} & set(ex.columns)
    full = tiny.sql(with_attributes_sql(tiny, "tiny"))
    assert full.height == ex.height
    row = full.filter((pl.col("user_id") == 10) & (pl.col("pos") == 2)).row(0, named=True)  # src_row 3
    items = tiny.table("tiny.items").filter(pl.col("item_id") == 500).row(0, named=True)
    users = tiny.table("tiny.users").filter(pl.col("user_id") == 10).row(0, named=True)
    assert row["i_category"] == items["category"] and row["i_age_s"] == 1_000 - items["release_ts"]
    assert row["u_age_bucket"] == users["age_bucket"] and row["i_genres"] == items["genres"]


def test_rated_examples_need_a_label(wh: Warehouse) -> None:
    # examples="events" asks for rated events; a log without values is implicit feedback (test_implicit.py).
    publish_dataset(wh, "nolabel", tiny_events().with_columns(value=pl.lit(None, pl.Float64)))
    with pytest.raises(WarehouseError, match="label"):
        build_examples(wh, "nolabel", CFG.model_copy(update={"examples": "events"}))
