"""Altair charts of the dashboard; each takes a frame from ``recsys.dashboard.data`` and returns a chart.

Charts receive Polars frames directly (Altair reads them through the dataframe interchange protocol). Values
that JSON cannot carry (NaN, infinities) are turned into nulls before plotting, so a chart never fails to
serialise on a look before the mSPRT burn-in or a run with a diverged metric.
"""

from __future__ import annotations

import altair as alt
import polars as pl

_WIDTH = "container"
STAT_ORDER = ("p50", "p90", "p95", "p99", "p99.9", "mean", "max")


def _finite(frame: pl.DataFrame, *columns: str) -> pl.DataFrame:
    return frame.with_columns(
        pl.when(pl.col(c).is_finite()).then(pl.col(c)).otherwise(None).alias(c)
        for c in columns
        if c in frame.columns
    )


def metric_by_model(summary: pl.DataFrame, runs: pl.DataFrame, metric: str) -> alt.LayerChart:
    """One group of comparable runs: mean ± std across seeds per model (bar + error bar), each seed a dot.

    summary: ``data.summarise`` rows of one group; runs: the ``data.final_metrics`` rows of that group and
    metric (the individual seeds).
    """
    summary = _finite(summary, "mean", "lo", "hi")
    runs = _finite(runs, "value")
    order = summary.sort("mean", descending=True, nulls_last=True)["name"].to_list()  # best model first
    x = alt.X(
        "name:N",
        title="model",
        sort=order,
        axis=alt.Axis(labelAngle=0, labelLimit=0),
    )
    base = alt.Chart(summary).encode(x=x)
    bars = base.mark_bar(opacity=0.55).encode(
        y=alt.Y("mean:Q", title=f"{metric} (mean ± std over seeds)", scale=alt.Scale(zero=False)),
        color=alt.Color("name:N", legend=None),
        tooltip=[
            "name:N",
            alt.Tooltip("mean:Q", format=".4f"),
            alt.Tooltip("std:Q", format=".4f"),
            "n_seeds:Q",
        ],
    )
    errors = base.mark_errorbar(ticks=True, size=18, thickness=1.5).encode(
        y=alt.Y("lo:Q", title=""), y2="hi:Q", color=alt.value("black")
    )
    seeds = (
        alt.Chart(runs)
        .mark_circle(size=45, color="black", opacity=0.8)
        .encode(
            x=alt.X("name:N", sort=order),
            y=alt.Y("value:Q"),
            tooltip=["name:N", "seed:Q", alt.Tooltip("value:Q", format=".4f"), "run_id:N"],
        )
    )
    return alt.layer(bars, errors, seeds).properties(width=_WIDTH, height=320)


def training_curves(curves: pl.DataFrame, series: str) -> alt.Chart:
    """``series`` (``split/name``) per step, one line per run."""
    rows = _finite(curves.filter(pl.col("series") == series), "value")
    return (
        alt.Chart(rows)
        .mark_line(point=True)
        .encode(
            x=alt.X("step:Q", title="epoch / step", axis=alt.Axis(tickMinStep=1, format="d")),
            y=alt.Y("value:Q", title=series, scale=alt.Scale(zero=False)),
            color=alt.Color("label:N", title="run", legend=alt.Legend(labelLimit=0)),
            tooltip=["label:N", "step:Q", alt.Tooltip("value:Q", format=".4f")],
        )
        .properties(width=_WIDTH, height=320)
    )


def run_curves(curves: pl.DataFrame) -> alt.Chart:
    """Every series of one run over its steps, one small panel per series (scales independent)."""
    rows = _finite(curves, "value")
    return (
        alt.Chart(rows)
        .mark_line(point=True)
        .encode(
            x=alt.X("step:Q", title="epoch / step", axis=alt.Axis(tickMinStep=1, format="d")),
            y=alt.Y("value:Q", title=None, scale=alt.Scale(zero=False)),
            tooltip=["series:N", "step:Q", alt.Tooltip("value:Q", format=".4f")],
        )
        .properties(width=220, height=140)
        .facet(facet=alt.Facet("series:N", title=None), columns=3)
        .resolve_scale(y="independent")
    )


