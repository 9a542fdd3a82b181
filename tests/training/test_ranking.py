"""Ranking data and training on tiny warehouses: the batches are point-in-time (checked against the raw
events by brute force), the feature spec has the right fields, the epoch slices cover a pass, and a short
training run lowers the validation log loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from recsys.features.config import FeatureConfig
from recsys.features.point_in_time import build_examples
from recsys.models.deepfm import DeepFM, DeepFMConfig
from recsys.training.loop import LoopConfig, OptimizerConfig
from recsys.training.ranking import (
    RankingData,
    RankingDataConfig,
    RankingTask,
    RankingTrainConfig,
    evaluate,
    load_ranking_data,
    train_ranking,
)
from recsys.warehouse import Warehouse
from recsys.warehouse.runs import RunLog


@pytest.fixture(scope="module")
def ratings_wh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MovieLens-like rating log with many timestamp ties, users and items tables, examples built."""
    rng = np.random.default_rng(5)
    n = 1_500
    events = pl.DataFrame(
        {
            "user_id": rng.integers(1, 31, n) * 3,
            "item_id": rng.integers(1, 61, n) * 7,
            "ts": (1_600_000_000 + rng.integers(0, 600, n) * 3_600).astype(np.int64),  # hourly grid: ties
            "event": ["rating"] * n,
            "value": rng.integers(1, 6, n).astype(np.float64),
            "src_row": rng.permutation(n).astype(np.int64),
        }
    )
    users = pl.DataFrame(
        {
            "user_id": np.arange(1, 31) * 3,
            "gender": rng.choice(["F", "M"], 30),
            "age": rng.integers(18, 70, 30),
        }
    )
    items = pl.DataFrame(
        {
            "item_id": np.arange(1, 61) * 7,
            "title": [f"movie {i}" for i in range(60)],  # near-unique: must not become a feature
            "category": rng.choice(["drama", "comedy", "action"], 60),
        }
    )
    path = tmp_path_factory.mktemp("ranking-ratings") / "warehouse.duckdb"
    with Warehouse(path) as wh:
        wh.publish("rt.events", events, inputs={}, params={"test": 1})
        wh.publish("rt.users", users, inputs={}, params={"test": 1})
        wh.publish("rt.items", items, inputs={}, params={"test": 1})
        build_examples(wh, "rt", FeatureConfig())
    return path


def _load(path: Path, dataset: str, **fields: object) -> RankingData:
    with Warehouse(path) as wh:
        return load_ranking_data(wh, dataset, RankingDataConfig(**fields))


