"""Semantic IDs: each item becomes a short tuple of codes from a residual quantiser over an item vector.

Two quantisers (spec: models.md, "Semantic IDs and generative retrieval"):
- RQ-KMeans: k-means (k-means++ init, seeded) on the item vectors gives level 1; k-means on the residuals
  (vector minus its centroid) gives level 2, and so on.
- RQ-VAE: an encoder MLP maps the vector to a latent; ``levels`` residual codebooks quantise it (nearest code,
  straight-through gradient); a decoder MLP reconstructs the vector. Loss = reconstruction MSE + per level
  ||sg(r) - e||^2 + beta ||r - sg(e)||^2 (codebook + commitment). Codebooks start from RQ-KMeans on the
  initial latents so that no code starts dead.
A final dedup code numbers the items that share all ``levels`` codes (0, 1, ... in item_idx order), so every
item gets a unique (levels + 1)-token code. Reported: the collision rate (share of items whose first
``levels`` codes are shared with another item) and the codebook utilisation (distinct codes used / K, per
level).

Item vectors (``item_vectors``): MovieLens attributes (genre one-hot + standardised release year), a trained
item embedding (e.g. SASRec's), or both (each part L2-normalised, then concatenated).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl
import torch
from pydantic import Field
from torch import nn

from recsys.core.config import FrozenModel
from recsys.warehouse import Warehouse
from recsys.warehouse.store import TableVersion


class SemanticIdConfig(FrozenModel):
    method: Literal["rq-kmeans", "rq-vae"] = "rq-kmeans"
    levels: int = Field(3, ge=1, le=8, description="Residual levels before the dedup code.")
    codebook_size: int = Field(32, ge=2, description="Codes per level (K).")
    seed: int = 0
    kmeans_iters: int = Field(50, ge=1)
    # RQ-VAE only.
    latent_dim: int = Field(32, gt=0)
    hidden_dim: int = Field(128, gt=0)
    commitment: float = Field(0.25, ge=0.0, description="beta of the commitment term.")
    vae_steps: int = Field(1500, ge=1, description="Full-batch Adam steps.")
    vae_lr: float = Field(1e-3, gt=0.0)


@dataclass(frozen=True)
class SemanticIds:
    """Codes of items 1..n: ``codes[i - 1]`` is item i's (levels + 1) tokens, the last one the dedup code."""

    codes: np.ndarray  # [n, levels + 1] int64
    codebook_size: int
    levels: int

    @property
    def num_items(self) -> int:
        return int(self.codes.shape[0])

    @property
    def dedup_size(self) -> int:
        """Vocabulary of the dedup token: the largest collision group."""
        return int(self.codes[:, -1].max()) + 1 if self.num_items else 1

    @property
    def collision_rate(self) -> float:
        """Share of items whose first ``levels`` codes are shared with at least one other item."""
        if not self.num_items:
            return 0.0
        _, inverse, counts = np.unique(
            self.codes[:, : self.levels], axis=0, return_inverse=True, return_counts=True
        )
        return float((counts[inverse.ravel()] > 1).mean())

    def utilisation(self) -> list[float]:
        """Distinct codes used / K at each of the ``levels`` levels."""
        return [len(np.unique(self.codes[:, j])) / self.codebook_size for j in range(self.levels)]

    def frame(self) -> pl.DataFrame:
        """``item_idx, c1 .. c{levels+1}`` (the table ``<ds>.semantic_ids``)."""
        data = {"item_idx": np.arange(1, self.num_items + 1, dtype=np.int64)}
        data.update({f"c{j + 1}": self.codes[:, j].astype(np.int64) for j in range(self.codes.shape[1])})
        return pl.DataFrame(data)

    def summary(self) -> dict[str, float]:
        out = {"collision_rate": self.collision_rate, "max_collision_group": float(self.dedup_size)}
        out.update({f"utilisation_l{j + 1}": u for j, u in enumerate(self.utilisation())})
        return out


