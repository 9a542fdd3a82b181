"""ASGI middleware of the recommendation service: ``RequestGuard`` (authentication, body cap, content types,
readiness, error bodies, the OpenAPI document; see its docstring) and ``ConnectionRecycler``.

``ConnectionRecycler`` spreads keep-alive clients over the worker processes. The workers share one listening
socket and a client keeps the connection it opened first, so 32 clients can settle as 23 on one worker and
9 on the other (seen under the load test). Then one core is saturated and the other half idle, and the
busy worker's clients set the tail latency. Ending every n-th response of a worker with ``Connection:
close`` makes its clients reconnect from time to time. A reconnect is accepted by whichever worker gets
back to its event loop first, which is usually the less loaded one, so the load evens out. nginx's
``keepalive_requests`` does the same.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from typing import Any

from recsys.serving.errors import error_body, normalize_error

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]


class ConnectionRecycler:
    """Adds ``Connection: close`` to every ``every``-th HTTP response of this process (0: never)."""

    def __init__(self, app: ASGIApp, every: int) -> None:
        if every < 0:
            raise ValueError(f"every must be >= 0 (0 = never close), got {every}")
        self.app = app
        self.every = every
        self.responses = 0

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.every == 0:
            await self.app(scope, receive, send)
            return
        self.responses += 1
        if self.responses % self.every:
            await self.app(scope, receive, send)
            return

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing_send)


# -- the request guard -------------------------------------------------------------------------------------
API_KEY_ENV = "RECSYS_SERVING_API_KEY"
API_KEY_HEADER = b"x-api-key"
READY_PATH = "/readyz"
OPENAPI_PATH = "/docs.json"
#: Routes open without the key: the liveness and readiness probes (an orchestrator's kubelet has no key, and
#: they reveal only "up" / "ready" or the reason it is not ready). Everything else needs it: the endpoints,
#: /metrics, the OpenAPI document and BentoML's index page.
OPEN_PATHS = frozenset({"/livez", "/healthz", READY_PATH})
JSON_MEDIA_TYPE = "application/json"
# RFC 9110 token characters: a media type is token "/" token, then parameters token=value.
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def validate_api_key(value: str | None) -> str | None:
    """The key as configured: None = no authentication; an empty or padded key is an error (an empty
    variable must not silently turn authentication off)."""
    if value is None:
        return None
    if value.strip() == "":
        raise ValueError(
            "empty: an empty key would turn authentication off; unset the variable to serve without one"
        )
    if value != value.strip():
        raise ValueError("has leading or trailing whitespace, which no HTTP header can carry")
    return value


def is_loopback_host(host: str) -> bool:
    """Whether binding ``host`` keeps the service on this machine (a name other than localhost: no)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_media_type(value: str) -> tuple[str, dict[str, str]]:
    """``type/subtype; k=v`` -> ("type/subtype" lower-cased, {k: v}); ValueError names what is malformed."""
    head, *params = value.split(";")
    kind, slash, sub = head.strip().partition("/")
    if not slash or not _TOKEN.match(kind) or not _TOKEN.match(sub):
        raise ValueError(f"malformed media type {head.strip()!r}")
    out = {}
    for param in params:
        if not param.strip():
            continue
        name, eq, raw = param.strip().partition("=")
        name = name.strip().lower()
        raw = raw.strip()
        if not eq or not _TOKEN.match(name) or not raw:
            raise ValueError(f"malformed parameter {param.strip()!r}")
        if raw.startswith('"'):
            if len(raw) < 2 or not raw.endswith('"'):
                raise ValueError(f"unterminated quoted value in {param.strip()!r}")
            raw = raw[1:-1]
        elif not _TOKEN.match(raw):
            raise ValueError(f"malformed parameter {param.strip()!r}")
        out[name] = raw
    return f"{kind}/{sub}".lower(), out


class Readiness:
    """Why this worker process is not ready (None: ready): a state the service sets while it starts and
    stops, and checks (e.g. the impressions spool) asked on every probe."""

    def __init__(self, reason: str | None = "starting: models not loaded") -> None:
        self._reason = reason
        self._checks: list[Callable[[], str | None]] = []

    def set(self, reason: str | None) -> None:
        self._reason = reason

    def add_check(self, check: Callable[[], str | None]) -> None:
        self._checks.append(check)

    def reason(self) -> str | None:
        if self._reason is not None:
            return self._reason
        for check in self._checks:
            problem = check()
            if problem is not None:
                return problem
        return None


def _content_type_verdict(raw_type: bytes) -> tuple[int, str] | tuple[()]:
    """(status, message) refusing a JSON endpoint's Content-Type, or () when it is acceptable."""
    try:
        media, params = parse_media_type(raw_type.decode("latin-1"))
    except ValueError as exc:
        return 400, f"Content-Type: {exc}"
    if media != JSON_MEDIA_TYPE:
        return 415, f"Content-Type: {media} is not supported; send {JSON_MEDIA_TYPE}"
    charset = params.get("charset", "utf-8").lower()
    if charset not in ("utf-8", "utf8"):
        return 415, f"Content-Type: charset {charset} is not supported; send UTF-8"
    return ()


