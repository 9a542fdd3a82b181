"""The Dataset, User and Evidence pages' logic on small data built here: ``explore`` queries on a hand-made
dataset (events, items, users, rejects, and the indexes ``features.sequences`` builds), ``recommend`` with
models registered in this test session's model store, ``evidence`` on the shared fixture warehouse, the
run registry's dataset and code version, and the cache key; then the three pages through AppTest."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
import torch
from scipy import stats
from streamlit.testing.v1 import AppTest

from recsys.dashboard import charts, data, evidence, explore, recommend
from recsys.features.sequences import build_sequences
from recsys.models.registry import build_model, model_config
from recsys.serving import registry
from recsys.warehouse import Warehouse
from recsys.warehouse.runs import RunLog, code_version, dataset_of
from tests.dashboard.test_data import RETRIEVAL_TEST_NDCG, Built, built_warehouse

APP = str(Path(__file__).resolve().parents[2] / "recsys" / "dashboard" / "app.py")
DAY = 86_400
T0 = 1_700_000_000
# user -> [(item, day offset)], in time order; item 5 is in the catalogue but never seen.
HISTORIES = {
    10: [(1, 0), (2, 1), (1, 2), (3, 3)],
    11: [(1, 0), (2, 0)],
    12: [(4, 5)],
    13: [(1, 1), (2, 2), (3, 3), (4, 4), (1, 6)],
}
CATEGORIES = {1: "books", 2: "games", 3: "books", 4: "music", 5: "music"}


def _events() -> pl.DataFrame:
    rows = [
        (user, item, T0 + day * DAY + i, "click", 1.0 + i)
        for user, events in HISTORIES.items()
        for i, (item, day) in enumerate(events)
    ]
    frame = pl.DataFrame(rows, schema=["user_id", "item_id", "ts", "event", "value"], orient="row")
    return frame.with_row_index("src_row").select(
        "user_id", "item_id", "ts", "event", "value", pl.col("src_row").cast(pl.Int64)
    )


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Dataset ``shop``: the events above, items with a category, users with a segment, two rejects; the
    item/user indexes and sequences built by ``features.sequences``."""
    path = tmp_path_factory.mktemp("explore") / "warehouse.duckdb"
    with Warehouse(path) as wh:
        wh.publish("shop.events", _events())
        wh.publish(
            "shop.items",
            pl.DataFrame({"item_id": list(CATEGORIES), "category": list(CATEGORIES.values())}),
        )
        wh.publish("shop.users", pl.DataFrame({"user_id": list(HISTORIES), "segment": ["a", "b", "a", "b"]}))
        wh.publish(
            "shop.rejects",
            pl.DataFrame(
                {"file": ["e.csv", "e.csv"], "row": [7, 9], "reason": ["missing user_id", "bad ts"]},
                schema={"file": pl.String, "row": pl.Int64, "reason": pl.String},
            ),
        )
        build_sequences(wh, "shop")
    return path


def _sequences_version(path: Path) -> str:
    with Warehouse(path, read_only=True) as wh:
        return wh.version("shop.sequences")


def _catalog(path: Path) -> pl.DataFrame:
    with Warehouse(path, read_only=True) as wh:
        return registry.catalog_from_warehouse(wh, "shop")


@pytest.fixture(scope="module")
def models(shop: Path) -> dict[str, str]:
    """Popularity registered twice (``shop-popularity`` and the serving name ``shop-retriever``: the same
    weights) and an untrained SASRec, in this test session's model store."""
    items = _catalog(shop)
    version = _sequences_version(shop)
    popularity = build_model("popularity", model_config("popularity", num_items=items.height))
    counts = torch.zeros(items.height + 1)
    counts[1:] = torch.tensor(items.sort("item_idx")["popularity"].to_numpy(), dtype=torch.float32)
    popularity.load_counts(counts)
    torch.manual_seed(0)
    sasrec = build_model("sasrec", model_config("sasrec", num_items=items.height, max_len=8, embedding_dim=8))
    common = {"task": "retrieval", "items": items, "data_version": version}
    return {
        "popularity": registry.register_model(
            "shop-popularity", architecture="popularity", model=popularity, **common
        ),
        "retriever": registry.register_model(
            "shop-retriever", architecture="popularity", model=popularity, **common
        ),
        "sasrec": registry.register_model(
            "shop-sasrec", architecture="sasrec", model=sasrec.eval(), **common
        ),
    }


