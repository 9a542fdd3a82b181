"""Sampled softmax: the value by hand, the masking of a negative equal to the positive, and the two
computation paths (all logits then gather / gather embeddings) agreeing in value and gradient."""

from __future__ import annotations

import math

import pytest
import torch

from models.losses import SampledSoftmaxConfig, sample_uniform_negatives, sampled_softmax_loss


def test_value_by_hand_and_positive_equal_negative_masked() -> None:
    table = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    user = torch.tensor([[1.0, 0.0]])
    cfg = SampledSoftmaxConfig(num_negatives=3, temperature=0.5)
    # negatives 2, 3 and 1 (= the positive, masked): logits 1/0.5 = 2 (pos), 0, -2
    loss = sampled_softmax_loss(user, torch.tensor([1]), torch.tensor([[2, 3, 1]]), table, cfg)
    expected = -math.log(math.exp(2) / (math.exp(2) + math.exp(0) + math.exp(-2)))
    assert float(loss) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("threshold", [0, 1000])
def test_both_paths_agree(threshold: int) -> None:
    torch.manual_seed(0)
    table = torch.nn.functional.normalize(torch.randn(30, 6), dim=-1).requires_grad_()
    user = torch.nn.functional.normalize(torch.randn(7, 6), dim=-1).requires_grad_()
    pos = torch.randint(1, 30, (7,))
    neg = torch.randint(1, 30, (7, 5))
    neg[0, 0] = pos[0]
    ref = sampled_softmax_loss(user, pos, neg, table, SampledSoftmaxConfig(full_logits_max_items=10**6))
    got = sampled_softmax_loss(user, pos, neg, table, SampledSoftmaxConfig(full_logits_max_items=threshold))
    g_ref = torch.autograd.grad(ref, (user, table))
    g_got = torch.autograd.grad(got, (user, table))
    torch.testing.assert_close(got, ref)
    for a, b in zip(g_got, g_ref, strict=True):
        torch.testing.assert_close(a, b)


def test_negatives_are_items_never_padding() -> None:
    g = torch.Generator().manual_seed(0)
    neg = sample_uniform_negatives(3, (1000, 4), generator=g)
    assert neg.min() == 1 and neg.max() == 3


def test_shape_mismatch_is_reported() -> None:
    with pytest.raises(ValueError, match="shapes"):
        sampled_softmax_loss(
            torch.zeros(2, 3),
            torch.zeros(3, dtype=torch.long),
            torch.zeros(2, 4, dtype=torch.long),
            torch.zeros(5, 3),
            SampledSoftmaxConfig(),
        )
