"""Continual training pieces: period cuts by time, the reservoir buffer, and the learner on tiny synthetic
data (order of periods, the SDFT cost and gate, replay mixing, checkpoint round trip)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.experiments.ranking import build_model
from recsys.training.continual import (
    ContinualData,
    ContinualLearner,
    ContinualTrainConfig,
    ReservoirBuffer,
    make_continual_data,
    period_edges,
    slice_periods,
)
from recsys.training.loop import seed_everything
from recsys.training.ranking import RankingData, RankingDataConfig, load_ranking_data
from recsys.warehouse import Warehouse
from tests.fixtures import build_synthetic_warehouse, tiny_continual_train, tiny_synthetic

TINY = tiny_synthetic(seed=5, n_items=150, n_users=24, requests_per_user=16, horizon_days=30)
CONFIG = tiny_continual_train(replay_buffer=300)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> RankingData:
    path = build_synthetic_warehouse(TINY, tmp_path_factory.mktemp("continual"))
    with Warehouse(path) as wh:
        return load_ranking_data(wh, "syn", RankingDataConfig(multi_task=False))


def _learner(data: RankingData, method: str, config: ContinualTrainConfig = CONFIG) -> ContinualLearner:
    cdata = make_continual_data(data, config)
    seed_everything(0)
    model, _ = build_model("din", data, config.privileged_len)
    return ContinualLearner(model, cdata, method, config)  # type: ignore[arg-type]


def test_periods_cut_by_time_with_ties_kept_together() -> None:
    ts = np.sort(np.repeat(np.arange(100) * 10, 3))  # 300 examples, 3 per timestamp
    edges = period_edges(ts, 4)
    assert edges[0] == 0 and edges[-1] == ts.max() + 1 and np.all(np.diff(edges) > 0)
    periods = slice_periods(ts, edges, ContinualTrainConfig(n_periods=4, valid_share=0.1, eval_share=0.2))
    assert [p.index for p in periods] == [1, 2, 3, 4]
    everything = np.concatenate([np.concatenate([p.train, p.valid, p.eval]) for p in periods])
    assert np.array_equal(np.sort(everything), np.arange(300))  # disjoint and complete without caps
    for p in periods:
        assert 60 <= p.train.size + p.valid.size + p.eval.size <= 90  # quantile cut: about a quarter each
        assert ts[p.train].max() < ts[p.valid].min() <= ts[p.valid].max() < ts[p.eval].min()
        assert p.start_ts <= ts[p.train].min() and ts[p.eval].max() < p.end_ts
        for part in (p.train, p.valid, p.eval):  # a timestamp never straddles two slices
            assert not set(ts[part]) & (set(ts) - set(ts[part])) & set(ts[np.setdiff1d(everything, part)])
    capped = slice_periods(ts, edges, ContinualTrainConfig(n_periods=4, max_train_per_period=10))
    assert all(p.train.size == 10 and np.all(np.diff(p.train) > 0) for p in capped)
    with pytest.raises(ValueError, match="too few distinct timestamps"):
        period_edges(np.zeros(50, dtype=np.int64), 3)
    with pytest.raises(ValueError, match="must be sorted"):
        slice_periods(ts[::-1], edges, ContinualTrainConfig())


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="privileged_len"):
        ContinualTrainConfig(served_len=50, privileged_len=20)
    with pytest.raises(ValueError, match="valid_share \\+ eval_share"):
        ContinualTrainConfig(valid_share=0.5, eval_share=0.45)


def test_reservoir_keeps_a_uniform_sample_of_everything_offered() -> None:
    buffer = ReservoirBuffer(1_000, seed=3)
    buffer.add(np.arange(0, 5_000))
    buffer.add(np.arange(5_000, 20_000))
    assert len(buffer) == 1_000 and buffer.seen == 20_000
    assert len(set(buffer.items.tolist())) == 1_000 and buffer.items.max() < 20_000
    # A uniform sample of 0..19,999 has mean ~10,000 (sd of the mean ~180); keeping the first ones gives 500.
    assert abs(buffer.items.mean() - 10_000) < 900
    assert (buffer.items >= 5_000).mean() == pytest.approx(0.75, abs=0.06)
    draw = buffer.sample(64, np.random.default_rng(0))
    assert draw.size == 64 and set(draw.tolist()) <= set(buffer.items.tolist())
    with pytest.raises(ValueError, match="capacity"):
        ReservoirBuffer(0)


def test_pool_is_every_example_in_time_order(data: RankingData) -> None:
    cdata: ContinualData = make_continual_data(data, CONFIG)
    assert len(cdata.pool) == sum(len(s) for s in data.splits.values())
    assert np.all(np.diff(cdata.pool.ts) >= 0) and cdata.pool.oracle is not None
    assert len(cdata.periods) == 3 and cdata.edges.size == 4


def test_learner_steps_costs_and_gate(data: RankingData) -> None:
    finetune = _learner(data, "finetune")
    sdft = _learner(data, "sdft")
    periods = finetune.cdata.periods
    with pytest.raises(ValueError, match="expected period 1, got 2"):
        finetune.learn(periods[1])
    ft, sd = finetune.learn(periods[0]), sdft.learn(periods[0])
    assert ft.examples == sd.examples == periods[0].train.size
    assert sd.forward_passes == 3 * ft.forward_passes  # served + privileged + teacher
    assert sd.history_steps > ft.history_steps and sd.kl_weight == 0.0  # gated: lambda 0 at first
    assert ft.gate is None and sd.gate is not None
    assert sdft.kl_on == (sd.gate.privileged_auc > sd.gate.served_auc)
    m = finetune.evaluate(periods[0])
    assert 0.0 <= m.auc <= 1.0 and m.n_examples == periods[0].eval.size and m.oracle_auc is not None

    forced = _learner(data, "sdft", CONFIG.model_copy(update={"kl_gate": False}))
    assert forced.learn(periods[0]).kl_weight == CONFIG.kl_weight
    with pytest.raises(ValueError, match="method must be one of"):
        _learner(data, "ewc")


def test_replay_mixes_earlier_examples_and_checkpoints_round_trip(data: RankingData, tmp_path: Path) -> None:
    replay = _learner(data, "replay")
    periods = replay.cdata.periods
    replay.learn(periods[0])
    assert len(replay.buffer or []) == min(periods[0].train.size, CONFIG.replay_buffer)
    assert set(replay.buffer.items.tolist()) <= set(periods[0].train.tolist())  # type: ignore[union-attr]
    step2 = replay.learn(periods[1])
    batches = -(-periods[1].train.size // CONFIG.batch_size)
    assert step2.examples == periods[1].train.size + batches * round(CONFIG.replay_ratio * CONFIG.batch_size)

    replay.save(tmp_path / "ckpt")
    again = _learner(data, "replay")
    state = again.load(tmp_path / "ckpt")
    assert again.steps_learned == 2 and list(state["edges"].tolist()) == replay.cdata.edges.tolist()
    np.testing.assert_array_equal(again.buffer.items, replay.buffer.items)  # type: ignore[union-attr]
    assert again.evaluate(periods[0]).auc == replay.evaluate(periods[0]).auc
    # The resumed stream learns period 3 exactly as the unbroken one does.
    again.learn(periods[2])
    replay.learn(periods[2])
    assert [again.evaluate(p).auc for p in periods] == [replay.evaluate(p).auc for p in periods]
    np.testing.assert_array_equal(again.buffer.items, replay.buffer.items)  # type: ignore[union-attr]

    sdft = _learner(data, "sdft")
    sdft.learn(periods[0])
    sdft.save(tmp_path / "sdft")
    restored = _learner(data, "sdft")
    restored.load(tmp_path / "sdft")
    assert restored.teacher is not None and sdft.teacher is not None
    for a, b in zip(restored.teacher.module.parameters(), sdft.teacher.module.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="for method 'sdft', not 'replay'"):
        _learner(data, "replay").load(tmp_path / "sdft")
