"""RankMixer: tokenisation, post-norm blocks, per-token FFN, sparse MoE."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from recsys.models.batch import demo_spec, synthetic_batch
from recsys.models.layers import token_mixing
from recsys.models.rankmixer import MoEConfig, RankMixer, RankMixerConfig, RankMixerStack
from tests.models import ranking_checks as checks
from tests.models.ranking_checks import single_thread  # noqa: F401  (autouse fixture)

SMALL = checks.TINY_SIZES | {"n_tokens": 4, "token_dim": 16, "n_blocks": 2, "ffn_expansion": 2}
CONFIGS = {
    "per_token": SMALL,
    "shared_sum": SMALL | {"projection": "shared", "sequence_pool": "sum"},
    "moe": SMALL | {"moe": MoEConfig(n_experts=3, expansion=1, l1_coef=1e-2)},
}


def _factory(name: str) -> checks.ModelFactory:
    return checks.config_factory(RankMixer, RankMixerConfig, **CONFIGS[name])


@pytest.mark.parametrize("name", CONFIGS)
def test_shapes_multitask_and_dedup(name: str) -> None:
    checks.check_shapes(_factory(name), demo_spec(tasks=("click", "like")))


@pytest.mark.parametrize("name", CONFIGS)
def test_learns(name: str) -> None:
    checks.check_learns(_factory(name), demo_spec())


def test_round_trip(tmp_path: Path) -> None:
    checks.check_round_trip(_factory("moe"), demo_spec(), tmp_path)


def test_padding_and_empty_history() -> None:
    checks.check_padding_invariance(_factory("per_token"), demo_spec())
    checks.check_empty_history(_factory("per_token"), demo_spec())


def test_block_is_post_norm_mixing_then_per_token_ffn() -> None:
    torch.manual_seed(0)
    stack = RankMixerStack(n_tokens=4, dim=8, n_blocks=1, expansion=2, dropout=0.0, moe=None)
    x = torch.randn(3, 4, 8)
    s = stack.mix_norms[0](token_mixing(x) + x)
    expected = stack.ffn_norms[0](stack.ffns[0](s) + s)
    out, penalty = stack(x)
    torch.testing.assert_close(out, expected)
    assert float(penalty) == 0.0


def test_moe_penalty_reaches_the_loss() -> None:
    torch.manual_seed(0)
    spec = demo_spec()
    model = _factory("moe")(spec).train()
    out = model(synthetic_batch(spec, 8))
    assert out.aux_loss.item() > 0
    out.aux_loss.backward()
    assert model.mixer.ffns[0].router.weight.grad.abs().sum() > 0
    # dense training and sparse inference score alike
    batch = synthetic_batch(spec, 8, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(batch).logits["click"], model.train()(batch).logits["click"])


def test_token_width_must_divide() -> None:
    with pytest.raises(ValidationError, match="multiple of n_tokens"):
        RankMixerConfig(features=demo_spec(), n_tokens=8, token_dim=60)


def test_tokens_shape() -> None:
    spec = demo_spec()
    model = _factory("per_token")(spec)
    assert model.tokens(synthetic_batch(spec, 5)).shape == (5, 4, 16)
