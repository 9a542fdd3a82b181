"""The generic training loop shared by retrieval, ranking and distillation.

A task (``TrainTask``) supplies batches, the loss and the validation metrics; the loop owns everything
else: seeding, the optimizer (AdamW; or hierarchical asynchronous updates, ``training.hierarchical``:
embedding tables with the step's gradient, dense parameters with the previous step's), device and bf16
autocast (CUDA only), tqdm progress, early stopping on one validation metric, checkpoints
(``training.checkpoint``) with resume, the one-time test evaluation of the best checkpoint, and the run
record in ``warehouse.runs.RunLog`` (config, data version, per-epoch metrics, wall time, parameter count,
FLOPs per example, hardware).

Reproducibility: every epoch re-seeds torch, numpy and ``random`` from (seed, epoch), so a run resumed
from its last checkpoint continues with the same random stream as one that never stopped.

Time to quality = training wall time (validation included) until the end of the epoch whose validation
metric was the best; it is what the experiment tables report.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import duckdb
import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from recsys.core.config import FrozenModel
from recsys.core.hashing import stable_hash
from recsys.training.checkpoint import (
    CheckpointError,
    has_checkpoint,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from recsys.training.checkpoint import weights_path as checkpoint_weights_path
from recsys.training.hierarchical import HierarchicalUpdater
from recsys.warehouse.runs import RunLog, dataset_of

T = TypeVar("T")
WAREHOUSE_LOCK_WAIT_S = 120.0


def record(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call a warehouse writer (a ``RunLog`` method), retrying while another process holds the file's lock.

    DuckDB lets one process write a database file at a time; the dashboard or another stage holding it for
    a moment must not kill a training run. Gives up (re-raises) after ``WAREHOUSE_LOCK_WAIT_S`` seconds.
    """
    delay, deadline = 0.2, time.monotonic() + WAREHOUSE_LOCK_WAIT_S
    while True:
        try:
            return call(*args, **kwargs)
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(2 * delay, 5.0)


class OptimizerConfig(FrozenModel):
    """AdamW; the defaults are the HSTU/SASRec public-benchmark settings."""

    lr: float = Field(1e-3, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip_norm: float | None = Field(
        None, gt=0.0, description="Clip the global gradient norm; None = off."
    )


class LoopConfig(FrozenModel):
    max_epochs: int = Field(100, ge=1)
    patience: int = Field(10, ge=1, description="Stop after this many validations without improvement.")
    eval_every: int = Field(1, ge=1, description="Validate every this many epochs (and after the last).")
    monitor: str = Field("ndcg@10", description="Validation metric that selects the checkpoint.")
    mode: Literal["max", "min"] = "max"
    min_delta: float = Field(0.0, ge=0.0, description="Improvement below this does not count.")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16_autocast: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU, which runs fp32).")
    optimizer: OptimizerConfig = OptimizerConfig()
    progress: bool = True
    resume: bool = Field(True, description="Continue from the last checkpoint in checkpoint_dir if any.")
    hierarchical_updates: bool = Field(
        False,
        description="Embedding tables updated with this step's gradient, the other (dense) parameters with "
        "the previous step's (training.hierarchical): under DDP their all-reduce overlaps the next step.",
    )


class TrainTask(Protocol):
    """What a task hands the loop. ``model`` is a pure nn.Module; the task moves batches to ``device``."""

    model: nn.Module

    def train_batches(self, epoch: int, rng: np.random.Generator) -> Iterable[Any]: ...

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor: ...

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]: ...

    def flop_probe(self, model: nn.Module, device: torch.device) -> tuple[Callable[[], Any], int]:
        """A callable running one forward pass on a representative batch, and that batch's example count."""
        ...


@dataclass
class FitResult:
    run_id: str | None
    best_epoch: int
    best_metric: float
    best_valid: dict[str, float]
    epochs_run: int
    stopped_early: bool
    time_to_quality_s: float
    train_time_s: float
    num_parameters: int
    flops_per_example: float
    history: list[dict[str, float]] = field(default_factory=list)
    test_metrics: dict[str, float] | None = None
    checkpoint_dir: Path | None = None

    def run_figures(self) -> dict[str, Any]:
        """The fields every per-run result (retrieval, ranking, distilled) copies from the fit."""
        return {
            "valid": self.best_valid,
            "num_parameters": self.num_parameters,
            "flops_per_example": self.flops_per_example,
            "train_time_s": self.train_time_s,
            "time_to_quality_s": self.time_to_quality_s,
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "run_id": self.run_id,
            "fit": self,
        }


