"""Popularity baseline: scores are the training counts, the padding item is never a candidate."""

from __future__ import annotations

import pytest
import torch

from recsys.models.popularity import Popularity, PopularityConfig


def test_scores_are_the_counts_for_every_user() -> None:
    model = Popularity(PopularityConfig(num_items=3))
    model.load_counts(torch.tensor([0.0, 5.0, 1.0, 3.0]))
    scores = model(2)
    assert scores.shape == (2, 4)
    assert scores[0, 0] == float("-inf")
    assert scores[1, 1:].tolist() == [5.0, 1.0, 3.0]


def test_counts_are_saved_with_the_state_dict() -> None:
    model = Popularity(PopularityConfig(num_items=2))
    model.load_counts(torch.tensor([0.0, 2.0, 7.0]))
    other = Popularity(PopularityConfig(num_items=2))
    other.load_state_dict(model.state_dict())
    assert other(1)[0, 2] == 7.0


@pytest.mark.parametrize("counts", [torch.zeros(3), torch.tensor([0.0, -1.0, 1.0, 0.0])])
def test_bad_counts_are_rejected(counts: torch.Tensor) -> None:
    model = Popularity(PopularityConfig(num_items=3))
    with pytest.raises(ValueError, match="counts"):
        model.load_counts(counts)
