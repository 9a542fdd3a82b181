"""Teacher -> student distillation for serving (spec: models.md, Distillation).

A large teacher (HyFormer over a long history, or an ensemble) is trained once; its scores are precomputed
into the warehouse table ``<ds>.teacher_scores`` so that the student never needs the teacher in memory; the
student (a small model over a short history) is then trained on

    loss = mean_labelled BCE(y, s(z_s)) + lambda * tau^2 * mean_all BCE(s(z_t / tau), s(z_s / tau))

(``models.losses.distillation_loss``) summed over the tasks, plus the model's ``aux_loss``.

``<ds>.teacher_scores`` (one row per scored input; published through ``Warehouse.publish`` with
``inputs = {<ds>.examples: version}`` and ``params`` = the teacher members' weight hashes, history lengths,
the data subsample and the candidate sampling, so ``is_fresh`` skips an unchanged recompute):

| column | meaning |
|---|---|
| split | ``train`` or ``valid`` |
| row | the example's position in that split of ``load_ranking_data`` (the same config gives the same rows) |
| candidate | 0 = the labelled example itself; 1..K = an unlabelled candidate built from it |
| user_idx, item_idx, ts | the user, the scored item (the candidate's own item for candidate > 0), the time |
| labelled | candidate == 0 |
| teacher_<task> | the teacher's logit for each task (mean of the members' logits for an ensemble) |

Unlabelled candidates: for every example, ``candidates_per_example`` items drawn uniformly from the items the
loaded examples show (their attributes are known) that the user was never shown (no example of the user in
any loaded split) and never interacted with (not in the user's whole history); each keeps the example's
user, time, context fields and history, and gets the candidate's item attributes.

OPEN choices and what was picked:

- The item-side point-in-time statistics of a candidate (dense columns ``i_*``: the item's popularity and
  mean value so far, its age) are not in the loaded arrays for an item that was not shown at that time; they
  are set to 0, which is the training mean after standardisation (the encoding of "no earlier event").
  Teacher and student see the same candidate inputs, so the student still learns the teacher's function on
  them.
- Candidate items are drawn from the items with known attributes (those shown in the loaded examples), not
  from the whole catalogue: an item's categorical attributes are read off the example rows.
- Rejection sampling against the shown/consumed set runs ``max_resample_rounds`` rounds; a candidate still
  colliding after that (a user who saw almost every item) is kept: at most a handful on real data.
- The teacher's score for an ensemble is the mean of the members' logits.
- The student trains on the labelled examples and their candidates mixed in one shuffled stream; hard BCE
  averages over the labelled rows of a batch, the soft term over all rows (``labelled`` mask).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from pydantic import Field
from torch import nn

from recsys.core.config import FrozenModel
from recsys.core.hashing import file_sha256, stable_hash
from recsys.features.sequences import check_dataset
from recsys.models.hstu_ranker import HSTURanker
from recsys.models.losses import distillation_loss
from recsys.training.checkpoint import weights_path
from recsys.training.hstu_ranking import sequence_logits
from recsys.training.loop import LoopConfig, fit
from recsys.training.ranking import (
    PROTOCOL,
    RankingBatch,
    RankingData,
    RankingRunResult,
    RankingTask,
    RankingTrainConfig,
    SplitArrays,
)
from recsys.warehouse import Warehouse
from recsys.warehouse.runs import RunLog
from recsys.warehouse.store import TableVersion

TABLE = "teacher_scores"
SCORED_SPLITS = ("train", "valid")
#: Dense columns that describe the candidate item (point-in-time item statistics, item attributes).
ITEM_DENSE_PREFIX = "i_"


class TeacherScoreConfig(FrozenModel):
    """What the teacher scores: every train/valid example plus K unlabelled candidates per train example."""

    candidates_per_example: int = Field(
        2, ge=0, description="K unlabelled candidate items per training example (0 = labelled only)."
    )
    valid_candidates: bool = Field(False, description="Also add K candidates to every validation example.")
    seed: int = Field(0, description="Seed of the candidate sampling.")
    batch_size: int = Field(512, ge=1, description="Examples per teacher forward pass.")
    max_resample_rounds: int = Field(20, ge=0, description="Rejection-sampling rounds against shown items.")


class DistillConfig(FrozenModel):
    """The loss of the spec: BCE(y, s(z_s)) + weight * tau^2 * BCE(s(z_t / tau), s(z_s / tau))."""

    temperature: float = Field(1.0, gt=0.0, description="tau; 1 keeps the student calibrated.")
    weight: float = Field(1.0, ge=0.0, description="lambda, the soft term's weight (spec: 0.5-1).")
    use_unlabelled: bool = Field(True, description="Train on the teacher-scored unlabelled candidates too.")


# -- candidates ---------------------------------------------------------------------------------------------


@dataclass
class ItemLookup:
    """Item-side categorical attributes by item_idx, read off the loaded example rows."""

    fields: dict[str, np.ndarray]  # item field -> [n_items + 1] int64 (0 = unknown)
    known: np.ndarray  # [n_items + 1] bool: shown in some loaded example, attributes known

    @property
    def items(self) -> np.ndarray:
        return np.flatnonzero(self.known)


def item_lookup(data: RankingData) -> ItemLookup:
    names = [f.name for f in data.sparse_fields if f.group == "item"]
    fields = {n: np.zeros(data.n_items + 1, dtype=np.int64) for n in names}
    known = np.zeros(data.n_items + 1, dtype=bool)
    for s in data.splits.values():
        known[s.item] = True
        for n in names:
            fields[n][s.item] = s.sparse[n]  # an item's attributes are static: any row gives them
    return ItemLookup(fields=fields, known=known)


def _exclusion_keys(data: RankingData) -> np.ndarray:
    """Sorted unique user * (n_items + 1) + item for every item a user was shown or interacted with."""
    stride = data.n_items + 1
    parts = [s.user * stride + s.item for s in data.splits.values()]
    h = data.histories
    users = np.flatnonzero(h.user_length)
    lengths = h.user_length[users]
    within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    position = np.repeat(h.user_start[users], lengths) + within  # every event of every user
    parts.append(np.repeat(users, lengths) * stride + h.item[position])
    return np.unique(np.concatenate(parts))


def sample_candidates(
    data: RankingData,
    split: SplitArrays,
    k: int,
    *,
    seed: int,
    lookup: ItemLookup | None = None,
    max_rounds: int = 20,
) -> np.ndarray:
    """[N, K] candidate item_idx per example of ``split``: known items the user was never shown and never
    consumed (see the module docstring)."""
    if k < 0:
        raise ValueError(f"candidates_per_example must be >= 0, got {k}")
    lookup = lookup or item_lookup(data)
    pool = lookup.items
    n = len(split)
    if k == 0 or n == 0:
        return np.zeros((n, k), dtype=np.int64)
    if pool.size == 0:
        raise ValueError("no item with known attributes to sample candidates from")
    rng = np.random.default_rng([seed, 104729])
    excluded = _exclusion_keys(data)
    stride = data.n_items + 1
    user = np.repeat(split.user, k)
    items = pool[rng.integers(0, pool.size, size=n * k)]
    for _ in range(max_rounds):
        keys = user * stride + items
        pos = np.minimum(np.searchsorted(excluded, keys), max(excluded.size - 1, 0))
        clash = excluded[pos] == keys if excluded.size else np.zeros(keys.size, dtype=bool)
        if not clash.any():
            break
        items[clash] = pool[rng.integers(0, pool.size, size=int(clash.sum()))]
    return items.reshape(n, k)


def candidate_arrays(
    split: SplitArrays, rows: np.ndarray, items: np.ndarray, lookup: ItemLookup, dense_names: Sequence[str]
) -> SplitArrays:
    """Examples ``rows`` of ``split`` with their item replaced by ``items`` (same user, time, context and
    history): the candidate's item attributes, item-side dense statistics at the training mean (0), no
    label."""
    rows = np.asarray(rows, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    if rows.shape != items.shape or rows.ndim != 1:
        raise ValueError(f"rows {rows.shape} and items {items.shape} must be equal 1-D shapes")
    out = split.subset(rows)
    out.item = items
    for name, table in lookup.fields.items():
        out.sparse[name] = table[items]
    item_cols = [i for i, c in enumerate(dense_names) if c.startswith(ITEM_DENSE_PREFIX)]
    if item_cols:
        out.dense = out.dense.copy()
        out.dense[:, item_cols] = 0.0
    out.labels = {t: np.zeros(rows.size, dtype=np.float32) for t in split.labels}
    out.oracle = None
    return out


def concat_splits(parts: Sequence[SplitArrays]) -> SplitArrays:
    """Row-wise concatenation of split arrays with the same fields."""
    first = parts[0]
    return SplitArrays(
        item=np.concatenate([p.item for p in parts]),
        user=np.concatenate([p.user for p in parts]),
        ts=np.concatenate([p.ts for p in parts]),
        seq_start=np.concatenate([p.seq_start for p in parts]),
        seq_offset=np.concatenate([p.seq_offset for p in parts]),
        sparse={k: np.concatenate([p.sparse[k] for p in parts]) for k in first.sparse},
        dense=np.concatenate([p.dense for p in parts]),
        labels={k: np.concatenate([p.labels[k] for p in parts]) for k in first.labels},
        oracle=None,
    )


# -- the teacher --------------------------------------------------------------------------------------------


@dataclass
class TeacherMember:
    """One trained teacher network, the history it reads and the sha256 of its weights file."""

    name: str
    model: nn.Module
    max_len: int
    weights_sha256: str

    @classmethod
    def from_checkpoint(
        cls, name: str, model: nn.Module, max_len: int, checkpoint_dir: Path
    ) -> TeacherMember:
        """A member whose ``model`` holds the best weights of a finished ``fit`` run in ``checkpoint_dir``."""
        path = weights_path(checkpoint_dir, "best")
        if not path.exists():
            raise FileNotFoundError(f"teacher {name!r}: no best weights at {path}; train the teacher first")
        return cls(name=name, model=model, max_len=max_len, weights_sha256=file_sha256(path))


def score_logits(
    members: Sequence[TeacherMember],
    data: RankingData,
    split: SplitArrays,
    device: torch.device | str = "cpu",
    *,
    batch_size: int = 512,
    length_multiple: int = 8,
) -> dict[str, np.ndarray]:
    """Mean of the members' logits per task for every row of ``split`` (row order kept). A generative ranker
    member (``hstu-ranker``) scores all rows of a user in one forward (``training.hstu_ranking``)."""
    if not members:
        raise ValueError("a teacher needs at least one member")
    out = {t: np.zeros(len(split), dtype=np.float64) for t in data.tasks}
    for m in members:
        if isinstance(m.model, HSTURanker):  # the generative ranker: one forward per user segment
            logits = sequence_logits(m.model, data, split, device)
            for t in data.tasks:
                out[t] += logits[t]
            continue
        order = np.argsort(np.minimum(split.seq_offset, m.max_len), kind="stable")  # little padding
        was_training = m.model.training
        m.model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(order), batch_size):
                    index = order[start : start + batch_size]
                    batch = data.make_batch(split, index, m.max_len, length_multiple).to(device)
                    logits = m.model(batch).logits
                    for t in data.tasks:
                        out[t][index] += logits[t].float().cpu().numpy()
        finally:
            m.model.train(was_training)
    return {t: v / len(members) for t, v in out.items()}


def teacher_params(
    members: Sequence[TeacherMember], data: RankingData, config: TeacherScoreConfig
) -> dict[str, Any]:
    """What ``<ds>.teacher_scores`` depends on besides the examples (the lineage params)."""
    return {
        "teacher": [
            {"name": m.name, "max_len": m.max_len, "weights_sha256": m.weights_sha256} for m in members
        ],
        "data": data.config.model_dump(mode="json"),
        "scores": config.model_dump(mode="json"),
        "tasks": list(data.tasks),
    }


def teacher_scores_key(data: RankingData, params: dict[str, Any]) -> tuple[dict[str, str], str]:
    """(inputs, input_key) exactly as ``Warehouse.publish`` computes them."""
    inputs = {f"{data.dataset}.examples": data.data_version}
    return inputs, stable_hash(inputs, params)


@dataclass
class TeacherScoresBuild:
    version: TableVersion
    computed: bool  # False: the published table was fresh and nothing was scored
    rows: int
    seconds: float


def precompute_teacher_scores(
    wh: Warehouse,
    data: RankingData,
    members: Sequence[TeacherMember],
    config: TeacherScoreConfig | None = None,
    *,
    device: torch.device | str = "cpu",
) -> TeacherScoresBuild:
    """Score every train/valid example and K unlabelled candidates per training example with the teacher and
    publish ``<ds>.teacher_scores``; skipped when the table is fresh for these inputs and parameters."""
    config = config or TeacherScoreConfig()
    ds = check_dataset(data.dataset)
    name = f"{ds}.{TABLE}"
    params = teacher_params(members, data, config)
    inputs, key = teacher_scores_key(data, params)
    if wh.is_fresh(name, key):
        latest = wh.latest(name)
        assert latest is not None
        return TeacherScoresBuild(version=latest, computed=False, rows=latest.row_count, seconds=0.0)
    started = time.perf_counter()
    lookup = item_lookup(data)
    frames: list[pl.DataFrame] = []
    for split_name in SCORED_SPLITS:
        s = data.splits[split_name]
        rows = np.arange(len(s), dtype=np.int64)
        k = config.candidates_per_example if (split_name == "train" or config.valid_candidates) else 0
        parts = [s]
        cand_rows = np.repeat(rows, k)
        candidate = np.zeros(rows.size, dtype=np.int32)
        if k:
            items = sample_candidates(
                data, s, k, seed=config.seed, lookup=lookup, max_rounds=config.max_resample_rounds
            )
            parts.append(candidate_arrays(s, cand_rows, items.reshape(-1), lookup, data.dense_names))
            candidate = np.concatenate([candidate, np.tile(np.arange(1, k + 1, dtype=np.int32), rows.size)])
        scored = concat_splits(parts)
        logits = score_logits(members, data, scored, device, batch_size=config.batch_size)
        frame = {
            "split": [split_name] * len(scored),
            "row": np.concatenate([rows, cand_rows]),
            "candidate": candidate,
            "user_idx": scored.user,
            "item_idx": scored.item,
            "ts": scored.ts,
            "labelled": candidate == 0,
        }
        frame |= {f"teacher_{t}": logits[t] for t in data.tasks}
        frames.append(pl.DataFrame(frame))
    table = pl.concat(frames)
    version = wh.publish(name, table, inputs=inputs, params=params)
    return TeacherScoresBuild(
        version=version, computed=True, rows=table.height, seconds=time.perf_counter() - started
    )


# -- the student's training set ----------------------------------------------------------------------------


@dataclass
class DistillSet:
    """The student's training rows (labelled examples, then candidates) with the teacher's logits."""

    arrays: SplitArrays
    teacher: dict[str, np.ndarray]  # task -> [N] float32 logits
    labelled: np.ndarray  # [N] bool
    scores_version: str
    teacher_info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.arrays)


def load_teacher_scores(
    wh: Warehouse, data: RankingData, *, split: str = "train", use_unlabelled: bool = True
) -> DistillSet:
    """Read ``<ds>.teacher_scores`` for ``split`` and line it up with ``data``: the labelled rows must be that
    split's examples (else the table was built from other data: an error naming the mismatch), and the
    candidate rows are rebuilt from their example row and item."""
    ds = check_dataset(data.dataset)
    name = f"{ds}.{TABLE}"
    latest = wh.latest(name)
    if latest is None or not wh.has_table(name):
        raise ValueError(f"{name} is not in the warehouse: run precompute_teacher_scores first")
    built_from = latest.inputs.get(f"{ds}.examples")
    if built_from != data.data_version:
        raise ValueError(
            f"{name} was scored on {ds}.examples version {built_from}, the data is {data.data_version}: "
            "recompute the teacher scores"
        )
    if latest.params.get("data") != data.config.model_dump(mode="json"):
        raise ValueError(f"{name} was scored on another subsample (data config differs): recompute it")
    missing = [t for t in data.tasks if t not in latest.params.get("tasks", [])]
    if missing:
        raise ValueError(f"{name} has no teacher scores for task(s) {missing}")
    teacher_cols = ", ".join(f"teacher_{t}" for t in data.tasks)
    table = wh.sql(
        f"SELECT row, candidate, user_idx, item_idx, ts, {teacher_cols} FROM {name} WHERE split = ? "
        "ORDER BY candidate > 0, row, candidate",
        [split],
    )
    s = data.splits[split]
    labelled = table.filter(pl.col("candidate") == 0)
    rows = labelled["row"].to_numpy().astype(np.int64)
    if rows.size != len(s) or not np.array_equal(rows, np.arange(len(s))):
        raise ValueError(f"{name}: {rows.size} labelled {split} rows for {len(s)} examples: recompute it")
    for col, ref in (("user_idx", s.user), ("item_idx", s.item), ("ts", s.ts)):
        if not np.array_equal(labelled[col].to_numpy().astype(np.int64), ref):
            raise ValueError(f"{name}: column {col} of the {split} rows does not match the examples")
    parts = [s]
    teacher = {t: [labelled[f"teacher_{t}"].to_numpy().astype(np.float32)] for t in data.tasks}
    mask = [np.ones(len(s), dtype=bool)]
    cands = table.filter(pl.col("candidate") > 0)
    if use_unlabelled and cands.height:
        lookup = item_lookup(data)
        c_rows = cands["row"].to_numpy().astype(np.int64)
        c_items = cands["item_idx"].to_numpy().astype(np.int64)
        if c_rows.max() >= len(s) or not lookup.known[c_items].all():
            raise ValueError(f"{name}: candidate rows do not fit the {split} examples: recompute it")
        parts.append(candidate_arrays(s, c_rows, c_items, lookup, data.dense_names))
        for t in data.tasks:
            teacher[t].append(cands[f"teacher_{t}"].to_numpy().astype(np.float32))
        mask.append(np.zeros(cands.height, dtype=bool))
    return DistillSet(
        arrays=concat_splits(parts) if len(parts) > 1 else s,
        teacher={t: np.concatenate(v) for t, v in teacher.items()},
        labelled=np.concatenate(mask),
        scores_version=latest.version,
        teacher_info={"teacher": latest.params.get("teacher"), "scores_version": latest.version},
    )


# -- training ------------------------------------------------------------------------------------------------


@dataclass
class DistillBatch:
    batch: RankingBatch
    teacher: dict[str, torch.Tensor]  # task -> [B] logits
    labelled: torch.Tensor  # [B] bool


class DistillationTask(RankingTask):
    """``RankingTask`` (same batching, validation on the labelled valid split, test) whose training rows are
    a ``DistillSet`` and whose loss is ``distillation_loss`` per task plus the model's aux loss."""

    def __init__(
        self,
        model: nn.Module,
        data: RankingData,
        config: RankingTrainConfig,
        distill_set: DistillSet,
        distill: DistillConfig,
        seed: int = 0,
    ) -> None:
        super().__init__(model, data, config, seed)
        missing = [t for t in data.tasks if t not in distill_set.teacher]
        if missing:
            raise ValueError(f"the distill set has no teacher logits for task(s) {missing}")
        self.distill_set = distill_set
        self.distill = distill
        self.train = distill_set.arrays  # RankingTask batches self.train
        self.lengths = np.minimum(self.train.seq_offset, config.max_len)

    def train_batches(self, epoch: int, rng: np.random.Generator) -> Iterator[DistillBatch]:  # type: ignore[override]
        c = self.config
        for index in self.batch_indices(epoch, rng):
            yield DistillBatch(
                batch=self.data.make_batch(self.train, index, c.max_len, c.length_multiple),
                teacher={t: torch.from_numpy(v[index]) for t, v in self.distill_set.teacher.items()},
                labelled=torch.from_numpy(self.distill_set.labelled[index]),
            )

    def loss(self, model: nn.Module, batch: DistillBatch, device: torch.device) -> torch.Tensor:  # type: ignore[override]
        b = batch.batch.to(device)
        out = model(b)
        labelled = batch.labelled.to(device)
        total = out.aux_loss
        for task, label in b.labels.items():
            total = total + distillation_loss(
                out.logits[task],
                batch.teacher[task].to(device),
                label,
                temperature=self.distill.temperature,
                weight=self.distill.weight,
                labelled=labelled,
            )
        return total


