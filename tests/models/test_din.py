"""DIN target-attention baseline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recsys.models.batch import FeatureSpec, demo_spec
from recsys.models.din import DIN, DINConfig, TargetAttention
from tests.models import ranking_checks as checks
from tests.models.ranking_checks import single_thread  # noqa: F401  (autouse fixture)

CONFIGS = {
    "paper": checks.TINY_SIZES | {"attention_hidden": (16,), "deep_hidden": (32,)},
    "softmax_no_gap": {
        "embedding_dim": 8,
        "attention_hidden": (16,),
        "deep_hidden": (32,),
        "attention_norm": "softmax",
        "use_time_gap": False,
    },
}


def _factory(name: str) -> checks.ModelFactory:
    return checks.config_factory(DIN, DINConfig, **CONFIGS[name])


@pytest.mark.parametrize("name", CONFIGS)
def test_shapes_multitask_and_dedup(name: str) -> None:
    checks.check_shapes(_factory(name), demo_spec(n_sequences=2, tasks=("click", "like")))


@pytest.mark.parametrize("name", CONFIGS)
def test_learns(name: str) -> None:
    checks.check_learns(_factory(name), demo_spec())


def test_round_trip(tmp_path: Path) -> None:
    checks.check_round_trip(_factory("paper"), demo_spec(), tmp_path)


@pytest.mark.parametrize("name", CONFIGS)
def test_padding_and_empty_history(name: str) -> None:
    checks.check_padding_invariance(_factory(name), demo_spec())
    checks.check_empty_history(_factory(name), demo_spec())


def test_softmax_weights_cover_only_valid_steps() -> None:
    torch.manual_seed(0)
    unit = TargetAttention(4, (8,), "prelu", "softmax")
    steps = torch.randn(2, 5, 4)
    valid = torch.tensor([[False, False, True, True, True], [False] * 5])
    candidate = torch.randn(2, 4)
    interest = unit(steps, candidate, valid)
    # padding steps get no weight: changing them changes nothing
    steps2 = steps.clone()
    steps2[0, :2] = 100.0
    torch.testing.assert_close(unit(steps2, candidate, valid), interest)
    torch.testing.assert_close(interest[1], torch.zeros(4))  # an empty history -> zero interest, not NaN


def test_interest_depends_on_the_candidate() -> None:
    torch.manual_seed(0)
    unit = TargetAttention(4, (8,), "prelu", "none")
    steps, valid = torch.randn(1, 6, 4), torch.ones(1, 6, dtype=torch.bool)
    assert not torch.allclose(unit(steps, torch.randn(1, 4), valid), unit(steps, torch.randn(1, 4), valid))


def test_needs_a_sequence() -> None:
    with pytest.raises(ValueError, match="sequence"):
        _factory("paper")(FeatureSpec(n_items=5))
