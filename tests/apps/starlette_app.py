"""A Starlette application exercising what a real app uses: routing with
path parameters, query strings, JSON, forms and multipart uploads, large
streamed bodies, streaming responses that a test can gate, FileResponse (via
``http.response.pathsend`` where the server offers it), cookies, errors,
lifespan state and ``root_path``.

``SENT`` records the ASGI message types each traced request sent (requests
carrying ``x-trace: <id>``), so tests can see which path a response took."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route

#: x-trace id -> ASGI message types sent for that request
SENT: dict[str, list[str]] = {}
#: stream id -> gate the streaming generator waits on between chunks
GATES: dict[str, threading.Event] = {}
#: infinite stream id -> "running" / "stopped"
INFINITE: dict[str, str] = {}
#: what the lifespan saw: "startup", "shutdown"
LIFESPAN_EVENTS: list[str] = []


def gate(name: str) -> threading.Event:
    return GATES.setdefault(name, threading.Event())


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    LIFESPAN_EVENTS.append("startup")
    yield {"greeting": "hello from lifespan", "counter": [0]}
    LIFESPAN_EVENTS.append("shutdown")


async def home(request: Request) -> Response:
    return PlainTextResponse("home")


async def item(request: Request) -> Response:
    return JSONResponse(
        {"item_id": request.path_params["item_id"], "type": type(request.path_params["item_id"]).__name__}
    )


async def user_file(request: Request) -> Response:
    return JSONResponse({"user": request.path_params["user"], "rest": request.path_params["rest"]})


async def raw_view(request: Request) -> Response:
    return JSONResponse(
        {
            "path": request.scope["path"],
            "raw_path": request.scope["raw_path"].decode("latin-1"),
            "rest": request.path_params["rest"],
        }
    )


async def scope_view(request: Request) -> Response:
    scope = request.scope
    return JSONResponse(
        {
            "http_version": scope["http_version"],
            "method": scope["method"],
            "scheme": scope["scheme"],
            "path": scope["path"],
            "raw_path": scope["raw_path"].decode("latin-1"),
            "query_string": scope["query_string"].decode("latin-1"),
            "root_path": scope["root_path"],
            "client": list(scope["client"]) if scope.get("client") else None,
            "server": list(scope["server"]) if scope.get("server") else None,
            "extensions": sorted(scope.get("extensions") or {}),
            "tls": (scope.get("extensions") or {}).get("tls"),
            "asgi": scope["asgi"],
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
            "query": request.query_params.multi_items(),
            "url": str(request.url),
        }
    )


async def echo_json(request: Request) -> Response:
    data = await request.json()
    return JSONResponse({"received": data, "content_type": request.headers.get("content-type")})


async def form(request: Request) -> Response:
    async with request.form(max_part_size=8 * 1024 * 1024) as parsed:
        fields: dict[str, Any] = {}
        for key, value in parsed.multi_items():
            if isinstance(value, str):
                fields.setdefault(key, []).append(value)
            else:
                content = await value.read()
                fields.setdefault(key, []).append(
                    {
                        "filename": value.filename,
                        "content_type": value.content_type,
                        "size": len(content),
                        "sha256": hashlib.sha256(content).hexdigest(),
                    }
                )
    return JSONResponse(fields)


async def upload(request: Request) -> Response:
    digest = hashlib.sha256()
    size = 0
    chunks = 0
    async for chunk in request.stream():
        digest.update(chunk)
        size += len(chunk)
        chunks += 1
    return JSONResponse({"size": size, "sha256": digest.hexdigest(), "chunks": chunks})


async def stream(request: Request) -> Response:
    """Yields ``count`` chunks; with ``gate=<id>`` waits (bounded) for the
    test to open the gate after each chunk, so the test can prove a chunk
    arrived while the generator was still running."""
    count = int(request.query_params.get("count", "3"))
    name = request.query_params.get("gate")

    async def chunks() -> AsyncIterator[bytes]:
        for index in range(count):
            yield f"chunk-{index};".encode()
            if name is not None and index < count - 1:
                event = gate(f"{name}-{index}")
                deadline = time.monotonic() + 10
                while not event.is_set():  # bounded; plain asyncio, no worker thread
                    if time.monotonic() > deadline:
                        yield b"gate-timeout;"
                        return
                    await asyncio.sleep(0.005)

    return StreamingResponse(chunks(), media_type="text/plain")


async def file(request: Request) -> Response:
    path = request.query_params["path"]
    # prestat=1 hands FileResponse its stat result, so it does not stat the
    # file in a worker thread (anyio.to_thread) before sending.
    stat_result = os.stat(path) if request.query_params.get("prestat") else None
    return FileResponse(path, media_type="application/octet-stream", filename="data.bin", stat_result=stat_result)


def sync_endpoint(request: Request) -> Response:
    """A plain ``def`` endpoint: Starlette runs it in its thread pool."""
    return PlainTextResponse(f"sync in {threading.current_thread().name != 'MainThread'}")


async def infinite(request: Request) -> Response:
    """An endless stream (like server-sent events); ``INFINITE[id]`` says
    whether its generator has been stopped."""
    name = request.query_params["id"]
    INFINITE[name] = "running"

    async def forever() -> AsyncIterator[bytes]:
        try:
            for _ in range(6000):  # about a minute: "endless" for any test, yet bounded
                yield b"tick\n"
                await asyncio.sleep(0.01)
            INFINITE[name] = "ran to the end"
        finally:
            if INFINITE[name] == "running":
                INFINITE[name] = "stopped"

    return StreamingResponse(forever(), media_type="text/plain")


async def infinite_status(request: Request) -> Response:
    return JSONResponse({"state": INFINITE.get(request.query_params["id"])})


async def set_cookies(request: Request) -> Response:
    response = PlainTextResponse("cookies set")
    response.set_cookie("session", "abc123", httponly=True, samesite="lax")
    response.set_cookie("theme", "dark", max_age=3600, path="/")
    return response


async def get_cookies(request: Request) -> Response:
    return JSONResponse(dict(request.cookies))


async def teapot(request: Request) -> Response:
    raise HTTPException(status_code=418, detail="I'm a teapot", headers={"x-reason": "short and stout"})


async def boom(request: Request) -> Response:
    raise RuntimeError("boom (expected by the test)")


async def state(request: Request) -> Response:
    counter = request.state.counter
    counter[0] += 1
    return JSONResponse({"greeting": request.state.greeting, "counter": counter[0]})


async def redirect(request: Request) -> Response:
    return RedirectResponse(url=request.url_for("home"), status_code=303)


async def named(request: Request) -> Response:
    return PlainTextResponse(str(request.url_for("item", item_id=7)))


async def inner(request: Request) -> Response:
    return PlainTextResponse(f"inner root_path={request.scope['root_path']}")


sub = Starlette(routes=[Route("/inner", inner)])

routes = [
    Route("/", home, name="home"),
    Route("/items/{item_id:int}", item, name="item"),
    Route("/users/{user}/files/{rest:path}", user_file),
    Route("/raw/{rest:path}", raw_view),
    Route("/scope", scope_view, methods=["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
    Route("/json", echo_json, methods=["POST"]),
    Route("/form", form, methods=["POST"]),
    Route("/upload", upload, methods=["POST", "PUT"]),
    Route("/stream", stream),
    Route("/file", file),
    Route("/cookies/set", set_cookies),
    Route("/cookies/get", get_cookies),
    Route("/teapot", teapot),
    Route("/boom", boom),
    Route("/state", state),
    Route("/redirect", redirect),
    Route("/named", named),
    Route("/sync", sync_endpoint),
    Route("/infinite", infinite),
    Route("/infinite/status", infinite_status),
    Mount("/sub", app=sub),
]

starlette_app = Starlette(routes=routes, lifespan=lifespan)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """``starlette_app`` with the message types of traced requests recorded."""
    if scope["type"] != "http":
        await starlette_app(scope, receive, send)
        return
    trace = dict(scope["headers"]).get(b"x-trace")
    if trace is None:
        await starlette_app(scope, receive, send)
        return
    sent = SENT.setdefault(trace.decode(), [])

    async def recording_send(message: dict[str, Any]) -> None:
        sent.append(message["type"])
        await send(message)

    await starlette_app(scope, receive, recording_send)
