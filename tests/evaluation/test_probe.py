"""The linear probe reads what an embedding holds: separable labels near AUC 1, noise near 0.5."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.evaluation.probe import linear_probe


def test_probe_auc_on_separable_noisy_and_multiclass_labels() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 5))
    y = (x[:, 0] > 0).astype(int).tolist()
    assert linear_probe(x[:300], y[:300], x[300:], y[300:]).auc > 0.97
    noise = rng.integers(0, 2, size=400).tolist()
    assert abs(linear_probe(x[:300], noise[:300], x[300:], noise[300:]).auc - 0.5) < 0.1
    classes = np.digitize(x[:, 1], [-0.5, 0.5]).astype(str).tolist()  # three classes from one direction
    result = linear_probe(x[:300], classes[:300], x[300:], classes[300:])
    assert result.classes == 3 and result.auc > 0.9
    with pytest.raises(ValueError, match="two classes"):
        linear_probe(x[:10], ["a"] * 10, x[10:20], ["a"] * 10)
