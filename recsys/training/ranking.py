"""Training and evaluation of the ranking / CTR models (DeepFM, DIN, RankMixer, LONGER, HyFormer).

Data (``load_ranking_data``): the point-in-time examples ``<ds>.examples`` with the static attributes joined
(``features.point_in_time.with_attributes_sql``, the rows ``features.export`` writes), every user's whole
history ``<ds>.sequences``, and the ``<ds>.items`` attributes (shared by candidates and history steps), read
once from the warehouse into per-split NumPy arrays. Batches are cut from them by vectorised indexing
(``make_batch``); the behaviour sequence of an example is the user's ``seq_offset`` events strictly before its
``ts`` (``models.batch.history_window`` over the flattened histories), so no batch can see the example's own
event or anything later (tests/training/test_ranking.py checks it on every step).

The ``FeatureSpec`` built from a dataset:

- sparse, group "user": ``user`` (the dense user index) and every categorical column of ``<ds>.users``
  (``u_<attr>``); group "item": every categorical column of ``<ds>.items`` under its own name (``category``,
  ``creator``, ``price_band``), except near-unique ones (more distinct values than ``id_duplicate_share`` x
  items, e.g. MovieLens titles, which only duplicate the item id); group "context": ``hour``, ``weekday`` and,
  on impression logs, the slot ``position`` (``use_position``: the logged click depends on it; OPEN choice).
  Ids are 1..V in sorted value order, 0 = missing/unknown.
- dense: the numeric point-in-time statistics of the examples (``features.point_in_time.feature_columns``),
  transformed as ``symlog`` then standardised with the training split's mean and std; missing values
  (no earlier event) become 0, the training mean.
- sequence ``history``: item ids with the side features ``category`` / ``creator`` (the items table's
  attributes named in ``side_attributes``; they share the candidate field's embedding table) and ``action``,
  the bucket of the event's value (MovieLens: the rating 1..5; synthetic: dwell-time quantiles of the events
  before the validation period; NULL values get their own bucket), and the time gap to the example's ts.
- tasks: ``click`` = the example's label (MovieLens: rating >= 4; synthetic: the click) and, on impression
  logs with ``multi_task``, ``like``.

Training (``RankingTask``, a ``training.loop.TrainTask``): sum over tasks of the mean BCE plus the model's
``aux_loss``; a loop epoch is a full shuffled pass or, with ``epoch_examples``, the next slice of one (so
validation and early stopping can come several times per pass); batches are length-bucketed (sorted by
history length within groups of ``bucket_batches`` batches, then shuffled) and trimmed to their longest
history rounded up to ``length_multiple``, so padding costs little. Early stopping on the validation AUC
of ``click``.

Evaluation: ``evaluation.ranking.ranking_metrics`` on the test split (AUC, GAUC by user, log loss, NE,
calibration, ECE) and, when the examples carry the generator's ``p_click``, the oracle AUC and the model's
oracle share. Cost: parameters, forward FLOPs per example (torch flop counter over 512 random test examples
run as the evaluation runs them), training wall time, hardware.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from recsys.core.config import FrozenModel
from recsys.evaluation.ranking import RankingMetrics, ranking_metrics
from recsys.features.encoding import categorical_columns, encode, value_buckets, vocabulary
from recsys.features.point_in_time import feature_columns, with_attributes_sql
from recsys.features.sequences import check_dataset, columns, require_table
from recsys.models.batch import (
    FeatureSpec,
    RankingBatch,
    SequenceBatch,
    SequenceSpec,
    SideField,
    SparseField,
    history_window,
)
from recsys.training.loop import FitResult, LoopConfig, fit
from recsys.warehouse import Warehouse
from recsys.warehouse.runs import RunLog

SEQUENCE = "history"
SPLITS = ("train", "valid", "test")
#: Example columns that describe the logging or the ground truth, never inputs.
LEAKY_COLUMNS = frozenset({"p_click", "p_click_unbiased", "propensity", "dwell", "label", "click", "like"})
PROTOCOL = (
    "global temporal cut (train < t1 <= valid < t2 <= test); features and histories strictly before each "
    "example's ts; AUC over all test examples, GAUC by user"
)


class RankingDataConfig(FrozenModel):
    """How a dataset's examples become model inputs (and which of them are used)."""

    side_attributes: tuple[str, ...] = Field(
        ("category", "creator"),
        description="Item attributes carried per history step (those the items table has).",
    )
    value_buckets: int = Field(8, ge=1, description="Buckets of the event value (the 'action' side feature).")
    id_duplicate_share: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="Item attributes with more distinct values than this x items: dropped.",
    )
    use_position: bool = Field(True, description="Impression logs: the slot position as a context feature.")
    multi_task: bool = Field(True, description="Impression logs: also learn 'like' (a second head).")
    max_train_examples: int | None = Field(None, ge=1, description="Random subsample of the train split.")
    max_valid_examples: int | None = Field(None, ge=1, description="Whole users sampled up to this many.")
    max_test_examples: int | None = Field(None, ge=1, description="Whole users sampled up to this many.")
    sample_seed: int = Field(0, description="Seed of the subsamples (the same for every model and seed).")


