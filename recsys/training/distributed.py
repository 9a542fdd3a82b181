"""Retrieval training with torch DistributedDataParallel, launched by torchrun (gloo on CPU, NCCL on GPU).

``python -m torch.distributed.run --standalone --nproc_per_node 2 -m recsys.training.distributed
--model sasrec --dataset synthetic --out var/artifacts/ddp`` (``torchrun`` is the same command); without
torchrun it runs as one process. Rank 0 writes ``weights.safetensors`` (``training.checkpoint.save_weights``)
and ``result.json`` (final loss, validation and test metrics, world size, steps) into ``--out``.

The task code is ``training.retrieval``'s (windows, padded batches, ``objective_loss``) and the loop
is ``training.loop.fit`` (per-epoch seeding, AdamW, validation, early stopping, test evaluation); this module
adds only what makes N processes compute the single-process update:

- Sharding: every rank draws the same global batch of ``batch_size`` windows (fit seeds each epoch's rng
  from the seed alone) and keeps windows ``rank, rank + W, ...`` (DistributedSampler-style). Only full
  global batches are trained on (drop_last), so 2 ranks x B/2 windows are exactly the 1-process batch B.
- Loss scaling: ranks hold different numbers of supervised positions, and DDP averages gradients, so rank
  r's loss is ``mean_r * p_r * W / P`` (P = positions of the global batch): the average over ranks is the
  global mean over positions, the single-process loss.
- Negatives: drawn per window from a generator seeded by the global batch's rng, so a window gets the same
  negatives whichever rank holds it. Objectives: full softmax (no negatives), uniform sampled softmax and
  gBCE; in-batch and mixed negatives are refused (a rank sees only its shard of the batch's positives).

Result: with the same seed and global batch, W processes give the single-process weights up to float
summation order (measured in README; tests/training/test_distributed.py asserts max |diff| < 1e-4 after 12
steps). Two things break the equality by design: dropout (each rank draws its own masks: equal in
distribution only; use ``--dropout 0`` to compare) and GPU vs CPU arithmetic.

OPEN choices and what was picked: validation and the test evaluation run on every rank (identical weights,
identical metrics, so early stopping stops every rank at the same epoch; sharding them would save compute
but needs a gather); no length buckets (one padded batch per rank keeps the position order the negatives
are indexed by); checkpoints/resume are off (fit's checkpoint files are per process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import torch.distributed as dist
import typer
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from recsys.core.atomic import atomic_path
from recsys.core.config import PathsConfig
from recsys.evaluation.retrieval import LeaveOneOutSplit, leave_one_out
from recsys.features.export import latest_export, read_manifest, read_sequences
from recsys.models.losses import FullSoftmaxConfig, SampledSoftmaxConfig, sample_uniform_negatives
from recsys.models.registry import build_model, entry, model_config
from recsys.training.checkpoint import save_weights
from recsys.training.loop import LoopConfig, OptimizerConfig, fit, resolve_device, seed_everything
from recsys.training.retrieval import (
    RetrievalTask,
    RetrievalTrainConfig,
    TrainBatch,
    model_fields_for,
    objective_loss,
    rule_objective,
)
from recsys.warehouse.runs import RunLog

WEIGHTS = "weights.safetensors"
RESULT = "result.json"


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: one process, no process group


def init_distributed(device: str = "auto") -> DistEnv:
    """The process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):
    NCCL when the device is CUDA, else gloo. Without torchrun's variables: one process, no group."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistEnv(0, 1, 0, resolve_device(device), None)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(minutes=10))
    return DistEnv(rank, world, local_rank, dev, backend)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


@dataclass(frozen=True)
class ShardStep:
    """One rank's part of a global batch."""

    batch: TrainBatch  # this rank's windows, one padded batch, rows in global-batch order
    negatives: (
        torch.Tensor | None
    )  # [p_r, K]: row i is the i-th supervised position's (row-major); None: full
    global_positions: int  # P: supervised positions of the whole global batch


