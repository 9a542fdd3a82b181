"""HyFormer's systems parts, measured: unique-id pooling of the batches and hierarchical asynchronous updates.

    python -m recsys.benchmarks.hyformer_systems pooling --synthetic-users 150 --steps 12
    python -m recsys.benchmarks.hyformer_systems async --source-dir ../shared/data/ml-100k --epochs 2

``pooling``: HyFormer at history ``--history`` (1,000) on the synthetic ``long_history`` preset, fed the
ranking table's batches (``RankingTask``, batches of 128, the table's subsample caps) with and without
``RankingTrainConfig.unique_pooling``. Per batch: the bytes of the item-id tensors that cross host -> device
(int64 [B, L] padded ids vs int64 [U] unique ids + int32 [B, L] inverse), the whole batch's bytes
(``RankingBatch.nbytes``), valid steps vs unique ids; and the time of a training step (batch assembly, the
host deduplication included, forward, backward, AdamW), the two forms alternating step by step on the same
batches, so the machine's load hits both alike. On a CPU the "device" is the host: the bytes are what a GPU
would be sent, the step time is the CPU's.

``async``: 2 processes of ``torch.distributed`` (gloo, CPU; ``torch.multiprocessing``) train HyFormer on
MovieLens-100K ranking examples (history ``--async-history``, the table's caps), each on its half of every
global batch of ``--global-batch``, once with synchronous updates (``DistributedDataParallel``, AdamW) and
once with hierarchical updates (``training.hierarchical``: embedding rows updated with the step's all-reduced
gradient, the dense parameters with the previous step's, whose all-reduce runs during the next step); same
seed, same batches, same number of steps. Reports the mean step time (wall, after ``--warmup`` steps) and
the test AUC / log loss of the result (the pending dense gradient flushed first).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer

from recsys.benchmarks.training_throughput import CAPS, prepare
from recsys.core.atomic import atomic_path

app = typer.Typer(
    add_completion=False, help="HyFormer's systems parts: unique-id pooling, hierarchical updates."
)


def _load(warehouse: Path, dataset: str) -> Any:
    from recsys.training.ranking import RankingDataConfig, load_ranking_data
    from recsys.warehouse import Warehouse

    with Warehouse(warehouse, read_only=True) as wh:
        return load_ranking_data(wh, dataset, RankingDataConfig(**CAPS[dataset]))


def _ids_bytes(batch: Any) -> int:
    seq = batch.sequences["history"]
    return sum(t.nbytes for t in (seq.item_ids, seq.unique_ids, seq.inverse) if t is not None)


@app.command()
def pooling(
    synthetic_users: Annotated[
        int, typer.Option(help="Users of the long-history set (~1,100 events each).")
    ] = 150,
    history: Annotated[int, typer.Option(help="HyFormer's history window L.")] = 1000,
    steps: Annotated[int, typer.Option(help="Measured steps per form.")] = 12,
    warmup: Annotated[int, typer.Option(help="Unmeasured steps per form first.")] = 2,
    threads: Annotated[int, typer.Option(help="torch intra-op threads.")] = 1,
    state_dir: Annotated[
        Path | None, typer.Option(help="Where the data is built (default: a temp dir).")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the figures here.")] = None,
) -> None:
    from recsys.experiments.ranking import build_model
    from recsys.training.loop import OptimizerConfig, build_optimizer, seed_everything
    from recsys.training.ranking import RankingTask, RankingTrainConfig

    torch.set_num_threads(threads)
    root = Path(state_dir or tempfile.mkdtemp(prefix="hyformer-systems-"))
    started = time.perf_counter()
    warehouse = prepare(root, "synthetic_long", None, synthetic_users)
    data = _load(warehouse, "synthetic_long")
    print(f"data: {len(data.splits['train'])} train examples, built in {time.perf_counter() - started:.0f} s")
    seed_everything(0)
    model, _ = build_model("hyformer", data, history)
    device = torch.device("cpu")
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-3), device)
    forms = {
        "padded": RankingTask(model, data, RankingTrainConfig(max_len=history), seed=0),
        "pooled": RankingTask(model, data, RankingTrainConfig(max_len=history, unique_pooling=True), seed=0),
    }
    indices = forms["padded"].batch_indices(1, np.random.default_rng(0))[: warmup + steps]
    if len(indices) < warmup + steps:
        raise typer.BadParameter(f"only {len(indices)} batches in an epoch: lower --steps/--warmup")
    times: dict[str, list[float]] = {name: [] for name in forms}
    bytes_ids: dict[str, int] = dict.fromkeys(forms, 0)
    bytes_all: dict[str, int] = dict.fromkeys(forms, 0)
    valid_steps = unique_ids = 0
    model.train()
    for i, index in enumerate(indices):
        for name, task in forms.items():  # alternate the forms on the same batch
            t0 = time.perf_counter()
            batch = data.make_batch(task.train, index, history, task.config.length_multiple)
            if task.config.unique_pooling:
                batch = batch.deduplicated()
            loss = task.loss(model, batch, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            elapsed = time.perf_counter() - t0
            if i < warmup:
                continue
            times[name].append(elapsed)
            bytes_ids[name] += _ids_bytes(batch)
            bytes_all[name] += batch.nbytes()
            if name == "pooled":
                seq = batch.sequences["history"]
                valid_steps += int(seq.lengths.sum())
                unique_ids += int(seq.unique_ids.numel())
    out = {
        "history": history,
        "batch_size": forms["padded"].config.batch_size,
        "steps": steps,
        "threads": threads,
        "valid_steps_per_batch": valid_steps / steps,
        "unique_ids_per_batch": unique_ids / steps,
        "id_bytes_per_batch": {k: v / steps for k, v in bytes_ids.items()},
        "batch_bytes_per_batch": {k: v / steps for k, v in bytes_all.items()},
        "step_ms_median": {k: statistics.median(v) * 1e3 for k, v in times.items()},
        "step_ms_mean": {k: statistics.fmean(v) * 1e3 for k, v in times.items()},
    }
    ratio = out["valid_steps_per_batch"] / max(out["unique_ids_per_batch"], 1)
    print(
        f"HyFormer, L = {history}, batches of {out['batch_size']}, {steps} steps per form, {threads}"
        " thread(s)"
        f"\n  valid steps / unique ids per batch: {out['valid_steps_per_batch']:.0f} / "
        f"{out['unique_ids_per_batch']:.0f} ({ratio:.1f}x)"
    )
    for name in forms:
        print(
            f"  {name:>6}: item-id bytes {out['id_bytes_per_batch'][name] / 1024:9.1f} KiB, whole batch "
            f"{out['batch_bytes_per_batch'][name] / 1024:9.1f} KiB, step median "
            f"{out['step_ms_median'][name]:7.1f} ms (mean {out['step_ms_mean'][name]:.1f})"
        )
    _write(json_out, out)


def _async_worker(rank: int, world: int, spec: dict[str, Any]) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from recsys.experiments.ranking import build_model
    from recsys.training.hierarchical import HierarchicalUpdater
    from recsys.training.loop import OptimizerConfig, adamw, build_optimizer, seed_everything
    from recsys.training.ranking import RankingTask, RankingTrainConfig, evaluate, flatten_metrics

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spec["port"]))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        data = _load(Path(spec["warehouse"]), "ml100k")
        history, mode = spec["history"], spec["mode"]
        seed_everything(0)
        model, _ = build_model("hyformer", data, history)
        device = torch.device("cpu")
        config = OptimizerConfig(lr=spec["lr"])
        train_config = RankingTrainConfig(max_len=history, batch_size=spec["global_batch"])
        task = RankingTask(model, data, train_config, seed=0)
        if mode == "sync":
            net: torch.nn.Module = DistributedDataParallel(model, find_unused_parameters=True)
            optimizer: Any = build_optimizer(model, config, device)
        else:
            net = model
            optimizer = HierarchicalUpdater(model, lambda ps: adamw(ps, config, device), distributed=True)
        model.train()
        times: list[float] = []
        step = 0
        for epoch in range(1, spec["epochs"] + 1):
            for index in task.batch_indices(epoch, np.random.default_rng(epoch)):
                if len(index) < spec["global_batch"]:
                    continue  # full global batches only: both ranks hold equal halves
                if spec["max_steps"] and step >= spec["max_steps"]:
                    break
                t0 = time.perf_counter()
                batch = data.make_batch(task.train, index[rank::world], history, train_config.length_multiple)
                out = net(batch)
                loss = out.aux_loss + sum(
                    torch.nn.functional.binary_cross_entropy_with_logits(out.logits[t].float(), label)
                    for t, label in batch.labels.items()
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                if step > spec["warmup"]:
                    times.append(time.perf_counter() - t0)
        if mode != "sync":
            optimizer.flush()
        if rank == 0:
            metrics = flatten_metrics(evaluate(model, data, "test", train_config, device, oracle=False))
            result = {
                "mode": mode,
                "steps": step,
                "step_ms_mean": statistics.fmean(times) * 1e3,
                "step_ms_median": statistics.median(times) * 1e3,
                "test_auc": metrics["auc"],
                "test_log_loss": metrics["log_loss"],
            }
            Path(spec["out"]).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@app.command("async")
def async_updates(
    source_dir: Annotated[Path, typer.Option(help="The MovieLens-100K files (u.data, u.item, u.user).")],
    history: Annotated[int, typer.Option("--async-history", help="HyFormer's history window.")] = 50,
    epochs: Annotated[int, typer.Option(help="Passes over the (capped) training examples.")] = 2,
    global_batch: Annotated[int, typer.Option(help="Examples per step over both processes.")] = 256,
    max_steps: Annotated[int, typer.Option(help="Stop after this many steps (0: the epochs decide).")] = 0,
    repeats: Annotated[int, typer.Option(help="Runs of each mode, alternating (load drift hits both).")] = 1,
    lr: Annotated[float, typer.Option()] = 1e-3,
    warmup: Annotated[int, typer.Option(help="Steps left out of the step time.")] = 3,
    state_dir: Annotated[
        Path | None, typer.Option(help="Where the data is built (default: a temp dir).")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the figures here.")] = None,
) -> None:
    import socket

    import torch.multiprocessing as mp

    root = Path(state_dir or tempfile.mkdtemp(prefix="hyformer-systems-"))
    warehouse = prepare(root, "ml100k", source_dir, 0)
    results = []
    for mode in ("sync", "hierarchical") * repeats:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        spec = {
            "warehouse": str(warehouse),
            "history": history,
            "epochs": epochs,
            "global_batch": global_batch,
            "lr": lr,
            "warmup": warmup,
            "max_steps": max_steps,
            "mode": mode,
            "port": port,
            "out": str(root / f"async-{mode}.json"),
        }
        started = time.perf_counter()
        mp.spawn(_async_worker, args=(2, spec), nprocs=2, join=True)
        result = json.loads(Path(spec["out"]).read_text()) | {"wall_s": time.perf_counter() - started}
        results.append(result)
        print(
            f"{mode:>12}: {result['steps']} steps, step mean {result['step_ms_mean']:.1f} ms (median "
            f"{result['step_ms_median']:.1f}), test AUC {result['test_auc']:.4f}, log loss "
            f"{result['test_log_loss']:.4f}, wall {result['wall_s']:.0f} s"
        )
    for mode in ("sync", "hierarchical"):
        mine = [r for r in results if r["mode"] == mode]
        each = ", ".join(f"{r['step_ms_mean']:.0f}" for r in mine)
        mean = statistics.fmean(r["step_ms_mean"] for r in mine)
        print(f"{mode:>12}: step mean over {len(mine)} run(s) {mean:.1f} ms (runs: {each})")
    _write(json_out, {"history": history, "epochs": epochs, "global_batch": global_batch, "runs": results})


def _write(path: Path | None, figures: dict[str, Any]) -> None:
    if path is None:
        return
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(figures, indent=1))
    print(f"figures written to {path}")


if __name__ == "__main__":
    app()
