"""The feature build split by user hash, so that independent workers (Dask, via flows/parallel_features.py)
compute ``<ds>.sequences`` and ``<ds>.examples``; the tables equal those of the single-process build.

Stages (map by user, shuffle by item, reduce on the driver):

1. ``plan_partitioned`` (driver, read-write connection): the dense indexes (global by nature), the example
   source, the temporal cut, ``t0`` and the cache keys. When both tables are fresh there is nothing to do.
2. ``run_user_partition`` (one worker per user partition, a read-only warehouse connection): the partition's
   events in sequence order -> its ``sequences`` rows, the user-side point-in-time features of its examples,
   and, for stage 3, its events' ``(item_idx, ts, value)`` and its examples' ``(x_id, item_idx, ts)``.
3. ``run_item_partition`` (one worker per item partition ``item_idx % P``, reading stage 1's Parquet only):
   the item-side features (``i_cnt``, ``i_value_mean``, ``i_secs_since_first``) of the examples of its items,
   from every user partition's events of those items.
4. ``publish_partitioned`` (driver): ``sequences`` then ``examples``, each through ``Warehouse.publish`` (one
   transaction each), with the same inputs and parameters as ``build_sequences`` / ``build_examples``: a
   table built one way is fresh for the other.

The feature arithmetic is not re-implemented: stages 2 and 3 call ``recsys.features.point_in_time``'s own
functions (``_user_features``, ``_item_features``) on the partition's arrays.

What "identical" means: ``<ds>.sequences`` is the same table (same content-hash version). ``<ds>.examples``
has the same rows, the same values in every non-float column and float64 columns equal within 1e-12
relative: running sums (mean values, decayed counters) are chunked over a different array layout and
round differently in the last bits, exactly as a different ``BuildResources.chunk_events`` does.

OPEN choices and what was picked:

- Partition key: splitmix64 of ``user_id`` (not ``user_idx``, which shifts when new users arrive) modulo
  P: stable across runs, machines and library versions, and well spread for sequential ids.
- Item partitions: ``item_idx % P`` (dense ids; the popular low ids spread over every partition).
- Hand-off between stages: Parquet parts in ``work_dir``; on a multi-machine cluster it (and the warehouse
  file) must be on storage every worker sees. The warehouse is read through read-only DuckDB connections, so
  the driver holds no write connection while the workers run (DuckDB allows many readers or one writer).
- Memory: a worker holds its partition (about events / P x 150 bytes); raise P for bigger data.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from recsys.core.atomic import owned_tempdir
from recsys.core.config import FrozenModel
from recsys.core.hashing import stable_hash
from recsys.features.config import FeatureConfig
from recsys.features.point_in_time import (
    _KEY_SHIFT,
    _NULL_INT,
    BLOCK_HALF_LIVES,
    PARQUET_PART,
    PIPELINE_VERSION,
    BuildResources,
    ExampleSource,
    _column,
    _Events,
    _impression_examples,
    _item_features,
    _keys,
    _sorted_order,
    _user_features,
    example_source,
    examples_sql,
)
from recsys.features.sequences import (
    EVENT_COLUMNS,
    EVENT_ORDER,
    _as_lists,
    build_item_index,
    build_user_index,
    check_dataset,
    optional_versions,
    publish_if_stale,
    require_table,
)
from recsys.features.splits import TemporalCut, temporal_cut
from recsys.warehouse import TableVersion, Warehouse, WarehouseError

T = TypeVar("T")
R = TypeVar("R")
MapFn = Callable[[Callable[[T], R], Sequence[T]], Sequence[R]]

# x_id = partition << _PART_SHIFT | row: a unique example id that joins the two stages' outputs.
_PART_SHIFT = 40


class PartitionConfig(FrozenModel):
    """How the build is split; never changes the tables (not part of any cache key)."""

    partitions: int = Field(4, ge=1, le=1 << 20, description="User partitions (and item partitions).")
    work_dir: Path | None = Field(
        None,
        description="Parent of the temp dir for the Parquet parts (None: the system temp dir). On a"
        " multi-machine cluster: a path every worker can read and write.",
    )
    memory_limit: str | None = Field(
        "2GB", description="DuckDB memory_limit of each worker's connection (None: DuckDB's default)."
    )
    item_slice_events: int = Field(
        2_000_000, ge=1, description="Events per slice of the item-side pass (bounds its temporaries)."
    )

    @field_validator("memory_limit")
    @classmethod
    def _limit(cls, v: str | None) -> str | None:
        if v is not None:
            BuildResources(memory_limit=v)  # the same check and message as the single-process build
        return v


def user_partition(user_id: np.ndarray, partitions: int) -> np.ndarray:
    """The partition (0..partitions-1, int32) of each user id: splitmix64 finaliser modulo ``partitions``."""
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        z = np.asarray(user_id).astype(np.int64).view(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(partitions)).astype(np.int32)


@dataclass(frozen=True)
class PartitionPlan:
    """Everything a worker needs (picklable: it travels to Dask workers)."""

    warehouse_path: str
    dataset: str
    config: FeatureConfig
    partition: PartitionConfig
    parts_dir: str
    source: ExampleSource
    cut: TemporalCut
    t0: int
    seq_inputs: dict[str, str]
    seq_params: dict[str, Any]
    examples_inputs: dict[str, str]  # without the sequences version (known once it is published)
    examples_params: dict[str, Any]
    fresh: bool  # both tables already built from these inputs: nothing to do

    @property
    def partitions(self) -> list[int]:
        return [] if self.fresh else list(range(self.partition.partitions))


@dataclass(frozen=True)
class UserPart:
    part: int
    sequences: str
    features: str
    item_events: str
    item_examples: str
    users: int
    events: int
    examples: int
    seconds: float


@dataclass(frozen=True)
class ItemPart:
    part: int
    path: str
    examples: int
    seconds: float


@dataclass
class PartitionedBuild:
    sequences: TableVersion
    examples: TableVersion
    partitions: int
    seconds: dict[str, float] = field(default_factory=dict)


def _quote(paths: Sequence[str]) -> str:
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"


def _examples_params(dataset: str, config: FeatureConfig, src: ExampleSource, cut: TemporalCut) -> dict:
    # Must equal build_examples' params (tests/features/test_partitioned.py checks the shared cache key).
    return dict(src.params) | {
        "step": "examples",
        "pipeline": PIPELINE_VERSION,
        "source": src.kind,
        "label_threshold": config.label_threshold if src.kind == "events" else None,
        "decay_half_lives_s": list(config.decay_half_lives_s),
        "block_half_lives": BLOCK_HALF_LIVES,
        "split": cut.params(),
    }


def _time_span(wh: Warehouse, dataset: str, src: ExampleSource) -> int:
    """t0 = the first ts of any event or example; the span must fit the 32-bit ts half of the sort keys."""
    lo, hi = wh.con.execute(
        f"SELECT min(ts), max(ts) FROM (SELECT ts FROM {dataset}.events UNION ALL SELECT ts FROM ({src.sql}))"
    ).fetchall()[0]
    if lo is None:
        return 0
    if int(hi) - int(lo) >= 1 << _KEY_SHIFT:
        raise ValueError(
            f"timestamps of {dataset} span more than 2**32 seconds (136 years): check the ts unit"
        )
    return int(lo)


def plan_partitioned(
    wh: Warehouse, dataset: str, config: FeatureConfig, partition: PartitionConfig | None = None
) -> PartitionPlan:
    """Driver step: indexes, example source, cut, cache keys, and a fresh temp dir for the parts."""
    check_dataset(dataset)
    partition = partition or PartitionConfig()
    events_version = require_table(wh, f"{dataset}.events", EVENT_COLUMNS)
    items = build_item_index(wh, dataset)
    users = build_user_index(wh, dataset)
    seq_inputs = {f"{dataset}.events": events_version, items.table_name: items.version}
    seq_inputs[users.table_name] = users.version
    seq_params = {"step": "sequences", "order": EVENT_ORDER}
    src = example_source(wh, dataset, config)
    cut = temporal_cut(wh, src.sql, config)
    ex_inputs = {f"{dataset}.events": events_version}
    ex_inputs |= optional_versions(wh, dataset, ("impressions", "user_index", "item_index"))
    ex_inputs |= dict(src.inputs)  # implicit feedback: the sampled example table
    ex_params = _examples_params(dataset, config, src, cut)
    fresh = False
    seq_name = f"{dataset}.sequences"
    if wh.is_fresh(seq_name, stable_hash(seq_inputs, seq_params)):
        ex_key = stable_hash(ex_inputs | {seq_name: wh.version(seq_name)}, ex_params)
        fresh = wh.is_fresh(f"{dataset}.examples", ex_key)
    t0 = _time_span(wh, dataset, src)
    # Beside the warehouse by default: temp space stays under the state directory (swept after a crash).
    root = partition.work_dir or Path(wh.path).resolve().parent / "tmp"
    parts_dir = str(owned_tempdir(root, f"{dataset}-partitioned"))
    return PartitionPlan(
        warehouse_path=str(wh.path),
        dataset=dataset,
        config=config,
        partition=partition,
        parts_dir=parts_dir,
        source=src,
        cut=cut,
        t0=t0,
        seq_inputs=seq_inputs,
        seq_params=seq_params,
        examples_inputs=ex_inputs,
        examples_params=ex_params,
        fresh=fresh,
    )


def _limit_memory(con: duckdb.DuckDBPyConnection, limit: str | None) -> None:
    if limit is not None:
        con.execute(f"SET memory_limit = '{limit}'")


def _events_of(tab: pa.Table) -> _Events:
    """Flat, sequence-ordered event rows -> the arrays ``recsys.features.point_in_time`` computes on."""
    users = np.asarray(tab["user_idx"].to_numpy(), dtype=np.int32)
    n = len(users)
    starts = np.flatnonzero(np.concatenate([[True], users[1:] != users[:-1]])) if n else np.zeros(0, int)
    lengths = np.diff(np.append(starts, n))
    return _Events(
        user=users,
        item=np.asarray(tab["item_idx"].to_numpy(), dtype=np.int32),
        ts=np.asarray(tab["ts"].to_numpy(), dtype=np.int64),
        value=np.asarray(pc.fill_null(tab["value"], np.nan).to_numpy(), dtype=np.float64),
        pos=(np.arange(n, dtype=np.int64) - np.repeat(starts, lengths)).astype(np.int32),
    )


def run_user_partition(plan: PartitionPlan, part: int) -> UserPart:
    """Worker step 1: the sequences rows and user-side features of the users of partition ``part``."""
    started = time.perf_counter()
    ds, src, out = plan.dataset, plan.source, Path(plan.parts_dir)
    with Warehouse(plan.warehouse_path, read_only=True) as wh:
        _limit_memory(wh.con, plan.partition.memory_limit)
        index = wh.con.sql(f"SELECT user_id, user_idx FROM {ds}.user_index").to_arrow_table()
        mine = np.flatnonzero(user_partition(index["user_id"].to_numpy(), plan.partition.partitions) == part)
        wh.con.register("__part_users", index.take(pa.array(mine, pa.int64())))
        flat = wh.con.sql(
            f"""SELECT u.user_id, u.user_idx, i.item_idx, e.ts, e.value::DOUBLE AS value
                FROM {ds}.events e JOIN __part_users u USING (user_id)
                JOIN {ds}.item_index i USING (item_id)
                ORDER BY u.user_idx, {", ".join(f"e.{c.strip()}" for c in EVENT_ORDER.split(","))}"""
        ).to_arrow_table()
        ev = _events_of(flat)
        if src.kind == "events":
            keep = ~np.isnan(ev.value)
            if keep.all():  # the examples are the events: _user_features takes its fast path on identity
                x_user, x_item, x_ts, pos, value = ev.user, ev.item, ev.ts, ev.pos, ev.value
            else:
                x_user, x_item, x_ts = ev.user[keep], ev.item[keep], ev.ts[keep]
                pos, value = ev.pos[keep], ev.value[keep]
            base: dict[str, Any] = {
                "user_idx": pa.array(x_user),
                "item_idx": pa.array(x_item),
                "ts": pa.array(x_ts),
                "pos": pa.array(pos),
                "value": pa.array(value),
            }
        else:
            tab = _impression_examples(
                wh, ds, src, "WHERE ui.user_idx IN (SELECT user_idx FROM __part_users)"
            )
            x_user = np.asarray(tab["user_idx"].to_numpy(), dtype=np.int32)
            x_item = np.asarray(tab["item_idx"].to_numpy(), dtype=np.int32)
            x_ts = np.asarray(tab["ts"].to_numpy(), dtype=np.int64)
            base = {c: tab[c] for c in tab.column_names}
        wh.con.unregister("__part_users")
    feats = _user_features(ev, x_user, x_ts, plan.t0, plan.config)
    del feats["u_cnt"]  # = seq_offset, derived at publish as in build_examples
    x_id = (np.int64(part) << _PART_SHIFT) | np.arange(len(x_ts), dtype=np.int64)
    paths = {k: out / f"{k}-{part:06d}.parquet" for k in ("seq", "user", "item_events", "item_examples")}
    pq.write_table(_as_lists(flat), paths["seq"], **PARQUET_PART)
    features = {"x_id": pa.array(x_id), **base, **{k: _column(v) for k, v in feats.items()}}
    pq.write_table(pa.table(features), paths["user"], **PARQUET_PART)
    item_events = {"item_idx": pa.array(ev.item), "ts": pa.array(ev.ts), "value": pa.array(ev.value)}
    pq.write_table(pa.table(item_events), paths["item_events"], **PARQUET_PART)
    item_examples = {"x_id": pa.array(x_id), "item_idx": pa.array(x_item), "ts": pa.array(x_ts)}
    pq.write_table(pa.table(item_examples), paths["item_examples"], **PARQUET_PART)
    return UserPart(
        part=part,
        sequences=str(paths["seq"]),
        features=str(paths["user"]),
        item_events=str(paths["item_events"]),
        item_examples=str(paths["item_examples"]),
        users=len(mine),
        events=len(ev.ts),
        examples=len(x_ts),
        seconds=time.perf_counter() - started,
    )


def run_item_partition(plan: PartitionPlan, part: int, user_parts: Sequence[UserPart]) -> ItemPart:
    """Worker step 2: the item-side features of the examples whose ``item_idx % P == part``."""
    started = time.perf_counter()
    p = plan.partition.partitions
    con = duckdb.connect()  # in-memory: this step reads stage 1's Parquet only
    try:
        _limit_memory(con, plan.partition.memory_limit)
        where = f"WHERE item_idx % {p} = {int(part)}"
        ev = con.sql(
            f"SELECT item_idx, ts, value FROM read_parquet({_quote([u.item_events for u in user_parts])})"
            f" {where}"
        ).to_arrow_table()
        xs = con.sql(
            f"SELECT x_id, item_idx, ts FROM read_parquet({_quote([u.item_examples for u in user_parts])})"
            f" {where}"
        ).to_arrow_table()
    finally:
        con.close()
    t0 = plan.t0
    keys = _keys(np.asarray(ev["item_idx"].to_numpy(), np.int32), np.asarray(ev["ts"].to_numpy()), t0)
    value = np.asarray(ev["value"].to_numpy(), dtype=np.float64)
    order = _sorted_order(keys)  # stable: ties keep the partitions' sequence order
    x_ts = np.asarray(xs["ts"].to_numpy(), dtype=np.int64)
    x_keys = _keys(np.asarray(xs["item_idx"].to_numpy(), np.int32), x_ts, t0)
    x_order = _sorted_order(x_keys)
    cnt_s, mean_s, first_s = _item_features(
        keys[order], value[order], x_keys[x_order], plan.partition.item_slice_events
    )
    cnt, mean, first = np.empty_like(cnt_s), np.empty_like(mean_s), np.empty_like(first_s)
    cnt[x_order], mean[x_order], first[x_order] = cnt_s, mean_s, first_s
    since_first = np.where(cnt > 0, x_ts - t0 - first.astype(np.int64), _NULL_INT)
    path = Path(plan.parts_dir) / f"items-{part:06d}.parquet"
    table = pa.table(
        {
            "x_id": xs["x_id"],
            "i_cnt": pa.array(cnt.astype(np.int64)),
            "i_value_mean": _column(mean),
            "i_secs_since_first": _column(since_first),
        }
    )
    pq.write_table(table, path, **PARQUET_PART)
    return ItemPart(part=part, path=str(path), examples=len(x_ts), seconds=time.perf_counter() - started)


def publish_partitioned(
    wh: Warehouse, plan: PartitionPlan, user_parts: Sequence[UserPart], item_parts: Sequence[ItemPart]
) -> tuple[TableVersion, TableVersion]:
    """Driver step: publish ``sequences`` then ``examples`` from the parts (one transaction each)."""
    ds = plan.dataset
    seq_name, ex_name = f"{ds}.sequences", f"{ds}.examples"
    if plan.fresh:
        seq, ex = wh.latest(seq_name), wh.latest(ex_name)
        assert seq is not None and ex is not None  # plan.fresh means both are published
        return seq, ex
    got_users = sorted(u.part for u in user_parts)
    got_items = sorted(i.part for i in item_parts)
    if got_users != plan.partitions or got_items != plan.partitions:
        raise WarehouseError(
            f"{ds}: partitioned build has user parts {got_users} and item parts {got_items}, expected"
            f" {plan.partitions}; nothing was published"
        )
    n_user, n_item = sum(u.examples for u in user_parts), sum(i.examples for i in item_parts)
    if n_user != n_item:
        raise WarehouseError(f"{ds}: {n_user} examples in the user parts but {n_item} in the item parts")
    ordered = sorted(user_parts, key=lambda u: u.part)
    seq = publish_if_stale(
        wh,
        seq_name,
        "SELECT user_id, user_idx, item_idx, ts, value FROM "
        f"read_parquet({_quote([u.sequences for u in ordered])}) ORDER BY user_idx",
        inputs=plan.seq_inputs,
        params=plan.seq_params,
    )
    src, config = plan.source, plan.config
    label = f", u.value >= '{config.label_threshold!r}'::DOUBLE AS label" if src.kind == "events" else ""
    features = (
        f"(SELECT u.* EXCLUDE (x_id), u.seq_offset::BIGINT AS u_cnt{label},"
        " i.i_cnt, i.i_value_mean, i.i_secs_since_first"
        f" FROM read_parquet({_quote([x.features for x in ordered])}) u"
        f" JOIN read_parquet({_quote([i.path for i in item_parts])}) i USING (x_id))"
    )
    ex = publish_if_stale(
        wh,
        ex_name,
        examples_sql(ds, config, src, plan.cut, features),
        inputs=plan.examples_inputs | {seq_name: seq.version},
        params=plan.examples_params,
    )
    if ex.row_count != n_user:
        raise WarehouseError(f"{ex_name}: published {ex.row_count} rows from {n_user} computed examples")
    return seq, ex


def cleanup(plan: PartitionPlan) -> None:
    """Remove the plan's Parquet parts (call it whether the build succeeded or not)."""
    shutil.rmtree(plan.parts_dir, ignore_errors=True)


