"""A fixed linear probe: how much of a user-level label a frozen embedding holds, as a test AUC.

Multinomial logistic regression on standardised embeddings (train statistics), L2 penalty ``l2`` on the
weights, fitted to convergence with L-BFGS in float64: the same probe for every embedding, so differences in
AUC come from the embeddings. Binary labels give the AUC of the positive class; more classes give the macro
average of one-vs-rest AUCs over the classes present in both train and test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from recsys.evaluation.ranking import auc


@dataclass(frozen=True)
class ProbeResult:
    auc: float
    classes: int
    train_size: int
    test_size: int


def _encode(labels: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
    classes = sorted({y for y in labels}, key=str)
    index = {c: k for k, c in enumerate(classes)}
    return np.array([index[y] for y in labels], dtype=np.int64), classes


def linear_probe(
    x_train: np.ndarray,
    y_train: Sequence[Any],
    x_test: np.ndarray,
    y_test: Sequence[Any],
    *,
    l2: float = 1e-3,
    max_iter: int = 200,
) -> ProbeResult:
    """Fit the probe on (x_train, y_train) and return its AUC on (x_test, y_test)."""
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise ValueError("each embedding matrix needs one label per row")
    codes, classes = _encode([*y_train, *y_test])
    if len(classes) < 2:
        raise ValueError(f"a probe needs at least two classes, got {classes}")
    y_tr, y_te = codes[: len(y_train)], codes[len(y_train) :]
    mean, std = x_train.mean(0), x_train.std(0) + 1e-8
    xtr = torch.from_numpy((x_train - mean) / std).double()
    xte = torch.from_numpy((x_test - mean) / std).double()
    target = torch.from_numpy(y_tr)
    k = len(classes)
    w = torch.zeros(xtr.shape[1], k, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xtr @ w + b, target) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        probs = torch.softmax(xte @ w + b, dim=1).numpy()
    present = [c for c in range(k) if (y_tr == c).any() and (y_te == c).any() and not (y_te == c).all()]
    if not present:
        raise ValueError("no class appears in both the train and the test labels with both outcomes in test")
    if k == 2:
        value = auc((y_te == 1).astype(np.int64), probs[:, 1])
    else:
        value = float(np.mean([auc((y_te == c).astype(np.int64), probs[:, c]) for c in present]))
    return ProbeResult(auc=value, classes=k, train_size=len(y_tr), test_size=len(y_te))
