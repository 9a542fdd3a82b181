"""A/B results: lift with CIs per metric (raw and CUPED), the mSPRT p-value over simulated time, the
sample-ratio check and off-policy estimates next to the simulated truth. Tables: see ``dashboard.data``."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import streamlit as st

from recsys.dashboard import cache, charts, data


def _guidance(path: Path) -> None:
    where = "this warehouse" if path.is_file() else f"`{path}` (the file does not exist yet)"
    st.info(
        f"No A/B results in {where}. They are written by the A/B simulator (`simulation/`) as the tables "
        "`ab_experiments`, `ab_metrics`, `ab_comparisons`, `ab_sequential`, `ab_srm` and `ab_off_policy`, "
        "published with `Warehouse.publish_many`; the statistics come from `recsys.simulation.stats` "
        "(`compare_arms`, `cuped`, `msprt`, `srm_check`) and `simulation.off_policy.evaluate_log`. "
        "Run a simulation into this warehouse, then reload."
    )
    with st.expander("A/B table contract"):
        st.markdown(data.ab_contract_markdown())


def main() -> None:
    path = Path(st.session_state.get("warehouse_path") or data.default_warehouse_path())
    st.title("A/B results")
    try:
        experiments = cache.read(data.ab_experiments, path)
    except data.ABContractError as exc:
        st.error(str(exc))
        return
    if experiments.is_empty():
        _guidance(path)
        return

    labels = {
        f"{r['name'] or r['experiment_id']} ({r['experiment_id']})": r["experiment_id"]
        for r in experiments.iter_rows(named=True)
    }
    chosen = st.selectbox("Experiment", list(labels), key="ab_experiment")
    eid = labels[chosen]
    exp = experiments.filter(pl.col("experiment_id") == eid).row(0, named=True)
    alpha = exp["alpha"] if exp["alpha"] is not None else 0.05
    design = data.parse_design(exp["design"])
    split = " / ".join(f"{arm} {w:g}" for arm, w in design.items())
    # Arm names are long ("<dataset>-<model>"): a table wraps them where st.metric would cut them off.
    treatments = [a for a in (exp["arms"] or list(design)) if a != exp["control"]]
    users = f"{exp['n_users']:,}" if exp["n_users"] is not None else "-"
    st.markdown(
        "| control | treatment arms | users | alpha |\n|---|---|---|---|\n"
        f"| `{exp['control']}` | {', '.join(f'`{a}`' for a in treatments) or '-'} | {users} | {alpha:g} |"
    )
    st.caption(
        f"design {split or '-'} · dataset {exp['dataset'] or '-'} · started {exp['started_at'] or '-'}"
        + (f" · run {exp['run_id']}" if exp["run_id"] else "")
    )

    try:
        srm = cache.read(data.ab_srm, path, eid)
        comparisons = cache.read(data.ab_comparisons, path, eid)
        arms = cache.read(data.ab_metrics, path, eid)
        sequential = cache.read(data.ab_sequential, path, eid)
        ope = cache.read(data.ab_off_policy, path, eid)
    except data.ABContractError as exc:
        st.error(str(exc))
        return

    st.header("Sample-ratio mismatch")
    if srm.is_empty():
        st.caption("No SRM check recorded (`ab_srm`).")
    else:
        p, flagged = float(srm["p_value"][0]), bool(srm["flagged"][0])
        threshold = srm["threshold"][0]
        rule = f" (threshold {threshold:g})" if threshold is not None else ""
        if flagged:
            st.error(
                f"SRM flagged: the users per arm do not match the design, chi-square p = {p:.3g}{rule}. "
                "Assignment or logging is broken; do not trust the effects below."
            )
        else:
            st.success(f"SRM check passed: users per arm match the design, chi-square p = {p:.3g}{rule}.")
        st.altair_chart(charts.srm_counts(srm))

    st.header("Lift per metric")
    if comparisons.is_empty():
        st.caption("No comparisons recorded (`ab_comparisons`).")
    else:
        st.caption(
            f"Relative lift of each treatment arm over {exp['control']} with its {1 - alpha:.0%} CI; CUPED "
            "(pre-period covariate) next to the raw Welch estimate where it was computed."
        )
        st.altair_chart(charts.lift_with_ci(comparisons))
        st.dataframe(
            comparisons.select(
                "metric",
                "arm",
                "lift",
                "ci_low",
                "ci_high",
                "p_value",
                "cuped_lift",
                "cuped_ci_low",
                "cuped_ci_high",
                "cuped_p_value",
                "variance_reduction",
            ),
            hide_index=True,
            column_config={
                c: st.column_config.NumberColumn(format="percent")
                for c in ("lift", "ci_low", "ci_high", "cuped_lift", "cuped_ci_low", "cuped_ci_high")
            }
            | {"variance_reduction": st.column_config.NumberColumn("variance reduction", format="percent")}
            | {c: st.column_config.NumberColumn(format="%.3g") for c in ("p_value", "cuped_p_value")},
        )
    if not arms.is_empty():
        with st.expander("Per-arm means"):
            st.dataframe(arms.drop("experiment_id"), hide_index=True)

    st.header("Sequential test over time")
    if sequential.is_empty():
        st.caption("No sequential looks recorded (`ab_sequential`).")
    else:
        metrics = sequential["metric"].unique(maintain_order=True).to_list()
        metric = st.selectbox("Sequential metric", metrics, key=f"ab_seq_metric_{eid}")
        rows = sequential.filter(pl.col("metric") == metric)
        st.altair_chart(charts.sequential_p_values(rows, alpha))
        for arm in rows["arm"].unique(maintain_order=True).to_list():
            hits = rows.filter((pl.col("arm") == arm) & (pl.col("p_value") <= alpha))
            last = rows.filter(pl.col("arm") == arm).row(-1, named=True)
            if hits.is_empty():
                st.caption(
                    f"{arm}: not significant after {last['users']:,} users (p = {last['p_value']:.3g})."
                )
            else:
                first = hits.row(0, named=True)
                st.caption(
                    f"{arm}: the always-valid p-value crossed {alpha:g} at look {first['look']} "
                    f"({first['users']:,} users); the test could have stopped there."
                )
        if rows["ci_low"].null_count() < rows.height:
            st.altair_chart(charts.sequential_interval(rows))

    st.header("Off-policy estimates")
    if ope.is_empty():
        st.caption("No off-policy estimates recorded (`ab_off_policy`).")
    else:
        st.caption(
            "IPS, SNIPS and doubly robust estimates of the target policy from the logged data, with their "
            "CIs; the red diamond is the simulator's true value."
        )
        st.altair_chart(charts.off_policy_estimates(ope))
        st.dataframe(ope.drop("experiment_id"), hide_index=True)


main()
