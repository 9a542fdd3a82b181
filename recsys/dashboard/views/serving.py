"""Serving: latency percentiles and throughput of the recorded benchmark runs (kind ``benchmark``)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import streamlit as st

from recsys.dashboard import cache, charts, data


def main() -> None:
    path = Path(st.session_state.get("warehouse_path") or data.default_warehouse_path())
    st.title("Serving")
    figures = cache.read(data.benchmark_figures, path)
    if figures.is_empty():
        st.info(
            "No benchmark runs with latency figures in this warehouse. Measure the service with "
            "`.venv/bin/python -m recsys.benchmarks.serving_load` (p50/p95/p99 latency and requests/s per "
            "scenario); figures recorded as runs of kind `benchmark` (`RunLog.start('benchmark', ...)`, "
            "metrics such as `recommend/p50_ms`, `recommend/p99_ms`, `recommend/rps`) show up here."
        )
        return

    labels = figures["label"].unique(maintain_order=True).to_list()
    newest = labels[-3:]
    chosen = st.multiselect("Benchmark runs", labels, default=newest, key="serving_runs")
    shown = figures.filter(pl.col("label").is_in(chosen))
    if shown.is_empty():
        st.caption("Choose at least one run.")
        return
    latency = shown.filter(pl.col("measure") == "latency")
    if not latency.is_empty():
        st.header("Latency")
        st.altair_chart(charts.latency_percentiles(latency))
        wide = latency.pivot(on="stat", index=["label", "scenario", "hardware"], values="value")
        stats = sorted(
            wide.columns[3:],
            key=lambda c: (
                charts.STAT_ORDER.index(c) if c in charts.STAT_ORDER else len(charts.STAT_ORDER),
                c,
            ),
        )
        st.dataframe(
            wide.select("label", "scenario", *stats, "hardware"),
            hide_index=True,
            column_config={c: st.column_config.NumberColumn(f"{c} (ms)", format="%.2f") for c in stats},
        )
    rate = shown.filter(pl.col("measure") == "throughput")
    if not rate.is_empty():
        st.header("Throughput")
        st.altair_chart(charts.throughput(rate))
    st.caption(
        "Client and server share the machine in `benchmarks/serving_load.py`: "
        "figures are for both on one box."
    )


main()
