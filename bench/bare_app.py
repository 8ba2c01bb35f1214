"""The floor of any Python HTTP service: an ASGI app that reads the body and answers a fixed
JSON object, no routing, no middleware, no parsing. Served by uvicorn for the benchmark."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

ANSWER = b'{"outputs":[]}'


async def app(scope: dict, receive: Callable[[], Awaitable[dict]],
              send: Callable[[dict], Awaitable[None]]) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(ANSWER)).encode())]})
    await send({"type": "http.response.body", "body": ANSWER})
