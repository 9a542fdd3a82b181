"""The ranking data contract: ``FeatureSpec`` (what the features are), ``RankingBatch`` (one batch of them)
and ``RankingOutput`` (what every ranking model returns).

Layout of a batch of B examples (one example = one user, one candidate item, one point in time):

- ``item_id``   [B] int64: the candidate's dense item index (``<ds>.item_index``: 1..n_items, 0 = padding).
- ``sparse``    {field: [B] int64}: the non-sequential categorical features named in ``FeatureSpec.sparse``,
  each in 0..cardinality-1 with 0 = missing/unknown. Every field belongs to a semantic group: "user"
  (profile, user index), "item" (candidate attributes: category, creator, ...) or "context" (hour, weekday).
- ``dense``     [B, F] float32: the point-in-time statistics named in ``FeatureSpec.dense``, in that order
  (counts, rates; F may be 0). Models apply sign(x) * log1p(|x|) so raw counts are safe.
- ``sequences`` {name: SequenceBatch}: the behaviour sequences named in ``FeatureSpec.sequences``.
- ``labels``    {task: [B] float32 in {0, 1}}: one per task of ``FeatureSpec.tasks``; empty when serving.
- ``user_id``   [B] int64 or None: grouping key for GAUC; models never read it.

A ``SequenceBatch`` is **left-padded**: the valid steps are the last ``lengths[b]`` positions, oldest first,
so the most recent step is always at position L - 1 and ``x[:, -k:]`` are the k most recent steps (LONGER's
queries). Its fields: ``lengths`` [B] int64; ``time_gap`` [B, L] float32 = seconds from the step's event to
the example's ts (>= 0, 0 at padding); ``side`` {name: [B, L] int64} per-step side features (category,
rating/action bucket; 0 at padding); and the item ids in one of two forms: ``item_ids`` [B, L] int64 (0 at
padding), or the deduplicated form ``unique_ids`` [U] int64 + ``inverse`` [B, L] int32 (-1 at padding) made on
the host by ``SequenceBatch.deduplicated()`` so that only those travel to the device
(see ``recsys.models.ops.unique_pooling``).

Filling a batch from the Parquet exports: ``<ds>.sequences`` holds each user's whole history and every example
row a ``seq_offset`` (the number of the user's events strictly before its ts); ``history_window`` turns the
concatenated histories + offsets into the left-padded [B, L] windows and lengths in one vectorised step.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from recsys.core.config import FrozenModel
from recsys.models.ops.unique_pooling import deduplicate

FieldGroup = Literal["user", "item", "context"]
FIELD_GROUPS: tuple[FieldGroup, ...] = ("user", "item", "context")


class SparseField(FrozenModel):
    name: str = Field(min_length=1)
    cardinality: int = Field(ge=2, description="Ids are 0..cardinality-1; 0 means missing/unknown.")
    group: FieldGroup = Field(description="Semantic group (RankMixer tokenisation, global tokens).")


class SideField(FrozenModel):
    """A per-step feature of a sequence. If a sparse field has the same name (e.g. "category" as a candidate
    attribute and as a per-step feature), both use one embedding table: steps and candidate share a space."""

    name: str = Field(min_length=1)
    cardinality: int = Field(ge=2, description="Ids are 0..cardinality-1; 0 is padding.")


class SequenceSpec(FrozenModel):
    name: str = Field(min_length=1)
    max_len: int = Field(ge=1, description="L: the window of most recent steps a batch carries.")
    side: tuple[SideField, ...] = ()


class FeatureSpec(FrozenModel):
    """The feature schema a model is built for (cardinalities come from the feature export's metadata)."""

    n_items: int = Field(ge=1, description="Largest item index; tables hold n_items + 1 rows (0 = padding).")
    sparse: tuple[SparseField, ...] = ()
    dense: tuple[str, ...] = Field((), description="Names of the dense columns, in batch.dense order.")
    sequences: tuple[SequenceSpec, ...] = ()
    tasks: tuple[str, ...] = Field(("click",), min_length=1, description="Label names, one logit each.")

    @model_validator(mode="after")
    def _check_names(self) -> FeatureSpec:
        for what, names in (
            ("sparse", [f.name for f in self.sparse]),
            ("dense", list(self.dense)),
            ("sequences", [s.name for s in self.sequences]),
            ("tasks", list(self.tasks)),
        ):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"FeatureSpec.{what} has duplicate names: {dupes}")
        sparse = {f.name: f for f in self.sparse}
        for seq in self.sequences:
            side_names = [s.name for s in seq.side]
            if len(set(side_names)) != len(side_names):
                raise ValueError(f"sequence {seq.name!r} has duplicate side fields: {side_names}")
            for side in seq.side:
                shared = sparse.get(side.name)
                if shared is not None and shared.cardinality != side.cardinality:
                    raise ValueError(
                        f"side field {seq.name}.{side.name} shares the table of sparse field {side.name!r} "
                        f"but has cardinality {side.cardinality} != {shared.cardinality}"
                    )
        return self

    def fields(self, group: FieldGroup) -> tuple[SparseField, ...]:
        return tuple(f for f in self.sparse if f.group == group)

    def sequence(self, name: str) -> SequenceSpec:
        for seq in self.sequences:
            if seq.name == name:
                return seq
        raise KeyError(f"no sequence {name!r} in the FeatureSpec (have {[s.name for s in self.sequences]})")