class ShardedRetrievalTask:
    """``training.loop.TrainTask`` over a ``RetrievalTask``: rank ``rank`` of ``world_size`` trains on its
    shard of every global batch, with the loss scaled so that DDP's gradient average is the global mean."""

    def __init__(self, inner: RetrievalTask, rank: int, world_size: int, model: nn.Module | None = None):
        cfg = inner.config
        if cfg.stochastic_length_alpha is not None:
            raise ValueError("stochastic_length_alpha: not supported by distributed training (set it None)")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if cfg.batch_size % world_size:
            raise ValueError(
                f"batch_size {cfg.batch_size} (the global batch) must be divisible by the {world_size} ranks"
            )
        if len(inner.windows) < cfg.batch_size:
            raise ValueError(
                f"batch_size {cfg.batch_size} exceeds the {len(inner.windows)} training windows: no full"
                " global batch to train on"
            )
        objective = inner.objective
        if isinstance(objective, SampledSoftmaxConfig) and objective.negatives != "uniform":
            raise ValueError(
                f"loss.negatives {objective.negatives!r}: distributed training takes uniform negatives only"
            )
        self.num_negatives = None if isinstance(objective, FullSoftmaxConfig) else objective.num_negatives
        self.inner, self.rank, self.world_size = inner, rank, world_size
        self.model = model if model is not None else inner.model

    def steps_per_epoch(self) -> int:
        return len(self.inner.windows) // self.inner.config.batch_size

    def train_batches(self, epoch: int, rng: np.random.Generator) -> Iterator[ShardStep]:
        cfg, windows = self.inner.config, self.inner.windows
        order = rng.permutation(len(windows))  # the same on every rank: fit seeds rng from (seed, epoch)
        b = cfg.batch_size
        for start in range(0, len(order) - b + 1, b):  # full global batches only (drop_last)
            chosen = [windows[i] for i in order[start : start + b]]
            seeds = rng.integers(0, 2**63 - 1, size=b)  # drawn by every rank: the rng streams stay equal
            mine = range(self.rank, b, self.world_size)
            k = self.num_negatives
            negatives = [
                sample_uniform_negatives(
                    self.inner.split.num_items,
                    (len(chosen[g][0]) - 1, k),
                    generator=torch.Generator().manual_seed(int(seeds[g])),
                )
                for g in mine
                if k is not None
            ]
            yield ShardStep(
                batch=self.inner.make_batch([chosen[g] for g in mine]),
                negatives=torch.cat(negatives) if k is not None else None,
                global_positions=sum(len(w) - 1 for w, _ in chosen),
            )

    def loss(self, model: nn.Module, step: ShardStep, device: torch.device) -> torch.Tensor:
        part = step.batch.to(device)
        users = model(part.items, part.ts, part.query_ts, part.lengths)  # [b, n, D], through DDP
        supervised = part.targets != 0
        user, positives = users[supervised], part.targets[supervised]  # row-major: the negatives' order
        negatives = step.negatives.to(device) if step.negatives is not None else None
        mean = objective_loss(
            self.inner.objective,
            unwrap(model),
            user,
            positives,
            self.inner.split.num_items,
            negatives=negatives,
        )
        return mean * (user.shape[0] * self.world_size / step.global_positions)

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        return self.inner.validate(unwrap(model), device)

    def flop_probe(self, model: nn.Module, device: torch.device) -> tuple[Callable[[], Any], int]:
        return self.inner.flop_probe(unwrap(model), device)


def load_split(export_dir: Path) -> tuple[LeaveOneOutSplit, str]:
    """The leave-one-out split of an export's sequences, and the export version."""
    manifest = read_manifest(export_dir)
    return leave_one_out(read_sequences(export_dir), int(manifest["n_items"])), str(manifest["version"])


def _all_mean(values: list[float], env: DistEnv) -> list[float]:
    if env.backend is None or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return (t / env.world_size).tolist()


def train_distributed(
    model_name: str,
    export_dir: Path,
    out: Path,
    *,
    train_config: RetrievalTrainConfig,
    loop_config: LoopConfig,
    model_fields: dict[str, Any] | None = None,
    run_log: Path | None = None,
) -> dict[str, Any]:
    """Train on this process's rank (torchrun env, or alone); rank 0 writes weights and result.json."""
    if entry(model_name).task != "retrieval" or model_name == "popularity":
        raise ValueError(f"--model {model_name!r}: distributed training takes a sequential retrieval model")
    env = init_distributed(loop_config.device)
    try:
        split, data_version = load_split(export_dir)
        if train_config.loss is None:  # the data's rule, recorded explicitly in the run's config
            normalize = bool((model_fields or {}).get("normalize", True))
            train_config = train_config.model_copy(update={"loss": rule_objective(split, normalize)})
        assert train_config.loss is not None
        fields = {
            "num_items": split.num_items,
            "max_len": train_config.max_len,
            **model_fields_for(train_config.loss),
            **(model_fields or {}),
        }
        mconfig = model_config(model_name, **fields)
        seed_everything(loop_config.seed)
        inner = RetrievalTask(build_model(model_name, mconfig), split, train_config)
        module = inner.model.to(env.device)
        ddp: nn.Module = module
        if env.backend is not None:
            ddp = DistributedDataParallel(
                module, device_ids=[env.local_rank] if env.device.type == "cuda" else None
            )
        task = ShardedRetrievalTask(inner, env.rank, env.world_size, ddp)
        run_config = {
            "model": model_name,
            "model_config": mconfig.model_dump(mode="json"),
            "train": train_config.model_dump(mode="json"),
            "world_size": env.world_size,
        }
        test: dict[str, float] = {}

        def test_fn(m: nn.Module, device: torch.device) -> dict[str, float]:
            test.update(inner.evaluate(unwrap(m), split.test, device).metrics)
            return dict(test)

        started = time.perf_counter()
        result = fit(
            task,
            loop_config.model_copy(update={"device": env.device.type}),
            run_log=RunLog(run_log) if run_log is not None and env.rank == 0 else None,
            run_kind="retrieval-ddp",
            run_name=model_name,
            run_config=run_config,
            data_version=data_version,
            test_fn=test_fn,
        )
        wall = time.perf_counter() - started
        losses = _all_mean([h["train_loss"] for h in result.history], env)  # rank means -> global means
        summary = {
            "model": model_name,
            "world_size": env.world_size,
            "backend": env.backend,
            "device": str(env.device),
            "global_batch": train_config.batch_size,
            "steps": task.steps_per_epoch() * result.epochs_run,
            "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch,
            "train_loss": losses[-1] if losses else None,
            "train_loss_per_epoch": losses,
            "valid": result.best_valid,
            "test": test,
            "wall_s": wall,
            "num_parameters": result.num_parameters,
            "data_version": data_version,
            "run_id": result.run_id,
            "model_config": mconfig.model_dump(mode="json"),
        }
        if env.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            meta = {"model": model_name, "world_size": str(env.world_size), "data_version": data_version}
            save_weights(module, out / WEIGHTS, metadata=meta)
            with atomic_path(out / RESULT) as tmp:
                tmp.write_text(json.dumps(summary, indent=2, default=str))
        if env.backend is not None:
            dist.barrier()
        return summary
    finally:
        if env.backend is not None and dist.is_initialized():
            dist.destroy_process_group()


