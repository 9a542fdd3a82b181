"""serving.middleware.ConnectionRecycler: every n-th response closes its keep-alive connection."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from recsys.serving.middleware import ConnectionRecycler


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
