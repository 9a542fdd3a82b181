"""Request-time features for the feature-based rankers (DeepFM, DIN, RankMixer, LONGER, HyFormer).

A ``RankingFeaturizer`` is built once, at registration (``serving.registry.register_ranker``), from the
warehouse and the ``training.ranking.RankingData`` the ranker was trained on, and saved beside the weights
as Parquet + JSON files that the registry checksums like every other file (nothing is pickled):

- ``features.json``                the manifest: the model's ``FeatureSpec``, the context fields, the dense
                                   features (where each comes from, the train split's mean and std of its
                                   symlog), the value-bucket edges of the ``action`` side feature, the decay
                                   half-lives, the batch-width rule;
- ``features_users.parquet``       ``user_id -> user_idx`` with the encoded profile ids (``u_<attr>``), the
                                   raw numeric profile values and, when the dataset's user ids are strings,
                                   the users' own ids (``raw_user_id``, ``serving.ids``);
- ``features_items.parquet``       ``item_id -> item_idx`` with the encoded item attributes (candidate fields
                                   and history side features share them), raw numeric attributes, release_ts;
- ``features_histories.parquet``   every known user's whole history (item_idx, ts, value), sequence order;
- ``features_item_events.parquet`` every event in (item, ts) order: the item-side point-in-time statistics.

At request time ``user_features`` + ``batch`` turn (user id, the history sent with the request or the stored
one, candidate item ids, request ts) into a ``models.batch.RankingBatch`` built exactly as
``RankingData.make_batch`` builds a training batch: the same vocabularies, the same left-padded window of the
``max_len`` most recent events strictly before the request ts, the same width rule (the longest window of the
batch rounded up to ``length_multiple``), and the point-in-time statistics of ``features.point_in_time``
recomputed from the events strictly before ts with that module's definitions (u_cnt, u_value_mean,
u_secs_since_last, u_decay_<h>, i_cnt, i_value_mean, i_secs_since_first, i_age_s), then symlog and the
train split's standardisation (missing -> 0). tests/serving/test_featurize.py checks, on test-split
examples, that the batches and the model scores equal training's.

OPEN choices, and what was picked:
- Item-side statistics (i_cnt, i_value_mean, i_secs_since_first) need every user's events, which no single
  request carries: they are computed from the event log frozen at registration (exact for any ts up to the
  data's end; later requests see the counts as of that snapshot until the ranker is registered again).
  Everything user-side is computed from the request's history (or the stored one) at the request ts.
- A request history may carry each event's ``value`` (rating / dwell); without it the event counts in
  ``u_cnt`` and the decayed counters but not in ``u_value_mean``, and its ``action`` bucket is the NULL
  bucket, as a NULL value is in training. Events at or after the request ts are not read (point in time).
- History events of items the ranker does not know count in the user statistics (they are events) but are
  left out of the behaviour sequence (no embedding); unknown candidates are not featurized (the service
  gives them the popularity prior of an unseen item).
- Impression-log rankers read the slot ``position`` as a context feature: serving scores every candidate at
  ``serving_position`` (default 0, the top slot), the usual way to rank without position bias.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import polars as pl
import torch
from pydantic import Field

from recsys.core.atomic import atomic_path
from recsys.core.config import FrozenModel
from recsys.features.encoding import ValueBuckets, categorical_columns, encode, symlog, vocabulary
from recsys.models.batch import FeatureSpec, RankingBatch, SequenceBatch

if TYPE_CHECKING:
    from recsys.training.ranking import RankingData
    from recsys.warehouse import Warehouse

FEATURES_FILE = "features.json"
USERS_FILE = "features_users.parquet"
ITEMS_FILE = "features_items.parquet"
HISTORIES_FILE = "features_histories.parquet"
ITEM_EVENTS_FILE = "features_item_events.parquet"
FEATURIZER_FILES = (FEATURES_FILE, USERS_FILE, ITEMS_FILE, HISTORIES_FILE, ITEM_EVENTS_FILE)

SEQUENCE = "history"  # training.ranking.SEQUENCE (not imported: serving stays free of the training stack)
ACTION = "action"
_KEY_SHIFT = 32  # (item_idx << 32) | (ts - origin): one sortable int64 per item event
_TS_MASK = (1 << _KEY_SHIFT) - 1
_DECAY = re.compile(r"^u_decay_")
DenseSource = Literal[
    "u_cnt",
    "u_value_mean",
    "u_secs_since_last",
    "u_decay",
    "i_cnt",
    "i_value_mean",
    "i_secs_since_first",
    "i_age_s",
    "user_attr",
    "item_attr",
]
_BEHAVIOURAL: tuple[DenseSource, ...] = (
    "u_cnt",
    "u_value_mean",
    "u_secs_since_last",
    "i_cnt",
    "i_value_mean",
    "i_secs_since_first",
    "i_age_s",
)


class FeaturizerError(ValueError):
    """The ranker's features cannot be built (at registration) or a request cannot be featurized."""


