"""Next-item retrieval evaluation: the leave-one-out protocol of specs/evaluation.md and its metrics.

Protocol (``PROTOCOL`` is stored next to every figure):
- each user's interactions in the order the sequences table gives (time, then source row: the documented
  tie-break of ``recsys.features.sequences``);
- leave-one-out: last interaction = test target, second-to-last = validation target, training sees
  everything before the validation target; users with fewer than 3 interactions are kept in training only;
- model input: the most recent ``history_len`` items before the target (200 for MovieLens);
- candidates: all items; every item in the user's history (everything before the target, not only the
  model's window) is excluded (score -inf). If the target itself occurs in the history (re-consumption), the
  target keeps its score: excluding it would make the case unwinnable;
- rank r (1-based) of the target; ties count against the target (r = 1 + #{other candidates with
  score >= target's}), so a model that scores everything equally ranks last, not first;
- HR@K = 1[r <= K]; NDCG@K = 1/log2(r + 1) if r <= K; MRR@K = 1/r if r <= K; averaged over users.
The sampled variant (target vs ``sampled_negatives`` items drawn uniformly without replacement from the
non-history items) is reported under names with ``sampled`` in them: it is not comparable with full ranking.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

PROTOCOL = (
    "leave-one-out (last = test, second-to-last = validation, <3 interactions train-only); "
    "full ranking over all items, user history excluded; ties against the target"
)
DEFAULT_KS: tuple[int, ...] = (10, 50, 200)
METRIC_KINDS: tuple[str, ...] = ("hr", "ndcg", "mrr")


@dataclass(frozen=True)
class EvalBatch:
    """Right-padded tensors for one batch of evaluation cases (layout of ``recsys.models.sequential``)."""

    users: torch.Tensor  # [B] user_idx
    items: torch.Tensor  # [B, L] most recent history, oldest first, 0-padded on the right
    ts: torch.Tensor  # [B, L]
    query_ts: torch.Tensor  # [B, L] ts of the next item; the target's ts at the last valid position
    lengths: torch.Tensor  # [B]
    targets: torch.Tensor  # [B]
    exclude: torch.Tensor  # [B, M] the whole history before the target, 0-padded

    def to(self, device: torch.device | str) -> EvalBatch:
        return EvalBatch(
            *(
                t.to(device)
                for t in (
                    self.users,
                    self.items,
                    self.ts,
                    self.query_ts,
                    self.lengths,
                    self.targets,
                    self.exclude,
                )
            )
        )


@dataclass(frozen=True)
class EvalCases:
    """One evaluation target per user with the user's full history before it."""

    users: np.ndarray  # [U] int64
    histories: list[np.ndarray]  # U arrays of item_idx, oldest first
    history_ts: list[np.ndarray]
    targets: np.ndarray  # [U] int64
    target_ts: np.ndarray  # [U] int64

    def __len__(self) -> int:
        return len(self.targets)

    def batch(self, index: np.ndarray, history_len: int) -> EvalBatch:
        rows = [int(i) for i in index]
        width = max(1, max((min(len(self.histories[i]), history_len) for i in rows), default=1))
        full = max(1, max((len(self.histories[i]) for i in rows), default=1))
        items = np.zeros((len(rows), width), dtype=np.int64)
        ts = np.zeros_like(items)
        query_ts = np.zeros_like(items)
        lengths = np.zeros(len(rows), dtype=np.int64)
        exclude = np.zeros((len(rows), full), dtype=np.int64)
        for r, i in enumerate(rows):
            h, t = self.histories[i][-history_len:], self.history_ts[i][-history_len:]
            n = len(h)
            items[r, :n], ts[r, :n] = h, t
            query_ts[r, : n - 1] = t[1:]
            if n:
                query_ts[r, n - 1] = self.target_ts[i]
            lengths[r] = n
            exclude[r, : len(self.histories[i])] = self.histories[i]
        return EvalBatch(
            users=torch.from_numpy(self.users[rows]),
            items=torch.from_numpy(items),
            ts=torch.from_numpy(ts),
            query_ts=torch.from_numpy(query_ts),
            lengths=torch.from_numpy(lengths),
            targets=torch.from_numpy(self.targets[rows]),
            exclude=torch.from_numpy(exclude),
        )

    def batches(self, batch_size: int, history_len: int) -> Iterator[tuple[np.ndarray, EvalBatch]]:
        """(case indices, batch) in order of input length, so that a batch carries little padding."""
        lengths = np.fromiter(
            (min(len(h), history_len) for h in self.histories), dtype=np.int64, count=len(self)
        )
        order = np.argsort(lengths, kind="stable")
        for start in range(0, len(self), batch_size):
            index = order[start : start + batch_size]
            yield index, self.batch(index, history_len)


