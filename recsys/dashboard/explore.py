"""Warehouse queries of the Dataset and User pages: one dataset's events, items, users and ingest rejects.

Like ``dashboard.data``, each function opens the DuckDB file read-only, reads and closes it (the pages call
them through ``dashboard.cache``). A dataset is a warehouse schema holding an ``events`` table (the data
contract); ``users``, ``items``, ``user_index``, ``item_index``, ``user_ids`` and ``rejects`` are read when
present. Users are named by their own id: ``user_index.user_id`` (the id in the source, or, for string
source ids, the dense id that ``<ds>.user_ids`` maps to the raw string, shown beside it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from recsys.dashboard.data import _open, _tables
from recsys.features.sequences import EVENT_ORDER, check_dataset

# Attributes of items and users that are internal to the synthetic generator or too wide to show.
_HIDDEN_COLUMNS = {"src_row"}


def datasets(path: str | Path) -> list[str]:
    """The schemas holding an ``events`` table, sorted."""
    with _open(path) as wh:
        if wh is None:
            return []
        return sorted(t.split(".")[0] for t in _tables(wh) if t.endswith(".events") and "." in t)


def _has(wh: Any, dataset: str, table: str) -> bool:
    return f"{dataset}.{table}" in _tables(wh)


def _columns(wh: Any, name: str) -> list[str]:
    return [row[0] for row in wh.con.execute(f"DESCRIBE {name}").fetchall()]


def dataset_versions(path: str | Path, dataset: str) -> list[str]:
    """Every lineage version any table of the dataset has had (what a registered model's data version is
    matched against)."""
    check_dataset(dataset)
    with _open(path) as wh:
        if wh is None or "lineage" not in _tables(wh):
            return []
        rows = wh.con.execute(
            "SELECT DISTINCT version FROM lineage WHERE table_name LIKE ? ORDER BY version", [f"{dataset}.%"]
        ).fetchall()
    return [str(v) for (v,) in rows]


@dataclass(frozen=True)
class Overview:
    events: int
    users: int
    items: int  # in the catalogue (item_index, else items, else events)
    items_with_events: int
    first_ts: int | None
    last_ts: int | None
    event_types: dict[str, int]
    events_version: str | None


def overview(path: str | Path, dataset: str) -> Overview:
    """Counts and time span of ``<ds>.events``, with the size of the item catalogue."""
    ds = check_dataset(dataset)
    with _open(path) as wh:
        if wh is None or not _has(wh, ds, "events"):
            return Overview(0, 0, 0, 0, None, None, {}, None)
        events, users, with_events, first, last = wh.con.execute(
            "SELECT count(*), count(DISTINCT user_id), count(DISTINCT item_id), min(ts), max(ts)"
            f" FROM {ds}.events"
        ).fetchall()[0]
        types = dict(
            wh.con.execute(
                f"SELECT event, count(*) FROM {ds}.events GROUP BY event ORDER BY 2 DESC"
            ).fetchall()
        )
        catalogue = next((t for t in ("item_index", "items") if _has(wh, ds, t)), None)
        items = (
            wh.con.execute(f"SELECT count(*) FROM {ds}.{catalogue}").fetchall()[0][0]
            if catalogue
            else with_events
        )
        version = None
        if "lineage" in _tables(wh):
            row = wh.con.execute(
                "SELECT arg_max(version, created_at) FROM lineage WHERE table_name = ?", [f"{ds}.events"]
            ).fetchall()
            version = row[0][0] if row else None
    return Overview(int(events), int(users), int(items), int(with_events), first, last, types, version)


def time_grain(first_ts: int | None, last_ts: int | None) -> str:
    """``day`` for spans up to 120 days, ``week`` up to 3 years, else ``month``."""
    if first_ts is None or last_ts is None:
        return "day"
    days = (last_ts - first_ts) / 86_400
    return "day" if days <= 120 else "week" if days <= 3 * 365 else "month"


def events_over_time(path: str | Path, dataset: str, grain: str = "day") -> pl.DataFrame:
    """Events per ``grain`` (day, week or month, UTC) and event type: period, event, events, users."""
    ds = check_dataset(dataset)
    if grain not in ("day", "week", "month"):
        raise ValueError(f"grain must be day, week or month, got {grain!r}")
    schema = {"period": pl.Datetime("us"), "event": pl.String, "events": pl.Int64, "users": pl.Int64}
    with _open(path) as wh:
        if wh is None or not _has(wh, ds, "events"):
            return pl.DataFrame(schema=schema)
        frame = wh.sql(
            f"""
            SELECT date_trunc('{grain}', make_timestamp(ts * 1000000)) AS period, event,
                   count(*) AS events, count(DISTINCT user_id) AS users
            FROM {ds}.events GROUP BY ALL ORDER BY period, event
            """
        )
    return frame.cast(schema)  # type: ignore[arg-type]


def item_popularity(path: str | Path, dataset: str) -> pl.DataFrame:
    """Every catalogue item by descending event count: rank (1 = most popular), item_id, events, share of
    all events and the cumulative share (items without events at the end, with 0)."""
    ds = check_dataset(dataset)
    schema = {
        "rank": pl.Int64,
        "item_id": pl.Int64,
        "events": pl.Int64,
        "share": pl.Float64,
        "cum_share": pl.Float64,
    }
    with _open(path) as wh:
        if wh is None or not _has(wh, ds, "events"):
            return pl.DataFrame(schema=schema)
        catalogue = next((t for t in ("item_index", "items") if _has(wh, ds, t)), None)
        ids = f"SELECT item_id FROM {ds}.{catalogue} UNION " if catalogue else ""
        frame = wh.sql(
            f"""
            WITH counts AS (SELECT item_id, count(*) AS n FROM {ds}.events GROUP BY item_id),
                 ids AS ({ids}SELECT item_id FROM counts),
                 joined AS (SELECT ids.item_id, coalesce(counts.n, 0) AS events
                            FROM ids LEFT JOIN counts USING (item_id))
            SELECT row_number() OVER (ORDER BY events DESC, item_id) AS rank, item_id, events,
                   events / sum(events) OVER () AS share,
                   sum(events) OVER (ORDER BY events DESC, item_id ROWS UNBOUNDED PRECEDING)
                       / sum(events) OVER () AS cum_share
            FROM joined ORDER BY rank
            """
        )
    return frame.cast(schema)  # type: ignore[arg-type]


@dataclass(frozen=True)
class LongTail:
    items: int
    head_items: int  # items that together hold half of all events
    items_for_80: int  # items that hold 80 % of all events
    top_1pct_share: float  # share of events of the 1 % most popular items
    top_20pct_share: float
    cold_items: int  # catalogue items with no event
    rare_items: int  # items with 1-5 events


def long_tail(popularity: pl.DataFrame) -> LongTail:
    """Concentration figures of an ``item_popularity`` frame."""
    n = popularity.height
    if n == 0:
        return LongTail(0, 0, 0, math.nan, math.nan, 0, 0)
    cum = popularity["cum_share"]

    def items_for(share: float) -> int:
        return int((cum < share - 1e-12).sum()) + 1

    def top_share(fraction: float) -> float:
        k = max(1, math.ceil(fraction * n))
        return float(cum[k - 1])

    events = popularity["events"]
    return LongTail(
        items=n,
        head_items=items_for(0.5),
        items_for_80=items_for(0.8),
        top_1pct_share=top_share(0.01),
        top_20pct_share=top_share(0.2),
        cold_items=int((events == 0).sum()),
        rare_items=int(((events >= 1) & (events <= 5)).sum()),
    )


def history_lengths(path: str | Path, dataset: str) -> pl.DataFrame:
    """Events per user: user_id, events."""
    ds = check_dataset(dataset)
    schema = {"user_id": pl.Int64, "events": pl.Int64}
    with _open(path) as wh:
        if wh is None or not _has(wh, ds, "events"):
            return pl.DataFrame(schema=schema)
        frame = wh.sql(
            f"SELECT user_id, count(*) AS events FROM {ds}.events GROUP BY user_id ORDER BY user_id"
        )
    return frame.cast(schema)  # type: ignore[arg-type]


def length_histogram(lengths: pl.DataFrame) -> pl.DataFrame:
    """Users per history-length bin on a doubling scale (1, 2-3, 4-7, 8-15, ...): bin, lo, hi, users."""
    schema = {"bin": pl.String, "lo": pl.Int64, "hi": pl.Int64, "users": pl.Int64}
    if lengths.is_empty():
        return pl.DataFrame(schema=schema)
    counts = lengths["events"].to_numpy()
    records = []
    lo = 1
    while lo <= counts.max():
        hi = 2 * lo - 1
        users = int(((counts >= lo) & (counts <= hi)).sum())
        records.append({"bin": str(lo) if lo == hi else f"{lo}-{hi}", "lo": lo, "hi": hi, "users": users})
        lo *= 2
    return pl.DataFrame(records, schema=schema)


def rejects(path: str | Path, dataset: str) -> pl.DataFrame | None:
    """``<ds>.rejects`` (file, row, reason and any detail), or None when the dataset has no such table (it
    was generated, not ingested)."""
    ds = check_dataset(dataset)
    with _open(path) as wh:
        if wh is None or not _has(wh, ds, "rejects"):
            return None
        return wh.sql(f"SELECT * FROM {ds}.rejects ORDER BY ALL")


def top_items(path: str | Path, dataset: str, n: int = 20) -> pl.DataFrame:
    """The ``n`` most popular items with their events and catalogue attributes."""
    ds = check_dataset(dataset)
    with _open(path) as wh:
        if wh is None or not _has(wh, ds, "events"):
            return pl.DataFrame(schema={"item_id": pl.Int64, "events": pl.Int64})
        counts = wh.sql(
            f"SELECT item_id, count(*) AS events FROM {ds}.events GROUP BY item_id"
            " ORDER BY events DESC, item_id LIMIT ?",
            [int(n)],
        )
        attributes = _attributes(wh, ds, "items", "item_id", counts["item_id"].to_list())
    return counts.join(attributes, on="item_id", how="left") if attributes is not None else counts


def _attributes(wh: Any, ds: str, table: str, key: str, ids: list[int]) -> pl.DataFrame | None:
    if not _has(wh, ds, table) or not ids:
        return None
    shown = [c for c in _columns(wh, f"{ds}.{table}") if c not in _HIDDEN_COLUMNS]
    select = ", ".join(f'"{c}"' for c in shown)
    return wh.sql(f"SELECT {select} FROM {ds}.{table} WHERE {key} IN (SELECT unnest(?::BIGINT[]))", [ids])


def item_attributes(path: str | Path, dataset: str, item_ids: list[int]) -> pl.DataFrame:
    """``<ds>.items`` rows of these items (just ``item_id`` when the dataset has no items table)."""
    ds = check_dataset(dataset)
    with _open(path) as wh:
        frame = (
            _attributes(wh, ds, "items", "item_id", [int(i) for i in item_ids]) if wh is not None else None
        )
    return frame if frame is not None else pl.DataFrame({"item_id": item_ids}, schema={"item_id": pl.Int64})


# -- users --------------------------------------------------------------------------------------------------


def users(path: str | Path, dataset: str) -> pl.DataFrame:
    """Every user with events: user_id, raw_id (the source's string id when it had one, else null),
    events, first and last event time; most active first."""
    ds = check_dataset(dataset)
    schema = {
        "user_id": pl.Int64,
        "raw_id": pl.String,
        "events": pl.Int64,
        "first_ts": pl.Int64,
        "last_ts": pl.Int64,
    }
    with _open(path) as wh:
        if wh is None or not _has(wh, ds, "events"):
            return pl.DataFrame(schema=schema)
        raw = f"LEFT JOIN {ds}.user_ids r ON r.user_id = e.user_id" if _has(wh, ds, "user_ids") else ""
        raw_col = "any_value(r.raw_id)::VARCHAR" if raw else "NULL::VARCHAR"
        frame = wh.sql(
            f"""
            SELECT e.user_id, {raw_col} AS raw_id, count(*) AS events, min(e.ts) AS first_ts,
                   max(e.ts) AS last_ts
            FROM {ds}.events e {raw} GROUP BY e.user_id ORDER BY events DESC, e.user_id
            """
        )
    return frame.cast(schema)  # type: ignore[arg-type]


def user_profile(path: str | Path, dataset: str, user_id: int) -> dict[str, Any]:
    """The user's row of ``<ds>.users`` (empty when the dataset has none or lacks the user)."""
    ds = check_dataset(dataset)
    with _open(path) as wh:
        frame = _attributes(wh, ds, "users", "user_id", [int(user_id)]) if wh is not None else None
    return frame.row(0, named=True) if frame is not None and frame.height else {}


def user_history(path: str | Path, dataset: str, user_id: int) -> pl.DataFrame:
    """The user's events in sequence order (``ts``, then source row): position (1 = oldest), time (UTC),
    ts, item_id, event, value, then the item's attributes."""
    ds = check_dataset(dataset)
    schema = {
        "position": pl.Int64,
        "time": pl.Datetime("us"),
        "ts": pl.Int64,
        "item_id": pl.Int64,
        "event": pl.String,
        "value": pl.Float64,
    }
    with _open(path) as wh:
        if wh is None or not _has(wh, ds, "events"):
            return pl.DataFrame(schema=schema)
        events = wh.sql(
            f"""
            SELECT row_number() OVER (ORDER BY {EVENT_ORDER}) AS position,
                   make_timestamp(ts * 1000000) AS time, ts, item_id, event, value
            FROM {ds}.events WHERE user_id = ? ORDER BY {EVENT_ORDER}
            """,
            [int(user_id)],
        ).cast(schema)  # type: ignore[arg-type]
        attributes = _attributes(wh, ds, "items", "item_id", events["item_id"].unique().to_list())
    if attributes is None:
        return events
    return events.join(attributes, on="item_id", how="left", maintain_order="left")
