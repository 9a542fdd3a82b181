"""Feature embedding and tokenisation shared by the ranking models.

``FeatureEmbedding`` owns every table of a ``FeatureSpec`` at one width ``dim``:
- the item table (candidate and sequence steps share it; row 0 is padding and stays zero);
- one table per sparse field (row 0 = missing/unknown, learned);
- one table per sequence side field, except that a side field named like a sparse field reuses that field's
  table (so a step's category and the candidate's category live in one space);
- a time-gap bucket table: bucket = clamp(floor(log2(1 + gap_minutes)), 0, n - 1) (minutes to years);
- a Linear for the dense statistics, applied to sign(x) * log1p(|x|) so raw counts are safe.

A sequence step's embedding is the sum of its item and side-field embeddings (width ``dim``; OPEN in no spec,
picked so that step and candidate are comparable by dot products); padding steps are zero. The *candidate
token* is its item embedding plus the embeddings of the sparse fields that are also side fields, i.e. the
same recipe as a step. When a sequence arrives deduplicated (``unique_ids`` + ``inverse``), the item part is
looked up once per unique id and rebuilt or pooled on the device by ``recsys.models.ops.unique_pooling``.

Packed steps (training speed): ``pack_steps`` lists the valid steps of a left-padded sequence (their example
and their position in the flattened [B * L] grid); ``step_rows`` / ``time_gap_rows`` embed only those, and
``pooled_sequence`` sums them per example with ``index_add``, so padding costs nothing. Sequence lookups use
``gather_rows``, a row gather whose backward is one ``index_add`` (PyTorch's CPU embedding backward sorts the
indices first, about twice as slow here); the gradients are the same.

``SemanticTokenizer`` is RankMixer's tokenisation: the embeddings in semantic order (user fields, candidate
item id, item fields, context fields, the dense token, optionally the pooled sequences) are concatenated,
zero-padded to a multiple of T, cut into T equal chunks, and each chunk is projected to width D (OPEN:
per-token or shared projection; default per-token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from recsys.models.batch import FeatureSpec, RankingBatch, SequenceBatch
from recsys.models.layers import PerTokenLinear
from recsys.models.ops.unique_pooling import Backend, unique_gather

SequencePool = Literal["sum", "mean"]


def symlog(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(x.abs())


def time_gap_bucket(gap_seconds: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """Seconds -> int64 bucket floor(log2(1 + minutes)), clamped to [0, n_buckets - 1]."""
    minutes = gap_seconds.clamp_min(0.0) / 60.0
    return torch.log2(1.0 + minutes).floor().long().clamp(0, n_buckets - 1)


class _GatherRows(torch.autograd.Function):
    """``weight[index]`` whose backward scatters with one ``index_add`` (no grad to ``padding_idx``)."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, index: torch.Tensor, padding_idx: int) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows, ctx.padding_idx = weight.shape[0], padding_idx
        return weight.index_select(0, index.reshape(-1)).view(*index.shape, weight.shape[1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (index,) = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1])
        out = flat.new_zeros(ctx.rows, flat.shape[1]).index_add_(0, index.reshape(-1), flat)
        if ctx.padding_idx >= 0:
            out[ctx.padding_idx] = 0.0
        return out, None, None


