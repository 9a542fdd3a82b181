"""The real server: ``bentoml serve`` in a subprocess on 127.0.0.1 (a free port), every endpoint over HTTP,
the error cases (4xx naming the field), the API key, adaptive batching under concurrency and the
impressions spool written by the server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from recsys.serving.impressions import read_spool
from tests.serving.test_featurize import Served, register_synthetic_ranker, synthetic_warehouse
from tests.serving.test_service import ITEM_OFFSET, TinyModels, train_and_register

REPO_ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key-123"
READY_TIMEOUT_S = 240.0


@dataclass(frozen=True)
class Server:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    spool: Path
    models: TinyModels
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's own process group (it started it), SIGKILL if it does not stop."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _start(env: dict[str, str], port: int, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``bentoml serve`` on 127.0.0.1:port in its own process group; returns once /readyz answers 200."""
    bentoml_cli = Path(sys.executable).with_name("bentoml")
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(bentoml_cli), "serve", "recsys.serving.service:RecommendationService", "--port", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the teardown stops exactly what it started
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"bentoml serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                    return process, url
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready after {READY_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
    except BaseException:
        _stop(process)
        raise


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    models = train_and_register()
    port = _free_port()
    spool = tmp_path_factory.mktemp("impressions")
    log = tmp_path_factory.mktemp("server") / "bentoml.log"
    env = {
        **os.environ,  # RECSYS_HOME / BENTOML_HOME of this test session
        "RECSYS_SERVING_RETRIEVER": models.retriever,
        "RECSYS_SERVING_API_KEY": API_KEY,
        "RECSYS_SERVING_IMPRESSIONS_DIR": str(spool),
        "RECSYS_SERVING_MAX_CANDIDATES": "50",
        "RECSYS_SERVING_POLICY_TEMPERATURE": "1.0",
        "RECSYS_SERVING_TORCH_THREADS": "1",
    }
    process, url = _start(env, port, log)
    try:
        yield Server(url, port, process, spool, models, log)
    finally:
        _stop(process)


def _post(server: Server, path: str, body: object | None = None, key: str | None = API_KEY) -> httpx.Response:
    headers = {"x-api-key": key} if key is not None else {}
    return httpx.post(f"{server.url}/{path}", json=body, headers=headers, timeout=30.0)


def test_binds_to_loopback_only(server: Server) -> None:
    listening = [
        c.laddr.ip
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == server.port
    ]
    assert listening and set(listening) == {"127.0.0.1"}


def test_health_readiness_and_metadata(server: Server) -> None:
    assert httpx.get(f"{server.url}/livez").status_code == 200
    assert httpx.get(f"{server.url}/readyz").status_code == 200  # the probes need no key
    assert _post(server, "health", key=None).status_code == 401
    health = _post(server, "health")
    assert health.status_code == 200 and health.json() == {"status": "ok", "ready": True}
    meta = _post(server, "metadata")
    assert meta.status_code == 200
    body = meta.json()
    assert body["retriever"]["tag"] == server.models.retriever
    assert body["retriever"]["data_version"] == "tinycycle" and body["retriever"]["metrics"]["hr@1"] > 0.5
    assert body["ranker"] is None and body["limits"]["max_candidates"] == 50
    assert body["policy"] == {"default": "top_k", "explore": "plackett-luce", "temperature": 1.0}
    assert body["retriever"]["user_id_type"] == "int" and body["retriever"]["item_id_type"] == "int"
    assert body["started_at"]


def test_recommend_over_http(server: Server) -> None:
    history = [{"item_id": ITEM_OFFSET + i, "ts": 1000 + 100 * n} for n, i in enumerate([3, 4, 5])]
    response = _post(server, "recommend", {"history": history, "k": 3, "ts": 10_000_000})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["items"]) == 3 and [it["position"] for it in body["items"]] == [0, 1, 2]
    assert [it["propensity"] for it in body["items"]] == [1.0] * 3 and body["cold_start"] is None  # top-k
    scores = [it["score"] for it in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert not {it["item_id"] for it in body["items"]} & {103, 104, 105}
    again = _post(server, "recommend", {"history": history, "k": 3, "ts": 10_000_000}).json()
    assert [it["item_id"] for it in again["items"]] == [it["item_id"] for it in body["items"]]
    explore = {"history": history, "k": 3, "ts": 10_000_000, "policy": "explore"}
    drawn = _post(server, "recommend", explore).json()
    assert all(0 < it["propensity"] < 1 for it in drawn["items"])
    known = _post(server, "recommend", {"user_id": next(iter(server.models.histories)), "k": 2})
    assert known.status_code == 200 and known.json()["cold_start"] is None
    cold = _post(server, "recommend", {"user_id": 987654321, "k": 2})
    assert cold.json()["cold_start"] == "unknown_user" and cold.json()["source"] == "popularity"


def test_rank_over_http(server: Server) -> None:
    body = {"history": [{"item_id": 103, "ts": 1}, {"item_id": 104, "ts": 2}], "candidates": [105, 111, 112]}
    response = _post(server, "rank", body)
    assert response.status_code == 200, response.text
    out = response.json()
    assert len(out["scores"]["score"]) == 3 and out["propensities"] == [1.0] * 3
    # 105 continues the history's sequence; the ranking is the candidates in descending score order.
    scores = dict(zip(body["candidates"], out["scores"]["score"], strict=True))
    assert out["ranking"][0] == 105 and "unknown_items" not in out
    assert out["ranking"] == sorted(scores, key=scores.__getitem__, reverse=True)
    unknown = _post(server, "rank", {**body, "candidates": [105, 5555]})
    assert unknown.status_code == 400 and "unknown item ids [5555]" in unknown.text


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("recommend", {"user_id": "12"}, "user_id: this model's user ids are integers"),
        ("recommend", {"user_id": 1.5}, "user_id"),
        ("recommend", {"user_id": 1, "k": 1.5}, "k"),
        ("recommend", {"history": [{"item_id": 1, "ts": "yesterday"}]}, "ts"),
        ("recommend", {"user_id": 1, "k": 500}, "k"),
        ("recommend", {}, "user_id or history"),
        ("rank", {"user_id": 1, "candidates": []}, "candidates"),
        ("rank", {"user_id": 1, "candidates": list(range(51))}, "candidates"),
        ("rank", {"user_id": 1, "candidates": [4, 4]}, "candidates"),
        ("rank", {"user_id": 1, "candidates": ["a"]}, "candidates"),
        ("rank", {"user_id": 1, "candidates": [101, 5555]}, "unknown item ids [5555]"),
        ("rank", [1, 2], "RankRequest"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field(server: Server, path: str, body: object, field: str) -> None:
    response = _post(server, path, body)
    assert 400 <= response.status_code < 500, response.text
    assert field in response.text


def test_malformed_json_and_nan_are_4xx(server: Server) -> None:
    headers = {"x-api-key": API_KEY, "content-type": "application/json"}
    broken = httpx.post(f"{server.url}/rank", content=b'{"user_id": 1, "candidates": [1', headers=headers)
    assert broken.status_code == 400 and "Invalid JSON" in broken.text
    nan = httpx.post(
        f"{server.url}/rank",
        content=b'{"history": [{"item_id": 1, "ts": NaN}], "candidates": [1]}',
        headers=headers,
    )
    assert nan.status_code == 400 and "ts" in nan.text


def test_api_key_is_required(server: Server) -> None:
    for response in (
        _post(server, "recommend", {"user_id": 1}, key=None),
        _post(server, "rank", {"user_id": 1, "candidates": [101]}, key="wrong"),
        _post(server, "metadata", key=None),
        httpx.get(f"{server.url}/metrics"),
    ):
        assert response.status_code == 401
        assert response.json() == {"error": "missing or wrong X-API-Key header", "code": "unauthorized"}


def test_concurrent_requests_all_succeed(server: Server) -> None:
    async def burst() -> list[int]:
        async with httpx.AsyncClient(
            base_url=server.url, headers={"x-api-key": API_KEY}, timeout=60
        ) as client:
            calls = [
                client.post("/rank", json={"user_id": u, "candidates": [101, 102, 103, 104]})
                for u in list(server.models.histories)[:16]
            ] + [
                client.post("/recommend", json={"user_id": u, "k": 2})
                for u in list(server.models.histories)[:16]
            ]
            return [r.status_code for r in await asyncio.gather(*calls)]

    assert asyncio.run(burst()) == [200] * 32


def test_served_lists_reach_the_impressions_spool(server: Server) -> None:
    response = _post(server, "recommend", {"user_id": 424242, "k": 2})
    request_id = response.json()["request_id"]
    deadline = time.monotonic() + 30  # the server flushes its buffer every 2 s
    while time.monotonic() < deadline:
        frame = read_spool(server.spool)
        rows = frame.filter(frame["request_id"] == request_id)
        if rows.height:
            break
        time.sleep(0.5)
    assert rows["item_id"].to_list() == [it["item_id"] for it in response.json()["items"]]
    assert (
        rows["user_id"].to_list() == [424242, 424242] and rows["cold_start"].to_list() == ["unknown_user"] * 2
    )


# -- a feature-based ranker (RankMixer) behind a popularity retriever, through the real server ---------------
@dataclass(frozen=True)
class RankerServer:
    url: str
    served: Served


@pytest.fixture(scope="module")
def ranker_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RankerServer]:
    served = register_synthetic_ranker(synthetic_warehouse(tmp_path_factory.mktemp("ranker-data")))
    env = {
        **os.environ,
        "RECSYS_SERVING_RETRIEVER": served.retriever,
        "RECSYS_SERVING_RANKER": served.ranker,
        "RECSYS_SERVING_POLICY_TEMPERATURE": "0",
        "RECSYS_SERVING_LOG_IMPRESSIONS": "false",
    }
    process, url = _start(env, _free_port(), tmp_path_factory.mktemp("ranker-server") / "bentoml.log")
    try:
        yield RankerServer(url, served)
    finally:
        _stop(process)


def test_a_feature_ranker_is_served_over_http(ranker_server: RankerServer) -> None:
    served, url = ranker_server.served, ranker_server.url
    meta = httpx.post(f"{url}/metadata", timeout=30).json()
    assert meta["ranker"]["tag"] == served.ranker and meta["ranker"]["architecture"] == "rankmixer"
    candidates = [int(i) for i in served.items[:10]]
    body = {"user_id": served.known_user, "candidates": candidates, "ts": 2_000_000_000}
    rank = httpx.post(f"{url}/rank", json=body, timeout=30)
    assert rank.status_code == 200, rank.text
    out = rank.json()
    assert out["source"] == "ranker" and set(out["scores"]) == set(served.data.tasks)
    unknown = httpx.post(f"{url}/rank", json={**body, "candidates": [*candidates, 999_999]}, timeout=30)
    assert unknown.status_code == 400 and "999999" in unknown.text
    history = [{"item_id": int(i), "ts": 1_000 + n, "value": 2.5} for n, i in enumerate(served.items[:5])]
    rec = httpx.post(f"{url}/recommend", json={"history": history, "k": 4, "ts": 5_000}, timeout=30)
    assert rec.status_code == 200, rec.text
    items = rec.json()["items"]
    assert rec.json()["source"] == "ranker" and len(items) == 4
    assert [it["score"] for it in items] == sorted((it["score"] for it in items), reverse=True)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"history": [{"item_id": 1, "ts": 5, "value": "high"}], "candidates": [1]}', "value"),
        (b'{"history": [{"item_id": 1, "ts": 5, "value": 1e999}], "candidates": [1]}', "value"),
        (b'{"history": [{"item_id": 1, "ts": 5, "value": NaN}], "candidates": [1]}', "value"),
        (b'{"user_id": 3, "candidates": [1, 1]}', "candidates"),
    ],
)
def test_feature_ranker_bad_fields_are_4xx(ranker_server: RankerServer, body: bytes, field: str) -> None:
    headers = {"content-type": "application/json"}
    response = httpx.post(f"{ranker_server.url}/rank", content=body, headers=headers, timeout=30)
    assert 400 <= response.status_code < 500, response.text
    assert field in response.text
