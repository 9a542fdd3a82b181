"""Request-time features of the feature-based rankers (``serving.featurize``): on test-split examples the
featurizer's batches and the ranker's scores equal training's ``make_batch``; the files round-trip through
the registry (checksummed); a request history gives the same features as the stored one; the service serves
a feature ranker (rank and recommend) with unknown candidates and bad fields handled."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from pydantic import ValidationError

from recsys.experiments.ranking import build_model as build_ranker
from recsys.features.config import FeatureConfig
from recsys.features.point_in_time import build_examples
from recsys.models.batch import RankingBatch
from recsys.models.registry import build_model
from recsys.serving.featurize import ITEMS_FILE, FeaturizerError, RankingFeaturizer
from recsys.serving.registry import (
    RegistryError,
    load_model,
    register_model,
    register_ranker,
    resolve,
    verify,
)
from recsys.serving.schemas import RankRequest, RecommendRequest
from recsys.serving.service import InvalidRequest, Recommender, ServingConfig
from recsys.synthetic.config import CatalogueConfig, SessionConfig, SyntheticConfig, UserConfig
from recsys.synthetic.generator import generate
from recsys.synthetic.warehouse_load import load_into_warehouse
from recsys.training.ranking import RankingData, RankingDataConfig, load_ranking_data
from recsys.warehouse import Warehouse
from tests.fixtures import one_thread  # noqa: F401  (autouse fixture: one torch thread)

TINY_SYNTHETIC = SyntheticConfig(
    seed=3,
    catalogue=CatalogueConfig(n_items=120, n_categories=4, n_creators=12),
    users=UserConfig(n_users=30),
    sessions=SessionConfig(requests_per_user_mean=20, horizon_days=20, slate_size=5, pool_size=10),
)
MAX_LEN = 24  # short enough to truncate some histories, so the window rule is exercised


@dataclass(frozen=True)
class Built:
    path: Path
    data: RankingData


def synthetic_warehouse(root: Path) -> Built:
    """Impressions (position context, two tasks), dwell values (quantile buckets), release_ts (i_age_s)."""
    manifest = generate(TINY_SYNTHETIC, root / "run")
    path = root / "warehouse.duckdb"
    with Warehouse(path) as wh:
        load_into_warehouse(wh, manifest, "syn")
        build_examples(wh, "syn", FeatureConfig())
        data = load_ranking_data(wh, "syn", RankingDataConfig())
    return Built(path, data)


@pytest.fixture(scope="module")
def syn(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return synthetic_warehouse(tmp_path_factory.mktemp("featurize-syn"))


@pytest.fixture(scope="module")
def ratings(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """A MovieLens-like rating log: timestamp ties, rank buckets, a numeric profile attribute (u_age)."""
    rng = np.random.default_rng(5)
    n = 1_200
    events = pl.DataFrame(
        {
            "user_id": rng.integers(1, 25, n) * 3,
            "item_id": rng.integers(1, 51, n) * 7,
            "ts": (1_600_000_000 + rng.integers(0, 500, n) * 3_600).astype(np.int64),
            "event": ["rating"] * n,
            "value": rng.integers(1, 6, n).astype(np.float64),
            "src_row": rng.permutation(n).astype(np.int64),
        }
    )
    users = pl.DataFrame(
        {
            "user_id": np.arange(1, 25) * 3,
            "gender": rng.choice(["F", "M"], 24),
            "age": rng.integers(18, 70, 24),
        }
    )
    items = pl.DataFrame(
        {
            "item_id": np.arange(1, 51) * 7,
            "title": [f"movie {i}" for i in range(50)],
            "category": rng.choice(["drama", "comedy", "action"], 50),
        }
    )
    path = tmp_path_factory.mktemp("featurize-rt") / "warehouse.duckdb"
    with Warehouse(path) as wh:
        wh.publish("rt.events", events, inputs={}, params={"test": 1})
        wh.publish("rt.users", users, inputs={}, params={"test": 1})
        wh.publish("rt.items", items, inputs={}, params={"test": 1})
        build_examples(wh, "rt", FeatureConfig())
        data = load_ranking_data(wh, "rt", RankingDataConfig())
    return Built(path, data)


_FEATURIZERS: dict[Path, RankingFeaturizer] = {}


def _featurizer(built: Built) -> RankingFeaturizer:
    """The featurizer of a MAX_LEN ranker on ``built`` (built once per warehouse)."""
    if built.path not in _FEATURIZERS:
        with Warehouse(built.path) as wh:
            spec = built.data.feature_spec(MAX_LEN)
            _FEATURIZERS[built.path] = RankingFeaturizer.from_warehouse(wh, built.data, spec)
    return _FEATURIZERS[built.path]


def _served_batch(f: RankingFeaturizer, data: RankingData, index: np.ndarray) -> RankingBatch:
    """Test examples as the service would featurize them: each (user, ts) from the stored history."""
    s = data.splits["test"]
    users = [f.user_features_idx(int(s.user[i]), int(s.ts[i])) for i in index]
    positions = None
    if "position" in s.sparse:  # replay the logged slot (id = position + 1)
        positions = [np.array([int(s.sparse["position"][i]) - 1]) for i in index]
    return f.batch(users, [np.array([s.item[i]]) for i in index], positions)


def _assert_same_batch(got: RankingBatch, want: RankingBatch) -> None:
    assert torch.equal(got.item_id, want.item_id)
    assert got.sparse.keys() == want.sparse.keys()
    for k in want.sparse:
        assert torch.equal(got.sparse[k], want.sparse[k]), k
    torch.testing.assert_close(got.dense, want.dense, rtol=0, atol=1e-5)
    g, w = got.sequences["history"], want.sequences["history"]
    assert torch.equal(g.lengths, w.lengths) and torch.equal(g.item_ids, w.item_ids)
    assert g.side.keys() == w.side.keys()
    for k in w.side:
        assert torch.equal(g.side[k], w.side[k]), k
    torch.testing.assert_close(g.time_gap, w.time_gap, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("dataset", "model_name"),
    [("syn", "rankmixer"), ("syn", "longer"), ("syn", "hyformer"), ("rt", "din"), ("rt", "deepfm")],
)
def test_featurized_test_examples_equal_training_batches_and_scores(
    dataset: str, model_name: str, request: pytest.FixtureRequest
) -> None:
    built: Built = request.getfixturevalue({"syn": "syn", "rt": "ratings"}[dataset])
    data = built.data
    f = _featurizer(built)
    test = data.splits["test"]
    index = np.random.default_rng(0).choice(len(test), size=min(96, len(test)), replace=False)
    want = data.make_batch("test", index, MAX_LEN)
    got = _served_batch(f, data, index)
    _assert_same_batch(got, want)
    assert got.sequences["history"].lengths.max() > 0  # real histories, not all empty
    torch.manual_seed(0)
    model, _ = build_ranker(model_name, data, MAX_LEN)
    model.eval()
    with torch.no_grad():
        a, b = model(got).logits, model(want).logits
    for task in data.tasks:
        torch.testing.assert_close(a[task], b[task], rtol=0, atol=1e-5)


def test_action_buckets_equal_training(syn: Built, ratings: Built) -> None:
    for built in (syn, ratings):
        f = _featurizer(built)
        h = built.data.histories
        assert np.array_equal(f.manifest.value_buckets.bucket(f._h_value), h.side["action"])
    assert _featurizer(ratings).manifest.value_buckets.mode == "rank"  # ratings 1..5
    assert _featurizer(syn).manifest.value_buckets.mode == "quantile"  # dwell seconds


def test_a_request_history_gives_the_stored_histories_features(syn: Built) -> None:
    f = _featurizer(syn)
    test = syn.data.splits["test"]
    i = int(np.argmax(test.seq_offset))  # the longest history
    user_idx, ts = int(test.user[i]), int(test.ts[i])
    user_id = int(f._user_ids[np.flatnonzero(f._user_idx == user_idx)[0]])
    ids, ev_ts, values = f.stored_history(user_id)  # type: ignore[misc]
    before = ev_ts < ts
    ids, ev_ts, values = ids[before], ev_ts[before], values[before]
    assert ids.size > 1
    stored = f.user_features(user_id, ts)
    sent = f.user_features(user_id, ts, (ids, ev_ts, values))
    assert stored.dense == pytest.approx(sent.dense) and np.array_equal(stored.items, sent.items)
    for k in stored.side:
        assert np.array_equal(stored.side[k], sent.side[k])
    # Without values: the event still counts, its value does not (NULL bucket, no mean).
    bare = f.user_features(user_id, ts, (ids, ev_ts, None))
    assert bare.dense["u_cnt"] == stored.dense["u_cnt"] and np.isnan(bare.dense["u_value_mean"])
    assert (bare.side["action"] == f.manifest.value_buckets.n_buckets + 1).all()
    # Events at or after the request ts are not read; unknown items count but leave the sequence.
    later = f.user_features(
        user_id, ts, (np.append(ids, ids[:1]), np.append(ev_ts, ts), np.append(values, 1.0))
    )
    assert later.dense == pytest.approx(stored.dense)
    unknown = f.user_features(user_id, ts, (np.append(ids, 999_999), np.append(ev_ts, ts - 1), None))
    assert unknown.unknown_history == [999_999] and unknown.dense["u_cnt"] == stored.dense["u_cnt"] + 1
    with pytest.raises(FeaturizerError, match="history"):
        f.user_features(user_id, ts, (ids[::-1], ev_ts[::-1], None))


# -- registry and service ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Served:
    ranker: str
    retriever: str
    data: RankingData
    known_user: int
    items: np.ndarray  # raw item ids of the catalogue


def register_synthetic_ranker(
    built: Built, name: str = "tiny-rankmixer", architecture: str = "rankmixer"
) -> Served:
    """A small RankMixer (the distilled-student shape; or ``architecture``) + a popularity retriever on the
    same catalogue."""
    torch.manual_seed(0)
    model, _ = build_ranker(architecture, built.data, MAX_LEN)
    with Warehouse(built.path) as wh:
        tag = register_ranker(name, architecture=architecture, model=model, wh=wh, data=built.data)
        items = wh.sql("SELECT item_id, item_idx FROM syn.item_index ORDER BY item_idx")
        counts = wh.sql(
            "SELECT ii.item_idx, count(e.item_id)::DOUBLE AS n FROM syn.item_index ii "
            "LEFT JOIN syn.events e USING (item_id) GROUP BY 1 ORDER BY 1"
        )
        user = int(wh.sql("SELECT user_id FROM syn.sequences ORDER BY len(item_idx) DESC LIMIT 1")[0, 0])
    pop = build_model("popularity", num_items=items.height)
    pop.load_counts(torch.from_numpy(np.concatenate([[0.0], counts["n"].to_numpy()])).float())
    retriever = register_model(
        f"{name}-pop",
        architecture="popularity",
        task="retrieval",
        model=pop,
        items=items.with_columns(popularity=counts["n"]),
        data_version=built.data.data_version,
    )
    return Served(tag, retriever, built.data, user, items["item_id"].to_numpy())


def test_a_feature_ranker_without_its_featurizer_is_refused(syn: Built) -> None:
    model, _ = build_ranker("deepfm", syn.data, MAX_LEN)
    items = pl.DataFrame({"item_id": [1], "item_idx": [1]})
    with pytest.raises(RegistryError, match="featurizer"):
        register_model(
            "bare", architecture="deepfm", task="ranking", model=model, items=items, data_version="x"
        )


def test_the_featurizer_round_trips_through_the_registry_and_is_checksummed(syn: Built) -> None:
    served = register_synthetic_ranker(syn)
    loaded = load_model(served.ranker)
    assert loaded.featurizer is not None
    with Warehouse(syn.path) as wh:
        fresh = RankingFeaturizer.from_warehouse(wh, syn.data, syn.data.feature_spec(MAX_LEN))
    index = np.arange(min(40, len(syn.data.splits["test"])))
    _assert_same_batch(
        _served_batch(loaded.featurizer, syn.data, index), _served_batch(fresh, syn.data, index)
    )
    root = verify(resolve(served.ranker))
    target = root / ITEMS_FILE  # the item attribute table
    original = target.read_bytes()
    try:
        target.write_bytes(original[:-8] + b"\0" * 8)
        with pytest.raises(RegistryError, match="sha256"):
            load_model(served.ranker)
    finally:
        target.write_bytes(original)


@pytest.fixture(scope="module")
def served(syn: Built) -> Served:
    return register_synthetic_ranker(syn)


@pytest.fixture(scope="module")
def engine(served: Served) -> Iterator[Recommender]:
    config = ServingConfig(
        retriever=served.retriever, ranker=served.ranker, policy_temperature=0.0, pool_size=30
    )
    eng = Recommender(config, load_model(served.retriever), load_model(served.ranker))
    yield eng
    eng.close()


def _direct_scores(
    engine: Recommender, user_id: int, ts: int, candidates: np.ndarray
) -> dict[str, np.ndarray]:
    ranker = engine.ranker
    assert ranker is not None and ranker.featurizer is not None
    f = ranker.featurizer
    batch = f.batch([f.user_features(user_id, ts)], [f.map_items(candidates)])
    with torch.no_grad():
        logits = ranker.module(batch).logits
    return {t: v.double().numpy() for t, v in logits.items()}


def test_rank_scores_candidates_with_the_feature_ranker(engine: Recommender, served: Served) -> None:
    ts = 2_000_000_000
    candidates = [int(i) for i in served.items[:20]]
    response = engine.rank(RankRequest(user_id=served.known_user, candidates=candidates, ts=ts))
    assert response.source == "ranker" and response.cold_start is None
    assert set(response.scores) == set(served.data.tasks)
    direct = _direct_scores(engine, served.known_user, ts, np.array(candidates))
    for task, want in direct.items():
        np.testing.assert_allclose(np.array(response.scores[task]), want, rtol=0, atol=1e-5)
    with pytest.raises(InvalidRequest, match=r"unknown item ids \[424242\]"):  # a guess is not a score
        engine.rank(RankRequest(user_id=served.known_user, candidates=[*candidates, 424242], ts=ts))


def test_unique_pooling_serves_a_hyformer_the_same_scores(syn: Built) -> None:
    """Sequences sent as unique ids + inverse (RECSYS_SERVING_UNIQUE_POOLING) score exactly as the padded
    ids do, for rank and for recommend's re-ranking."""
    served = register_synthetic_ranker(syn, "tiny-hyformer", "hyformer")
    ts = 2_000_000_000
    candidates = [int(i) for i in served.items[:40]]
    out = {}
    for pooled in (False, True):
        config = ServingConfig(
            retriever=served.retriever, ranker=served.ranker, policy_temperature=0.0, unique_pooling=pooled
        )
        eng = Recommender(config, load_model(served.retriever), load_model(served.ranker))
        assert eng.ranker is not None and eng.ranker.unique_pooling is pooled
        rank = eng.rank(RankRequest(user_id=served.known_user, candidates=candidates, ts=ts))
        rec = eng.recommend(RecommendRequest(user_id=served.known_user, k=10, ts=ts))
        out[pooled] = (rank.scores, [(i.item_id, i.score) for i in rec.items])
        eng.close()
    assert out[True][0].keys() == out[False][0].keys()
    for task in out[False][0]:
        np.testing.assert_allclose(out[True][0][task], out[False][0][task], rtol=0, atol=1e-6)
    assert [i for i, _ in out[True][1]] == [i for i, _ in out[False][1]]
    np.testing.assert_allclose([s for _, s in out[True][1]], [s for _, s in out[False][1]], rtol=0, atol=1e-6)


