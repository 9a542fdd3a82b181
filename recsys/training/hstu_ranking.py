"""Training and evaluation of the generative ranker (``models.hstu_ranker.HSTURanker``) on the ranking data.

Same data, examples and split as the ranking table (``training.ranking.load_ranking_data``: the same train
subsample, the same validation/test examples, the same history of every example: the user's events strictly
before its ts), the same loop (``training.loop.fit``: early stopping on validation AUC, checkpoints, the run
record) and the same metrics (``evaluation.ranking.ranking_metrics`` through ``training.ranking``'s
``flatten_metrics``), so its row sits next to DIN, DeepFM and HyFormer. What differs is the unit of work:
instead of one forward pass per example, one forward pass per user *segment* gives the loss at every
example of that user in the batch.

A segment is one history window of a user and the examples (targets) that read it: the history events
``[start, end)`` of the user (``end`` = the largest ``seq_offset`` among its targets) and each target's
``limit`` = its ``seq_offset - start`` (it sees exactly its own earlier events in the window, and itself).
A target whose history fits the model (``seq_offset <= max_len``) reads its whole history from the user's
first event, so all such targets of a user share one segment starting at 0: exact, and the common case on
MovieLens-100K. A target with a longer history should read its most recent ``max_len`` events, which begin at
a different event for every offset; ``window_slack`` groups such targets whose offsets are within
``slack`` of each other into one window that ends at the group's last offset, so the group's earliest target
reads between ``max_len - slack`` and ``max_len`` events. Training uses ``train_window_slack`` (default
max_len / 4, fewer forwards); evaluation uses 0 (every target reads exactly its ``min(seq_offset, max_len)``
most recent events, what serving's M-FALCON reads).

Batches: segments of the epoch's examples (the same slices as ``training.ranking.RankingTask.epoch_slice``:
the same per-epoch examples as the other rows), length-bucketed, packed up to ``batch_size`` targets and an
attention budget (batch rows x window tokens^2), in random order. Loss: mean BCE over the batch's targets per
task, plus ``action_loss_weight`` x the cross-entropy of the action bucket (rating / dwell bucket) where the
example is itself a logged event with one (MovieLens: every rating).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from recsys.core.config import FrozenModel
from recsys.evaluation.ranking import RankingMetrics, ranking_metrics
from recsys.models.hstu_ranker import ACTION, History, HSTURanker, Targets
from recsys.training.loop import LoopConfig, fit
from recsys.training.ranking import (
    PROTOCOL,
    RankingData,
    RankingRunResult,
    RankingTrainConfig,
    SplitArrays,
    flatten_metrics,
    train_ranking,
)
from recsys.warehouse.runs import RunLog


class HSTURankingConfig(FrozenModel):
    """Batching of the generative ranker (the shared fields mean what they mean in RankingTrainConfig)."""

    max_len: int = Field(1000, ge=1, description="History events a target reads (the model's max_len).")
    batch_size: int = Field(128, ge=1, description="Most targets (labelled examples) per training batch.")
    epoch_examples: int | None = Field(None, ge=1, description="Training examples per loop epoch.")
    eval_batch_size: int = Field(1024, ge=1, description="Most targets per evaluation batch.")
    attention_budget: int = Field(
        1 << 23, ge=1, description="Most batch rows x window tokens^2 per batch (bounds attention memory)."
    )
    train_window_slack: int | None = Field(
        None, ge=0, description="Offsets grouped into one window beyond max_len (training); None = max_len/4."
    )
    action_loss_weight: float = Field(1.0, ge=0.0, description="Weight of the action-bucket cross-entropy.")
    length_bucketing: bool = True
    bucket_batches: int = Field(32, ge=1)
    flop_examples: int = Field(512, ge=1, description="Random test examples the FLOP count averages over.")

    @classmethod
    def from_ranking(cls, config: RankingTrainConfig, **overrides: Any) -> HSTURankingConfig:
        """The ranking table's train config (max_len, batch size, epoch size, ...) for this task."""
        shared = {
            "max_len": config.max_len,
            "batch_size": config.batch_size,
            "epoch_examples": config.epoch_examples,
            "length_bucketing": config.length_bucketing,
            "bucket_batches": config.bucket_batches,
            "flop_examples": config.flop_examples,
        }
        return cls(**{**shared, **overrides})

    @property
    def slack(self) -> int:
        return self.max_len // 4 if self.train_window_slack is None else self.train_window_slack


@dataclass(frozen=True)
class Segment:
    user: int
    start: int  # first history event (offset within the user's history)
    end: int  # one past the last history event any target reads
    rows: np.ndarray  # the targets: row indices into the split


