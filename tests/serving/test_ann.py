"""The IVF retrieval option: the FAISS index against exact search, its on-disk cache (reuse, misses, corrupt
files), and the service's recommend through it (exclusions, category filters, the exact fallback for rows the
probed cells leave short)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from recsys.serving.ann import AnnSearch, IvfItemIndex, default_cache_dir, default_lists
from recsys.serving.registry import load_model
from recsys.serving.schemas import RecommendRequest
from recsys.serving.service import Recommender, ServingConfig
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


def _same(a: AnnSearch, b: AnnSearch) -> None:
    np.testing.assert_array_equal(a.item_idx, b.item_idx)
    np.testing.assert_array_equal(a.scores, b.scores)


def _cache_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir())


def test_a_second_start_loads_the_cached_index_and_finds_the_same_items(tmp_path: Path) -> None:
    items = _clustered(2000, 16, 20, seed=5)
    users = _clustered(30, 16, 20, seed=6)[1:]
    first = IvfItemIndex.build_or_load(items, lists=20, probe=4, cache_dir=tmp_path)
    assert not first.loaded_from_cache
    index_file = first.cache_path
    assert index_file is not None and index_file.parent == tmp_path
    # The index and its sidecar, nothing else: the temporary files were renamed away.
    assert _cache_files(tmp_path) == sorted([index_file.name, index_file.with_suffix(".json").name])
    sidecar = json.loads(index_file.with_suffix(".json").read_text())
    assert sidecar["key"]["num_items"] == 2000 and sidecar["key"]["lists"] == 20
    second = IvfItemIndex.build_or_load(items, lists=20, probe=4, cache_dir=tmp_path)
    assert second.loaded_from_cache and second.cache_path == index_file
    assert (second.num_items, second.dim, second.lists, second.probe) == (2000, 16, 20, 4)
    _same(second.search(users, 15), first.search(users, 15))
    _same(second.search(users, 15), IvfItemIndex(items, lists=20, probe=4).search(users, 15))


def test_the_probe_given_at_load_applies(tmp_path: Path) -> None:
    items = _clustered(1500, 16, 15, seed=7)
    users = _clustered(20, 16, 15, seed=8)[1:]
    IvfItemIndex.build_or_load(items, lists=25, probe=1, cache_dir=tmp_path)
    every_cell = IvfItemIndex.build_or_load(items, lists=25, probe=25, cache_dir=tmp_path)
    assert every_cell.loaded_from_cache and every_cell.probe == 25
    np.testing.assert_array_equal(every_cell.search(users, 10).item_idx, _exact_top(items, users, 10))
    assert len(_cache_files(tmp_path)) == 2  # probe is not part of the key: one index


def test_other_vectors_lists_or_seed_miss_the_cache(tmp_path: Path) -> None:
    items = _clustered(1200, 8, 10, seed=9)
    users = _clustered(20, 8, 10, seed=10)[1:]
    IvfItemIndex.build_or_load(items, lists=10, cache_dir=tmp_path)
    moved = items.copy()
    moved[7] = -moved[7]  # one item changed
    for vectors, lists, seed in [(moved, 10, 0), (items, 12, 0), (items, 10, 1)]:
        index = IvfItemIndex.build_or_load(vectors, lists=lists, seed=seed, cache_dir=tmp_path)
        assert not index.loaded_from_cache, (lists, seed)
        _same(index.search(users, 10), IvfItemIndex(vectors, lists=lists, seed=seed).search(users, 10))
    assert len(_cache_files(tmp_path)) == 2 * 4  # four keys, an index and a sidecar each
    # Row 0 is padding, not an item: it is not part of what the key hashes.
    padded = items.copy()
    padded[0] = 1.0
    assert IvfItemIndex.build_or_load(padded, lists=10, cache_dir=tmp_path).loaded_from_cache


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_a_damaged_cache_file_is_caught_by_its_sha256_and_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    items = _clustered(1500, 16, 15, seed=11)
    users = _clustered(25, 16, 15, seed=12)[1:]
    built = IvfItemIndex.build_or_load(items, lists=15, probe=3, cache_dir=tmp_path)
    assert built.cache_path is not None
    data = bytearray(built.cache_path.read_bytes())
    if damage == "flip":  # in the item vectors near the end: FAISS would read these without complaint
        data[-200:-190] = bytes(b ^ 0xFF for b in data[-200:-190])
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray()
    built.cache_path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="recsys.serving.ann"):
        rebuilt = IvfItemIndex.build_or_load(items, lists=15, probe=3, cache_dir=tmp_path)
    assert not rebuilt.loaded_from_cache
    assert "sha256" in caplog.text and "rebuilding" in caplog.text
    _same(rebuilt.search(users, 10), IvfItemIndex(items, lists=15, probe=3).search(users, 10))
    # The rebuild overwrote the damaged file: the next start loads it again.
    again = IvfItemIndex.build_or_load(items, lists=15, probe=3, cache_dir=tmp_path)
    assert again.loaded_from_cache
    _same(again.search(users, 10), rebuilt.search(users, 10))
    assert len(_cache_files(tmp_path)) == 2


def test_a_bad_or_missing_sidecar_or_an_unwritable_cache_still_gives_the_index(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    items = _clustered(800, 8, 8, seed=13)
    users = _clustered(10, 8, 8, seed=14)[1:]
    fresh = IvfItemIndex(items, lists=8, probe=2).search(users, 5)
    built = IvfItemIndex.build_or_load(items, lists=8, probe=2, cache_dir=tmp_path)
    assert built.cache_path is not None
    sidecar = built.cache_path.with_suffix(".json")
    sidecar.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="recsys.serving.ann"):
        index = IvfItemIndex.build_or_load(items, lists=8, probe=2, cache_dir=tmp_path)
    assert not index.loaded_from_cache and "sidecar" in caplog.text
    sidecar.unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="recsys.serving.ann"):
        index = IvfItemIndex.build_or_load(items, lists=8, probe=2, cache_dir=tmp_path)
    assert not index.loaded_from_cache and "incomplete" in caplog.text
    _same(index.search(users, 5), fresh)
    assert IvfItemIndex.build_or_load(items, lists=8, probe=2, cache_dir=tmp_path).loaded_from_cache
    # A cache directory that cannot be created (a file is in the way): no cache, the built index serves.
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="recsys.serving.ann"):
        index = IvfItemIndex.build_or_load(items, lists=8, probe=2, cache_dir=blocked / "ann")
    assert not index.loaded_from_cache and index.cache_path is None and "not cached" in caplog.text
    _same(index.search(users, 5), fresh)


def test_cache_arguments_are_checked_before_any_file_is_touched(tmp_path: Path) -> None:
    items = _clustered(100, 8, 4, seed=15)
    with pytest.raises(ValueError, match="lists"):
        IvfItemIndex.build_or_load(items, lists=101, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="probe"):
        IvfItemIndex.build_or_load(items, probe=0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="cache_keep"):
        IvfItemIndex.build_or_load(items, cache_keep=0, cache_dir=tmp_path)
    assert _cache_files(tmp_path) == []


def test_the_cache_keeps_only_the_most_recently_used_indexes(tmp_path: Path) -> None:
    items = _clustered(400, 8, 4, seed=16)

    def start(seed: int) -> IvfItemIndex:
        return IvfItemIndex.build_or_load(items, lists=4, seed=seed, cache_dir=tmp_path, cache_keep=2)

    first, second = start(0), start(1)
    assert first.cache_path is not None and second.cache_path is not None
    # Make the order unambiguous on coarse-mtime filesystems: the first is older, then a load touches it.
    os.utime(first.cache_path, (1_000_000, 1_000_000))
    os.utime(second.cache_path, (2_000_000, 2_000_000))
    assert start(0).loaded_from_cache
    third = start(2)
    assert third.cache_path is not None
    # seed 1 was the least recently used: it goes, with its sidecar; the reloaded seed 0 stays.
    kept = [first.cache_path, third.cache_path]
    names = [p.name for p in kept] + [p.with_suffix(".json").name for p in kept]
    assert _cache_files(tmp_path) == sorted(names)
    assert start(0).loaded_from_cache and not start(1).loaded_from_cache


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
    described = ivf.retrieval_index()
    assert isinstance(described.pop("loaded_from_cache"), bool)  # a first start builds, a later one loads
    assert described == {"kind": "ivf", "items": 12, "lists": 3, "probe": 3}
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


def test_the_service_reuses_the_cached_index_unless_told_not_to(
    tiny: TinyModels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "cache" / "ann"
    first = _engine(tiny, retrieval_index="ivf", ivf_lists=3, ivf_probe=3)
    second = _engine(tiny, retrieval_index="ivf", ivf_lists=3, ivf_probe=2)
    assert first.retriever.ann is not None and not first.retriever.ann.loaded_from_cache
    assert second.retriever.ann is not None and second.retriever.ann.loaded_from_cache
    assert second.retriever.ann.probe == 2
    assert len(list((tmp_path / "cache" / "ann").glob("ivf-*.faiss"))) == 1
    request = RecommendRequest(history=_history([3, 4, 5]), k=4, ts=NOW)
    third = _engine(tiny, retrieval_index="ivf", ivf_lists=3, ivf_probe=3)
    assert _ids(third, request) == _ids(first, request)
    off = _engine(tiny, retrieval_index="ivf", ivf_lists=3, ivf_probe=3, ivf_cache=False)
    assert off.retriever.ann is not None and not off.retriever.ann.loaded_from_cache
    assert off.retriever.ann.cache_path is None
    assert _ids(off, request) == _ids(first, request)
