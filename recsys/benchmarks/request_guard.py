"""Per-request cost of the service's ASGI request guard (serving.middleware.RequestGuard), in process.

    python -m recsys.benchmarks.request_guard                 # 200,000 calls, 2 rounds

Calls a trivial ASGI app directly, then behind the guard, with the headers a typical client sends (host,
JSON content type and length, a 32-character key, accept, user agent), and prints microseconds per request
for both and their difference. No sockets: it isolates what the guard itself adds to a request.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from recsys.serving.middleware import RequestGuard

HEADERS = [
    (b"host", b"127.0.0.1:3000"),
    (b"content-type", b"application/json"),
    (b"content-length", b"60"),
    (b"x-api-key", b"k" * 32),
    (b"accept", b"*/*"),
    (b"user-agent", b"aiohttp"),
]


async def _app(scope: Any, receive: Any, send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"{}", "more_body": False}


async def _send(message: dict[str, Any]) -> None:
    return None


async def _time(target: Any, calls: int) -> float:
    scope = {"type": "http", "path": "/rank", "method": "POST", "headers": HEADERS}
    start = time.perf_counter()
    for _ in range(calls):
        await target(scope, _receive, _send)
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    guard = RequestGuard(_app, api_key="k" * 32, max_body_bytes=1 << 20, json_routes={"/rank", "/recommend"})
    for _ in range(args.rounds):
        bare = asyncio.run(_time(_app, args.calls))
        guarded = asyncio.run(_time(guard, args.calls))
        print(
            f"bare app {bare:.2f} us/request, behind RequestGuard {guarded:.2f} us/request, "
            f"guard {guarded - bare:.2f} us"
        )


if __name__ == "__main__":
    main()