@dataclass
class SplitArrays:
    """One split's examples as arrays (row b = example b)."""

    item: np.ndarray  # [N] int64 item_idx
    user: np.ndarray  # [N] int64 user_idx
    ts: np.ndarray  # [N] int64
    seq_start: np.ndarray  # [N] int64: where the user's history starts in the flattened histories
    seq_offset: np.ndarray  # [N] int64: the user's events strictly before ts
    sparse: dict[str, np.ndarray]  # field -> [N] int64
    dense: np.ndarray  # [N, F] float32
    labels: dict[str, np.ndarray]  # task -> [N] float32
    oracle: np.ndarray | None = None  # [N] float64 true click probability (synthetic data)

    def __len__(self) -> int:
        return int(self.item.shape[0])

    def subset(self, index: np.ndarray) -> SplitArrays:
        return SplitArrays(
            item=self.item[index],
            user=self.user[index],
            ts=self.ts[index],
            seq_start=self.seq_start[index],
            seq_offset=self.seq_offset[index],
            sparse={k: v[index] for k, v in self.sparse.items()},
            dense=self.dense[index],
            labels={k: v[index] for k, v in self.labels.items()},
            oracle=None if self.oracle is None else self.oracle[index],
        )


@dataclass
class Histories:
    """Every user's whole history, concatenated in ``(ts, src_row)`` order."""

    item: np.ndarray  # [E] int64 item_idx
    ts: np.ndarray  # [E] int64
    side: dict[str, np.ndarray]  # side field -> [E] int64 ids (0 never occurs: 0 is padding)
    position: np.ndarray  # [E] int64 = arange(E): history_window over it gives event positions
    user_start: np.ndarray  # [n_users + 1] int64, indexed by user_idx
    user_length: np.ndarray  # [n_users + 1] int64

    @property
    def mean_length(self) -> float:
        users = self.user_length[self.user_length > 0]
        return float(users.mean()) if users.size else 0.0


