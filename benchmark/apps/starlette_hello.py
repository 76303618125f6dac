"""The three workloads as a Starlette app (`starlette_hello:app`), for every ASGI server."""

from __future__ import annotations

from _payloads import ECHO_PATH, HELLO, TEN_K, TEN_K_PATH
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route


async def hello(request: Request) -> Response:
    return PlainTextResponse(HELLO)


async def ten_k(request: Request) -> Response:
    return PlainTextResponse(TEN_K)


async def echo(request: Request) -> Response:
    return PlainTextResponse(await request.body())


app = Starlette(routes=[Route("/", hello), Route(TEN_K_PATH, ten_k), Route(ECHO_PATH, echo, methods=["POST"])])
