from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.synthetic.click_model import HOUR_S, ClickModel, sigmoid
from recsys.synthetic.config import (
    CatalogueConfig,
    PolicyConfig,
    SessionConfig,
    SyntheticConfig,
    UserConfig,
)
from recsys.synthetic.generator import SyntheticManifest, auc, generate, oracle_auc, read_manifest

TINY = SyntheticConfig(
    seed=7,
    catalogue=CatalogueConfig(n_items=2_000, n_creators=300, n_categories=10),
    users=UserConfig(n_users=300),
    sessions=SessionConfig(requests_per_user_mean=8.0),
)


def _tables(m: SyntheticManifest) -> dict[str, pl.DataFrame]:
    return {t: pl.read_parquet(m.paths(t)) for t in ("users", "items", "events", "impressions")}


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_files_whatever_the_chunking(tmp_path: Path) -> None:
    a = generate(TINY, tmp_path / "a")
    generate(TINY, tmp_path / "again")
    assert _file_hashes(tmp_path / "a") == _file_hashes(tmp_path / "again")
    small = generate(TINY, tmp_path / "small", chunk_users=37)
    assert len(small.files["events"]) == 9 and len(a.files["events"]) == 1  # bounded chunks, same data
    assert small.counts == a.counts and small.data_version == a.data_version
    parallel = generate(TINY, tmp_path / "parallel", chunk_users=64, workers=2)
    ref = _tables(a)
    for run in (small, parallel):
        for name, frame in _tables(run).items():
            assert frame.equals(ref[name]), name
    other = generate(TINY.model_copy(update={"seed": 8}), tmp_path / "other")
    assert not _tables(other)["events"].equals(ref["events"])


def test_max_events_cuts_exactly_and_consistently(tmp_path: Path) -> None:
    full = _tables(generate(TINY, tmp_path / "full"))
    n = full["events"].height // 2 + 3
    cut = generate(TINY.model_copy(update={"max_events": n}), tmp_path / "cut", chunk_users=50, workers=2)
    t = _tables(cut)
    assert cut.counts["events"] == n and cut.truncated
    assert t["events"].equals(full["events"].head(n))
    last_user = t["users"]["user_id"].max()
    assert t["users"].equals(full["users"].filter(pl.col("user_id") <= last_user))
    assert t["impressions"]["user_id"].max() <= last_user
    assert t["impressions"].equals(full["impressions"].head(t["impressions"].height))


def test_logs_are_consistent(quick_run: SyntheticManifest) -> None:
    t = _tables(quick_run)
    ev, imp = t["events"], t["impressions"]
    assert quick_run.counts["users"] == t["users"].height == 2_000
    assert quick_run.counts["impressions"] == imp.height > 250_000
    assert ev["src_row"].to_list() == list(range(ev.height))
    assert ev["event"].unique().to_list() == ["click"]
    # Every logged click is an event (all requests are logged in the quick preset), and vice versa.
    assert ev.height == imp["click"].sum()
    assert (
        ev.group_by("user_id")
        .len()
        .sort("user_id")
        .equals(imp.filter("click").group_by("user_id").len().sort("user_id"))
    )
    # Time: events strictly increase within a user; each slate is one request at one ts.
    assert ev.select((pl.col("ts").diff().over("user_id") > 0).fill_null(True).all()).item()
    slates = imp.group_by("request_id").agg(
        pl.col("ts").n_unique(),
        pl.col("item_id").n_unique(),
        pl.col("position").sort(),
        pl.col("user_id").first(),
    )
    k = quick_run.config.sessions.slate_size
    assert (slates["ts"] == 1).all() and (slates["item_id"] == k).all()
    assert slates["position"].to_list()[0] == list(range(k))
    assert slates["request_id"].sort().to_list() == list(range(quick_run.counts["requests"]))
    assert imp.select((pl.col("dwell").is_null() == ~pl.col("click")).all()).item()
    assert imp.select((~pl.col("like") | pl.col("click")).all()).item()
    assert imp.select(pl.col("propensity").is_between(0.0, 1.0, closed="right").all()).item()
    slate_prob = imp.group_by("request_id").agg(pl.col("propensity").log().sum().exp())["propensity"]
    assert slate_prob.min() > 0.0 and slate_prob.max() <= 1.0  # P(this ordered slate | pool) is a probability
    assert (imp["p_click"] <= imp["p_click_unbiased"]).all()


