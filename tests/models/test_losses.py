"""Sampled softmax: the value by hand, the masking of a negative equal to the positive, and the two
computation paths (all logits then gather / gather embeddings) agreeing in value and gradient."""

from __future__ import annotations

import math

import pytest
import torch

from recsys.models.losses import SampledSoftmaxConfig, sample_uniform_negatives, sampled_softmax_loss


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


# --- distillation losses (spec: Distillation) -------------------------------------------------------------
def _bce(p: float, q: float) -> float:
    """BCE(target p, prediction q) by hand."""
    import math

    return -(p * math.log(q) + (1 - p) * math.log(1 - q))


def test_distillation_loss_equals_formula_on_fixed_inputs() -> None:
    import math

    from recsys.models.losses import distillation_loss

    z_s = torch.tensor([0.5, -1.0, 2.0])
    z_t = torch.tensor([1.0, -0.5, 0.0])
    y = torch.tensor([1.0, 0.0, 1.0])
    tau, lam = 2.0, 0.7

    def sig(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    hard = sum(_bce(float(y[i]), sig(float(z_s[i]))) for i in range(3)) / 3
    soft = sum(_bce(sig(float(z_t[i]) / tau), sig(float(z_s[i]) / tau)) for i in range(3)) / 3
    expected = hard + lam * tau**2 * soft
    got = distillation_loss(z_s, z_t, y, temperature=tau, weight=lam)
    assert float(got) == pytest.approx(expected, rel=1e-6)

    # Unlabelled candidates: only the soft term sees them.
    labelled = torch.tensor([True, False, True])
    hard_l = (_bce(1.0, sig(0.5)) + _bce(1.0, sig(2.0))) / 2
    got_l = distillation_loss(z_s, z_t, y, temperature=tau, weight=lam, labelled=labelled)
    assert float(got_l) == pytest.approx(hard_l + lam * tau**2 * soft, rel=1e-6)


def test_distillation_loss_gradient_does_not_reach_teacher_and_rejects_bad_input() -> None:
    from recsys.models.losses import distillation_loss

    z_s = torch.zeros(4, requires_grad=True)
    z_t = torch.ones(4, requires_grad=True)
    distillation_loss(z_s, z_t, torch.ones(4)).backward()
    assert z_t.grad is None and z_s.grad is not None
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(z_s, z_t, torch.ones(4), temperature=0.0)
    with pytest.raises(ValueError, match="share a shape"):
        distillation_loss(z_s, z_t[:3], torch.ones(4))


def test_self_distillation_loss_equals_formula_with_forward_kl() -> None:
    import math

    from recsys.models.losses import self_distillation_loss

    z, z_priv, z_teacher = torch.tensor([0.3, -2.0]), torch.tensor([1.0, -1.0]), torch.tensor([0.8, -0.2])
    y = torch.tensor([1.0, 0.0])
    beta, lam = 0.5, 0.3

    def sig(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    def kl(p: float, q: float) -> float:
        return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))

    expected = 0.0
    for i in range(2):
        expected += _bce(float(y[i]), sig(float(z[i])))
        expected += beta * _bce(float(y[i]), sig(float(z_priv[i])))
        expected += lam * kl(sig(float(z_teacher[i])), sig(float(z[i])))
    expected /= 2
    got = self_distillation_loss(z, z_priv, z_teacher, y, beta=beta, kl_weight=lam)
    assert float(got) == pytest.approx(expected, rel=1e-6)