def _serial_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    return [fn(x) for x in items]


def build_partitioned(
    warehouse_path: str | Path,
    dataset: str,
    config: FeatureConfig,
    partition: PartitionConfig | None = None,
    *,
    map_fn: MapFn | None = None,
) -> PartitionedBuild:
    """Sequences and examples of ``dataset`` built partition by partition; ``map_fn(fn, items)`` runs the
    workers (default: one after the other in this process; e.g. ``client.map`` + ``gather`` for Dask).

    Opens the warehouse itself: the write connection is closed while the workers read the file.
    """
    mapper: MapFn = map_fn or _serial_map
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    with Warehouse(warehouse_path) as wh:
        plan = plan_partitioned(wh, dataset, config, partition)
    seconds["plan"] = time.perf_counter() - started
    try:
        mark = time.perf_counter()
        users = list(mapper(lambda part: run_user_partition(plan, part), plan.partitions))
        seconds["users"] = time.perf_counter() - mark
        mark = time.perf_counter()
        items = list(mapper(lambda part: run_item_partition(plan, part, users), plan.partitions))
        seconds["items"] = time.perf_counter() - mark
        mark = time.perf_counter()
        with Warehouse(warehouse_path) as wh:
            seq, ex = publish_partitioned(wh, plan, users, items)
        seconds["publish"] = time.perf_counter() - mark
    finally:
        cleanup(plan)
    seconds["total"] = time.perf_counter() - started
    return PartitionedBuild(seq, ex, plan.partition.partitions, seconds)
