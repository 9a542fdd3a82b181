"""Offline comparison: models side by side on any recorded metric (mean ± std over seeds, per group of
comparable runs), and training curves from ``run_metrics``."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import streamlit as st

from dashboard import charts, data


def main() -> None:
    path = Path(st.session_state.get("warehouse_path") or data.default_warehouse_path())
    st.title("Offline comparison")
    final = data.final_metrics(path)
    if final.is_empty():
        st.info(
            "No finished run with numeric metrics yet. Train and evaluate models with "
            "`.venv/bin/recsys pipeline` (retrieval: ndcg@10, hr@10, mrr@10; ranking: auc, gauc, logloss, "
            "ne, calibration); every run is recorded in the warehouse and shows up here."
        )
        return

    kinds = sorted(final["kind"].unique().to_list())
    preferred = next((k for k in ("retrieval", "ranking") if k in kinds), kinds[0])
    top = st.columns([1, 2])
    kind = top[0].selectbox("Kind", kinds, index=kinds.index(preferred), key="offline_kind")
    names = data.metric_names(final, kind)
    metric = top[1].selectbox("Metric", names, index=0, key=f"offline_metric_{kind}")

    of_kind = final.filter(pl.col("kind") == kind)
    summary = data.summarise(of_kind, metric)
    st.caption(
        "Bars: mean over seeds; whiskers: ± one standard deviation (ddof = 1); dots: individual seeds. "
        "Runs are compared only within a group of identical dataset, protocol and data version."
    )
    for group in summary["group"].unique(maintain_order=True).to_list():
        rows = summary.filter(pl.col("group") == group)
        seeds = of_kind.filter((pl.col("group") == group) & (pl.col("metric") == metric))
        st.subheader(group)
        st.altair_chart(charts.metric_by_model(rows, seeds, metric))
        st.dataframe(
            rows.select(
                "name",
                "n_seeds",
                pl.col("mean").round(5),
                pl.col("std").round(5),
                pl.col("min").round(5),
                pl.col("max").round(5),
                pl.col("seeds").list.eval(pl.element().cast(pl.String)).list.join(", ").alias("seeds"),
            ),
            hide_index=True,
        )

    st.header("Training curves")
    runs = data.list_runs(path, kinds=[kind])
    runs = runs.filter(pl.col("status") != "running") if runs.height > 1 else runs
    labels = {
        f"{r['name']} · seed {r['seed']} · {r['dataset']} · {r['run_id'][-6:]}": r["run_id"]
        for r in runs.iter_rows(named=True)
    }
    chosen = st.multiselect(
        "Runs", list(labels), default=list(labels)[:12], key=f"curve_runs_{kind}", help="Newest first."
    )
    curves = data.run_metrics(path, [labels[c] for c in chosen])
    if curves.is_empty():
        st.caption("The chosen runs recorded no per-epoch metrics (`run_metrics`).")
        return
    series = sorted(curves["series"].unique().to_list())
    default = data.default_curve_series(series, metric)
    # Keyed by the metric too: the curve follows the metric chosen above until the user picks another one.
    curve = st.selectbox(
        "Curve metric",
        series,
        index=series.index(default) if default else 0,
        key=f"curve_series_{kind}_{metric}",
    )
    st.altair_chart(charts.training_curves(curves, curve))


main()
