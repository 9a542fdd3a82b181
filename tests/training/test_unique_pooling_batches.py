"""GPU pooling of unique ids wired into the ranking trainer: deduplicated batches (unique ids + inverse
index, made on the host) give the model outputs of the padded id tensors, with fewer id bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from recsys.experiments.ranking import build_model
from recsys.training.ranking import RankingTask, RankingTrainConfig, load_ranking_data, predict
from recsys.warehouse import Warehouse

MAX_LEN = 32


def _data(path: Path):  # type: ignore[no-untyped-def]
    with Warehouse(path) as wh:
        return load_ranking_data(wh, "syn")


def test_pooled_and_padded_batches_give_identical_hyformer_outputs(synthetic_wh: Path) -> None:
    data = _data(synthetic_wh)
    torch.manual_seed(0)
    model, _ = build_model("hyformer", data, MAX_LEN)
    model.eval()
    plain = RankingTask(model, data, RankingTrainConfig(max_len=MAX_LEN, batch_size=64), seed=0)
    pooled = RankingTask(
        model, data, RankingTrainConfig(max_len=MAX_LEN, batch_size=64, unique_pooling=True), seed=0
    )
    a_batches = list(plain.train_batches(1, np.random.default_rng(3)))
    b_batches = list(pooled.train_batches(1, np.random.default_rng(3)))
    assert len(a_batches) == len(b_batches) > 1
    id_bytes = {"padded": 0, "pooled": 0}
    for a, b in zip(a_batches, b_batches, strict=True):
        sa, sb = a.sequences["history"], b.sequences["history"]
        assert not sa.is_deduplicated and sb.is_deduplicated
        assert sa.item_ids is not None and sb.unique_ids is not None and sb.inverse is not None
        # The inverse index rebuilds the padded ids exactly.
        with_padding = torch.cat([torch.zeros(1, dtype=torch.int64), sb.unique_ids])  # -1 -> row 0 = id 0
        rebuilt = with_padding[sb.inverse.long() + 1]
        assert torch.equal(rebuilt, sa.item_ids)
        id_bytes["padded"] += sa.item_ids.nbytes
        id_bytes["pooled"] += sb.unique_ids.nbytes + sb.inverse.nbytes
        with torch.no_grad():
            la, lb = model(a).logits, model(b).logits
        for task in la:
            torch.testing.assert_close(lb[task], la[task], rtol=0, atol=1e-6)
    assert id_bytes["pooled"] < id_bytes["padded"]
    # Training losses and gradients agree too (the table's gradient lands on the same rows).
    model.train()
    a, b = a_batches[0], b_batches[0]
    grads = []
    for batch, task in ((a, plain), (b, pooled)):
        model.zero_grad()
        task.loss(model, batch, torch.device("cpu")).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_predict_with_unique_pooling_gives_the_same_probabilities(synthetic_wh: Path) -> None:
    data = _data(synthetic_wh)
    torch.manual_seed(0)
    model, _ = build_model("hyformer", data, MAX_LEN)
    cpu = torch.device("cpu")
    plain = predict(model, data, "test", MAX_LEN, cpu, batch_size=64)
    pooled = predict(model, data, "test", MAX_LEN, cpu, batch_size=64, unique_pooling=True)
    for task in plain:
        np.testing.assert_allclose(pooled[task], plain[task], rtol=0, atol=1e-6)