@dataclass(frozen=True)
class LeaveOneOutSplit:
    num_items: int
    train_users: np.ndarray  # [T] user_idx of every user with a training part
    train_items: list[np.ndarray]  # the training part of each of those users, oldest first
    train_ts: list[np.ndarray]
    valid: EvalCases
    test: EvalCases

    def item_counts(self) -> np.ndarray:
        """[num_items + 1] interaction counts over the training part (index 0 = padding, 0)."""
        counts = np.zeros(self.num_items + 1, dtype=np.int64)
        if self.train_items:
            np.add.at(counts, np.concatenate(self.train_items), 1)
        return counts


def leave_one_out(sequences: pl.DataFrame, num_items: int) -> LeaveOneOutSplit:
    """Split a sequences frame (``user_idx``, ``item_idx`` list, ``ts`` list; time-ordered) leave-one-out."""
    for column in ("user_idx", "item_idx", "ts"):
        if column not in sequences.columns:
            raise ValueError(f"sequences frame has no column {column!r} (has {sequences.columns})")
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    users = sequences["user_idx"].to_numpy().astype(np.int64)
    items_col = sequences["item_idx"].to_list()
    ts_col = sequences["ts"].to_list()
    train_users, train_items, train_ts = [], [], []
    cases: dict[str, tuple[list, list, list, list, list]] = {
        "valid": ([], [], [], [], []),
        "test": ([], [], [], [], []),
    }
    for user, raw_items, raw_ts in zip(users, items_col, ts_col, strict=True):
        items = np.asarray(raw_items if raw_items is not None else [], dtype=np.int64)
        ts = np.asarray(raw_ts if raw_ts is not None else [], dtype=np.int64)
        if len(items) != len(ts):
            raise ValueError(f"user_idx {user}: item_idx has {len(items)} entries but ts has {len(ts)}")
        if len(items) and (items.min() < 1 or items.max() > num_items):
            raise ValueError(
                f"user_idx {user}: item_idx must lie in 1..{num_items}, got {items.min()}..{items.max()}"
            )
        if len(ts) > 1 and bool((np.diff(ts) < 0).any()):
            raise ValueError(
                f"user_idx {user}: ts is not in time order (sequences must be sorted by (ts, src_row))"
            )
        n = len(items)
        if n == 0:
            continue
        cut = n - 2 if n >= 3 else n
        train_users.append(user)
        train_items.append(items[:cut])
        train_ts.append(ts[:cut])
        if n >= 3:
            for name, target in (("valid", n - 2), ("test", n - 1)):
                u, h, ht, tg, tt = cases[name]
                u.append(user)
                h.append(items[:target])
                ht.append(ts[:target])
                tg.append(items[target])
                tt.append(ts[target])

    def build(name: str) -> EvalCases:
        u, h, ht, tg, tt = cases[name]
        return EvalCases(
            np.asarray(u, dtype=np.int64),
            h,
            ht,
            np.asarray(tg, dtype=np.int64),
            np.asarray(tt, dtype=np.int64),
        )

    return LeaveOneOutSplit(
        num_items,
        np.asarray(train_users, dtype=np.int64),
        train_items,
        train_ts,
        build("valid"),
        build("test"),
    )


# -- metrics -------------------------------------------------------------------------------------------------
def ranks_from_scores(
    scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None
) -> torch.Tensor:
    """1-based rank of each target among all candidates; columns in ``exclude`` (and column 0) drop out.

    scores [B, C] (column 0 = padding), targets [B], exclude [B, M] item indices (0 = padding).
    """
    if scores.ndim != 2 or targets.shape != scores.shape[:1]:
        raise ValueError(
            f"scores must be [B, C] and targets [B]; got {tuple(scores.shape)}, {tuple(targets.shape)}"
        )
    scores = scores.float().clone()
    target_scores = scores.gather(1, targets.unsqueeze(1))  # [B, 1]
    if not bool(torch.isfinite(target_scores).all()):
        raise ValueError("a target has a non-finite score (NaN or inf): the model output is broken")
    scores[:, 0] = float("-inf")
    if exclude is not None and exclude.numel():
        scores.scatter_(1, exclude, float("-inf"))
    scores.scatter_(1, targets.unsqueeze(1), target_scores)  # a re-consumed target stays a candidate
    return (scores >= target_scores).sum(dim=1)  # the target counts itself: rank = 1 + #others >= it