# -- CLI --------------------------------------------------------------------------------------------------


def _export_dir(dataset: str | None, export_dir: Path | None, export_root: Path | None) -> Path:
    if (dataset is None) == (export_dir is None):
        raise typer.BadParameter("give exactly one of --dataset (its latest export) or --export-dir")
    if export_dir is not None:
        return export_dir
    assert dataset is not None
    return latest_export(dataset, root=export_root or PathsConfig().exports)


def train_command(
    out: Annotated[Path, typer.Option(help="Rank 0 writes weights.safetensors and result.json here.")],
    model: Annotated[
        str, typer.Option(help="Sequential retrieval model: sasrec, hstu, hstu-large.")
    ] = "sasrec",
    dataset: Annotated[str | None, typer.Option(help="Train on this dataset's latest export.")] = None,
    export_dir: Annotated[Path | None, typer.Option(help="Or: this export directory.")] = None,
    export_root: Annotated[Path | None, typer.Option(help="Where --dataset's exports live.")] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 10,
    batch_size: Annotated[int, typer.Option(min=1, help="GLOBAL batch (sequences), split over ranks.")] = 128,
    lr: Annotated[float, typer.Option(min=0.0)] = 1e-3,
    max_len: Annotated[int, typer.Option(min=1)] = 200,
    num_negatives: Annotated[int, typer.Option(min=1)] = 128,
    dropout: Annotated[
        float | None, typer.Option(help="Override the model's dropout (0: exact DDP).")
    ] = None,
    embedding_dim: Annotated[int | None, typer.Option(min=1)] = None,
    seed: Annotated[int, typer.Option()] = 0,
    eval_every: Annotated[int, typer.Option(min=1)] = 1,
    patience: Annotated[int, typer.Option(min=1)] = 10,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    warehouse: Annotated[Path | None, typer.Option(help="Record the run in this warehouse (rank 0).")] = None,
) -> None:
    """One rank of a DDP run (start it under torchrun; alone it is a 1-process run)."""
    fields: dict[str, Any] = {}
    if dropout is not None:
        fields["dropout"] = dropout
    if embedding_dim is not None:
        fields["embedding_dim"] = embedding_dim
    summary = train_distributed(
        model,
        _export_dir(dataset, export_dir, export_root),
        out,
        train_config=RetrievalTrainConfig(
            max_len=max_len,
            batch_size=batch_size,
            loss=SampledSoftmaxConfig(num_negatives=num_negatives),
            length_buckets=False,
        ),
        loop_config=LoopConfig(
            max_epochs=epochs,
            eval_every=eval_every,
            patience=patience,
            seed=seed,
            device=device,  # type: ignore[arg-type]  (pydantic validates the literal)
            optimizer=OptimizerConfig(lr=lr),
            progress=False,
        ),
        model_fields=fields,
        run_log=warehouse,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(
            json.dumps({k: summary[k] for k in ("world_size", "steps", "train_loss", "valid", "test")})
        )


app = typer.Typer(help="Distributed (DDP) training launched through torchrun.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """DDP training commands."""


@app.command("launch", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def launch_command(
    ctx: typer.Context,
    nproc_per_node: Annotated[int, typer.Option(min=1, help="Processes (ranks) on this machine.")] = 2,
) -> None:
    """torchrun --standalone --nproc_per_node N -m recsys.training.distributed <the other options>.

    Example: ``recsys train-ddp launch --nproc-per-node 2 --model sasrec --dataset synthetic --out DIR``.
    """
    code = subprocess.call(torchrun_command(nproc_per_node, list(ctx.args)))
    raise typer.Exit(code)


def torchrun_command(nproc_per_node: int, args: list[str]) -> list[str]:
    """The torchrun command line (``python -m torch.distributed.run`` = ``torchrun``, this interpreter)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc_per_node),
        "-m",
        "recsys.training.distributed",
        *args,
    ]


if __name__ == "__main__":
    typer.run(train_command)