def test_recommend_reranks_the_pool_with_the_feature_ranker(engine: Recommender, served: Served) -> None:
    ts = 2_000_000_000
    response = engine.recommend(RecommendRequest(user_id=served.known_user, k=5, ts=ts))
    assert response.source == "ranker" and len(response.items) == 5
    ids = np.array([it.item_id for it in response.items])
    want = _direct_scores(engine, served.known_user, ts, ids)[served.data.tasks[0]]
    np.testing.assert_allclose([it.score for it in response.items], want, rtol=0, atol=1e-5)
    assert [it.score for it in response.items] == sorted((it.score for it in response.items), reverse=True)


def test_a_sent_history_with_values_is_featurized(engine: Recommender, served: Served) -> None:
    history = [{"item_id": int(i), "ts": 1_000 + n, "value": 3.5} for n, i in enumerate(served.items[:6])]
    response = engine.rank(
        RankRequest(history=history, candidates=[int(i) for i in served.items[6:9]], ts=5_000)
    )
    assert response.source == "ranker"
    f = engine.ranker.featurizer  # type: ignore[union-attr]
    ids = served.items[:6]
    user = f.user_features(None, 5_000, (ids, np.arange(1_000, 1_006), np.full(6, 3.5)))
    assert user.dense["u_value_mean"] == 3.5 and user.user_idx == 0
    batch = f.batch([user], [f.map_items(served.items[6:9])])
    with torch.no_grad():
        want = engine.ranker.module(batch).logits[served.data.tasks[0]].double().numpy()  # type: ignore[union-attr]
    np.testing.assert_allclose(response.scores[served.data.tasks[0]], want, rtol=0, atol=1e-5)


