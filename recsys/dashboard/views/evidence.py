"""Evidence: the model comparisons the recorded runs support -- per group of comparable runs, the comparison
table, paired tests over seeds with a verdict, quality against cost (scaling), the goals experiments
recorded themselves, and the markdown reports they wrote. Computed by ``recsys.dashboard.evidence``."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import streamlit as st

from recsys.dashboard import cache, charts, data, evidence


def _group_section(final: pl.DataFrame, kind: str, group: str, metric: str, alpha: float) -> None:
    st.subheader(group)
    present = data.metric_names(final.filter((pl.col("kind") == kind) & (pl.col("group") == group)))
    shown = [metric] + [m for m in data.DEFAULT_METRICS if m in present and m != metric][:3]
    table = evidence.comparison_table(final, kind, group, shown)
    st.dataframe(
        table,
        hide_index=True,
        column_config={
            c: st.column_config.NumberColumn(format="%.4g")
            for c in evidence.COSTS.values()
            if c in table.columns
        },
    )
    tests = evidence.paired_tests(final.filter(pl.col("group") == group), metric, alpha).filter(
        pl.col("kind") == kind
    )
    if tests.is_empty():
        st.caption("Only one model in this group: nothing to compare.")
        return
    st.dataframe(
        tests.select("a", "b", "seeds", "mean_a", "mean_b", "diff", "p_value", "verdict"),
        hide_index=True,
        column_config={
            "a": st.column_config.TextColumn("model a (better mean)"),
            "b": st.column_config.TextColumn("model b"),
            "mean_a": st.column_config.NumberColumn(format="%.4f"),
            "mean_b": st.column_config.NumberColumn(format="%.4f"),
            "diff": st.column_config.NumberColumn("a - b", format="%+.4f"),
            "p_value": st.column_config.NumberColumn("p (paired t over seeds)", format="%.3g"),
            "verdict": st.column_config.TextColumn("verdict", width="large"),
        },
    )


def main() -> None:
    path = Path(st.session_state.get("warehouse_path") or data.default_warehouse_path())
    st.title("Evidence")
    final = cache.read(data.final_metrics, path)
    if final.is_empty():
        st.info(
            "No finished run with metrics yet. The experiments (`recsys pipeline`, `recsys retrieval run`, "
            "`recsys ranking run`, the distillation and continual-training experiments) record every run "
            "through `RunLog`; their comparisons, tests and scaling show up here."
        )
        return
    kinds = sorted(final["kind"].unique().to_list())
    preferred = next((k for k in ("retrieval", "ranking") if k in kinds), kinds[0])
    top = st.columns([1, 2, 1])
    kind = top[0].selectbox("Kind", kinds, index=kinds.index(preferred), key="evidence_kind")
    of_kind = final.filter(pl.col("kind") == kind)
    names = data.metric_names(of_kind)
    metric = top[1].selectbox("Metric", names, index=0, key=f"evidence_metric_{kind}")
    alpha = top[2].number_input("alpha", 0.001, 0.5, 0.05, 0.01, format="%.3f", key="evidence_alpha")
    st.caption(
        "Groups hold runs of the same dataset, protocol and data version. Each pair of models is tested with "
        "a paired t-test over the seeds both ran (runs paired by seed; the latest run of a repeated seed "
        "counts); one shared seed allows no test. The metric's direction comes from its name (losses, "
        "errors and costs: lower is better)."
    )

    st.header("Comparisons")
    for group in of_kind["group"].unique(maintain_order=True).to_list():
        _group_section(of_kind, kind, group, metric, alpha)

    st.header("Scaling: quality against cost")
    cost_names = [
        c
        for c in evidence.COSTS
        if c in set(final["metric"].to_list())
        or any(m.endswith(f"/{c}") for m in final["metric"].unique().to_list())
    ]
    if not cost_names:
        st.caption("No run recorded its cost (`num_parameters`, `flops_per_example`, `time_to_quality_s`).")
    else:
        cost = st.radio(
            "Cost", cost_names, format_func=lambda c: evidence.COSTS[c], horizontal=True, key="evidence_cost"
        )
        points = evidence.scaling_points(of_kind, metric, cost)
        if points.is_empty():
            st.caption(
                f"No {kind} run recorded both `{metric}` and `{cost}` (points with zero cost are left out)."
            )
        else:
            # Group names are whole protocols: the legend names them by number, spelled out below.
            numbers = {g: f"group {i}" for i, g in enumerate(points["group"].unique(maintain_order=True), 1)}
            points = points.with_columns(pl.col("group").replace_strict(numbers).alias("group_no"))
            st.altair_chart(charts.scaling(points, metric, evidence.COSTS[cost]))
            st.caption(
                "One point per model (mean over seeds); summary runs add one per role they record "
                "(`<role>/<metric>` beside `<role>/<cost>`); models of zero cost (popularity) are left "
                "off the log scale.  \n" + "  \n".join(f"**{n}**: {g}" for g, n in numbers.items())
            )

    st.header("Goals the experiments recorded")
    verdicts = evidence.recorded_verdicts(cache.read(data.list_runs, path))
    if verdicts.is_empty():
        st.caption("No run recorded a goal (a metric `goal_met` or `<name>_met`).")
    for r in verdicts.iter_rows(named=True):
        line = f"{r['kind']} · {r['name']} · {r['dataset']}: `{r['goal']}` " + (
            "met" if r["met"] else "NOT met"
        )
        line += f" ({r['figures']})" if r["figures"] else ""
        (st.success if r["met"] else st.error)(line)

    reports = evidence.reports(path.parent)
    st.header("Reports")
    if not reports:
        st.caption(f"No markdown report under `{path.parent}` (`reports/`, `artifacts/**/report_*.md`).")
    for report in reports:
        with st.expander(f"{report.relative_to(path.parent)}"):
            st.markdown(report.read_text())


main()
