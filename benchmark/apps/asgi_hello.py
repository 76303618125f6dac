"""Raw ASGI 3 app (no framework), served by uvicorn and by Granian as `asgi_hello:app`.

`GET /` hello, `GET /10k` 10 KiB, `POST /echo` echoes the request body (see _payloads)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from _payloads import ECHO_PATH, HELLO, TEN_K, TEN_K_PATH

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def headers(length: int) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", b"text/plain"), (b"content-length", str(length).encode())]


HELLO_START = {"type": "http.response.start", "status": 200, "headers": headers(len(HELLO))}
HELLO_BODY = {"type": "http.response.body", "body": HELLO}
TEN_K_START = {"type": "http.response.start", "status": 200, "headers": headers(len(TEN_K))}
TEN_K_BODY = {"type": "http.response.body", "body": TEN_K}


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def echo(receive: Receive, send: Send) -> None:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    await send({"type": "http.response.start", "status": 200, "headers": headers(len(body))})
    await send({"type": "http.response.body", "body": body})


async def app(scope: Message, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    path = scope["path"]
    if path == ECHO_PATH:
        await echo(receive, send)
    elif path == TEN_K_PATH:
        await send(TEN_K_START)
        await send(TEN_K_BODY)
    else:
        await send(HELLO_START)
        await send(HELLO_BODY)