# -- explore -------------------------------------------------------------------------------------------------


def test_overview_counts_the_dataset(shop: Path) -> None:
    assert explore.datasets(shop) == ["shop"]
    ov = explore.overview(shop, "shop")
    n_events = sum(len(h) for h in HISTORIES.values())
    assert (ov.events, ov.users, ov.items, ov.items_with_events) == (n_events, 4, 5, 4)
    assert ov.first_ts == T0 and ov.event_types == {"click": n_events}
    assert explore.time_grain(ov.first_ts, ov.last_ts) == "day"
    assert explore.time_grain(0, 400 * DAY) == "week" and explore.time_grain(0, 5 * 365 * DAY) == "month"
    per_day = explore.events_over_time(shop, "shop", "day")
    assert per_day["events"].sum() == n_events
    assert per_day.filter(pl.col("period") == pl.datetime(2023, 11, 14))["events"].to_list() == [3]
    with pytest.raises(ValueError, match="grain must be"):
        explore.events_over_time(shop, "shop", "hour")
    with pytest.raises(ValueError, match="must be a DuckDB schema name"):
        explore.overview(shop, "shop; DROP TABLE x")


def test_item_popularity_and_long_tail(shop: Path) -> None:
    pop = explore.item_popularity(shop, "shop")
    # item 1: 6 events, 2: 3, 3: 2, 4: 2, 5: 0 (in the catalogue, never seen)
    assert pop["item_id"].to_list() == [1, 2, 3, 4, 5]
    assert pop["events"].to_list() == [5, 3, 2, 2, 0]
    assert pop["cum_share"][-1] == pytest.approx(1.0)
    tail = explore.long_tail(pop)
    assert tail.items == 5 and tail.cold_items == 1 and tail.rare_items == 4
    assert tail.head_items == 2  # 5/12 < 0.5 <= 8/12
    assert tail.top_20pct_share == pytest.approx(5 / 12)
    assert explore.top_items(shop, "shop", 2).select("item_id", "events", "category").rows() == [
        (1, 5, "books"),
        (2, 3, "games"),
    ]


def test_history_lengths_and_rejects(shop: Path) -> None:
    lengths = explore.history_lengths(shop, "shop")
    assert dict(lengths.iter_rows()) == {u: len(h) for u, h in HISTORIES.items()}
    hist = explore.length_histogram(lengths)
    assert hist.select("bin", "users").rows() == [("1", 1), ("2-3", 1), ("4-7", 2)]
    rejects = explore.rejects(shop, "shop")
    assert rejects is not None and rejects["reason"].to_list() == ["missing user_id", "bad ts"]
    with Warehouse(shop.parent / "generated.duckdb") as wh:
        wh.publish("bare.events", _events())
    assert explore.rejects(shop.parent / "generated.duckdb", "bare") is None


def test_user_history_is_in_sequence_order_with_item_attributes(shop: Path) -> None:
    users = explore.users(shop, "shop")
    assert users["user_id"].to_list() == [13, 10, 11, 12]  # most active first
    history = explore.user_history(shop, "shop", 10)
    assert history["item_id"].to_list() == [1, 2, 1, 3]
    assert history["position"].to_list() == [1, 2, 3, 4]
    assert history["category"].to_list() == ["books", "games", "books", "books"]
    assert history["time"][0] == pl.Series([T0 * 1_000_000]).cast(pl.Datetime("us"))[0]
    assert explore.user_profile(shop, "shop", 11) == {"user_id": 11, "segment": "b"}
    assert explore.user_profile(shop, "shop", 99) == {}
    assert _sequences_version(shop) in explore.dataset_versions(shop, "shop")