def _brute_force_histories(path: Path, dataset: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """user_idx -> (item_idx, ts) of all the user's events in (ts, src_row) order, from the raw events."""
    with Warehouse(path) as wh:
        ev = wh.sql(
            f"SELECT u.user_idx, i.item_idx, e.ts, e.src_row FROM {dataset}.events e "
            f"JOIN {dataset}.user_index u USING (user_id) JOIN {dataset}.item_index i USING (item_id) "
            "ORDER BY u.user_idx, e.ts, e.src_row"
        )
    out = {}
    for (user,), part in ev.group_by(["user_idx"], maintain_order=True):
        out[int(user)] = (part["item_idx"].to_numpy(), part["ts"].to_numpy())
    return out


@pytest.mark.parametrize("dataset", ["syn", "rt"])
def test_batches_hold_only_events_strictly_before_the_example(
    dataset: str, synthetic_wh: Path, ratings_wh: Path
) -> None:
    path = synthetic_wh if dataset == "syn" else ratings_wh
    data = _load(path, dataset)
    histories = _brute_force_histories(path, dataset)
    max_len = 12
    spec = data.feature_spec(max_len)
    for split in ("train", "valid", "test"):
        s = data.splits[split]
        index = np.random.default_rng(0).choice(len(s), size=min(len(s), 150), replace=False)
        batch = data.make_batch(split, index, max_len)
        batch.validate(spec)
        seq = batch.sequences["history"]
        items, gaps, valid = seq.item_ids.numpy(), seq.time_gap.numpy(), seq.valid_mask().numpy()
        for row, b in enumerate(index):
            h_items, h_ts = histories.get(int(s.user[b]), (np.zeros(0, int), np.zeros(0, int)))
            before = h_ts < s.ts[b]  # strictly earlier events only
            want_items, want_ts = h_items[before][-max_len:], h_ts[before][-max_len:]
            n = len(want_items)
            assert int(seq.lengths[row]) == n
            np.testing.assert_array_equal(items[row][valid[row]], want_items)
            np.testing.assert_allclose(gaps[row][valid[row]], s.ts[b] - want_ts)
            assert (gaps[row][valid[row]] > 0).all()  # nothing at or after the example's second
            assert (items[row][~valid[row]] == 0).all()


def test_feature_spec_of_an_impression_log(synthetic_wh: Path) -> None:
    data = _load(synthetic_wh, "syn")
    spec = data.feature_spec(50)
    groups = {f.name: f.group for f in spec.sparse}
    assert groups["user"] == "user" and groups["u_region"] == "user"
    assert groups["category"] == "item" and groups["creator"] == "item" and groups["price_band"] == "item"
    assert {n for n, g in groups.items() if g == "context"} == {"hour", "weekday", "position"}
    side = {f.name for f in spec.sequences[0].side}
    assert side == {"category", "creator", "action"}
    assert spec.tasks == ("click", "like")
    # The generator's truths and the logging propensities are never inputs.
    assert not {"p_click", "p_click_unbiased", "propensity", "dwell"} & set(spec.dense)
    assert {"u_cnt", "i_cnt", "u_decay_1d"} <= set(spec.dense)
    train_dense = data.splits["train"].dense
    np.testing.assert_allclose(train_dense.mean(axis=0), 0.0, atol=0.35)  # standardised on train
    assert data.has_oracle and data.splits["test"].oracle is not None


def test_feature_spec_of_a_rating_log(ratings_wh: Path) -> None:
    data = _load(ratings_wh, "rt", max_train_examples=300, max_test_examples=100)
    spec = data.feature_spec(20)
    names = {f.name for f in spec.sparse}
    assert "title" not in names and "category" in names and "u_gender" in names
    assert "position" not in names and spec.tasks == ("click",)
    assert "u_age" in spec.dense
    action = next(f for f in spec.sequences[0].side if f.name == "action")
    assert action.cardinality == 10  # 8 buckets + padding + NULL; ratings 1..5 use buckets 1..5
    assert data.histories.side["action"].max() <= 5
    assert len(data.splits["train"]) == 300
    assert data.split_sizes["train"] > 300 and not data.has_oracle
    test_users = set(data.splits["test"].user.tolist())
    full = _load(ratings_wh, "rt")
    kept = np.isin(full.splits["test"].user, list(test_users))
    assert kept.sum() == len(data.splits["test"])  # whole users are kept or dropped


def test_epoch_slices_walk_through_one_pass_then_reshuffle(ratings_wh: Path) -> None:
    data = _load(ratings_wh, "rt")
    spec = data.feature_spec(16)
    model = DeepFM(DeepFMConfig(features=spec))
    task = RankingTask(model, data, RankingTrainConfig(max_len=16, epoch_examples=400), seed=1)
    n = len(data.splits["train"])
    per_pass = -(-n // 400)
    first = np.concatenate([task.epoch_slice(e) for e in range(1, per_pass + 1)])
    assert np.array_equal(np.sort(first), np.arange(n))
    second = np.concatenate([task.epoch_slice(e) for e in range(per_pass + 1, 2 * per_pass + 1)])
    assert np.array_equal(np.sort(second), np.arange(n)) and not np.array_equal(first, second)
    batches = task.batch_indices(1, np.random.default_rng(0))
    assert np.array_equal(np.sort(np.concatenate(batches)), np.sort(task.epoch_slice(1)))


def test_short_training_lowers_validation_log_loss_and_records_the_run(
    synthetic_wh: Path, tmp_path: Path
) -> None:
    data = _load(synthetic_wh, "syn", max_train_examples=2_000)
    config = RankingTrainConfig(max_len=16, batch_size=64)
    spec = data.feature_spec(16)
    torch.manual_seed(0)
    model_config = DeepFMConfig(features=spec)
    model = DeepFM(model_config)
    device = torch.device("cpu")
    before = evaluate(model, data, "valid", config, device)["click"].log_loss
    log = RunLog(tmp_path / "runs.duckdb")
    result = train_ranking(
        "deepfm",
        model,
        data,
        seed=0,
        train_config=config,
        loop_config=LoopConfig(
            monitor="auc", max_epochs=2, patience=2, progress=False, optimizer=OptimizerConfig(lr=3e-3)
        ),
        model_config=model_config,
        run_log=log,
    )
    after = evaluate(model, data, "valid", config, device)["click"].log_loss
    assert after < before - 0.02, f"validation log loss {before:.4f} -> {after:.4f}"
    assert result.valid["log_loss"] == pytest.approx(after, rel=1e-6)  # the model holds the best weights
    for key in (
        "auc",
        "gauc",
        "log_loss",
        "ne",
        "calibration",
        "ece",
        "oracle_auc",
        "oracle_share",
        "like/auc",
    ):
        assert key in result.test
    assert 0.5 < result.test["oracle_auc"] <= 1.0
    assert result.num_parameters > 0 and result.flops_per_example > 0
    runs = log.runs("ranking")
    assert (
        runs.height == 1 and runs["status"][0] == "finished" and runs["data_version"][0] == data.data_version
    )
    metrics = log.metrics(result.run_id)
    assert set(metrics["split"]) == {"train", "valid", "test"}