def lift_with_ci(comparisons: pl.DataFrame) -> alt.LayerChart:
    """Relative lift with its CI per metric and treatment arm, raw Welch next to CUPED where recorded."""
    raw = comparisons.select(
        "metric",
        "arm",
        pl.lit("raw (Welch)").alias("estimate"),
        pl.col("lift"),
        pl.col("ci_low"),
        pl.col("ci_high"),
        pl.col("p_value"),
    )
    cuped = comparisons.filter(pl.col("cuped_lift").is_not_null()).select(
        "metric",
        "arm",
        pl.lit("CUPED").alias("estimate"),
        pl.col("cuped_lift").alias("lift"),
        pl.col("cuped_ci_low").alias("ci_low"),
        pl.col("cuped_ci_high").alias("ci_high"),
        pl.col("cuped_p_value").alias("p_value"),
    )
    rows = _finite(pl.concat([raw, cuped]), "lift", "ci_low", "ci_high").with_columns(
        (pl.col("metric") + " · " + pl.col("arm")).alias("row")
    )
    base = alt.Chart(rows).encode(
        y=alt.Y("row:N", title="metric · arm", axis=alt.Axis(labelLimit=0)),
        yOffset=alt.YOffset("estimate:N"),
        color=alt.Color("estimate:N", title="estimate", sort=["raw (Welch)", "CUPED"]),
    )
    tooltip = [
        "metric:N",
        "arm:N",
        "estimate:N",
        alt.Tooltip("lift:Q", format="+.2%"),
        alt.Tooltip("ci_low:Q", format="+.2%"),
        alt.Tooltip("ci_high:Q", format="+.2%"),
        alt.Tooltip("p_value:Q", format=".4f"),
    ]
    interval = base.mark_rule(strokeWidth=2).encode(
        x=alt.X("ci_low:Q", title="relative lift (CI)", axis=alt.Axis(format="+%")), x2="ci_high:Q"
    )
    point = base.mark_point(filled=True, size=70).encode(x="lift:Q", tooltip=tooltip)
    zero = alt.Chart(pl.DataFrame({"x": [0.0]})).mark_rule(strokeDash=[4, 4], color="gray").encode(x="x:Q")
    return alt.layer(interval, point, zero).properties(width=_WIDTH, height=max(120, 60 * rows.height))


def sequential_p_values(sequential: pl.DataFrame, alpha: float) -> alt.LayerChart:
    """The always-valid mSPRT p-value over simulated time (log scale), with the naive Welch p for contrast
    when recorded, and the significance level as a dashed line."""
    x_field, x_title = (
        ("sim_day", "simulated day")
        if sequential["sim_day"].null_count() == 0
        else (
            "users",
            "users arrived",
        )
    )
    parts = [
        sequential.select(x_field, "arm", pl.lit("mSPRT (always valid)").alias("test"), "p_value"),
    ]
    if sequential["naive_p_value"].null_count() < sequential.height:
        parts.append(
            sequential.select(
                x_field, "arm", pl.lit("naive Welch (peeking)").alias("test"), pl.col("naive_p_value")
            ).rename({"naive_p_value": "p_value"})
        )
    # p = 0 cannot sit on a log axis; clamp to a floor the eye reads as "tiny".
    rows = _finite(pl.concat(parts), "p_value").with_columns(pl.col("p_value").clip(lower_bound=1e-6))
    lines = (
        alt.Chart(rows)
        .mark_line()
        .encode(
            x=alt.X(f"{x_field}:Q", title=x_title),
            y=alt.Y("p_value:Q", title="p-value", scale=alt.Scale(type="log")),
            color=alt.Color("test:N", title="test"),
            strokeDash=alt.StrokeDash("arm:N", title="arm", legend=alt.Legend(labelLimit=0)),
            tooltip=[f"{x_field}:Q", "arm:N", "test:N", alt.Tooltip("p_value:Q", format=".4g")],
        )
    )
    level = (
        alt.Chart(pl.DataFrame({"alpha": [alpha]}))
        .mark_rule(color="red", strokeDash=[4, 4])
        .encode(y="alpha:Q", tooltip=[alt.Tooltip("alpha:Q", title="alpha")])
    )
    return alt.layer(lines, level).properties(width=_WIDTH, height=300)