@dataclass
class RankingData:
    dataset: str
    data_version: str  # version of <ds>.examples
    config: RankingDataConfig
    n_items: int
    sparse_fields: tuple[SparseField, ...]
    side_fields: tuple[SideField, ...]
    dense_names: tuple[str, ...]
    tasks: tuple[str, ...]
    splits: dict[str, SplitArrays]
    histories: Histories
    dense_mean: np.ndarray
    dense_std: np.ndarray
    split_sizes: dict[str, int] = field(default_factory=dict)  # before subsampling

    def feature_spec(self, max_len: int) -> FeatureSpec:
        """The FeatureSpec of a model that reads the ``max_len`` most recent history steps."""
        return FeatureSpec(
            n_items=self.n_items,
            sparse=self.sparse_fields,
            dense=self.dense_names,
            sequences=(SequenceSpec(name=SEQUENCE, max_len=max_len, side=self.side_fields),),
            tasks=self.tasks,
        )

    @property
    def has_oracle(self) -> bool:
        return all(s.oracle is not None for s in self.splits.values())

    def mean_history(self, split: str = "test") -> float:
        """Mean number of earlier events of the split's examples (the history a model could read)."""
        return float(self.splits[split].seq_offset.mean())

    def make_batch(
        self, split: str | SplitArrays, index: np.ndarray, max_len: int, length_multiple: int = 8
    ) -> RankingBatch:
        """Examples ``index`` of a split as a RankingBatch whose history window is trimmed to the longest
        history among them (at most ``max_len``), rounded up to ``length_multiple``."""
        s = self.splits[split] if isinstance(split, str) else split
        index = np.asarray(index, dtype=np.int64)
        h = self.histories
        offsets = s.seq_offset[index]
        longest = int(np.minimum(offsets, max_len).max()) if index.size else 0
        width = min(max_len, max(length_multiple, -(-longest // length_multiple) * length_multiple))
        pos, lengths = history_window(h.position, s.seq_start[index], offsets, width, pad_value=-1)
        valid = pos >= 0
        p = np.where(valid, pos, 0)
        gap = np.where(valid, s.ts[index][:, None] - h.ts[p], 0).astype(np.float32)
        sequence = SequenceBatch(
            lengths=torch.from_numpy(lengths),
            time_gap=torch.from_numpy(gap),
            side={k: torch.from_numpy(np.where(valid, v[p], 0)) for k, v in h.side.items()},
            item_ids=torch.from_numpy(np.where(valid, h.item[p], 0)),
        )
        return RankingBatch(
            item_id=torch.from_numpy(s.item[index]),
            sparse={k: torch.from_numpy(v[index]) for k, v in s.sparse.items()},
            dense=torch.from_numpy(s.dense[index]),
            sequences={SEQUENCE: sequence},
            labels={k: torch.from_numpy(v[index]) for k, v in s.labels.items()},
            user_id=torch.from_numpy(s.user[index]),
        )


# -- loading ------------------------------------------------------------------------------------------------


def _sample_users(user: np.ndarray, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    """Indices of whole users (random order) until ``cap`` examples are reached; all when cap is None."""
    if cap is None or cap >= user.size:
        return np.arange(user.size)
    uniq, inverse, counts = np.unique(user, return_inverse=True, return_counts=True)
    order = rng.permutation(uniq.size)
    keep_n = int(np.searchsorted(np.cumsum(counts[order]), cap) + 1)
    keep = np.zeros(uniq.size, dtype=bool)
    keep[order[:keep_n]] = True
    return np.flatnonzero(keep[inverse])


def load_ranking_data(wh: Warehouse, dataset: str, config: RankingDataConfig | None = None) -> RankingData:
    """Read ``<ds>.examples`` (build it first with ``features.point_in_time.build_examples``), the sequences
    and the item/user attributes into arrays (see the module docstring for the features)."""
    config = config or RankingDataConfig()
    ds = check_dataset(dataset)
    examples_version = require_table(
        wh, f"{ds}.examples", ("user_idx", "item_idx", "ts", "split", "seq_offset")
    )
    require_table(wh, f"{ds}.sequences", ("user_idx", "item_idx", "ts", "value"))
    roles = feature_columns(wh, ds)
    source = with_attributes_sql(wh, ds)  # the examples + static attributes, as the export writes them
    ex_types = {r[0]: r[1] for r in wh.con.execute(f"DESCRIBE {source}").fetchall()}
    n_items = int(wh.con.execute(f"SELECT coalesce(max(item_idx), 0) FROM {ds}.item_index").fetchall()[0][0])
    n_users = int(wh.con.execute(f"SELECT coalesce(max(user_idx), 0) FROM {ds}.user_index").fetchall()[0][0])

    # Histories, flattened.
    seq = wh.sql(f"SELECT user_idx, item_idx, ts, value FROM {ds}.sequences ORDER BY user_idx")
    lengths = seq["item_idx"].list.len().to_numpy().astype(np.int64)
    user_start = np.zeros(n_users + 1, dtype=np.int64)
    user_length = np.zeros(n_users + 1, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    seq_users = seq["user_idx"].to_numpy().astype(np.int64)
    user_start[seq_users], user_length[seq_users] = starts, lengths
    h_item = seq["item_idx"].explode().to_numpy().astype(np.int64)
    h_ts = seq["ts"].explode().to_numpy().astype(np.int64)
    h_value = seq["value"].explode().cast(pl.Float64).fill_null(float("nan")).to_numpy()
    del seq

    # Item attributes (static), indexed by item_idx; the candidate fields and the step side fields share them.
    item_fields: list[SparseField] = []
    item_attr: dict[str, np.ndarray] = {}
    if wh.has_table(f"{ds}.items"):
        types = columns(wh, f"{ds}.items")
        cats = categorical_columns(types, ("item_id",))
        if cats:
            sel = ", ".join(f'it."{c}"' for c in cats)
            items = wh.sql(
                f"SELECT ii.item_idx, {sel} FROM {ds}.item_index ii JOIN {ds}.items it USING (item_id)"
            )
            idx = items["item_idx"].to_numpy().astype(np.int64)
            for c in cats:
                vocab = vocabulary(items[c])
                if not len(vocab) or len(vocab) > config.id_duplicate_share * max(len(idx), 1):
                    continue  # never known (a log without an items file), or near-unique (a title)
                ids = np.zeros(n_items + 1, dtype=np.int64)
                ids[idx] = encode(items[c], vocab)
                item_attr[c] = ids
                item_fields.append(SparseField(name=c, cardinality=len(vocab) + 1, group="item"))

    # Example rows.
    has_impressions = "click" in ex_types and "request_id" in ex_types
    # Whatever the feature layer calls them, the ground truth and the logging columns are never features.
    dense_names = tuple(c for c in roles["numeric"] if c not in LEAKY_COLUMNS)
    user_cats = [c for c in roles["categorical"] if c.startswith("u_")]
    context = [c for c in ("hour", "weekday") if c in ex_types]
    if has_impressions and config.use_position and "position" in ex_types:
        context.append("position")
    tasks = (
        ("click", "like") if (has_impressions and config.multi_task and "like" in ex_types) else ("click",)
    )
    wanted = [
        "user_idx",
        "item_idx",
        "ts",
        "split",
        "seq_offset",
        "label",
        *context,
        *user_cats,
        *dense_names,
    ]
    if "like" in tasks:
        wanted.append("like")
    if "p_click" in ex_types:
        wanted.append("p_click")
    order = ", ".join(
        c for c in ("ts", "user_idx", "item_idx", "request_id", "position", "pos", "src_row") if c in ex_types
    )
    sel = ", ".join(f'"{c}"' for c in wanted)
    ex = wh.sql(f"SELECT {sel} FROM ({source}) ORDER BY {order}")
    if ex.height == 0:
        raise ValueError(f"{ds}.examples is empty: nothing to train on")

    user = ex["user_idx"].to_numpy().astype(np.int64)
    seq_offset = ex["seq_offset"].to_numpy().astype(np.int64)
    too_long = seq_offset > user_length[user]
    if too_long.any():
        raise ValueError(
            f"{ds}.examples: {int(too_long.sum())} rows have seq_offset beyond the user's sequence length; "
            "rebuild the examples and sequences from the same events"
        )

    sparse: dict[str, np.ndarray] = {"user": user.copy()}
    sparse_fields = [SparseField(name="user", cardinality=n_users + 1, group="user")]
    for c in user_cats:
        vocab = vocabulary(ex[c])
        sparse[c] = encode(ex[c], vocab)
        sparse_fields.append(SparseField(name=c, cardinality=len(vocab) + 1, group="user"))
    item = ex["item_idx"].to_numpy().astype(np.int64)
    for f in item_fields:
        sparse[f.name] = item_attr[f.name][item]
    sparse_fields += item_fields
    for c in context:
        raw = ex[c].fill_null(-1).to_numpy().astype(np.int64)
        lo = 1 if c == "weekday" else 0  # ISO weekday 1..7; hour 0..23; position 0..k-1
        top = {"hour": 23, "weekday": 7}.get(c, int(raw.max()) if raw.size else 0)
        sparse[c] = np.where((raw >= lo) & (raw <= top), raw - lo + 1, 0)
        sparse_fields.append(SparseField(name=c, cardinality=top - lo + 2, group="context"))

    split = ex["split"].to_numpy()
    is_train = split == "train"
    dense_raw = (
        ex.select([pl.col(c).cast(pl.Float64) for c in dense_names]).to_numpy()
        if dense_names
        else np.zeros((ex.height, 0))
    )
    dense_raw = np.sign(dense_raw) * np.log1p(np.abs(dense_raw))  # NaN (NULL) stays NaN
    mean = np.nanmean(dense_raw[is_train], axis=0) if dense_names else np.zeros(0)
    std = np.nanstd(dense_raw[is_train], axis=0) if dense_names else np.zeros(0)
    mean, std = np.nan_to_num(mean), np.where(np.isfinite(std) & (std > 0), std, 1.0)
    dense = np.nan_to_num((dense_raw - mean) / std, nan=0.0).astype(np.float32)

    labels = {"click": ex["label"].cast(pl.Float32).fill_null(0.0).to_numpy()}
    if "like" in tasks:
        labels["like"] = ex["like"].cast(pl.Float32).fill_null(0.0).to_numpy()
    oracle = ex["p_click"].to_numpy().astype(np.float64) if "p_click" in wanted else None
    if oracle is not None and not np.isfinite(oracle).all():
        oracle = None  # a real log without the generator's probabilities

    # Side features per history step.
    t1 = int(ex["ts"].filter(~pl.Series(is_train)).min()) if (~is_train).any() else int(h_ts.max()) + 1
    side = {a: item_attr[a][h_item] for a in config.side_attributes if a in item_attr}
    cardinality = {f.name: f.cardinality for f in item_fields}
    side_fields = [SideField(name=a, cardinality=cardinality[a]) for a in side]
    side["action"] = value_buckets(h_value, h_value[h_ts < t1], config.value_buckets)
    side_fields.append(SideField(name="action", cardinality=config.value_buckets + 2))
    histories = Histories(
        item=h_item,
        ts=h_ts,
        side=side,
        position=np.arange(h_item.size, dtype=np.int64),
        user_start=user_start,
        user_length=user_length,
    )

    full = SplitArrays(
        item=item,
        user=user,
        ts=ex["ts"].to_numpy().astype(np.int64),
        seq_start=user_start[user],
        seq_offset=seq_offset,
        sparse=sparse,
        dense=dense,
        labels=labels,
        oracle=oracle,
    )
    del ex
    rng = np.random.default_rng(config.sample_seed)
    splits: dict[str, SplitArrays] = {}
    sizes: dict[str, int] = {}
    for name, cap in (
        ("train", config.max_train_examples),
        ("valid", config.max_valid_examples),
        ("test", config.max_test_examples),
    ):
        rows = np.flatnonzero(split == name)
        sizes[name] = int(rows.size)
        if rows.size == 0:
            raise ValueError(f"{ds}.examples has no {name!r} examples; check the split quantiles")
        if name == "train":
            if cap is not None and cap < rows.size:
                rows = np.sort(rng.choice(rows, size=cap, replace=False))
        else:
            rows = rows[_sample_users(user[rows], cap, rng)]
        splits[name] = full.subset(rows)
    return RankingData(
        dataset=ds,
        data_version=examples_version,
        config=config,
        n_items=n_items,
        sparse_fields=tuple(sparse_fields),
        side_fields=tuple(side_fields),
        dense_names=dense_names,
        tasks=tasks,
        splits=splits,
        histories=histories,
        dense_mean=mean.astype(np.float32),
        dense_std=std.astype(np.float32),
        split_sizes=sizes,
    )


# -- training ------------------------------------------------------------------------------------------------


class RankingTrainConfig(FrozenModel):
    max_len: int = Field(100, ge=1, description="History steps the model reads (its FeatureSpec max_len).")
    batch_size: int = Field(128, ge=1)
    epoch_examples: int | None = Field(
        None,
        ge=1,
        description="Training examples per loop epoch (validation and early stopping after each); None = "
        "a full pass. Consecutive epochs walk through one shuffled pass before the next pass begins.",
    )
    eval_batch_size: int = Field(512, ge=1)
    length_multiple: int = Field(8, ge=1, description="Batch windows are rounded up to this (LONGER's K).")
    length_bucketing: bool = Field(
        True, description="Sort by history length within groups of bucket_batches batches (less padding)."
    )
    bucket_batches: int = Field(32, ge=1)
    flop_examples: int = Field(512, ge=1, description="Random test examples the FLOP count averages over.")
    unique_pooling: bool = Field(
        False,
        description="Behaviour sequences travel as unique item ids + an int32 inverse index, made on the "
        "host (models.ops.unique_pooling): fewer bytes host -> device, each unique embedding looked up once. "
        "Same model outputs.",
    )

    def key_fields(self) -> dict[str, Any]:
        """The fields that change what a run trains, as they enter checkpoint keys: ``unique_pooling`` gives
        the same outputs, so runs with and without it share checkpoints."""
        return self.model_dump(mode="json", exclude={"unique_pooling"})


def predict(
    model: nn.Module,
    data: RankingData,
    split: str | SplitArrays,
    max_len: int,
    device: torch.device,
    *,
    batch_size: int = 512,
    length_multiple: int = 8,
    unique_pooling: bool = False,
) -> dict[str, np.ndarray]:
    """Probabilities per task for every example of ``split`` (batched by history length, in split order);
    ``unique_pooling``: batches deduplicated on the host before they move to ``device``."""
    s = data.splits[split] if isinstance(split, str) else split
    order = np.argsort(np.minimum(s.seq_offset, max_len), kind="stable")
    out = {t: np.zeros(len(s), dtype=np.float64) for t in data.tasks}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                index = order[start : start + batch_size]
                batch = data.make_batch(s, index, max_len, length_multiple)
                if unique_pooling:
                    batch = batch.deduplicated()
                logits = model(batch.to(device)).logits
                for t in data.tasks:
                    out[t][index] = torch.sigmoid(logits[t].float()).cpu().numpy()
    finally:
        model.train(was_training)
    return out


def metric_dict(m: RankingMetrics, prefix: str = "") -> dict[str, float]:
    """The metrics as the flat float dict the loop and the run registry store (None left out)."""
    names = {
        "auc": m.auc,
        "gauc": m.gauc,
        "log_loss": m.log_loss,
        "ne": m.normalized_entropy,
        "calibration": m.calibration,
        "ece": m.ece,
        "positive_rate": m.positive_rate,
        "n_examples": m.n_examples,
        "oracle_auc": m.oracle_auc,
        "oracle_share": m.oracle_share,
    }
    return {f"{prefix}{k}": float(v) for k, v in names.items() if v is not None}


def evaluate(
    model: nn.Module,
    data: RankingData,
    split: str,
    config: RankingTrainConfig,
    device: torch.device,
    *,
    oracle: bool = True,
) -> dict[str, RankingMetrics]:
    """``ranking_metrics`` per task on ``split`` (click: with the oracle when the data has one)."""
    s = data.splits[split]
    probs = predict(
        model,
        data,
        s,
        config.max_len,
        device,
        batch_size=config.eval_batch_size,
        length_multiple=config.length_multiple,
        unique_pooling=config.unique_pooling,
    )
    out: dict[str, RankingMetrics] = {}
    for t in data.tasks:
        labels = s.labels[t]
        if labels.min() == labels.max():
            continue  # one class only (a tiny split): no AUC to report
        out[t] = ranking_metrics(
            labels,
            probs[t],
            groups=s.user,
            oracle_probs=s.oracle if (oracle and t == "click" and s.oracle is not None) else None,
        )
    if "click" not in out:
        raise ValueError(f"the {split} split has only one class of 'click': cannot compute AUC")
    return out


def flatten_metrics(metrics: dict[str, RankingMetrics]) -> dict[str, float]:
    """click metrics unprefixed, the other tasks' as '<task>/<metric>'."""
    out: dict[str, float] = {}
    for task, m in metrics.items():
        out.update(metric_dict(m, "" if task == "click" else f"{task}/"))
    return out


class RankingTask:
    """The ``training.loop.TrainTask`` of a ranking model on one ``RankingData``."""

    def __init__(
        self, model: nn.Module, data: RankingData, config: RankingTrainConfig, seed: int = 0
    ) -> None:
        self.model = model
        self.data = data
        self.config = config
        self.seed = seed
        self.train = data.splits["train"]
        self.lengths = np.minimum(self.train.seq_offset, config.max_len)
        # Fail fast on a batch that does not fit the model's spec (ids, shapes, padding).
        probe = data.make_batch(self.train, np.arange(min(len(self.train), 64)), config.max_len)
        probe.validate(data.feature_spec(config.max_len))

    def epoch_slice(self, epoch: int) -> np.ndarray:
        """The training examples of loop epoch ``epoch`` (1-based): a full shuffled pass, or its slice number
        (epoch - 1) mod k when ``epoch_examples`` cuts each pass into k slices. The pass's order depends only
        on (seed, pass), so a resumed run sees the same slices."""
        n = len(self.train)
        size = min(self.config.epoch_examples or n, n)
        per_pass = -(-n // size)
        pass_no, part = divmod(epoch - 1, per_pass)
        order = np.random.default_rng([self.seed, pass_no, 7919]).permutation(n)
        return order[part * size : (part + 1) * size]

    def batch_indices(self, epoch: int, rng: np.random.Generator) -> list[np.ndarray]:
        """One epoch's batches: shuffled, length-bucketed within groups of ``bucket_batches`` batches."""
        bs = self.config.batch_size
        order = self.epoch_slice(epoch)
        order = order[rng.permutation(order.size)]
        if not self.config.length_bucketing:
            return [order[i : i + bs] for i in range(0, len(order), bs)]
        batches: list[np.ndarray] = []
        group = bs * self.config.bucket_batches
        for g in range(0, len(order), group):
            chunk = order[g : g + group]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches += [chunk[i : i + bs] for i in range(0, len(chunk), bs)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def train_batches(self, epoch: int, rng: np.random.Generator) -> Iterator[RankingBatch]:
        for index in self.batch_indices(epoch, rng):
            batch = self.data.make_batch(self.train, index, self.config.max_len, self.config.length_multiple)
            yield batch.deduplicated() if self.config.unique_pooling else batch

    def loss(self, model: nn.Module, batch: RankingBatch, device: torch.device) -> torch.Tensor:
        batch = batch.to(device)
        out = model(batch)
        total = out.aux_loss
        for task, label in batch.labels.items():
            total = total + F.binary_cross_entropy_with_logits(out.logits[task].float(), label)
        return total

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        return flatten_metrics(evaluate(model, self.data, "valid", self.config, device, oracle=False))

    def test(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        return flatten_metrics(evaluate(model, self.data, "test", self.config, device))

    def flop_probe(self, model: nn.Module, device: torch.device) -> tuple[Callable[[], Any], int]:
        """Forward passes over random test examples, batched as ``predict`` batches them."""
        test = self.data.splits["test"]
        rng = np.random.default_rng(0)
        n = min(len(test), self.config.flop_examples)
        sample = test.subset(np.sort(rng.choice(len(test), size=n, replace=False)))

        def run() -> None:
            predict(
                model,
                self.data,
                sample,
                self.config.max_len,
                device,
                batch_size=self.config.eval_batch_size,
                length_multiple=self.config.length_multiple,
                unique_pooling=self.config.unique_pooling,
            )

        return run, n


@dataclass
class RankingRunResult:
    model_name: str
    seed: int
    max_len: int
    valid: dict[str, float]
    test: dict[str, float]
    num_parameters: int
    flops_per_example: float
    train_time_s: float
    time_to_quality_s: float
    best_epoch: int
    epochs_run: int
    run_id: str | None
    fit: FitResult | None = None

    @classmethod
    def from_fit(cls, name: str, seed: int, max_len: int, result: FitResult) -> RankingRunResult:
        """The run's figures as the shared loop returned them (test metrics on the best weights)."""
        test = result.test_metrics or {}
        return cls(model_name=name, seed=seed, max_len=max_len, test=test, **result.run_figures())


def train_ranking(
    name: str,
    model: nn.Module,
    data: RankingData,
    *,
    seed: int,
    train_config: RankingTrainConfig | None = None,
    loop_config: LoopConfig | None = None,
    model_config: FrozenModel | None = None,
    checkpoint_dir: str | Path | None = None,
    run_log: RunLog | None = None,
) -> RankingRunResult:
    """Train ``model`` (built for ``data.feature_spec(train_config.max_len)``, seeded by the caller) with
    early stopping on validation AUC; the test split is evaluated once on the best weights."""
    train_config = train_config or RankingTrainConfig()
    base = loop_config or LoopConfig(monitor="auc", mode="max", patience=1, max_epochs=3)
    loop_config = LoopConfig(**{**base.model_dump(), "seed": seed})
    if loop_config.monitor.split("/")[-1] not in ("auc", "gauc", "log_loss", "ne"):
        raise ValueError(
            f"loop.monitor must be a validation ranking metric (auc, gauc, ...), got {loop_config.monitor!r}"
        )
    task = RankingTask(model, data, train_config, seed)
    run_config = {
        "model": name,
        "model_config": model_config.model_dump(mode="json", exclude={"features"}) if model_config else None,
        "train": train_config.key_fields(),
        "data": data.config.model_dump(mode="json"),
        "dataset": data.dataset,
        "feature_spec": data.feature_spec(train_config.max_len).model_dump(mode="json"),
    }
    protocol = f"{PROTOCOL}; history {train_config.max_len}; seed {seed}"
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
    return RankingRunResult.from_fit(name, seed, train_config.max_len, result)
