"""Small contract-shaped datasets published straight into a fresh warehouse (no ingest code needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.warehouse import Warehouse

DAY = 86_400


def tiny_events() -> pl.DataFrame:
    """Three users; user 10 has two events at the same ts whose src_row order differs from the file order."""
    rows = [
        # user_id, item_id, ts, value, src_row
        (10, 500, 1_000, 5.0, 3),
        (10, 300, 1_000, 2.0, 1),  # same ts as the row above, earlier src_row -> comes first
        (10, 700, 900, 4.0, 7),
        (10, 300, 5_000, 3.0, 0),
        (20, 700, 2_000, 4.0, 2),
        (20, 500, 3_000, 1.0, 4),
        (30, 900, 4_000, None, 5),
    ]
    return pl.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "ts": [r[2] for r in rows],
            "event": ["rating"] * len(rows),
            "value": [r[3] for r in rows],
            "src_row": [r[4] for r in rows],
        },
        schema={
            "user_id": pl.Int64,
            "item_id": pl.Int64,
            "ts": pl.Int64,
            "event": pl.String,
            "value": pl.Float64,
            "src_row": pl.Int64,
        },
    )


def random_events(n: int, n_users: int, n_items: int, seed: int, *, span_s: int = 60 * DAY) -> pl.DataFrame:
    """Rating-like events with many timestamp ties (ts on a coarse grid) to stress the strict-before rule."""
    rng = np.random.default_rng(seed)
    ts = 1_600_000_000 + rng.integers(0, span_s // 3_600, n) * 3_600  # hourly grid -> plenty of ties
    return pl.DataFrame(
        {
            "user_id": rng.integers(1, n_users + 1, n) * 7,  # sparse ids: the index must densify them
            "item_id": rng.integers(1, n_items + 1, n) * 3,
            "ts": ts.astype(np.int64),
            "event": ["rating"] * n,
            "value": rng.integers(1, 6, n).astype(np.float64),
            "src_row": rng.permutation(n).astype(np.int64),
        }
    )


def users_for(events: pl.DataFrame, seed: int = 0) -> pl.DataFrame:
    ids = events["user_id"].unique().sort()
    rng = np.random.default_rng(seed)
    return pl.DataFrame(
        {
            "user_id": ids,
            "age_bucket": rng.choice(["18-24", "25-34", "35+"], len(ids)),
            "gender": rng.choice(["F", "M"], len(ids)),
            "age": rng.integers(18, 70, len(ids)).astype(np.int64),
        }
    )


def items_for(events: pl.DataFrame, seed: int = 0, extra: tuple[int, ...] = ()) -> pl.DataFrame:
    ids = (
        pl.concat([events["item_id"].unique(), pl.Series("item_id", list(extra), dtype=pl.Int64)])
        .unique()
        .sort()
    )
    rng = np.random.default_rng(seed)
    cats = rng.choice(["Action", "Comedy", "Drama"], len(ids))
    return pl.DataFrame(
        {
            "item_id": ids,
            "category": cats,
            "genres": [[c, "Extra"] if i % 2 else [c] for i, c in enumerate(cats)],
            "creator": rng.choice(["c1", "c2", "c3", "c4"], len(ids)),
            "release_ts": rng.integers(0, 1_000, len(ids)).astype(np.int64),
        }
    )


def publish_dataset(
    wh: Warehouse,
    dataset: str,
    events: pl.DataFrame,
    *,
    users: pl.DataFrame | None = None,
    items: pl.DataFrame | None = None,
    impressions: pl.DataFrame | None = None,
) -> None:
    wh.publish(f"{dataset}.events", events, params={"source": "test"})
    if users is not None:
        wh.publish(f"{dataset}.users", users, params={"source": "test"})
    if items is not None:
        wh.publish(f"{dataset}.items", items, params={"source": "test"})
    if impressions is not None:
        wh.publish(f"{dataset}.impressions", impressions, params={"source": "test"})


@pytest.fixture
def wh(warehouse_path: Path):
    with Warehouse(warehouse_path) as w:
        yield w


@pytest.fixture
def tiny(wh: Warehouse) -> Warehouse:
    ev = tiny_events()
    publish_dataset(wh, "tiny", ev, users=users_for(ev), items=items_for(ev, extra=(1_000,)))
    return wh


def random_impressions(n_requests: int, k: int, n_users: int, n_items: int, seed: int) -> pl.DataFrame:
    """Synthetic-style impressions (k per request) on an hourly grid; clicks become the events."""
    rng = np.random.default_rng(seed)
    n = n_requests * k
    req = np.repeat(np.arange(n_requests, dtype=np.int64), k)
    users = np.repeat(rng.integers(1, n_users + 1, n_requests), k).astype(np.int64)
    ts = np.repeat(1_600_000_000 + rng.integers(0, 24 * 40, n_requests) * 3_600, k).astype(np.int64)
    click = rng.random(n) < 0.3
    return pl.DataFrame(
        {
            "request_id": req,
            "user_id": users,
            "item_id": rng.integers(1, n_items + 1, n).astype(np.int64),
            "ts": ts,
            "position": np.tile(np.arange(k, dtype=np.int32), n_requests),
            "propensity": rng.random(n),
            "click": click,
            "like": click & (rng.random(n) < 0.5),
            "dwell": np.where(click, rng.exponential(30.0, n), np.nan),
            "p_click": rng.random(n),
        }
    ).with_columns(pl.col("dwell").fill_nan(None))


def clicks_as_events(impressions: pl.DataFrame) -> pl.DataFrame:
    clicks = impressions.filter(pl.col("click")).sort("ts", "request_id", "position")
    return clicks.select(
        "user_id",
        "item_id",
        "ts",
        pl.lit("click").alias("event"),
        pl.col("dwell").alias("value"),
        pl.int_range(pl.len(), dtype=pl.Int64).alias("src_row"),
    )