# -- item vectors --------------------------------------------------------------------------------------------
def attribute_vectors(wh: Warehouse, dataset: str, num_items: int) -> np.ndarray:
    """[num_items, G + 1]: genre one-hot (``<ds>.items.genres``) + standardised release year, by item_idx."""
    frame = wh.sql(
        f"SELECT x.item_idx, i.genres, i.release_ts FROM {dataset}.item_index x "
        f"LEFT JOIN {dataset}.items i USING (item_id) ORDER BY x.item_idx"
    )
    genres = sorted({g for row in frame["genres"].to_list() if row for g in row})
    column = {g: j for j, g in enumerate(genres)}
    out = np.zeros((num_items, len(genres) + 1), dtype=np.float32)
    years = np.full(num_items, np.nan)
    for idx, row, ts in frame.iter_rows():
        if not 1 <= idx <= num_items:
            raise ValueError(f"{dataset}.item_index: item_idx {idx} outside 1..{num_items}")
        for g in row or []:
            out[idx - 1, column[g]] = 1.0
        if ts is not None:
            years[idx - 1] = 1970 + ts / (365.25 * 86400)
    known = ~np.isnan(years)
    mean = years[known].mean() if known.any() else 0.0
    std = years[known].std() if known.sum() > 1 else 1.0
    out[:, -1] = np.where(known, (years - mean) / (std or 1.0), 0.0)
    return out


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def combine_vectors(*parts: np.ndarray) -> np.ndarray:
    """Concatenate row-aligned item vectors, each part L2-normalised per row so no part dominates."""
    if not parts:
        raise ValueError("combine_vectors: give at least one array of item vectors")
    rows = {p.shape[0] for p in parts}
    if len(rows) != 1:
        raise ValueError(f"combine_vectors: parts have different item counts {sorted(rows)}")
    return np.concatenate([_unit_rows(p.astype(np.float32)) for p in parts], axis=1)


