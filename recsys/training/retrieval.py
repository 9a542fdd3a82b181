"""Training and evaluation of the sequential retrieval models (SASRec, HSTU, popularity).

Data: ``evaluation.retrieval.leave_one_out`` splits the sequences; each user's training part contributes one
sequence per epoch: its most recent ``max_len + 1`` items, predicting item t + 1 from items 0..t at every
position (next-item prediction at every position). Loss: ``models.losses.sampled_softmax_loss``.

Stochastic Length (HSTU paper), off by default: with ``stochastic_length_alpha`` = a, a training window of
n > N^(a/2) items (N = max_len) is, with probability 1 - N^a / n^2, replaced by floor(N^(a/2)) of its items
drawn uniformly without replacement and kept in time order (OPEN in the paper: which subsequence; a random
order-preserving subset was picked).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn

from recsys.core.config import FrozenModel
from recsys.evaluation.retrieval import (
    DEFAULT_KS,
    PROTOCOL,
    EvalBatch,
    EvalCases,
    LeaveOneOutSplit,
    RetrievalEvaluation,
    ScoreFn,
    evaluate_retrieval,
)
from recsys.models.losses import SampledSoftmaxConfig, sample_uniform_negatives, sampled_softmax_loss
from recsys.models.popularity import Popularity
from recsys.models.registry import build_model, model_config
from recsys.models.sequential import last_valid
from recsys.training.loop import (
    FitResult,
    LoopConfig,
    count_parameters,
    fit,
    record,
    resolve_device,
    seed_everything,
)
from recsys.warehouse.runs import RunLog


class RetrievalTrainConfig(FrozenModel):
    max_len: int = Field(200, gt=0, description="History length the models read (200 for MovieLens).")
    batch_size: int = Field(128, gt=0, description="Users (sequences) per training step.")
    eval_batch_size: int = Field(256, gt=0)
    loss: SampledSoftmaxConfig = SampledSoftmaxConfig()
    stochastic_length_alpha: float | None = Field(None, ge=1.0, le=2.0, description="None = off.")
    ks: tuple[int, ...] = DEFAULT_KS
    sampled_eval_negatives: int | None = Field(
        None, gt=0, description="Also report the sampled variant on test ('..._sampled@K'), e.g. 100."
    )
    length_buckets: bool = Field(
        True,
        description="Run each step's sequences in sub-batches of similar length (padded widths up to the "
        "next power of two): the same loss over the same positions, with far less padding.",
    )


@dataclass(frozen=True)
class TrainBatch:
    items: torch.Tensor  # [B, N] inputs
    ts: torch.Tensor  # [B, N]
    query_ts: torch.Tensor  # [B, N] time of each target
    lengths: torch.Tensor  # [B]
    targets: torch.Tensor  # [B, N] next item at each position, 0 where padded

    def to(self, device: torch.device) -> TrainBatch:
        return TrainBatch(
            *(
                t.to(device, non_blocking=True)
                for t in (self.items, self.ts, self.query_ts, self.lengths, self.targets)
            )
        )


@dataclass(frozen=True)
class TrainStep:
    """One optimisation step: its sequences, grouped into length-bucketed sub-batches."""

    parts: list[TrainBatch]

    @property
    def num_sequences(self) -> int:
        return sum(p.items.shape[0] for p in self.parts)


def length_bucket(n: int) -> int:
    """Padded width of a sequence with n positions: the next power of two (at least 8)."""
    return max(8, 1 << max(n - 1, 0).bit_length())


def stochastic_length(
    items: np.ndarray, ts: np.ndarray, max_len: int, alpha: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Subsample one training window per Stochastic Length (see the module docstring)."""
    n = len(items)
    keep = int(math.floor(max_len ** (alpha / 2)))
    if n <= keep or rng.random() >= 1.0 - max_len**alpha / n**2:
        return items, ts
    index = np.sort(rng.choice(n, size=keep, replace=False))
    return items[index], ts[index]


