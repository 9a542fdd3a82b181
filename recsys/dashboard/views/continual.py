"""Continual training: per method, the forgetting matrix (metric of the model after each learned period on
every evaluated period) as a heatmap, the final model on each period, and forgetting / backward transfer.
Table ``main.continual_results`` (contract in ``recsys.dashboard.data``)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import streamlit as st

from recsys.dashboard import cache, charts, data


def _guidance(path: Path) -> None:
    where = "this warehouse" if path.is_file() else f"`{path}` (the file does not exist yet)"
    st.info(
        f"No continual-training results in {where}: the table `main.{data.CONTINUAL_TABLE}` is absent or "
        "empty. The continual-training experiment writes it (one row per experiment, method, period just "
        "learned and period evaluated) through `Warehouse.publish`; run it into this warehouse, then reload."
    )
    with st.expander("Continual results contract"):
        st.markdown(data.continual_contract_markdown())


def main() -> None:
    path = Path(st.session_state.get("warehouse_path") or data.default_warehouse_path())
    st.title("Continual training")
    try:
        results = cache.read(data.continual_results, path)
    except data.ContractError as exc:
        st.error(str(exc))
        return
    if results.is_empty():
        _guidance(path)
        return

    experiments = results.group_by("experiment_id", maintain_order=True).agg(pl.col("dataset").first())
    labels = {
        f"{r['experiment_id']} ({r['dataset'] or 'dataset not recorded'})": r["experiment_id"]
        for r in experiments.iter_rows(named=True)
    }
    top = st.columns([2, 1])
    eid = labels[top[0].selectbox("Experiment", list(labels), key="continual_experiment")]
    rows = results.filter(pl.col("experiment_id") == eid)
    metrics = [m for m in data.CONTINUAL_METRICS if rows[m].null_count() < rows.height]
    metric = top[1].selectbox("Metric", metrics, key=f"continual_metric_{eid}")

    summary = data.continual_summary(rows, metric)
    st.caption(
        f"{summary.height} method(s) · periods {rows['eval_period'].min()}–{rows['eval_period'].max()} · "
        "figures from `recsys.evaluation.forgetting`: new-period = mean score on the period just learned; "
        "forgetting = best score on an earlier period minus the final model's score there (Chaudhry et al.); "
        "BWT = final minus just-learned score, averaged over earlier periods (negative = forgetting)."
    )
    for row in summary.filter(pl.col("issue").is_not_null()).iter_rows(named=True):
        st.warning(f"{row['method']}: no summary yet, the matrix is incomplete ({row['issue']}).")
    st.dataframe(
        summary.drop("issue"),
        hide_index=True,
        column_config={
            "periods": st.column_config.NumberColumn("periods learned"),
            "new_period": st.column_config.NumberColumn(f"new-period {metric}", format="%.4f"),
            "final_mean": st.column_config.NumberColumn(f"final mean {metric}", format="%.4f"),
            "avg_forgetting": st.column_config.NumberColumn("avg forgetting", format="%.4f"),
            "bwt": st.column_config.NumberColumn("BWT", format="%+.4f"),
            "train_seconds": st.column_config.NumberColumn("train time (s)", format="%.1f"),
        },
    )

    st.header("Forgetting matrix")
    st.caption(
        f"Row: the model after learning that period; column: the period evaluated; cell: {metric}. The "
        "diagonal is the period just learned; below it, how well the model still does on older periods."
    )
    st.altair_chart(charts.forgetting_heatmaps(rows, metric))

    st.header("Final model per period")
    st.altair_chart(charts.final_by_period(rows, metric))

    curve = data.seen_average(rows, metric)
    if not curve.is_empty():
        st.header("Average over the periods learned so far")
        st.altair_chart(charts.seen_average(curve, metric))

    with st.expander("All rows"):
        st.dataframe(rows.drop("experiment_id"), hide_index=True)


main()
