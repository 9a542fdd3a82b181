"""Leave-one-out split and full-ranking metrics against hand-computed ranks."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch

from recsys.evaluation.retrieval import (
    EvalBatch,
    evaluate_retrieval,
    leave_one_out,
    metrics_from_ranks,
    ranks_from_scores,
)


def _sequences(rows: dict[int, list[int]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": list(rows),
            "user_idx": list(rows),
            "item_idx": [items for items in rows.values()],
            "ts": [[10 * (i + 1) for i in range(len(items))] for items in rows.values()],
        }
    )


def test_leave_one_out_split() -> None:
    split = leave_one_out(_sequences({1: [5, 6, 7, 8], 2: [1, 2], 3: [3, 4, 1]}), num_items=8)
    assert split.train_users.tolist() == [1, 2, 3]
    assert [t.tolist() for t in split.train_items] == [[5, 6], [1, 2], [3]]  # user 2 (< 3 events): train only
    assert split.valid.users.tolist() == [1, 3] and split.valid.targets.tolist() == [7, 4]
    assert split.test.targets.tolist() == [8, 1] and split.test.target_ts.tolist() == [40, 30]
    assert [h.tolist() for h in split.test.histories] == [[5, 6, 7], [3, 4]]  # test history includes valid
    assert split.item_counts().tolist() == [0, 1, 1, 1, 0, 1, 1, 0, 0]


def test_split_rejects_unsorted_or_out_of_range_sequences() -> None:
    frame = _sequences({1: [1, 2, 3]}).with_columns(pl.Series("ts", [[30, 10, 20]]))
    with pytest.raises(ValueError, match="time order"):
        leave_one_out(frame, num_items=3)
    with pytest.raises(ValueError, match=r"1\.\.2"):
        leave_one_out(_sequences({1: [1, 2, 3]}), num_items=2)
    with pytest.raises(ValueError, match="column 'ts'"):
        leave_one_out(_sequences({1: [1, 2, 3]}).drop("ts"), num_items=3)


def test_eval_batch_keeps_the_last_n_items_and_the_target_time() -> None:
    split = leave_one_out(_sequences({1: [1, 2, 3, 4, 5, 6]}), num_items=6)
    batch = split.test.batch(np.array([0]), history_len=3)
    assert batch.items.tolist() == [[3, 4, 5]]
    assert batch.ts.tolist() == [[30, 40, 50]]
    assert batch.query_ts.tolist() == [[40, 50, 60]]  # the last query time is the target's
    assert batch.exclude.tolist() == [[1, 2, 3, 4, 5]]  # exclusion covers the whole history, not the window


def test_ranks_exclude_history_and_count_ties_against_the_target() -> None:
    scores = torch.tensor(
        [
            [
                9.0,
                0.1,
                0.5,
                0.9,
                0.3,
            ],  # target 1; items 2, 3 excluded -> only item 4 (0.3) beats it -> rank 2
            [9.0, 0.2, 0.2, 0.2, 0.2],  # all tied -> target ranks last of the 4 candidates
            [9.0, 0.9, 0.1, 0.8, 0.7],  # target 3 is also in the history (re-consumed): it stays -> rank 1
        ]
    )
    targets = torch.tensor([1, 2, 3])
    exclude = torch.tensor([[2, 3], [0, 0], [1, 3]])
    assert ranks_from_scores(scores, targets, exclude).tolist() == [2, 4, 1]


def test_metrics_by_hand() -> None:
    m = metrics_from_ranks(np.array([1, 3, 15, 300]), ks=(10, 200))
    assert m["hr@10"] == pytest.approx(2 / 4)
    assert m["ndcg@10"] == pytest.approx((1.0 + 1 / math.log2(4)) / 4)
    assert m["mrr@10"] == pytest.approx((1.0 + 1 / 3) / 4)
    assert m["hr@200"] == pytest.approx(3 / 4)
    assert m["mrr@200"] == pytest.approx((1.0 + 1 / 3 + 1 / 15) / 4)


def test_evaluate_retrieval_full_and_sampled() -> None:
    split = leave_one_out(_sequences({1: [1, 2, 3, 4], 2: [4, 3, 2, 1], 3: [2, 5, 6, 7]}), num_items=8)

    def oracle(batch: EvalBatch) -> torch.Tensor:  # puts the target first, everything else equal
        scores = torch.zeros(batch.targets.shape[0], 9)
        scores[torch.arange(len(batch.targets)), batch.targets] = 1.0
        return scores

    def constant(batch: EvalBatch) -> torch.Tensor:
        return torch.zeros(batch.targets.shape[0], 9)

    good = evaluate_retrieval(oracle, split.test, num_items=8, history_len=2, ks=(1, 5), sampled_negatives=3)
    assert good.metrics["hr@1"] == 1.0 and good.metrics["ndcg@1"] == 1.0
    assert good.metrics["hr_sampled@1"] == 1.0
    bad = evaluate_retrieval(constant, split.test, num_items=8, history_len=2, ks=(1, 5), sampled_negatives=3)
    # 8 items minus 3 history items: the target ties with 4 others and ranks 5th; sampled: 1 + 3 = 4th
    assert bad.ranks.tolist() == [5, 5, 5]
    assert bad.sampled_ranks is not None and bad.sampled_ranks.tolist() == [4, 4, 4]
    assert bad.metrics["hr@5"] == 1.0 and bad.metrics["hr@1"] == 0.0
    assert bad.per_user("ndcg@5").tolist() == pytest.approx([1 / math.log2(6)] * 3)
    assert bad.users.tolist() == [1, 2, 3]


def test_score_shape_is_checked() -> None:
    split = leave_one_out(_sequences({1: [1, 2, 3]}), num_items=3)
    with pytest.raises(ValueError, match="expected"):
        evaluate_retrieval(lambda b: torch.zeros(1, 3), split.test, num_items=3, history_len=5)
