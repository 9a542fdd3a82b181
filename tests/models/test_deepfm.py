"""DeepFM / DLRM-style baseline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recsys.models.batch import demo_spec, synthetic_batch
from recsys.models.deepfm import DeepFM, DeepFMConfig
from tests.models import ranking_checks as checks
from tests.models.ranking_checks import single_thread  # noqa: F401  (autouse fixture)

CONFIGS = {
    "fm_mean": checks.TINY_SIZES | {"deep_hidden": (32,)},
    "dot_sum": {"embedding_dim": 8, "deep_hidden": (32,), "interaction": "dot", "sequence_pool": "sum"},
}


def _factory(name: str) -> checks.ModelFactory:
    return checks.config_factory(DeepFM, DeepFMConfig, **CONFIGS[name])


@pytest.mark.parametrize("name", CONFIGS)
def test_shapes_multitask_and_dedup(name: str) -> None:
    checks.check_shapes(_factory(name), demo_spec(tasks=("click", "like")))


@pytest.mark.parametrize("name", CONFIGS)
def test_learns(name: str) -> None:
    checks.check_learns(_factory(name), demo_spec())


def test_round_trip(tmp_path: Path) -> None:
    checks.check_round_trip(_factory("fm_mean"), demo_spec(tasks=("click", "like")), tmp_path)


@pytest.mark.parametrize("name", CONFIGS)
def test_padding_and_empty_history(name: str) -> None:
    checks.check_padding_invariance(_factory(name), demo_spec())
    checks.check_empty_history(_factory(name), demo_spec())


def test_fm_term_is_the_sum_of_pairwise_dot_products() -> None:
    fields = torch.randn(3, 5, 4)
    pairwise = sum((fields[:, i] * fields[:, j]).sum(-1) for i in range(5) for j in range(i + 1, 5))
    torch.testing.assert_close(DeepFM._fm(fields), pairwise)


def test_no_sequence_spec_works() -> None:
    spec = demo_spec().model_copy(update={"sequences": ()})
    model = _factory("fm_mean")(spec)
    assert model(synthetic_batch(spec, 4)).logits["click"].shape == (4,)