def sequential_interval(sequential: pl.DataFrame) -> alt.LayerChart:
    """The always-valid CI of the difference narrowing over the looks, with the running estimate."""
    x_field, x_title = (
        ("sim_day", "simulated day")
        if sequential["sim_day"].null_count() == 0
        else (
            "users",
            "users arrived",
        )
    )
    rows = _finite(sequential, "diff", "ci_low", "ci_high")
    base = alt.Chart(rows).encode(
        x=alt.X(f"{x_field}:Q", title=x_title), color=alt.Color("arm:N", legend=alt.Legend(labelLimit=0))
    )
    band = base.mark_area(opacity=0.25).encode(
        y=alt.Y("ci_low:Q", title="difference mean_t - mean_c (always-valid CI)"), y2="ci_high:Q"
    )
    line = base.mark_line().encode(y="diff:Q")
    zero = alt.Chart(pl.DataFrame({"y": [0.0]})).mark_rule(strokeDash=[4, 4], color="gray").encode(y="y:Q")
    return alt.layer(band, line, zero).properties(width=_WIDTH, height=260)


def srm_counts(srm: pl.DataFrame) -> alt.Chart:
    """Observed users per arm next to the design's expectation."""
    rows = pl.concat(
        [
            srm.select("arm", pl.lit("observed").alias("count"), pl.col("observed").cast(pl.Float64)),
            srm.select("arm", pl.lit("expected").alias("count"), pl.col("expected").alias("observed")),
        ]
    ).rename({"observed": "users"})
    return (
        alt.Chart(rows)
        .mark_bar()
        .encode(
            x=alt.X("arm:N", title="arm", axis=alt.Axis(labelAngle=0, labelLimit=0)),
            xOffset=alt.XOffset("count:N"),
            y=alt.Y("users:Q", title="users"),
            color=alt.Color("count:N", title=None),
            tooltip=["arm:N", "count:N", alt.Tooltip("users:Q", format=",.0f")],
        )
        .properties(width=_WIDTH, height=240)
    )


def off_policy_estimates(estimates: pl.DataFrame) -> alt.LayerChart:
    """Each estimator's value and CI, with the simulator's true value as a diamond where it is known."""
    rows = _finite(estimates, "value", "ci_low", "ci_high", "true_value").with_columns(
        pl.coalesce(pl.col("policy"), pl.lit("target")).alias("policy")
    )
    base = alt.Chart(rows).encode(y=alt.Y("estimator:N", title="estimator"), yOffset=alt.YOffset("policy:N"))
    interval = base.mark_rule(strokeWidth=2).encode(
        x=alt.X("ci_low:Q", title="policy value (reward per slot)", scale=alt.Scale(zero=False)),
        x2="ci_high:Q",
        color=alt.Color("policy:N", title="target policy", legend=alt.Legend(labelLimit=0)),
    )
    point = base.mark_point(filled=True, size=70).encode(
        x="value:Q",
        color=alt.Color("policy:N"),
        tooltip=[
            "policy:N",
            "estimator:N",
            alt.Tooltip("value:Q", format=".5f"),
            alt.Tooltip("ci_low:Q", format=".5f"),
            alt.Tooltip("ci_high:Q", format=".5f"),
            alt.Tooltip("true_value:Q", format=".5f"),
        ],
    )
    truth = (
        alt.Chart(rows.filter(pl.col("true_value").is_not_null()))
        .mark_point(shape="diamond", size=110, color="red", filled=True)
        .encode(
            x="true_value:Q",
            y="estimator:N",
            yOffset="policy:N",
            tooltip=[alt.Tooltip("true_value:Q", title="simulated truth", format=".5f")],
        )
    )
    return alt.layer(interval, point, truth).properties(width=_WIDTH, height=max(120, 50 * rows.height))