# -- recommend -----------------------------------------------------------------------------------------------


def test_packaged_models_of_the_dataset_merge_identical_weights(shop: Path, models: dict[str, str]) -> None:
    found = recommend.packaged_models(recommend.list_registered(), explore.dataset_versions(shop, "shop"))
    by_name = {m.name: m for m in found}
    assert set(by_name) == {"shop-retriever", "shop-sasrec"}
    assert by_name["shop-retriever"].aliases == ("shop-popularity",)
    assert by_name["shop-retriever"].label == "shop-retriever (= shop-popularity) · popularity"
    assert by_name["shop-sasrec"].tag == models["sasrec"]
    assert recommend.packaged_models(recommend.list_registered(), ["another-version"]) == []


def test_retrieve_leaves_the_history_out(models: dict[str, str]) -> None:
    popularity = recommend.load(models["popularity"])
    history = HISTORIES[10]
    ids, ts = [i for i, _ in history], [T0 + d * DAY for _, d in history]
    top = recommend.retrieve(popularity, ids, ts, ts[-1] + 1, 10)
    assert top["item_id"].to_list() == [4, 5]  # the unseen items, the one with events first
    assert top["rank"].to_list() == [1, 2]
    sasrec = recommend.load(models["sasrec"])
    ranked = recommend.retrieve(sasrec, ids, ts, ts[-1] + 1, 2)
    assert set(ranked["item_id"].to_list()) == {4, 5}
    assert ranked["score"].is_sorted(descending=True)
    # The score is the user vector at the last position against the item table (cosine).
    catalog = sasrec.catalog
    with torch.inference_mode():
        idx = torch.tensor([[catalog.index[i] for i in ids]])
        times = torch.tensor([ts])
        query = torch.tensor([[*ts[1:], ts[-1] + 1]])
        user = sasrec.module(idx, times, query, torch.tensor([len(ids)]))[0, -1]
        expected = float(user @ sasrec.module.item_vectors()[catalog.index[ranked["item_id"][0]]])
    assert ranked["score"][0] == pytest.approx(expected, abs=1e-5)
    # A history the model knows nothing of gets the popularity prior.
    cold = recommend.retrieve(sasrec, [999], [T0], T0 + 1, 1)
    assert cold["item_id"].to_list() == [1]


def test_rank_orders_candidates_with_a_sequence_model(models: dict[str, str]) -> None:
    sasrec = recommend.load(models["sasrec"])
    history = HISTORIES[13]
    ids, ts = [i for i, _ in history], [T0 + d * DAY for _, d in history]
    ranked = recommend.rank(sasrec, 13, ids, ts, ts[-1] + 1, [5, 2, 999], 5)
    assert set(ranked["item_id"].to_list()) == {5, 2}  # 999 is unknown to the model
    assert ranked["score"].is_sorted(descending=True)


@pytest.fixture(scope="module")
def service() -> Iterator[tuple[str, list[tuple[str, dict, str | None]]]]:
    """A stand-in for the recommendation service on loopback: POST /recommend answers item 7 for any user
    but 404, which gets the 400 a validation error gives; yields its URL and the requests it saw."""
    seen: list[tuple[str, dict, str | None]] = []

    class Service(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            seen.append((self.path, body, self.headers.get(recommend.API_KEY_HEADER)))
            if body["user_id"] == 404:
                self.send_response(400)
                self.end_headers()
                self.wfile.write(b'{"error": "user_id: unknown"}')
                return
            item = {"item_id": 3, "score": 1.5, "position": 0, "propensity": 1.0}
            answer = {"items": [item], "source": "ranker", "models": {"retriever": "r:1", "ranker": "k:1"}}
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(answer).encode())

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Service)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/", seen
    finally:
        server.shutdown()
        server.server_close()


def test_served_posts_the_user_to_the_service(service: tuple[str, list]) -> None:
    url, seen = service
    response = recommend.served(url, 13, 5, api_key="secret")
    assert response["items"][0]["item_id"] == 3 and response["source"] == "ranker"
    assert seen[-1] == ("/recommend", {"user_id": 13, "k": 5}, "secret")
    with pytest.raises(OSError, match="HTTP 400.*user_id: unknown"):
        recommend.served(url, 404, 5)


