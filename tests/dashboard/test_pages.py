"""Every dashboard page through streamlit.testing's AppTest, on the test warehouse and on an empty one."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest

from recsys.dashboard import data
from tests.dashboard.test_data import (
    CONTINUAL_AUC,
    DISTILL_TEST_AUC,
    RETRIEVAL_TEST_NDCG,
    USER_ACTIVITY,
    Built,
    built_warehouse,
)

APP = str(Path(__file__).resolve().parents[2] / "recsys" / "dashboard" / "app.py")
TIMEOUT = 120  # generous: the first run imports the app's modules on a loaded 2-core box


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return built_warehouse(tmp_path_factory)


def _app(monkeypatch: pytest.MonkeyPatch, path: Path, page: str | None = None) -> AppTest:
    monkeypatch.setenv(data.WAREHOUSE_ENV, str(path))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    if page is not None:
        at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _charts(at: AppTest) -> list[dict]:
    return [json.loads(el.proto.spec) for el in at.get("vega_lite_chart")]


def _chart_rows(at: AppTest) -> list[pl.DataFrame]:
    """The data behind every chart on the page (Arrow IPC in the chart protos)."""
    frames = []
    for el in at.get("vega_lite_chart"):
        for ds in el.proto.datasets:
            frames.append(pl.from_arrow(pa.ipc.open_stream(ds.data.data).read_all()))
    return frames


def _selectbox(at: AppTest, label: str):  # noqa: ANN202 - streamlit's widget type
    found = [s for s in at.selectbox if s.label == label]
    assert found, f"no selectbox {label!r}; have {[s.label for s in at.selectbox]}"
    return found[0]


def test_runs_page_lists_runs_and_shows_details(monkeypatch: pytest.MonkeyPatch, built: Built) -> None:
    at = _app(monkeypatch, built.path)
    assert at.title[0].value == "Runs"
    assert [m.label for m in at.multiselect] == ["Kind", "Name", "Status", "Dataset"]
    table = at.dataframe[0].value
    assert len(table) == 13 and set(table["run_id"]) == set(data.list_runs(built.path)["run_id"])
    assert any("distill 2" in c.value for c in at.caption)

    at.multiselect[0].set_value(["distill"]).run()  # kind filter
    assert not at.exception
    assert sorted(at.dataframe[0].value["seed"]) == [1, 2]
    assert json.loads(at.json[0].proto.body)["teacher"] == {"models": ["hyformer"]}
    at.multiselect[0].set_value([]).run()

    run_id = built.run_ids["hstu-1"]
    _selectbox(at, "Run details").set_value(run_id).run()
    assert not at.exception
    assert any(s.value == "hstu" or "hstu" in s.value for s in at.subheader)
    assert at.json and json.loads(at.json[0].proto.body)["model"] == "hstu"
    specs = _charts(at)
    assert specs and "facet" in specs[0]  # the per-epoch panels
    curves = pl.concat(_chart_rows(at), how="diagonal_relaxed")
    assert set(curves["series"]) == {"train/loss", "valid/ndcg@10", "valid/hr@10"}

    at.multiselect[2].set_value(["failed"]).run()  # status filter
    assert len(at.dataframe[0].value) == 1
    assert any("loss is nan" in e.value for e in at.error)


def _mean(model: str) -> float:
    values = [v for (m, _), v in RETRIEVAL_TEST_NDCG.items() if m == model]
    return sum(values) / len(values)


def test_offline_page_compares_models_on_a_chosen_metric(
    monkeypatch: pytest.MonkeyPatch, built: Built
) -> None:
    at = _app(monkeypatch, built.path, "views/offline.py")
    metric = _selectbox(at, "Metric")
    assert metric.value == "test/ndcg@10"
    assert {"test/hr@10", "test/mrr@10", "valid/ndcg@10"} <= set(metric.options)
    assert not any("slice" in m for m in metric.options)
    summary = at.dataframe[0].value
    hstu = summary[summary["name"] == "hstu"].iloc[0]
    assert hstu["n_seeds"] == 3 and hstu["mean"] == pytest.approx(_mean("hstu"), abs=1e-5)
    assert len(_charts(at)) == 3  # the group's error-bar chart, the slices and the training curves
    assert _selectbox(at, "Curve metric").value == "valid/ndcg@10"

    # Slices: user activity buckets in numeric order, hstu's mean per bucket = factor x its test ndcg mean.
    assert _selectbox(at, "Slice").options == ["cold_start_items", "user_activity"]
    _selectbox(at, "Slice").set_value("user_activity").run()
    assert _selectbox(at, "Slice metric").value == "ndcg@10"
    bars = next(f for f in _chart_rows(at) if "bucket" in f.columns)
    hstu_bars = bars.filter(pl.col("name") == "hstu").sort("bucket_order")
    assert hstu_bars["bucket"].to_list() == ["1-5", "6-20", "21+"]
    assert hstu_bars["mean"].to_list() == pytest.approx(
        [USER_ACTIVITY[b][0] * _mean("hstu") for b in ("1-5", "6-20", "21+")]
    )

    assert not at.checkbox  # no distilled student shares a retrieval group

    metric = _selectbox(at, "Metric")
    metric.set_value("test/hr@10").run()
    assert at.dataframe[0].value["mean"].max() == pytest.approx(
        2 * max(_mean("hstu"), _mean("sasrec")), abs=1e-5
    )
    assert _selectbox(at, "Curve metric").value == "valid/hr@10"

    _selectbox(at, "Kind").set_value("ranking").run()
    assert not at.exception
    assert _selectbox(at, "Metric").value == "test/auc"
    summary = at.dataframe[0].value.set_index("name")
    assert summary.loc["din", "mean"] == pytest.approx(0.72)
    student = summary.loc["din-distilled"]  # the distilled student beside the model trained without a teacher
    assert student["n_seeds"] == 2 and student["mean"] == pytest.approx(sum(DISTILL_TEST_AUC.values()) / 2)
    assert any("No slice metrics recorded" in c.value for c in at.caption)
    at.checkbox[0].uncheck().run()  # without the distilled students
    assert list(at.dataframe[0].value["name"]) == ["din"]


def test_continual_page_shows_forgetting_matrices(monkeypatch: pytest.MonkeyPatch, built: Built) -> None:
    at = _app(monkeypatch, built.path, "views/continual.py")
    assert at.title[0].value == "Continual training"
    assert _selectbox(at, "Experiment").value == "cont-1 (synthetic)"
    assert _selectbox(at, "Metric").options == ["auc", "gauc"]
    summary = at.dataframe[0].value.set_index("method")
    assert summary.loc["incremental", "avg_forgetting"] == pytest.approx((0.08 + 0.055 + 0.03) / 3)
    assert summary.loc["replay", "final_mean"] == pytest.approx(sum(CONTINUAL_AUC["replay"][-1]) / 4)
    specs = _charts(at)
    assert len(specs) == 3 and "facet" in specs[0]  # heatmaps, final per period, average so far
    rows = _chart_rows(at)
    heat = next(f for f in rows if {"step", "eval_period", "value"} <= set(f.columns))
    cell = heat.filter(
        (pl.col("method") == "incremental") & (pl.col("step") == 3) & (pl.col("eval_period") == 2)
    )
    assert cell["value"].to_list() == pytest.approx([CONTINUAL_AUC["incremental"][2][1]])
    assert heat.height == 2 * (1 + 2 + 3 + 4)

    _selectbox(at, "Metric").set_value("gauc").run()
    assert not at.exception
    heat = next(f for f in _chart_rows(at) if {"step", "eval_period", "value"} <= set(f.columns))
    assert heat["value"].max() == pytest.approx(0.79 - 0.05)


def test_continual_page_names_a_broken_table(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from recsys.warehouse import Warehouse
    from tests.dashboard.test_data import continual_frame

    path = tmp_path / "wh.duckdb"
    with Warehouse(path) as wh:
        wh.publish("continual_results", continual_frame().drop("auc"))
    at = _app(monkeypatch, path, "views/continual.py")
    assert any("missing required column(s) ['auc']" in e.value for e in at.error)

    partial = tmp_path / "partial.duckdb"  # a run still going: step 4 has evaluated only period 1 so far
    with Warehouse(partial) as wh:
        wh.publish(
            "continual_results", continual_frame().filter((pl.col("step") < 4) | (pl.col("eval_period") == 1))
        )
    at = _app(monkeypatch, partial, "views/continual.py")
    assert [w.value.split(":")[0] for w in at.warning] == ["incremental", "replay"]
    assert len(_charts(at)) == 3  # the matrices are still drawn


def test_ab_page_renders_lift_sequential_srm_and_off_policy(
    monkeypatch: pytest.MonkeyPatch, built: Built
) -> None:
    at = _app(monkeypatch, built.path, "views/ab_results.py")
    assert _selectbox(at, "Experiment").value == "ranker v2 vs v1 (exp-ok)"
    assert any(s.value.startswith("SRM check passed") for s in at.success)
    assert [h.value for h in at.header] == [
        "Sample-ratio mismatch",
        "Lift per metric",
        "Sequential test over time",
        "Off-policy estimates",
    ]
    assert len(_charts(at)) == 5  # SRM counts, lift, p-value, always-valid CI, off-policy
    rows = _chart_rows(at)
    lift = next(f for f in rows if "estimate" in f.columns)
    ctr = built.comparisons.filter(pl.col("metric") == "ctr")["lift"][0]
    assert set(lift["estimate"]) == {"raw (Welch)", "CUPED"}
    assert lift.filter((pl.col("metric") == "ctr") & (pl.col("estimate") == "raw (Welch)"))["lift"][
        0
    ] == pytest.approx(ctr)
    ope = next(f for f in rows if "true_value" in f.columns)
    assert ope["true_value"].to_list() == pytest.approx([built.true_value] * 3)
    assert _selectbox(at, "Sequential metric").value == "ctr"

    _selectbox(at, "Experiment").set_value("broken split (exp-srm)").run()
    assert not at.exception
    assert any(e.value.startswith("SRM flagged") for e in at.error)
    assert any("No comparisons recorded" in c.value for c in at.caption)


def test_serving_page_charts_benchmark_latency(monkeypatch: pytest.MonkeyPatch, built: Built) -> None:
    at = _app(monkeypatch, built.path, "views/serving.py")
    assert [h.value for h in at.header] == ["Latency", "Throughput"]
    assert len(_charts(at)) == 2
    table = at.dataframe[0].value
    rank = table[table["scenario"] == "rank"].iloc[0]
    assert rank["p50"] == pytest.approx(30.0) and rank["p99"] == pytest.approx(90.0)


@pytest.mark.parametrize(
    ("page", "hint"),
    [
        (None, "recsys pipeline"),
        ("views/offline.py", "recsys pipeline"),
        ("views/ab_results.py", "ab_experiments"),
        ("views/serving.py", "recsys.benchmarks.serving_load"),
        ("views/continual.py", "continual_results"),
        ("views/evidence.py", "RunLog"),
        ("views/dataset.py", "recsys pipeline"),
        ("views/user.py", "recsys pipeline"),
    ],
)
def test_an_empty_warehouse_shows_guidance(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, page: str | None, hint: str
) -> None:
    at = _app(monkeypatch, tmp_path / "missing.duckdb", page)
    assert any(hint in i.value for i in at.info), [i.value for i in at.info]
    assert not _charts(at)
    assert any("No warehouse file" in w.value for w in at.sidebar.warning)