def latency_percentiles(figures: pl.DataFrame) -> alt.Chart:
    """Latency percentiles (ms) per scenario, one bar per benchmark run."""
    rows = _finite(figures.filter(pl.col("measure") == "latency"), "value")
    return (
        alt.Chart(rows)
        .mark_bar()
        .encode(
            x=alt.X(
                "stat:N",
                title="percentile",
                sort=list(STAT_ORDER),
                axis=alt.Axis(labelAngle=0),
            ),
            xOffset=alt.XOffset("label:N"),
            y=alt.Y("value:Q", title="latency (ms)"),
            color=alt.Color("label:N", title="run", legend=alt.Legend(orient="bottom", labelLimit=0)),
            column=alt.Column("scenario:N", title="scenario"),
            tooltip=["label:N", "scenario:N", "stat:N", alt.Tooltip("value:Q", format=".2f"), "hardware:N"],
        )
        .properties(width=260, height=260)
    )


def throughput(figures: pl.DataFrame) -> alt.Chart:
    """Requests per second, one horizontal bar per scenario and benchmark run."""
    rows = _finite(figures.filter(pl.col("measure") == "throughput"), "value").with_columns(
        (pl.col("scenario") + " · " + pl.col("label")).alias("bar")
    )
    return (
        alt.Chart(rows)
        .mark_bar()
        .encode(
            y=alt.Y("bar:N", title=None, axis=alt.Axis(labelLimit=0)),
            x=alt.X("value:Q", title="requests / s"),
            color=alt.Color("label:N", legend=None),
            tooltip=["label:N", "scenario:N", alt.Tooltip("value:Q", format=".1f"), "hardware:N"],
        )
        .properties(width=_WIDTH, height=alt.Step(32))
    )


def slice_by_model(summary: pl.DataFrame, metric: str, dimension: str) -> alt.LayerChart:
    """One group's slice summary (``data.summarise_slices``): per bucket, one bar per model (mean over seeds)
    with a ± std whisker; buckets in ``bucket_order``."""
    rows = _finite(summary, "mean", "lo", "hi")
    order = rows.sort("bucket_order")["bucket"].unique(maintain_order=True).to_list()
    base = alt.Chart(rows).encode(
        x=alt.X("bucket:N", title=dimension, sort=order, axis=alt.Axis(labelAngle=0)),
        xOffset=alt.XOffset("name:N"),
    )
    bars = base.mark_bar(opacity=0.7).encode(
        y=alt.Y("mean:Q", title=f"{metric} (mean ± std over seeds)"),
        color=alt.Color("name:N", title="model", legend=alt.Legend(labelLimit=0)),
        tooltip=[
            "bucket:N",
            "name:N",
            alt.Tooltip("mean:Q", format=".4f"),
            alt.Tooltip("std:Q", format=".4f"),
            "n_seeds:Q",
            alt.Tooltip("n:Q", title="users / examples", format=",.0f"),
        ],
    )
    errors = base.mark_errorbar(ticks=True, size=10, thickness=1.5).encode(
        y=alt.Y("lo:Q", title=""), y2="hi:Q", color=alt.value("black")
    )
    return alt.layer(bars, errors).properties(width=_WIDTH, height=300)


def forgetting_heatmaps(results: pl.DataFrame, metric: str) -> alt.FacetChart:
    """The matrix R[step learned, period evaluated] of ``metric``, one heatmap per method on a shared colour
    scale, each cell labelled with its value."""
    rows = _finite(results.filter(pl.col(metric).is_not_null()), metric).select(
        "method", "step", "eval_period", pl.col(metric).alias("value")
    )
    lo, hi = rows["value"].min(), rows["value"].max()
    mid = (lo + hi) / 2 if lo is not None and hi is not None else 0.0
    periods, steps = max(rows["eval_period"].n_unique(), 1), max(rows["step"].n_unique(), 1)
    cell = 56
    base = alt.Chart().encode(
        x=alt.X("eval_period:O", title="period evaluated", axis=alt.Axis(labelAngle=0)),
        y=alt.Y("step:O", title="after learning period"),
    )
    cells = base.mark_rect().encode(
        color=alt.Color("value:Q", title=metric, scale=alt.Scale(scheme="viridis")),
        tooltip=[
            "method:N",
            alt.Tooltip("step:O", title="learned"),
            alt.Tooltip("eval_period:O", title="evaluated"),
            alt.Tooltip("value:Q", title=metric, format=".4f"),
        ],
    )
    text = base.mark_text(fontSize=11).encode(
        text=alt.Text("value:Q", format=".3f"),
        color=alt.condition(alt.datum.value > mid, alt.value("black"), alt.value("white")),
    )
    return (
        alt.layer(cells, text, data=rows)
        .properties(width=cell * periods, height=cell * steps)
        .facet(facet=alt.Facet("method:N", title=None, header=alt.Header(labelFontSize=13)), columns=3)
    )


