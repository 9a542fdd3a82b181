"""User embeddings in the model store and at ``/user_embedding`` (the BentoML service's ASGI app, in process):
raw user ids in, the registered vector out; an unknown user is a 404 naming user_id, a mistyped id a 400;
bad tables are refused at registration and a changed file at load."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bentoml
import polars as pl
import pytest
import torch
from starlette.testclient import TestClient

from recsys.models.registry import build_model
from recsys.serving.registry import RegistryError, list_models, register_model
from recsys.serving.user_embeddings import (
    TABLE_FILE,
    UserEmbeddingRequest,
    load_user_embeddings,
    not_served,
    register_user_embeddings,
)
from tests.inprocess_service import service_client

VECTORS = {7: [1.0, 0.0, 0.0, 0.0], 11: [0.0, 0.6, 0.8, 0.0], 42: [0.5, 0.5, 0.5, 0.5]}


@dataclass(frozen=True)
class Tags:
    retriever: str
    int_users: str
    str_users: str


@pytest.fixture(scope="module")
def tags() -> Tags:
    pop = build_model("popularity", num_items=3)
    pop.load_counts(torch.tensor([0.0, 5.0, 3.0, 1.0]))
    items = pl.DataFrame(
        {"item_id": [101, 102, 103], "item_idx": [1, 2, 3], "category": ["a", "b", "a"]}
    ).with_columns(popularity=pl.Series([5.0, 3.0, 1.0]))
    retriever = register_model(
        "emb-test-pop", architecture="popularity", task="retrieval", model=pop, items=items, data_version="t"
    )
    int_frame = pl.DataFrame({"user_id": list(VECTORS), "embedding": list(VECTORS.values())})
    int_users = register_user_embeddings("emb-test-users", int_frame, data_version="t", source="test")
    str_frame = pl.DataFrame(
        {"user_id": [1, 2], "raw_user_id": ["u_a", "u_b"], "embedding": [[1.0, 2.0], [3.0, 4.0]]}
    )
    str_users = register_user_embeddings("emb-test-raw", str_frame, data_version="t", source="test")
    return Tags(retriever, int_users, str_users)


@pytest.fixture(scope="module")
def served(tags: Tags, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with service_client(
        {
            "RECSYS_SERVING_RETRIEVER": tags.retriever,
            "RECSYS_SERVING_USER_EMBEDDINGS": tags.int_users,
            "RECSYS_SERVING_IMPRESSIONS_DIR": str(tmp_path_factory.mktemp("impressions")),
            "RECSYS_SERVING_TORCH_THREADS": "1",
        }
    ) as client:
        yield client


def test_the_service_returns_the_registered_vector(served: TestClient, tags: Tags) -> None:
    for user, vector in VECTORS.items():
        response = served.post("/user_embedding", json={"user_id": user})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["user_id"] == user and body["dimension"] == 4 and body["source"] == tags.int_users
        assert body["embedding"] == pytest.approx(vector, abs=1e-7)


def test_unknown_and_mistyped_users_are_4xx_naming_user_id(served: TestClient) -> None:
    unknown = served.post("/user_embedding", json={"user_id": 999})
    assert unknown.status_code == 404
    assert unknown.json()["code"] == "not_found" and unknown.json()["error"].startswith(
        "user_id: unknown user 999"
    )
    mistyped = served.post("/user_embedding", json={"user_id": "u_7"})
    assert mistyped.status_code == 400 and mistyped.json()["error"].startswith("user_id:")
    assert "integers" in mistyped.json()["error"]
    missing = served.post("/user_embedding", json={})
    assert missing.status_code == 400 and missing.json()["detail"][0]["loc"][-1] == "user_id"
    # The recommendation routes are unaffected by the new one.
    assert served.post("/recommend", json={"user_id": 7, "k": 2}).status_code == 200


def test_a_service_without_embeddings_names_the_missing_setting() -> None:
    # One BentoML app per process (its metrics registry is global), so this answer is checked directly.
    error = not_served()
    assert error.error_code == 404 and "RECSYS_SERVING_USER_EMBEDDINGS" in str(error)


def test_string_ids_are_looked_up_by_the_users_own_id(tags: Tags) -> None:
    table = load_user_embeddings(tags.str_users)
    assert table.lookup("u_b").tolist() == [3.0, 4.0]
    answer = table.respond(UserEmbeddingRequest(user_id="u_a"))
    assert answer.embedding == [1.0, 2.0] and answer.user_id == "u_a"
    with pytest.raises(bentoml.exceptions.NotFound, match="user_id: unknown user 'u_zz'"):
        table.respond(UserEmbeddingRequest(user_id="u_zz"))
    with pytest.raises(bentoml.exceptions.InvalidArgument, match="user_id: .* strings"):
        table.respond(UserEmbeddingRequest(user_id=1))


def test_registration_is_idempotent_and_not_listed_as_a_model(tags: Tags) -> None:
    frame = pl.DataFrame({"user_id": list(VECTORS), "embedding": list(VECTORS.values())})
    assert (
        register_user_embeddings("emb-test-users", frame, data_version="t", source="test") == tags.int_users
    )
    assert all(row["tag"] != tags.int_users for row in list_models())


@pytest.mark.parametrize(
    ("frame", "problem"),
    [
        (pl.DataFrame({"user_id": [1, 2], "embedding": [[1.0, 2.0], [1.0]]}), "same, non-zero length"),
        (pl.DataFrame({"user_id": [1, 1], "embedding": [[1.0], [2.0]]}), "embeddings.user_id"),
        (pl.DataFrame({"user_id": [1], "embedding": [[float("nan")]]}), "finite"),
        (pl.DataFrame({"user": [1], "embedding": [[1.0]]}), "missing column"),
    ],
)
def test_bad_tables_are_refused_naming_the_field(frame: pl.DataFrame, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        register_user_embeddings("emb-test-bad", frame, data_version="t", source="test")


def test_a_changed_file_is_refused_at_load() -> None:
    frame = pl.DataFrame({"user_id": [5], "embedding": [[0.25, 0.75]]})
    tag = register_user_embeddings("emb-test-tamper", frame, data_version="t", source="test")
    path = Path(bentoml.models.get(tag).path) / TABLE_FILE
    pl.DataFrame({"user_id": [5], "embedding": [[9.0, 9.0]]}).write_parquet(path)
    with pytest.raises(RegistryError, match="sha256"):
        load_user_embeddings(tag)


def test_a_built_bento_pins_and_packs_the_embeddings(tags: Tags) -> None:
    from recsys.serving.build import effective_bentofile
    from recsys.serving.service import ServingConfig

    config = ServingConfig(retriever=tags.retriever, user_embeddings="emb-test-users:latest")
    bentofile = effective_bentofile(config)
    assert tags.int_users in bentofile["models"]
    envs = {e["name"]: e["value"] for e in bentofile["envs"]}
    assert envs["RECSYS_SERVING_USER_EMBEDDINGS"] == tags.int_users


def test_the_openapi_document_declares_the_route_and_its_404() -> None:
    from recsys.serving.service import openapi_document

    operation = openapi_document()["paths"]["/user_embedding"]["post"]
    assert {"200", "400", "404"} <= set(operation["responses"])
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["user_id"]
