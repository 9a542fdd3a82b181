"""The logging policy: a Plackett-Luce draw of a k-item slate from a candidate pool, with its propensities.

``propensity`` of the item shown at position k is the Plackett-Luce probability of picking it at step k GIVEN
the pool, the logger's scores and the items already placed at positions 0..k-1::

    propensity_k = exp(s_k / T) / sum over pool items not yet placed of exp(s / T)

So position 0's propensities over the whole (de-duplicated) pool sum to 1, and the product over a slate's
positions is the probability of that ordered slate given the pool. It is conditional on the candidate pool
(which is drawn by popularity before ranking) and on the logger's noisy scores; it is not the marginal
probability of the item over all pools.
"""

from __future__ import annotations

import numpy as np


def plackett_luce_slate(
    scores: np.ndarray, k: int, gumbel: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw an ordered slate of ``k`` pool positions per row by Gumbel-top-k.

    scores [n, C]: logger scores already divided by the temperature, ``-inf`` for positions that are not
    candidates (duplicates); gumbel [n, C]: standard Gumbel noise. Returns picks [n, k] (pool positions),
    propensity [n, k] (see the module docstring) and valid [n, k] (False where the pool ran out of
    candidates; those slots carry propensity 0).
    """
    n, c = scores.shape
    if not 1 <= k <= c:
        raise ValueError(f"slate size k must be in [1, {c}] (the pool size), got {k}")
    if gumbel.shape != scores.shape:
        raise ValueError(f"gumbel must have the shape of scores {scores.shape}, got {gumbel.shape}")
    keys = scores + gumbel
    row = (np.arange(n, dtype=np.int64) * c)[:, None]  # flat indexing: cheaper than take_along_axis
    top = np.argpartition(-keys, k - 1, axis=1)[:, :k] if k < c else np.broadcast_to(np.arange(c), (n, c))
    order = np.argsort(-keys.ravel()[top + row], axis=1, kind="stable")
    picks = top.ravel()[order + (np.arange(n, dtype=np.int64) * k)[:, None]]
    finite = np.isfinite(scores)
    top_score = np.max(scores, axis=1, keepdims=True)  # -inf only for a row without candidates
    top_score[~np.isfinite(top_score)] = 0.0
    weights = np.exp(scores - top_score)  # exp(-inf) = 0 for non-candidates
    total = weights.sum(axis=1, keepdims=True)
    w_pick = weights.ravel()[picks + row]
    before = np.cumsum(w_pick, axis=1) - w_pick
    remaining = np.maximum(total - before, w_pick)  # guards the subtraction's rounding
    valid = finite.ravel()[picks + row]
    with np.errstate(invalid="ignore", divide="ignore"):
        propensity = np.where(valid, w_pick / remaining, 0.0)
    return picks, propensity, valid
