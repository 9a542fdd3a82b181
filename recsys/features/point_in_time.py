"""Ranking examples with point-in-time features: ``<ds>.examples``.

Example rows (``FeatureConfig.examples``, default ``auto``): when ``<ds>.impressions`` has rows (synthetic
data, serving logs) every impression is an example with labels ``click`` (= ``label``) and ``like`` (the
unclicked exposures are the negatives); otherwise, when some event has a ``value`` (MovieLens), every event
with a non-NULL ``value`` is one, ``label = value >= label_threshold``, identified by ``pos``, its position in
the user's sequence (``value`` kept); otherwise (a plain click log) the examples are implicit feedback
(``recsys.features.implicit``): every event a positive plus sampled negatives at the same ``ts``, grouped
by ``request_id`` with ``candidate`` 0 for the positive.

Leakage guarantee: every behavioural feature of an example at time ``ts`` is built only from events with
``event.ts < ts``; events at the same second (the example's own event included) and later are never read.
Mechanism: events are sorted by ``(user, ts)`` (the ``<ds>.sequences`` order) and, separately, by
``(item, ts)``; an example's features are prefix aggregates up to ``searchsorted(keys, (user|item, ts),
side='left')``, the first event whose key is not smaller, i.e. the count of events strictly before ``ts``.
Static attributes (profile, item attributes, release date) and the example's own ``ts`` (hour, weekday) are
the only other inputs. tests/features/test_point_in_time.py proves it by brute force from earlier events
only and by rewriting / deleting every event at or after an example's ``ts``.

Features (NULL where nothing precedes the example; counts and decayed counters are 0 then):

====================== ==========================================================================
``seq_offset``         the user's events before ``ts``: history = ``sequences.item_idx[:seq_offset]``
``u_cnt``              the same count, as a numeric feature
``u_value_mean``       mean ``value`` (rating / dwell) of the user's earlier events
``u_secs_since_last``  ``ts`` minus the user's last earlier event
``u_decay_<h>``        sum over the user's earlier events of ``2 ** (-(ts - event.ts) / h)``, per half-life
``i_cnt``              the item's earlier events (popularity so far)
``i_value_mean``       mean ``value`` of the item's earlier events (mean rating so far)
``i_secs_since_first`` ``ts`` minus the item's first earlier event
``hour``, ``weekday``  UTC hour 0..23 and ISO weekday 1 (Mon)..7 of ``ts``
====================== ==========================================================================

Static attributes are joined on export (``with_attributes_sql``): ``u_<col>`` for every ``<ds>.users``
column, ``i_<col>`` for every ``<ds>.items`` column but ``release_ts``, and ``i_age_s = ts - release_ts``.

OPEN choices and what was picked:

- Engine: DuckDB reads, sorts and joins; the prefix aggregates run in numpy over the sorted arrays (Polars
  for the parallel argsort). DuckDB window functions express the same thing but were ~5x slower here
  (every windowed aggregate rebuilds a segment tree over its partition).
- Decayed counters, computed stably: summing ``exp(-l (t - t_j))`` as ``exp(-l t) * sum exp(l t_j)``
  overflows after ~1000 half-lives. The user's time line is cut into blocks one shortest half-life long;
  inside a block the running sums of ``x_j = exp(l (t_j - block_start))`` (each in [1, 2]) are plain
  cumulative sums, each earlier block reaches the next through a carry (its total times ``exp(-l * gap)``),
  and the state at an event is ``(running sum + carry) / x``. Every term is positive and bounded, nothing
  overflows or cancels, at any time span.
- Sums (values, decays) are np.cumsum over chunks of <= 65,536 elements restarted at user / block / item
  boundaries, so rounding is relative to a chunk's own sums (about 1e-11), not to the whole table's.
- Memory (``BuildResources``): the user-side features run per chunk of consecutive users (about
  ``chunk_events`` events + examples), each chunk written as a Parquet part to a temp dir; the item-side
  pass sorts every event once by ``(item, ts)``, narrow (int32 item, int64 key, float64 value: ~40 bytes
  per event at its peak) and computes in slices cut at item boundaries, keeping ~16 bytes per example
  (count int32, mean float64, first ts uint32) for the user chunks. ``<ds>.examples`` is published from
  the parts in one transaction; DuckDB runs under ``memory_limit`` and spills to ``temp_directory``.
"""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from recsys.core.atomic import owned_tempdir
from recsys.core.config import FrozenModel
from recsys.core.hashing import stable_hash
from recsys.features.config import FeatureConfig
from recsys.features.implicit import build_implicit_examples
from recsys.features.sequences import (
    EVENT_COLUMNS,
    build_sequences,
    check_dataset,
    columns,
    optional_versions,
    parts_root,
    publish_if_stale,
    require_table,
)
from recsys.features.splits import TemporalCut, temporal_cut
from recsys.warehouse import TableVersion, Warehouse, WarehouseError