def test_served_reports_an_unreachable_service() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    with pytest.raises(OSError):
        recommend.served(f"http://127.0.0.1:{port}", 1, 10, timeout_s=2.0)


# -- evidence ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return built_warehouse(tmp_path_factory)


def test_paired_tests_over_seeds_and_verdicts(built: Built) -> None:
    final = data.final_metrics(built.path)
    tests = evidence.paired_tests(final, "test/ndcg@10")
    row = tests.filter(pl.col("kind") == "retrieval").row(0, named=True)
    hstu = [RETRIEVAL_TEST_NDCG[("hstu", s)] for s in (1, 2, 3)]
    sasrec = [RETRIEVAL_TEST_NDCG[("sasrec", s)] for s in (1, 2, 3)]
    expected = stats.ttest_rel(hstu, sasrec)
    assert (row["a"], row["b"], row["seeds"]) == ("hstu", "sasrec", 3)
    assert row["p_value"] == pytest.approx(expected.pvalue)
    assert row["diff"] == pytest.approx(np.mean(hstu) - np.mean(sasrec))
    if expected.pvalue < 0.05:
        assert row["verdict"].startswith("hstu is better")
    else:
        assert row["verdict"].startswith("no significant difference")
    loose = evidence.paired_tests(final, "test/ndcg@10", alpha=0.5).filter(pl.col("kind") == "retrieval")
    assert loose["verdict"][0].startswith("hstu is better")
    # Lower is better for a loss: the model with the smaller log loss is "a".
    assert evidence.direction("test/logloss") == -1 and evidence.direction("test/auc") == 1
    assert evidence.direction("test/calibration") == 0
    assert evidence.verdict("test/auc", "x", "y", 0.7, 0.6, float("nan"), 1, 0.05).startswith("1 shared seed")


def test_comparison_table_and_scaling(built: Built) -> None:
    final = data.final_metrics(built.path)
    group = final.filter(pl.col("kind") == "retrieval")["group"][0]
    table = evidence.comparison_table(final, "retrieval", group, ["test/ndcg@10"])
    assert table["model"].to_list() == ["hstu", "sasrec"]
    mean = np.mean([RETRIEVAL_TEST_NDCG[("hstu", s)] for s in (1, 2, 3)])
    assert table["test/ndcg@10"][0].startswith(f"{mean:.4f} ± ")
    runs = pl.DataFrame(
        {
            "run_id": ["r1", "r1", "r1", "r1", "r2"],
            "kind": ["distill"] * 5,
            "name": ["teacher-student"] * 4 + ["student"],
            "group": ["g"] * 5,
            "seed": [0] * 5,
            "metric": [
                "teacher/auc",
                "teacher/num_parameters",
                "student/auc",
                "student/num_parameters",
                "auc",
            ],
            "value": [0.8, 1e6, 0.75, 1e4, 0.7],
        }
    )
    points = evidence.scaling_points(runs, "test/auc", "num_parameters")
    assert points.select("model", "cost", "value").rows() == [
        ("teacher-student · student", 1e4, 0.75),
        ("teacher-student · teacher", 1e6, 0.8),
    ]
    with pytest.raises(ValueError, match="cost must be one of"):
        evidence.scaling_points(runs, "test/auc", "watts")


