"""Continual (streaming) training of a ranking model: learn period 1, then periods 2..k one at a time.

Periods (``slice_periods``): every ranking example of the dataset (the train, valid and test splits of
``training.ranking.RankingData`` pooled back together, in time order) is cut into k periods at ts quantiles
(equal example counts; examples sharing a ts stay in one period). Each period is cut again by time: the
first ``1 - valid_share - eval_share`` is what the period's step trains on, then a validation slice (used
only by the SDFT privileged-mode check), then the evaluation slice on which every later step measures
forgetting. OPEN choice: time cuts inside the period (the spec's temporal protocol) rather than random
hold-outs; the dense features keep the standardisation of ``load_ranking_data`` (global train split).

Methods (one network each; every method serves the same short history ``served_len``):

- ``finetune``: BCE on the new period's examples only.
- ``replay``: the same, each batch topped up with ``replay_ratio`` x batch examples drawn uniformly from a
  reservoir buffer (Vitter's algorithm R, ``replay_buffer`` slots) over the training examples of all earlier
  periods.
- ``sdft``: SDFT-style self-distillation (spec: Distillation; ``models.losses.self_distillation_loss``).
  The network runs on the served input x (the ``served_len`` most recent events) and on the privileged
  input x* (the ``privileged_len`` most recent events, the long history the server does not fetch); the
  teacher is an EMA of the network (``training.ema.EmaTeacher``, a = ``ema_rate``) run on x*. The KL weight
  stays 0 until the privileged mode beats the served mode on validation (spec); the check runs after every
  step on the just learned period's validation slice (AUC of p_theta(x, x*) vs p_theta(x)), and once passed
  the weight stays on (OPEN choice: sticky; ``kl_gate=False`` switches it on from the first step, as an
  ablation).

The optimiser (AdamW) and the teacher persist across periods (a stream, not k separate fits). A fixed number
of epochs per step (OPEN choice, no early stopping), so every method sees the same new data.

Cost per step: training wall seconds, examples processed (replayed examples included), forward passes
(SDFT: served + privileged + teacher) and history steps read by them (the cost that grows with L).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from recsys.core.atomic import atomic_path
from recsys.core.config import FrozenModel
from recsys.evaluation.ranking import RankingMetrics, ranking_metrics
from recsys.models.losses import self_distillation_loss, soft_bce_with_logits
from recsys.training.checkpoint import load_checkpoint, load_weights, save_checkpoint, save_weights
from recsys.training.ema import EmaTeacher
from recsys.training.loop import count_flops_per_example, seed_everything
from recsys.training.ranking import RankingData, SplitArrays, predict

Method = Literal["finetune", "replay", "sdft"]
METHODS: tuple[Method, ...] = ("finetune", "replay", "sdft")
TASK = "click"


class ContinualTrainConfig(FrozenModel):
    """Knobs of the streaming protocol and of the three methods."""

    n_periods: int = Field(4, ge=2, le=64, description="Time periods k the examples are cut into.")
    valid_share: float = Field(0.1, ge=0.0, lt=1.0, description="Share of a period (by time) for validation.")
    eval_share: float = Field(
        0.2, gt=0.0, lt=1.0, description="Last share of a period: its evaluation slice."
    )
    max_train_per_period: int | None = Field(None, ge=1, description="Random subsample of a period's train.")
    max_valid_per_period: int | None = Field(None, ge=1, description="Random subsample of its validation.")
    max_eval_per_period: int | None = Field(None, ge=1, description="Random subsample of its evaluation.")
    served_len: int = Field(20, ge=1, description="History steps of the served input x (every method).")
    privileged_len: int = Field(200, ge=1, description="History steps of the privileged input x* (SDFT).")
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(512, ge=1)
    length_multiple: int = Field(8, ge=1)
    epochs_first: int = Field(2, ge=1, description="Passes over period 1.")
    epochs: int = Field(1, ge=1, description="Passes over each later period.")
    lr: float = Field(2e-3, gt=0.0, description="AdamW learning rate (kept across periods).")
    weight_decay: float = Field(0.0, ge=0.0)
    replay_buffer: int = Field(5_000, ge=1, description="Reservoir slots for earlier-period examples.")
    replay_ratio: float = Field(0.5, gt=0.0, description="Replayed examples per new example in a batch.")
    ema_rate: float = Field(0.01, gt=0.0, le=1.0, description="EMA step a of the SDFT teacher.")
    beta: float = Field(1.0, ge=0.0, description="Weight of BCE(y, p_theta(x, x*)).")
    kl_weight: float = Field(1.0, ge=0.0, description="lambda of KL(p_phi(x, x*) || p_theta(x)) once on.")
    kl_gate: bool = Field(True, description="Keep lambda = 0 until privileged beats served on validation.")
    gate_min_gain: float = Field(0.0, ge=0.0, description="AUC margin the privileged mode must beat by.")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> ContinualTrainConfig:
        if self.valid_share + self.eval_share >= 0.9:
            raise ValueError(
                f"valid_share + eval_share must leave at least 10% of a period to train on, got "
                f"{self.valid_share} + {self.eval_share}"
            )
        if self.privileged_len <= self.served_len:
            raise ValueError(
                f"privileged_len ({self.privileged_len}) must exceed served_len ({self.served_len}): the "
                "privileged input is the longer history"
            )
        return self


# -- periods ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Period:
    """One time period: indices into the pooled examples (``ContinualData.pool``), each in time order."""

    index: int  # 1-based
    start_ts: int  # inclusive
    end_ts: int  # exclusive
    train: np.ndarray
    valid: np.ndarray
    eval: np.ndarray

    def sizes(self) -> dict[str, int]:
        return {"train": int(self.train.size), "valid": int(self.valid.size), "eval": int(self.eval.size)}


def period_edges(ts: np.ndarray, n_periods: int) -> np.ndarray:
    """k + 1 ts edges: period p holds edges[p-1] <= ts < edges[p]; inner edges at the ts quantiles."""
    ts = np.asarray(ts, dtype=np.int64)
    if ts.size == 0:
        raise ValueError("no examples to cut into periods")
    inner = np.quantile(ts, np.arange(1, n_periods) / n_periods, method="higher").astype(np.int64)
    edges = np.concatenate([[ts.min()], inner, [ts.max() + 1]]).astype(np.int64)
    if np.any(np.diff(edges) <= 0):
        raise ValueError(
            f"cannot cut the examples into {n_periods} periods: too few distinct timestamps "
            f"({np.unique(ts).size}) for the quantile cuts"
        )
    return edges


def _subsample(index: np.ndarray, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    if cap is None or index.size <= cap:
        return index
    return np.sort(rng.choice(index, size=cap, replace=False))


def slice_periods(ts: np.ndarray, edges: np.ndarray, config: ContinualTrainConfig) -> list[Period]:
    """The periods between consecutive ``edges``, each cut by time into train / valid / eval (see the module
    docstring); ``ts`` must be sorted. Subsampling caps are drawn with a seed per period."""
    ts = np.asarray(ts, dtype=np.int64)
    if ts.size and np.any(np.diff(ts) < 0):
        raise ValueError("slice_periods: ts must be sorted (the pooled examples are in time order)")
    periods: list[Period] = []
    for p in range(1, len(edges)):
        lo, hi = int(edges[p - 1]), int(edges[p])
        rows = np.flatnonzero((ts >= lo) & (ts < hi))
        if rows.size == 0:
            raise ValueError(f"period {p} [{lo}, {hi}) has no examples")
        t = ts[rows]
        train_end = 1.0 - config.valid_share - config.eval_share
        cut_valid = np.quantile(t, train_end, method="higher")
        cut_eval = np.quantile(t, 1.0 - config.eval_share, method="higher")
        train, valid, ev = rows[t < cut_valid], rows[(t >= cut_valid) & (t < cut_eval)], rows[t >= cut_eval]
        if train.size == 0 or ev.size == 0:
            raise ValueError(
                f"period {p} has {train.size} train and {ev.size} eval examples: too few distinct timestamps "
                "for the time cuts; use fewer periods"
            )
        rng = np.random.default_rng([config.seed, p, 104_729])
        periods.append(
            Period(
                index=p,
                start_ts=lo,
                end_ts=hi,
                train=_subsample(train, config.max_train_per_period, rng),
                valid=_subsample(valid, config.max_valid_per_period, rng),
                eval=_subsample(ev, config.max_eval_per_period, rng),
            )
        )
    return periods


def pool_examples(data: RankingData) -> SplitArrays:
    """The train, valid and test splits as one array set in time order (stable, so ties keep split order)."""
    parts = [data.splits[s] for s in ("train", "valid", "test") if s in data.splits]
    oracle = None if any(p.oracle is None for p in parts) else np.concatenate([p.oracle for p in parts])
    pooled = SplitArrays(
        item=np.concatenate([p.item for p in parts]),
        user=np.concatenate([p.user for p in parts]),
        ts=np.concatenate([p.ts for p in parts]),
        seq_start=np.concatenate([p.seq_start for p in parts]),
        seq_offset=np.concatenate([p.seq_offset for p in parts]),
        sparse={k: np.concatenate([p.sparse[k] for p in parts]) for k in parts[0].sparse},
        dense=np.concatenate([p.dense for p in parts]),
        labels={k: np.concatenate([p.labels[k] for p in parts]) for k in parts[0].labels},
        oracle=oracle,
    )
    return pooled.subset(np.argsort(pooled.ts, kind="stable"))


@dataclass
class ContinualData:
    data: RankingData
    pool: SplitArrays
    edges: np.ndarray
    periods: list[Period]


def make_continual_data(
    data: RankingData, config: ContinualTrainConfig, edges: np.ndarray | None = None
) -> ContinualData:
    """Pool the examples and cut them into periods (at ``edges`` when given, e.g. a checkpoint's)."""
    if TASK not in data.tasks:
        raise ValueError(f"the data has no {TASK!r} task (tasks {data.tasks})")
    pool = pool_examples(data)
    edges = period_edges(pool.ts, config.n_periods) if edges is None else np.asarray(edges, dtype=np.int64)
    return ContinualData(data=data, pool=pool, edges=edges, periods=slice_periods(pool.ts, edges, config))


# -- replay buffer ------------------------------------------------------------------------------------------


class ReservoirBuffer:
    """A uniform sample of every example offered so far (algorithm R), at most ``capacity`` of them."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"replay_buffer capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.items = np.zeros(0, dtype=np.int64)
        self.seen = 0
        self.rng = np.random.default_rng([seed, 15_485_863])

    def __len__(self) -> int:
        return int(self.items.size)

    def add(self, index: np.ndarray) -> None:
        index = np.asarray(index, dtype=np.int64)
        room = max(self.capacity - self.items.size, 0)
        self.items = np.concatenate([self.items, index[:room]])
        self.seen += min(room, index.size)
        for value in index[room:]:
            self.seen += 1
            slot = int(self.rng.integers(0, self.seen))
            if slot < self.capacity:
                self.items[slot] = value

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.items.size == 0 or n <= 0:
            return np.zeros(0, dtype=np.int64)
        return rng.choice(self.items, size=n, replace=n > self.items.size)

    def state(self) -> dict[str, Any]:
        # The generator state as JSON text: a resumed stream replaces the same slots as an unbroken one.
        rng = json.dumps(self.rng.bit_generator.state)
        return {"items": torch.from_numpy(self.items.copy()), "seen": self.seen, "rng": rng}

    def load(self, state: dict[str, Any]) -> None:
        self.items = state["items"].numpy().astype(np.int64)
        self.seen = int(state["seen"])
        self.rng.bit_generator.state = json.loads(state["rng"])


# -- the learner --------------------------------------------------------------------------------------------


@dataclass
class GateCheck:
    """The SDFT privileged-mode check on a period's validation slice."""

    period: int
    served_auc: float
    privileged_auc: float
    passed: bool


@dataclass
class StepCost:
    step: int
    train_seconds: float
    examples: int  # training examples processed (replayed ones included), summed over epochs
    forward_passes: int  # example-forward passes (SDFT: served + privileged + teacher)
    history_steps: int  # history events read by those passes
    optimizer_steps: int
    kl_weight: float  # the lambda this step trained with
    gate: GateCheck | None = None


@dataclass
class PeriodMetrics:
    period: int
    auc: float
    gauc: float
    n_examples: int
    oracle_auc: float | None = None


def _metrics_or_none(
    labels: np.ndarray, probs: np.ndarray, groups: np.ndarray, oracle: np.ndarray | None
) -> RankingMetrics | None:
    if labels.size == 0 or labels.min() == labels.max():
        return None
    return ranking_metrics(labels, probs, groups=groups, oracle_probs=oracle)


class ContinualLearner:
    """One network learning periods one at a time with one method; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        cdata: ContinualData,
        method: Method,
        config: ContinualTrainConfig,
        device: torch.device | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.model = model
        self.cdata = cdata
        self.method = method
        self.config = config
        self.device = device or torch.device("cpu")
        self.model.to(self.device)
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=config.weight_decay
        )
        self.teacher = EmaTeacher(model, config.ema_rate) if method == "sdft" else None
        self.buffer = ReservoirBuffer(config.replay_buffer, config.seed) if method == "replay" else None
        self.kl_on = method == "sdft" and not config.kl_gate
        self.steps_learned = 0
        self.history: list[StepCost] = []

    # -- training ------------------------------------------------------------------------------------------
    def _batch(self, index: np.ndarray, max_len: int):  # noqa: ANN202
        c = self.config
        return self.cdata.data.make_batch(self.cdata.pool, index, max_len, c.length_multiple).to(self.device)

    def _history_read(self, index: np.ndarray, max_len: int) -> int:
        return int(np.minimum(self.cdata.pool.seq_offset[index], max_len).sum())

    def learn(self, period: Period) -> StepCost:
        """Train on ``period``'s training slice (the next period of the stream), then run the SDFT gate."""
        if period.index != self.steps_learned + 1:
            raise ValueError(
                f"periods are learned in order: expected period {self.steps_learned + 1}, got {period.index}"
            )
        c = self.config
        epochs = c.epochs_first if period.index == 1 else c.epochs
        kl_weight = c.kl_weight if self.kl_on else 0.0
        n_replay = int(round(c.replay_ratio * c.batch_size))
        examples = passes = read = opt_steps = 0
        self.model.train()
        started = time.perf_counter()
        for epoch in range(1, epochs + 1):
            seed = [c.seed, period.index, epoch, 7_919]
            seed_everything(int(np.random.default_rng(seed).integers(2**31)))
            rng = np.random.default_rng(seed)
            order = period.train[rng.permutation(period.train.size)]
            for b in range(0, order.size, c.batch_size):
                index = order[b : b + c.batch_size]
                if self.buffer is not None and len(self.buffer):
                    index = np.concatenate([index, self.buffer.sample(n_replay, rng)])
                served = self._batch(index, c.served_len)
                out = self.model(served)
                labels = served.labels[TASK].float()
                if self.method == "sdft":
                    privileged = self._batch(index, c.privileged_len)
                    priv_out = self.model(privileged)
                    assert self.teacher is not None
                    teacher_logits = self.teacher(privileged).logits[TASK]
                    loss = self_distillation_loss(
                        out.logits[TASK],
                        priv_out.logits[TASK],
                        teacher_logits,
                        labels,
                        beta=c.beta,
                        kl_weight=kl_weight,
                    )
                    loss = loss + out.aux_loss + c.beta * priv_out.aux_loss
                    passes += 3 * index.size
                    read += self._history_read(index, c.served_len) + 2 * self._history_read(
                        index, c.privileged_len
                    )
                else:
                    loss = soft_bce_with_logits(out.logits[TASK].float(), labels).mean() + out.aux_loss
                    passes += index.size
                    read += self._history_read(index, c.served_len)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"period {period.index}: the training loss is {loss.item()}")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                if self.teacher is not None:
                    self.teacher.update(self.model)
                examples += index.size
                opt_steps += 1
        seconds = time.perf_counter() - started
        if self.buffer is not None:
            self.buffer.add(period.train)  # only after the period: the buffer holds earlier periods
        self.steps_learned = period.index
        gate = self.privileged_check(period) if self.method == "sdft" else None
        if gate is not None and gate.passed:
            self.kl_on = True
        cost = StepCost(
            step=period.index,
            train_seconds=seconds,
            examples=examples,
            forward_passes=passes,
            history_steps=read,
            optimizer_steps=opt_steps,
            kl_weight=kl_weight,
            gate=gate,
        )
        self.history.append(cost)
        return cost

    # -- evaluation ----------------------------------------------------------------------------------------
    def _probs(self, index: np.ndarray, max_len: int) -> np.ndarray:
        c = self.config
        part = self.cdata.pool.subset(index)
        return predict(
            self.model,
            self.cdata.data,
            part,
            max_len,
            self.device,
            batch_size=c.eval_batch_size,
            length_multiple=c.length_multiple,
        )[TASK]

    def forward_flops(self, max_len: int, examples: int = 256) -> float:
        """Forward FLOPs per example (torch flop counter, matmul-class ops) of the network reading at most
        ``max_len`` history steps, over the first evaluation examples of period 1."""
        index = self.cdata.periods[0].eval[:examples]
        return count_flops_per_example(lambda: self._probs(index, max_len), int(index.size))

    def privileged_check(self, period: Period) -> GateCheck | None:
        """AUC of the network on the served vs the privileged input over ``period``'s validation slice (None
        when that slice is empty or has one class)."""
        index = period.valid
        if index.size == 0:
            return None
        labels = self.cdata.pool.labels[TASK][index]
        groups = self.cdata.pool.user[index]
        served = _metrics_or_none(labels, self._probs(index, self.config.served_len), groups, None)
        privileged = _metrics_or_none(labels, self._probs(index, self.config.privileged_len), groups, None)
        if served is None or privileged is None:
            return None
        return GateCheck(
            period=period.index,
            served_auc=served.auc,
            privileged_auc=privileged.auc,
            passed=privileged.auc > served.auc + self.config.gate_min_gain,
        )

    def evaluate(self, period: Period) -> PeriodMetrics:
        """Metrics of the served model (``served_len`` history) on ``period``'s evaluation slice."""
        pool = self.cdata.pool
        index = period.eval
        labels = pool.labels[TASK][index]
        oracle = None if pool.oracle is None else pool.oracle[index]
        m = _metrics_or_none(labels, self._probs(index, self.config.served_len), pool.user[index], oracle)
        if m is None:
            raise ValueError(f"period {period.index}: the evaluation slice has one class only; no AUC")
        return PeriodMetrics(
            period=period.index,
            auc=float(m.auc),
            gauc=float(m.gauc) if m.gauc is not None else float("nan"),
            n_examples=int(m.n_examples),
            oracle_auc=None if m.oracle_auc is None else float(m.oracle_auc),
        )

    # -- checkpoints ---------------------------------------------------------------------------------------
    def save(self, directory: Path, extra: dict[str, Any] | None = None) -> Path:
        """Model + optimizer + learner state (and the teacher's weights) under ``directory``."""
        directory = Path(directory)
        if self.teacher is not None:
            save_weights(self.teacher.module, directory / "teacher.safetensors")
        state: dict[str, Any] = {
            "method": self.method,
            "steps_learned": self.steps_learned,
            "kl_on": self.kl_on,
            "edges": torch.from_numpy(self.cdata.edges.copy()),
            **(extra or {}),
        }
        if self.buffer is not None:
            state["buffer"] = self.buffer.state()
        return save_checkpoint(directory, "learner", self.model, self.optimizer, state)

    def load(self, directory: Path) -> dict[str, Any]:
        state = load_checkpoint(Path(directory), "learner", self.model, self.optimizer)
        if state.get("method") != self.method:
            raise ValueError(
                f"checkpoint in {directory} is for method {state.get('method')!r}, not {self.method!r}"
            )
        self.steps_learned = int(state["steps_learned"])
        self.kl_on = bool(state["kl_on"])
        if self.teacher is not None:
            load_weights(self.teacher.module, Path(directory) / "teacher.safetensors")
        if self.buffer is not None and "buffer" in state:
            self.buffer.load(state["buffer"])
        return state


@dataclass
class StepRecord:
    """What one step of one method produced: its cost and the metrics on every learned period."""

    step: int
    cost: StepCost
    metrics: list[PeriodMetrics] = field(default_factory=list)


def write_pointer(path: Path, payload: str) -> None:
    """Write a small text file (a JSON 'latest checkpoint' pointer) temp-then-rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(payload)