def _move(t: torch.Tensor | None, device: torch.device | str, non_blocking: bool) -> torch.Tensor | None:
    return None if t is None else t.to(device, non_blocking=non_blocking)


@dataclass
class SequenceBatch:
    """One behaviour sequence of a batch, left-padded (see the module docstring for every field's shape)."""

    lengths: torch.Tensor  # [B] int64
    time_gap: torch.Tensor  # [B, L] float32, seconds
    side: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B, L] int64
    item_ids: torch.Tensor | None = None  # [B, L] int64, 0 = padding
    unique_ids: torch.Tensor | None = None  # [U] int64
    inverse: torch.Tensor | None = None  # [B, L] int32, -1 = padding

    def __post_init__(self) -> None:
        dense_form = self.item_ids is not None
        unique_form = self.unique_ids is not None and self.inverse is not None
        if dense_form == unique_form or (self.unique_ids is None) != (self.inverse is None):
            raise ValueError("SequenceBatch needs either item_ids, or unique_ids together with inverse")

    @property
    def batch_size(self) -> int:
        return int(self.time_gap.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.time_gap.shape[1])

    @property
    def is_deduplicated(self) -> bool:
        return self.item_ids is None

    def valid_mask(self) -> torch.Tensor:
        """[B, L] bool, True at the valid steps (the last ``lengths[b]`` positions)."""
        positions = torch.arange(self.seq_len, device=self.lengths.device)
        return positions.unsqueeze(0) >= (self.seq_len - self.lengths).unsqueeze(1)

    def deduplicated(self) -> SequenceBatch:
        """The same sequence with item ids as unique ids + int32 inverse (call on the host, before ``to``)."""
        if self.item_ids is None:
            return self
        unique, inverse = deduplicate(self.item_ids, padding_id=0)
        return replace(self, item_ids=None, unique_ids=unique, inverse=inverse)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SequenceBatch:
        return SequenceBatch(
            lengths=self.lengths.to(device, non_blocking=non_blocking),
            time_gap=self.time_gap.to(device, non_blocking=non_blocking),
            side={k: v.to(device, non_blocking=non_blocking) for k, v in self.side.items()},
            item_ids=_move(self.item_ids, device, non_blocking),
            unique_ids=_move(self.unique_ids, device, non_blocking),
            inverse=_move(self.inverse, device, non_blocking),
        )

    def tensors(self) -> list[torch.Tensor]:
        parts = [self.lengths, self.time_gap, *self.side.values()]
        return parts + [t for t in (self.item_ids, self.unique_ids, self.inverse) if t is not None]