def final_by_period(results: pl.DataFrame, metric: str) -> alt.Chart:
    """``metric`` of each method's final model (after its last step) on every period evaluated."""
    last = results.group_by("method").agg(pl.col("step").max().alias("last"))
    rows = _finite(
        results.join(last, on="method").filter(
            (pl.col("step") == pl.col("last")) & pl.col(metric).is_not_null()
        ),
        metric,
    ).select("method", "eval_period", pl.col(metric).alias("value"), "n_examples")
    return (
        alt.Chart(rows)
        .mark_line(point=True)
        .encode(
            x=alt.X("eval_period:O", title="period evaluated", axis=alt.Axis(labelAngle=0)),
            y=alt.Y("value:Q", title=f"{metric} of the final model", scale=alt.Scale(zero=False)),
            color=alt.Color("method:N", title="method", legend=alt.Legend(labelLimit=0)),
            tooltip=[
                "method:N",
                "eval_period:O",
                alt.Tooltip("value:Q", title=metric, format=".4f"),
                alt.Tooltip("n_examples:Q", format=",.0f"),
            ],
        )
        .properties(width=_WIDTH, height=280)
    )


def seen_average(curve: pl.DataFrame, metric: str) -> alt.Chart:
    """``data.seen_average``: mean ``metric`` over the periods learned so far, per step and method."""
    return (
        alt.Chart(_finite(curve, "value"))
        .mark_line(point=True)
        .encode(
            x=alt.X("step:O", title="after learning period", axis=alt.Axis(labelAngle=0)),
            y=alt.Y("value:Q", title=f"mean {metric} over periods learned", scale=alt.Scale(zero=False)),
            color=alt.Color("method:N", title="method", legend=alt.Legend(labelLimit=0)),
            tooltip=["method:N", "step:O", "periods:Q", alt.Tooltip("value:Q", format=".4f")],
        )
        .properties(width=_WIDTH, height=280)
    )


# -- Dataset page ------------------------------------------------------------------------------------------


def events_over_time(rows: pl.DataFrame, grain: str) -> alt.Chart:
    """Events per period (``explore.events_over_time``), stacked by event type."""
    return (
        alt.Chart(rows)
        .mark_bar()
        .encode(
            x=alt.X("period:T", title=f"{grain} (UTC)"),
            y=alt.Y("events:Q", title="events", stack=True),
            color=alt.Color("event:N", title="event", legend=alt.Legend(labelLimit=0)),
            tooltip=[
                alt.Tooltip("period:T", title=grain),
                "event:N",
                alt.Tooltip("events:Q", format=","),
                alt.Tooltip("users:Q", title="active users", format=","),
            ],
        )
        .properties(width=_WIDTH, height=260)
    )


def rank_frequency(popularity: pl.DataFrame) -> alt.Chart:
    """Events per item against the item's popularity rank, both on log scales: the long tail."""
    rows = popularity.filter(pl.col("events") > 0)
    return (
        alt.Chart(rows)
        .mark_line(point=alt.OverlayMarkDef(size=12))
        .encode(
            x=alt.X("rank:Q", title="item rank by events (log)", scale=alt.Scale(type="log")),
            y=alt.Y("events:Q", title="events (log)", scale=alt.Scale(type="log")),
            tooltip=[
                "rank:Q",
                "item_id:Q",
                alt.Tooltip("events:Q", format=","),
                alt.Tooltip("share:Q", format=".2%"),
            ],
        )
        .properties(width=_WIDTH, height=280)
    )


