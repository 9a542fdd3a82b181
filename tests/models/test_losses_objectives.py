"""Retrieval objectives: full softmax (chunked == fused in value and gradients, hand-computed value),
sampled softmax with in-batch / mixed negatives and logQ, learned temperature, and gBCE against the
gSASRec formula computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from recsys.models.losses import (
    FullSoftmaxConfig,
    GBCEConfig,
    Negatives,
    RetrievalObjective,
    SampledSoftmaxConfig,
    draw_negatives,
    full_softmax_loss,
    gbce_beta,
    gbce_loss,
    sampled_softmax_loss,
)

TABLE = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # row 0 padding, items 1..3


def test_full_softmax_value_by_hand_excludes_padding() -> None:
    user = torch.tensor([[2.0, 1.0]])
    # logits over items 1..3 at temperature 0.5: 4, 2, -4 (padding row 0 is not a class)
    loss = full_softmax_loss(user, torch.tensor([2]), TABLE, FullSoftmaxConfig(temperature=0.5))
    expected = -math.log(math.exp(2) / (math.exp(4) + math.exp(2) + math.exp(-4)))
    assert float(loss) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunked_full_softmax_equals_fused_in_value_and_gradients(chunk: int) -> None:
    torch.manual_seed(0)
    table = torch.randn(21, 5, requires_grad=True)
    user = torch.randn(9, 5, requires_grad=True)
    scale = torch.tensor(1.7, requires_grad=True)
    pos = torch.randint(1, 21, (9,))
    pos[1] = pos[0]  # a repeated positive: its table gradient accumulates
    fused = full_softmax_loss(user, pos, table, FullSoftmaxConfig(chunk_size=10**6), scale=scale)
    chunked = full_softmax_loss(user, pos, table, FullSoftmaxConfig(chunk_size=chunk), scale=scale)
    torch.testing.assert_close(chunked, fused)
    g_fused = torch.autograd.grad(fused, (user, table, scale))
    g_chunked = torch.autograd.grad(chunked, (user, table, scale))
    for a, b in zip(g_chunked, g_fused, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert float(g_chunked[1][0].abs().sum()) == 0.0  # padding row gets no gradient


def test_full_softmax_rejects_padding_positive() -> None:
    with pytest.raises(ValueError, match="positives"):
        full_softmax_loss(torch.ones(1, 2), torch.tensor([0]), TABLE, FullSoftmaxConfig())


def test_sampled_softmax_shared_negatives_and_logq_by_hand() -> None:
    user = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positives = torch.tensor([1, 2])
    log_q = torch.log(torch.tensor([1.0, 0.5, 0.25, 0.25]))
    negs = Negatives(per_position=None, shared=torch.tensor([2, 3]), log_q=log_q)
    cfg = SampledSoftmaxConfig(temperature=1.0, negatives="in_batch", num_negatives=2)
    loss = sampled_softmax_loss(user, positives, negs, TABLE, cfg)
    # position 0: pos item 1 logit 1 - log .5; negs 2 (0 - log .25), 3 (-1 - log .25)
    l0 = [1 - math.log(0.5), 0 - math.log(0.25), -1 - math.log(0.25)]
    # position 1: pos item 2 logit 1 - log .25; neg 2 equals the positive (masked); neg 3 0 - log .25
    l1 = [1 - math.log(0.25), 0 - math.log(0.25)]

    def ce(logits: list[float]) -> float:
        return -(logits[0] - math.log(sum(math.exp(x) for x in logits)))

    assert float(loss) == pytest.approx((ce(l0) + ce(l1)) / 2, rel=1e-6)


def test_draw_negatives_mixed_and_logq_proposal() -> None:
    positives = torch.tensor([1, 1, 1, 2])
    g = torch.Generator().manual_seed(0)
    cfg = SampledSoftmaxConfig(
        num_negatives=8, negatives="mixed", in_batch_fraction=0.25, logq_correction=True
    )
    drawn = draw_negatives(cfg, positives, num_items=10, generator=g)
    assert drawn.per_position is not None and drawn.per_position.shape == (4, 6)
    assert drawn.shared is not None and drawn.shared.shape == (2,)
    assert set(drawn.shared.tolist()) <= {1, 2}
    assert drawn.log_q is not None
    # q_j = 0.25 * c_j / 4 + 0.75 / 10
    assert float(drawn.log_q[1].exp()) == pytest.approx(0.25 * 3 / 4 + 0.075, rel=1e-6)
    assert float(drawn.log_q[5].exp()) == pytest.approx(0.075, rel=1e-6)
    in_batch = draw_negatives(SampledSoftmaxConfig(num_negatives=5, negatives="in_batch"), positives, 10)
    assert in_batch.per_position is None and in_batch.log_q is None


def test_learned_scale_replaces_the_temperature_and_gets_a_gradient() -> None:
    user = torch.tensor([[1.0, 0.0]])
    scale = torch.tensor(2.0, requires_grad=True)
    cfg = SampledSoftmaxConfig(num_negatives=2, temperature=0.5, learn_temperature=True)
    loss = sampled_softmax_loss(user, torch.tensor([1]), torch.tensor([[2, 3]]), TABLE, cfg, scale=scale)
    fixed = sampled_softmax_loss(user, torch.tensor([1]), torch.tensor([[2, 3]]), TABLE, cfg)
    torch.testing.assert_close(loss, fixed)  # scale 2 == 1 / 0.5
    loss.backward()
    assert scale.grad is not None and float(scale.grad) < 0  # sharper scores lower the loss here


def test_gbce_beta_formula_and_endpoints() -> None:
    alpha = 4 / 99
    assert gbce_beta(4, 100, 0.5) == pytest.approx(alpha * (0.5 * (1 - 1 / alpha) + 1 / alpha))
    assert gbce_beta(4, 100, 0.0) == pytest.approx(1.0)  # t = 0: plain BCE
    assert gbce_beta(4, 100, 1.0) == pytest.approx(alpha)


def test_gbce_value_by_hand() -> None:
    user = torch.tensor([[2.0, 0.0]])
    cfg = GBCEConfig(num_negatives=2, calibration=0.5)
    loss = gbce_loss(user, torch.tensor([1]), torch.tensor([[2, 1]]), TABLE, cfg)
    beta = gbce_beta(2, 3, 0.5)

    def softplus(x: float) -> float:
        return math.log1p(math.exp(x))

    # s+ = 2; negatives: item 2 (s = 0) and item 1 (= the positive, contributes nothing); mean over 1 + K
    expected = (beta * softplus(-2.0) + softplus(0.0)) / 3
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_objective_union_parses_by_kind_and_names_bad_fields() -> None:
    adapter = TypeAdapter(RetrievalObjective)
    assert isinstance(adapter.validate_python({"kind": "gbce", "calibration": 0.9}), GBCEConfig)
    assert isinstance(adapter.validate_python({"kind": "full_softmax"}), FullSoftmaxConfig)
    with pytest.raises(ValidationError, match="calibration"):
        adapter.validate_python({"kind": "gbce", "calibration": 2.0})
    with pytest.raises(ValidationError, match="negatives"):
        adapter.validate_python({"kind": "sampled_softmax", "negatives": "popular"})
