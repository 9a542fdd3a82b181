"""The RankingBatch contract: spec validation, left padding, dedup, history windows, batch validation."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from recsys.models.batch import (
    FeatureSpec,
    SequenceBatch,
    SequenceSpec,
    SideField,
    SparseField,
    demo_spec,
    history_window,
    synthetic_batch,
)


def test_history_window_left_pads_the_most_recent_steps() -> None:
    # two users' histories concatenated: user A = 10..15 (6 events), user B = 20..21 (2 events)
    values = np.array([10, 11, 12, 13, 14, 15, 20, 21])
    starts = np.array([0, 0, 6, 6])
    offsets = np.array([5, 0, 2, 1])  # A before its 6th event, A with no history, B after both, B after one
    window, lengths = history_window(values, starts, offsets, max_len=3)
    assert window.tolist() == [[12, 13, 14], [0, 0, 0], [0, 20, 21], [0, 0, 20]]
    assert lengths.tolist() == [3, 0, 2, 1]
    with pytest.raises(ValueError, match="outside values"):
        history_window(values, np.array([6]), np.array([3]), max_len=3)


def test_spec_rejects_duplicates_and_mismatched_shared_tables() -> None:
    with pytest.raises(ValidationError, match="duplicate"):
        FeatureSpec(n_items=5, sparse=(SparseField(name="a", cardinality=3, group="user"),) * 2)
    with pytest.raises(ValidationError, match="shares the table"):
        FeatureSpec(
            n_items=5,
            sparse=(SparseField(name="category", cardinality=4, group="item"),),
            sequences=(SequenceSpec(name="h", max_len=4, side=(SideField(name="category", cardinality=5),)),),
        )
    with pytest.raises(ValidationError, match="extra"):
        FeatureSpec(n_items=5, n_users=3)  # type: ignore[call-arg]


def test_synthetic_batch_is_valid_left_padded_and_moves() -> None:
    spec = demo_spec(n_sequences=2, tasks=("click", "like"))
    batch = synthetic_batch(spec, 16, seed=0)
    batch.validate(spec)
    seq = batch.sequences["history"]
    valid = seq.valid_mask()
    assert torch.equal(valid.sum(1), seq.lengths)
    assert bool(valid[:, -1][seq.lengths > 0].all())  # the newest step sits at the right end
    moved = batch.to("cpu")
    assert torch.equal(moved.sequences["history"].item_ids, seq.item_ids)
    assert set(moved.labels) == {"click", "like"}


def test_deduplicated_batch_is_valid_and_smaller() -> None:
    spec = demo_spec(max_len=40)
    batch = synthetic_batch(spec, 32, seed=1)  # 60 items, up to 1280 steps: many repeats
    dedup = batch.deduplicated()
    dedup.validate(spec)
    seq = dedup.sequences["history"]
    assert seq.is_deduplicated and seq.item_ids is None
    assert seq.inverse.dtype == torch.int32 and seq.unique_ids.numel() <= 60
    assert dedup.nbytes() < batch.nbytes()


def test_validate_names_the_bad_field() -> None:
    spec = demo_spec()
    batch = synthetic_batch(spec, 4)
    with pytest.raises(ValueError, match="item_id has ids outside"):
        replace(batch, item_id=batch.item_id + 100).validate(spec)
    with pytest.raises(ValueError, match="missing fields"):
        replace(batch, sparse={}).validate(spec)
    seq = batch.sequences["history"]
    right_padded = torch.flip(seq.item_ids, dims=[1])
    with pytest.raises(ValueError, match="left-padded"):
        replace(batch, sequences={"history": replace(seq, item_ids=right_padded)}).validate(spec)
    with pytest.raises(ValueError, match="only 0 and 1"):
        replace(batch, labels={"click": batch.labels["click"] + 0.5}).validate(spec)
    with pytest.raises(ValueError, match="either item_ids"):
        SequenceBatch(lengths=seq.lengths, time_gap=seq.time_gap)
