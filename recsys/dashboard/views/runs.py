"""Runs: every recorded run with filters, and the details of one (config, metrics, per-epoch curves, data)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import streamlit as st

from recsys.dashboard import cache, charts, data


def _summary(metrics: str | None, limit: int = 4) -> str:
    flat = data.flatten_metrics(metrics)
    preferred = [k for k in data.DEFAULT_METRICS if k in flat]
    keys = (preferred + [k for k in flat if k not in preferred])[:limit]
    return ", ".join(f"{k}={flat[k]:.4g}" for k in keys)


def main() -> None:
    path = Path(st.session_state.get("warehouse_path") or data.default_warehouse_path())
    st.title("Runs")
    runs = cache.read(data.list_runs, path)
    if runs.is_empty():
        where = "the warehouse" if path.is_file() else f"`{path}` (the file does not exist yet)"
        st.info(
            f"No runs recorded in {where}. Training, evaluation and benchmark runs are recorded by "
            "`warehouse.runs.RunLog`; run `.venv/bin/recsys pipeline` (or `recsys retrieval run ...`) to "
            "record some, or point the sidebar at another warehouse file."
        )
        return

    counts = runs.group_by("kind").agg(pl.len().alias("n")).sort("n", "kind", descending=[True, False])
    st.caption(
        "Training (retrieval, ranking), distillation (`distill`), A/B simulation and benchmark runs, "
        "as recorded by `RunLog`: "
        + " · ".join(f"{r['kind']} {r['n']}" for r in counts.iter_rows(named=True))
    )
    cols = st.columns(4)
    filters = {}
    for col, (field, label) in zip(
        cols, (("kind", "Kind"), ("name", "Name"), ("status", "Status"), ("dataset", "Dataset")), strict=True
    ):
        options = sorted(runs[field].drop_nulls().unique().to_list())
        filters[field] = col.multiselect(label, options, key=f"runs_filter_{field}")
    shown = cache.read(
        data.list_runs,
        path,
        kinds=filters["kind"],
        names=filters["name"],
        statuses=filters["status"],
        datasets=filters["dataset"],
    )
    st.caption(f"{shown.height} of {runs.height} runs · newest first · select a row for its details")
    table = shown.select(
        "run_id",
        "kind",
        "name",
        "status",
        "dataset",
        "seed",
        "data_version",
        pl.col("wall_time_s").round(1),
        "hardware",
        "code_version",
        "started_at",
        pl.col("metrics").map_elements(_summary, return_dtype=pl.String).alias("metrics"),
        "config",
    )
    event = st.dataframe(
        table,
        hide_index=True,
        on_select="rerun",
        selection_mode="single-row",
        key="runs_table",
        column_config={
            "wall_time_s": st.column_config.NumberColumn("wall time (s)"),
            "config": st.column_config.TextColumn("config", width="small"),
        },
    )
    if shown.is_empty():
        return

    ids = shown["run_id"].to_list()
    selected_rows = list(getattr(getattr(event, "selection", None), "rows", []) or [])
    index = selected_rows[0] if selected_rows and selected_rows[0] < len(ids) else 0
    run_id = st.selectbox("Run details", ids, index=index)
    run = shown.row(ids.index(run_id), named=True)

    seed = f" · seed {run['seed']}" if run["seed"] is not None else ""
    st.subheader(f"{run['kind']} · {run['name']}{seed}")
    facts = st.columns(4)
    facts[0].metric("status", run["status"])
    facts[1].metric("wall time", f"{run['wall_time_s']:.1f} s" if run["wall_time_s"] is not None else "-")
    facts[2].metric("dataset", run["dataset"])
    facts[3].metric("data version", run["data_version"] or "-")
    st.caption(
        f"protocol: {run['protocol'] or '-'} · hardware: {run['hardware'] or '-'} · "
        f"code: {run['code_version'] or 'not recorded'} · {run['run_id']}"
    )
    if run["error"]:
        st.error(f"The run failed: {run['error']}")
    try:
        experiments = cache.read(data.ab_experiments, path)
    except data.ABContractError:  # the A/B page names the broken table; here it only hides the link
        experiments = pl.DataFrame(schema={"run_id": pl.String, "experiment_id": pl.String})
    linked = experiments.filter(pl.col("run_id") == run_id)["experiment_id"].to_list()
    if linked:
        st.info(f"A/B results of this run: experiment(s) {', '.join(linked)} on the A/B results page.")

    left, right = st.columns(2)
    with left:
        st.markdown("**Config**")
        st.json(json.loads(run["config"]) if run["config"] else {}, expanded=1)
    with right:
        st.markdown("**Final metrics**")
        flat = data.flatten_metrics(run["metrics"])
        st.dataframe(
            pl.DataFrame(
                {"metric": list(flat), "value": list(flat.values())},
                schema={"metric": pl.String, "value": pl.Float64},
            ),
            hide_index=True,
        )

    curves = cache.read(data.run_metrics, path, [run_id])
    st.markdown("**Per-epoch metrics** (`run_metrics`)")
    if curves.is_empty():
        st.caption("This run recorded no per-step metrics.")
    else:
        st.altair_chart(charts.run_curves(curves))
        wide = curves.pivot(on="series", index="step", values="value", aggregate_function="last").sort("step")
        st.dataframe(wide, hide_index=True)

    if run["data_version"]:
        tables = cache.read(data.lineage, path, version=run["data_version"])
        if not tables.is_empty():
            st.caption(
                "data version "
                + run["data_version"]
                + " is "
                + ", ".join(f"`{t}`" for t in tables["table_name"].unique(maintain_order=True))
            )

    with st.expander("Tables and data versions (lineage)"):
        current = cache.read(data.lineage, path)
        if current.is_empty():
            st.caption("No table has been published through Warehouse.publish yet.")
        else:
            st.dataframe(current.drop("inputs", "params"), hide_index=True)


main()
