"""Semantic IDs: RQ-KMeans / RQ-VAE codes are deterministic for a seed, every item gets a unique code, the
quality figures match hand counts, and the table is published with its lineage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.models.semantic_ids import (
    SemanticIdConfig,
    SemanticIds,
    add_dedup_code,
    attribute_vectors,
    build_semantic_ids,
    combine_vectors,
    publish_semantic_ids,
    rq_kmeans,
)
from recsys.warehouse import Warehouse


def _vectors(n: int = 80, dim: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


@pytest.mark.parametrize(
    "config",
    [
        SemanticIdConfig(codebook_size=4, seed=3),
        SemanticIdConfig(method="rq-vae", codebook_size=4, seed=3, vae_steps=30, hidden_dim=16, latent_dim=4),
    ],
)
def test_codes_are_deterministic_for_a_seed_and_unique(config: SemanticIdConfig) -> None:
    x = _vectors()
    a, b = build_semantic_ids(x, config), build_semantic_ids(x, config)
    np.testing.assert_array_equal(a.codes, b.codes)
    assert a.codes.shape == (80, 4)
    assert len({tuple(c) for c in a.codes.tolist()}) == 80  # every item has its own 4-token code
    assert a.codes[:, :3].min() >= 0 and a.codes[:, :3].max() < 4


def test_identical_vectors_are_separated_by_the_dedup_code() -> None:
    x = np.repeat(_vectors(5), 3, axis=0)  # every vector three times: guaranteed collisions
    ids = build_semantic_ids(x, SemanticIdConfig(codebook_size=8))
    assert len({tuple(c) for c in ids.codes.tolist()}) == 15
    assert ids.collision_rate == 1.0 and ids.dedup_size == 3


def test_dedup_code_collision_rate_and_utilisation_by_hand() -> None:
    codes = np.array([[0, 1, 2], [0, 1, 2], [1, 1, 0], [0, 1, 2], [1, 0, 0]])
    full = add_dedup_code(codes)
    np.testing.assert_array_equal(full[:, 3], [0, 1, 0, 2, 0])
    ids = SemanticIds(full, codebook_size=4, levels=3)
    assert ids.collision_rate == pytest.approx(3 / 5)
    assert ids.utilisation() == [2 / 4, 2 / 4, 2 / 4]
    frame = ids.frame()
    assert frame.columns == ["item_idx", "c1", "c2", "c3", "c4"]
    assert frame["item_idx"].to_list() == [1, 2, 3, 4, 5]


def test_rq_kmeans_residuals_shrink_with_levels() -> None:
    x = _vectors(200, 4).astype(np.float64)
    codes, books = rq_kmeans(x, 8, 3, seed=0)
    recon = [sum(books[j][codes[:, j]] for j in range(level)) for level in (1, 2, 3)]
    errors = [float(((x - r) ** 2).sum(1).mean()) for r in recon]
    assert errors[0] > errors[1] > errors[2]


def test_bad_vectors_are_rejected() -> None:
    x = _vectors(10)
    x[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        build_semantic_ids(x, SemanticIdConfig(codebook_size=4))
    with pytest.raises(ValueError, match="item counts"):
        combine_vectors(_vectors(10), _vectors(9))


def test_attribute_vectors_and_publish(tmp_path: Path) -> None:
    with Warehouse(tmp_path / "wh.duckdb") as wh:
        wh.publish("ds.item_index", pl.DataFrame({"item_id": [10, 20, 30], "item_idx": [1, 2, 3]}))
        wh.publish(
            "ds.items",
            pl.DataFrame(
                {
                    "item_id": [10, 20, 30],
                    "genres": [["Drama"], ["Comedy", "Drama"], None],
                    "release_ts": [0, 10 * 365 * 86400, None],
                }
            ),
        )
        x = attribute_vectors(wh, "ds", 3)
        np.testing.assert_array_equal(x[:, :2], [[0, 1], [1, 1], [0, 0]])  # Comedy, Drama
        assert x[0, 2] < 0 < x[1, 2] and x[2, 2] == 0.0  # standardised year; unknown -> mean
        config = SemanticIdConfig(codebook_size=2)
        ids = build_semantic_ids(x, config)
        version = publish_semantic_ids(wh, "ds", ids, config, inputs={"items": "v1"})
        table = wh.table("ds.semantic_ids").sort("item_idx")
        assert table.columns == ["item_idx", "c1", "c2", "c3", "c4"] and table.height == 3
        assert wh.latest("ds.semantic_ids").params["collision_rate"] == ids.collision_rate
        assert version.version == wh.version("ds.semantic_ids")