def test_scaling_chart_draws_a_curve_per_model_trained_at_several_sizes() -> None:
    points = pl.DataFrame(
        {
            "kind": ["ranking"] * 4,
            "group": ["g"] * 4,
            "group_no": ["group 1"] * 4,
            "model": ["hyformer@300k", "hyformer", "hyformer@3M", "deepfm"],
            "source": ["runs"] * 4,
            "cost": [1.2e6, 7.6e6, 3.0e7, 9e4],
            "value": [0.80, 0.802, 0.801, 0.79],
            "n_seeds": [3] * 4,
        }
    )
    spec = charts.scaling(points, "test/auc", "FLOPs per example").to_dict()
    marks = [
        layer["mark"]["type"] if isinstance(layer["mark"], dict) else layer["mark"] for layer in spec["layer"]
    ]
    assert marks == ["line", "circle", "text"]
    line_data = spec["datasets"][spec["layer"][0]["data"]["name"]]
    assert [(r["family"], r["cost"]) for r in line_data] == [
        ("hyformer", 1.2e6),
        ("hyformer", 7.6e6),
        ("hyformer", 3.0e7),
    ]
    single = charts.scaling(points.filter(pl.col("model") == "deepfm"), "test/auc", "FLOPs").to_dict()
    assert len(single["layer"]) == 2  # no curve for a model at one size


def test_recorded_verdicts_and_reports(tmp_path: Path) -> None:
    path = tmp_path / "w.duckdb"
    log = RunLog(path)
    run = log.start("distill", "teacher-student", config={"dataset": "shop"}, data_version="v")
    log.finish(run, metrics={"goal_met": 0.0, "flops_ratio": 0.05, "teacher/auc": 0.8})
    verdicts = evidence.recorded_verdicts(data.list_runs(path))
    assert verdicts.select("goal", "met", "figures", "dataset").rows() == [
        ("goal_met", False, "flops_ratio=0.05", "shop")
    ]
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "retrieval_shop.md").write_text("# Retrieval")
    (tmp_path / "artifacts" / "distill").mkdir(parents=True)
    (tmp_path / "artifacts" / "distill" / "report_shop.md").write_text("# Distill")
    assert {p.name for p in evidence.reports(tmp_path)} == {"retrieval_shop.md", "report_shop.md"}


# -- the run registry and the cache key ----------------------------------------------------------------------


def test_runs_record_their_dataset_and_code_version(tmp_path: Path) -> None:
    path = tmp_path / "w.duckdb"
    con = duckdb.connect(str(path))  # a registry written before the columns existed
    con.execute(
        "CREATE TABLE runs (run_id VARCHAR PRIMARY KEY, kind VARCHAR NOT NULL, name VARCHAR NOT NULL,"
        " status VARCHAR NOT NULL, config JSON, data_version VARCHAR, protocol VARCHAR, seed INTEGER,"
        " hardware VARCHAR, started_at TIMESTAMP NOT NULL, finished_at TIMESTAMP, wall_time_s DOUBLE,"
        " metrics JSON, error VARCHAR)"
    )
    con.execute(
        "INSERT INTO runs (run_id, kind, name, status, config, started_at) VALUES "
        "('old', 'retrieval', 'hstu', 'finished', ?, now())",
        [json.dumps({"loop": {}, "task": {"dataset": "ml100k"}})],
    )
    con.close()
    log = RunLog(path)
    nested = log.start(
        "retrieval", "sasrec", config={"loop": {}, "task": {"dataset": "ml100k"}}, data_version="v"
    )
    explicit = log.start("retrieval", "hstu", config={"model": "hstu"}, data_version="v", dataset="shop")
    none = log.start("benchmark", "serving_load", config={"concurrency": 8}, data_version=None)
    table = log.runs().select("run_id", "dataset", "code_version")
    recorded = {r: (d, c) for r, d, c in table.rows()}
    assert recorded["old"] == (None, None)
    assert recorded[nested][0] == "ml100k" and recorded[explicit][0] == "shop" and recorded[none][0] is None
    assert recorded[nested][1] == code_version()
    assert code_version().startswith(("git:", "package:"))
    # The dashboard reads the column, and the config for runs recorded before it existed.
    shown = dict(data.list_runs(path).select("run_id", "dataset").rows())
    assert shown == {"old": "ml100k", nested: "ml100k", explicit: "shop", none: data.NO_DATASET}
    assert dataset_of({"experiment": {"dataset": "x"}}) == "x"
    assert dataset_of({"dataset": {"kind": "synthetic", "dataset": "synthetic"}}) == "synthetic"
    assert dataset_of({"model": "hstu"}) is None