def test_bad_history_values_name_the_field() -> None:
    with pytest.raises(ValidationError) as err:
        RankRequest(history=[{"item_id": 1, "ts": 5, "value": float("nan")}], candidates=[1])
    assert err.value.errors()[0]["loc"] == ("history", 0, "value")
    with pytest.raises(ValidationError) as err:
        RankRequest(history=[{"item_id": 1, "ts": 5, "value": "high"}], candidates=[1])
    assert err.value.errors()[0]["loc"] == ("history", 0, "value")


def test_limits_still_apply_with_a_feature_ranker(served: Served) -> None:
    config = ServingConfig(retriever=served.retriever, ranker=served.ranker, max_candidates=3)
    eng = Recommender(config, load_model(served.retriever), load_model(served.ranker))
    with pytest.raises(InvalidRequest, match="^candidates"):
        eng.rank(RankRequest(user_id=served.known_user, candidates=[int(i) for i in served.items[:4]]))


def test_serving_imports_no_private_helper_of_training() -> None:
    """The encodings training and serving share live in recsys.features.encoding; serving never reaches
    into training's private names."""
    import ast

    root = Path(__file__).resolve().parents[2] / "recsys" / "serving"
    offenders = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("recsys.training"):
                offenders += [
                    f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")
                ]
    assert offenders == []
