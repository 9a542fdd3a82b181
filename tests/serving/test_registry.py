"""The model registry: checksummed registration into the BentoML store, tags with the data version, latest
resolution, pickle-free loading, and the catalogue/histories read from the warehouse."""

from __future__ import annotations

from pathlib import Path

import bentoml
import polars as pl
import pytest
import torch
from safetensors import safe_open

from recsys.models.registry import build_model
from recsys.serving.registry import (
    HISTORIES_FILE,
    ITEMS_FILE,
    WEIGHTS_FILE,
    RegistryError,
    catalog_from_warehouse,
    histories_from_warehouse,
    list_models,
    load_ids,
    load_model,
    register_model,
    resolve,
)
from recsys.warehouse import Warehouse


def _items(n: int = 5) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "item_id": [10 * (i + 1) for i in range(n)],
            "item_idx": list(range(1, n + 1)),
            "category": ["a", "b", "a", None, "b"][:n],
            "popularity": [5.0, 4.0, 3.0, 2.0, 1.0][:n],
        }
    )


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("sasrec", num_items=5, max_len=8, embedding_dim=8, num_heads=1, dropout=0.0)


def _register(name: str, model: torch.nn.Module, data_version: str = "v1abc") -> str:
    histories = pl.DataFrame({"user_id": [1, 2], "item_id": [[10, 20], [30]], "ts": [[1, 2], [5]]})
    return register_model(
        name,
        architecture="sasrec",
        task="retrieval",
        model=model,
        items=_items(),
        data_version=data_version,
        metrics={"ndcg@10": 0.25},
        histories=histories,
    )


def test_round_trip_gives_the_same_model_catalogue_and_histories() -> None:
    model = _model().eval()
    tag = _register("reg-roundtrip", model)
    assert tag.startswith("reg-roundtrip:v1abc-")  # the tag carries the data version
    loaded = load_model(tag)
    items, ts, lengths = torch.tensor([[1, 2, 3]]), torch.tensor([[1, 2, 3]]), torch.tensor([3])
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(items, ts, ts, lengths), model(items, ts, ts, lengths))
    assert loaded.card.metrics == {"ndcg@10": 0.25} and loaded.card.data_version == "v1abc"
    assert loaded.catalog.index == {10: 1, 20: 2, 30: 3, 40: 4, 50: 5}
    assert loaded.catalog.category[1:].tolist() == ["a", "b", "a", None, "b"]
    assert loaded.catalog.popularity[1:].tolist() == [5.0, 4.0, 3.0, 2.0, 1.0]
    assert loaded.histories[1][0].tolist() == [10, 20] and loaded.histories[2][1].tolist() == [5]
    root = Path(bentoml.models.get(tag).path)
    with safe_open(str(root / WEIGHTS_FILE), framework="pt") as f:  # weights are safetensors, no pickle
        assert set(f.keys()) == set(model.state_dict())
    assert not list(root.glob("*.pt")) and not list(root.glob("*.pkl"))


def test_same_content_is_one_version_and_latest_is_the_newest() -> None:
    first = _register("reg-latest", _model(0))
    assert _register("reg-latest", _model(0)) == first  # idempotent
    second = _register("reg-latest", _model(1), data_version="v2def")
    assert second != first and second.startswith("reg-latest:v2def-")
    assert resolve("reg-latest") == second == resolve("reg-latest:latest")
    assert resolve(first) == first
    listed = list_models("reg-latest")
    assert [r["tag"] for r in listed] == [second, first]
    assert listed[0]["data_version"] == "v2def" and listed[0]["metrics"] == {"ndcg@10": 0.25}
    with pytest.raises(RegistryError, match="not in the BentoML model store"):
        resolve("reg-never-registered")


@pytest.mark.parametrize("victim", [WEIGHTS_FILE, ITEMS_FILE, HISTORIES_FILE])
def test_a_changed_or_missing_file_is_refused_before_loading(victim: str) -> None:
    tag = _register(f"reg-tamper-{victim.split('.')[0]}", _model())
    path = Path(bentoml.models.get(tag).path) / victim
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match=f"file {victim} has sha256"):
        load_model(tag)
    path.unlink()
    with pytest.raises(RegistryError, match=f"file {victim} is missing"):
        load_model(tag)


def test_an_unlisted_file_is_refused_and_a_damaged_copy_is_replaced_on_registration() -> None:
    tag = _register("reg-unlisted", _model())
    root = Path(bentoml.models.get(tag).path)
    (root / "extra.safetensors").write_bytes(b"not registered")
    with pytest.raises(RegistryError, match=r"\['extra.safetensors'\] were not registered"):
        load_model(tag)
    (root / "extra.safetensors").unlink()
    weights = root / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-1])  # damaged in the store
    assert _register("reg-unlisted", _model()) == tag  # the same content: re-verified, rewritten
    load_model(tag)


def test_a_dataset_name_never_reaches_sql_unchecked(tmp_path: Path) -> None:
    with Warehouse(tmp_path / "wh.duckdb") as wh:
        for read in (catalog_from_warehouse, histories_from_warehouse):
            with pytest.raises(ValueError, match="dataset"):
                read(wh, "x; DROP TABLE lineage; --")


