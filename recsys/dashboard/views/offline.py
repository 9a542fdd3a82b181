"""Offline comparison: models side by side on any recorded metric (mean ± std over seeds, per group of
comparable runs), the same on slices of users and items, and training curves from ``run_metrics``."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import streamlit as st

from recsys.dashboard import cache, charts, data


def _slices(final: pl.DataFrame) -> None:
    st.header("Slices")
    slices = data.slice_metrics(final)
    if slices.is_empty():
        st.caption(
            "No slice metrics recorded for these runs. An evaluation records them in the run's metrics as "
            "`<split>/slice/<dimension>/<bucket>/<metric>`, e.g. `test/slice/user_activity/1-5/ndcg@10`, "
            "`test/slice/item_popularity/tail/ndcg@10`, `test/slice/cold_start_items/cold/auc`, with the "
            "bucket size under the leaf `n`."
        )
        return
    cols = st.columns(3)
    dimensions = slices["dimension"].unique(maintain_order=True).to_list()
    dimension = cols[0].selectbox("Slice", dimensions, key="offline_slice_dimension")
    of_dim = slices.filter(pl.col("dimension") == dimension)
    splits = sorted(of_dim["split"].unique().to_list(), key=lambda s: (s != "test", s))
    split = cols[1].selectbox("Slice split", splits, key=f"offline_slice_split_{dimension}")
    names = data.slice_metric_names(slices, split, dimension)
    if not names:
        st.caption(f"The `{dimension}` slices record only bucket sizes.")
        return
    metric = cols[2].selectbox("Slice metric", names, key=f"offline_slice_metric_{dimension}_{split}")
    summary = data.summarise_slices(slices, split, dimension, metric)
    for group in summary["group"].unique(maintain_order=True).to_list():
        rows = summary.filter(pl.col("group") == group)
        st.markdown(f"**{group}**")
        st.altair_chart(charts.slice_by_model(rows, metric, dimension))
        with st.expander("Slice figures"):
            st.dataframe(
                rows.select(
                    "bucket",
                    "name",
                    "n_seeds",
                    pl.col("mean").round(5),
                    pl.col("std").round(5),
                    pl.col("n").round(1).alias("users / examples"),
                ),
                hide_index=True,
            )


def main() -> None:
    path = Path(st.session_state.get("warehouse_path") or data.default_warehouse_path())
    st.title("Offline comparison")
    final = cache.read(data.final_metrics, path)
    if final.is_empty():
        st.info(
            "No finished run with numeric metrics yet. Train and evaluate models with "
            "`.venv/bin/recsys pipeline` (retrieval: ndcg@10, hr@10, mrr@10; ranking: auc, gauc, logloss, "
            "ne, calibration); every run is recorded in the warehouse and shows up here."
        )
        return

    kinds = sorted(final["kind"].unique().to_list())
    preferred = next((k for k in ("retrieval", "ranking") if k in kinds), kinds[0])
    top = st.columns([1, 2, 1])
    kind = top[0].selectbox("Kind", kinds, index=kinds.index(preferred), key="offline_kind")
    of_kind = final.filter(pl.col("kind") == kind)
    distilled = data.with_distilled(final, kind) if kind != data.DISTILL_KIND else of_kind
    with_students = distilled.height > of_kind.height and top[2].checkbox(
        "With distilled students",
        value=True,
        key=f"offline_distilled_{kind}",
        help="Distillation runs (kind `distill`) of the same dataset, protocol and data version.",
    )
    if with_students:
        of_kind = distilled
    names = data.metric_names(of_kind)
    metric = top[1].selectbox("Metric", names, index=0, key=f"offline_metric_{kind}")

    summary = data.summarise(of_kind, metric)
    st.caption(
        "Bars: mean over seeds; whiskers: ± one standard deviation (ddof = 1); dots: individual seeds. "
        "Runs are compared only within a group of identical dataset, protocol and data version."
    )
    for group in summary["group"].unique(maintain_order=True).to_list():
        rows = summary.filter(pl.col("group") == group)
        seeds = of_kind.filter((pl.col("group") == group) & (pl.col("metric") == metric))
        st.subheader(group)
        st.caption(f"{rows.height} models: {', '.join(sorted(rows['name'].to_list()))}")
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

    _slices(of_kind)

    st.header("Training curves")
    curve_kinds = [kind, data.DISTILL_KIND] if with_students else [kind]
    runs = cache.read(data.list_runs, path, kinds=curve_kinds)
    runs = runs.filter(pl.col("status") != "running") if runs.height > 1 else runs
    labels = {}
    for r in runs.iter_rows(named=True):
        marked = r["kind"] != data.DISTILL_KIND or kind == data.DISTILL_KIND or "distil" in r["name"].lower()
        student = "" if marked else data.DISTILLED_SUFFIX
        labels[f"{r['name']}{student} · seed {r['seed']} · {r['dataset']} · {r['run_id'][-6:]}"] = r["run_id"]
    chosen = st.multiselect(
        "Runs",
        list(labels),
        default=list(labels)[:12],
        key=f"curve_runs_{kind}_{with_students}",
        help="Newest first.",
    )
    curves = cache.read(data.run_metrics, path, [labels[c] for c in chosen])
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
