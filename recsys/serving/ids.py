"""The user's own ids at the edges of serving: raw ids in, raw ids out, internal ids inside.

A dataset's raw ids are what its files hold. Integer ids stay as they are (``ingest.events``: raw id =
internal id); string ids (SKUs, UUIDs, ``"u_0042"``) get dense internal ids 1..n at ingest, with the lookup in
``<ds>.user_ids`` / ``<ds>.item_ids`` (docs/data-contracts.md). Models, histories, the catalogue and the
impressions log work on internal ids (the warehouse's); every output that names a user or an item
(``/recommend``, ``/rank``, ``recsys recommend``, ``recsys.Recommender``) speaks raw ids.

A registered model carries the maps it needs (``serving.registry``): the catalogue's ``raw_id`` column (the
dataset's item ids are strings) and the stored histories' ``raw_user_id`` column (user ids are strings); a
feature ranker's user table carries ``raw_user_id`` too. No column: the ids are integers.

Ids are typed: a model whose user ids are strings refuses an integer ``user_id`` (and the other way round)
with an error naming the field, instead of guessing (``"42"`` and ``42`` are different ids).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

RawId = int | str
IdType = Literal["int", "str"]
Entity = Literal["user", "item"]


class IdError(ValueError):
    """A raw id of the wrong type (or a map that contradicts another); ``field`` names the request field."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"{field_name}: {problem}")
        self.field = field_name
        self.problem = problem


@dataclass(frozen=True)
class IdMap:
    """One entity's string ids <-> internal ids (only entities with string ids have a map)."""

    entity: Entity
    internal: np.ndarray  # [n] int64, sorted
    raw: np.ndarray  # [n] object (str), raw[i] is the raw id of internal[i]
    to_internal: dict[str, int] = field(repr=False)

    @classmethod
    def from_pairs(cls, entity: Entity, raw: Sequence[str], internal: Sequence[int]) -> IdMap:
        internal_arr = np.asarray(internal, dtype=np.int64)
        raw_arr = np.asarray(list(raw), dtype=object)
        if raw_arr.shape != internal_arr.shape:
            raise ValueError(f"{entity} id map: {raw_arr.size} raw ids for {internal_arr.size} internal ids")
        if any(not isinstance(r, str) for r in raw_arr):
            raise ValueError(f"{entity} id map: raw ids must be strings")
        order = np.argsort(internal_arr, kind="stable")
        internal_arr, raw_arr = internal_arr[order], raw_arr[order]
        if internal_arr.size and (np.diff(internal_arr) == 0).any():
            raise ValueError(f"{entity} id map: an internal id appears twice")
        lookup = {str(r): int(i) for r, i in zip(raw_arr, internal_arr, strict=True)}
        if len(lookup) != raw_arr.size:
            raise ValueError(f"{entity} id map: a raw id appears twice")
        return cls(entity, internal_arr, raw_arr, lookup)

    def __len__(self) -> int:
        return int(self.internal.size)

    def raw_of(self, internal: np.ndarray) -> np.ndarray:
        """Internal ids -> raw ids (object array; None where the map has no such id)."""
        internal = np.asarray(internal, dtype=np.int64)
        out = np.full(internal.shape, None, dtype=object)
        if self.internal.size == 0 or internal.size == 0:
            return out
        pos = np.searchsorted(self.internal, internal).clip(max=self.internal.size - 1)
        hit = self.internal[pos] == internal
        out[hit] = self.raw[pos[hit]]
        return out

    def merged(self, other: IdMap) -> IdMap:
        """The union of two maps of the same dataset; a raw id with two internal ids is an error."""
        for raw, internal in other.to_internal.items():
            mine = self.to_internal.get(raw)
            if mine is not None and mine != internal:
                raise IdError(
                    self.entity, f"raw id {raw!r} is internal id {mine} in one model, {internal} in the other"
                )
        union = {**self.to_internal, **other.to_internal}
        return IdMap.from_pairs(self.entity, list(union), list(union.values()))


def _type_name(value: object) -> str:
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool) or not isinstance(value, int):
        return f"a {type(value).__name__}"
    return "an integer"


