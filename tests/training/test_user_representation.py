"""Mask schedules (GG-SM's soft mask at the end of warm-up and at the end of training), InfoNCE, the
history / next-period split, and a short contrastive run through the shared loop."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch

from recsys.models.user_encoder import UserEncoder, UserEncoderConfig
from recsys.training.loop import LoopConfig, fit
from recsys.training.user_representation import (
    ContrastiveConfig,
    ContrastiveTask,
    MaskSchedule,
    MaskScheduleConfig,
    info_nce,
    same_sets,
    split_history_future,
)


def _schedule(kind: str, total: int = 11, warmup: float = 0.2, ema: float = 0.5) -> MaskSchedule:
    return MaskSchedule(MaskScheduleConfig(kind=kind, warmup_fraction=warmup, ema=ema), total, max_len=3)


def test_scheduler_is_causal_in_warmup_then_linear_to_bidirectional() -> None:
    s = _schedule("scheduler")
    assert s.warmup_steps == 2
    values = []
    for step in range(11):
        s.step = step
        values.append(s.training_visibility()[0].item())
    assert values[:3] == [0.0, 0.0, 0.0] and values[-1] == 1.0
    assert values[6] == pytest.approx(4 / 8)
    assert _schedule("causal").training_visibility() is None
    assert _schedule("causal").inference_visibility() is None
    assert _schedule("bidirectional").training_visibility().tolist() == [1.0, 1.0, 1.0]


def test_ggsm_soft_mask_follows_gradient_norms_then_moves_to_one() -> None:
    s = _schedule("ggsm")
    # Two rows; row 1 has two valid positions. Norms per position: row 0 (3, 4, 0)->(0, 5, 0)... see below.
    grad = torch.zeros(2, 3, 2)
    grad[0, 0] = torch.tensor([3.0, 0.0])  # norm 3
    grad[0, 1] = torch.tensor([3.0, 4.0])  # norm 5 (the row's largest)
    grad[0, 2] = torch.tensor([0.0, 1.0])  # norm 1
    grad[1, 0] = torch.tensor([2.0, 0.0])  # norm 2 (the row's largest)
    grad[1, 1] = torch.tensor([1.0, 0.0])  # norm 1
    grad[1, 2] = torch.tensor([9.0, 9.0])  # padding: ignored
    lengths = torch.tensor([3, 2])
    assert s.reads_gradients
    s.observe(grad, lengths)
    # Normalised per row: (0.6, 1, 0.2) and (1, 0.5); mean per position (0.8, 0.75, 0.2); EMA 0.5 from 0.
    assert s.visibility.tolist() == pytest.approx([0.4, 0.375, 0.1])
    s.step = 1
    s.observe(grad, lengths)
    frozen = [0.6, 0.5625, 0.15]
    s.step = s.warmup_steps  # the end of the warm-up: the soft mask as the gradients set it
    assert not s.reads_gradients
    assert s.training_visibility().tolist() == pytest.approx(frozen)
    s.step = 6  # half way: frozen + (1 - frozen) / 2
    assert s.training_visibility().tolist() == pytest.approx([(f + 1) / 2 for f in frozen])
    s.step = 10  # the last step: fully bidirectional, as at inference
    assert s.training_visibility().tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert s.inference_visibility().tolist() == [1.0, 1.0, 1.0]


def test_info_nce_by_hand_with_a_duplicate_future_masked() -> None:
    user = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    future = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    same = same_sets([np.array([1, 2]), np.array([3, 4]), np.array([4, 3, 3])])  # users 1 and 2: same set
    assert same.tolist() == [[False, False, False], [False, False, True], [False, True, False]]
    loss = info_nce(user, future, temperature=1.0, same=same)
    # Row 0: logits (1, 0, 0); row 1: (0, 1, [masked]); row 2: (0.6, [masked], 0.8).
    expected = (
        -math.log(math.e / (math.e + 2))
        - math.log(math.e / (math.e + 1))
        - math.log(math.exp(0.8) / (math.exp(0.6) + math.exp(0.8)))
    ) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_split_holds_out_the_last_events_and_drops_short_users() -> None:
    seqs = pl.DataFrame({"user_id": ["a", "b", "c"], "item_idx": [list(range(1, 21)), [1, 2, 3], [4] * 6]})
    data = split_history_future(seqs, 20, ContrastiveConfig(future_fraction=0.2, max_future=3, min_history=2))
    assert data.user_ids == ["a", "c"]
    assert data.history[0].tolist() == list(range(1, 18)) and data.future[0].tolist() == [18, 19, 20]


def test_a_short_ggsm_run_trains_sets_the_soft_mask_and_records_every_step(tmp_path) -> None:
    rng = np.random.default_rng(0)
    # Two tastes: users draw their items from one half of the catalogue, so next-period items are learnable.
    rows = [rng.integers(1 + 15 * (u % 2), 16 + 15 * (u % 2), size=30).tolist() for u in range(64)]
    seqs = pl.DataFrame({"user_id": list(range(64)), "item_idx": rows})
    config = ContrastiveConfig(batch_size=16, future_len=4)
    data = split_history_future(seqs, 30, config)
    torch.manual_seed(0)
    model = UserEncoder(UserEncoderConfig(num_items=30, max_len=24, dim=16, num_heads=2, dropout=0.0))
    schedule = MaskSchedule(
        MaskScheduleConfig(kind="ggsm", warmup_fraction=0.5), total_steps=4 * 4, max_len=24
    )
    task = ContrastiveTask(model, data, config, schedule)
    loop = LoopConfig(max_epochs=4, patience=4, monitor="pair_recall@10", progress=False, resume=False)
    result = fit(task, loop, checkpoint_dir=tmp_path / "ckpt")
    assert len(task.step_losses) == 16 and schedule.step == 16
    # No history reached the last position, so it was never observed; the others were, and differ.
    seen = schedule.visibility[:-1]
    assert (seen > 0).all() and (seen <= 1).all() and seen.std() > 0.01
    assert schedule.visibility[-1] == 0
    assert 0.0 <= result.best_valid["pair_recall@10"] <= 1.0
