from __future__ import annotations

import numpy as np
import pytest

from recsys.synthetic.policy import plackett_luce_slate


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def test_propensities_are_the_plackett_luce_step_probabilities() -> None:
    g = np.random.default_rng(0)
    scores = g.normal(size=(50, 12))
    picks, prop, valid = plackett_luce_slate(scores, 5, g.gumbel(size=scores.shape))
    assert valid.all()
    for row in range(50):
        first = _softmax(scores[row])
        assert first.sum() == pytest.approx(1.0)  # position 0: a distribution over the whole pool
        assert prop[row, 0] == pytest.approx(first[picks[row, 0]])
        remaining = np.ones(12, dtype=bool)
        for pos in range(5):
            p = _softmax(np.where(remaining, scores[row], -np.inf))
            assert prop[row, pos] == pytest.approx(p[picks[row, pos]])
            remaining[picks[row, pos]] = False
    assert len({tuple(r) for r in np.sort(picks, axis=1)}) > 1
    assert all(len(set(r)) == 5 for r in picks)  # an item is placed once


def test_draws_follow_the_propensities() -> None:
    """Monte Carlo: the frequency of each item at position 0 matches its first-position propensity."""
    g = np.random.default_rng(1)
    scores = np.tile(np.array([2.0, 1.0, 0.0, -1.0, 0.5]), (40_000, 1))
    picks, prop, _ = plackett_luce_slate(scores, 2, g.gumbel(size=scores.shape))
    freq = np.bincount(picks[:, 0], minlength=5) / 40_000
    np.testing.assert_allclose(freq, _softmax(scores[0]), atol=0.01)
    # Position 1 given item 0 first: the softmax over the other four.
    given = picks[:, 0] == 0
    freq1 = np.bincount(picks[given, 1], minlength=5)[1:] / given.sum()
    np.testing.assert_allclose(freq1, _softmax(scores[0, 1:]), atol=0.015)
    np.testing.assert_allclose(prop[given, 1], _softmax(scores[0, 1:])[picks[given, 1] - 1])


def test_excluded_candidates_and_short_pools() -> None:
    scores = np.array([[0.0, -np.inf, 1.0, -np.inf]])
    picks, prop, valid = plackett_luce_slate(scores, 3, np.zeros((1, 4)))
    assert set(picks[0, :2]) == {0, 2}
    assert valid[0].tolist() == [True, True, False]  # the pool had only two candidates
    assert prop[0, 1] == pytest.approx(1.0)  # the last remaining candidate is certain
    assert prop[0, 2] == 0.0
    with pytest.raises(ValueError, match="slate size"):
        plackett_luce_slate(scores, 5, np.zeros((1, 4)))
