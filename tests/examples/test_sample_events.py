"""examples/events.csv end to end, as a new user runs it: ingest (string ids) -> features -> a small SASRec
(2 epochs) -> registered -> ``recsys recommend`` -> the served ``/recommend`` (the BentoML service's ASGI
app, in process): the user's own ids come back, and the served top-k is the offline one."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
import torch
from starlette.testclient import TestClient
from typer.testing import CliRunner

from recsys.evaluation.retrieval import leave_one_out
from recsys.features.sequences import build_item_index, build_sequences, build_user_index, load_sequences
from recsys.features.sequences import num_items as count_items
from recsys.flows.cli import app as cli
from recsys.ingest.events import EventSchema, ingest_events
from recsys.serving.registry import catalog_from_warehouse, histories_from_warehouse, register_model
from recsys.training.loop import LoopConfig
from recsys.training.retrieval import RetrievalTrainConfig, train_retrieval
from recsys.warehouse import Warehouse
from tests.inprocess_service import service_client

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EVENTS = EXAMPLES / "events.csv"
TS = 1_800_000_000  # one request time for the offline and the served lists


@dataclass(frozen=True)
class Trained:
    tag: str
    users: list[str]  # every user of the file
    skus: set[str]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    with Warehouse(tmp_path_factory.mktemp("wh") / "warehouse.duckdb") as wh:
        report = ingest_events(
            wh, "shop", EVENTS, schema=EventSchema(timestamp_format="iso8601", value="dwell_s")
        )
        assert report.rejected == {} and report.user_ids_mapped and report.item_ids_mapped
        build_item_index(wh, "shop")
        build_user_index(wh, "shop")
        version = build_sequences(wh, "shop").version
        split = leave_one_out(load_sequences(wh, "shop"), count_items(wh, "shop"))
        items = catalog_from_warehouse(wh, "shop")
        histories = histories_from_warehouse(wh, "shop")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared machine: extra threads only add contention
    try:
        result = train_retrieval(
            "sasrec",
            split,
            seed=0,
            train_config=RetrievalTrainConfig(max_len=50, batch_size=64, ks=(10,)),
            loop_config=LoopConfig(max_epochs=2, patience=2, progress=False, device="cpu"),
            model_fields={"embedding_dim": 32, "num_heads": 1, "num_blocks": 1},
        )
    finally:
        torch.set_num_threads(threads)
    assert result.model is not None  # training hands back what it trained
    tag = register_model(
        "shop-sasrec",
        architecture="sasrec",
        task="retrieval",
        model=result.model,
        items=items,
        data_version=version,
        metrics=result.test.metrics,
        histories=histories,
    )
    raw = pl.read_csv(EVENTS)
    return Trained(tag, sorted(raw["user_id"].unique().to_list()), set(raw["item_id"].to_list()))


def _recommend_cli(args: list[str]) -> None:
    outcome = CliRunner().invoke(cli, ["recommend", *args])
    assert outcome.exit_code == 0, outcome.output


@pytest.fixture(scope="module")
def offline(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> pl.DataFrame:
    """``recsys recommend --users FILE`` for a few users, one of them unknown to the model."""
    folder = tmp_path_factory.mktemp("recs")
    users = folder / "users.txt"
    users.write_text("\n".join([*trained.users[:5], "u_9999"]) + "\n")
    out = folder / "recs.parquet"
    _recommend_cli(["--model", "shop-sasrec:latest", "--users", str(users), "--k", "5", "--out", str(out)])
    _recommend_cli(["--model", "shop-sasrec", "--users", str(users), "--k", "5", "--ts", str(TS), "--out",
                    str(folder / "recs-ts.parquet")])  # fmt: skip
    frame = pl.read_parquet(out)
    assert frame.equals(pl.read_parquet(folder / "recs-ts.parquet"))  # SASRec reads no time
    return frame


@pytest.fixture(scope="module")
def served(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The BentoML service's own ASGI app (routes, validation, batching), in process."""
    env = {
        "RECSYS_SERVING_RETRIEVER": trained.tag,
        "RECSYS_SERVING_IMPRESSIONS_DIR": str(tmp_path_factory.mktemp("impressions")),
        "RECSYS_SERVING_TORCH_THREADS": "1",
    }
    with service_client(env) as client:
        yield client