@dataclass
class RankingBatch:
    """A batch of ranking examples (see the module docstring for every field's shape)."""

    item_id: torch.Tensor  # [B] int64
    sparse: dict[str, torch.Tensor]  # field -> [B] int64
    dense: torch.Tensor  # [B, F] float32
    sequences: dict[str, SequenceBatch] = field(default_factory=dict)
    labels: dict[str, torch.Tensor] = field(default_factory=dict)  # task -> [B] float32
    user_id: torch.Tensor | None = None  # [B] int64

    @property
    def batch_size(self) -> int:
        return int(self.item_id.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> RankingBatch:
        return RankingBatch(
            item_id=self.item_id.to(device, non_blocking=non_blocking),
            sparse={k: v.to(device, non_blocking=non_blocking) for k, v in self.sparse.items()},
            dense=self.dense.to(device, non_blocking=non_blocking),
            sequences={k: v.to(device, non_blocking=non_blocking) for k, v in self.sequences.items()},
            labels={k: v.to(device, non_blocking=non_blocking) for k, v in self.labels.items()},
            user_id=_move(self.user_id, device, non_blocking),
        )

    def deduplicated(self) -> RankingBatch:
        """Every sequence in the deduplicated form (see ``SequenceBatch.deduplicated``)."""
        return replace(self, sequences={k: v.deduplicated() for k, v in self.sequences.items()})

    def nbytes(self) -> int:
        """Bytes of all tensors: what ``to(device)`` copies host -> device."""
        parts = [self.item_id, self.dense, *self.sparse.values(), *self.labels.values()]
        parts += [t for s in self.sequences.values() for t in s.tensors()]
        if self.user_id is not None:
            parts.append(self.user_id)
        return sum(t.numel() * t.element_size() for t in parts)

    def validate(self, spec: FeatureSpec) -> None:
        """Raise a ValueError naming the field if the batch does not match ``spec`` (shapes, dtypes, ids).

        Meant for the data loader and tests (it reads values, so it synchronises a GPU)."""
        b = self.batch_size
        _check(self.item_id, "item_id", (b,), torch.int64, 1, spec.n_items)
        missing = {f.name for f in spec.sparse} - self.sparse.keys()
        if missing:
            raise ValueError(f"sparse is missing fields {sorted(missing)}")
        for f in spec.sparse:
            _check(self.sparse[f.name], f"sparse[{f.name!r}]", (b,), torch.int64, 0, f.cardinality - 1)
        if tuple(self.dense.shape) != (b, len(spec.dense)) or not self.dense.is_floating_point():
            raise ValueError(
                f"dense must be float [{b}, {len(spec.dense)}], got {self.dense.dtype} {_shape(self.dense)}"
            )
        for seq_spec in spec.sequences:
            seq = self.sequences.get(seq_spec.name)
            if seq is None:
                raise ValueError(f"sequences is missing {seq_spec.name!r}")
            _check_sequence(seq, seq_spec, b, spec.n_items)
        for task, label in self.labels.items():
            if task not in spec.tasks:
                raise ValueError(f"labels[{task!r}] is not a task of the spec {spec.tasks}")
            if _shape(label) != (b,) or not label.is_floating_point():
                raise ValueError(f"labels[{task!r}] must be float [{b}], got {label.dtype} {_shape(label)}")
            if label.numel() and not bool(((label == 0) | (label == 1)).all()):
                raise ValueError(f"labels[{task!r}] must hold only 0 and 1")


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _check(t: torch.Tensor, name: str, shape: tuple[int, ...], dtype: torch.dtype, lo: int, hi: int) -> None:
    if _shape(t) != shape or t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype} {list(shape)}, got {t.dtype} {list(_shape(t))}")
    if t.numel() and (int(t.min()) < lo or int(t.max()) > hi):
        raise ValueError(f"{name} has ids outside [{lo}, {hi}]: min {int(t.min())}, max {int(t.max())}")


