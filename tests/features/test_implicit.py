"""Implicit feedback: a click log (string ids, no value, no impressions) becomes labelled ranking examples.

Positives are the interactions; negatives are sampled, seeded, from items seen strictly before the
interaction (popularity-weighted or uniform); the features of both keep the point-in-time rule.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.features.config import FeatureConfig, ImplicitConfig
from recsys.features.export import export_features, read_manifest
from recsys.features.implicit import sample_negatives
from recsys.features.partitioned import PartitionConfig, build_partitioned
from recsys.features.point_in_time import build_examples, example_source
from recsys.features.splits import build_split_loo
from recsys.ingest.events import EventSchema, ingest_events
from recsys.warehouse import Warehouse, WarehouseError
from tests.features.test_partitioned import _assert_same
from tests.features.test_point_in_time import assert_features_equal, brute_force

T0 = 1_700_000_000


def write_click_log(path: Path, n: int = 600, seed: int = 0) -> Path:
    """user, item, time (ISO-8601) and an event type: string ids, no rating, no impressions."""
    rng = np.random.default_rng(seed)
    ts = T0 + np.sort(rng.integers(0, 30 * 86_400 // 600, n)) * 600  # a 10-minute grid: plenty of ties
    frame = pl.DataFrame(
        {
            "visitor": [f"u-{u:03d}" for u in rng.integers(0, 25, n)],
            "product": [f"sku-{i:04d}" for i in rng.zipf(1.6, n) % 60],
            "when": [f"{np.datetime64(int(t), 's')}Z" for t in ts],
            "action": rng.choice(["view", "view", "add_to_cart", "purchase"], n),
        }
    )
    frame.write_csv(path)
    return path


SCHEMA = EventSchema(
    user_id="visitor", item_id="product", timestamp="when", timestamp_format="iso8601", event="action"
)


@pytest.fixture
def clicks(tmp_path: Path, warehouse_path: Path):
    with Warehouse(warehouse_path) as wh:
        report = ingest_events(wh, "clicks", write_click_log(tmp_path / "clicks.csv"), schema=SCHEMA)
        assert report.user_ids_mapped and report.item_ids_mapped and report.rows_rejected == 0
        yield wh


def _examples(wh: Warehouse) -> pl.DataFrame:
    return wh.sql("SELECT * FROM clicks.examples ORDER BY ts, request_id, candidate")


def test_a_click_log_gets_positives_and_sampled_negatives(clicks: Warehouse) -> None:
    cfg = FeatureConfig()
    assert example_source(clicks, "clicks", cfg).kind == "implicit"  # auto: no value, no impressions
    build_examples(clicks, "clicks", cfg)
    ex = _examples(clicks)
    events = clicks.sql("SELECT user_id, item_id, ts FROM clicks.events")
    pos = ex.filter(pl.col("label"))
    neg = ex.filter(~pl.col("label"))
    assert pos.height == events.height and (pos["candidate"] == 0).all()
    assert neg.height > 3 * pos.height and neg["candidate"].min() >= 1
    assert neg.group_by("request_id").len()["len"].max() <= cfg.implicit.negatives
    assert set(ex["split"]) == {"train", "valid", "test"}
    # A negative is never the interacted item, and was seen (in some event) strictly before its ts.
    pairs = neg.join(pos.select("request_id", pl.col("item_id").alias("pos_item")), on="request_id")
    assert (pairs["item_id"] != pairs["pos_item"]).all()
    first_seen = events.group_by("item_id").agg(pl.col("ts").min().alias("first"))
    seen = neg.join(first_seen, on="item_id")
    assert seen.height == neg.height and (seen["first"] < seen["ts"]).all()
    # Every example's features come only from earlier events (the point-in-time rule), negatives included.
    ev = clicks.sql("SELECT user_id, item_id, ts, value FROM clicks.events")
    for row in ex.sample(40, seed=1).iter_rows(named=True):
        assert_features_equal(row, brute_force(ev, row["user_id"], row["item_id"], row["ts"], cfg))


def test_the_sampler_is_seeded_and_the_choice_is_part_of_the_cache_key(clicks: Warehouse) -> None:
    first = build_examples(clicks, "clicks", FeatureConfig())
    table = _examples(clicks)
    assert build_examples(clicks, "clicks", FeatureConfig()).version == first.version  # fresh: skipped
    clicks.con.execute("DROP TABLE clicks.examples")
    clicks.con.execute("DELETE FROM lineage WHERE table_name = 'clicks.examples'").fetchall()
    assert _rebuilt_equal(clicks, table)
    other = build_examples(clicks, "clicks", FeatureConfig(implicit=ImplicitConfig(seed=1)))
    assert other.version != first.version
    uniform = build_examples(clicks, "clicks", FeatureConfig(implicit=ImplicitConfig(sampling="uniform")))
    assert uniform.version not in (first.version, other.version)


def _rebuilt_equal(wh: Warehouse, before: pl.DataFrame) -> bool:
    build_examples(wh, "clicks", FeatureConfig())
    return _examples(wh).equals(before)


def test_positive_event_types_filter_the_positives(clicks: Warehouse) -> None:
    cfg = FeatureConfig(implicit=ImplicitConfig(positive_events=("purchase",), negatives=2))
    build_examples(clicks, "clicks", cfg)
    purchases = clicks.sql("SELECT count(*) AS n FROM clicks.events WHERE event = 'purchase'")["n"][0]
    ex = _examples(clicks)
    assert ex.filter(pl.col("label")).height == purchases
    with pytest.raises(WarehouseError, match="no event of type"):
        build_examples(clicks, "clicks", FeatureConfig(implicit=ImplicitConfig(positive_events=("refund",))))


def test_explicit_events_examples_on_a_click_log_say_what_to_use(clicks: Warehouse) -> None:
    with pytest.raises(WarehouseError, match="examples='implicit'"):
        build_examples(clicks, "clicks", FeatureConfig(examples="events"))


def test_popularity_sampling_follows_the_counts_so_far() -> None:
    # Item 1 has 9 earlier events and item 2 one; the positive at ts=20 is item 3.
    item = np.array([1] * 9 + [2, 3])
    ts = np.array([10] * 10 + [20])
    cfg = ImplicitConfig(negatives=100, seed=3)
    owner, neg = sample_negatives(item, ts, np.array([10]), cfg)
    assert (owner == 0).all() and set(neg) <= {1, 2}
    assert 0.8 < np.mean(neg == 1) < 0.98  # about 9 in 10
    _, uniform = sample_negatives(item, ts, np.array([10]), cfg.model_copy(update={"sampling": "uniform"}))
    assert 0.35 < np.mean(uniform == 1) < 0.65  # about 1 in 2
    # The first events of the log have nothing before them: no negatives.
    owner, neg = sample_negatives(item, ts, np.array([0, 10]), cfg)
    assert set(owner) == {1} and set(neg) == {1, 2}
    # The positive's own item is never a negative: a pool of only that item gives none.
    owner, _ = sample_negatives(np.array([5, 5, 6]), np.array([1, 2, 3]), np.array([1]), cfg)
    assert len(owner) == 0


def test_implicit_examples_export_for_the_models(clicks: Warehouse, tmp_path: Path) -> None:
    cfg = FeatureConfig()
    build_examples(clicks, "clicks", cfg)  # builds the sequences too
    build_split_loo(clicks, "clicks", cfg)
    out = export_features(clicks, "clicks", cfg, root=tmp_path / "exports")
    manifest = read_manifest(out)
    assert sum(manifest["splits"]["ranking"]["rows"].values()) == _examples(clicks).height
    train = pl.read_parquet(out / "examples_train.parquet")
    assert "candidate" in manifest["columns"]["meta"] and "label" in manifest["columns"]["labels"]
    assert train.select("ts", "request_id", "candidate").equals(
        train.select("ts", "request_id", "candidate").sort("ts", "request_id", "candidate")
    )


def test_the_partitioned_build_gives_the_same_implicit_examples(tmp_path: Path) -> None:
    log = write_click_log(tmp_path / "clicks.csv")
    tables = {}
    for name in ("single", "parts"):
        with Warehouse(tmp_path / f"{name}.duckdb") as wh:
            ingest_events(wh, "clicks", log, schema=SCHEMA)
    with Warehouse(tmp_path / "single.duckdb") as wh:
        build_examples(wh, "clicks", FeatureConfig())
        tables["single"] = _examples(wh)
    built = build_partitioned(
        tmp_path / "parts.duckdb", "clicks", FeatureConfig(), PartitionConfig(partitions=3)
    )
    with Warehouse(tmp_path / "parts.duckdb") as wh:
        _assert_same(_examples(wh), tables["single"])  # floats within 1e-12 (features.partitioned doc)
        assert build_examples(wh, "clicks", FeatureConfig()).version == built.examples.version  # same key
