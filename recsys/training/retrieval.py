"""Training and evaluation of the sequential retrieval models (SASRec, HSTU, popularity).

Data: ``evaluation.retrieval.leave_one_out`` splits the sequences; each user's training part contributes one
sequence per epoch: its most recent ``max_len + 1`` items, predicting item t + 1 from items 0..t at every
position (next-item prediction at every position). Loss: the config's objective (``models.losses``: full
softmax, sampled softmax with uniform / in-batch / mixed negatives and logQ, or gBCE); None picks one from the
data with ``default_recipe`` (the rule is documented there).

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
from recsys.models.losses import (
    FullSoftmaxConfig,
    GBCEConfig,
    RetrievalObjective,
    SampledSoftmaxConfig,
    draw_negatives,
    full_softmax_loss,
    gbce_loss,
    sample_uniform_negatives,
    sampled_softmax_loss,
)
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
    loss: RetrievalObjective | None = Field(
        None, description="Training objective; None = chosen from the data by default_recipe."
    )
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


# -- defaults chosen from the data -------------------------------------------------------------------------
FULL_SOFTMAX_MAX_ITEMS = 1_000_000
SPARSE_EVENTS_PER_USER = 30.0


@dataclass(frozen=True)
class Recipe:
    """Objective and model defaults for one dataset (``default_recipe``)."""

    objective: FullSoftmaxConfig | SampledSoftmaxConfig | GBCEConfig
    max_len: int
    embedding_dim: int
    dropout: float
    sparse: bool
    reason: str


def default_objective(num_items: int, sparse: bool) -> FullSoftmaxConfig | SampledSoftmaxConfig:
    """Full-softmax cross-entropy (raw dot products) while the catalogue fits the chunked logsumexp
    (<= FULL_SOFTMAX_MAX_ITEMS items); beyond, sampled softmax with mixed in-batch/uniform negatives and logQ
    correction (512 negatives on sparse data as in the GR reference's Amazon configs, 2,048 otherwise)."""
    if num_items <= FULL_SOFTMAX_MAX_ITEMS:
        return FullSoftmaxConfig()
    return SampledSoftmaxConfig(
        num_negatives=512 if sparse else 2048, negatives="mixed", logq_correction=True, temperature=0.05
    )


def default_recipe(num_items: int, events_per_user: float) -> Recipe:
    """The documented rule. Catalogue size picks the objective (``default_objective``); data density picks
    the model defaults: under SPARSE_EVENTS_PER_USER events per user (Amazon-style data) history 50, d 64,
    dropout 0.5 (the GR reference's sparse configs); denser data (MovieLens) history 200, d 64, dropout
    0.2."""
    if num_items < 1 or events_per_user <= 0:
        raise ValueError(f"need num_items >= 1 and events_per_user > 0, got {num_items}, {events_per_user}")
    sparse = events_per_user < SPARSE_EVENTS_PER_USER
    objective = default_objective(num_items, sparse)
    density = f"{events_per_user:.1f} events/user ({'sparse' if sparse else 'dense'})"
    reason = f"{num_items} items -> {objective.kind}; {density}"
    if sparse:
        return Recipe(objective, 50, 64, 0.5, True, reason)
    return Recipe(objective, 200, 64, 0.2, False, reason)


def split_recipe(split: LeaveOneOutSplit) -> Recipe:
    """``default_recipe`` of a leave-one-out split: its catalogue and mean events per user (all parts)."""
    users = max(len(split.train_items), 1)
    events = sum(len(items) for items in split.train_items) + len(split.valid) + len(split.test)
    return default_recipe(split.num_items, events / users)


def model_fields_for(objective: RetrievalObjective) -> dict[str, Any]:
    """The model config fields an objective needs: normalisation and a learned temperature's start."""
    return {
        "normalize": objective.normalize,
        "learned_temperature": objective.temperature if objective.learn_temperature else None,
    }


def served_temperature(objective: RetrievalObjective, model: nn.Module) -> float:
    """The temperature a trained model's scores are divided by: its learned one (``learn_temperature``),
    else the objective's constant; serving divides by it so served scores are the ones trained."""
    scale = model.score_scale() if objective.learn_temperature else None
    return float(1.0 / scale.item()) if scale is not None else float(objective.temperature)


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


def rule_objective(split: LeaveOneOutSplit, normalize: bool) -> RetrievalObjective:
    """The data's objective (``split_recipe``) for a model that does (or does not) L2-normalise: the rule's
    own form when it matches, else the same objective on cosine scores at temperature 0.05 (or raw dot
    products at temperature 1). Models built from registry defaults normalise, so code that rebuilds a model
    from ``model_config(name, num_items, max_len)`` gets the vectors it was trained with."""
    objective = split_recipe(split).objective
    if objective.normalize != normalize:
        temperature = 0.05 if normalize else 1.0
        objective = objective.model_copy(update={"normalize": normalize, "temperature": temperature})
    return objective


def resolve_objective(
    objective: RetrievalObjective | None, split: LeaveOneOutSplit, model: nn.Module
) -> RetrievalObjective:
    """The objective to train ``model`` with: the given one (its normalisation must be the model's), or the
    data's (``rule_objective``) in the model's normalisation."""
    model_normalizes = bool(getattr(getattr(model, "config", None), "normalize", True))
    if objective is None:
        return rule_objective(split, model_normalizes)
    if isinstance(model, Popularity):
        return objective
    if objective.normalize != model_normalizes:
        raise ValueError(
            f"loss.normalize is {objective.normalize} but the model's normalize is {model_normalizes}: build "
            "the model with model_fields_for(objective)"
        )
    if objective.learn_temperature and getattr(model, "score_scale", lambda: None)() is None:
        raise ValueError("loss.learn_temperature: the model has no learned temperature (learned_temperature)")
    return objective


def objective_loss(
    objective: RetrievalObjective,
    model: nn.Module,
    user: torch.Tensor,
    positives: torch.Tensor,
    num_items: int,
    *,
    negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """The objective's mean loss over the P positions of ``user`` [P, D] / ``positives`` [P]; negatives are
    drawn here unless ``negatives`` [P, K] (uniform ones, e.g. pre-drawn per rank) is given.

    The logits are computed in fp32 even under bf16 autocast: with a temperature of 0.05 a bf16 dot product
    of unit vectors is off by up to ~0.1 in the logit, which moves a softmax over thousands of items."""
    table = model.item_vectors()
    scale = model.score_scale() if objective.learn_temperature else None
    with torch.autocast(device_type=user.device.type, enabled=False):
        return _objective_loss(objective, user.float(), positives, table.float(), num_items, negatives, scale)


def _objective_loss(
    objective: RetrievalObjective,
    user: torch.Tensor,
    positives: torch.Tensor,
    table: torch.Tensor,
    num_items: int,
    negatives: torch.Tensor | None,
    scale: torch.Tensor | None,
) -> torch.Tensor:
    scale = scale.float() if scale is not None else None
    if isinstance(objective, FullSoftmaxConfig):
        return full_softmax_loss(user, positives, table, objective, scale=scale)
    if negatives is None and (isinstance(objective, GBCEConfig) or objective.negatives == "uniform"):
        shape = (positives.shape[0], objective.num_negatives)
        negatives = sample_uniform_negatives(num_items, shape, device=user.device)  # [P, K]
    if isinstance(objective, GBCEConfig):
        assert negatives is not None
        return gbce_loss(user, positives, negatives, table, objective, scale=scale)
    # Pre-drawn uniform negatives need no logQ: a uniform proposal shifts every logit by the same constant.
    drawn = draw_negatives(objective, positives, num_items) if negatives is None else negatives
    return sampled_softmax_loss(user, positives, drawn, table, objective, scale=scale)


class RetrievalTask:
    """The ``training.loop.TrainTask`` of a sequential retrieval model on a leave-one-out split."""

    def __init__(self, model: nn.Module, split: LeaveOneOutSplit, config: RetrievalTrainConfig) -> None:
        self.model = model
        self.split = split
        self.config = config
        self.objective = resolve_objective(config.loss, split, model)
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
        return objective_loss(self.objective, model, user, positives, self.split.num_items)

    def score_fn(self, model: nn.Module) -> ScoreFn:
        def scores(batch: EvalBatch) -> torch.Tensor:
            if isinstance(model, Popularity):
                return model(batch.targets.shape[0])
            users = model(batch.items, batch.ts, batch.query_ts, batch.lengths)  # [B, L, D]
            # Scored in fp32 even under bf16 autocast: bf16 scores tie (8-bit mantissa), and ties move the
            # target's rank, so GPU and CPU figures would stop being comparable.
            with torch.autocast(device_type=users.device.type, enabled=False):
                user = last_valid(users, batch.lengths).float()
                return user @ model.item_vectors().float().T  # [B, num_items + 1]

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
    test: RetrievalEvaluation | None  # None: trained with evaluate_test=False (e.g. a sweep's candidate)
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
    evaluate_test: bool = True,
) -> RetrievalRunResult:
    """Train registry model ``name`` on ``split`` with ``seed``; evaluate test once on the best checkpoint
    (``evaluate_test=False`` leaves the test set untouched; calling again with the same checkpoint directory
    and True evaluates it on the stored best weights without retraining).

    ``train_config.loss`` None = the data's objective (``rule_objective``, in the normalisation
    ``model_fields`` asks for, L2 by default); the model gets the objective's normalisation and learned
    temperature unless ``model_fields`` sets them."""
    train_config = train_config or RetrievalTrainConfig()
    if train_config.loss is None:  # the data's rule, recorded explicitly in the run's config
        normalize = bool((model_fields or {}).get("normalize", True))
        train_config = train_config.model_copy(update={"loss": rule_objective(split, normalize)})
    assert train_config.loss is not None
    loop_config = LoopConfig(**{**(loop_config or LoopConfig()).model_dump(), "seed": seed})
    fields = {"num_items": split.num_items, **(model_fields or {})}
    if name != "popularity":
        fields.setdefault("max_len", train_config.max_len)
        for key, value in model_fields_for(train_config.loss).items():
            fields.setdefault(key, value)
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
        test_fn=test_fn if evaluate_test else None,
    )
    test = test_eval[-1] if test_eval else None
    return RetrievalRunResult(
        model_name=name, seed=seed, test=test, model=model.eval(), **result.run_figures()
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