def test_bad_registrations_are_refused_with_the_reason() -> None:
    model = _model()
    with pytest.raises(RegistryError, match="item_idx must be exactly 1..n"):
        register_model(
            "reg-bad",
            architecture="sasrec",
            task="retrieval",
            model=model,
            items=_items().with_columns(pl.col("item_idx") + 1),
            data_version="v",
        )
    with pytest.raises(RegistryError, match="num_items = 5"):
        register_model(
            "reg-bad", architecture="sasrec", task="retrieval", model=model, items=_items(4), data_version="v"
        )
    with pytest.raises(RegistryError, match="needs a HSTU"):
        register_model(
            "reg-bad", architecture="hstu", task="retrieval", model=model, items=_items(), data_version="v"
        )
    with pytest.raises(RegistryError, match="name"):
        register_model(
            "Bad Name", architecture="sasrec", task="retrieval", model=model, items=_items(), data_version="v"
        )
    assert list_models("reg-bad") == []


def test_catalogue_and_histories_come_from_the_warehouse(tmp_path: Path) -> None:
    with Warehouse(tmp_path / "wh.duckdb") as wh:
        wh.publish("ds.item_index", pl.DataFrame({"item_id": [70, 80, 90], "item_idx": [1, 2, 3]}))
        wh.publish("ds.items", pl.DataFrame({"item_id": [70, 80, 90], "category": ["x", "y", "x"]}))
        wh.publish(
            "ds.events",
            pl.DataFrame(
                {"user_id": [1, 1, 2], "item_id": [90, 70, 90], "ts": [5, 6, 7], "src_row": [0, 1, 2]}
            ),
        )
        wh.publish(
            "ds.sequences",
            pl.DataFrame(
                {"user_id": [1, 2], "user_idx": [1, 2], "item_idx": [[3, 1], [3]], "ts": [[5, 6], [7]]}
            ),
        )
        items = catalog_from_warehouse(wh, "ds")
        histories = histories_from_warehouse(wh, "ds")
    assert items.rows() == [(70, 1, "x", 1.0), (80, 2, "y", 0.0), (90, 3, "x", 2.0)]
    assert histories.rows() == [(1, [90, 70], [5, 6]), (2, [90], [7])]


def test_string_ids_travel_with_the_model(tmp_path: Path) -> None:
    """A dataset ingested with string ids: the catalogue and histories carry the raw ids, the registered
    model keeps them (checksummed with the rest) and translates both ways."""
    with Warehouse(tmp_path / "wh.duckdb") as wh:
        wh.publish("ds.item_index", pl.DataFrame({"item_id": [1, 2, 3], "item_idx": [1, 2, 3]}))
        wh.publish("ds.item_ids", pl.DataFrame({"raw_id": ["sku-a", "sku-b", "sku-c"], "item_id": [1, 2, 3]}))
        wh.publish("ds.user_ids", pl.DataFrame({"raw_id": ["alice", "bob"], "user_id": [1, 2]}))
        wh.publish(
            "ds.events",
            pl.DataFrame({"user_id": [1, 1, 2], "item_id": [3, 1, 3], "ts": [5, 6, 7], "src_row": [0, 1, 2]}),
        )
        wh.publish(
            "ds.sequences",
            pl.DataFrame(
                {"user_id": [1, 2], "user_idx": [1, 2], "item_idx": [[3, 1], [3]], "ts": [[5, 6], [7]]}
            ),
        )
        items = catalog_from_warehouse(wh, "ds")
        histories = histories_from_warehouse(wh, "ds")
    assert items["raw_id"].to_list() == ["sku-a", "sku-b", "sku-c"]
    assert histories.select("user_id", "raw_user_id").rows() == [(1, "alice"), (2, "bob")]
    torch.manual_seed(0)
    model = build_model("sasrec", num_items=3, max_len=8, embedding_dim=8, num_heads=1, dropout=0.0)
    tag = register_model(
        "reg-strings",
        architecture="sasrec",
        task="retrieval",
        model=model,
        items=items,
        data_version="v1",
        histories=histories,
    )
    loaded = load_model(tag)
    assert loaded.ids.user_type == "str" and loaded.ids.item_type == "str"
    assert loaded.ids.user_internal("bob") == 2 and loaded.ids.user_internal("carol") is None
    assert loaded.ids.items_raw(loaded.catalog.item_ids[1:]) == ["sku-a", "sku-b", "sku-c"]
    light = load_ids(tag)  # the maps alone, without the weights
    assert light.users is not None and light.items is not None and loaded.ids.items is not None
    assert light.users.to_internal == {"alice": 1, "bob": 2}
    assert light.items.to_internal == loaded.ids.items.to_internal
    with pytest.raises(RegistryError, match="raw_id"):
        register_model(
            "reg-strings-bad",
            architecture="sasrec",
            task="retrieval",
            model=model,
            items=items.with_columns(pl.lit("same").alias("raw_id")),
            data_version="v1",
        )