def gather_rows(table: nn.Embedding, index: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``table(index)`` with the same values and gradients (the table's padding row gets none); with
    ``weight`` (a function of the table's rows, e.g. them projected), rows of ``weight`` instead."""
    padding = -1 if table.padding_idx is None else int(table.padding_idx)
    return _GatherRows.apply(table.weight if weight is None else weight, index, padding)


@dataclass
class PackedSteps:
    """The valid steps of a left-padded [B, L] sequence batch, in row-major order."""

    flat: torch.Tensor  # [N] int64: position in the flattened [B * L] grid
    example: torch.Tensor  # [N] int64: the step's example (row b)
    position: torch.Tensor  # [N] int64: the step's column 0..L-1
    batch_size: int
    seq_len: int


def pack_steps(seq: SequenceBatch) -> PackedSteps:
    flat = seq.valid_mask().reshape(-1).nonzero().squeeze(1)
    length = seq.seq_len
    return PackedSteps(flat, flat // length, flat % length, seq.batch_size, length)


class FeatureEmbedding(nn.Module):
    def __init__(
        self, spec: FeatureSpec, dim: int, time_gap_buckets: int = 24, unique_backend: Backend = "auto"
    ) -> None:
        super().__init__()
        self.spec, self.dim, self.time_gap_buckets, self.unique_backend = (
            spec,
            dim,
            time_gap_buckets,
            unique_backend,
        )
        self.item = nn.Embedding(spec.n_items + 1, dim, padding_idx=0)
        self.sparse = nn.ModuleDict({f.name: nn.Embedding(f.cardinality, dim) for f in spec.sparse})
        self.side = nn.ModuleDict()
        self._side_table: dict[tuple[str, str], str] = {}  # (sequence, side field) -> table key
        for seq in spec.sequences:
            for side in seq.side:
                if side.name in self.sparse:
                    self._side_table[(seq.name, side.name)] = f"sparse:{side.name}"
                else:
                    key = f"{seq.name}__{side.name}"
                    self.side[key] = nn.Embedding(side.cardinality, dim, padding_idx=0)
                    self._side_table[(seq.name, side.name)] = f"side:{key}"
        shared = {s.name for seq in spec.sequences for s in seq.side}
        self.candidate_fields = tuple(f.name for f in spec.sparse if f.name in shared)
        self.time_gap = nn.Embedding(time_gap_buckets, dim)
        self.dense = nn.Linear(len(spec.dense), dim) if spec.dense else None
        with torch.no_grad():
            for table in [self.item, self.time_gap, *self.sparse.values(), *self.side.values()]:
                nn.init.normal_(table.weight, std=0.05)
                if table.padding_idx is not None:
                    table.weight[table.padding_idx].zero_()

    def _side_embedding(self, seq_name: str, side_name: str) -> nn.Embedding:
        kind, key = self._side_table[(seq_name, side_name)].split(":", 1)
        return self.sparse[key] if kind == "sparse" else self.side[key]

    # --- non-sequential features -------------------------------------------------------------------------

    def candidate(self, batch: RankingBatch) -> torch.Tensor:
        """The candidate token [B, dim]: item embedding + the sparse fields that are also step side fields."""
        out = self.item(batch.item_id)
        for name in self.candidate_fields:
            out = out + self.sparse[name](batch.sparse[name])
        return out

    def field_tokens(self, batch: RankingBatch, group: str) -> torch.Tensor:
        """[B, n_fields, dim]: one embedding per sparse field of ``group`` ("user", "item", "context")."""
        embs = [self.sparse[f.name](batch.sparse[f.name]) for f in self.spec.fields(group)]  # type: ignore[arg-type]
        if not embs:
            return self.item.weight.new_zeros(batch.batch_size, 0, self.dim)
        return torch.stack(embs, dim=1)

    def dense_token(self, batch: RankingBatch) -> torch.Tensor | None:
        """[B, dim] projection of the (symlog'ed) dense statistics, or None when the spec has none."""
        return None if self.dense is None else self.dense(symlog(batch.dense))

    # --- sequences -----------------------------------------------------------------------------------

    def _sequence_batch(self, batch: RankingBatch, name: str) -> SequenceBatch:
        if name not in batch.sequences:
            raise KeyError(f"the batch has no sequence {name!r} (has {sorted(batch.sequences)})")
        return batch.sequences[name]

    def sequence(self, batch: RankingBatch, name: str) -> torch.Tensor:
        """[B, L, dim] step embeddings (item + side fields), zero at padding."""
        seq = self._sequence_batch(batch, name)
        valid = seq.valid_mask().unsqueeze(-1)  # [B, L, 1]
        if seq.item_ids is not None:
            out = gather_rows(self.item, seq.item_ids)
        else:
            out = unique_gather(self.item(seq.unique_ids), seq.inverse, "none", self.unique_backend)
        for side in self.spec.sequence(name).side:
            out = out + gather_rows(self._side_embedding(name, side.name), seq.side[side.name]) * valid
        return out

    def step_rows(
        self, batch: RankingBatch, name: str, flat: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[*flat.shape, dim] embeddings of the steps at ``flat`` (positions in the flattened [B * L] grid):
        the same rows ``sequence`` gives there; with ``valid`` (flat's shape), zero where it is False."""
        seq = self._sequence_batch(batch, name)
        if seq.item_ids is not None:
            out = gather_rows(self.item, seq.item_ids.reshape(-1)[flat])
        else:
            assert seq.unique_ids is not None and seq.inverse is not None
            rows = seq.inverse.reshape(-1)[flat].long().clamp_min(0)
            out = self.item(seq.unique_ids)[rows]
        for side in self.spec.sequence(name).side:
            out = out + gather_rows(
                self._side_embedding(name, side.name), seq.side[side.name].reshape(-1)[flat]
            )
        return out if valid is None else out * valid.unsqueeze(-1)

    def projected_step_rows(
        self, batch: RankingBatch, name: str, flat: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor:
        """``step_rows(batch, name, flat) @ weight.T`` computed as gathers from the projected tables
        (table @ weight.T, rows x out): a Linear right after the step embedding, folded into the lookups.
        Needs the plain ``item_ids`` form."""
        seq = self._sequence_batch(batch, name)
        if seq.item_ids is None:
            raise ValueError("projected_step_rows needs the item_ids form of the sequence")
        out = gather_rows(self.item, seq.item_ids.reshape(-1)[flat], self.item.weight @ weight.T)
        for side in self.spec.sequence(name).side:
            table = self._side_embedding(name, side.name)
            out = out + gather_rows(table, seq.side[side.name].reshape(-1)[flat], table.weight @ weight.T)
        return out

    def time_gap_rows(
        self,
        batch: RankingBatch,
        name: str,
        flat: torch.Tensor,
        valid: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[*flat.shape, dim] time-gap embeddings of the steps at ``flat`` (as ``time_gap_embedding``);
        with ``weight`` [out, dim], those embeddings @ weight.T, gathered from the projected table."""
        seq = self._sequence_batch(batch, name)
        bucket = time_gap_bucket(seq.time_gap.reshape(-1)[flat], self.time_gap_buckets)
        out = gather_rows(self.time_gap, bucket, None if weight is None else self.time_gap.weight @ weight.T)
        return out if valid is None else out * valid.unsqueeze(-1)

    def pooled_sequence(self, batch: RankingBatch, name: str, mode: SequencePool) -> torch.Tensor:
        """[B, dim] sum or mean of the valid step embeddings (zeros for an empty history).

        A deduplicated sequence is pooled straight from the unique rows, never materialising [B, L, dim]
        for the item part."""
        seq = self._sequence_batch(batch, name)
        count = (
            seq.lengths.clamp(0, seq.seq_len).clamp_min(1).unsqueeze(1).to(self.item.weight.dtype)
        )  # [B, 1]
        if seq.item_ids is not None:  # only the valid steps, summed per example
            packed = pack_steps(seq)
            rows = self.step_rows(batch, name, packed.flat)  # [N, dim]
            out = rows.new_zeros(seq.batch_size, self.dim).index_add(0, packed.example, rows)
            return out / count if mode == "mean" else out
        valid = seq.valid_mask()
        out = unique_gather(self.item(seq.unique_ids), seq.inverse, "sum", self.unique_backend)
        for side in self.spec.sequence(name).side:
            out = out + (
                self._side_embedding(name, side.name)(seq.side[side.name]) * valid.unsqueeze(-1)
            ).sum(1)
        return out / count if mode == "mean" else out

    def time_gap_embedding(self, batch: RankingBatch, name: str) -> torch.Tensor:
        """[B, L, dim] embedding of each step's time-gap bucket, zero at padding."""
        seq = self._sequence_batch(batch, name)
        emb = gather_rows(self.time_gap, time_gap_bucket(seq.time_gap, self.time_gap_buckets))
        return emb * seq.valid_mask().unsqueeze(-1)

    # --- semantic groups (RankMixer tokenisation) ----------------------------------------------------

    def n_semantic_slots(self, pooled_sequences: tuple[str, ...] = ()) -> int:
        return len(self.spec.sparse) + 1 + (self.dense is not None) + len(pooled_sequences)

    def semantic_slots(
        self, batch: RankingBatch, pooled_sequences: tuple[str, ...] = (), pool: SequencePool = "mean"
    ) -> torch.Tensor:
        """[B, n_slots, dim] in semantic order: user fields, candidate item id, item fields, context fields,
        the dense token, then the pooled ``pooled_sequences``."""
        parts = [self.field_tokens(batch, "user"), self.item(batch.item_id).unsqueeze(1)]
        parts += [self.field_tokens(batch, "item"), self.field_tokens(batch, "context")]
        dense = self.dense_token(batch)
        if dense is not None:
            parts.append(dense.unsqueeze(1))
        parts += [self.pooled_sequence(batch, name, pool).unsqueeze(1) for name in pooled_sequences]
        return torch.cat(parts, dim=1)


class SemanticTokenizer(nn.Module):
    """RankMixer tokenisation: semantic slots [B, G, e] -> flat [B, G*e] -> T chunks -> [B, T, D]."""

    def __init__(
        self,
        n_slots: int,
        slot_dim: int,
        n_tokens: int,
        token_dim: int,
        projection: Literal["per_token", "shared"],
    ) -> None:
        super().__init__()
        if n_tokens < 1:
            raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
        width = n_slots * slot_dim
        self.n_tokens = n_tokens
        self.chunk = -(-width // n_tokens)  # ceil: the last chunk is zero-padded
        self.pad = self.chunk * n_tokens - width
        if projection == "per_token":
            self.proj: nn.Module = PerTokenLinear(n_tokens, self.chunk, token_dim)
        elif projection == "shared":
            self.proj = nn.Linear(self.chunk, token_dim)
        else:
            raise ValueError(f"projection must be 'per_token' or 'shared', got {projection!r}")

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        flat = slots.flatten(1)  # [B, G*e]
        if self.pad:
            flat = nn.functional.pad(flat, (0, self.pad))
        chunks = flat.view(flat.shape[0], self.n_tokens, self.chunk)  # [B, T, chunk]
        return self.proj(chunks)  # [B, T, D]