def segments(split: SplitArrays, rows: np.ndarray, max_len: int, slack: int) -> list[Segment]:
    """Group the examples ``rows`` of ``split`` into user segments (module docstring)."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return []
    order = np.lexsort((split.seq_offset[rows], split.user[rows]))
    rows = rows[order]
    users, offsets = split.user[rows], split.seq_offset[rows]
    out: list[Segment] = []
    i, n = 0, rows.size
    while i < n:
        user = int(users[i])
        j = i
        if offsets[i] <= max_len:  # every target of the user that fits reads from event 0: one segment
            while j < n and users[j] == user and offsets[j] <= max_len:
                j += 1
            out.append(Segment(user, 0, int(offsets[j - 1]), rows[i:j]))
        else:
            first = int(offsets[i])
            while j < n and users[j] == user and offsets[j] - first <= slack:
                j += 1
            end = int(offsets[j - 1])
            out.append(Segment(user, end - max_len, end, rows[i:j]))
        i = j
    return out


def example_actions(data: RankingData, split: SplitArrays) -> np.ndarray:
    """[N] the action bucket of each example's own logged event (same user, item and ts), 0 if none."""
    h = data.histories
    out = np.zeros(len(split), dtype=np.int64)
    action = h.side[ACTION]
    end = split.seq_start + data.histories.user_length[split.user]
    pending = np.arange(len(split))
    k = 0
    while pending.size:  # events at the example's ts follow its seq_offset (strictly-before count)
        pos = split.seq_start[pending] + split.seq_offset[pending] + k
        inside = pos < end[pending]
        pending, pos = pending[inside], pos[inside]
        same_ts = h.ts[pos] == split.ts[pending]
        pending, pos = pending[same_ts], pos[same_ts]
        hit = h.item[pos] == split.item[pending]
        out[pending[hit]] = action[pos[hit]]
        pending = pending[~hit]
        k += 1
    return out


def segment_batch(
    data: RankingData,
    split: SplitArrays,
    segs: list[Segment],
    tasks: tuple[str, ...],
    actions: np.ndarray | None = None,
) -> tuple[History, Targets, np.ndarray]:
    """(History [B, N], Targets [B, M], target rows [B, M] (-1 = padding)) of the segments."""
    h = data.histories
    b = len(segs)
    n = max(1, max(s.end - s.start for s in segs))
    m = max(s.rows.size for s in segs)
    lengths = np.array([s.end - s.start for s in segs], dtype=np.int64)
    valid = np.arange(n)[None, :] < lengths[:, None]
    starts = np.array([int(h.user_start[s.user]) + s.start for s in segs], dtype=np.int64)
    pos = np.where(valid, starts[:, None] + np.arange(n)[None, :], 0)
    history = History(
        items=torch.from_numpy(np.where(valid, h.item[pos], 0)),
        side={k: torch.from_numpy(np.where(valid, v[pos], 0)) for k, v in h.side.items()},
        ts=torch.from_numpy(np.where(valid, h.ts[pos], 0)),
        lengths=torch.from_numpy(lengths),
    )
    rows = np.full((b, m), -1, dtype=np.int64)
    for r, s in enumerate(segs):
        rows[r, : s.rows.size] = s.rows
    tv = rows >= 0
    p = np.where(tv, rows, 0)
    seg_start = np.array([s.start for s in segs], dtype=np.int64)

    def col(values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.where(tv, values[p], 0))

    targets = Targets(
        items=col(split.item),
        sparse={k: col(v) for k, v in split.sparse.items()},
        dense=torch.from_numpy(split.dense[p] * tv[:, :, None].astype(np.float32)),
        ts=col(split.ts),
        limits=torch.from_numpy(np.where(tv, split.seq_offset[p] - seg_start[:, None], 0)),
        labels={t: torch.from_numpy(np.where(tv, split.labels[t][p], 0.0).astype(np.float32)) for t in tasks},
        action=None if actions is None else col(actions),
    )
    return history, targets, rows


