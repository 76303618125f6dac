"""HttpServer-style app on server_native: every request is answered by Python.

The `async for` loop answers the GET workloads inline (neither suspends). `POST /echo`
has to wait for its body, which may not have arrived yet: it runs as a task of its own,
as an HttpServer-style app would, so that one slow body does not hold up every request
behind it. `--callback` serves the same answers through `serve_native_http(handler)`:
each request is a call of the handler, whose waiting holds up no other. `--bridge` binds
with native_callback=False (requests cross a local socket)."""

from __future__ import annotations

import argparse
import asyncio

from _payloads import ECHO_PATH, TEN_K, TEN_K_PATH
from _runner import run

from server_native import (
    ClientDisconnected,
    HttpException,
    HttpRequest,
    NativeHttpServer,
    serve_native_http,
)


async def echo(request: HttpRequest) -> None:
    try:
        request.response.add(await request.read())
        await request.response.close()
    except (ClientDisconnected, HttpException):
        pass  # the client went away mid-request (a load generator stopping)


def write_answer(request: HttpRequest) -> None:
    """`GET /` and `GET /10k`: nothing to wait for."""
    if request.uri.path == TEN_K_PATH:
        request.response.add(TEN_K)
    else:
        request.response.write("Hello, World!")


async def handle(request: HttpRequest) -> None:
    if request.uri.path == ECHO_PATH:
        await echo(request)
        return
    try:
        write_answer(request)
        await request.response.close()
    except (ClientDisconnected, HttpException):
        pass  # the client went away mid-request (a load generator stopping)


async def serve(options: argparse.Namespace) -> None:
    bind = {"http3": False, "native_callback": not options.bridge}
    if options.callback:
        await serve_native_http(handle, "127.0.0.1", options.port, echo=False, **bind)
        return
    server = await NativeHttpServer.bind("127.0.0.1", options.port, **bind)
    echoes: set[asyncio.Task[None]] = set()  # strong references until each is done
    async for request in server:
        if request.uri.path == ECHO_PATH:
            task = asyncio.ensure_future(echo(request))
            echoes.add(task)
            task.add_done_callback(echoes.discard)
            continue
        try:
            write_answer(request)
            await request.response.close()
        except (ClientDisconnected, HttpException):
            pass


if __name__ == "__main__":
    run(serve)