def test_recommend_writes_the_users_own_ids(offline: pl.DataFrame, trained: Trained) -> None:
    assert offline.columns == ["user_id", "rank", "item_id", "score"]
    assert offline["user_id"].dtype == pl.Utf8 and offline["item_id"].dtype == pl.Utf8
    assert offline["user_id"].unique(maintain_order=True).to_list() == [*trained.users[:5], "u_9999"]
    assert set(offline["item_id"].to_list()) <= trained.skus
    for _, rows in offline.group_by("user_id"):
        assert rows["rank"].to_list() == [1, 2, 3, 4, 5]
        assert rows["score"].to_list() == sorted(rows["score"].to_list(), reverse=True)


def test_the_served_top_k_equals_the_offline_one(
    offline: pl.DataFrame, trained: Trained, served: TestClient
) -> None:
    for user in [*trained.users[:5], "u_9999"]:
        response = served.post("/recommend", json={"user_id": user, "k": 5})
        assert response.status_code == 200, response.text
        body = response.json()
        mine = offline.filter(pl.col("user_id") == user).sort("rank")
        assert [it["item_id"] for it in body["items"]] == mine["item_id"].to_list()
        assert [it["score"] for it in body["items"]] == pytest.approx(mine["score"].to_list(), rel=1e-5)
        assert [it["propensity"] for it in body["items"]] == [1.0] * 5
        assert body["cold_start"] == ("unknown_user" if user == "u_9999" else None)
    meta = served.post("/metadata").json()
    assert meta["retriever"]["user_id_type"] == "str" and meta["retriever"]["item_id_type"] == "str"


def test_the_service_names_unknown_and_mistyped_ids(trained: Trained, served: TestClient) -> None:
    known = sorted(trained.skus)[:3]
    ranked = served.post("/rank", json={"user_id": trained.users[0], "candidates": known})
    assert ranked.status_code == 200 and sorted(ranked.json()["ranking"]) == known
    unknown = served.post("/rank", json={"user_id": trained.users[0], "candidates": [known[0], "sku-zzzz"]})
    assert unknown.status_code == 400 and "sku-zzzz" in unknown.text
    mistyped = served.post("/recommend", json={"user_id": 42, "k": 3})
    assert mistyped.status_code == 400 and "user ids are strings" in mistyped.text
    history = [{"item_id": known[0], "ts": TS - 60}, {"item_id": "sku-zzzz", "ts": TS - 30}]
    sent = served.post("/recommend", json={"history": history, "k": 3, "ts": TS}).json()
    assert sent["unknown_history_items"] == ["sku-zzzz"] and sent["cold_start"] is None
    assert all(it["item_id"] in trained.skus for it in sent["items"])


def test_python_api_and_all_users(trained: Trained, offline: pl.DataFrame, tmp_path: Path) -> None:
    import recsys

    rec = recsys.Recommender.load("shop-sasrec")
    try:
        top = rec.recommend(trained.users[:2], k=5)
        same = offline.filter(pl.col("user_id").is_in(trained.users[:2]))
        assert top.select("user_id", "rank", "item_id").equals(same.select("user_id", "rank", "item_id"))
        # Batches of another size may round the last float digit differently.
        assert top["score"].to_list() == pytest.approx(same["score"].to_list(), rel=1e-5)
        assert sorted(rec.users) == trained.users and rec.knows(trained.users[0]) and not rec.knows("u_9999")
        with pytest.raises(ValueError, match="user 7: user_id: this model's user ids are strings"):
            rec.recommend([7])
    finally:
        rec.close()
    out = tmp_path / "all.csv"
    _recommend_cli(["--model", "shop-sasrec", "--all", "--k", "3", "--out", str(out)])
    everyone = pl.read_csv(out)
    assert everyone.height == 3 * len(trained.users)
    assert sorted(everyone["user_id"].unique().to_list()) == trained.users
    neither = CliRunner().invoke(
        cli, ["recommend", "--model", "shop-sasrec", "--out", str(tmp_path / "x.csv")]
    )
    assert neither.exit_code != 0 and "exactly one of --users FILE or --all" in neither.output
    missing = CliRunner().invoke(cli, ["recommend", "--model", "no-such-model", "--all", "--out", str(out)])
    assert missing.exit_code == 1 and "no-such-model" in missing.output
