"""The IVF retrieval option: the FAISS index against exact search, and the service's recommend through it
(exclusions, category filters, the exact fallback for rows the probed cells leave short)."""

from __future__ import annotations

import numpy as np
import pytest

from serving.ann import IvfItemIndex, default_lists
from serving.registry import load_model
from serving.schemas import RecommendRequest
from serving.service import Recommender, ServingConfig
from tests.serving.test_service import ITEM_OFFSET, NOW, TinyModels, _history, train_and_register


def _clustered(n: int, d: int, clusters: int, seed: int) -> np.ndarray:
    """[n + 1, d] unit vectors around ``clusters`` centres (row 0: padding, zeros)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    x = centres[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.vstack([np.zeros((1, d)), x]).astype(np.float32)


def _exact_top(items: np.ndarray, users: np.ndarray, k: int) -> np.ndarray:
    scores = users @ items[1:].T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k] + 1  # item_idx


def test_probing_every_cell_is_exact_search() -> None:
    items = _clustered(3000, 16, 20, seed=0)
    users = _clustered(40, 16, 20, seed=1)[1:]
    index = IvfItemIndex(items, lists=30, probe=30)
    found = index.search(users, 10)
    np.testing.assert_array_equal(found.item_idx, _exact_top(items, users, 10))
    np.testing.assert_allclose(found.scores, np.sort(users @ items[1:].T, axis=1)[:, ::-1][:, :10], rtol=1e-5)


def test_a_few_probes_keep_most_of_the_exact_top_k_and_never_return_padding() -> None:
    items = _clustered(5000, 16, 25, seed=2)
    users = _clustered(100, 16, 25, seed=3)[1:]
    index = IvfItemIndex(items, probe=8)  # default lists: 4 * sqrt(5000) = 282
    assert index.lists == default_lists(5000) == 128  # capped at N / 39 for k-means
    found = index.search(users, 10)
    exact = _exact_top(items, users, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.item_idx, exact, strict=True)])
    assert recall >= 0.8, recall
    assert (found.item_idx > 0).all()
    # Asking for more than the probed cells hold: the missing slots are 0 with score -inf.
    tiny = IvfItemIndex(items[:50], lists=1, probe=1).search(users[:2], 80)
    assert (tiny.item_idx[:, 49:] == 0).all() and np.isneginf(tiny.scores[:, 49:]).all()


def test_bad_index_arguments_are_named() -> None:
    items = _clustered(100, 8, 4, seed=4)
    with pytest.raises(ValueError, match="lists"):
        IvfItemIndex(items, lists=101)
    with pytest.raises(ValueError, match="probe"):
        IvfItemIndex(items, probe=0)
    bad = items.copy()
    bad[5, 0] = np.nan
    with pytest.raises(ValueError, match="item_vectors"):
        IvfItemIndex(bad)
    with pytest.raises(ValueError, match="users"):
        IvfItemIndex(items, lists=2).search(np.zeros((1, 7), dtype=np.float32), 3)


@pytest.fixture(scope="module")
def tiny() -> TinyModels:
    return train_and_register()


def _engine(tiny: TinyModels, **options: object) -> Recommender:
    config = ServingConfig(retriever=tiny.retriever, policy_temperature=0.0, **options)  # type: ignore[arg-type]
    return Recommender(config, load_model(tiny.retriever))


def _ids(engine: Recommender, request: RecommendRequest) -> list[int]:
    return [item.item_id for item in engine.recommend(request).items]


def test_recommend_through_the_index_equals_exact_when_every_cell_is_probed(tiny: TinyModels) -> None:
    exact = _engine(tiny)
    ivf = _engine(tiny, retrieval_index="ivf", ivf_lists=3, ivf_probe=3)
    assert ivf.retrieval_index() == {"kind": "ivf", "items": 12, "lists": 3, "probe": 3}
    assert exact.retrieval_index() == {"kind": "exact", "items": 12}
    requests = [
        RecommendRequest(history=_history([3, 4, 5]), k=4, ts=NOW),
        RecommendRequest(user_id=next(iter(tiny.histories)), k=3, ts=NOW),
        RecommendRequest(
            history=_history([1, 2]),
            k=6,
            ts=NOW,
            options={"categories": ["even"], "exclude_items": [ITEM_OFFSET + 4], "exclude_seen": False},
        ),
        RecommendRequest(user_id=999_999, k=3, ts=NOW),  # cold start: popularity, never the index
    ]
    for request in requests:
        assert _ids(ivf, request) == _ids(exact, request)
    response = ivf.recommend(requests[0])
    expected = exact.recommend(requests[0])
    for got, want in zip(response.items, expected.items, strict=True):
        assert got.score == pytest.approx(want.score, rel=1e-5, abs=1e-5)  # the exact path's score scale


def test_rows_the_probed_cells_leave_short_fall_back_to_exact(
    tiny: TinyModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    exact = _engine(tiny)
    ivf = _engine(tiny, retrieval_index="ivf", ivf_lists=6, ivf_probe=1, ivf_overfetch=1)
    exact_rows: list[int] = []
    scored_exactly = ivf._exact_pools
    monkeypatch.setattr(
        ivf, "_exact_pools", lambda jobs, size: exact_rows.append(len(jobs)) or scored_exactly(jobs, size)
    )
    # 6 items of each category; one probed cell of ~2 items cannot give 5 "odd" unseen items.
    request = RecommendRequest(history=_history([2, 4]), k=5, ts=NOW, options={"categories": ["odd"]})
    assert _ids(ivf, request) == _ids(exact, request)
    assert exact_rows == [1]  # the row went through the exact path
    assert all((i - ITEM_OFFSET) % 2 == 1 for i in _ids(ivf, request))
