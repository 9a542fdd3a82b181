"""The forgetting matrix of a continual-learning run and its summary figures.

A run learns periods 1..k one at a time. ``A[i, j]`` (1-based in the text, 0-based in the array) is the AUC on
period j's evaluation examples after learning step i (period i was the newest); only j <= i is defined (the
cells above the diagonal are NaN: a period that has not been learned yet is not "forgotten").

Summary figures (Chaudhry et al. 2018, Lopez-Paz & Ranzato 2017, with AUC as the accuracy):

- new-period AUC = mean over i of A[i, i] (how well each period is learned when it is the newest);
- average final AUC = mean over j of A[k, j] (the model at the end, on every period);
- average forgetting = mean over j < k of (max_{j <= i < k} A[i, j] - A[k, j]): the best AUC period j ever
  had before the last step minus its final AUC (>= 0 up to noise; lower is better);
- backward transfer BWT = mean over j < k of (A[k, j] - A[j, j]) (negative = forgetting).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ForgettingSummary:
    n_periods: int
    new_period_auc: float
    average_final_auc: float
    average_forgetting: float  # NaN with one period
    backward_transfer: float  # NaN with one period

    def as_dict(self) -> dict[str, float]:
        return {
            "new_period_auc": self.new_period_auc,
            "average_final_auc": self.average_final_auc,
            "average_forgetting": self.average_forgetting,
            "backward_transfer": self.backward_transfer,
        }


def forgetting_matrix(
    cells: Mapping[tuple[int, int], float] | Iterable[tuple[int, int, float]], n_periods: int | None = None
) -> np.ndarray:
    """[k, k] matrix from (step, eval_period) -> AUC, both 1-based; NaN above the diagonal.

    Every cell with eval_period <= step must be given exactly once; ``n_periods`` defaults to the largest
    step. A cell above the diagonal, a missing or duplicated cell or a non-finite AUC is an error.
    """
    items = list(cells.items()) if isinstance(cells, Mapping) else [((s, p), a) for s, p, a in cells]
    if not items:
        raise ValueError("forgetting_matrix: no (step, eval_period, auc) cells given")
    k = n_periods if n_periods is not None else max(int(s) for (s, _), _ in items)
    if k < 1:
        raise ValueError(f"n_periods must be >= 1, got {k}")
    out = np.full((k, k), np.nan)
    seen: set[tuple[int, int]] = set()
    for (step, period), value in items:
        step, period = int(step), int(period)
        if not 1 <= step <= k:
            raise ValueError(f"step {step} is outside 1..{k}")
        if not 1 <= period <= step:
            raise ValueError(
                f"eval_period {period} of step {step} must be in 1..{step} (learned periods only)"
            )
        if (step, period) in seen:
            raise ValueError(f"cell (step {step}, eval_period {period}) is given twice")
        if not math.isfinite(float(value)):
            raise ValueError(f"cell (step {step}, eval_period {period}) has a non-finite AUC {value}")
        seen.add((step, period))
        out[step - 1, period - 1] = float(value)
    missing = [(i + 1, j + 1) for i in range(k) for j in range(i + 1) if (i + 1, j + 1) not in seen]
    if missing:
        raise ValueError(f"forgetting_matrix: missing cells (step, eval_period) {missing[:6]}")
    return out


def summarize_forgetting(matrix: np.ndarray) -> ForgettingSummary:
    """The summary figures of the module docstring for a complete lower-triangular matrix."""
    a = np.asarray(matrix, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"the forgetting matrix must be square and non-empty, got shape {a.shape}")
    k = a.shape[0]
    if not np.isfinite(a[np.tril_indices(k)]).all():
        raise ValueError("the forgetting matrix has missing cells on or below the diagonal")
    final = a[k - 1]
    if k == 1:
        forgetting = bwt = float("nan")
    else:
        best_before = np.array([a[j : k - 1, j].max() for j in range(k - 1)])
        forgetting = float(np.mean(best_before - final[: k - 1]))
        bwt = float(np.mean(final[: k - 1] - np.diag(a)[: k - 1]))
    return ForgettingSummary(
        n_periods=k,
        new_period_auc=float(np.mean(np.diag(a))),
        average_final_auc=float(np.mean(final)),
        average_forgetting=forgetting,
        backward_transfer=bwt,
    )


def format_matrix(matrix: np.ndarray, digits: int = 4) -> str:
    """Markdown: one row per step ("after step i"), one column per evaluated period; blank above the
    diagonal."""
    a = np.asarray(matrix, dtype=np.float64)
    k = a.shape[0]
    lines = [
        "| after step | " + " | ".join(f"period {j + 1}" for j in range(k)) + " |",
        "|---|" + "---|" * k,
    ]
    for i in range(k):
        cells = [f"{a[i, j]:.{digits}f}" if np.isfinite(a[i, j]) else "" for j in range(k)]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
