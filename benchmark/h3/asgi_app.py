"""The raw ASGI 3 app (no framework) that Hypercorn serves over HTTP/3:
``GET /`` answers ``Hello, World!``, ``POST /echo`` sends the request body
back. ``native_app.py`` answers the same two requests on server_native."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

HELLO = b"Hello, World!"


def start(length: int) -> Message:
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(length).encode())]
    return {"type": "http.response.start", "status": 200, "headers": headers}


HELLO_START = start(len(HELLO))
HELLO_BODY = {"type": "http.response.body", "body": HELLO}


async def app(scope: Message, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["path"] == "/echo":
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        await send(start(len(body)))
        await send({"type": "http.response.body", "body": body})
        return
    await send(HELLO_START)
    await send(HELLO_BODY)