class DenseFeature(FrozenModel):
    name: str
    source: DenseSource
    half_life_s: float | None = Field(None, gt=0.0, description="u_decay: the counter's half-life.")
    mean: float = Field(description="Train-split mean of symlog(x).")
    std: float = Field(gt=0.0, description="Train-split std of symlog(x) (1 where it was 0).")


class ContextField(FrozenModel):
    """A context id: raw value v in [lo, top] -> v - lo + 1, anything else -> 0 (training.ranking's rule)."""

    name: Literal["hour", "weekday", "position"]
    lo: int
    top: int


class FeaturizerManifest(FrozenModel):
    """``features.json``: everything but the tables."""

    dataset: str
    data_version: str
    spec: FeatureSpec = Field(description="The ranker's FeatureSpec (its config's ``features``).")
    length_multiple: int = Field(8, ge=1, description="Batch windows are rounded up to this (as training).")
    user_fields: tuple[str, ...] = Field(description="Encoded profile fields (u_<attr>), user-group sparse.")
    item_fields: tuple[str, ...] = Field(description="Encoded item attributes (candidate + side fields).")
    context: tuple[ContextField, ...] = ()
    serving_position: int = Field(0, ge=0, description="Slot position every candidate is scored at.")
    dense: tuple[DenseFeature, ...] = ()
    value_buckets: ValueBuckets
    item_ts_origin: int = Field(description="Origin of the item event keys (the earliest event ts).")

    @property
    def max_len(self) -> int:
        return self.spec.sequence(SEQUENCE).max_len

    @property
    def side_attributes(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.spec.sequence(SEQUENCE).side if s.name != ACTION)


@dataclass
class UserFeatures:
    """One user at one request time: the ids, the user-side raw dense values and the history window."""

    user_idx: int  # 0 = unknown user
    ts: int
    sparse: dict[str, int]  # user-group fields
    dense: dict[str, float]  # user-side dense features, raw (before symlog / standardisation)
    items: np.ndarray  # [n] item_idx of the window (the max_len most recent known events), oldest first
    gaps: np.ndarray  # [n] int64 seconds before ts
    side: dict[str, np.ndarray]  # side field -> [n] ids
    unknown_history: list[int]  # raw ids of history events the ranker does not know