class RetrievalTask:
    """The ``training.loop.TrainTask`` of a sequential retrieval model on a leave-one-out split."""

    def __init__(self, model: nn.Module, split: LeaveOneOutSplit, config: RetrievalTrainConfig) -> None:
        self.model = model
        self.split = split
        self.config = config
        # One training window per user whose training part has at least one target (>= 2 items).
        self.windows = [
            (items[-(config.max_len + 1) :], ts[-(config.max_len + 1) :])
            for items, ts in zip(split.train_items, split.train_ts, strict=True)
            if len(items) >= 2
        ]
        if not self.windows:
            raise ValueError("no user has 2 or more training interactions: nothing to train on")

    def make_batch(self, windows: list[tuple[np.ndarray, np.ndarray]]) -> TrainBatch:
        """Right-padded inputs/targets of windows (each of >= 2 items: n items give n - 1 positions)."""
        width = max(len(w) for w, _ in windows) - 1
        b = len(windows)
        items = np.zeros((b, width), dtype=np.int64)
        ts, query_ts, targets = np.zeros_like(items), np.zeros_like(items), np.zeros_like(items)
        lengths = np.zeros(b, dtype=np.int64)
        for r, (w, t) in enumerate(windows):
            n = len(w) - 1
            items[r, :n], targets[r, :n] = w[:-1], w[1:]
            ts[r, :n], query_ts[r, :n] = t[:-1], t[1:]
            lengths[r] = n
        return TrainBatch(*(torch.from_numpy(a) for a in (items, ts, query_ts, lengths, targets)))

    def make_step(self, windows: list[tuple[np.ndarray, np.ndarray]]) -> TrainStep:
        if not self.config.length_buckets:
            return TrainStep([self.make_batch(windows)])
        groups: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        for w, t in windows:
            groups.setdefault(min(length_bucket(len(w) - 1), self.config.max_len), []).append((w, t))
        return TrainStep([self.make_batch(groups[k]) for k in sorted(groups)])

    def train_batches(self, epoch: int, rng: np.random.Generator) -> Iterator[TrainStep]:
        order = rng.permutation(len(self.windows))
        alpha = self.config.stochastic_length_alpha
        for start in range(0, len(order), self.config.batch_size):
            chosen = [self.windows[i] for i in order[start : start + self.config.batch_size]]
            if alpha is not None:
                chosen = [stochastic_length(w, t, self.config.max_len, alpha, rng) for w, t in chosen]
                chosen = [(w, t) for w, t in chosen if len(w) >= 2]
            if chosen:
                yield self.make_step(chosen)

    def loss(self, model: nn.Module, step: TrainStep, device: torch.device) -> torch.Tensor:
        user_parts, positive_parts = [], []
        for part in step.parts:
            part = part.to(device)
            users = model(part.items, part.ts, part.query_ts, part.lengths)  # [b, n, D]
            supervised = part.targets != 0  # [b, n]
            user_parts.append(users[supervised])  # [p, D]
            positive_parts.append(part.targets[supervised])  # [p]
        user, positives = torch.cat(user_parts), torch.cat(positive_parts)  # [P, D], [P]
        negatives = sample_uniform_negatives(
            self.split.num_items, (positives.shape[0], self.config.loss.num_negatives), device=device
        )  # [P, K]
        return sampled_softmax_loss(user, positives, negatives, model.item_vectors(), self.config.loss)

    def score_fn(self, model: nn.Module) -> ScoreFn:
        def scores(batch: EvalBatch) -> torch.Tensor:
            if isinstance(model, Popularity):
                return model(batch.targets.shape[0])
            users = model(batch.items, batch.ts, batch.query_ts, batch.lengths)  # [B, L, D]
            return (last_valid(users, batch.lengths) @ model.item_vectors().T).float()  # [B, num_items + 1]

        return scores

    def evaluate(
        self, model: nn.Module, cases: EvalCases, device: torch.device, *, sampled: bool = False
    ) -> RetrievalEvaluation:
        was_training = model.training
        model.eval()
        try:
            return evaluate_retrieval(
                self.score_fn(model),
                cases,
                num_items=self.split.num_items,
                history_len=self.config.max_len,
                ks=self.config.ks,
                batch_size=self.config.eval_batch_size,
                sampled_negatives=self.config.sampled_eval_negatives if sampled else None,
                device=device,
            )
        finally:
            model.train(was_training)

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        return self.evaluate(model, self.split.valid, device).metrics

    def flop_probe(self, model: nn.Module, device: torch.device) -> tuple[Callable[[], torch.Tensor], int]:
        """Scoring one batch of test users against all items: the inference cost per user."""
        cases = self.split.test if len(self.split.test) else self.split.valid
        index = np.arange(min(len(cases), self.config.eval_batch_size))
        batch = cases.batch(index, self.config.max_len).to(device)
        return (lambda: self.score_fn(model)(batch)), len(index)


