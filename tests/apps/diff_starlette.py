"""The Starlette app of the differential test (``tests/test_differential.py``):
deterministic answers only (nothing that depends on the server's port or the
client's address), so two servers can be compared byte for byte."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

LARGE = bytes(range(256)) * 4096  # 1 MiB


async def home(request: Request) -> Response:
    return PlainTextResponse("hello")


async def json_view(request: Request) -> Response:
    return JSONResponse({"a": 1, "b": [1, 2, 3], "unicode": "é✓"})


async def item(request: Request) -> Response:
    return JSONResponse({"id": request.path_params["item_id"], "query": request.query_params.multi_items()})


async def echo(request: Request) -> Response:
    body = await request.body()
    return JSONResponse(
        {
            "method": request.method,
            "path": request.url.path,
            "query": request.url.query,
            "body_length": len(body),
            "body_head": body[:64].decode("latin-1"),
            "content_type": request.headers.get("content-type"),
            "x_custom": request.headers.getlist("x-custom"),
            "cookie": request.headers.get("cookie"),
        }
    )


async def headers(request: Request) -> Response:
    response = PlainTextResponse("headers")
    response.headers["x-one"] = "1"
    response.headers.append("x-multi", "a")
    response.headers.append("x-multi", "b")
    response.headers["cache-control"] = "no-store"
    return response


async def status(request: Request) -> Response:
    code = request.path_params["code"]
    if code in (204, 304):
        return Response(status_code=code)
    return PlainTextResponse(f"status {code}", status_code=code)


async def redirect(request: Request) -> Response:
    return RedirectResponse("/", status_code=302)


async def set_cookies(request: Request) -> Response:
    response = PlainTextResponse("cookies")
    response.set_cookie("a", "1", path="/")
    response.set_cookie("b", "two words", httponly=True, path="/")
    return response


async def stream(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for index in range(10):
            yield f"chunk {index}\n".encode()

    return StreamingResponse(chunks(), media_type="text/plain")


async def large(request: Request) -> Response:
    return Response(LARGE, media_type="application/octet-stream")


async def binary(request: Request) -> Response:
    return Response(bytes(range(256)), media_type="application/octet-stream")


async def empty(request: Request) -> Response:
    return Response(b"", media_type="text/plain")


async def unicode_path(request: Request) -> Response:
    return PlainTextResponse(request.path_params["word"])


async def error(request: Request) -> Response:
    raise RuntimeError("boom (expected by the differential test)")


app = Starlette(
    routes=[
        Route("/", home, methods=["GET", "HEAD"]),
        Route("/json", json_view),
        Route("/items/{item_id:int}", item),
        Route("/echo", echo, methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
        Route("/headers", headers),
        Route("/status/{code:int}", status),
        Route("/redirect", redirect),
        Route("/set-cookies", set_cookies),
        Route("/stream", stream),
        Route("/large", large),
        Route("/binary", binary),
        Route("/empty", empty),
        Route("/unicode/{word}", unicode_path),
        Route("/error", error),
    ]
)
