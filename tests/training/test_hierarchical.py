"""Hierarchical asynchronous updates: sparse rows with this step's gradient, dense with the previous one's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from recsys.training.checkpoint import load_weights, weights_path
from recsys.training.hierarchical import HierarchicalUpdater, split_parameters
from recsys.training.loop import LoopConfig, OptimizerConfig, fit


class Tiny(nn.Module):
    """score(i) = w * e[i]: one embedding row (sparse) times one dense weight."""

    def __init__(self) -> None:
        super().__init__()
        self.e = nn.Embedding(3, 1)
        self.w = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.e.weight.copy_(torch.tensor([[1.0], [2.0], [3.0]]))
            self.w.weight.fill_(0.5)

    def forward(self, i: int) -> torch.Tensor:
        return self.w(self.e(torch.tensor([i]))).sum()


def sgd(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1)


def test_split_puts_embedding_tables_in_the_sparse_group() -> None:
    model = Tiny()
    sparse, dense = split_parameters(model)
    assert [p is model.e.weight for p in sparse] == [True]
    assert [p is model.w.weight for p in dense] == [True]


def test_update_rule_by_hand_with_sgd() -> None:
    # loss_k = w * e[i_k]: d/dw = e[i_k], d/de[i_k] = w (both at the weights step k's forward saw).
    model = Tiny()
    updater = HierarchicalUpdater(model, sgd)
    expected = [  # (e after the step, w after the step)
        ([1.0, 2.0 - 0.1 * 0.5, 3.0], 0.5),  # step 1: e[1] -= 0.1 * 0.5; w: no previous gradient
        ([1.0, 1.95, 3.0 - 0.1 * 0.5], 0.5 - 0.1 * 2.0),  # step 2: w uses g_1 = e_0[1] = 2
        ([1.0, 1.95 - 0.1 * 0.3, 2.95], 0.3 - 0.1 * 3.0),  # step 3: e[1] -= 0.1 * w_2; w uses g_2 = 3
    ]
    for i, (e, w) in zip([1, 2, 1], expected, strict=True):
        updater.zero_grad()
        model(i).backward()
        updater.step()
        np.testing.assert_allclose(model.e.weight.detach().flatten().numpy(), e, rtol=0, atol=1e-6)
        assert model.w.weight.item() == pytest.approx(w, abs=1e-6)
    updater.flush()  # the last step's dense gradient g_3 = e_2[1] = 1.95
    assert model.w.weight.item() == pytest.approx(0.0 - 0.1 * 1.95, abs=1e-6)


def test_differs_from_synchronous_sgd() -> None:
    sync, hier = Tiny(), Tiny()
    opt = torch.optim.SGD(sync.parameters(), lr=0.1)
    updater = HierarchicalUpdater(hier, sgd)
    for i in (1, 2):
        opt.zero_grad()
        sync(i).backward()
        opt.step()
        updater.zero_grad()
        hier(i).backward()
        updater.step()
    assert sync.w.weight.item() == pytest.approx(
        0.5 - 0.1 * 2.0 - 0.1 * 3.0, abs=1e-6
    )  # both gradients applied
    assert hier.w.weight.item() == pytest.approx(0.5 - 0.1 * 2.0, abs=1e-6)  # one step behind


def test_state_dict_round_trip_keeps_the_pending_gradient() -> None:
    a, b = Tiny(), Tiny()
    ua, ub = HierarchicalUpdater(a, sgd), HierarchicalUpdater(b, sgd)
    ua.zero_grad()
    a(1).backward()
    ua.step()
    b.load_state_dict(a.state_dict())
    ub.load_state_dict(ua.state_dict())
    for model, updater in ((a, ua), (b, ub)):
        updater.zero_grad()
        model(2).backward()
        updater.step()
    assert b.w.weight.item() == pytest.approx(a.w.weight.item()) == pytest.approx(0.3)


class TinyTask:
    def __init__(self) -> None:
        self.model = Tiny()

    def train_batches(self, epoch: int, rng: np.random.Generator) -> list[int]:
        return [1, 2, 1]

    def loss(self, model: nn.Module, batch: int, device: torch.device) -> torch.Tensor:
        return model(batch)

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        return {"score": -float(model.w.weight)}

    def flop_probe(self, model: nn.Module, device: torch.device):  # type: ignore[no-untyped-def]
        return (lambda: model(0)), 1


def test_loop_option_trains_with_the_rule_and_refuses_clipping() -> None:
    config = LoopConfig(
        max_epochs=1, monitor="score", progress=False, device="cpu", hierarchical_updates=True
    )
    task = TinyTask()
    fit(task, config)
    # AdamW's first step moves a weight by ~lr whatever the gradient's size: w moved once (g_1, g_2
    # applied at steps 2 and 3), not three times; e[2] once (step 2), e[1] twice (steps 1 and 3).
    assert task.model.w.weight.item() == pytest.approx(0.5 - 2e-3, abs=2e-4)
    clipped = config.model_copy(update={"optimizer": OptimizerConfig(grad_clip_norm=1.0)})
    with pytest.raises(ValueError, match="grad_clip_norm"):
        fit(TinyTask(), clipped)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = Tiny()
        updater = HierarchicalUpdater(model, sgd, distributed=True)
        for step in range(3):
            updater.zero_grad()
            model(SHARDS[step][rank]).backward()
            updater.step()
        updater.flush()
        if rank == 0:
            torch.save({k: v.clone() for k, v in model.state_dict().items()}, out)
    finally:
        dist.destroy_process_group()


SHARDS = [(0, 1), (2, 1), (1, 0)]  # step -> the example of rank 0 and of rank 1


def test_two_processes_average_gradients_as_one_process_would(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0.pt"
    mp.spawn(_ddp_worker, args=(2, port, str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    # One process on the mean of the two ranks' losses: the gradient the all-reduce averages to.
    model = Tiny()
    updater = HierarchicalUpdater(model, sgd)
    for a, b in SHARDS:
        updater.zero_grad()
        ((model(a) + model(b)) / 2).backward()
        updater.step()
    updater.flush()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=name)


def test_a_checkpointed_run_resumes_with_its_pending_gradient(tmp_path) -> None:  # type: ignore[no-untyped-def]
    def config(epochs: int) -> LoopConfig:
        return LoopConfig(
            max_epochs=epochs,
            patience=5,
            monitor="score",
            progress=False,
            device="cpu",
            hierarchical_updates=True,
        )

    straight = TinyTask()
    fit(straight, config(2), checkpoint_dir=tmp_path / "straight")
    resumed = TinyTask()
    fit(resumed, config(1), checkpoint_dir=tmp_path / "resumed")
    resumed = TinyTask()
    fit(resumed, config(2), checkpoint_dir=tmp_path / "resumed")  # trains on from epoch 1's last state
    last = {}
    for name in ("straight", "resumed"):
        model = Tiny()
        load_weights(model, weights_path(tmp_path / name, "last"))
        last[name] = model.state_dict()
    for key, value in last["straight"].items():
        torch.testing.assert_close(last["resumed"][key], value, rtol=0, atol=1e-7, msg=key)