@dataclass(frozen=True)
class HistoryIds:
    """Raw history/candidate ids translated: internal ids (unknown strings get negative placeholders, which
    no catalogue holds) and the raw id of each placeholder."""

    internal: np.ndarray  # [n] int64
    unknown: dict[int, RawId]  # placeholder -> raw id


@dataclass(frozen=True)
class IdMaps:
    """A model's (or an engine's) user and item maps; ``None`` = integer ids (raw = internal)."""

    users: IdMap | None = None
    items: IdMap | None = None

    @property
    def user_type(self) -> IdType:
        return "str" if self.users is not None else "int"

    @property
    def item_type(self) -> IdType:
        return "str" if self.items is not None else "int"

    def merged(self, other: IdMaps) -> IdMaps:
        """The maps of two models served together (retriever and ranker of one dataset)."""

        def one(a: IdMap | None, b: IdMap | None) -> IdMap | None:
            return a.merged(b) if a is not None and b is not None else (a or b)

        return IdMaps(one(self.users, other.users), one(self.items, other.items))

    def check_item_type(self, other: IdMaps) -> None:
        """Two served models must name items the same way (both integers or both strings)."""
        if self.item_type != other.item_type:
            raise IdError("items", "the retriever and the ranker disagree on whether item ids are strings")

    # -- raw -> internal ---------------------------------------------------------------------------------
    def _check(self, value: object, kind: IdType, entity: Entity, field_name: str) -> None:
        expected = str if kind == "str" else int
        if not isinstance(value, expected) or isinstance(value, bool):
            want = "strings" if kind == "str" else "integers"
            raise IdError(
                field_name, f"this model's {entity} ids are {want}; got {_type_name(value)} {value!r}"
            )

    def user_internal(self, raw: RawId | None, field_name: str = "user_id") -> int | None:
        """A raw user id -> its internal id; None for None or a string id the model does not know."""
        if raw is None:
            return None
        self._check(raw, self.user_type, "user", field_name)
        if self.users is None:
            return int(raw)
        return self.users.to_internal.get(raw)  # type: ignore[arg-type]

    def items_internal(self, raw: Sequence[RawId], field_name: str) -> HistoryIds:
        """Raw item ids -> internal ids (each checked for its type); unknown strings get placeholders."""
        kind = self.item_type
        if self.items is None:
            # One vectorised pass on the hot path (rank's candidates): any string makes the array text.
            arr = np.asarray(raw) if len(raw) else np.zeros(0, dtype=np.int64)
            if arr.dtype.kind != "i":
                for value in raw:  # the error names the first misfit
                    self._check(value, kind, "item", field_name)
            return HistoryIds(arr.astype(np.int64, copy=False), {})
        if not all(type(v) is str for v in raw):
            for value in raw:
                self._check(value, kind, "item", field_name)
        lookup = self.items.to_internal
        placeholders: dict[RawId, int] = {}
        out = np.empty(len(raw), dtype=np.int64)
        for i, value in enumerate(raw):
            internal = lookup.get(value)  # type: ignore[arg-type]
            if internal is None:
                internal = placeholders.setdefault(value, -1 - len(placeholders))
            out[i] = internal
        return HistoryIds(out, {v: k for k, v in placeholders.items()})

    # -- internal -> raw ---------------------------------------------------------------------------------
    def user_raw(self, internal: int | None) -> RawId | None:
        if internal is None or self.users is None:
            return internal
        raw = self.users.raw_of(np.asarray([internal]))[0]
        return None if raw is None else str(raw)

    def items_raw(self, internal: np.ndarray, unknown: dict[int, RawId] | None = None) -> list[RawId]:
        """Internal item ids (and placeholders of ``unknown``) -> raw ids, as a list for a response."""
        internal = np.asarray(internal, dtype=np.int64)
        if self.items is None:
            return internal.tolist()
        raw = self.items.raw_of(internal)
        if unknown:
            for i in np.flatnonzero(internal < 0):
                raw[i] = unknown.get(int(internal[i]))
        return raw.tolist()