def _check_sequence(seq: SequenceBatch, spec: SequenceSpec, b: int, n_items: int) -> None:
    name = f"sequences[{spec.name!r}]"
    length = seq.seq_len
    if length > spec.max_len:
        raise ValueError(f"{name} has L = {length} > max_len {spec.max_len}")
    if _shape(seq.time_gap) != (b, length) or not seq.time_gap.is_floating_point():
        raise ValueError(f"{name}.time_gap must be float [{b}, {length}], got {_shape(seq.time_gap)}")
    if seq.time_gap.numel() and bool((seq.time_gap < 0).any()):
        raise ValueError(f"{name}.time_gap must be >= 0 (seconds before the example's ts)")
    _check(seq.lengths, f"{name}.lengths", (b,), torch.int64, 0, length)
    valid = seq.valid_mask()
    if seq.item_ids is not None:
        _check(seq.item_ids, f"{name}.item_ids", (b, length), torch.int64, 0, n_items)
        if bool(((seq.item_ids != 0) != valid).any()):
            raise ValueError(
                f"{name}.item_ids must be left-padded with 0 exactly outside the last `lengths` steps"
            )
    else:
        assert seq.unique_ids is not None and seq.inverse is not None
        n_unique = seq.unique_ids.numel()
        _check(seq.unique_ids, f"{name}.unique_ids", (n_unique,), torch.int64, 1, n_items)
        _check(seq.inverse, f"{name}.inverse", (b, length), torch.int32, -1, n_unique - 1)
        if bool(((seq.inverse >= 0) != valid).any()):
            raise ValueError(f"{name}.inverse must be -1 exactly outside the last `lengths` steps")
    for side in spec.side:
        if side.name not in seq.side:
            raise ValueError(f"{name}.side is missing {side.name!r}")
        _check(
            seq.side[side.name],
            f"{name}.side[{side.name!r}]",
            (b, length),
            torch.int64,
            0,
            side.cardinality - 1,
        )


@dataclass
class RankingOutput:
    """What every ranking model returns."""

    logits: dict[str, torch.Tensor]  # task -> [B], pre-sigmoid
    aux_loss: torch.Tensor  # scalar to add to the loss (RankMixer MoE gate L1 penalty); 0 otherwise


