"""Contrastive training of the user encoder under a mask schedule: causal, bidirectional, scheduler, GG-SM.

Data (``split_history_future``): each user's events in time order; the last ``future_fraction`` of them (at
least one, at most ``max_future``) are the user's *next period*, held out for evaluation (the next-period
genre probe); everything before is the user's *history*, the only part training reads.

Training pairs (``ContrastiveTask.train_batches``): every epoch, each user contributes one pair cut at a
random point c of the history: the encoder reads history[:c] (the last ``max_len`` events), the future
embedding reads history[c : c + future_len]. Loss: InfoNCE between the two, temperature ``temperature``,
in-batch negatives; a negative whose future is the same set of items as the positive's is masked as a false
negative (compared on the item ids, not on embeddings, which are all alike at initialisation).

Mask schedules (``MaskSchedule``; spec: models.md, "GG-SM"). Visibility of a future key, per position:
- ``causal``: 0 throughout, and at inference.
- ``bidirectional``: 1 throughout, and at inference.
- ``scheduler``: 0 for the first ``warmup_fraction`` of the steps, then linear to 1 at the last step;
  bidirectional at inference.
- ``ggsm``: during the warm-up, the visibility of position j is the running mean (EMA, ``ema``) of
  ||dL/dh_j|| normalised by each sequence's largest valid norm (larger gradient = more visible), read from the
  previous step's backward through a hook on the token states entering the encoder (no extra pass, no
  parameters);
  then frozen and moved linearly to 1 by the last step; bidirectional at inference.
OPEN choices and what was picked: the soft mask is one visibility per absolute position (shared by users,
so that it can be "frozen"); the gradient is taken at the token states entering the first block (at the
final states mean pooling gives every token the same gradient, which carries no signal); the
scheduler's transition starts where GG-SM's warm-up ends, so the two are compared at the same step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from recsys.core.config import FrozenModel
from recsys.models.user_encoder import UserEncoder

MaskKind = Literal["causal", "bidirectional", "scheduler", "ggsm"]
MASK_KINDS: tuple[str, ...] = ("causal", "bidirectional", "scheduler", "ggsm")


class MaskScheduleConfig(FrozenModel):
    kind: MaskKind = "ggsm"
    warmup_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="Share of the steps before the move.")
    ema: float = Field(0.9, ge=0.0, lt=1.0, description="GG-SM: weight of the old visibility per step.")


class ContrastiveConfig(FrozenModel):
    batch_size: int = Field(128, ge=2, description="Users per step (in-batch negatives: batch_size - 1).")
    temperature: float = Field(0.1, gt=0.0)
    future_len: int = Field(10, ge=1, description="Events after the cut that the future embedding reads.")
    min_history: int = Field(2, ge=1, description="Fewest events before the cut.")
    future_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="Share of each user's events held out.")
    max_future: int = Field(20, ge=1, description="At most this many events held out per user.")
    eval_batch_size: int = Field(256, ge=1)


@dataclass(frozen=True)
class UserHistories:
    """Per user (in ``user_ids`` order): the history item ids and the held-out next-period item ids."""

    user_ids: list[Any]
    history: list[np.ndarray]
    future: list[np.ndarray]
    num_items: int


def split_history_future(sequences: pl.DataFrame, num_items: int, config: ContrastiveConfig) -> UserHistories:
    """Users with at least ``min_history + 2`` events, each cut into history and held-out next period."""
    ids, history, future = [], [], []
    for user_id, items in zip(sequences["user_id"].to_list(), sequences["item_idx"].to_list(), strict=True):
        items = np.asarray(items, dtype=np.int64)
        held = min(config.max_future, max(1, round(config.future_fraction * len(items))))
        if len(items) - held < config.min_history + 1:
            continue
        ids.append(user_id)
        history.append(items[:-held])
        future.append(items[-held:])
    if len(ids) < 2:
        raise ValueError(f"only {len(ids)} users have enough events (min_history={config.min_history})")
    return UserHistories(ids, history, future, num_items)


def pad(rows: list[np.ndarray], width: int) -> tuple[Tensor, Tensor]:
    """Right-padded [B, width] int64 of the last ``width`` entries of each row, and the lengths."""
    out = np.zeros((len(rows), width), dtype=np.int64)
    lengths = np.zeros(len(rows), dtype=np.int64)
    for r, row in enumerate(rows):
        row = row[-width:]
        out[r, : len(row)] = row
        lengths[r] = len(row)
    return torch.from_numpy(out), torch.from_numpy(lengths)


@dataclass
class MaskSchedule:
    """The visibility of future tokens at each training step, and at inference (see the module docstring)."""

    config: MaskScheduleConfig
    total_steps: int
    max_len: int
    step: int = 0
    visibility: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.visibility = torch.zeros(self.max_len)

    @property
    def warmup_steps(self) -> int:
        return max(1, int(self.config.warmup_fraction * self.total_steps))

    @property
    def reads_gradients(self) -> bool:
        return self.config.kind == "ggsm" and self.step < self.warmup_steps

    def progress(self) -> float:
        """0 until the warm-up ends, then linear to 1 at the last step."""
        span = max(1, self.total_steps - 1 - self.warmup_steps)
        return min(1.0, max(0.0, (self.step - self.warmup_steps) / span))

    def training_visibility(self) -> Tensor | None:
        kind = self.config.kind
        if kind == "causal":
            return None
        if kind == "bidirectional":
            return torch.ones(self.max_len)
        if kind == "scheduler":
            return torch.full((self.max_len,), self.progress())
        if self.step < self.warmup_steps:
            return self.visibility.clone()
        return self.visibility + (1.0 - self.visibility) * self.progress()

    def inference_visibility(self) -> Tensor | None:
        return None if self.config.kind == "causal" else torch.ones(self.max_len)

    def observe(self, grad: Tensor, lengths: Tensor) -> None:
        """GG-SM warm-up: fold one step's ||dL/dh_j|| [B, N, D] into the per-position visibility."""
        norms = grad.detach().float().norm(dim=-1).cpu()  # [B, N]
        n = norms.shape[1]
        valid = torch.arange(n)[None, :] < lengths.cpu()[:, None]
        norms = torch.where(valid, norms, 0.0)
        scaled = norms / norms.amax(dim=1, keepdim=True).clamp(min=1e-12)  # [B, N] in [0, 1]
        counts = valid.sum(0)  # [N]
        mean = scaled.sum(0) / counts.clamp(min=1)
        seen = counts > 0
        a = self.config.ema
        self.visibility[:n][seen] = a * self.visibility[:n][seen] + (1 - a) * mean[seen]


