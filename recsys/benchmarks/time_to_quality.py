"""Time to quality of the sequential retrieval models: wall time until validation NDCG@10 reaches a threshold.

    python -m recsys.benchmarks.time_to_quality --max-epochs 8 --seeds 1 --threads 1
    python -m recsys.benchmarks.time_to_quality --models sasrec,hstu,hstu-large --record wh.duckdb

Every model trains with the shared loop (``training.loop.fit``) on the experiment's data and split
(``experiments.retrieval.prepare_split``: MovieLens-100K leave-one-out by default, or ``--events`` for a
user's own file) with the experiment's default settings (sampled softmax, AdamW, batch 128, history 200).
The threshold is ``--fraction`` of the reference model's (``--reference``, SASRec) best validation NDCG@10
in the same capped run, averaged over seeds; ``--threshold`` sets it directly instead. Per model it prints
the wall time of the first epoch whose validation NDCG@10 reaches the threshold and the test NDCG@10 of the
weights at that epoch, then the same at the best validation epoch (the loop's own time to quality).

Wall time is the loop's ``elapsed_s`` (training and validation of every epoch so far). To read the test
metric at the threshold epoch, the benchmark also evaluates the test users after every validation; that
evaluation never selects anything, and its seconds are subtracted from the wall times. Checkpoints are not
written (weights stay in memory), so nothing is resumed: each call trains from scratch.

OPEN choices and what was picked: the threshold is relative to a capped run of the reference (the issue's
"until validation NDCG@10 stops improving" is the best-epoch column); seeds are summarised as mean ± std over
the seeds that reached the threshold, with the count shown.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from recsys.core.config import PathsConfig
from recsys.evaluation.retrieval import LeaveOneOutSplit
from recsys.evaluation.significance import summarize
from recsys.experiments.retrieval import RetrievalExperimentConfig, prepare_split
from recsys.ingest.movielens import find_movielens_100k
from recsys.models.registry import build_model, model_config, trainable_retrieval_models
from recsys.training.loop import LoopConfig, fit, record, seed_everything
from recsys.training.retrieval import RetrievalTask, RetrievalTrainConfig

METRIC = "ndcg@10"
DEFAULT_ML100K = Path(__file__).resolve().parents[3] / "shared" / "data" / "ml-100k"


class TestEveryEpoch:
    """A ``TrainTask`` that delegates to a ``RetrievalTask`` and, after each validation, also evaluates the
    test users (recorded with the seconds it took; the loop never sees these metrics)."""

    def __init__(self, task: RetrievalTask) -> None:
        self.task = task
        self.model = task.model
        self.test_metrics: list[dict[str, float]] = []
        self.test_seconds: list[float] = []

    def train_batches(self, epoch: int, rng: np.random.Generator) -> Iterable[Any]:
        return self.task.train_batches(epoch, rng)

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        return self.task.loss(model, batch, device)

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        valid = self.task.validate(model, device)
        started = time.perf_counter()
        self.test_metrics.append(self.task.evaluate(model, self.task.split.test, device).metrics)
        self.test_seconds.append(time.perf_counter() - started)
        return valid

    def flop_probe(self, model: nn.Module, device: torch.device) -> tuple[Callable[[], Any], int]:
        return self.task.flop_probe(model, device)


@dataclass(frozen=True)
class EpochPoint:
    """One validated epoch: wall time without the test evaluations, validation and test NDCG@10."""

    epoch: int
    wall_s: float
    valid: float
    test: float


@dataclass(frozen=True)
class Curve:
    model: str
    seed: int
    points: list[EpochPoint]
    train_time_s: float

    @property
    def best(self) -> EpochPoint:
        """The first epoch with the highest validation metric (the checkpoint the loop keeps)."""
        return max(self.points, key=lambda p: (p.valid, -p.epoch))

    def first_reaching(self, threshold: float) -> EpochPoint | None:
        return next((p for p in self.points if p.valid >= threshold), None)


def curve_from_fit(
    model: str,
    seed: int,
    history: list[dict[str, float]],
    test_metrics: list[dict[str, float]],
    test_seconds: list[float],
) -> Curve:
    """Join the loop's per-epoch history with the per-validation test metrics of ``TestEveryEpoch``."""
    validated = [row for row in history if f"valid/{METRIC}" in row]
    if len(validated) != len(test_metrics) or len(test_metrics) != len(test_seconds):
        raise ValueError(
            f"{model} seed {seed}: {len(validated)} validated epochs but {len(test_metrics)} test evaluations"
        )
    points, spent = [], 0.0
    pending = iter(zip(test_metrics, test_seconds, strict=True))
    for row in history:
        if f"valid/{METRIC}" not in row:
            continue
        test, seconds = next(pending)
        spent += seconds
        points.append(
            EpochPoint(int(row["epoch"]), row["elapsed_s"] - spent, row[f"valid/{METRIC}"], test[METRIC])
        )
    if not points:
        raise ValueError(f"{model} seed {seed}: no validated epoch")
    train_time = (history[-1]["elapsed_s"] - spent) if history else 0.0
    return Curve(model, seed, points, train_time)


