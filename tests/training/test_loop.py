"""The generic loop: early stopping, best-checkpoint restore, exact resume after a crash, run records."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest
import torch
from torch import nn

from recsys.training.checkpoint import CheckpointError
from recsys.training.loop import LoopConfig, fit, record
from recsys.warehouse.runs import RunLog


class ToyTask:
    """Regress y = 3x with a linear model; the validation metric can be scripted per epoch."""

    def __init__(self, scripted: list[float] | None = None, crash_at: int | None = None) -> None:
        torch.manual_seed(0)
        self.model = nn.Linear(1, 1)
        self.scripted = scripted
        self.crash_at = crash_at
        self.validations = 0
        self.x = torch.linspace(-1, 1, 32).unsqueeze(1)

    def train_batches(self, epoch: int, rng: np.random.Generator) -> Iterator[torch.Tensor]:
        if self.crash_at is not None and epoch == self.crash_at:
            raise RuntimeError("simulated crash")
        order = torch.from_numpy(rng.permutation(32))
        for start in range(0, 32, 8):
            yield self.x[order[start : start + 8]]

    def loss(self, model: nn.Module, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
        noise = 0.01 * torch.randn_like(batch)  # uses the global RNG: resume must reproduce it
        return ((model(batch) - 3 * batch - noise) ** 2).mean()

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        self.validations += 1
        if self.scripted is not None:
            return {"score": self.scripted[self.validations - 1]}
        return {"score": -float(((model(self.x) - 3 * self.x) ** 2).mean())}

    def flop_probe(self, model: nn.Module, device: torch.device) -> tuple[Callable[[], Any], int]:
        return (lambda: model(self.x)), 32


def _config(**kw: Any) -> LoopConfig:
    return LoopConfig(**{"max_epochs": 6, "patience": 2, "monitor": "score", "progress": False, **kw})


def test_early_stopping_restores_the_best_epoch(tmp_path: Path) -> None:
    task = ToyTask(scripted=[0.1, 0.5, 0.4, 0.45, 0.9, 0.9])
    result = fit(task, _config(), checkpoint_dir=tmp_path)
    assert result.best_epoch == 2 and result.best_metric == 0.5
    assert result.epochs_run == 4 and result.stopped_early
    assert result.time_to_quality_s == pytest.approx(result.history[1]["elapsed_s"])
    assert result.num_parameters == 2 and result.flops_per_example == pytest.approx(2.0)


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    straight_task = ToyTask()
    straight = fit(straight_task, _config(patience=10), checkpoint_dir=tmp_path / "a")
    initial = ToyTask().model.weight.detach().clone()

    crashing = ToyTask(crash_at=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(crashing, _config(patience=10), checkpoint_dir=tmp_path / "b")
    resumed_task = ToyTask()
    resumed = fit(resumed_task, _config(patience=10), checkpoint_dir=tmp_path / "b")
    assert resumed.epochs_run == 6 and resumed.best_epoch == straight.best_epoch
    assert [h["train_loss"] for h in resumed.history] == pytest.approx(
        [h["train_loss"] for h in straight.history]
    )
    assert not torch.allclose(resumed_task.model.weight, initial)  # it did train
    torch.testing.assert_close(resumed_task.model.state_dict(), straight_task.model.state_dict())

    again = fit(ToyTask(), _config(patience=10), checkpoint_dir=tmp_path / "b")  # finished: nothing retrains
    assert again.history == resumed.history
    with pytest.raises(CheckpointError, match="different config"):
        fit(ToyTask(), _config(patience=9), checkpoint_dir=tmp_path / "b")


def test_a_higher_epoch_cap_continues_a_finished_run(tmp_path: Path) -> None:
    script = [0.9, 0.1, 0.1, 0.1, 0.1]  # the best epoch (1) is not the last: training must go on from epoch 3
    straight = fit(ToyTask(script), _config(max_epochs=5, patience=10), checkpoint_dir=tmp_path / "a")
    fit(ToyTask(script), _config(max_epochs=3, patience=10), checkpoint_dir=tmp_path / "b")
    extended = fit(ToyTask(script[3:]), _config(max_epochs=5, patience=10), checkpoint_dir=tmp_path / "b")
    assert extended.epochs_run == 5 and extended.best_epoch == 1
    assert [h["train_loss"] for h in extended.history] == pytest.approx(
        [h["train_loss"] for h in straight.history]
    )


def test_runs_are_recorded(tmp_path: Path) -> None:
    log = RunLog(tmp_path / "wh.duckdb")
    result = fit(
        ToyTask(),
        _config(max_epochs=3),
        run_log=log,
        run_name="toy",
        data_version="v1",
        test_fn=lambda m, d: {"score": 1.0},
    )
    runs = log.runs("train")
    assert runs["name"].to_list() == ["toy"] and runs["status"].to_list() == ["finished"]
    assert runs["data_version"].to_list() == ["v1"] and runs["hardware"][0]
    metrics = log.metrics(result.run_id)
    assert set(metrics["split"].unique()) == {"train", "valid", "test"}
    assert metrics.filter(metrics["split"] == "valid").height == 3

    with pytest.raises(RuntimeError):
        fit(ToyTask(crash_at=2), _config(), run_log=log, run_name="crash")
    crashed = log.runs("train").filter(log.runs("train")["name"] == "crash")
    assert crashed["status"].to_list() == ["failed"] and "simulated crash" in crashed["error"][0]


def test_monitor_must_be_a_validation_metric() -> None:
    with pytest.raises(KeyError, match="monitor 'ndcg@10'"):
        fit(ToyTask(), _config(monitor="ndcg@10"))


def test_record_waits_for_the_warehouse_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("recsys.training.loop.time.sleep", lambda s: None)
    calls = []

    def flaky(x: int) -> int:
        calls.append(x)
        if len(calls) < 3:
            raise duckdb.IOException('Could not set lock on file "w.duckdb": Conflicting lock is held')
        return x * 2

    assert record(flaky, 21) == 42 and len(calls) == 3

    def broken() -> None:
        raise duckdb.IOException("disk full")

    with pytest.raises(duckdb.IOException, match="disk full"):
        record(broken)
