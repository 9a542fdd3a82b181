"""The service under an operator's hands, through ``recsys serve`` in a subprocess: signals stop the whole
process tree, the API key is checked before any body is read (on every route but the probes), the body cap,
content types, error bodies, readiness and the impressions spool's failure surfacing in /readyz and
/metrics. One server (one worker) is shared by the module and stopped by SIGTERM in the last test."""

from __future__ import annotations

import asyncio
import contextlib
import gc
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
import torch
from typer.testing import CliRunner

from recsys.core.process import session_members
from recsys.serving.errors import ErrorResponse
from recsys.serving.impressions import read_spool
from recsys.serving.middleware import Readiness
from recsys.serving.service import AdaptiveBatcher
from tests.serving.test_service import TinyModels, train_and_register

REPO_ROOT = Path(__file__).resolve().parents[2]
API_KEY = "ops-key-456"
BODY_CAP = 64 * 1024
READY_TIMEOUT_S = 240.0
POST_ROUTES = ("health", "metadata", "rank", "recommend")
SESSIONS: dict[int, set[int]] = {}  # CLI pid -> the session ids of its tree once it was ready


@dataclass
class CliServer:
    url: str
    port: int
    process: subprocess.Popen[bytes]  # the `recsys serve` CLI process
    spool: Path
    models: TinyModels
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_cli_server(env: dict[str, str], port: int, log: Path, retriever: str) -> subprocess.Popen[bytes]:
    """``python -m recsys.flows.cli serve`` in its own session (so a failed test can still clean it up);
    returns once GET /readyz answers 200."""
    argv = [sys.executable, "-m", "recsys.flows.cli", "serve", "--retriever", retriever, "--port", str(port)]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            argv, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"recsys serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2.0).status_code == 200:
                # Every session of the tree, for kill_tree: the server has a session of its own.
                tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
                SESSIONS[process.pid] = {os.getsid(p.pid) for p in tree}
                return process
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            kill_tree(process)
            pytest.fail(f"server not ready after {READY_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


def kill_tree(process: subprocess.Popen[bytes]) -> None:
    """Teardown of last resort: SIGKILL every process of the sessions the server's tree had at start."""
    sessions = SESSIONS.pop(process.pid, {process.pid})
    try:
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for sid in sessions:
        tree += [psutil.Process(pid) for pid in session_members(sid) if psutil.pid_exists(pid)]
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    process.wait(timeout=10)


def server_env(spool: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "RECSYS_SERVING_API_KEY": API_KEY,
        "RECSYS_SERVING_WORKERS": "1",
        "RECSYS_SERVING_IMPRESSIONS_DIR": str(spool),
        "RECSYS_SERVING_MAX_BODY_BYTES": str(BODY_CAP),
        "RECSYS_SERVING_TORCH_THREADS": "1",
        **extra,
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliServer]:
    models = train_and_register()
    port = free_port()
    spool = tmp_path_factory.mktemp("impressions")
    log = tmp_path_factory.mktemp("server") / "serve.log"
    process = start_cli_server(server_env(spool), port, log, models.retriever)
    try:
        yield CliServer(f"http://127.0.0.1:{port}", port, process, spool, models, log)
    finally:
        if process.poll() is None:
            kill_tree(process)


def _error(response: httpx.Response, status: int, code: str) -> ErrorResponse:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = ErrorResponse.model_validate_json(response.content)
    assert body.code == code, body
    return body


def _raw_request(port: int, head: str, first_body_bytes: int) -> bytes:
    """Sends a request head and only ``first_body_bytes`` of its body; returns what the server answers
    (it must answer without waiting for the rest)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(head.encode() + b"\r\n" + b"7" * first_body_bytes)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


# -- authentication before the body ------------------------------------------------------------------------
def test_no_key_is_401_before_a_50_mb_body_is_read(server: CliServer) -> None:
    head = (
        "POST /rank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {50 * 1024 * 1024}\r\n"
    )
    answer = _raw_request(server.port, head, first_body_bytes=4096)  # 4 KB of the announced 50 MB
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    # With the key, the same announced size is refused by the cap, again without reading it.
    answer = _raw_request(server.port, head + f"X-API-Key: {API_KEY}\r\n", first_body_bytes=4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_a_streamed_body_without_a_key_is_401(server: CliServer) -> None:
    head = (
        "POST /rank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        conn.sendall(head.encode() + b"\r\n" + b"1000\r\n" + b" " * 4096 + b"\r\n")  # one chunk, no end
        answer = conn.recv(65536)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]


def test_every_route_but_the_probes_needs_the_key(server: CliServer) -> None:
    for path in POST_ROUTES:
        _error(httpx.post(f"{server.url}/{path}", json={}, timeout=10), 401, "unauthorized")
        wrong = httpx.post(f"{server.url}/{path}", json={}, headers={"x-api-key": "nope"}, timeout=10)
        _error(wrong, 401, "unauthorized")
    for path in ("metrics", "docs.json", "", "schema.json", "no-such-route"):
        _error(httpx.get(f"{server.url}/{path}", timeout=10), 401, "unauthorized")
    for path in ("livez", "healthz", "readyz"):
        assert httpx.get(f"{server.url}/{path}", timeout=10).status_code == 200
    with_key = httpx.post(f"{server.url}/health", headers={"x-api-key": API_KEY}, timeout=10)
    assert with_key.status_code == 200 and with_key.json() == {"status": "ok", "ready": True}
    metrics = httpx.get(f"{server.url}/metrics", headers={"x-api-key": API_KEY}, timeout=10)
    assert metrics.status_code == 200 and "recsys_impressions_writer_healthy" in metrics.text


def test_the_cli_refuses_a_public_host_without_a_key_and_an_empty_key() -> None:
    from recsys.flows.cli import app

    runner = CliRunner()
    env = {"RECSYS_SERVING_API_KEY": None}
    public = runner.invoke(app, ["serve", "--retriever", "x:1", "--host", "0.0.0.0"], env=env)  # noqa: S104
    assert public.exit_code == 2 and "refusing to bind 0.0.0.0 without an API key" in public.output
    empty = runner.invoke(app, ["serve", "--retriever", "x:1"], env={"RECSYS_SERVING_API_KEY": ""})
    assert empty.exit_code == 2 and "RECSYS_SERVING_API_KEY: empty" in empty.output


# -- body cap and content types ----------------------------------------------------------------------------
def test_a_chunked_body_over_the_cap_is_413(server: CliServer) -> None:
    def body() -> Iterator[bytes]:
        yield b'{"user_id": 1, "candidates": [' + b"1," * BODY_CAP + b"1]}"

    headers = {"x-api-key": API_KEY, "content-type": "application/json"}
    response = httpx.post(f"{server.url}/rank", content=body(), headers=headers, timeout=30)
    _error(response, 413, "payload_too_large")
    small = httpx.post(
        f"{server.url}/rank", content=iter([b'{"user_id": 1, "candidates": [101]}']), headers=headers
    )
    assert small.status_code == 200, small.text


@pytest.mark.parametrize("path", POST_ROUTES)
@pytest.mark.parametrize(
    ("content_type", "status", "code"),
    [
        ("multipart/form-data", 415, "unsupported_media_type"),
        ("multipart/form-data; boundary=x", 415, "unsupported_media_type"),
        ("text/plain", 415, "unsupported_media_type"),
        ("application/json; charset=latin-1", 415, "unsupported_media_type"),
        ("json", 400, "invalid_request"),
        ("application/json; charset", 400, "invalid_request"),
    ],
)
def test_content_types_other_than_json_are_refused(
    server: CliServer, path: str, content_type: str, status: int, code: str
) -> None:
    headers = {"x-api-key": API_KEY, "content-type": content_type}
    response = httpx.post(f"{server.url}/{path}", content=b'{"user_id": 1}', headers=headers, timeout=10)
    assert "Content-Type" in _error(response, status, code).error


def test_a_body_without_a_content_type_is_415(server: CliServer) -> None:
    response = httpx.post(f"{server.url}/rank", content=b"{}", headers={"x-api-key": API_KEY}, timeout=10)
    _error(response, 415, "unsupported_media_type")


# -- error bodies ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body", "loc"),
    [
        ("recommend", b'{"user_id": [12]}', ["user_id"]),  # pydantic: a field of the wrong type
        ("recommend", b'{"user_id": "12"}', None),  # a string id for an integer-id model (own check)
        ("rank", b'{"user_id": 1, "candidates": [1', []),  # invalid JSON
        ("rank", b"[1, 2]", []),  # not an object
        ("recommend", b'{"user_id": 1, "k": 500}', None),  # a configured limit (the service's own check)
        ("rank", b'{"user_id": 1, "candidates": [4, 4]}', None),  # duplicates (the service's own check)
        ("recommend", b'{"user_id": 1, "surprise": 1}', ["surprise"]),  # unknown field
    ],
)
def test_400_bodies_follow_the_declared_schema(
    server: CliServer, path: str, body: bytes, loc: list | None
) -> None:
    headers = {"x-api-key": API_KEY, "content-type": "application/json"}
    response = httpx.post(f"{server.url}/{path}", content=body, headers=headers, timeout=10)
    error = _error(response, 400, "invalid_request")
    if loc is None:
        assert error.detail is None and ":" in error.error  # "<field>: <problem>"
    else:
        assert error.detail and error.detail[0].loc[: len(loc)] == loc


def test_the_openapi_document_declares_the_error_bodies(server: CliServer) -> None:
    doc = httpx.get(f"{server.url}/docs.json", headers={"x-api-key": API_KEY}, timeout=10).json()
    for route in POST_ROUTES:
        responses = doc["paths"][f"/{route}"]["post"]["responses"]
        for status in ("400", "401", "413", "415"):
            assert responses[status]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorResponse"
            }
    assert "503" in doc["paths"]["/readyz"]["get"]["responses"]
    assert doc["components"]["securitySchemes"]["ApiKeyAuth"]["name"] == "X-API-Key"
    cold_start = doc["paths"]["/rank"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert {"type": "null"} in cold_start["properties"]["cold_start"]["anyOf"]  # null is a real answer


# -- readiness and the impressions spool -------------------------------------------------------------------
def test_a_failing_spool_makes_the_service_unready_until_it_recovers(server: CliServer) -> None:
    headers = {"x-api-key": API_KEY}
    spool, parked = server.spool, server.spool.with_name(server.spool.name + "-parked")
    spool.rename(parked)
    spool.write_text("not a directory")  # every write into it now fails
    try:
        served = httpx.post(f"{server.url}/recommend", json={"user_id": 5150, "k": 2}, headers=headers)
        assert served.status_code == 200  # serving goes on; the rows wait in memory
        deadline = time.monotonic() + 20  # the writer flushes every 2 s
        while (ready := httpx.get(f"{server.url}/readyz", timeout=5)).status_code == 200:
            assert time.monotonic() < deadline, "the spool failure never reached /readyz"
            time.sleep(0.3)
        error = _error(ready, 503, "not_ready")
        assert "impressions spool writer failing" in error.error
        metrics = httpx.get(f"{server.url}/metrics", headers=headers, timeout=10).text
        assert "recsys_impressions_writer_healthy" in metrics
        assert any(
            line.startswith("recsys_impressions_flush_errors_total") and float(line.split()[-1]) >= 1
            for line in metrics.splitlines()
        )
    finally:
        spool.unlink()
        parked.rename(spool)
    deadline = time.monotonic() + 20
    while httpx.get(f"{server.url}/readyz", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "the service did not become ready again"
        time.sleep(0.3)
    rows = read_spool(spool)
    assert 5150 in rows["user_id"].to_list()  # the rows kept through the failure were written


# -- batching isolation and readiness (in process) ----------------------------------------------------------
def test_one_bad_request_fails_alone_in_its_batch() -> None:
    def double(jobs: list[int]) -> list[int]:
        if any(j < 0 for j in jobs):
            raise ValueError(f"bad jobs {[j for j in jobs if j < 0]}")
        return [2 * j for j in jobs]

    async def burst() -> tuple[list[object], list[int]]:
        batcher = AdaptiveBatcher(double, max_batch_size=8)
        results = await asyncio.gather(
            *(batcher.submit(j) for j in [1, -1, 2, -3, 4]), return_exceptions=True
        )
        return results, batcher.batch_sizes

    results, sizes = asyncio.run(burst())
    assert sizes[0] == 5  # they did share a batch
    assert [results[0], results[2], results[4]] == [2, 4, 8]
    assert isinstance(results[1], ValueError) and str(results[1]) == "bad jobs [-1]"  # its own error
    assert isinstance(results[3], ValueError) and str(results[3]) == "bad jobs [-3]"


def test_ready_only_once_the_models_are_loaded_and_warmed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from recsys.serving import service

    models = train_and_register()
    monkeypatch.setenv("RECSYS_SERVING_RETRIEVER", models.retriever)
    monkeypatch.setenv("RECSYS_SERVING_IMPRESSIONS_DIR", str(tmp_path))
    readiness = Readiness()
    monkeypatch.setattr(service, "READINESS", readiness)
    calls: list[tuple[str, int, str | None]] = []
    for name in ("recommend_many", "rank_many"):
        real = getattr(service.Recommender, name)

        def spy(self: object, jobs: list, real: object = real, name: str = name) -> object:
            calls.append((name, len(jobs), readiness.reason()))
            return real(self, jobs)  # type: ignore[operator]

        monkeypatch.setattr(service.Recommender, name, spy)
    assert readiness.reason() is not None  # not ready before the service exists
    switch, threshold, threads = sys.getswitchinterval(), gc.get_threshold(), torch.get_num_threads()
    instance = service.RecommendationService.inner()
    try:
        warming = "starting: warming up"
        assert calls == [("recommend_many", 1, warming), ("rank_many", 1, warming)]
        assert readiness.reason() is None and instance.__is_ready__()
        assert (
            instance.engine.logger is not None and instance.engine.logger.rows_written == 0
        )  # nothing logged
        instance.engine.logger._error = "impressions spool writer failing (OSError: disk full)"
        assert readiness.reason() == instance.engine.logger._error and not instance.__is_ready__()
    finally:
        instance._close()
        gc.unfreeze()
        gc.set_threshold(*threshold)
        sys.setswitchinterval(switch)
        torch.set_num_threads(threads)
    assert readiness.reason() == "shutting down"


# -- signals (last: they stop the module's server) -----------------------------------------------------------
def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _assert_stops(process: subprocess.Popen[bytes], port: int, signum: int) -> None:
    tree = _tree(process.pid)
    assert len(tree) >= 3, [p.cmdline() for p in tree]  # cli -> bentoml serve -> worker(s)
    os.kill(process.pid, signum)  # the CLI only, as an operator or a process manager does
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        alive = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if process.poll() is not None and not alive and port_is_free(port):
            break
        time.sleep(0.2)
    alive = [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert process.poll() is not None and not alive, f"still running after 10 s: {alive}"
    assert port_is_free(port)
    assert process.returncode == 0, process.returncode


def test_sigint_stops_the_server_and_its_workers(tmp_path: Path, server: CliServer) -> None:
    port = free_port()
    process = start_cli_server(
        server_env(tmp_path / "spool"), port, tmp_path / "serve.log", server.models.retriever
    )
    try:
        _assert_stops(process, port, signal.SIGINT)
    finally:
        if process.poll() is None:
            kill_tree(process)


def test_sigterm_stops_the_server_and_its_workers(server: CliServer) -> None:
    _assert_stops(server.process, server.port, signal.SIGTERM)


def test_supervisor_exit_status_and_group_cleanup(tmp_path: Path) -> None:
    """A leader that exits leaving a child in a process group of its own (as BentoML's workers are): the
    supervisor removes the child too, and exits with the leader's status."""
    script = tmp_path / "leader.py"
    pidfile = tmp_path / "child.pid"
    script.write_text(
        "import subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], process_group=0)\n"
        f"open({str(pidfile)!r}, 'w').write(str(child.pid))\n"
        "sys.exit(3)\n"
    )
    code = (
        "from recsys.core.process import run_supervised; "
        f"raise SystemExit(run_supervised([{sys.executable!r}, {str(script)!r}], grace_s=2))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, timeout=30)
    assert done.returncode == 3
    child = int(pidfile.read_text())
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