async def _respond(send: Send, status: int, message: str) -> None:
    body = error_body(status, message)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'ApiKey header="X-API-Key"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _normalizing(send: Send) -> Send:
    """``send`` that rewrites every 4xx/5xx response body into an ``ErrorResponse`` (serving.errors)."""
    held: Message | None = None
    chunks: list[bytes] = []

    async def wrapped(message: Message) -> None:
        nonlocal held
        if message["type"] == "http.response.start" and message["status"] >= 400:
            held = message
            return
        if held is not None and message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = normalize_error(held["status"], b"".join(chunks))
            headers = [
                (k, v)
                for k, v in held.get("headers", [])
                if k.lower() not in (b"content-length", b"content-type")
            ]
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            start, held = {**held, "headers": headers}, None
            await send(start)
            await send({"type": "http.response.body", "body": body})
            return
        await send(message)

    return wrapped


class RequestGuard:
    """ASGI middleware in front of every route, deciding from the headers alone, before any body is read:

    1. the API key (``X-API-Key``, constant-time compare) on every path but ``OPEN_PATHS``: else 401;
    2. the body size: a ``Content-Length`` above ``max_body_bytes`` is 413 at once; a chunked body is read
       up to the cap (413 past it) and handed on whole;
    3. on the JSON endpoints (``json_routes``, POST), the ``Content-Type``: missing with a body, or another
       media type than application/json (or a charset other than UTF-8) is 415; a malformed one is 400.

    It also answers ``GET /readyz`` with 503 and the reason while ``readiness`` reports one, serves the
    truthful OpenAPI document (``openapi``) at ``/docs.json``, and rewrites every error body into
    ``serving.errors.ErrorResponse``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        max_body_bytes: int,
        json_routes: Collection[str],
        open_paths: Collection[str] = OPEN_PATHS,
        readiness: Readiness | None = None,
        openapi: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
        key = validate_api_key(api_key)
        self.app = app
        self.key = key.encode() if key is not None else None
        self.max_body_bytes = max_body_bytes
        self.json_routes = frozenset(json_routes)
        self.open_paths = frozenset(open_paths)
        self.readiness = readiness
        self.openapi = openapi
        self._openapi_body: bytes | None = None
        self._type_verdicts: dict[bytes, tuple[int, str] | tuple[()]] = {}

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = _normalizing(send)
        path: str = scope["path"]
        if path in self.open_paths:
            reason = self.readiness.reason() if self.readiness is not None and path == READY_PATH else None
            if reason is not None:
                await _respond(send, 503, f"not ready: {reason}")
                return
            await self.app(scope, receive, send)
            return
        headers: dict[bytes, bytes] = {}
        repeated = False
        for name, value in scope.get("headers", []):
            name = name.lower()
            repeated |= name in headers and name in (b"content-length", b"content-type", API_KEY_HEADER)
            headers[name] = value
        if self.key is not None and not hmac.compare_digest(headers.get(API_KEY_HEADER, b""), self.key):
            await _respond(send, 401, "missing or wrong X-API-Key header")
            return
        if repeated:
            await _respond(send, 400, "Content-Length, Content-Type and X-API-Key may each be sent once")
            return
        problem = self._check_body(scope, headers)
        if problem is not None:
            await _respond(send, *problem)
            return
        if self.openapi is not None and path == OPENAPI_PATH and scope["method"] in ("GET", "HEAD"):
            await self._send_openapi(send)
            return
        if b"content-length" not in headers and b"transfer-encoding" in headers:
            buffered = await self._read_capped(receive, send)
            if buffered is None:
                return
            receive = buffered
        await self.app(scope, receive, send)

    def _check_body(
        self, scope: MutableMapping[str, Any], headers: dict[bytes, bytes]
    ) -> tuple[int, str] | None:
        raw_length = headers.get(b"content-length")
        length: int | None = None
        if raw_length is not None:
            if not raw_length.isdigit():
                return 400, f"Content-Length: not a byte count ({raw_length[:40].decode('latin-1')!r})"
            length = int(raw_length)
            if length > self.max_body_bytes:
                return 413, f"request body of {length} bytes exceeds the limit of {self.max_body_bytes} bytes"
        if scope["path"] not in self.json_routes or scope["method"] != "POST":
            return None
        raw_type = headers.get(b"content-type")
        if raw_type is None:
            has_body = (length or 0) > 0 or (raw_length is None and b"transfer-encoding" in headers)
            return (415, f"Content-Type: missing; send the body as {JSON_MEDIA_TYPE}") if has_body else None
        verdict = self._type_verdicts.get(raw_type)
        if verdict is None:  # clients send one or two distinct values: parse each once
            verdict = _content_type_verdict(raw_type)
            if len(self._type_verdicts) < 256:
                self._type_verdicts[raw_type] = verdict
        return verdict or None

    async def _read_capped(self, receive: Receive, send: Send) -> Receive | None:
        """Reads a body without a Content-Length up to the cap; a receive that replays it (None: 413 sent)."""
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None  # the client went away
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.max_body_bytes:
                await _respond(send, 413, f"request body exceeds the limit of {self.max_body_bytes} bytes")
                return None
            if not message.get("more_body", False):
                break
        replay: list[Message] = [{"type": "http.request", "body": b"".join(parts), "more_body": False}]

        async def replayed() -> Message:
            return replay.pop() if replay else await receive()

        return replayed

    async def _send_openapi(self, send: Send) -> None:
        assert self.openapi is not None
        if self._openapi_body is None:
            self._openapi_body = json.dumps(self.openapi()).encode()
        body = self._openapi_body
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