def per_user_metrics(
    ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS, *, sampled: bool = False
) -> dict[str, np.ndarray]:
    """Per-user HR/NDCG/MRR@K from 1-based ranks; names ``hr@10`` or ``hr_sampled@10``."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size and ranks.min() < 1:
        raise ValueError("ranks are 1-based: got a rank below 1")
    tag = "_sampled" if sampled else ""
    out: dict[str, np.ndarray] = {}
    for k in ks:
        hit = ranks <= k
        out[f"hr{tag}@{k}"] = hit.astype(np.float64)
        out[f"ndcg{tag}@{k}"] = np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0)
        out[f"mrr{tag}@{k}"] = np.where(hit, 1.0 / ranks, 0.0)
    return out


def metrics_from_ranks(
    ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS, *, sampled: bool = False
) -> dict[str, float]:
    if len(ranks) == 0:
        raise ValueError("no evaluation cases: every user has fewer than 3 interactions")
    return {
        name: float(values.mean()) for name, values in per_user_metrics(ranks, ks, sampled=sampled).items()
    }


@dataclass(frozen=True)
class RetrievalEvaluation:
    metrics: dict[str, float]
    users: np.ndarray
    ranks: np.ndarray
    sampled_ranks: np.ndarray | None
    ks: tuple[int, ...]
    protocol: str = PROTOCOL

    def per_user(self, metric: str) -> np.ndarray:
        """One value per user for ``metric`` (e.g. ``ndcg@10``), aligned with ``users``: for paired tests."""
        values = per_user_metrics(self.ranks, self.ks)
        if self.sampled_ranks is not None:
            values.update(per_user_metrics(self.sampled_ranks, self.ks, sampled=True))
        if metric not in values:
            raise KeyError(f"unknown metric {metric!r}; known: {sorted(values)}")
        return values[metric]


ScoreFn = Callable[[EvalBatch], torch.Tensor]


def _sample_negatives(
    rng: np.random.Generator, num_items: int, forbidden: np.ndarray, count: int
) -> np.ndarray:
    allowed_count = num_items - len(np.unique(forbidden[(forbidden >= 1) & (forbidden <= num_items)]))
    count = min(count, allowed_count)
    chosen: np.ndarray = np.empty(0, dtype=np.int64)
    while len(chosen) < count:
        draw = rng.integers(1, num_items + 1, size=2 * (count - len(chosen)) + 8)
        draw = draw[~np.isin(draw, forbidden)]
        chosen = np.concatenate([chosen, draw[~np.isin(draw, chosen)]])
        _, first = np.unique(chosen, return_index=True)
        chosen = chosen[np.sort(first)]
    return chosen[:count]


@torch.no_grad()
def evaluate_retrieval(
    score_fn: ScoreFn,
    cases: EvalCases,
    *,
    num_items: int,
    history_len: int,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 256,
    sampled_negatives: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> RetrievalEvaluation:
    """Score every case with ``score_fn(batch) -> [B, num_items + 1]`` and compute the protocol's metrics."""
    if len(cases) == 0:
        raise ValueError("no evaluation cases: every user has fewer than 3 interactions")
    ks = tuple(int(k) for k in ks)
    # Negatives are drawn per case from its own stream, so they do not depend on the batching.
    all_ranks = np.zeros(len(cases), dtype=np.int64)
    sampled_ranks = np.zeros(len(cases), dtype=np.int64) if sampled_negatives else None
    for index, batch in cases.batches(batch_size, history_len):
        batch = batch.to(device)
        scores = score_fn(batch)
        if scores.shape != (batch.targets.shape[0], num_items + 1):
            raise ValueError(f"score_fn returned {tuple(scores.shape)}, expected [B, {num_items + 1}]")
        all_ranks[index] = ranks_from_scores(scores, batch.targets, batch.exclude).cpu().numpy()
        if sampled_ranks is not None and sampled_negatives:
            cpu_scores = scores.float().cpu().numpy()
            exclude = batch.exclude.cpu().numpy()
            for r, case in enumerate(index):
                target = int(cases.targets[case])
                rng = np.random.default_rng([seed, int(case)])
                negatives = _sample_negatives(
                    rng, num_items, np.append(exclude[r], target), sampled_negatives
                )
                sampled_ranks[case] = 1 + int((cpu_scores[r, negatives] >= cpu_scores[r, target]).sum())
    metrics = metrics_from_ranks(all_ranks, ks)
    if sampled_ranks is not None:
        metrics.update(metrics_from_ranks(sampled_ranks, ks, sampled=True))
    return RetrievalEvaluation(metrics, cases.users.copy(), all_ranks, sampled_ranks, ks)
