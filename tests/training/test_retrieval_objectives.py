"""Objectives in the shared retrieval trainer: the data's rule, the model/objective agreement, every objective
learning the cyclic pattern, a learned temperature moving, and DDP sharding under full softmax."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.models.losses import FullSoftmaxConfig, GBCEConfig, SampledSoftmaxConfig
from recsys.models.registry import build_model, model_config
from recsys.training.checkpoint import load_weights, weights_path
from recsys.training.distributed import ShardedRetrievalTask
from recsys.training.loop import LoopConfig, OptimizerConfig
from recsys.training.retrieval import (
    FULL_SOFTMAX_MAX_ITEMS,
    RetrievalTask,
    RetrievalTrainConfig,
    default_recipe,
    split_recipe,
    train_retrieval,
)
from recsys.warehouse.runs import RunLog
from tests.training.test_retrieval import NUM_ITEMS, _cyclic_split


def test_rule_picks_objective_by_catalogue_and_defaults_by_density() -> None:
    movielens = default_recipe(1682, 106.0)
    assert isinstance(movielens.objective, FullSoftmaxConfig) and not movielens.objective.normalize
    assert (movielens.max_len, movielens.embedding_dim, movielens.dropout, movielens.sparse) == (
        200,
        64,
        0.2,
        False,
    )
    sparse = default_recipe(12_000, 9.0)
    assert isinstance(sparse.objective, FullSoftmaxConfig)
    assert (sparse.max_len, sparse.embedding_dim, sparse.dropout, sparse.sparse) == (50, 64, 0.5, True)
    huge = default_recipe(FULL_SOFTMAX_MAX_ITEMS + 1, 9.0)
    assert isinstance(huge.objective, SampledSoftmaxConfig)
    assert (huge.objective.negatives, huge.objective.logq_correction, huge.objective.num_negatives) == (
        "mixed",
        True,
        512,
    )
    assert default_recipe(FULL_SOFTMAX_MAX_ITEMS + 1, 100.0).objective.num_negatives == 2048  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="events_per_user"):
        default_recipe(10, 0.0)


def test_task_follows_the_model_or_refuses_a_mismatch() -> None:
    split = _cyclic_split()
    assert split_recipe(split).sparse  # ~9 events per user
    normalized = build_model("sasrec", num_items=NUM_ITEMS, max_len=8)
    task = RetrievalTask(normalized, split, RetrievalTrainConfig(max_len=8))
    assert task.objective == FullSoftmaxConfig(normalize=True, temperature=0.05)  # the rule, adapted
    raw = build_model("sasrec", num_items=NUM_ITEMS, max_len=8, normalize=False)
    assert RetrievalTask(raw, split, RetrievalTrainConfig(max_len=8)).objective == FullSoftmaxConfig()
    with pytest.raises(ValueError, match="normalize"):
        RetrievalTask(raw, split, RetrievalTrainConfig(max_len=8, loss=SampledSoftmaxConfig()))
    with pytest.raises(ValueError, match="learn_temperature"):
        RetrievalTask(
            raw, split, RetrievalTrainConfig(max_len=8, loss=FullSoftmaxConfig(learn_temperature=True))
        )


@pytest.mark.parametrize(
    "objective",
    [
        FullSoftmaxConfig(chunk_size=5),  # the chunked path inside real training
        FullSoftmaxConfig(normalize=True, temperature=0.1, learn_temperature=True),
        SampledSoftmaxConfig(num_negatives=6, negatives="mixed", logq_correction=True),
        SampledSoftmaxConfig(
            num_negatives=6, negatives="in_batch", logq_correction=True, normalize=False, temperature=1.0
        ),
        GBCEConfig(num_negatives=6, calibration=0.5),
    ],
    ids=["full-chunked", "full-l2-learned-t", "mixed-logq", "in-batch-raw", "gbce"],
)
def test_every_objective_learns_the_cycle(objective: object) -> None:
    split = _cyclic_split()
    result = train_retrieval(
        "sasrec",
        split,
        seed=0,
        train_config=RetrievalTrainConfig(max_len=16, batch_size=16, ks=(1, 5), loss=objective),  # type: ignore[arg-type]
        loop_config=LoopConfig(
            max_epochs=8, patience=8, monitor="ndcg@5", progress=False, optimizer=OptimizerConfig(lr=1e-2)
        ),
        model_fields={"embedding_dim": 16, "dropout": 0.0},
    )
    assert result.test is not None and result.test.metrics["hr@1"] > 0.3  # chance is 1/12


def test_learned_temperature_is_a_trained_model_parameter() -> None:
    split = _cyclic_split()
    objective = FullSoftmaxConfig(normalize=True, temperature=1.0, learn_temperature=True)
    model = build_model("sasrec", num_items=NUM_ITEMS, max_len=16, learned_temperature=1.0)
    task = RetrievalTask(model, split, RetrievalTrainConfig(max_len=16, batch_size=48, loss=objective))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for epoch in range(20):
        for step in task.train_batches(epoch, np.random.default_rng(epoch)):
            optimizer.zero_grad()
            task.loss(model, step, torch.device("cpu")).backward()
            optimizer.step()
    scale = model.score_scale()
    assert scale is not None and float(scale.detach()) > 1.5  # cosine logits at T = 1 are too flat: T shrinks


def test_sharded_full_softmax_matches_one_process_and_in_batch_is_refused() -> None:
    split = _cyclic_split()
    torch.manual_seed(0)
    model = build_model("sasrec", num_items=NUM_ITEMS, max_len=16, dropout=0.0, normalize=False)
    train = RetrievalTrainConfig(max_len=16, batch_size=16, length_buckets=False, loss=FullSoftmaxConfig())
    inner = RetrievalTask(model, split, train)
    grads = []
    for world in (1, 2):
        total: dict[str, torch.Tensor] = {}
        for rank in range(world):
            task = ShardedRetrievalTask(inner, rank, world)
            step = next(iter(task.train_batches(1, np.random.default_rng(5))))
            assert step.negatives is None
            model.zero_grad()
            task.loss(model, step, torch.device("cpu")).backward()
            for name, p in model.named_parameters():
                if p.grad is not None:
                    total[name] = total.get(name, 0) + p.grad / world
        grads.append(total)
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, rtol=1e-4, atol=1e-6), name
    mixed = RetrievalTrainConfig(
        max_len=16,
        batch_size=16,
        loss=SampledSoftmaxConfig(negatives="mixed", normalize=False, temperature=1.0),
    )
    with pytest.raises(ValueError, match="uniform negatives only"):
        ShardedRetrievalTask(RetrievalTask(model, split, mixed), 0, 2)


def test_default_objective_keeps_registry_default_models_servable(tmp_path: Path) -> None:
    """loss None without model fields: the rule's full softmax on L2 vectors, so the model rebuilt from
    ``model_config(name, num_items, max_len)`` (what packaging does) is the trained one."""
    split = _cyclic_split()
    log = RunLog(tmp_path / "wh.duckdb")
    cfg = RetrievalTrainConfig(max_len=16, batch_size=16, ks=(1, 5))
    loop = LoopConfig(max_epochs=1, patience=1, monitor="ndcg@5", progress=False)
    result = train_retrieval(
        "sasrec",
        split,
        seed=0,
        train_config=cfg,
        loop_config=loop,
        checkpoint_dir=tmp_path / "c",
        run_log=log,
    )
    recorded = json.loads(log.runs("retrieval")["config"][0])["task"]
    assert recorded["train"]["loss"] == FullSoftmaxConfig(normalize=True, temperature=0.05).model_dump(
        mode="json"
    )
    assert recorded["model_config"]["normalize"] is True
    rebuilt = build_model("sasrec", model_config("sasrec", num_items=NUM_ITEMS, max_len=16))
    load_weights(rebuilt, weights_path(tmp_path / "c", "best"))  # strict: same parameters, same shapes
    assert result.test is not None
    raw = train_retrieval(
        "sasrec", split, seed=0, train_config=cfg, loop_config=loop, model_fields={"normalize": False}
    )
    assert raw.fit is not None and raw.test is not None