def _pack(
    segs: list[Segment], tokens_per_event: int, max_targets: int, budget: int, rng: np.random.Generator | None
) -> list[list[Segment]]:
    """Consecutive segments into batches of at most ``max_targets`` targets and ``budget`` rows x tokens^2."""
    batches: list[list[Segment]] = []
    cur: list[Segment] = []
    targets, width = 0, 0
    for s in segs:
        w = max(width, (s.end - s.start) * tokens_per_event + 1)
        if cur and (targets + s.rows.size > max_targets or (len(cur) + 1) * w * w > budget):
            batches.append(cur)
            cur, targets, w = [], 0, (s.end - s.start) * tokens_per_event + 1
        cur.append(s)
        targets += s.rows.size
        width = w
    if cur:
        batches.append(cur)
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def sequence_logits(
    model: HSTURanker,
    data: RankingData,
    split: SplitArrays,
    device: torch.device | str,
    *,
    batch_size: int = 1024,
    budget: int = 1 << 23,
) -> dict[str, np.ndarray]:
    """Logits per task for every example of ``split`` (split order), each reading exactly its
    min(seq_offset, max_len) most recent events (slack 0: what serving reads)."""
    tasks = model.config.features.tasks
    out = {t: np.zeros(len(split), dtype=np.float64) for t in tasks}
    segs = segments(split, np.arange(len(split)), model.max_len, 0)
    segs.sort(key=lambda s: s.end - s.start)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for group in _pack(segs, model.config.tokens_per_event, batch_size, budget, None):
                history, targets, rows = segment_batch(data, split, group, ())
                logits = model.score(history.to(device), targets.to(device))
                keep = rows >= 0
                for t in tasks:
                    out[t][rows[keep]] = logits[t].float().cpu().numpy()[keep]
    finally:
        model.train(was_training)
    return out


def evaluate_sequences(
    model: HSTURanker,
    data: RankingData,
    split: str,
    config: HSTURankingConfig,
    device: torch.device,
    *,
    oracle: bool = True,
) -> dict[str, RankingMetrics]:
    """``ranking_metrics`` per task on ``split``, as ``training.ranking.evaluate`` computes them."""
    s = data.splits[split]
    logits = sequence_logits(
        model, data, s, device, batch_size=config.eval_batch_size, budget=config.attention_budget
    )
    out: dict[str, RankingMetrics] = {}
    for t in data.tasks:
        labels = s.labels[t]
        if labels.min() == labels.max():
            continue
        out[t] = ranking_metrics(
            labels,
            1.0 / (1.0 + np.exp(-logits[t])),
            groups=s.user,
            oracle_probs=s.oracle if (oracle and t == "click" and s.oracle is not None) else None,
        )
    if "click" not in out:
        raise ValueError(f"the {split} split has only one class of 'click': cannot compute AUC")
    return out


@dataclass
class SegmentBatch:
    """One training batch: the segments' histories, their targets and how many targets are real."""

    history: History
    targets: Targets
    n_targets: int


