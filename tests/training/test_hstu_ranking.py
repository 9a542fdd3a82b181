"""The generative ranker's task (``training.hstu_ranking``) on tiny warehouses: user segments give every
example exactly its own earlier events, the one-forward-per-user scores equal the per-example forward over
training's batches, the action labels are the examples' own events, and a short run trains and records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from recsys.experiments.ranking import build_model
from recsys.features.config import FeatureConfig
from recsys.features.point_in_time import build_examples
from recsys.models.hstu_ranker import ACTION, HSTURanker
from recsys.training.distillation import TeacherMember, score_logits
from recsys.training.hstu_ranking import (
    HSTURankingConfig,
    HSTURankingTask,
    example_actions,
    segment_batch,
    segments,
    sequence_logits,
    train_hstu_ranking,
    train_ranking_model,
)
from recsys.training.loop import LoopConfig, OptimizerConfig
from recsys.training.ranking import RankingData, RankingDataConfig, RankingTrainConfig, load_ranking_data
from recsys.warehouse import Warehouse
from recsys.warehouse.runs import RunLog


@pytest.fixture(scope="module")
def ratings(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RankingData]:
    """A MovieLens-like rating log (timestamp ties, rating buckets), examples built, arrays loaded."""
    rng = np.random.default_rng(7)
    n = 1_200
    events = pl.DataFrame(
        {
            "user_id": rng.integers(1, 21, n) * 3,
            "item_id": rng.integers(1, 41, n) * 7,
            "ts": (1_600_000_000 + rng.integers(0, 500, n) * 3_600).astype(np.int64),
            "event": ["rating"] * n,
            "value": rng.integers(1, 6, n).astype(np.float64),
            "src_row": rng.permutation(n).astype(np.int64),
        }
    )
    items = pl.DataFrame(
        {"item_id": np.arange(1, 41) * 7, "category": rng.choice(["drama", "comedy", "action"], 40)}
    )
    path = tmp_path_factory.mktemp("hstu-ranking") / "warehouse.duckdb"
    with Warehouse(path) as wh:
        wh.publish("rt.events", events, inputs={}, params={"test": 1})
        wh.publish("rt.items", items, inputs={}, params={"test": 1})
        build_examples(wh, "rt", FeatureConfig())
        data = load_ranking_data(wh, "rt", RankingDataConfig())
    return path, data


def _model(data: RankingData, max_len: int) -> HSTURanker:
    torch.manual_seed(0)
    model, _ = build_model("hstu-ranker", data, max_len, {"embedding_dim": 16, "dqk": 8, "dv": 8})
    assert isinstance(model, HSTURanker)
    return model


@pytest.mark.parametrize(("max_len", "slack"), [(1000, 0), (12, 0), (12, 5)])
def test_segments_give_each_example_its_own_earlier_events(
    ratings: tuple[Path, RankingData], max_len: int, slack: int
) -> None:
    _, data = ratings
    split = data.splits["test"]
    segs = segments(split, np.arange(len(split)), max_len, slack)
    covered = np.sort(np.concatenate([s.rows for s in segs]))
    assert covered.tolist() == list(range(len(split)))  # every example exactly once
    history, targets, rows = segment_batch(data, split, segs, data.tasks)
    h = data.histories
    for r in range(len(segs)):
        for c, row in enumerate(rows[r]):
            if row < 0:
                continue
            off, limit = int(split.seq_offset[row]), int(targets.limits[r, c])
            # What the target reads ends exactly at its own earlier events ...
            seen = history.items[r, :limit].numpy()
            start = int(h.user_start[split.user[row]])
            assert seen.tolist() == h.item[start + off - limit : start + off].tolist()
            assert (history.ts[r, :limit].numpy() < split.ts[row]).all()
            # ... and is the max_len most recent of them (at least max_len - slack of them when cut).
            if off <= max_len:
                assert limit == off
            else:
                assert max_len - slack <= limit <= max_len
            assert int(targets.items[r, c]) == int(split.item[row])


def test_one_forward_per_user_equals_the_per_example_forward_on_training_batches(
    ratings: tuple[Path, RankingData],
) -> None:
    _, data = ratings
    max_len = 12  # shorter than many histories: the windows of the long ones are exercised
    model = _model(data, max_len).eval()
    split = data.splits["test"]
    fast = sequence_logits(model, data, split, "cpu", batch_size=37)
    index = np.arange(len(split))
    with torch.no_grad():
        slow = model(data.make_batch(split, index, max_len)).logits
    for task in data.tasks:
        np.testing.assert_allclose(fast[task], slow[task].double().numpy(), rtol=1e-4, atol=1e-5)


def test_action_labels_are_the_examples_own_rating_buckets(ratings: tuple[Path, RankingData]) -> None:
    _, data = ratings
    split = data.splits["train"]
    actions = example_actions(data, split)
    h = data.histories
    found = 0
    for row in range(len(split)):
        u = int(split.user[row])
        s, n = int(h.user_start[u]), int(h.user_length[u])
        hit = np.flatnonzero((h.item[s : s + n] == split.item[row]) & (h.ts[s : s + n] == split.ts[row]))
        if hit.size:
            assert actions[row] == h.side[ACTION][s + hit[0]]
            found += 1
        else:
            assert actions[row] == 0
    assert found == len(split)  # every rating example is itself an event with a rating bucket
    # Rating >= 4 (the click label) is the top of the rating buckets.
    click = split.labels["click"] > 0
    assert actions[click].min() > actions[~click].max()


def test_a_short_run_trains_records_and_resumes(ratings: tuple[Path, RankingData], tmp_path: Path) -> None:
    path, data = ratings
    model = _model(data, 64)
    loop = LoopConfig(
        monitor="auc",
        max_epochs=3,
        patience=3,
        progress=False,
        device="cpu",
        optimizer=OptimizerConfig(lr=5e-3),
    )
    config = HSTURankingConfig(max_len=64, batch_size=64)
    task = HSTURankingTask(model, data, config, seed=0)
    batches = list(task.train_batches(1, np.random.default_rng(0)))
    assert sum(b.n_targets for b in batches) == len(data.splits["train"])
    assert all(b.n_targets <= 64 or b.history.lengths.shape[0] == 1 for b in batches)
    before = float(task.loss(model, batches[0], torch.device("cpu")).detach())
    result = train_hstu_ranking(
        "hstu-ranker",
        model,
        data,
        seed=0,
        train_config=config,
        loop_config=loop,
        checkpoint_dir=tmp_path / "ckpt",
        run_log=RunLog(path),
    )
    assert result.epochs_run == 3 and 0.0 <= result.test["auc"] <= 1.0 and "log_loss" in result.test
    model.train()
    after = float(task.loss(model, batches[0], torch.device("cpu")).detach())
    assert after < before  # the training loss on a seen batch went down
    # The dispatcher sends the generative ranker to this task; a finished run is reused from its checkpoint.
    again = train_ranking_model(
        "hstu-ranker",
        _model(data, 64),
        data,
        seed=0,
        train_config=config,
        loop_config=loop,
        checkpoint_dir=tmp_path / "ckpt",
    )
    assert again.test["auc"] == pytest.approx(result.test["auc"])
    with pytest.raises(ValueError, match="max_len"):
        HSTURankingTask(_model(data, 64), data, HSTURankingConfig(max_len=32))
    shared = HSTURankingConfig.from_ranking(RankingTrainConfig(max_len=64, batch_size=32, epoch_examples=100))
    assert (shared.max_len, shared.batch_size, shared.epoch_examples) == (64, 32, 100)


def test_the_distillation_teacher_path_scores_with_the_generative_ranker(
    ratings: tuple[Path, RankingData],
) -> None:
    _, data = ratings
    model = _model(data, 12).eval()
    member = TeacherMember(name="hstu-ranker", model=model, max_len=12, weights_sha256="0" * 64)
    split = data.splits["valid"]
    scored = score_logits([member], data, split)
    with torch.no_grad():
        direct = model(data.make_batch(split, np.arange(len(split)), 12)).logits
    for task in data.tasks:
        np.testing.assert_allclose(scored[task], direct[task].double().numpy(), rtol=1e-4, atol=1e-5)