def cumulative_share(popularity: pl.DataFrame) -> alt.LayerChart:
    """Share of all events held by the most popular x % of the catalogue (the concentration curve), with the
    80 % line."""
    n = max(popularity.height, 1)
    rows = popularity.select(
        (pl.col("rank") / n).alias("item_share"), pl.col("cum_share"), pl.col("rank"), pl.col("item_id")
    )
    curve = (
        alt.Chart(rows)
        .mark_line()
        .encode(
            x=alt.X(
                "item_share:Q", title="most popular items (share of the catalogue)", axis=alt.Axis(format="%")
            ),
            y=alt.Y("cum_share:Q", title="share of all events", axis=alt.Axis(format="%")),
            tooltip=[
                alt.Tooltip("rank:Q", title="top items"),
                alt.Tooltip("item_share:Q", title="of the catalogue", format=".1%"),
                alt.Tooltip("cum_share:Q", title="of the events", format=".1%"),
            ],
        )
    )
    line = alt.Chart(pl.DataFrame({"y": [0.8]})).mark_rule(strokeDash=[4, 4], color="gray").encode(y="y:Q")
    return alt.layer(curve, line).properties(width=_WIDTH, height=280)


def history_lengths(histogram: pl.DataFrame) -> alt.Chart:
    """Users per history-length bin (``explore.length_histogram``), bins in order."""
    return (
        alt.Chart(histogram)
        .mark_bar()
        .encode(
            x=alt.X(
                "bin:N",
                title="events per user",
                sort=histogram["bin"].to_list(),
                axis=alt.Axis(labelAngle=0, labelLimit=0),
            ),
            y=alt.Y("users:Q", title="users"),
            tooltip=[alt.Tooltip("bin:N", title="events"), alt.Tooltip("users:Q", format=",")],
        )
        .properties(width=_WIDTH, height=260)
    )


def rejects_by_reason(counts: pl.DataFrame) -> alt.Chart:
    """Rejected rows per reason (``reason``, ``rows``), one horizontal bar each."""
    return (
        alt.Chart(counts)
        .mark_bar()
        .encode(
            y=alt.Y("reason:N", title=None, sort="-x", axis=alt.Axis(labelLimit=0)),
            x=alt.X("rows:Q", title="rejected rows"),
            tooltip=["reason:N", alt.Tooltip("rows:Q", format=",")],
        )
        .properties(width=_WIDTH, height=alt.Step(28))
    )


# -- Evidence page -----------------------------------------------------------------------------------------


def scaling(points: pl.DataFrame, metric: str, cost_title: str) -> alt.LayerChart:
    """Quality against cost (``evidence.scaling_points`` of one kind with a ``group_no`` column, a short
    name for each group that the page spells out), cost on a log scale, one colour per group, each point
    labelled with its model."""
    rows = _finite(points, "cost", "value")
    base = alt.Chart(rows).encode(
        x=alt.X("cost:Q", title=f"{cost_title} (log)", scale=alt.Scale(type="log")),
        y=alt.Y("value:Q", title=metric, scale=alt.Scale(zero=False)),
    )
    dots = base.mark_circle(size=90).encode(
        color=alt.Color("group_no:N", title="group", legend=alt.Legend(labelLimit=0)),
        tooltip=[
            "model:N",
            "group:N",
            "source:N",
            alt.Tooltip("cost:Q", title=cost_title, format=",.4~g"),
            alt.Tooltip("value:Q", title=metric, format=".4f"),
            "n_seeds:Q",
        ],
    )
    labels = base.mark_text(align="left", dx=7, dy=-6, fontSize=11).encode(text="model:N")
    # A model trained at several sizes (``recsys scaling run`` records ``<model>@<size>``) is one curve.
    family = rows.with_columns(pl.col("model").str.split("@").list.first().alias("family"))
    curves = family.filter(pl.len().over("group_no", "family") > 1).sort("cost")
    if curves.is_empty():
        return alt.layer(dots, labels).properties(width=_WIDTH, height=340)
    lines = (
        alt.Chart(curves)
        .mark_line(strokeDash=[4, 3], opacity=0.7)
        .encode(
            x="cost:Q",
            y="value:Q",
            color=alt.Color("group_no:N"),
            detail="family:N",
            order="cost:Q",
        )
    )
    return alt.layer(lines, dots, labels).properties(width=_WIDTH, height=340)