def build_optimizer(model: nn.Module, config: OptimizerConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the model's parameters; on CPU and CUDA the fused kernel (the same update, one pass over
    all tensors: a ranking model's optimiser step costs ~4x less CPU than the per-tensor loop)."""
    return adamw(model.parameters(), config, device)


def adamw(params: Iterable[nn.Parameter], config: OptimizerConfig, device: torch.device) -> torch.optim.AdamW:
    """``build_optimizer``'s AdamW over the given parameters (e.g. one group of hierarchical updates)."""
    return torch.optim.AdamW(
        params,
        lr=config.lr,
        betas=config.betas,
        weight_decay=config.weight_decay,
        fused=device.type in ("cpu", "cuda"),
    )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but no CUDA device is available")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy's legacy global state and ``random``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(stable_hash("epoch-seed", seed, epoch), 16) % 2**63


def loop_key(config: LoopConfig) -> dict[str, Any]:
    """The loop settings that change what a run trains, as they enter checkpoint keys: display and resume
    switches do not, and a higher epoch cap only continues a run (so a re-run finds its finished runs);
    ``hierarchical_updates`` only when on, so checkpoints written before the option existed still resume."""
    skip = {"progress", "resume", "max_epochs"}
    if not config.hierarchical_updates:
        skip.add("hierarchical_updates")
    return config.model_dump(mode="json", exclude=skip)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops_per_example(probe: Callable[[], Any], examples: int) -> float:
    """Forward FLOPs per example counted by torch.utils.flop_counter (matmul-class ops only)."""
    if examples <= 0:
        return 0.0
    with FlopCounterMode(display=False) as counter:
        probe()
    return counter.get_total_flops() / examples


def _improved(value: float, best: float, mode: str, min_delta: float) -> bool:
    if math.isnan(value):
        return False
    if math.isnan(best):
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


def fit(
    task: TrainTask,
    config: LoopConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    run_log: RunLog | None = None,
    run_kind: str = "train",
    run_name: str = "model",
    run_config: dict[str, Any] | None = None,
    data_version: str | None = None,
    protocol: str | None = None,
    test_fn: Callable[[nn.Module, torch.device], dict[str, float]] | None = None,
    dataset: str | None = None,
) -> FitResult:
    """Train ``task.model`` in place; on return it holds the best-validation weights.

    ``test_fn`` (if given) is called once on the best weights and its metrics are logged with split 'test'.
    A checkpoint directory that already holds a finished run returns that run (best weights, stored history)
    after re-reading the test metrics, unless it ended at a lower ``max_epochs`` than asked now: then it
    trains on from its last epoch. One built under a different config is an error. The run is recorded
    with ``dataset``, by default the ``dataset`` of ``run_config``.
    """
    device = resolve_device(config.device)
    model = task.model.to(device)
    opt_cfg = config.optimizer
    optimizer: Any
    if config.hierarchical_updates:
        if opt_cfg.grad_clip_norm is not None:
            raise ValueError(
                "optimizer.grad_clip_norm: not with hierarchical_updates (the sparse and dense gradients "
                "applied at a step belong to different steps)"
            )
        optimizer = HierarchicalUpdater(model, lambda params: adamw(params, opt_cfg, device))
    else:
        optimizer = build_optimizer(model, opt_cfg, device)
    full_config = {
        "loop": loop_key(config),
        "task": run_config or {},
    }
    config_key = stable_hash(full_config)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None

    state: dict[str, Any] = {
        "config_key": config_key,
        "epoch": 0,
        "best_metric": float("nan"),
        "best_epoch": 0,
        "best_valid": {},
        "bad_evals": 0,
        "elapsed_s": 0.0,
        "time_to_quality_s": 0.0,
        "history": [],
        "finished": False,
        "stopped_early": False,
        "run_id": None,
        "flops_per_example": None,
    }
    if ckpt is not None and config.resume and has_checkpoint(ckpt, "last"):
        saved = load_checkpoint(ckpt, "last", model, optimizer)
        if saved.get("config_key") != config_key:
            raise CheckpointError(
                f"checkpoint in {ckpt} was written under a different config; use another directory or "
                "resume=False"
            )
        state.update(saved)
        if state["finished"] and not state["stopped_early"] and state["epoch"] < config.max_epochs:
            state["finished"] = False  # it stopped at a lower epoch cap: train on up to the new one

    num_params = count_parameters(model)
    if state["flops_per_example"] is None:
        model.eval()
        with torch.no_grad(), _autocast(device, config):
            probe, examples = task.flop_probe(model, device)
            state["flops_per_example"] = count_flops_per_example(probe, examples)

    if state["finished"]:
        if ckpt is not None and has_checkpoint(ckpt, "best"):
            load_weights(model, checkpoint_weights_path(ckpt, "best"))
        test_metrics = test_fn(model, device) if test_fn is not None else None
        return _result(state, num_params, ckpt, test_metrics)

    run_id = state["run_id"]
    if run_log is not None and run_id is None:
        run_id = record(
            run_log.start,
            run_kind,
            run_name,
            config=full_config,
            data_version=data_version,
            protocol=protocol,
            seed=config.seed,
            dataset=dataset if dataset is not None else dataset_of(run_config or {}),
        )
        state["run_id"] = run_id
    best_state: dict[str, torch.Tensor] | None = None
    try:
        # A run that stopped early but crashed before its final save must not train on.
        first = config.max_epochs + 1 if state["stopped_early"] else state["epoch"] + 1
        bar = tqdm(
            range(first, config.max_epochs + 1),
            desc=run_name,
            disable=not config.progress,
            leave=False,
        )
        for epoch in bar:
            started = time.perf_counter()
            epoch_seed = _epoch_seed(config.seed, epoch)
            seed_everything(epoch_seed)
            rng = np.random.default_rng(epoch_seed)
            model.train()
            total, batches = 0.0, 0
            for batch in task.train_batches(epoch, rng):
                with _autocast(device, config):
                    loss = task.loss(model, batch, device)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"epoch {epoch}: the training loss is {loss.item()}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if opt_cfg.grad_clip_norm is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.grad_clip_norm)
                optimizer.step()
                total += float(loss.detach())
                batches += 1
            row: dict[str, float] = {"epoch": float(epoch), "train_loss": total / max(batches, 1)}
            validate_now = epoch % config.eval_every == 0 or epoch == config.max_epochs
            valid: dict[str, float] = {}
            if validate_now:
                model.eval()
                with torch.no_grad(), _autocast(device, config):
                    valid = task.validate(model, device)
                if config.monitor not in valid:
                    raise KeyError(
                        f"monitor {config.monitor!r} is not among the validation metrics {sorted(valid)}"
                    )
            state["elapsed_s"] += time.perf_counter() - started
            row["elapsed_s"] = state["elapsed_s"]
            row.update({f"valid/{k}": v for k, v in valid.items()})
            state["history"].append(row)
            state["epoch"] = epoch
            if validate_now:
                value = float(valid[config.monitor])
                if _improved(value, state["best_metric"], config.mode, config.min_delta):
                    state.update(
                        best_metric=value,
                        best_epoch=epoch,
                        best_valid=dict(valid),
                        bad_evals=0,
                        time_to_quality_s=state["elapsed_s"],
                    )
                    if ckpt is not None:
                        save_checkpoint(ckpt, "best", model)
                    else:
                        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    state["bad_evals"] += 1
            if run_log is not None and run_id is not None:
                record(
                    run_log.log_metrics,
                    run_id,
                    {"loss": row["train_loss"], "elapsed_s": row["elapsed_s"]},
                    step=epoch,
                    split="train",
                )
                if valid:
                    record(run_log.log_metrics, run_id, valid, step=epoch, split="valid")
            stop = validate_now and state["bad_evals"] >= config.patience
            state["stopped_early"] = stop
            state["finished"] = stop or epoch == config.max_epochs
            if ckpt is not None:
                # "finished" is written once, after the loop.
                save_checkpoint(ckpt, "last", model, optimizer, {**state, "finished": False})
            bar.set_postfix(loss=f"{row['train_loss']:.4f}", best=f"{state['best_metric']:.4f}")
            if stop:
                break
        bar.close()
        state["finished"] = True
        if ckpt is not None:  # the last epoch's weights, so that a higher epoch cap can train on from them
            save_checkpoint(ckpt, "last", model, optimizer, state)

        if ckpt is not None and has_checkpoint(ckpt, "best"):
            load_weights(model, checkpoint_weights_path(ckpt, "best"))
        elif best_state is not None:
            model.load_state_dict(best_state)
        test_metrics = None
        if test_fn is not None:
            model.eval()
            with torch.no_grad(), _autocast(device, config):
                test_metrics = test_fn(model, device)
        result = _result(state, num_params, ckpt, test_metrics)
        if run_log is not None and run_id is not None:
            if test_metrics:
                record(run_log.log_metrics, run_id, test_metrics, step=state["best_epoch"], split="test")
            record(run_log.finish, run_id, metrics=_summary(result))
        return result
    except BaseException as exc:
        if run_log is not None and run_id is not None:
            with contextlib.suppress(Exception):  # never hide the original error behind a logging one
                record(run_log.finish, run_id, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise


def _autocast(device: torch.device, config: LoopConfig) -> torch.autocast:
    enabled = device.type == "cuda" and config.bf16_autocast
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _result(
    state: dict[str, Any], num_params: int, ckpt: Path | None, test: dict[str, float] | None
) -> FitResult:
    return FitResult(
        run_id=state["run_id"],
        best_epoch=int(state["best_epoch"]),
        best_metric=float(state["best_metric"]),
        best_valid=dict(state["best_valid"]),
        epochs_run=int(state["epoch"]),
        stopped_early=bool(state["stopped_early"]),
        time_to_quality_s=float(state["time_to_quality_s"]),
        train_time_s=float(state["elapsed_s"]),
        num_parameters=num_params,
        flops_per_example=float(state["flops_per_example"] or 0.0),
        history=list(state["history"]),
        test_metrics=test,
        checkpoint_dir=ckpt,
    )


def _summary(result: FitResult) -> dict[str, Any]:
    out: dict[str, Any] = {
        "best_epoch": result.best_epoch,
        "best_valid_metric": result.best_metric,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "time_to_quality_s": result.time_to_quality_s,
        "train_time_s": result.train_time_s,
        "num_parameters": result.num_parameters,
        "flops_per_example": result.flops_per_example,
    }
    out.update({f"valid/{k}": v for k, v in result.best_valid.items()})
    out.update({f"test/{k}": v for k, v in (result.test_metrics or {}).items()})
    return out