IMPRESSION_COLUMNS = ("request_id", "user_id", "item_id", "ts", "position", "propensity", "click", "like")

# Columns carried for evaluation / off-policy work, never model inputs.
META_COLUMNS = (
    "pos",
    "candidate",
    "value",
    "request_id",
    "position",
    "propensity",
    "dwell",
    "p_click",
    "p_click_unbiased",
)

# User time blocks, in shortest half-lives: in-block summands exp(l (t - block start)) stay within [1, 2].
BLOCK_HALF_LIVES = 1

# Running sums restart at least every _CHUNK elements (at a segment start): bounded rounding error.
_CHUNK = 1 << 16

# (user|item index) << 32 | (ts - t0): one sortable int64 per event; ts spans must stay below 2**32 s.
_KEY_SHIFT = 32

PIPELINE_VERSION = "pit-numpy/1"

# Temp parts are written once and read once, locally: encoding them costs more than the bytes saved
# (measured: 4x faster to write than snappy + dictionaries, and faster for DuckDB to read).
PARQUET_PART = {"compression": "none", "use_dictionary": False, "write_statistics": False}


@dataclass(frozen=True)
class ExampleSource:
    """Where the example rows come from and what they carry besides the features."""

    kind: str  # "events", "impressions" or "implicit"
    sql: str  # SELECT of the example rows with at least user_id, item_id, ts (for the temporal cut)
    keep: tuple[str, ...]  # label / id columns copied to the examples table
    key: tuple[str, ...]  # a unique, deterministic order of the examples
    labels: tuple[str, ...]
    inputs: tuple[tuple[str, str], ...] = ()  # tables the rows come from besides events: (name, version)
    params: tuple[tuple[str, object], ...] = ()  # what else decides the rows (the sampler's config)

    def order_sql(self, alias: str) -> str:
        """The rows' order within a user (impressions and implicit examples), columns of ``alias``."""
        return ", ".join(f'{alias}."{c}"' for c in self.key)


def example_source(wh: Warehouse, dataset: str, config: FeatureConfig) -> ExampleSource:
    """The example rows ``config.examples`` asks for (``auto``: impressions when there are any, else the
    events with a value, else implicit feedback). For implicit feedback this publishes
    ``<ds>.implicit_examples`` first (skipped while fresh)."""
    check_dataset(dataset)
    imp = f"{dataset}.impressions"
    ev = f"{dataset}.events"
    kind = config.examples
    if kind == "auto":
        kind = "events"
        if wh.has_table(imp) and _has_rows(wh, f"SELECT 1 FROM {imp}"):
            kind = "impressions"
        else:
            require_table(wh, ev, EVENT_COLUMNS)
            if not _has_rows(wh, f"SELECT 1 FROM {ev} WHERE value IS NOT NULL"):
                kind = "implicit"
    if kind == "implicit":
        version = build_implicit_examples(wh, dataset, config.implicit)
        sql = (
            "SELECT user_id, item_id, ts, request_id, candidate, label"
            f" FROM {version.table_name} WHERE user_id IS NOT NULL"
        )
        return ExampleSource(
            "implicit",
            sql,
            ("request_id", "candidate", "label"),
            ("ts", "request_id", "candidate"),
            ("label",),
            inputs=((version.table_name, version.version),),
            params=(("implicit", config.implicit.model_dump(mode="json")),),
        )
    if kind == "impressions":
        require_table(wh, imp, IMPRESSION_COLUMNS)
        cols = columns(wh, imp)
        extra = tuple(c for c in ("dwell", "p_click", "p_click_unbiased") if c in cols)
        keep = ("request_id", "position", "propensity", "click", "like", *extra, "label")
        sel = ", ".join(f'"{c}"' for c in keep[:-1])
        sql = f"SELECT user_id, item_id, ts, {sel}, click AS label FROM {imp} WHERE user_id IS NOT NULL"
        return ExampleSource(
            "impressions", sql, keep, ("ts", "request_id", "position"), ("label", "click", "like")
        )
    require_table(wh, ev, EVENT_COLUMNS)
    sql = f"SELECT user_id, item_id, ts, value FROM {ev} WHERE value IS NOT NULL"
    if not _has_rows(wh, sql):
        raise WarehouseError(
            f"{ev} has no event with a value: examples='events' needs a label (a rating-like value);"
            " use examples='implicit' (or 'auto') for a click log without one"
        )
    return ExampleSource("events", sql, ("pos", "value", "label"), ("ts", "user_idx", "pos"), ("label",))


def _has_rows(wh: Warehouse, sql: str) -> bool:
    return bool(wh.con.execute(f"SELECT count(*) FROM ({sql} LIMIT 1)").fetchall()[0][0])


