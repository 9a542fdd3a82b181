"""DDP training: 2 torchrun processes (gloo, CPU) reproduce the 1-process run of the same entry point."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from recsys.features.config import FeatureConfig
from recsys.features.export import export_features
from recsys.features.point_in_time import build_examples
from recsys.features.splits import build_split_loo
from recsys.models.losses import SampledSoftmaxConfig
from recsys.models.registry import build_model
from recsys.training.checkpoint import load_weights
from recsys.training.distributed import RESULT, WEIGHTS, ShardedRetrievalTask, load_split, torchrun_command
from recsys.training.retrieval import RetrievalTask, RetrievalTrainConfig
from tests.conftest import REPO_ROOT
from tests.features.conftest import publish_dataset, random_events

EMBED, MAX_LEN, BATCH = 16, 20, 16
TRAIN = RetrievalTrainConfig(
    max_len=MAX_LEN, batch_size=BATCH, loss=SampledSoftmaxConfig(num_negatives=16), length_buckets=False
)
# Stated tolerance (training/distributed.py): weights after 12 AdamW steps within 1e-5, scores within 1e-4.
WEIGHT_TOL, SCORE_TOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real feature export of 96 users / 50 items (2,000 rating events)."""
    from recsys.warehouse import Warehouse

    root = tmp_path_factory.mktemp("ddp")
    config = FeatureConfig(max_seq_len=MAX_LEN)
    with Warehouse(root / "w.duckdb") as wh:
        publish_dataset(wh, "tiny", random_events(2_000, 96, 50, seed=0))
        build_examples(wh, "tiny", config)
        build_split_loo(wh, "tiny", config)
        return export_features(wh, "tiny", config, root=root / "exports")


def _task(export_dir: Path, train: RetrievalTrainConfig = TRAIN) -> RetrievalTask:
    split, _ = load_split(export_dir)
    torch.manual_seed(0)
    model = build_model(
        "sasrec", num_items=split.num_items, max_len=MAX_LEN, dropout=0.0, embedding_dim=EMBED
    )
    return RetrievalTask(model, split, train)


def test_shards_average_to_the_single_process_gradient(export_dir: Path) -> None:
    inner = _task(export_dir)
    model = inner.model

    def gradient(world: int) -> dict[str, torch.Tensor]:
        total: dict[str, torch.Tensor] = {}
        for rank in range(world):
            task = ShardedRetrievalTask(inner, rank, world)
            step = next(iter(task.train_batches(1, np.random.default_rng(5))))
            assert step.batch.items.shape[0] == BATCH // world
            model.zero_grad()
            task.loss(model, step, torch.device("cpu")).backward()
            for name, p in model.named_parameters():  # what DDP's all-reduce does: the mean over ranks
                total[name] = total.get(name, 0) + p.grad / world
        return total

    one, two = gradient(1), gradient(2)
    for name, g in one.items():
        assert torch.allclose(two[name], g, rtol=1e-4, atol=1e-6), name
    assert max(g.abs().max().item() for g in one.values()) > 1e-3  # a real gradient, not zeros


def test_bad_sharding_is_named(export_dir: Path) -> None:
    inner = _task(export_dir)
    with pytest.raises(ValueError, match="batch_size 16 .* divisible by the 3 ranks"):
        ShardedRetrievalTask(inner, 0, 3)
    with pytest.raises(ValueError, match="rank 2 is outside world_size 2"):
        ShardedRetrievalTask(inner, 2, 2)
    big = _task(export_dir, TRAIN.model_copy(update={"batch_size": 1_024}))
    with pytest.raises(ValueError, match="exceeds the 96 training windows"):
        ShardedRetrievalTask(big, 0, 1)


def test_torchrun_two_processes_match_one_process(export_dir: Path, tmp_path: Path) -> None:
    args = [
        "--model", "sasrec", "--export-dir", str(export_dir), "--epochs", "2", "--eval-every", "2",
        "--batch-size", str(BATCH), "--max-len", str(MAX_LEN), "--num-negatives", "16", "--dropout", "0",
        "--embedding-dim", str(EMBED), "--device", "cpu", "--seed", "3",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {
        n: subprocess.Popen(
            torchrun_command(n, [*args, "--out", str(tmp_path / f"n{n}")]),
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for n in (1, 2)
    }
    for n, proc in runs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"nproc {n}:\n{out[-4000:]}"
    res = {n: json.loads((tmp_path / f"n{n}" / RESULT).read_text()) for n in (1, 2)}
    assert (res[1]["world_size"], res[2]["world_size"]) == (1, 2)
    assert res[1]["steps"] == res[2]["steps"] == 2 * (96 // BATCH)
    assert res[2]["backend"] == "gloo"
    assert res[2]["train_loss"] == pytest.approx(res[1]["train_loss"], rel=1e-5)
    assert res[2]["test"]["ndcg@10"] == pytest.approx(res[1]["test"]["ndcg@10"], abs=1e-6)

    w1, w2 = (load_file(str(tmp_path / f"n{n}" / WEIGHTS)) for n in (1, 2))
    assert w1.keys() == w2.keys()
    initial = _task(export_dir).model.state_dict()
    assert max((w1[k] - initial[k]).abs().max().item() for k in w1) > 1e-3  # it trained
    for name, a in w1.items():
        diff = (a - w2[name]).abs()
        if name.endswith("attention.kv.bias"):
            # The key bias shifts every attention logit of a query equally: its true gradient is 0, so
            # AdamW turns float noise into steps of up to lr. It cannot change any output (checked below).
            diff = diff[EMBED:]
        assert diff.max().item() < WEIGHT_TOL, name

    # Same model function: the validation scores of both runs agree.
    models = []
    for n in (1, 2):
        task = _task(export_dir)
        load_weights(task.model, tmp_path / f"n{n}" / WEIGHTS)
        task.model.eval()
        models.append(task)
    cases = models[0].split.valid
    batch = cases.batch(np.arange(len(cases)), MAX_LEN)
    with torch.no_grad():
        s1, s2 = (t.score_fn(t.model)(batch) for t in models)
    assert (s1 - s2).abs().max().item() < SCORE_TOL