class HSTURankingTask:
    """The ``training.loop.TrainTask`` of the generative ranker: one forward per user segment."""

    def __init__(
        self, model: HSTURanker, data: RankingData, config: HSTURankingConfig, seed: int = 0
    ) -> None:
        if model.max_len != config.max_len:
            raise ValueError(f"max_len: the model reads {model.max_len} events but the task {config.max_len}")
        self.model = model
        self.data = data
        self.config = config
        self.seed = seed
        self.train = data.splits["train"]
        self.actions = example_actions(data, self.train) if model.action_head is not None else None

    def epoch_slice(self, epoch: int) -> np.ndarray:
        """The same examples per loop epoch as ``training.ranking.RankingTask.epoch_slice``."""
        n = len(self.train)
        size = min(self.config.epoch_examples or n, n)
        per_pass = -(-n // size)
        pass_no, part = divmod(epoch - 1, per_pass)
        order = np.random.default_rng([self.seed, pass_no, 7919]).permutation(n)
        return order[part * size : (part + 1) * size]

    def batch_segments(self, epoch: int, rng: np.random.Generator) -> list[list[Segment]]:
        c = self.config
        segs = segments(self.train, self.epoch_slice(epoch), c.max_len, c.slack)
        segs = [segs[i] for i in rng.permutation(len(segs))]
        if c.length_bucketing:  # sort by window within groups, so a batch pads little
            group = max(1, c.bucket_batches * max(1, c.batch_size // 8))
            segs = [
                s
                for g in range(0, len(segs), group)
                for s in sorted(segs[g : g + group], key=lambda s: s.end - s.start)
            ]
        return _pack(segs, self.model.config.tokens_per_event, c.batch_size, c.attention_budget, rng)

    def train_batches(self, epoch: int, rng: np.random.Generator) -> Iterator[SegmentBatch]:
        for group in self.batch_segments(epoch, rng):
            history, targets, rows = segment_batch(
                self.data, self.train, group, self.data.tasks, self.actions
            )
            yield SegmentBatch(history, targets, int((rows >= 0).sum()))

    def loss(self, model: nn.Module, batch: SegmentBatch, device: torch.device) -> torch.Tensor:
        history, targets = batch.history.to(device), batch.targets.to(device)
        out = model.score(history, targets)  # type: ignore[operator]
        valid = targets.items > 0
        total = torch.zeros((), device=device)
        for task, label in targets.labels.items():
            total = total + F.binary_cross_entropy_with_logits(out[task].float()[valid], label[valid])
        if targets.action is not None and ACTION in out and self.config.action_loss_weight > 0:
            has = valid & (targets.action > 0)
            if bool(has.any()):
                ce = F.cross_entropy(out[ACTION].float()[has], targets.action[has])
                total = total + self.config.action_loss_weight * ce
        return total

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        assert isinstance(model, HSTURanker)
        metrics = evaluate_sequences(model, self.data, "valid", self.config, device, oracle=False)
        return flatten_metrics(metrics)

    def test(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        assert isinstance(model, HSTURanker)
        return flatten_metrics(evaluate_sequences(model, self.data, "test", self.config, device))

    def flop_probe(self, model: nn.Module, device: torch.device) -> tuple[Callable[[], Any], int]:
        """Forward passes over random test examples, grouped as evaluation groups them."""
        test = self.data.splits["test"]
        rng = np.random.default_rng(0)
        n = min(len(test), self.config.flop_examples)
        sample = test.subset(np.sort(rng.choice(len(test), size=n, replace=False)))
        assert isinstance(model, HSTURanker)

        def run() -> None:
            sequence_logits(
                model,
                self.data,
                sample,
                device,
                batch_size=self.config.eval_batch_size,
                budget=self.config.attention_budget,
            )

        return run, n


def train_hstu_ranking(
    name: str,
    model: HSTURanker,
    data: RankingData,
    *,
    seed: int,
    train_config: RankingTrainConfig | HSTURankingConfig | None = None,
    loop_config: LoopConfig | None = None,
    model_config: FrozenModel | None = None,
    checkpoint_dir: str | Path | None = None,
    run_log: RunLog | None = None,
) -> RankingRunResult:
    """``training.ranking.train_ranking`` for the generative ranker: early stopping on validation AUC, the
    test split evaluated once on the best weights. ``train_config``: the ranking table's (its shared fields
    are taken over, see ``HSTURankingConfig.from_ranking``) or this task's own."""
    if isinstance(train_config, RankingTrainConfig) or train_config is None:
        config = HSTURankingConfig.from_ranking(train_config or RankingTrainConfig(max_len=model.max_len))
    else:
        config = train_config
    base = loop_config or LoopConfig(monitor="auc", mode="max", patience=1, max_epochs=3)
    loop_config = LoopConfig(**{**base.model_dump(), "seed": seed})
    task = HSTURankingTask(model, data, config, seed)
    run_config = {
        "model": name,
        "model_config": model_config.model_dump(mode="json", exclude={"features"}) if model_config else None,
        "train": config.model_dump(mode="json"),
        "data": data.config.model_dump(mode="json"),
        "dataset": data.dataset,
        "feature_spec": data.feature_spec(config.max_len).model_dump(mode="json"),
        "task": "hstu_ranking",
    }
    protocol = f"{PROTOCOL}; history {config.max_len}; seed {seed}; one forward per user segment"
    result = fit(
        task,
        loop_config,
        checkpoint_dir=checkpoint_dir,
        run_log=run_log,
        run_kind="ranking",
        run_name=name,
        run_config=run_config,
        data_version=data.data_version,
        protocol=protocol,
        test_fn=task.test,
    )
    return RankingRunResult.from_fit(name, seed, config.max_len, result)


def train_ranking_model(
    name: str,
    model: nn.Module,
    data: RankingData,
    *,
    seed: int,
    train_config: RankingTrainConfig | HSTURankingConfig | None = None,
    **kwargs: Any,
) -> RankingRunResult:
    """``train_hstu_ranking`` for the generative ranker, ``training.ranking.train_ranking`` for the rest."""
    if isinstance(model, HSTURanker):
        return train_hstu_ranking(name, model, data, seed=seed, train_config=train_config, **kwargs)
    if isinstance(train_config, HSTURankingConfig):
        raise TypeError(f"{name}: an HSTURankingConfig is for the generative ranker only")
    return train_ranking(name, model, data, seed=seed, train_config=train_config, **kwargs)


def teacher_logits(
    model: HSTURanker, data: RankingData, split: SplitArrays, device: torch.device | str = "cpu"
) -> dict[str, np.ndarray]:
    """Logits per task of every row of ``split`` (the distillation teacher's scoring path)."""
    return sequence_logits(model, data, split, device)