# -- sorted arrays --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Events:
    """Every event, sorted by ``(user_idx, ts, src_row)`` (the sequences order); ``value`` NaN = NULL."""

    user: np.ndarray  # int32
    item: np.ndarray  # int32
    ts: np.ndarray  # int64
    value: np.ndarray  # float64
    pos: np.ndarray  # int32, position in the user's sequence


def _flat(column: pa.ChunkedArray, dtype: type, null: float | int = 0) -> np.ndarray:
    values = pc.fill_null(pc.list_flatten(column), null)
    return np.asarray(values.to_numpy(), dtype=dtype) if len(values) else np.zeros(0, dtype=dtype)


def _load_events(wh: Warehouse, dataset: str, lo: int, hi: int) -> _Events:
    """The events of users ``lo..hi`` (user_idx, inclusive), in sequence order."""
    tab = wh.con.sql(
        f"SELECT user_idx, item_idx, ts, value FROM {dataset}.sequences"
        f" WHERE user_idx BETWEEN {int(lo)} AND {int(hi)} ORDER BY user_idx"
    ).to_arrow_table()
    lengths = np.asarray(pc.list_value_length(tab["item_idx"]).to_numpy(), dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    return _Events(
        user=np.repeat(np.asarray(tab["user_idx"].to_numpy(), dtype=np.int32), lengths),
        item=_flat(tab["item_idx"], np.int32),
        ts=_flat(tab["ts"], np.int64),
        value=_flat(tab["value"], np.float64, np.nan),
        pos=(np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)).astype(np.int32),
    )


_NULL_INT = np.iinfo(np.int64).min  # marks NULL in int64 feature arrays


def _take(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """values[idx], clipped into range (callers mask the rows where idx means nothing)."""
    if len(values) == 0:
        return np.zeros(len(idx), dtype=values.dtype)
    return values[np.minimum(idx, len(values) - 1)]


def _keys(idx: np.ndarray, ts: np.ndarray, t0: int) -> np.ndarray:
    return (idx.astype(np.int64) << _KEY_SHIFT) | (ts - t0)


def _sorted_order(keys: np.ndarray) -> np.ndarray:
    """A stable argsort (Polars sorts in parallel); stable, so float sums over ties are reproducible."""
    return pl.Series(keys).arg_sort(descending=False, nulls_last=False).to_numpy()


def _starts(group: np.ndarray) -> np.ndarray:
    """Indices where a run of equal values begins (``group`` sorted or at least grouped)."""
    if len(group) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.concatenate([[True], group[1:] != group[:-1]]))


def _run_start(sorted_values: np.ndarray) -> np.ndarray:
    """For each element, the index of the first element equal to it (= searchsorted(v, v, 'left'))."""
    starts = _starts(sorted_values)
    return np.repeat(starts, np.diff(np.append(starts, len(sorted_values))))


def _segmented_cumsum(x: np.ndarray, seg_start: np.ndarray) -> np.ndarray:
    """Inclusive running sums of ``x`` that restart at every ``seg_start``.

    np.cumsum runs over chunks of about _CHUNK elements cut at segment starts, so the rounding error of a
    running sum is relative to its own chunk's sums, never to everything before it.
    """
    n = len(x)
    out = np.empty(n, dtype=np.float64)
    if n == 0:
        return out
    cuts = seg_start[np.minimum(np.searchsorted(seg_start, np.arange(0, n, _CHUNK)), len(seg_start) - 1)]
    cuts = np.unique(np.append(cuts, n))
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        lo, hi = np.searchsorted(seg_start, [a, b])
        local = seg_start[lo:hi] - a  # local[0] == 0: chunks begin at a segment start
        running = np.cumsum(x[a:b])
        base = np.concatenate([[0.0], running[local[1:] - 1]])
        out[a:b] = running - np.repeat(base, np.diff(np.append(local, b - a)))
    return out


