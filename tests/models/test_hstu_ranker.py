"""The generative ranker (``models.hstu_ranker``): the cached two-pass computation equals one masked forward
over [history; targets], targets see only their own prefix, and the ranking-model interface."""

from __future__ import annotations

import pytest
import torch

from recsys.models.batch import FeatureSpec, SequenceSpec, SideField, SparseField, synthetic_batch
from recsys.models.hstu_ranker import (
    History,
    HSTURanker,
    HSTURankerConfig,
    Targets,
    rows_as_targets,
    time_buckets,
)
from recsys.models.registry import build_model

SPEC = FeatureSpec(
    n_items=30,
    sparse=(
        SparseField(name="user", cardinality=5, group="user"),
        SparseField(name="category", cardinality=6, group="item"),
        SparseField(name="hour", cardinality=25, group="context"),
    ),
    dense=("d0",),
    sequences=(
        SequenceSpec(
            name="history",
            max_len=8,
            side=(SideField(name="category", cardinality=6), SideField(name="action", cardinality=7)),
        ),
    ),
    tasks=("click", "like"),
)


def _model(mode: str = "interleave") -> HSTURanker:
    torch.manual_seed(0)
    model = build_model("hstu-ranker", features=SPEC, embedding_dim=16, dqk=4, dv=4, action_mode=mode)
    assert isinstance(model, HSTURanker)
    with torch.no_grad():
        model.position_embedding.weight.normal_(std=1.0)
        model.time_embedding.weight.normal_(std=1.0)
    return model.eval()


def _inputs(seed: int = 0) -> tuple[History, Targets]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([8, 3, 0])
    valid = torch.arange(8)[None, :] < lengths[:, None]
    history = History(
        items=torch.randint(1, 31, (3, 8), generator=g) * valid,
        side={
            "category": torch.randint(1, 6, (3, 8), generator=g) * valid,
            "action": torch.randint(1, 7, (3, 8), generator=g) * valid,
        },
        ts=torch.cumsum(torch.randint(1, 10**6, (3, 8), generator=g), dim=1) * valid,
        lengths=lengths,
    )
    limits = torch.tensor([[0, 3, 8, 5, 8], [1, 3, 2, 0, 3], [0, 0, 0, 0, 0]])
    targets = Targets(
        items=torch.randint(1, 31, (3, 5), generator=g),
        sparse={
            "user": torch.randint(1, 5, (3, 5), generator=g),
            "category": torch.randint(0, 6, (3, 5), generator=g),
            "hour": torch.randint(1, 25, (3, 5), generator=g),
        },
        dense=torch.randn(3, 5, 1, generator=g),
        ts=torch.full((3, 5), 10**7),
        limits=limits,
    )
    return history, targets


@pytest.mark.parametrize("mode", ["interleave", "add"])
def test_cached_passes_equal_one_masked_forward_over_history_and_targets(mode: str) -> None:
    model = _model(mode)
    history, targets = _inputs()
    with torch.no_grad():
        fast = model.score(history, targets)
        full = model.forward_full(history, targets)
    for task in ("click", "like", "action"):
        torch.testing.assert_close(fast[task], full[task], rtol=1e-5, atol=1e-5)
    assert fast["click"].shape == (3, 5) and fast["action"].shape == (3, 5, 7)


def test_a_target_sees_only_its_prefix_and_itself() -> None:
    model = _model()
    history, targets = _inputs()
    with torch.no_grad():
        base = model.score(history, targets)["click"]
        later = History(history.items.clone(), dict(history.side), history.ts.clone(), history.lengths)
        later.items[0, 5:] = (later.items[0, 5:] % 30) + 1  # events 5..7 of row 0 change
        changed = model.score(later, targets)["click"]
        other = Targets(targets.items.clone(), targets.sparse, targets.dense, targets.ts, targets.limits)
        other.items[0, 0] = (other.items[0, 0] % 30) + 1  # another target changes
        moved = model.score(history, other)["click"]
    # Row 0 targets with limit 0, 3 and 5 never see events 5..7; those with limit 8 do.
    torch.testing.assert_close(changed[0, [0, 1, 3]], base[0, [0, 1, 3]])
    assert not torch.allclose(changed[0, [2, 4]], base[0, [2, 4]])
    torch.testing.assert_close(moved[:, 1:], base[:, 1:])
    assert not torch.allclose(moved[0, 0], base[0, 0])


def test_the_ranking_interface_scores_each_row_after_its_window() -> None:
    model = _model()
    batch = synthetic_batch(SPEC, 12, seed=4)
    with torch.no_grad():
        out = model(batch)
        history, targets = rows_as_targets(batch)
        full = model.forward_full(history, targets)
    assert set(out.logits) == {"click", "like"} and out.logits["click"].shape == (12,)
    torch.testing.assert_close(out.logits["click"], full["click"][:, 0], rtol=1e-5, atol=1e-5)
    assert float(out.aux_loss) == 0.0
    # The left-padded window becomes right-padded, oldest first.
    seq = batch.sequences["history"]
    row = int(torch.argmax(seq.lengths))
    n = int(seq.lengths[row])
    assert seq.item_ids is not None
    assert history.items[row, :n].tolist() == seq.item_ids[row, -n:].tolist()


def test_time_buckets_are_whole_square_roots_of_minutes() -> None:
    k = torch.tensor([0, 1, 5, 1000, 94906265])
    gaps = 60 * k * k
    assert time_buckets(gaps, 10**9).tolist() == k.tolist()
    assert time_buckets(gaps[1:] - 1, 10**9).tolist() == (k[1:] - 1).tolist()
    assert time_buckets(torch.tensor([-5, 10**12]), 100).tolist() == [0, 99]


def test_config_names_a_missing_action_field() -> None:
    spec = SPEC.model_copy(
        update={
            "sequences": (
                SequenceSpec(name="history", max_len=8, side=(SideField(name="category", cardinality=6),)),
            )
        }
    )
    with pytest.raises(ValueError, match="action"):
        HSTURankerConfig(features=spec)
    with pytest.raises(ValueError, match="sequence"):
        HSTURankerConfig(features=SPEC, sequence="clicks")
    with pytest.raises(ValueError, match="max_len"):
        _model().encode(
            History(torch.ones(1, 9, dtype=torch.int64), {"action": torch.ones(1, 9, dtype=torch.int64)},
                    torch.zeros(1, 9, dtype=torch.int64), torch.tensor([9]))
        )  # fmt: skip