def test_table_versions_change_with_a_publish_or_a_run(tmp_path: Path) -> None:
    path = tmp_path / "w.duckdb"
    assert data.table_versions(path) == ()
    with Warehouse(path) as wh:
        wh.publish("shop.events", _events())
    before = data.table_versions(path)
    assert [t for t, _ in before] == ["shop.events"]
    assert data.table_versions(path) == before  # reading changes nothing
    log = RunLog(path)
    after_log = data.table_versions(path)
    run = log.start("retrieval", "hstu", config={"dataset": "shop"}, data_version="v")
    started = data.table_versions(path)
    log.finish(run, metrics={"test/ndcg@10": 0.1})
    assert len({before, after_log, started, data.table_versions(path)}) == 4
    with Warehouse(path) as wh:
        wh.publish("shop.events", _events().head(3))
    assert dict(data.table_versions(path))["shop.events"] != dict(before)["shop.events"]


# -- the pages -----------------------------------------------------------------------------------------------


def _app(monkeypatch: pytest.MonkeyPatch, path: Path, page: str) -> AppTest:
    monkeypatch.setenv(data.WAREHOUSE_ENV, str(path))
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_dataset_page(monkeypatch: pytest.MonkeyPatch, shop: Path) -> None:
    at = _app(monkeypatch, shop, "views/dataset.py")
    assert [h.value for h in at.header] == [
        "Events over time",
        "Item popularity and the long tail",
        "History lengths",
        "Ingest rejects",
    ]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["events"] == "12" and metrics["users"] == "4" and metrics["items"] == "5"
    assert metrics["items with 0 / 1-5 events"] == "1 / 4"
    rejects = at.dataframe[-1].value
    assert list(rejects["reason"]) == ["missing user_id", "bad ts"]


def test_user_page_shows_history_and_each_models_list(
    monkeypatch: pytest.MonkeyPatch, shop: Path, models: dict[str, str], service: tuple[str, list]
) -> None:
    at = _app(monkeypatch, shop, "views/user.py")
    assert at.subheader[0].value == "User 13"  # the most active user first
    history = at.dataframe[0].value
    assert list(history["item_id"]) == [1, 2, 3, 4, 1] and list(history["category"])[0] == "books"
    titles = [m.value for m in at.markdown if m.value.startswith("**")]
    assert titles == ["**shop-retriever (= shop-popularity) · popularity**", "**shop-sasrec · sasrec**"]
    popular = at.dataframe[1].value
    assert list(popular["item_id"]) == [5]  # user 13 has every item but 5
    assert any("No service URL set" in c.value for c in at.caption)

    # The running service's answer, with the item's attributes, once its URL is given.
    at.text_input(key="service_url").set_value(service[0]).run()
    assert not at.exception
    assert f"**Served by {service[0]}**" in [m.value for m in at.markdown]
    served = at.dataframe[-1].value
    assert list(served["item_id"]) == [3] and list(served["category"]) == ["books"]
    assert service[1][-1][1] == {"user_id": 13, "k": 10}

    at.selectbox[1].set_value(12).run()  # another user: the choice is kept in the URL
    assert not at.exception
    assert at.subheader[0].value == "User 12"
    assert at.query_params["user"] in ("12", ["12"])
    assert list(at.dataframe[1].value["item_id"]) == [1, 2, 3, 5]


def test_evidence_page(monkeypatch: pytest.MonkeyPatch, built: Built) -> None:
    at = _app(monkeypatch, built.path, "views/evidence.py")
    assert [h.value for h in at.header] == [
        "Comparisons",
        "Scaling: quality against cost",
        "Goals the experiments recorded",
        "Reports",
    ]
    tests = at.dataframe[1].value
    assert list(tests[["a", "b", "seeds"]].iloc[0]) == ["hstu", "sasrec", 3]
    at.selectbox[0].set_value("ranking").run()
    assert not at.exception
    assert list(at.dataframe[0].value["model"]) == ["din"]
    assert any("Only one model" in c.value for c in at.caption)