def threshold_from(curves: list[Curve], reference: str, fraction: float) -> float:
    """``fraction`` x the mean over seeds of the reference model's best validation metric."""
    best = [c.best.valid for c in curves if c.model == reference]
    if not best:
        raise ValueError(f"no run of the reference model {reference!r}")
    return fraction * float(np.mean(best))


def _mean_std(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    s = summarize(values)
    return f"{s.mean:{fmt}} ± {s.std:{fmt}}" if s.n > 1 else f"{s.mean:{fmt}}"


def summary_rows(curves: list[Curve], threshold: float) -> list[dict[str, Any]]:
    """One row per model (in first-seen order) with the figures the table prints and --record stores."""
    rows = []
    for model in dict.fromkeys(c.model for c in curves):
        runs = [c for c in curves if c.model == model]
        reached = [(c, p) for c in runs if (p := c.first_reaching(threshold)) is not None]
        rows.append(
            {
                "model": model,
                "seeds": len(runs),
                "reached": len(reached),
                "s_per_epoch": [c.train_time_s / max(c.points[-1].epoch, 1) for c in runs],
                "epoch_at_threshold": [float(p.epoch) for _, p in reached],
                "time_to_threshold_s": [p.wall_s for _, p in reached],
                "test_at_threshold": [p.test for _, p in reached],
                "best_valid": [c.best.valid for c in runs],
                "best_epoch": [float(c.best.epoch) for c in runs],
                "time_to_best_s": [c.best.wall_s for c in runs],
                "test_at_best": [c.best.test for c in runs],
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]], threshold: float) -> str:
    header = [
        "Model",
        "Reached",
        "s/epoch",
        f"Epoch @ {threshold:.4f}",
        "Time to threshold (s)",
        "Test NDCG@10 @ threshold",
        "Best valid NDCG@10",
        "Best epoch",
        "Time to best (s)",
        "Test NDCG@10 @ best",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            r["model"],
            f"{r['reached']}/{r['seeds']}",
            _mean_std(r["s_per_epoch"], ".1f"),
            _mean_std(r["epoch_at_threshold"], ".1f"),
            _mean_std(r["time_to_threshold_s"], ".0f"),
            _mean_std(r["test_at_threshold"], ".4f"),
            _mean_std(r["best_valid"], ".4f"),
            _mean_std(r["best_epoch"], ".1f"),
            _mean_std(r["time_to_best_s"], ".0f"),
            _mean_std(r["test_at_best"], ".4f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def record_run(
    warehouse: Path,
    options: dict[str, Any],
    curves: list[Curve],
    rows: list[dict[str, Any]],
    threshold: float,
    data_version: str | None,
) -> str:
    """A finished 'benchmark' run named 'time_to_quality': per-model means as its metrics, every epoch's
    validation / test NDCG@10 and wall time as 'curve' metrics. Returns the run id."""
    from recsys.warehouse.runs import RunLog

    log = record(RunLog, warehouse)
    config = {k: str(v) for k, v in options.items() if k not in ("record", "model_list")}
    run_id = record(log.start, "benchmark", "time_to_quality", config=config, data_version=data_version)
    for c in curves:
        for p in c.points:
            metrics = {
                f"{c.model}/seed{c.seed}/{k}": v
                for k, v in (("valid_ndcg@10", p.valid), ("test_ndcg@10", p.test), ("wall_s", p.wall_s))
            }
            record(log.log_metrics, run_id, metrics, step=p.epoch, split="curve")
    figures: dict[str, float] = {"threshold": threshold}
    for r in rows:
        for key in ("time_to_threshold_s", "test_at_threshold", "time_to_best_s", "test_at_best"):
            if r[key]:
                figures[f"{r['model']}/{key}"] = float(np.mean(r[key]))
        figures[f"{r['model']}/reached"] = float(r["reached"])
    record(log.finish, run_id, metrics=figures)
    return run_id


def train_curve(
    name: str, split: LeaveOneOutSplit, seed: int, train: RetrievalTrainConfig, loop: LoopConfig
) -> Curve:
    """Train registry model ``name`` once with the shared loop; its per-epoch curve."""
    loop = LoopConfig(**{**loop.model_dump(), "seed": seed})
    seed_everything(seed)
    mconfig = model_config(name, num_items=split.num_items, max_len=train.max_len)
    task = TestEveryEpoch(RetrievalTask(build_model(name, mconfig), split, train))
    result = fit(task, loop, run_name=name)
    return curve_from_fit(name, seed, result.history, task.test_metrics, task.test_seconds)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="sasrec,hstu,hstu-large", help="Comma-separated models.")
    parser.add_argument("--reference", default="sasrec", help="The model whose best sets the threshold.")
    parser.add_argument(
        "--fraction", type=float, default=0.9, help="Threshold = this x the reference's best."
    )
    parser.add_argument(
        "--threshold", type=float, default=None, help="An absolute NDCG@10 threshold instead."
    )
    parser.add_argument("--seeds", type=int, default=1, help="Seeds 0..n-1 per model.")
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--max-len", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a busy machine).")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--ml100k",
        type=Path,
        default=find_movielens_100k() or DEFAULT_ML100K,
        help="Unzipped MovieLens-100K folder.",
    )
    parser.add_argument("--events", type=Path, default=None, help="Your own events file instead of ML-100K.")
    parser.add_argument("--dataset", default=None, help="Dataset name (default: ml100k, or 'events').")
    parser.add_argument(
        "--warehouse",
        type=Path,
        default=None,
        help="Warehouse to ingest the data into (default: a scratch one, deleted afterwards).",
    )
    parser.add_argument(
        "--record", type=Path, default=None, help="Record the figures as a 'benchmark' run in this warehouse."
    )
    parser.add_argument("--progress", action="store_true", help="Show the loop's progress bars.")
    args = parser.parse_args(argv)

    args.model_list = _csv(args.models)
    known = trainable_retrieval_models(with_popularity=False)
    unknown = [m for m in args.model_list if m not in known]
    if not args.model_list or unknown:
        parser.error(f"--models: unknown or empty {unknown or args.models!r}; known: {', '.join(known)}")
    if args.threshold is None and args.reference not in args.model_list:
        parser.error(f"--reference {args.reference!r} must be one of --models (or give --threshold)")
    if not 0.0 < args.fraction <= 1.0:
        parser.error(f"--fraction must lie in (0, 1], got {args.fraction}")
    if args.threshold is not None and not 0.0 < args.threshold <= 1.0:
        parser.error(f"--threshold must lie in (0, 1], got {args.threshold}")
    for name in ("seeds", "max_epochs", "patience", "max_len", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    source = args.events if args.events is not None else args.ml100k
    if not source.exists():
        parser.error(f"{'--events' if args.events is not None else '--ml100k'}: {source} does not exist")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    experiment = RetrievalExperimentConfig(
        dataset=args.dataset or ("events" if args.events is not None else "ml100k"),
        source_dir=None if args.events is not None else args.ml100k,
        events_path=args.events,
        models=tuple(args.model_list),
        comparisons=(),
    )
    with tempfile.TemporaryDirectory(prefix="recsys-ttq-") as scratch:
        warehouse = args.warehouse or PathsConfig(home=Path(scratch)).warehouse
        split, data_version = record(prepare_split, warehouse, experiment)
    train = RetrievalTrainConfig(max_len=args.max_len, batch_size=args.batch_size)
    loop = LoopConfig(
        max_epochs=args.max_epochs,
        patience=args.patience,
        device=args.device,
        progress=args.progress,
        resume=False,
    )
    print(
        f"{experiment.dataset}: {split.num_items} items, {len(split.train_users)} users, "
        f"{len(split.test)} test users; at most {args.max_epochs} epochs (patience {args.patience}), "
        f"{args.seeds} seed(s), {torch.get_num_threads()} torch thread(s)"
    )
    # The reference first: the threshold is only known once it has run.
    order = sorted(args.model_list, key=lambda m: m != args.reference)
    curves = []
    for name in order:
        for seed in range(args.seeds):
            curve = train_curve(name, split, seed, train, loop)
            best = curve.best
            print(
                f"  {name} seed {seed}: best valid {METRIC} {best.valid:.4f} at epoch {best.epoch} "
                f"({best.wall_s:.0f} s), {curve.points[-1].epoch} epochs in {curve.train_time_s:.0f} s"
            )
            curves.append(curve)
    threshold = args.threshold
    if threshold is None:
        threshold = threshold_from(curves, args.reference, args.fraction)
        rule = f"{args.fraction:g} x {args.reference}'s best validation {METRIC.upper()} (mean over seeds)"
    else:
        rule = "given"
    curves.sort(key=lambda c: args.model_list.index(c.model))
    rows = summary_rows(curves, threshold)
    print(f"\nThreshold {threshold:.4f} = {rule}; wall times exclude the per-epoch test evaluations.\n")
    print(format_table(rows, threshold))

    if args.record is not None:
        run_id = record_run(args.record, vars(args), curves, rows, threshold, data_version)
        print(f"\nrecorded as run {run_id} in {args.record}")


if __name__ == "__main__":
    main()