@dataclass
class RetrievalRunResult:
    model_name: str
    seed: int
    valid: dict[str, float]
    test: RetrievalEvaluation
    num_parameters: int
    flops_per_example: float
    time_to_quality_s: float
    train_time_s: float
    best_epoch: int
    epochs_run: int
    run_id: str | None
    fit: FitResult | None = None
    #: What was trained, with its best-validation weights (eval mode): ready for ``serving.registry``.
    model: nn.Module | None = None


def fit_popularity(split: LeaveOneOutSplit) -> Popularity:
    model = build_model("popularity", num_items=split.num_items)
    assert isinstance(model, Popularity)
    model.load_counts(torch.from_numpy(split.item_counts()).float())
    return model


def train_retrieval(
    name: str,
    split: LeaveOneOutSplit,
    *,
    seed: int,
    train_config: RetrievalTrainConfig | None = None,
    loop_config: LoopConfig | None = None,
    model_fields: dict[str, Any] | None = None,
    checkpoint_dir: str | Path | None = None,
    run_log: RunLog | None = None,
    data_version: str | None = None,
    dataset: str | None = None,
) -> RetrievalRunResult:
    """Train registry model ``name`` on ``split`` with ``seed``; evaluate test once on the best checkpoint."""
    train_config = train_config or RetrievalTrainConfig()
    loop_config = LoopConfig(**{**(loop_config or LoopConfig()).model_dump(), "seed": seed})
    fields = {"num_items": split.num_items, **(model_fields or {})}
    if name != "popularity":
        fields.setdefault("max_len", train_config.max_len)
    mconfig = model_config(name, **fields)
    run_config = {
        "model": name,
        "model_config": mconfig.model_dump(mode="json"),
        "train": train_config.model_dump(mode="json"),
        "dataset": dataset,
    }
    protocol = f"{PROTOCOL}; history {train_config.max_len}; seed {seed}"

    if name == "popularity":
        return _run_popularity(split, seed, train_config, run_config, run_log, data_version, protocol)

    seed_everything(seed)
    model = build_model(name, mconfig)
    task = RetrievalTask(model, split, train_config)
    test_eval: list[RetrievalEvaluation] = []

    def test_fn(m: nn.Module, device: torch.device) -> dict[str, float]:
        evaluation = task.evaluate(m, split.test, device, sampled=True)
        test_eval.append(evaluation)
        return evaluation.metrics

    result = fit(
        task,
        loop_config,
        checkpoint_dir=checkpoint_dir,
        run_log=run_log,
        run_kind="retrieval",
        run_name=name,
        run_config=run_config,
        data_version=data_version,
        protocol=protocol,
        test_fn=test_fn,
    )
    return RetrievalRunResult(
        model_name=name, seed=seed, test=test_eval[-1], model=model.eval(), **result.run_figures()
    )


def _run_popularity(
    split: LeaveOneOutSplit,
    seed: int,
    train_config: RetrievalTrainConfig,
    run_config: dict[str, Any],
    run_log: RunLog | None,
    data_version: str | None,
    protocol: str,
) -> RetrievalRunResult:
    run_id = None
    if run_log is not None:
        run_id = record(
            run_log.start,
            "retrieval",
            "popularity",
            config=run_config,
            data_version=data_version,
            protocol=protocol,
            seed=seed,
        )
    try:
        started = time.perf_counter()
        model = fit_popularity(split)
        elapsed = time.perf_counter() - started
        task = RetrievalTask(model, split, train_config)
        device = resolve_device("cpu")
        valid = task.validate(model, device)
        test = task.evaluate(model, split.test, device, sampled=True)
    except BaseException as exc:
        if run_log is not None and run_id is not None:
            with contextlib.suppress(Exception):
                record(run_log.finish, run_id, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    if run_log is not None and run_id is not None:
        record(run_log.log_metrics, run_id, valid, step=0, split="valid")
        record(run_log.log_metrics, run_id, test.metrics, step=0, split="test")
        record(
            run_log.finish,
            run_id,
            metrics={
                "time_to_quality_s": elapsed,
                "train_time_s": elapsed,
                "num_parameters": 0,
                "flops_per_example": 0.0,
                **{f"valid/{k}": v for k, v in valid.items()},
                **{f"test/{k}": v for k, v in test.metrics.items()},
            },
        )
    return RetrievalRunResult(
        model_name="popularity",
        seed=seed,
        valid=valid,
        test=test,
        num_parameters=count_parameters(model),
        flops_per_example=0.0,
        time_to_quality_s=elapsed,
        train_time_s=elapsed,
        best_epoch=0,
        epochs_run=0,
        run_id=run_id,
        model=model,
    )