def _ids_sorted(ids: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(ids, kind="stable")
    return ids[order].astype(np.int64), idx[order].astype(np.int64)


def _lookup(sorted_ids: np.ndarray, sorted_idx: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Raw ids -> dense index (0 for unknown ids), vectorised."""
    ids = np.asarray(ids, dtype=np.int64)
    if sorted_ids.size == 0 or ids.size == 0:
        return np.zeros(ids.shape, dtype=np.int64)
    pos = np.searchsorted(sorted_ids, ids).clip(max=sorted_ids.size - 1)
    return np.where(sorted_ids[pos] == ids, sorted_idx[pos], 0)


def _segment_cumsum(x: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Inclusive running sums of ``x`` that restart at every index of ``starts`` (sorted, starts[0] = 0)."""
    running = np.cumsum(x)
    if x.size == 0:
        return running
    base = np.concatenate([[0.0], running[starts[1:] - 1]])
    return running - np.repeat(base, np.diff(np.append(starts, x.size)))


class RankingFeaturizer:
    """Builds the ranker's ``RankingBatch`` for (user, history, candidates, ts) requests (see module doc)."""

    def __init__(
        self,
        manifest: FeaturizerManifest,
        users: pl.DataFrame,
        items: pl.DataFrame,
        histories: pl.DataFrame,
        item_events: pl.DataFrame,
    ) -> None:
        self.manifest = manifest
        self.spec = manifest.spec
        self.max_len = manifest.max_len
        self._frames = {USERS_FILE: users, ITEMS_FILE: items, HISTORIES_FILE: histories}
        self._frames[ITEM_EVENTS_FILE] = item_events
        n_items = self.spec.n_items
        # Users: raw id -> user_idx; per-user encoded profile ids and raw numeric values, indexed by user_idx.
        user_idx = users["user_idx"].to_numpy().astype(np.int64)
        n_users = int(user_idx.max()) if user_idx.size else 0
        self.n_users = n_users
        self._user_ids, self._user_idx = _ids_sorted(users["user_id"].to_numpy(), user_idx)
        # The users' own ids when the dataset's user ids are strings (serving.ids): (raw ids, internal ids).
        self.user_raw_ids: tuple[list[str], np.ndarray] | None = (
            (users["raw_user_id"].to_list(), users["user_id"].to_numpy().astype(np.int64))
            if "raw_user_id" in users.columns
            else None
        )
        self._user_cat: dict[str, np.ndarray] = {}
        for f in manifest.user_fields:
            ids = np.zeros(n_users + 1, dtype=np.int64)
            ids[user_idx] = users[f].to_numpy()
            self._user_cat[f] = ids
        self._user_num: dict[str, np.ndarray] = {}
        for d in manifest.dense:
            if d.source == "user_attr":
                raw = np.full(n_users + 1, np.nan)
                raw[user_idx] = users[d.name].cast(pl.Float64).fill_null(np.nan).to_numpy()
                self._user_num[d.name] = raw
        # Items: raw id -> item_idx; attributes indexed by item_idx.
        item_idx = items["item_idx"].to_numpy().astype(np.int64)
        self._item_ids, self._item_idx = _ids_sorted(items["item_id"].to_numpy(), item_idx)
        self._raw_item = np.zeros(n_items + 1, dtype=np.int64)  # item_idx -> raw id
        self._raw_item[self._item_idx] = self._item_ids
        self.item_attr: dict[str, np.ndarray] = {}
        for f in manifest.item_fields:
            ids = np.zeros(n_items + 1, dtype=np.int64)
            ids[item_idx] = items[f].to_numpy()
            self.item_attr[f] = ids
        self._item_num: dict[str, np.ndarray] = {}
        for d in manifest.dense:
            if d.source == "item_attr":
                raw = np.full(n_items + 1, np.nan)
                raw[item_idx] = items[d.name].cast(pl.Float64).fill_null(np.nan).to_numpy()
                self._item_num[d.name] = raw
        self._release = np.full(n_items + 1, np.nan)
        if "release_ts" in items.columns:
            self._release[item_idx] = items["release_ts"].cast(pl.Float64).fill_null(np.nan).to_numpy()
        # Stored histories, flattened in sequence order, with their action buckets.
        h_user = histories["user_idx"].to_numpy().astype(np.int64)
        self._h_item = histories["item_idx"].to_numpy().astype(np.int64)
        self._h_ts = histories["ts"].to_numpy().astype(np.int64)
        self._h_value = histories["value"].cast(pl.Float64).fill_null(np.nan).to_numpy()
        self._h_action = manifest.value_buckets.bucket(self._h_value)
        counts = np.bincount(h_user, minlength=n_users + 1)[: n_users + 1]
        self._h_start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self._h_length = counts.astype(np.int64)
        if h_user.size and np.any(np.diff(h_user) < 0):
            raise FeaturizerError(f"{HISTORIES_FILE} must be sorted by user_idx (sequence order within)")
        # Item events in (item, ts) order: prefix counts and per-item running value sums.
        e_item = item_events["item_idx"].to_numpy().astype(np.int64)
        e_ts = item_events["ts"].to_numpy().astype(np.int64)
        e_value = item_events["value"].cast(pl.Float64).fill_null(np.nan).to_numpy()
        self._e_ts = e_ts
        self._e_keys = (e_item << _KEY_SHIFT) | np.clip(e_ts - manifest.item_ts_origin, 0, _TS_MASK)
        if self._e_keys.size and np.any(np.diff(self._e_keys) < 0):
            raise FeaturizerError(f"{ITEM_EVENTS_FILE} must be sorted by (item_idx, ts)")
        valid = ~np.isnan(e_value)
        self._e_valid = np.concatenate([[0], np.cumsum(valid)]).astype(np.int64)
        item_starts = (
            np.flatnonzero(np.concatenate([[True], e_item[1:] != e_item[:-1]])) if e_item.size else e_item
        )
        self._e_sum = _segment_cumsum(np.where(valid, e_value, 0.0), item_starts)
        self._dense_mean = np.array([d.mean for d in manifest.dense], dtype=np.float64)
        self._dense_std = np.array([d.std for d in manifest.dense], dtype=np.float64)

    # -- lookups -----------------------------------------------------------------------------------------
    def map_items(self, ids: np.ndarray) -> np.ndarray:
        """Raw item ids -> item_idx (0 for items the ranker does not know)."""
        return _lookup(self._item_ids, self._item_idx, ids)

    def map_user(self, user_id: int | None) -> int:
        """Raw user id -> user_idx (0 for unknown users)."""
        if user_id is None:
            return 0
        return int(_lookup(self._user_ids, self._user_idx, np.array([user_id]))[0])

    def knows_user(self, user_id: int | None) -> bool:
        return self.map_user(user_id) > 0

    def stored_history(self, user_id: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """A known user's whole stored history in raw item ids: (item ids, ts, values), sequence order."""
        u = self.map_user(user_id)
        if u == 0:
            return None
        sl = slice(self._h_start[u], self._h_start[u] + self._h_length[u])
        return self._raw_item[self._h_item[sl]], self._h_ts[sl].copy(), self._h_value[sl].copy()

    # -- users ----------------------------------------------------------------------------------------------
    def user_features(
        self,
        user_id: int | None,
        request_ts: int,
        history: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None,
    ) -> UserFeatures:
        """``user_id`` (None or unknown: user_idx 0) at ``request_ts``. ``history`` = (raw item ids, ts,
        values or None), in time order, overrides the stored history of the user."""
        u = self.map_user(user_id)
        if history is None:
            return self.user_features_idx(u, request_ts)
        ids = np.asarray(history[0], dtype=np.int64)
        ts = np.asarray(history[1], dtype=np.int64)
        if ids.shape != ts.shape:
            raise FeaturizerError(f"history: {ids.size} item ids but {ts.size} timestamps")
        values = (
            np.full(ids.shape, np.nan)
            if history[2] is None
            else np.asarray(history[2], dtype=np.float64).reshape(ids.shape)
        )
        if ts.size and np.any(np.diff(ts) < 0):
            raise FeaturizerError("history: events must be in time order (sort by ts first)")
        idx = self.map_items(ids)
        return self._user(u, int(request_ts), idx, ts, values, [int(i) for i in ids[idx == 0]])

    def user_features_idx(self, user_idx: int, request_ts: int) -> UserFeatures:
        """A user by dense index with the stored history (0: no user, no history)."""
        if not 0 <= user_idx <= self.n_users:
            raise FeaturizerError(f"user_idx {user_idx} is outside 0..{self.n_users}")
        sl = slice(self._h_start[user_idx], self._h_start[user_idx] + self._h_length[user_idx])
        return self._user(user_idx, int(request_ts), self._h_item[sl], self._h_ts[sl], self._h_value[sl], [])

    def _user(
        self, u: int, ts: int, idx: np.ndarray, ev_ts: np.ndarray, values: np.ndarray, unknown: list[int]
    ) -> UserFeatures:
        n = int(np.searchsorted(ev_ts, ts, side="left"))  # events strictly before ts (time order)
        idx, ev_ts, values = idx[:n], ev_ts[:n], values[:n]
        sparse = {"user": u, **{f: int(self._user_cat[f][u]) for f in self.manifest.user_fields}}
        dense: dict[str, float] = {}
        valued = values[~np.isnan(values)]
        for d in self.manifest.dense:
            if d.source == "u_cnt":
                dense[d.name] = float(n)
            elif d.source == "u_value_mean":
                dense[d.name] = float(valued.mean()) if valued.size else math.nan
            elif d.source == "u_secs_since_last":
                dense[d.name] = float(ts - ev_ts[-1]) if n else math.nan
            elif d.source == "u_decay":
                assert d.half_life_s is not None
                lam = math.log(2.0) / d.half_life_s
                dense[d.name] = float(np.exp(-lam * (ts - ev_ts).astype(np.float64)).sum()) if n else 0.0
            elif d.source == "user_attr":
                dense[d.name] = float(self._user_num[d.name][u])
        known = idx > 0
        window = np.flatnonzero(known)[-self.max_len :]
        items = idx[window]
        side = {a: self.item_attr[a][items] for a in self.manifest.side_attributes}
        side[ACTION] = self.manifest.value_buckets.bucket(values[window])
        return UserFeatures(u, ts, sparse, dense, items, ts - ev_ts[window], side, unknown)

    # -- batches --------------------------------------------------------------------------------------------
    def batch(
        self,
        users: Sequence[UserFeatures],
        candidates: Sequence[np.ndarray],
        positions: Sequence[np.ndarray] | None = None,
    ) -> RankingBatch:
        """Rows: every candidate (item_idx >= 1) of every user, in order. ``positions`` (raw slot positions
        per candidate, for replaying a log) default to ``serving_position``."""
        if len(users) != len(candidates):
            raise FeaturizerError(f"{len(users)} users but {len(candidates)} candidate lists")
        cand = [np.asarray(c, dtype=np.int64) for c in candidates]
        counts = np.array([c.size for c in cand], dtype=np.int64)
        item = np.concatenate(cand) if cand else np.zeros(0, dtype=np.int64)
        if item.size and (item.min() < 1 or item.max() > self.spec.n_items):
            raise FeaturizerError(f"candidates must be item indices in 1..{self.spec.n_items}")
        row_user = np.repeat(np.arange(len(users)), counts)
        ts = np.array([u.ts for u in users], dtype=np.int64)[row_user]
        # Sparse: user fields, item attributes, context.
        sparse: dict[str, np.ndarray] = {}
        for f in self.spec.sparse:
            if f.group == "user":
                sparse[f.name] = np.array([u.sparse[f.name] for u in users], dtype=np.int64)[row_user]
            elif f.group == "item":
                sparse[f.name] = self.item_attr[f.name][item]
        for c in self.manifest.context:
            if c.name == "hour":
                raw = (ts % 86400 + 86400) % 86400 // 3600
            elif c.name == "weekday":
                raw = (np.floor_divide(ts, 86400) + 3) % 7 + 1  # ISO weekday (1970-01-01 was a Thursday)
            elif positions is None:
                raw = np.full(item.shape, self.manifest.serving_position, dtype=np.int64)
            else:
                raw = np.concatenate([np.asarray(p, dtype=np.int64) for p in positions])
                if raw.shape != item.shape:
                    raise FeaturizerError("positions: one position per candidate")
            sparse[c.name] = np.where((raw >= c.lo) & (raw <= c.top), raw - c.lo + 1, 0).astype(np.int64)
        # Dense: user-side values per user, item-side values per row, then symlog + standardisation.
        dense = np.empty((item.size, len(self.manifest.dense)), dtype=np.float64)
        item_stats = self._item_stats(item, ts) if item.size else {}
        for j, d in enumerate(self.manifest.dense):
            if d.source in ("i_cnt", "i_value_mean", "i_secs_since_first"):
                dense[:, j] = item_stats[d.source]
            elif d.source == "i_age_s":
                dense[:, j] = ts - self._release[item]
            elif d.source == "item_attr":
                dense[:, j] = self._item_num[d.name][item]
            else:
                dense[:, j] = np.array([u.dense[d.name] for u in users], dtype=np.float64)[row_user]
        dense = np.nan_to_num((symlog(dense) - self._dense_mean) / self._dense_std, nan=0.0).astype(
            np.float32
        )
        # The history window, left-padded to the batch width (training's rule).
        lengths = np.array([u.items.size for u in users], dtype=np.int64)
        lm = self.manifest.length_multiple
        longest = int(lengths[counts > 0].max()) if (counts > 0).any() else 0
        width = min(self.max_len, max(lm, -(-longest // lm) * lm))
        per_user_items = np.zeros((len(users), width), dtype=np.int64)
        per_user_gap = np.zeros((len(users), width), dtype=np.float32)
        side_names = [s.name for s in self.spec.sequence(SEQUENCE).side]
        per_user_side = {s: np.zeros((len(users), width), dtype=np.int64) for s in side_names}
        for r, u in enumerate(users):
            n = u.items.size
            if n == 0 or counts[r] == 0:  # a user without candidates has no rows (and may be longer)
                continue
            per_user_items[r, width - n :] = u.items
            per_user_gap[r, width - n :] = u.gaps.astype(np.float32)
            for s in side_names:
                per_user_side[s][r, width - n :] = u.side[s]
        sequence = SequenceBatch(
            lengths=torch.from_numpy(lengths[row_user]),
            time_gap=torch.from_numpy(per_user_gap[row_user]),
            side={s: torch.from_numpy(v[row_user]) for s, v in per_user_side.items()},
            item_ids=torch.from_numpy(per_user_items[row_user]),
        )
        return RankingBatch(
            item_id=torch.from_numpy(item),
            sparse={k: torch.from_numpy(v) for k, v in sparse.items()},
            dense=torch.from_numpy(dense),
            sequences={SEQUENCE: sequence},
            user_id=torch.from_numpy(np.array([u.user_idx for u in users], dtype=np.int64)[row_user]),
        )

    def _item_stats(self, item: np.ndarray, ts: np.ndarray) -> dict[str, np.ndarray]:
        """i_cnt, i_value_mean, i_secs_since_first of (item, ts) rows from the events strictly before ts."""
        origin = self.manifest.item_ts_origin
        base = item << _KEY_SHIFT
        p = np.searchsorted(self._e_keys, base | np.clip(ts - origin, 0, _TS_MASK), side="left")
        start = np.searchsorted(self._e_keys, base, side="left")
        cnt = p - start
        has = cnt > 0
        last = np.maximum(p - 1, 0)
        n_valid = self._e_valid[p] - self._e_valid[start]
        total = np.where(has, self._e_sum[last] if self._e_sum.size else 0.0, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n_valid > 0, total / n_valid, np.nan)
        first = self._e_ts[np.minimum(start, max(self._e_ts.size - 1, 0))] if self._e_ts.size else ts
        return {
            "i_cnt": cnt.astype(np.float64),
            "i_value_mean": mean,
            "i_secs_since_first": np.where(has, ts - first, np.nan).astype(np.float64),
        }

    # -- files ------------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> list[str]:
        """Write the featurizer's files into ``directory`` (each through a temp file); returns their names."""
        directory = Path(directory)
        for name, frame in self._frames.items():
            with atomic_path(directory / name) as tmp:
                frame.write_parquet(tmp)
        with atomic_path(directory / FEATURES_FILE) as tmp:
            Path(tmp).write_text(json.dumps(self.manifest.model_dump(mode="json"), indent=2, sort_keys=True))
        return list(FEATURIZER_FILES)

    @classmethod
    def load(cls, directory: str | Path) -> RankingFeaturizer:
        directory = Path(directory)
        missing = [f for f in FEATURIZER_FILES if not (directory / f).is_file()]
        if missing:
            raise FeaturizerError(f"featurizer files missing in {directory}: {missing}")
        manifest = FeaturizerManifest.model_validate_json((directory / FEATURES_FILE).read_text())
        frames = [
            pl.read_parquet(directory / f) for f in (USERS_FILE, ITEMS_FILE, HISTORIES_FILE, ITEM_EVENTS_FILE)
        ]
        return cls(manifest, *frames)

    # -- building it at registration ------------------------------------------------------------------------
    @classmethod
    def from_warehouse(
        cls,
        wh: Warehouse,
        data: RankingData,
        spec: FeatureSpec,
        *,
        length_multiple: int = 8,
        serving_position: int = 0,
    ) -> RankingFeaturizer:
        """The featurizer of a ranker built for ``spec`` (= ``data.feature_spec(max_len)``) on ``data``'s
        dataset, read from the same warehouse tables ``training.ranking.load_ranking_data`` read."""
        return _build(wh, data, spec, length_multiple, serving_position)


def _build(
    wh: Warehouse, data: RankingData, spec: FeatureSpec, length_multiple: int, serving_position: int
) -> RankingFeaturizer:
    # Training's own encoders (features.encoding), so that the vocabularies and buckets are the same by
    # construction.
    from recsys.features.config import FeatureConfig
    from recsys.features.point_in_time import with_attributes_sql
    from recsys.features.sequences import columns

    ds = data.dataset
    expected = data.feature_spec(spec.sequence(SEQUENCE).max_len)
    if spec != expected:
        raise FeaturizerError(
            f"spec: the ranker's FeatureSpec is not data.feature_spec(max_len) of {ds}: it was trained on "
            "other data or with other data settings"
        )
    examples = wh.latest(f"{ds}.examples")
    if examples is None or examples.version != data.data_version:
        raise FeaturizerError(
            f"{ds}.examples is at version {examples.version if examples else None}, the ranker was trained "
            f"on {data.data_version}: register it with the warehouse it was trained from"
        )
    source = with_attributes_sql(wh, ds)
    groups = {f.name: f.group for f in spec.sparse}

    # Users (with their own ids when those are strings: the service translates requests with them).
    users = wh.sql(f"SELECT user_id, user_idx FROM {ds}.user_index ORDER BY user_idx")
    if wh.has_table(f"{ds}.user_ids"):
        raw = wh.sql(f"SELECT user_id, raw_id AS raw_user_id FROM {ds}.user_ids")
        users = users.join(raw, on="user_id", how="left")
    user_fields = tuple(f for f, g in groups.items() if g == "user" and f != "user")
    user_attr_cols = columns(wh, f"{ds}.users") if wh.has_table(f"{ds}.users") else {}
    if user_attr_cols:
        attrs = wh.sql(f"SELECT * FROM {ds}.users")
        users = users.join(
            attrs.rename({c: f"u_{c}" for c in attrs.columns if c != "user_id"}), on="user_id", how="left"
        )
    encoded = {}
    for f in user_fields:
        vocab = vocabulary(wh.sql(f'SELECT DISTINCT "{f}" FROM ({source})')[f])
        if len(vocab) + 1 != _cardinality(spec, f):
            raise FeaturizerError(
                f"user field {f}: {len(vocab) + 1} ids now, {_cardinality(spec, f)} in training"
            )
        encoded[f] = encode(users[f], vocab)

    # Items: the categorical attributes exactly as training encodes them.
    items = wh.sql(f"SELECT item_id, item_idx FROM {ds}.item_index ORDER BY item_idx")
    item_fields = tuple(f for f, g in groups.items() if g == "item")
    item_cols: dict[str, str] = columns(wh, f"{ds}.items") if wh.has_table(f"{ds}.items") else {}
    item_encoded: dict[str, np.ndarray] = {}
    if item_cols:
        attrs = wh.sql(f"SELECT * FROM {ds}.items")
        items = items.join(attrs, on="item_id", how="left")
        for c in categorical_columns(item_cols, ("item_id",)):
            if c not in item_fields:
                continue
            joined = wh.sql(f'SELECT it."{c}" FROM {ds}.item_index ii JOIN {ds}.items it USING (item_id)')
            vocab = vocabulary(joined[c])
            if len(vocab) + 1 != _cardinality(spec, c):
                raise FeaturizerError(
                    f"item field {c}: {len(vocab) + 1} ids now, {_cardinality(spec, c)} in training"
                )
            item_encoded[c] = encode(items[c], vocab)
    lost = [f for f in item_fields if f not in item_encoded]
    if lost:
        raise FeaturizerError(f"item fields {lost} are not categorical columns of {ds}.items")

    # Context fields.
    context = []
    for f in spec.sparse:
        if f.group != "context":
            continue
        if f.name not in ("hour", "weekday", "position"):
            raise FeaturizerError(f"context field {f.name!r} cannot be computed at request time")
        lo = 1 if f.name == "weekday" else 0
        context.append(ContextField(name=f.name, lo=lo, top=f.cardinality - 2 + lo))

    # Dense features: where each comes from, and the train split's symlog mean / std (float64, as training).
    half_lives = tuple(float(h) for h in examples.params.get("decay_half_lives_s", ()))
    decay_names = {}
    if half_lives:
        names = FeatureConfig(decay_half_lives_s=half_lives)
        decay_names = {names.decay_column(h): h for h in half_lives}
    user_cols = {f"u_{c}" for c in user_attr_cols if c != "user_id"}
    item_num = {f"i_{c}" for c in item_cols if c not in ("item_id", "release_ts")}
    sources: list[tuple[str, DenseSource, float | None]] = []
    for name in spec.dense:
        if name in _BEHAVIOURAL:
            sources.append((name, name, None))  # type: ignore[arg-type]
        elif _DECAY.match(name):
            if name not in decay_names:
                raise FeaturizerError(f"dense feature {name}: no half-life in the {ds}.examples parameters")
            sources.append((name, "u_decay", decay_names[name]))
        elif name in user_cols:
            sources.append((name, "user_attr", None))
        elif name in item_num:
            sources.append((name, "item_attr", None))
        else:
            raise FeaturizerError(f"dense feature {name!r} cannot be computed at request time")
    dense_features: list[DenseFeature] = []
    if spec.dense:
        sel = ", ".join(f'"{n}"::DOUBLE AS "{n}"' for n in spec.dense)
        train = wh.sql(f"SELECT {sel} FROM ({source}) WHERE split = 'train'").to_numpy().astype(np.float64)
        raw = symlog(train)
        mean = np.nan_to_num(np.nanmean(raw, axis=0))
        std = np.nanstd(raw, axis=0)
        std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
        if not np.allclose(mean, data.dense_mean, rtol=1e-4, atol=1e-5):
            raise FeaturizerError("dense: the train split's statistics differ from the ranker's data")
        for (name, src, hl), m, s in zip(sources, mean, std, strict=True):
            dense_features.append(
                DenseFeature(name=name, source=src, half_life_s=hl, mean=float(m), std=float(s))
            )
    for name, src, _ in sources:
        if src == "user_attr":
            users = users.with_columns(pl.col(name).cast(pl.Float64))
        if src == "item_attr":
            items = items.with_columns(pl.col(name[2:]).cast(pl.Float64).alias(name))

    # Histories and value buckets (the reference reduced to what the bucketing reads).
    seq = wh.sql(f"SELECT user_idx, item_idx, ts, value FROM {ds}.sequences ORDER BY user_idx")
    histories = (
        seq.explode(["item_idx", "ts", "value"])
        .select(
            pl.col("user_idx").cast(pl.Int64),
            pl.col("item_idx").cast(pl.Int64),
            pl.col("ts").cast(pl.Int64),
            pl.col("value").cast(pl.Float64),
        )
        .drop_nulls(["item_idx"])
    )
    h_value = histories["value"].fill_null(np.nan).to_numpy()
    h_ts = histories["ts"].to_numpy()
    t1_row = wh.con.execute(f"SELECT min(ts) FROM {ds}.examples WHERE split <> 'train'").fetchall()[0][0]
    t1 = int(t1_row) if t1_row is not None else int(h_ts.max()) + 1
    buckets = ValueBuckets.fit(h_value[h_ts < t1], data.config.value_buckets)
    item_events = (
        histories.select("item_idx", "ts", "value")
        .with_row_index("row")
        .sort(["item_idx", "ts", "row"])
        .drop("row")
    )
    origin = int(h_ts.min()) if h_ts.size else 0

    user_frame = users.select(
        pl.col("user_id").cast(pl.Int64),
        pl.col("user_idx").cast(pl.Int64),
        *([pl.col("raw_user_id").cast(pl.Utf8)] if "raw_user_id" in users.columns else []),
        *[pl.Series(f, encoded[f]) for f in user_fields],
        *[pl.col(n) for n, s, _ in sources if s == "user_attr"],
    )
    item_frame = items.select(
        pl.col("item_id").cast(pl.Int64),
        pl.col("item_idx").cast(pl.Int64),
        *[pl.Series(f, item_encoded[f]) for f in item_fields],
        *[pl.col(n) for n, s, _ in sources if s == "item_attr"],
        *([pl.col("release_ts").cast(pl.Int64)] if "release_ts" in item_cols else []),
    )
    manifest = FeaturizerManifest(
        dataset=ds,
        data_version=data.data_version,
        spec=spec,
        length_multiple=length_multiple,
        user_fields=user_fields,
        item_fields=item_fields,
        context=tuple(context),
        serving_position=serving_position,
        dense=tuple(dense_features),
        value_buckets=buckets,
        item_ts_origin=origin,
    )
    return RankingFeaturizer(manifest, user_frame, item_frame, histories, item_events)


def _cardinality(spec: FeatureSpec, name: str) -> int:
    return next(f.cardinality for f in spec.sparse if f.name == name)
