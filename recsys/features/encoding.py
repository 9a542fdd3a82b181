"""Feature encodings shared by training and serving: what a ranker's inputs are made of, defined once.

``training.ranking`` encodes the training examples with these functions and ``serving.featurize`` encodes
requests with them, so a served ranker sees exactly the ids and buckets it was trained on:

- ``vocabulary`` / ``encode``: a categorical column's sorted distinct non-null values -> ids 1..V (0 is
  missing or unknown);
- ``categorical_columns``: which columns of a table are categorical (VARCHAR or BOOLEAN);
- ``ValueBuckets``: the ``action`` side feature, an event's value (rating, dwell seconds) -> bucket 1..n
  (n + 1 for NULL): the ranks of the distinct reference values when there are at most n of them (MovieLens
  ratings), else the reference's quantiles. ``fit`` keeps only what ``bucket`` reads, so serving stores a
  handful of numbers instead of the reference values;
- ``symlog``: the dense statistics' transform before standardisation.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import polars as pl
from pydantic import Field

from recsys.core.config import FrozenModel


def vocabulary(values: pl.Series) -> dict[Any, int]:
    """Sorted distinct non-null values -> 1..V (0 is missing/unknown)."""
    distinct = values.drop_nulls().unique().sort().to_list()
    return {v: i + 1 for i, v in enumerate(distinct)}


def encode(values: pl.Series, vocab: dict[Any, int]) -> np.ndarray:
    """Values -> their vocabulary ids (0 for null or a value outside the vocabulary)."""
    return np.asarray([vocab.get(v, 0) for v in values.to_list()], dtype=np.int64)


def categorical_columns(types: dict[str, str], skip: tuple[str, ...]) -> list[str]:
    """The categorical columns (VARCHAR or BOOLEAN, DuckDB type names) of ``types``, but ``skip``."""
    return [c for c, t in types.items() if c not in skip and (t == "VARCHAR" or t == "BOOLEAN")]


def symlog(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


class ValueBuckets(FrozenModel):
    """Event value -> bucket id, from the reference values reduced to what the bucketing reads: the distinct
    values (``rank``, at most ``n_buckets`` of them) or the quantile edges (``quantile``)."""

    n_buckets: int = Field(ge=1)
    mode: Literal["empty", "rank", "quantile"]
    points: tuple[float, ...] = ()

    @classmethod
    def fit(cls, reference: np.ndarray, n_buckets: int) -> ValueBuckets:
        """The buckets of ``reference`` (NaN ignored; training: the values before the validation period)."""
        ref = reference[np.isfinite(reference)]
        distinct = np.unique(ref)
        if distinct.size == 0:
            return cls(n_buckets=n_buckets, mode="empty")
        if distinct.size <= n_buckets:
            return cls(n_buckets=n_buckets, mode="rank", points=tuple(float(v) for v in distinct))
        edges = np.quantile(ref, np.linspace(0.0, 1.0, n_buckets + 1)[1:-1])
        return cls(n_buckets=n_buckets, mode="quantile", points=tuple(float(v) for v in edges))

    def bucket(self, values: np.ndarray) -> np.ndarray:
        """Event values -> bucket ids 1..n, n + 1 for NULL/NaN."""
        values = np.asarray(values, dtype=np.float64)
        out = np.full(values.shape, self.n_buckets + 1, dtype=np.int64)
        finite = np.isfinite(values)
        points = np.asarray(self.points, dtype=np.float64)
        if self.mode == "rank":
            out[finite] = np.clip(np.searchsorted(points, values[finite], side="right"), 1, self.n_buckets)
        elif self.mode == "quantile":
            out[finite] = np.searchsorted(points, values[finite], side="right") + 1
        return out


def value_buckets(values: np.ndarray, reference: np.ndarray, n_buckets: int) -> np.ndarray:
    """Event values -> bucket ids 1..n (n + 1 for NULL/NaN) under the buckets of ``reference``."""
    return ValueBuckets.fit(reference, n_buckets).bucket(values)
