"""Dataset: one dataset of the warehouse at a glance -- events over time, item popularity and the long
tail, history lengths per user, and the rows the ingest rejected (``<ds>.rejects``)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import streamlit as st

from recsys.dashboard import cache, charts, data, explore


def _day(ts: int | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d") if ts is not None else "-"


def _rejects(path: Path, dataset: str) -> None:
    st.header("Ingest rejects")
    rejects = cache.read(explore.rejects, path, dataset)
    if rejects is None:
        st.info(
            f"`{dataset}` has no `rejects` table: it was not ingested from files (the synthetic generator "
            "publishes clean tables directly). Ingesting MovieLens or your own events writes "
            f"`{dataset}.rejects`: every row kept out of the warehouse with its file, row and reason."
        )
        return
    if rejects.is_empty():
        st.success("The ingest kept every row of the source files: `rejects` is empty.")
        return
    counts = rejects.group_by("reason").agg(pl.len().alias("rows")).sort("rows", descending=True)
    st.caption(f"{rejects.height:,} rows kept out of the warehouse, by reason; the rows themselves below.")
    st.altair_chart(charts.rejects_by_reason(counts))
    st.dataframe(rejects, hide_index=True, height=min(420, 38 + 35 * rejects.height))


def main() -> None:
    path = Path(st.session_state.get("warehouse_path") or data.default_warehouse_path())
    st.title("Dataset")
    found = cache.read(explore.datasets, path)
    if not found:
        where = "this warehouse" if path.is_file() else f"`{path}` (the file does not exist yet)"
        st.info(
            f"No dataset in {where}. `.venv/bin/recsys pipeline` generates a synthetic one; "
            "`--dataset movielens` ingests MovieLens-100K and `--dataset events --events FILE` your own "
            "events file."
        )
        return
    dataset = st.selectbox("Dataset", found, key="dataset_pick")
    ov = cache.read(explore.overview, path, dataset)
    facts = st.columns(5)
    facts[0].metric("events", f"{ov.events:,}")
    facts[1].metric("users", f"{ov.users:,}")
    facts[2].metric("items", f"{ov.items:,}", help="In the catalogue (item index).")
    facts[3].metric("items with events", f"{ov.items_with_events:,}")
    facts[4].metric("events per user", f"{ov.events / max(ov.users, 1):.1f}")
    kinds = ", ".join(f"{k} {v:,}" for k, v in ov.event_types.items())
    st.caption(
        f"{_day(ov.first_ts)} to {_day(ov.last_ts)} (UTC) · event types: {kinds or '-'} · "
        f"`{dataset}.events` version {ov.events_version or 'not published'}"
    )

    st.header("Events over time")
    default = explore.time_grain(ov.first_ts, ov.last_ts)
    grains = ["day", "week", "month"]
    grain = st.radio("Per", grains, index=grains.index(default), horizontal=True, key=f"grain_{dataset}")
    st.altair_chart(
        charts.events_over_time(cache.read(explore.events_over_time, path, dataset, grain), grain)
    )

    st.header("Item popularity and the long tail")
    popularity = cache.read(explore.item_popularity, path, dataset)
    tail = explore.long_tail(popularity)
    share = max(tail.items, 1)
    cols = st.columns(4)
    cols[0].metric("items holding half the events", f"{tail.head_items:,} ({tail.head_items / share:.1%})")
    cols[1].metric("items holding 80 % of them", f"{tail.items_for_80:,} ({tail.items_for_80 / share:.1%})")
    cols[2].metric("events of the top 1 % items", f"{tail.top_1pct_share:.1%}")
    cols[3].metric("items with 0 / 1-5 events", f"{tail.cold_items:,} / {tail.rare_items:,}")
    left, right = st.columns(2)
    with left:
        st.altair_chart(charts.rank_frequency(popularity))
    with right:
        st.altair_chart(charts.cumulative_share(popularity))
    with st.expander("The 20 most popular items"):
        st.dataframe(cache.read(explore.top_items, path, dataset, 20), hide_index=True)

    st.header("History lengths")
    lengths = cache.read(explore.history_lengths, path, dataset)
    if not lengths.is_empty():
        q = lengths["events"]
        st.caption(
            f"Events per user: median {q.median():.0f}, 90th percentile {q.quantile(0.9, 'nearest'):.0f}, "
            f"max {q.max():,}; {int((q < 3).sum()):,} users have fewer than 3 events (train-only under "
            "leave-one-out)."
        )
        st.altair_chart(charts.history_lengths(explore.length_histogram(lengths)))

    _rejects(path, dataset)


main()
