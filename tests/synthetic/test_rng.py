from __future__ import annotations

import numpy as np
import pytest

from recsys.synthetic import rng


def test_uniforms_depend_only_on_their_coordinates() -> None:
    keys = rng.user_keys(3, np.arange(1_000))
    u = rng.uniform(keys, 5, 2, 7)
    assert u.shape == (1_000, 7) and u.min() > 0.0 and u.max() < 1.0
    # The same user gets the same numbers in any batch; fewer slots are a prefix of more slots.
    np.testing.assert_array_equal(rng.uniform(rng.user_keys(3, np.array([999, 4])), 5, 2, 7), u[[999, 4]])
    np.testing.assert_array_equal(rng.uniform(keys, 5, 2, 3), u[:, :3])
    rows, slots = np.repeat(np.arange(1_000), 7), np.tile(np.arange(7), 1_000)
    np.testing.assert_array_equal(rng.uniform_at(keys[rows], 5, 2, slots), u.ravel())
    # Other coordinates give other numbers.
    assert not np.array_equal(rng.uniform(keys, 6, 2, 7), u)
    assert not np.array_equal(rng.uniform(keys, 5, 3, 7), u)
    assert not np.array_equal(rng.uniform(rng.user_keys(4, np.arange(1_000)), 5, 2, 7), u)


def test_uniforms_look_uniform_and_independent() -> None:
    u = rng.uniform(rng.user_keys(0, np.arange(20_000)), 0, 0, 50)
    hist = np.bincount((u.ravel() * 20).astype(int), minlength=20) / u.size
    np.testing.assert_allclose(hist, 0.05, atol=0.002)
    corr = np.corrcoef(u[:, :10].T)
    assert np.abs(corr - np.eye(10)).max() < 0.03
    z = rng.normal(rng.user_keys(0, np.arange(20_000)), 0, 1, 5)
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1.0) < 0.02


def test_bad_coordinates_raise() -> None:
    keys = rng.user_keys(0, np.arange(3))
    with pytest.raises(ValueError, match="stream"):
        rng.uniform(keys, 0, rng.N_STREAMS, 2)
    with pytest.raises(ValueError, match="n_slots"):
        rng.uniform(keys, 0, 0, rng.MAX_SLOTS + 1)
    with pytest.raises(ValueError, match="slots"):
        rng.uniform_at(keys, 0, 0, np.array([0, 1, rng.MAX_SLOTS]))