# -- quantisers ----------------------------------------------------------------------------------------------
def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means, k-means++ init: (centroids [k', D], assignment [n]); k' = min(k, distinct rows)."""
    n = len(x)
    k = min(k, len(np.unique(x, axis=0)))
    centroids = np.empty((k, x.shape[1]), dtype=np.float64)
    centroids[0] = x[rng.integers(n)]
    d2 = ((x - centroids[0]) ** 2).sum(1)
    for j in range(1, k):
        total = d2.sum()
        pick = rng.choice(n, p=d2 / total) if total > 0 else rng.integers(n)
        centroids[j] = x[pick]
        d2 = np.minimum(d2, ((x - centroids[j]) ** 2).sum(1))
    assign = np.zeros(n, dtype=np.int64)
    for _ in range(iters):
        dist = (x**2).sum(1, keepdims=True) - 2 * x @ centroids.T + (centroids**2).sum(1)
        new = dist.argmin(1)
        for j in range(k):
            members = new == j
            if members.any():
                centroids[j] = x[members].mean(0)
            else:  # an empty cluster takes the point farthest from its centroid
                far = int(dist[np.arange(n), new].argmax())
                centroids[j], new[far] = x[far], j
        if np.array_equal(new, assign):
            break
        assign = new
    return centroids, assign


def rq_kmeans(
    x: np.ndarray, codebook_size: int, levels: int, seed: int, iters: int = 50
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Residual k-means: codes [n, levels] and the codebook of each level."""
    rng = np.random.default_rng(seed)
    residual = x.astype(np.float64)
    codes, books = np.zeros((len(x), levels), dtype=np.int64), []
    for level in range(levels):
        centroids, assign = kmeans(residual, codebook_size, rng, iters)
        codes[:, level] = assign
        books.append(centroids)
        residual = residual - centroids[assign]
    return codes, books


class RQVAE(nn.Module):
    """Encoder MLP -> ``levels`` residual codebooks (straight-through) -> decoder MLP."""

    def __init__(self, input_dim: int, config: SemanticIdConfig) -> None:
        super().__init__()
        self.config = config
        h, z = config.hidden_dim, config.latent_dim
        self.encoder = nn.Sequential(nn.Linear(input_dim, h), nn.ReLU(), nn.Linear(h, z))
        self.decoder = nn.Sequential(nn.Linear(z, h), nn.ReLU(), nn.Linear(h, input_dim))
        self.codebooks = nn.ParameterList(
            nn.Parameter(torch.randn(config.codebook_size, z) * 0.1) for _ in range(config.levels)
        )

    def quantise(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(quantised latent, straight-through gradient; codes [n, levels]; codebook + commitment loss)."""
        residual, total = z, torch.zeros_like(z)
        codes, vq_loss = [], z.new_zeros(())
        for book in self.codebooks:
            idx = torch.cdist(residual, book).argmin(1)  # [n]
            e = book[idx]  # [n, z]
            vq_loss = (
                vq_loss
                + ((residual.detach() - e) ** 2).sum(1).mean()
                + self.config.commitment * ((residual - e.detach()) ** 2).sum(1).mean()
            )
            total = total + e
            residual = residual - e.detach()
            codes.append(idx)
        quantised = z + (total - z).detach()  # straight-through estimator
        return quantised, torch.stack(codes, 1), vq_loss

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, reconstruction MSE, codes)."""
        quantised, codes, vq_loss = self.quantise(self.encoder(x))
        recon = ((self.decoder(quantised) - x) ** 2).sum(1).mean()
        return recon + vq_loss, recon, codes


def rq_vae(x: np.ndarray, config: SemanticIdConfig) -> tuple[np.ndarray, RQVAE]:
    """Train an RQ-VAE on the item vectors (full batch) and return the codes [n, levels] and the model."""
    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        model = RQVAE(x.shape[1], config)
    data = torch.from_numpy(x.astype(np.float32))
    with torch.no_grad():  # codebooks start at RQ-KMeans centroids of the untrained latents: no dead codes
        _, books = rq_kmeans(
            model.encoder(data).numpy(), config.codebook_size, config.levels, config.seed, config.kmeans_iters
        )
        for param, book in zip(model.codebooks, books, strict=True):
            fill = torch.randn(param.shape, generator=generator) * 0.01
            fill[: len(book)] = torch.from_numpy(book).float()
            param.copy_(fill)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.vae_lr)
    for _ in range(config.vae_steps):
        loss, _, _ = model(data)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        _, _, codes = model(data)
    return codes.numpy().astype(np.int64), model


def add_dedup_code(codes: np.ndarray) -> np.ndarray:
    """Append the dedup token: 0, 1, ... over the items (in row order) that share all their codes."""
    out = np.zeros((len(codes), codes.shape[1] + 1), dtype=np.int64)
    out[:, :-1] = codes
    seen: dict[tuple[int, ...], int] = {}
    for row, code in enumerate(map(tuple, codes.tolist())):
        out[row, -1] = seen.get(code, 0)
        seen[code] = out[row, -1] + 1
    return out


def build_semantic_ids(vectors: np.ndarray, config: SemanticIdConfig) -> SemanticIds:
    """Quantise item vectors [n, D] (row i = item_idx i + 1) into unique (levels + 1)-token semantic IDs."""
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError(f"vectors must be a non-empty [n, D] array, got shape {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise ValueError("vectors: contains NaN or inf")
    if config.method == "rq-kmeans":
        codes, _ = rq_kmeans(vectors, config.codebook_size, config.levels, config.seed, config.kmeans_iters)
    else:
        codes, _ = rq_vae(vectors, config)
    return SemanticIds(add_dedup_code(codes), config.codebook_size, config.levels)


def publish_semantic_ids(
    wh: Warehouse,
    dataset: str,
    ids: SemanticIds,
    config: SemanticIdConfig,
    *,
    inputs: dict[str, str] | None = None,
    source: str = "attributes",
) -> TableVersion:
    """Publish ``<dataset>.semantic_ids`` (item_idx, c1..c4) with its config and quality in the lineage."""
    params = {**config.model_dump(mode="json"), "vectors": source, **ids.summary()}
    return wh.publish(f"{dataset}.semantic_ids", ids.frame(), inputs=inputs or {}, params=params)