def test_generator_is_calibrated(quick_run: SyntheticManifest) -> None:
    """Per decile of the true p_click, the click rate matches the decile's mean p within binomial noise."""
    imp = pl.read_parquet(quick_run.paths("impressions"), columns=["p_click", "click"])
    p, y = imp["p_click"].to_numpy(), imp["click"].to_numpy()
    decile = np.minimum((np.argsort(np.argsort(p)) * 10) // p.size, 9)
    for d in range(10):
        sel = decile == d
        sd = np.sqrt((p[sel] * (1 - p[sel])).sum()) / sel.sum()
        assert abs(y[sel].mean() - p[sel].mean()) < 4.5 * sd, d


def test_oracle_auc_beats_popularity_and_is_below_one(quick_run: SyntheticManifest) -> None:
    exact = oracle_auc(quick_run)
    assert quick_run.oracle_auc == pytest.approx(exact, abs=1e-5)  # the manifest's streamed value
    imp = pl.read_parquet(quick_run.paths("impressions"))
    clicks = pl.read_parquet(quick_run.paths("events")).group_by("item_id").len()
    scored = imp.join(clicks, on="item_id", how="left").fill_null(0)
    popularity = auc(scored["click"].to_numpy(), scored["len"].to_numpy())
    print(f"quick preset: oracle AUC {exact:.4f}, popularity AUC {popularity:.4f}")
    assert 0.55 < popularity < exact - 0.1
    assert exact < 0.98
    assert 0.5 < oracle_auc(quick_run, "p_click_unbiased") < exact  # position is part of the truth
    assert 0.05 < quick_run.click_rate < 0.3


def test_drift_shows_in_the_click_log(quick_run: SyntheticManifest) -> None:
    """Categories whose drift term rose between the first and last third of the window gained click rate."""
    model = ClickModel(quick_run.config)
    imp = pl.read_parquet(quick_run.paths("impressions"), columns=["item_id", "ts", "click"])
    cat = model.catalogue.category[imp["item_id"].to_numpy()]
    ts, y = imp["ts"].to_numpy(), imp["click"].to_numpy()
    drift = np.sin(2 * np.pi * (ts // HOUR_S - model.h0) / model.drift_period_h[cat] + model.drift_phase[cat])
    third = (ts - ts.min()) * 3 // (ts.max() - ts.min() + 1)
    d_logodds, d_drift = [], []
    for c in range(quick_run.config.catalogue.n_categories):
        early, late = (cat == c) & (third == 0), (cat == c) & (third == 2)
        rate = np.array([y[early].mean(), y[late].mean()])
        d_logodds.append(np.diff(np.log(rate / (1 - rate)))[0])
        d_drift.append(drift[late].mean() - drift[early].mean())
    assert np.corrcoef(d_logodds, d_drift)[0, 1] > 0.6


def test_long_range_creator_loyalty_needs_the_long_history(tmp_path: Path) -> None:
    """Items of creators clicked long ago (beyond the last 50 clicks) are clicked more, because of loyalty."""
    cfg = SyntheticConfig(
        seed=1,
        catalogue=CatalogueConfig(n_items=8_000, n_creators=3_000),
        users=UserConfig(n_users=120),
        sessions=SessionConfig(requests_per_user_mean=350.0, requests_per_user_sigma=0.2),
        policy=PolicyConfig(impression_log_rate=0.3),
    )
    m = generate(cfg, tmp_path)
    creators = pl.DataFrame(
        {"item_id": np.arange(cfg.catalogue.n_items), "creator": ClickModel(cfg).catalogue.creator}
    )
    ev = (
        pl.read_parquet(m.paths("events"))
        .join(creators, on="item_id")
        .sort("user_id", "ts", "src_row")
        .with_columns(idx=pl.int_range(pl.len()).over("user_id"))
        .sort("ts")
    )
    imp = pl.read_parquet(m.paths("impressions")).join(creators, on="item_id").sort("ts")
    before = {"on": "ts", "strategy": "backward", "allow_exact_matches": False, "check_sortedness": False}
    imp = imp.join_asof(ev.select("user_id", "ts", n_before=pl.col("idx") + 1), by="user_id", **before)
    imp = imp.join_asof(
        ev.select("user_id", "creator", "ts", last=pl.col("idx")), by=["user_id", "creator"], **before
    )
    imp = imp.with_columns(back=pl.col("n_before") - pl.col("last"))  # 1 = the user's most recent click
    loyal = imp.filter(pl.col("last").is_not_null())
    far = loyal.filter(pl.col("back") > 50)
    never = imp.filter(pl.col("last").is_null())
    assert far.height / loyal.height > 0.25  # a clear share is invisible to a last-50 window
    rate_far, rate_never = far["click"].mean(), never["click"].mean()
    se = np.sqrt(rate_far * (1 - rate_far) / far.height + rate_never * (1 - rate_never) / never.height)
    assert rate_far - rate_never > 8 * se
    # It is the loyalty term: without it the same impressions would have been clicked far less.
    p = far["p_click_unbiased"].to_numpy()
    examine = far["p_click"].to_numpy() / p
    without = sigmoid(np.log(p / (1 - p)) - cfg.click.loyalty) * examine
    sd = np.sqrt((without * (1 - without)).sum()) / far.height
    assert rate_far - without.mean() > 8 * sd
    assert rate_far == pytest.approx(far["p_click"].mean(), abs=4 * sd)


def test_a_run_without_manifest_is_incomplete(tmp_path: Path) -> None:
    m = generate(TINY.model_copy(update={"policy": PolicyConfig(impression_log_rate=0.0)}), tmp_path)
    assert m.files["impressions"] == [] and m.oracle_auc is None and m.counts["events"] > 0
    with pytest.raises(ValueError, match="no impressions"):
        oracle_auc(m)
    assert read_manifest(tmp_path).data_version == m.data_version
    stale = tmp_path / "events" / "part-00099.parquet"
    stale.write_bytes(b"stale")
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="no complete synthetic run"):
        read_manifest(tmp_path)
    generate(TINY, tmp_path)  # a new run clears the old parts
    assert not stale.exists()
    with pytest.raises(ValueError, match="chunk_users"):
        generate(TINY, tmp_path, chunk_users=0)