def train_distilled(
    name: str,
    model: nn.Module,
    data: RankingData,
    distill_set: DistillSet,
    *,
    seed: int,
    train_config: RankingTrainConfig | None = None,
    loop_config: LoopConfig | None = None,
    distill_config: DistillConfig | None = None,
    model_config: FrozenModel | None = None,
    checkpoint_dir: str | Path | None = None,
    run_log: RunLog | None = None,
    run_kind: str = "distill",
    test_fn: Callable[[nn.Module, torch.device], dict[str, float]] | None = None,
) -> RankingRunResult:
    """Train the student ``model`` (seeded by the caller) on ``distill_set`` with early stopping on validation
    AUC; the test split is evaluated once on the best weights; the run is recorded with kind ``run_kind``."""
    train_config = train_config or RankingTrainConfig()
    distill_config = distill_config or DistillConfig()
    base = loop_config or LoopConfig(monitor="auc", mode="max", patience=1, max_epochs=3)
    loop_config = LoopConfig(**{**base.model_dump(), "seed": seed})
    if loop_config.monitor.split("/")[-1] not in ("auc", "gauc", "log_loss", "ne"):
        raise ValueError(f"loop.monitor must be a validation ranking metric, got {loop_config.monitor!r}")
    task = DistillationTask(model, data, train_config, distill_set, distill_config, seed)
    run_config = {
        "model": name,
        "model_config": model_config.model_dump(mode="json", exclude={"features"}) if model_config else None,
        "train": train_config.model_dump(mode="json"),
        "data": data.config.model_dump(mode="json"),
        "dataset": data.dataset,
        "distill": distill_config.model_dump(mode="json"),
        "teacher": distill_set.teacher_info,
        "train_rows": len(distill_set),
        "labelled_rows": int(distill_set.labelled.sum()),
    }
    protocol = (
        f"{PROTOCOL}; history {train_config.max_len}; seed {seed}; distilled from teacher scores "
        f"{distill_set.scores_version} (tau {distill_config.temperature}, lambda {distill_config.weight})"
    )
    result = fit(
        task,
        loop_config,
        checkpoint_dir=checkpoint_dir,
        run_log=run_log,
        run_kind=run_kind,
        run_name=name,
        run_config=run_config,
        data_version=data.data_version,
        protocol=protocol,
        test_fn=test_fn or task.test,
    )
    return RankingRunResult.from_fit(name, seed, train_config.max_len, result)
