"""Checks every ranking model must pass (used by tests/models/test_<model>.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from recsys.models.batch import FeatureSpec, RankingBatch, SequenceBatch, synthetic_batch

ModelFactory = Callable[[FeatureSpec], nn.Module]

#: Where every model's small test configs start: 8-wide embeddings and one 16-unit layer in each task head.
TINY_SIZES: dict[str, Any] = {"embedding_dim": 8, "heads": {"hidden": (16,)}}


def config_factory(
    model: Callable[[Any], nn.Module], config: Callable[..., Any], **fields: Any
) -> ModelFactory:
    """The factory the checks take: ``spec -> model(config(features=spec, **fields))``."""
    return lambda spec: model(config(features=spec, **fields))


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine run ~30x faster on one thread than on two oversubscribed ones.
    Import this fixture into a test module to apply it there (restored afterwards)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def bce(model: nn.Module, batch: RankingBatch) -> torch.Tensor:
    out = model(batch)
    loss = sum(F.binary_cross_entropy_with_logits(out.logits[t], batch.labels[t]) for t in batch.labels)
    return loss + out.aux_loss


def check_shapes(factory: ModelFactory, spec: FeatureSpec, batch_size: int = 8) -> None:
    torch.manual_seed(0)
    model = factory(spec).eval()
    batch = synthetic_batch(spec, batch_size, seed=1)
    out = model(batch)
    assert set(out.logits) == set(spec.tasks)
    for logit in out.logits.values():
        assert logit.shape == (batch_size,)
        assert torch.isfinite(logit).all()
    assert out.aux_loss.shape == ()
    # the deduplicated form (unique ids + inverse) gives the same scores
    dedup = model(batch.deduplicated())
    for task in spec.tasks:
        torch.testing.assert_close(dedup.logits[task], out.logits[task])


def check_learns(factory: ModelFactory, spec: FeatureSpec, steps: int = 30, lr: float = 3e-3) -> None:
    """A few Adam steps on one small learnable batch reduce the BCE."""
    torch.manual_seed(0)
    model = factory(spec).train()
    batch = synthetic_batch(spec, 64, seed=2)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    with torch.no_grad():
        before = float(bce(model, batch))
    for _ in range(steps):
        optimiser.zero_grad()
        bce(model, batch).backward()
        optimiser.step()
    with torch.no_grad():
        after = float(bce(model, batch))
    assert after < 0.8 * before, f"BCE went {before:.4f} -> {after:.4f}"


def check_round_trip(factory: ModelFactory, spec: FeatureSpec, tmp_path: Path) -> None:
    """state_dict -> safetensors -> a freshly initialised model gives identical outputs."""
    torch.manual_seed(0)
    model = factory(spec).eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    torch.manual_seed(123)
    other = factory(spec).eval()
    batch = synthetic_batch(spec, 8, seed=3)
    assert not torch.equal(other(batch).logits[spec.tasks[0]], model(batch).logits[spec.tasks[0]])
    other.load_state_dict(load_file(str(path)))
    for task in spec.tasks:
        assert torch.equal(other(batch).logits[task], model(batch).logits[task])


def _left_pad(seq: SequenceBatch, extra: int) -> SequenceBatch:
    pad = lambda t, value=0: F.pad(t, (extra, 0), value=value)  # noqa: E731
    assert seq.item_ids is not None
    return SequenceBatch(
        lengths=seq.lengths,
        time_gap=pad(seq.time_gap),
        side={k: pad(v) for k, v in seq.side.items()},
        item_ids=pad(seq.item_ids),
    )


def check_padding_invariance(factory: ModelFactory, spec: FeatureSpec) -> None:
    """Extra left padding (a longer window with the same valid steps) does not change the scores."""
    torch.manual_seed(0)
    model = factory(spec).eval()
    short_spec = spec.model_copy(
        update={"sequences": tuple(s.model_copy(update={"max_len": 8}) for s in spec.sequences)}
    )
    batch = synthetic_batch(short_spec, 8, seed=4)
    padded = replace(batch, sequences={k: _left_pad(v, 4) for k, v in batch.sequences.items()})
    padded.validate(spec)
    for task in spec.tasks:
        torch.testing.assert_close(model(padded).logits[task], model(batch).logits[task])


def check_empty_history(factory: ModelFactory, spec: FeatureSpec) -> None:
    torch.manual_seed(0)
    model = factory(spec).eval()
    batch = synthetic_batch(spec, 4, seed=5)
    empty = {
        k: SequenceBatch(
            lengths=torch.zeros_like(v.lengths),
            time_gap=torch.zeros_like(v.time_gap),
            side={n: torch.zeros_like(s) for n, s in v.side.items()},
            item_ids=torch.zeros_like(v.item_ids),
        )
        for k, v in batch.sequences.items()
    }
    out = model(replace(batch, sequences=empty))
    for logit in out.logits.values():
        assert torch.isfinite(logit).all()
