"""serving.middleware: ConnectionRecycler (every n-th response closes its keep-alive connection) and
RequestGuard (key before the body, body cap, content types, readiness, error bodies)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import pytest

from recsys.serving.errors import ErrorResponse
from recsys.serving.middleware import (
    ConnectionRecycler,
    Readiness,
    RequestGuard,
    is_loopback_host,
    parse_media_type,
    validate_api_key,
)


async def _app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


def _headers(recycler: ConnectionRecycler, scope_type: str = "http") -> list[tuple[bytes, bytes]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(recycler({"type": scope_type}, None, send))  # type: ignore[arg-type]
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert [m["type"] for m in sent][-1] == "http.response.body"  # the body still goes out
    return starts[0]["headers"] if starts else []


def test_every_nth_response_asks_the_client_to_reconnect() -> None:
    recycler = ConnectionRecycler(_app, every=3)
    closes = [(b"connection", b"close") in _headers(recycler) for _ in range(9)]
    assert closes == [False, False, True] * 3
    assert (b"content-type", b"text/plain") in _headers(recycler)  # the app's own headers are kept


def test_zero_never_closes_and_a_negative_period_is_rejected() -> None:
    recycler = ConnectionRecycler(_app, every=0)
    assert not any((b"connection", b"close") in _headers(recycler) for _ in range(5))
    with pytest.raises(ValueError, match="every must be >= 0"):
        ConnectionRecycler(_app, every=-1)


# -- RequestGuard ------------------------------------------------------------------------------------------
@dataclass
class Exchange:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    app_called: bool
    body_reads: int  # receive() calls made by anyone


def _guarded(
    *,
    path: str = "/rank",
    method: str = "POST",
    headers: list[tuple[bytes, bytes]] | None = None,
    chunks: list[bytes] | None = None,
    app_status: int = 200,
    app_body: bytes = b'{"ok": true}',
    readiness: Readiness | None = None,
    key: str | None = "secret",
) -> Exchange:
    state = {"app": False, "reads": 0}
    pending = list(chunks if chunks is not None else [b"{}"])

    async def receive() -> dict[str, Any]:
        state["reads"] += 1
        body = pending.pop(0) if pending else b""
        return {"type": "http.request", "body": body, "more_body": bool(pending)}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        state["app"] = True
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": app_status, "headers": [(b"x-app", b"1")]})
        await send({"type": "http.response.body", "body": app_body})

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    guard = RequestGuard(
        app,
        api_key=key,
        max_body_bytes=100,
        json_routes={"/rank", "/health"},
        readiness=readiness,
        openapi=lambda: {"openapi": "3.0.2"},
    )
    scope = {"type": "http", "path": path, "method": method, "headers": headers or []}
    asyncio.run(guard(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return Exchange(start["status"], dict(start["headers"]), body, state["app"], state["reads"])


KEY = (b"x-api-key", b"secret")
JSON = (b"content-type", b"application/json")


def _code(exchange: Exchange) -> str | None:
    assert exchange.headers[b"content-type"] == b"application/json"
    return ErrorResponse.model_validate_json(exchange.body).code


def test_no_key_is_401_before_the_body_is_read() -> None:
    for headers in ([JSON, (b"content-length", b"52428800")], [JSON, (b"x-api-key", b"secre")]):
        out = _guarded(headers=headers)
        assert out.status == 401 and _code(out) == "unauthorized"
        assert not out.app_called and out.body_reads == 0
    for path, method in (("/metrics", "GET"), ("/docs.json", "GET"), ("/", "GET"), ("/nowhere", "POST")):
        out = _guarded(path=path, method=method, headers=[])
        assert out.status == 401 and not out.app_called
    for probe in ("/livez", "/healthz", "/readyz"):
        assert _guarded(path=probe, method="GET", headers=[]).status == 200
    assert _guarded(headers=[KEY, JSON]).status == 200


def test_body_cap_from_the_header_and_for_a_chunked_body() -> None:
    out = _guarded(headers=[KEY, JSON, (b"content-length", b"101")])
    assert out.status == 413 and _code(out) == "payload_too_large" and out.body_reads == 0
    chunked = [KEY, JSON, (b"transfer-encoding", b"chunked")]
    out = _guarded(headers=chunked, chunks=[b"x" * 60, b"x" * 60])
    assert out.status == 413 and not out.app_called
    out = _guarded(headers=chunked, chunks=[b"{", b"}"])
    assert out.status == 200 and out.app_called  # the buffered body is replayed whole
    assert _guarded(headers=[KEY, JSON, (b"content-length", b"12x")]).status == 400


def test_content_types() -> None:
    cases = {
        b"multipart/form-data": 415,
        b"application/x-www-form-urlencoded": 415,
        b"application/json; charset=iso-8859-1": 415,
        b"application/json; charset=UTF-8": 200,
        b'application/json; charset="utf-8"': 200,
        b"Application/JSON": 200,
        b"json": 400,
        b"application/json; charset": 400,
        b"/": 400,
    }
    for content_type, status in cases.items():
        out = _guarded(headers=[KEY, (b"content-type", content_type), (b"content-length", b"2")])
        assert out.status == status, (content_type, out.body)
        assert out.app_called == (status == 200) and (status == 200 or out.body_reads == 0)
    no_type = _guarded(headers=[KEY, (b"content-length", b"2")])
    assert no_type.status == 415 and _code(no_type) == "unsupported_media_type"
    empty = _guarded(headers=[KEY, (b"content-length", b"0")], chunks=[b""])
    assert empty.status == 200  # no body, no type needed (POST /health with nothing)
    assert (
        _guarded(path="/metrics", method="GET", headers=[KEY, (b"content-type", b"text/plain")]).status == 200
    )


def test_readiness_reason_and_checks() -> None:
    readiness = Readiness()
    out = _guarded(path="/readyz", method="GET", readiness=readiness)
    assert out.status == 503 and "starting" in ErrorResponse.model_validate_json(out.body).error
    readiness.set(None)
    assert _guarded(path="/readyz", method="GET", readiness=readiness).status == 200
    readiness.add_check(lambda: "impressions spool writer failing (OSError: disk full)")
    out = _guarded(path="/readyz", method="GET", readiness=readiness)
    assert out.status == 503 and _code(out) == "not_ready" and "disk full" in out.body.decode()


def test_error_bodies_of_the_app_are_normalised() -> None:
    bento_list = _guarded(headers=[KEY, JSON], app_status=400, app_body=b'[{"error": "k: 500 exceeds"}]')
    assert bento_list.status == 400 and json.loads(bento_list.body) == {
        "error": "k: 500 exceeds",
        "code": "invalid_request",
    }
    assert bento_list.headers[b"x-app"] == b"1"  # the app's other headers are kept
    pydantic = (
        b'{"error": "1 validation error", "detail": [{"type": "int_type", "loc": ["k"], "msg": "bad"}]}'
    )
    out = ErrorResponse.model_validate_json(
        _guarded(headers=[KEY, JSON], app_status=400, app_body=pydantic).body
    )
    assert out.detail is not None and out.detail[0].loc == ["k"] and out.code == "invalid_request"
    text = _guarded(path="/nowhere", method="GET", headers=[KEY], app_status=404, app_body=b"Not Found")
    assert json.loads(text.body) == {"error": "Not Found", "code": "not_found"}
    crash = _guarded(headers=[KEY, JSON], app_status=500, app_body=b"")
    assert _code(crash) == "internal"
    assert _guarded(headers=[KEY, JSON]).body == b'{"ok": true}'  # successes untouched


def test_openapi_document_is_served_behind_the_key() -> None:
    out = _guarded(path="/docs.json", method="GET", headers=[KEY])
    assert out.status == 200 and json.loads(out.body) == {"openapi": "3.0.2"} and not out.app_called


def test_key_host_and_media_type_helpers() -> None:
    assert validate_api_key(None) is None and validate_api_key("k") == "k"
    for bad in ("", "   ", " k"):
        with pytest.raises(ValueError):
            validate_api_key(bad)
    with pytest.raises(ValueError, match="empty"):
        RequestGuard(_app, api_key="", max_body_bytes=1, json_routes=())
    assert all(is_loopback_host(h) for h in ("127.0.0.1", "localhost", "::1", "[::1]", "127.1.2.3"))
    assert not any(is_loopback_host(h) for h in ("0.0.0.0", "10.0.0.1", "::", "example.com"))  # noqa: S104
    assert parse_media_type('application/json; Charset="utf-8"') == ("application/json", {"charset": "utf-8"})