def history_window(
    values: np.ndarray, starts: np.ndarray, seq_offset: np.ndarray, max_len: int, pad_value: float | int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded windows of the ``max_len`` most recent history steps, vectorised over a batch.

    ``values`` is every user's history concatenated (e.g. the flattened ``sequences.item_idx`` lists),
    ``starts[b]`` the position in ``values`` where example b's user's history begins, ``seq_offset[b]`` the
    number of that user's events strictly before the example's ts. Returns (window [B, max_len] of
    ``values``' dtype, padded with ``pad_value`` on the left; lengths [B] int64 = min(seq_offset, max_len)).
    """
    starts = np.asarray(starts, dtype=np.int64)
    seq_offset = np.asarray(seq_offset, dtype=np.int64)
    if starts.shape != seq_offset.shape or starts.ndim != 1:
        raise ValueError(f"starts {starts.shape} and seq_offset {seq_offset.shape} must be equal 1-D shapes")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if seq_offset.size and seq_offset.min() < 0:
        raise ValueError("seq_offset must be >= 0")
    end = starts + seq_offset  # one past the last history step, [B]
    if end.size and (starts.min() < 0 or end.max() > len(values)):
        raise ValueError(f"starts + seq_offset run outside values (len {len(values)})")
    lengths = np.minimum(seq_offset, max_len)
    pos = np.arange(max_len)[None, :]  # [1, L]
    src = end[:, None] - max_len + pos  # [B, L]
    valid = pos >= (max_len - lengths)[:, None]
    window = np.full(src.shape, pad_value, dtype=np.asarray(values).dtype)
    window[valid] = np.asarray(values)[src[valid]]
    return window, lengths.astype(np.int64)


def demo_spec(n_sequences: int = 1, tasks: tuple[str, ...] = ("click",), max_len: int = 12) -> FeatureSpec:
    """A small MovieLens-like spec (user/item/context fields, 3 dense statistics, sequences with category and
    rating-bucket side features) for smoke tests, benchmarks and examples."""
    sequences = tuple(
        SequenceSpec(
            name="history" if i == 0 else f"history_{i}",
            max_len=max_len,
            side=(SideField(name="category", cardinality=8), SideField(name=f"rating_{i}", cardinality=6)),
        )
        for i in range(n_sequences)
    )
    return FeatureSpec(
        n_items=60,
        sparse=(
            SparseField(name="user", cardinality=30, group="user"),
            SparseField(name="age_bucket", cardinality=7, group="user"),
            SparseField(name="category", cardinality=8, group="item"),
            SparseField(name="hour", cardinality=24, group="context"),
        ),
        dense=("user_events", "item_events", "user_category_events"),
        sequences=sequences,
        tasks=tasks,
    )


def synthetic_batch(spec: FeatureSpec, batch_size: int, seed: int = 0) -> RankingBatch:
    """A random batch that follows ``spec``, with learnable labels (for smoke tests and benchmarks).

    Labels: task t is Bernoulli(sigmoid(b_t[item] + 2 * [candidate occurs in the first sequence] - 1)), with a
    fixed per-item bias b_t drawn from ``seed``; half of the candidates are taken from the history.
    """
    g = torch.Generator().manual_seed(seed)
    sparse = {f.name: torch.randint(0, f.cardinality, (batch_size,), generator=g) for f in spec.sparse}
    dense = torch.randn(batch_size, len(spec.dense), generator=g).abs() * 10.0
    sequences: dict[str, SequenceBatch] = {}
    for seq in spec.sequences:
        length = seq.max_len
        lengths = torch.randint(0, length + 1, (batch_size,), generator=g)
        valid = torch.arange(length).unsqueeze(0) >= (length - lengths).unsqueeze(1)
        item_ids = torch.randint(1, spec.n_items + 1, (batch_size, length), generator=g) * valid
        side = {
            s.name: torch.randint(1, s.cardinality, (batch_size, length), generator=g) * valid
            for s in seq.side
        }
        steps_back = torch.arange(length, 0, -1, dtype=torch.float32).unsqueeze(
            0
        )  # the newest step is 1 back
        time_gap = steps_back * 3600.0 * (0.5 + torch.rand(batch_size, length, generator=g)) * valid
        sequences[seq.name] = SequenceBatch(lengths=lengths, time_gap=time_gap, side=side, item_ids=item_ids)
    item_id = torch.randint(1, spec.n_items + 1, (batch_size,), generator=g)
    in_history = torch.zeros(batch_size, dtype=torch.bool)
    if sequences:
        first = next(iter(sequences.values()))
        assert first.item_ids is not None
        pick = torch.randint(0, first.seq_len, (batch_size,), generator=g)
        picked = first.item_ids.gather(1, pick.unsqueeze(1)).squeeze(1)
        take = (torch.rand(batch_size, generator=g) < 0.5) & (picked > 0)
        item_id = torch.where(take, picked, item_id)
        in_history = (first.item_ids == item_id.unsqueeze(1)).any(dim=1)
    labels = {}
    for task in spec.tasks:
        bias = torch.randn(spec.n_items + 1, generator=g)
        logit = bias[item_id] + 2.0 * in_history.float() - 1.0
        labels[task] = torch.bernoulli(torch.sigmoid(logit), generator=g)
    user_id = torch.randint(1, max(2, batch_size // 4), (batch_size,), generator=g)
    return RankingBatch(
        item_id=item_id, sparse=sparse, dense=dense, sequences=sequences, labels=labels, user_id=user_id
    )
