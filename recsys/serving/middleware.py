"""ASGI middleware of the recommendation service.

``ConnectionRecycler`` spreads keep-alive clients over the worker processes. The workers share one listening
socket and a client keeps the connection it opened first, so 32 clients can settle as 23 on one worker and
9 on the other (seen under the load test). Then one core is saturated and the other half idle, and the
busy worker's clients set the tail latency. Ending every n-th response of a worker with ``Connection:
close`` makes its clients reconnect from time to time. A reconnect is accepted by whichever worker gets
back to its event loop first, which is usually the less loaded one, so the load evens out. nginx's
``keepalive_requests`` does the same.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

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