@dataclass(frozen=True)
class PairBatch:
    items: Tensor  # [B, N]
    lengths: Tensor  # [B]
    future: Tensor  # [B, K]
    future_lengths: Tensor  # [B]
    same_future: Tensor  # [B, B] bool: rows i != j whose futures are the same item set


def same_sets(rows: list[np.ndarray]) -> Tensor:
    """[B, B] bool: True where rows i != j hold the same set of items."""
    keys = [tuple(sorted(set(r.tolist()))) for r in rows]
    same = torch.tensor([[a == b for b in keys] for a in keys], dtype=torch.bool)
    return same & ~torch.eye(len(keys), dtype=torch.bool)


def info_nce(user: Tensor, future: Tensor, temperature: float, same: Tensor | None = None) -> Tensor:
    """InfoNCE of [B, D] user vs [B, D] future embeddings, in-batch negatives; ``same`` [B, B] masks the
    false negatives (off-diagonal pairs with the same future)."""
    logits = user @ future.T / temperature  # [B, B]
    if same is not None:
        logits = logits.masked_fill(same.to(logits.device), float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(user), device=user.device))


class ContrastiveTask:
    """A ``TrainTask`` of the shared loop: pairs, InfoNCE, the mask schedule, per-step loss and time."""

    def __init__(
        self,
        model: UserEncoder,
        data: UserHistories,
        config: ContrastiveConfig,
        schedule: MaskSchedule,
    ) -> None:
        self.model = model
        self.data = data
        self.config = config
        self.schedule = schedule
        self.max_len = model.config.max_len
        self.step_losses: list[float] = []
        self.step_seconds: list[float] = []
        self._pending: tuple[Tensor, Tensor] | None = None
        self._grad: Tensor | None = None
        self._last_call: float | None = None
        self.valid = self._validation_pairs()

    def steps_per_epoch(self) -> int:
        return -(-len(self.data.user_ids) // self.config.batch_size)

    def _pair(self, items: np.ndarray, cut: int) -> tuple[np.ndarray, np.ndarray]:
        return items[max(0, cut - self.max_len) : cut], items[cut : cut + self.config.future_len]

    def _batch(self, pairs: list[tuple[np.ndarray, np.ndarray]]) -> PairBatch:
        items, lengths = pad([p[0] for p in pairs], self.max_len)
        future, future_lengths = pad([p[1] for p in pairs], self.config.future_len)
        width = int(lengths.max())  # no wider than the longest history of the batch
        return PairBatch(items[:, :width], lengths, future, future_lengths, same_sets([p[1] for p in pairs]))

    def _validation_pairs(self) -> list[PairBatch]:
        """Each user's last ``future_len`` history events (at most a quarter) as the fixed future."""
        pairs = []
        for items in self.data.history:
            held = max(1, min(self.config.future_len, len(items) // 4))
            pairs.append(self._pair(items, len(items) - held))
        size = self.config.eval_batch_size
        return [self._batch(pairs[s : s + size]) for s in range(0, len(pairs), size)]

    def train_batches(self, epoch: int, rng: np.random.Generator) -> Iterator[PairBatch]:
        order = rng.permutation(len(self.data.user_ids))
        for start in range(0, len(order), self.config.batch_size):
            chosen = order[start : start + self.config.batch_size]
            if len(chosen) < 2:
                continue
            pairs = []
            for u in chosen:
                items = self.data.history[u]
                cut = int(rng.integers(self.config.min_history, len(items)))
                pairs.append(self._pair(items, cut))
            yield self._batch(pairs)

    def _capture(self, grad: Tensor) -> None:
        self._grad = grad

    def loss(self, model: nn.Module, batch: PairBatch, device: torch.device) -> Tensor:
        now = time.perf_counter()
        if self._last_call is not None:
            self.step_seconds.append(now - self._last_call)
        self._last_call = now
        if self._pending is not None and self._grad is not None:
            self.schedule.observe(self._grad, self._pending[1])  # the previous step's gradient norms
        self._pending, self._grad = None, None
        visibility = self.schedule.training_visibility()
        items, lengths = batch.items.to(device), batch.lengths.to(device)
        user, tokens = model(items, lengths, None if visibility is None else visibility[: items.shape[1]])
        if self.schedule.reads_gradients and tokens.requires_grad:
            tokens.register_hook(self._capture)
            self._pending = (items, lengths)
        future = model.encode_future(batch.future.to(device), batch.future_lengths.to(device))
        loss = info_nce(user, future, self.config.temperature, batch.same_future)
        self.step_losses.append(float(loss.detach()))
        self.schedule.step += 1
        return loss

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Pair retrieval on the fixed validation pairs: rank of each user's own future among all users'."""
        model.eval()
        users, futures = [], []
        visibility = self.schedule.inference_visibility()
        with torch.no_grad():
            for b in self.valid:
                vis = None if visibility is None else visibility[: b.items.shape[1]]
                users.append(model(b.items.to(device), b.lengths.to(device), vis)[0])
                futures.append(model.encode_future(b.future.to(device), b.future_lengths.to(device)))
        model.train()
        scores = torch.cat(users) @ torch.cat(futures).T  # [U, U]
        own = scores.diagonal()[:, None]
        ranks = (scores > own).sum(1) + 1
        return {
            "pair_recall@10": float((ranks <= 10).float().mean()),
            "pair_mrr": float((1.0 / ranks.float()).mean()),
        }

    def flop_probe(self, model: nn.Module, device: torch.device) -> tuple[Callable[[], Any], int]:
        b = self.valid[0]
        items, lengths = b.items.to(device), b.lengths.to(device)
        return (lambda: model(items, lengths, None)), int(items.shape[0])


def embed_users(
    model: UserEncoder,
    histories: list[np.ndarray],
    visibility: Tensor | None,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """[U, D] user embeddings of whole histories (their last ``max_len`` events) under ``visibility``."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(histories), batch_size):
            items, lengths = pad(histories[start : start + batch_size], model.config.max_len)
            width = int(lengths.max())
            vis = None if visibility is None else visibility[:width]
            out.append(model(items[:, :width].to(device), lengths.to(device), vis)[0].cpu())
    return torch.cat(out).numpy()
