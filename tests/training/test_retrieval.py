"""Retrieval training: batch layout, exact length bucketing, Stochastic Length, and learning a pattern."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

import recsys.training.retrieval as tr
from recsys.evaluation.retrieval import LeaveOneOutSplit, leave_one_out
from recsys.models.registry import build_model
from recsys.training.loop import LoopConfig, OptimizerConfig
from recsys.training.retrieval import RetrievalTask, RetrievalTrainConfig, stochastic_length, train_retrieval
from recsys.warehouse.runs import RunLog

NUM_ITEMS = 12


def _cyclic_split(users: int = 48, seed: int = 0) -> LeaveOneOutSplit:
    """Each user walks the item cycle 1 -> 2 -> ... -> 12 -> 1 from a random start: the next item is known."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(1, users + 1):
        start, n = int(rng.integers(0, NUM_ITEMS)), int(rng.integers(4, 15))
        rows.append((u, [(start + i) % NUM_ITEMS + 1 for i in range(n)], [100 * i for i in range(n)]))
    frame = pl.DataFrame(
        {"user_idx": [r[0] for r in rows], "item_idx": [r[1] for r in rows], "ts": [r[2] for r in rows]}
    )
    return leave_one_out(frame, NUM_ITEMS)


def test_training_batch_predicts_the_next_item_at_every_position() -> None:
    split = _cyclic_split()
    task = RetrievalTask(
        build_model("sasrec", num_items=NUM_ITEMS, max_len=3),
        split,
        RetrievalTrainConfig(max_len=3, length_buckets=False),
    )
    batch = task.make_batch(
        [(np.array([4, 5, 6, 7, 8]), np.array([10, 20, 30, 40, 50])), (np.array([1, 2]), np.array([7, 9]))]
    )
    # the window keeps max_len + 1 items upstream; here the rows are taken as given
    assert batch.items.tolist() == [[4, 5, 6, 7], [1, 0, 0, 0]]
    assert batch.targets.tolist() == [[5, 6, 7, 8], [2, 0, 0, 0]]
    assert batch.query_ts.tolist() == [[20, 30, 40, 50], [9, 0, 0, 0]]
    assert batch.lengths.tolist() == [4, 1]
    assert all(len(w) <= 4 for w, _ in task.windows)  # windows: at most max_len + 1 items


def test_length_buckets_give_the_same_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    split = _cyclic_split()
    torch.manual_seed(0)
    model = build_model("hstu", num_items=NUM_ITEMS, max_len=16, dropout=0.0)
    monkeypatch.setattr(
        tr, "sample_uniform_negatives", lambda n, shape, device=None: torch.ones(shape, dtype=torch.long)
    )
    losses = []
    for buckets in (False, True):
        task = RetrievalTask(model, split, RetrievalTrainConfig(max_len=16, length_buckets=buckets))
        step = next(iter(task.train_batches(0, np.random.default_rng(0))))
        assert len(step.parts) == (1 if not buckets else len(step.parts)) and step.num_sequences == 48
        losses.append(task.loss(model, step, torch.device("cpu")))
    assert len(step.parts) > 1
    torch.testing.assert_close(losses[0], losses[1])


def test_scores_and_the_loss_stay_fp32_under_bf16_autocast() -> None:
    """Evaluation scores and training logits are computed in fp32 whatever autocast says (bf16 scores tie)."""
    split = _cyclic_split()
    torch.manual_seed(0)
    model = build_model("sasrec", num_items=NUM_ITEMS, max_len=16, dropout=0.0).eval()
    task = RetrievalTask(model, split, RetrievalTrainConfig(max_len=16))
    _, batch = next(iter(split.valid.batches(8, 16)))
    plain = task.score_fn(model)(batch)
    step = next(iter(task.train_batches(0, np.random.default_rng(0))))
    loss = task.loss(model, step, torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = task.score_fn(model)(batch)
        mixed_loss = task.loss(model, step, torch.device("cpu"))
    assert mixed.dtype == torch.float32 and mixed_loss.dtype == torch.float32
    # The encoder itself runs in bf16 under autocast; the dot products and the loss do not add to that error.
    assert (mixed - plain).abs().max() < 0.05 * plain.abs().max()
    assert abs(float(mixed_loss) - float(loss)) < 0.05 * float(loss)


def test_stochastic_length_keeps_an_ordered_subset() -> None:
    rng = np.random.default_rng(0)
    items, ts = np.arange(1, 51), np.arange(50) * 10
    lengths = set()
    for _ in range(50):
        sub_items, sub_ts = stochastic_length(items, ts, max_len=100, alpha=1.0, rng=rng)
        lengths.add(len(sub_items))
        assert np.all(np.diff(sub_ts) > 0) and np.all(sub_ts == (sub_items - 1) * 10)
    assert lengths == {10, 50}  # N^(a/2) = 10 kept with prob 1 - 100/2500, else the whole window
    short = stochastic_length(items[:8], ts[:8], max_len=100, alpha=1.0, rng=rng)
    assert len(short[0]) == 8


@pytest.mark.parametrize("name", ["sasrec", "hstu"])
def test_models_learn_the_cycle(name: str) -> None:
    split = _cyclic_split()
    cfg = RetrievalTrainConfig(max_len=16, batch_size=16, ks=(1, 5), sampled_eval_negatives=5)
    loop = LoopConfig(
        max_epochs=8, patience=8, monitor="ndcg@5", progress=False, optimizer=OptimizerConfig(lr=1e-2)
    )
    result = train_retrieval(
        name, split, seed=0, train_config=cfg, loop_config=loop, model_fields={"dropout": 0.0}
    )
    popularity = train_retrieval("popularity", split, seed=0, train_config=cfg)
    assert result.test.metrics["hr@1"] > 0.8 > popularity.test.metrics["hr@1"]
    assert "hr_sampled@1" in result.test.metrics
    assert result.num_parameters > 0 and result.flops_per_example > 0


def test_runs_and_checkpoints_are_recorded(tmp_path: Path) -> None:
    split = _cyclic_split()
    log = RunLog(tmp_path / "wh.duckdb")
    cfg = RetrievalTrainConfig(max_len=16, batch_size=16, ks=(1, 5))
    loop = LoopConfig(max_epochs=2, patience=2, monitor="ndcg@5", progress=False)
    result = train_retrieval(
        "hstu",
        split,
        seed=0,
        train_config=cfg,
        loop_config=loop,
        checkpoint_dir=tmp_path / "ckpt",
        run_log=log,
        data_version="v",
    )
    train_retrieval("popularity", split, seed=0, train_config=cfg, run_log=log)
    assert (tmp_path / "ckpt" / "best" / "weights.safetensors").exists()
    assert (tmp_path / "ckpt" / "last" / "state.pt").exists()
    runs = log.runs("retrieval")
    assert sorted(runs["name"].to_list()) == ["hstu", "popularity"]
    assert set(runs["status"].to_list()) == {"finished"} and set(runs["data_version"].to_list()) == {
        "v",
        None,
    }
    test_rows = log.metrics(result.run_id).filter(pl.col("split") == "test")
    assert test_rows.filter(pl.col("name") == "ndcg@10").height == 0  # ks=(1, 5): only those are reported
    assert test_rows.filter(pl.col("name") == "ndcg@5")["value"][0] == pytest.approx(
        result.test.metrics["ndcg@5"]
    )