def _mean_before(values: np.ndarray, seg_start: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Mean of the non-NaN ``values[start:end]``, where ``start`` is the segment start of ``end - 1``."""
    valid = ~np.isnan(values)
    sums = _segmented_cumsum(np.where(valid, values, 0.0), seg_start)
    counts = np.concatenate([[0], np.cumsum(valid)])  # integers: exact globally
    n = counts[end] - counts[start]
    total = np.where(end > start, _take(sums, end - 1), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, total / n, np.nan)


def _decayed_states(ev: _Events, config: FeatureConfig) -> list[np.ndarray]:
    """Per half-life, D_k = sum over the user's events j <= k of exp(-l (t_k - t_j)) (stably: module doc)."""
    n = len(ev.ts)
    if n == 0:
        return [np.zeros(0) for _ in config.decay_half_lives_s]
    v = int(math.ceil(BLOCK_HALF_LIVES * min(config.decay_half_lives_s)))
    blk = np.floor_divide(ev.ts, v)
    new_seg = np.ones(n, dtype=bool)
    new_seg[1:] = (ev.user[1:] != ev.user[:-1]) | (blk[1:] != blk[:-1])
    seg_id = np.cumsum(new_seg) - 1
    seg_start = np.flatnonzero(new_seg)
    seg_end = np.append(seg_start[1:], n) - 1
    seg_user, seg_blk = ev.user[seg_start], blk[seg_start]
    # Rank of a segment among its user's segments; carries flow from rank r - 1 to rank r.
    first_seg = np.repeat(_starts(seg_user), np.diff(np.append(_starts(seg_user), len(seg_start))))
    rank = np.arange(len(seg_start)) - first_seg
    by_rank = np.argsort(rank, kind="stable")
    bounds = np.searchsorted(rank[by_rank], np.arange(1, int(rank.max()) + 2))
    offset = ev.ts - blk * v
    states = []
    for hl in config.decay_half_lives_s:
        lam = math.log(2.0) / hl
        x = np.exp(lam * offset)  # in [1, 2 ** (v / hl)]: the block is v <= hl long
        running = _segmented_cumsum(x, seg_start)
        total = running[seg_end]
        carry = np.zeros(len(seg_start))
        for r in range(1, len(bounds)):
            segs = by_rank[bounds[r - 1] : bounds[r]]
            gap = (seg_blk[segs] - seg_blk[segs - 1]) * v  # from the previous block's start to this one's
            carry[segs] = (carry[segs - 1] + total[segs - 1]) * np.exp(-lam * gap)
        states.append((running + carry[seg_id]) / x)
    return states


def _user_features(
    ev: _Events, x_user: np.ndarray, x_ts: np.ndarray, t0: int, config: FeatureConfig
) -> dict[str, np.ndarray]:
    keys = _keys(ev.user, ev.ts, t0)  # sorted: events are in (user, ts) order
    if x_user is ev.user:  # the examples are the events: first row of each (user, ts) run, user start
        p, start = _run_start(keys), _run_start(ev.user)
    else:
        p = np.searchsorted(keys, _keys(x_user, x_ts, t0), side="left")  # first event not before (user, ts)
        start = np.searchsorted(keys, x_user.astype(np.int64) << _KEY_SHIFT, side="left")
    before = p - start
    has = before > 0
    last = np.maximum(p - 1, 0)  # the user's last earlier event (where has)
    last_ts = _take(ev.ts, last)
    out = {
        "seq_offset": before.astype(np.int32),
        "u_cnt": before.astype(np.int64),
        "u_value_mean": _mean_before(ev.value, _starts(ev.user), start, p),
        "u_secs_since_last": np.where(has, x_ts - last_ts, _NULL_INT),
    }
    for hl, state in zip(config.decay_half_lives_s, _decayed_states(ev, config), strict=True):
        lam = math.log(2.0) / hl
        decayed = _take(state, last) * np.exp(-lam * (x_ts - last_ts))
        out[config.decay_column(hl)] = np.where(has, decayed, 0.0)
    return out


def _item_features(
    keys: np.ndarray,
    value: np.ndarray,
    x_keys: np.ndarray | None,
    slice_events: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Item-side features of the examples, from every event sorted by ``keys = (item, ts)``.

    ``x_keys`` are the examples' sorted keys, or None when the examples are the events themselves. The
    sorted arrays are processed in slices of about ``slice_events`` events cut at item boundaries (an
    item's prefix sums never cross a slice), so the temporaries are bounded by the slice, not the data.
    Returns, in ``x_keys`` order: the item's earlier events (int32), their mean value (float64, NaN = none)
    and the first earlier event's ``ts - t0`` (uint32, meaningful where the count is > 0).
    """
    n = len(keys)
    nx = n if x_keys is None else len(x_keys)
    cnt = np.zeros(nx, dtype=np.int32)
    mean = np.full(nx, np.nan)
    first = np.zeros(nx, dtype=np.uint32)
    if n == 0 or nx == 0:
        return cnt, mean, first
    # Slice bounds: the first key of the item found every slice_events events (plus both ends).
    items_at = (keys[:: max(int(slice_events), 1)] >> _KEY_SHIFT)[1:]
    bounds = np.unique(items_at << _KEY_SHIFT)
    ev_cut = np.concatenate([[0], np.searchsorted(keys, bounds, side="left"), [n]])
    x_cut = ev_cut if x_keys is None else np.concatenate([[0], np.searchsorted(x_keys, bounds), [nx]])
    ts_mask = np.int64((1 << _KEY_SHIFT) - 1)
    for a, b, xa, xb in zip(ev_cut[:-1], ev_cut[1:], x_cut[:-1], x_cut[1:], strict=True):
        if xb == xa:
            continue
        k = keys[a:b]
        item = k >> _KEY_SHIFT
        if x_keys is None:  # searchsorted of the keys in themselves = start of each run
            q, start = _run_start(k), _run_start(item)
        else:
            xk = x_keys[xa:xb]
            q = np.searchsorted(k, xk, side="left")
            start = np.searchsorted(k, (xk >> _KEY_SHIFT) << _KEY_SHIFT, side="left")
        before = q - start
        cnt[xa:xb] = before
        mean[xa:xb] = _mean_before(value[a:b], _starts(item), start, q)
        first[xa:xb] = np.where(before > 0, _take(k, start) & ts_mask, 0)
    return cnt, mean, first


class BuildResources(FrozenModel):
    """How much the examples build may hold at once; never changes the results (not in the cache key).

    Peak memory is about ``chunk_events`` x ~150 bytes (the user-side pass) plus ~40 bytes per event for
    the item-side pass (one narrow sort of every event) plus DuckDB's ``memory_limit``.
    """

    chunk_events: int = Field(
        2_000_000, ge=1, description="Events (+ examples) per user chunk and per item-side slice."
    )
    memory_limit: str | None = Field(
        "4GB", description="DuckDB memory_limit during the build (None: leave the connection's setting)."
    )
    temp_directory: Path | None = Field(
        None,
        description="Where DuckDB spills and the Parquet parts go (None: DuckDB's default and the system"
        " temp dir).",
    )

    @field_validator("memory_limit")
    @classmethod
    def _limit(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"\s*\d+(\.\d+)?\s*[KMGT]i?B\s*", v, flags=re.IGNORECASE):
            raise ValueError(f"memory_limit must look like '4GB' or '512MiB', got {v!r}")
        return v


def _setting(wh: Warehouse, name: str) -> str:
    return str(wh.con.execute(f"SELECT current_setting('{name}')").fetchall()[0][0])


def _set(wh: Warehouse, name: str, value: str) -> None:
    wh.con.execute(f"SET {name} = '{value.replace(chr(39), chr(39) * 2)}'")


@contextmanager
def _duckdb_limits(wh: Warehouse, resources: BuildResources) -> Iterator[None]:
    """Apply ``memory_limit`` / ``temp_directory`` for the build, then restore the connection's values.

    DuckDB cannot switch its temp directory once it has spilled there: a connection that already did gets a
    clear error (when asked for another one), and keeps the build's directory if it spilled during the build.
    """
    wanted = {"memory_limit": resources.memory_limit, "temp_directory": resources.temp_directory}
    old: dict[str, str] = {}
    try:
        for name, value in wanted.items():
            if value is None or _setting(wh, name) == str(value):
                continue
            current = _setting(wh, name)
            try:
                _set(wh, name, str(value))
            except duckdb.NotImplementedException as exc:
                raise WarehouseError(
                    f"temp_directory: this connection already spilled to {current!r} and DuckDB cannot switch"
                    f" to {str(value)!r}; use a new connection or leave BuildResources.temp_directory None"
                ) from exc
            old[name] = current
        yield
    finally:
        for name, value in old.items():
            with suppress(duckdb.NotImplementedException):  # spilled during the build: stays there
                _set(wh, name, value)


@dataclass(frozen=True)
class _Chunk:
    lo: int  # user_idx range, inclusive
    hi: int
    x_lo: int  # the chunk's examples in the global example order
    x_hi: int


def _user_counts(wh: Warehouse, dataset: str, src: ExampleSource) -> pl.DataFrame:
    """Per user_idx (ascending): events and examples (users with either)."""
    seq = f"{dataset}.sequences"
    if src.kind == "events":
        return wh.sql(
            f"SELECT user_idx, len(item_idx)::BIGINT AS n_ev,"
            f" len(list_filter(value, lambda v: v IS NOT NULL))::BIGINT AS n_x FROM {seq} ORDER BY user_idx"
        )
    return wh.sql(
        f"""SELECT coalesce(s.user_idx, x.user_idx) AS user_idx, coalesce(len(s.item_idx), 0)::BIGINT AS n_ev,
                   coalesce(x.n, 0)::BIGINT AS n_x
            FROM {seq} s FULL JOIN (
                SELECT ui.user_idx, count(*) AS n FROM ({src.sql}) m
                JOIN {dataset}.user_index ui USING (user_id) JOIN {dataset}.item_index ii USING (item_id)
                GROUP BY ui.user_idx) x ON x.user_idx = s.user_idx
            ORDER BY 1"""
    )


def _chunks(counts: pl.DataFrame, chunk_events: int) -> list[_Chunk]:
    """Consecutive user ranges of about ``chunk_events`` events + examples each (at least one user)."""
    users = counts["user_idx"].to_numpy()
    if len(users) == 0:
        return [_Chunk(1, 0, 0, 0)]
    size = np.cumsum(counts["n_ev"].to_numpy() + counts["n_x"].to_numpy())
    x_end = np.cumsum(counts["n_x"].to_numpy())
    out, i = [], 0
    while i < len(users):
        base = size[i - 1] if i else 0
        j = max(int(np.searchsorted(size, base + chunk_events, side="right")) - 1, i)
        out.append(_Chunk(int(users[i]), int(users[j]), int(x_end[i - 1]) if i else 0, int(x_end[j])))
        i = j + 1
    return out


def _impression_examples(wh: Warehouse, dataset: str, src: ExampleSource, where: str = "") -> pa.Table:
    cols = ", ".join(f'm."{c}"' for c in src.keep)
    return wh.con.sql(
        f"""SELECT ui.user_idx, ii.item_idx, m.ts, {cols}
            FROM ({src.sql}) m
            JOIN {dataset}.user_index ui USING (user_id) JOIN {dataset}.item_index ii USING (item_id)
            {where}
            ORDER BY ui.user_idx, {src.order_sql("m")}"""
    ).to_arrow_table()


def _item_pass(
    wh: Warehouse, dataset: str, src: ExampleSource, chunks: list[_Chunk], n_ev: int, res: BuildResources
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """t0 and the item-side features of every example, in the global example order (module doc)."""
    item = np.empty(n_ev, dtype=np.int32)
    ts = np.empty(n_ev, dtype=np.int64)
    value = np.empty(n_ev, dtype=np.float64)
    at = 0
    for c in chunks:  # narrow: three columns, no per-event user / pos arrays
        ev = _load_events(wh, dataset, c.lo, c.hi)
        m = len(ev.ts)
        item[at : at + m], ts[at : at + m], value[at : at + m] = ev.item, ev.ts, ev.value
        at += m
        del ev
    if src.kind == "events":
        keep = ~np.isnan(value)
        all_events = bool(keep.all())
        x_item, x_ts = (None, None) if all_events else (item[keep], ts[keep])
        del keep
    else:
        tab = wh.con.sql(
            f"""SELECT ii.item_idx, m.ts FROM ({src.sql}) m
                JOIN {dataset}.user_index ui USING (user_id) JOIN {dataset}.item_index ii USING (item_id)
                ORDER BY ui.user_idx, {src.order_sql("m")}"""
        ).to_arrow_table()
        x_item = np.asarray(tab["item_idx"].to_numpy(), dtype=np.int32)
        x_ts = np.asarray(tab["ts"].to_numpy(), dtype=np.int64)
        del tab
    lows = [int(a.min()) for a in (ts, x_ts) if a is not None and len(a)]
    highs = [int(a.max()) for a in (ts, x_ts) if a is not None and len(a)]
    t0 = min(lows) if lows else 0
    if lows and max(highs) - t0 >= 1 << _KEY_SHIFT:
        raise ValueError(
            f"timestamps of {dataset} span more than 2**32 seconds (136 years): check the ts unit"
        )
    keys = _keys(item, ts, t0)
    del item, ts
    order = _sorted_order(keys)  # stable: float sums over ties are reproducible
    keys = keys[order]
    value = value[order]
    if x_item is None:  # the examples are the events: features come out in item order, scatter them back
        cnt, mean, first = _item_features(keys, value, None, res.chunk_events)
        del keys, value
        out_cnt = np.empty_like(cnt)
        out_cnt[order] = cnt
        del cnt
        out_mean = np.empty_like(mean)
        out_mean[order] = mean
        del mean
        out_first = np.empty_like(first)
        out_first[order] = first
        return t0, out_cnt, out_mean, out_first
    del order
    x_keys = _keys(x_item, x_ts, t0)
    del x_item, x_ts
    x_order = _sorted_order(x_keys)
    x_keys = x_keys[x_order]
    cnt, mean, first = _item_features(keys, value, x_keys, res.chunk_events)
    del keys, value, x_keys
    out_cnt = np.empty_like(cnt)
    out_cnt[x_order] = cnt
    out_mean = np.empty_like(mean)
    out_mean[x_order] = mean
    out_first = np.empty_like(first)
    out_first[x_order] = first
    return t0, out_cnt, out_mean, out_first


def _column(values: np.ndarray) -> pa.Array:
    """NaN (floats) and int64 min (ints) mark NULL."""
    if values.dtype.kind == "f":
        return pa.array(values, mask=np.isnan(values))
    if values.dtype == np.int64:
        return pa.array(values, mask=values == _NULL_INT)
    return pa.array(values)


def _chunk_table(
    wh: Warehouse,
    dataset: str,
    config: FeatureConfig,
    src: ExampleSource,
    chunk: _Chunk,
    t0: int,
    item_side: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> pa.Table:
    """The examples of one user chunk (ids, kept columns) with all their behavioural features."""
    ev = _load_events(wh, dataset, chunk.lo, chunk.hi)
    if src.kind == "events":
        keep = ~np.isnan(ev.value)
        if keep.all():  # no copies: the examples are the event arrays themselves
            x_user, x_item, x_ts, value, pos = ev.user, ev.item, ev.ts, ev.value, ev.pos
        else:
            x_user, x_item, x_ts, value, pos = (
                ev.user[keep],
                ev.item[keep],
                ev.ts[keep],
                ev.value[keep],
                ev.pos[keep],
            )
        base = {
            "user_idx": pa.array(x_user),
            "item_idx": pa.array(x_item),
            "ts": pa.array(x_ts),
            "pos": pa.array(pos),
            "value": pa.array(value),  # label = value >= threshold is derived when the parts are read
        }
    else:
        tab = _impression_examples(
            wh, dataset, src, f"WHERE ui.user_idx BETWEEN {int(chunk.lo)} AND {int(chunk.hi)}"
        )
        x_user = tab["user_idx"].to_numpy().astype(np.int32)
        x_ts = tab["ts"].to_numpy().astype(np.int64)
        base = {c: tab[c] for c in tab.column_names}
    if len(x_ts) != chunk.x_hi - chunk.x_lo:
        raise WarehouseError(f"{dataset}: the examples changed while the features were being built")
    feats = _user_features(ev, x_user, x_ts, t0, config)
    del feats["u_cnt"]  # = seq_offset, derived when the parts are read
    cnt, mean, first = (a[chunk.x_lo : chunk.x_hi] for a in item_side)
    feats["i_cnt"] = cnt.astype(np.int64)
    feats["i_value_mean"] = mean
    feats["i_secs_since_first"] = np.where(cnt > 0, x_ts - t0 - first.astype(np.int64), _NULL_INT)
    return pa.table(base | {name: _column(values) for name, values in feats.items()})


def write_feature_parts(
    wh: Warehouse, dataset: str, config: FeatureConfig, src: ExampleSource, out_dir: Path, res: BuildResources
) -> list[Path]:
    """The examples with their behavioural features, as Parquet part files (one per user chunk) in
    ``out_dir``, less the columns that are cheaper to derive when they are read (``u_cnt`` = ``seq_offset``,
    and for event examples ``label`` = ``value >= label_threshold``: see ``build_examples``).

    Peak memory is set by ``res.chunk_events`` and the narrow item-side pass (module doc).
    """
    chunks = _chunks(_user_counts(wh, dataset, src), res.chunk_events)
    n_ev = int(
        wh.con.execute(f"SELECT coalesce(sum(len(item_idx)), 0) FROM {dataset}.sequences").fetchall()[0][0]
    )
    t0, *item_side = _item_pass(wh, dataset, src, chunks, n_ev, res)
    paths = []
    for i, chunk in enumerate(chunks):
        table = _chunk_table(wh, dataset, config, src, chunk, t0, tuple(item_side))
        path = out_dir / f"part-{i:06d}.parquet"
        pq.write_table(table, path, **PARQUET_PART)
        paths.append(path)
        del table
    return paths


def examples_sql(
    dataset: str, config: FeatureConfig, src: ExampleSource, cut: TemporalCut, features: str
) -> str:
    """Adds ids, context and the split to the registered feature table ``features``."""
    keep = "".join(f', f."{c}"' for c in src.keep)
    decay = "".join(f", f.{config.decay_column(h)}" for h in config.decay_half_lives_s)
    return f"""
    SELECT ui.user_id, ii.item_id, f.user_idx, f.item_idx, f.ts, {cut.case_sql("f.ts")} AS split,
           f.seq_offset{keep},
           ((f.ts % 86400 + 86400) % 86400 // 3600)::TINYINT AS hour,
           isodow(make_timestamp(f.ts * 1000000))::TINYINT AS weekday,
           f.u_cnt, f.u_value_mean, f.u_secs_since_last{decay},
           f.i_cnt, f.i_value_mean, f.i_secs_since_first
    FROM {features} f
    JOIN {dataset}.user_index ui ON ui.user_idx = f.user_idx
    JOIN {dataset}.item_index ii ON ii.item_idx = f.item_idx
    """


def with_attributes_sql(wh: Warehouse, dataset: str) -> str:
    """``<ds>.examples`` joined with the static attributes: every ``users`` column as ``u_<col>``, every
    ``items`` column as ``i_<col>`` and ``i_age_s = ts - release_ts``. What the export writes and models read.

    OPEN choice: static attributes are joined here, at export, not stored in ``<ds>.examples``: they are not
    point-in-time (nothing to leak), and denormalising ~8 VARCHAR columns into every example made the
    examples build 2.5x slower and the table several times larger.
    """
    check_dataset(dataset)
    attrs, joins = [], []
    if wh.has_table(f"{dataset}.users"):
        user_cols = [c for c in columns(wh, f"{dataset}.users") if c != "user_id"]
        attrs += [f'ua."{c}" AS "u_{c}"' for c in user_cols]
        joins.append(f"LEFT JOIN {dataset}.users ua ON ua.user_id = e.user_id")
    if wh.has_table(f"{dataset}.items"):
        item_cols = [c for c in columns(wh, f"{dataset}.items") if c != "item_id"]
        attrs += [f'ia."{c}" AS "i_{c}"' for c in item_cols if c != "release_ts"]
        if "release_ts" in item_cols:
            attrs.append("(e.ts - ia.release_ts) AS i_age_s")
        joins.append(f"LEFT JOIN {dataset}.items ia ON ia.item_id = e.item_id")
    attr_sql = "".join(f", {a}" for a in attrs)
    return f"SELECT e.*{attr_sql} FROM {dataset}.examples e " + " ".join(joins)


def feature_columns(wh: Warehouse, dataset: str) -> dict[str, list[str]]:
    """The columns of ``with_attributes_sql`` (the exported examples) by role, for models and the manifest."""
    require_table(wh, f"{check_dataset(dataset)}.examples")
    cols = {r[0]: r[1] for r in wh.con.execute(f"DESCRIBE {with_attributes_sql(wh, dataset)}").fetchall()}
    ids = ["user_id", "item_id", "user_idx", "item_idx", "ts", "split", "seq_offset"]
    label_cols = [c for c in ("label", "click", "like") if c in cols]
    meta = [c for c in META_COLUMNS if c in cols]
    taken = set(ids) | set(label_cols) | set(meta)
    categorical, numeric, lists = [], [], []
    for name, typ in cols.items():
        if name in taken:
            continue
        if typ.endswith("[]"):
            lists.append(name)
        elif typ in ("VARCHAR", "BOOLEAN") or name in ("hour", "weekday"):
            categorical.append(name)
        else:
            numeric.append(name)
    return {
        "ids": ids,
        "labels": label_cols,
        "meta": meta,
        "categorical": categorical,
        "numeric": numeric,
        "lists": lists,
    }


def build_examples(
    wh: Warehouse, dataset: str, config: FeatureConfig, resources: BuildResources | None = None
) -> TableVersion:
    """``<ds>.examples``: labelled ranking examples with point-in-time features and the ``split`` column.

    ``resources`` bounds memory (chunk size, DuckDB memory_limit / temp_directory); it never changes the
    table. The features are written as Parquet parts (one per user chunk) to a temp dir, then published
    from them in one transaction, and the parts are removed.
    """
    check_dataset(dataset)
    res = resources or BuildResources()
    with _duckdb_limits(wh, res):
        seq = build_sequences(wh, dataset)
        src = example_source(wh, dataset, config)
        cut = temporal_cut(wh, src.sql, config)
        inputs = {f"{dataset}.events": require_table(wh, f"{dataset}.events", EVENT_COLUMNS)}
        inputs |= optional_versions(wh, dataset, ("impressions", "user_index", "item_index"))
        inputs[seq.table_name] = seq.version
        inputs |= dict(src.inputs)
        params = dict(src.params) | {
            "step": "examples",
            "pipeline": PIPELINE_VERSION,
            "source": src.kind,
            "label_threshold": config.label_threshold if src.kind == "events" else None,
            "decay_half_lives_s": list(config.decay_half_lives_s),
            "block_half_lives": BLOCK_HALF_LIVES,
            "split": cut.params(),
        }
        name = f"{dataset}.examples"
        if wh.is_fresh(name, stable_hash(inputs, params)):  # skip the numpy pass too, not only the publish
            latest = wh.latest(name)
            assert latest is not None
            return latest
        parts_dir = owned_tempdir(parts_root(wh), f"{dataset}-examples")
        try:
            parts = write_feature_parts(wh, dataset, config, src, parts_dir, res)
            files = ", ".join("'" + str(p).replace("'", "''") + "'" for p in parts)
            label = (
                f", value >= '{config.label_threshold!r}'::DOUBLE AS label" if src.kind == "events" else ""
            )
            features = f"(SELECT *, seq_offset::BIGINT AS u_cnt{label} FROM read_parquet([{files}]))"
            return publish_if_stale(
                wh, name, examples_sql(dataset, config, src, cut, features), inputs=inputs, params=params
            )
        finally:
            shutil.rmtree(parts_dir, ignore_errors=True)
