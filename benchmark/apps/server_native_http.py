"""HttpServer-style app on server_native: every request is answered by Python.

The `async for` loop of the first cut answers the GET workloads inline (neither
suspends). `POST /echo` has to wait for its body, which may not have arrived yet: it
runs as a task of its own, as an HttpServer-style app would, so that one slow body does
not hold up every request behind it. `--bridge` binds with native_callback=False
(requests cross a local socket)."""

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
)


async def echo(request: HttpRequest) -> None:
    try:
        request.response.add(await request.read())
        await request.response.close()
    except (ClientDisconnected, HttpException):
        pass  # the client went away mid-request (a load generator stopping)


async def serve(options: argparse.Namespace) -> None:
    server = await NativeHttpServer.bind(
        "127.0.0.1", options.port, http3=False, native_callback=not options.bridge
    )
    echoes: set[asyncio.Task[None]] = set()  # strong references until each is done
    async for request in server:
        path = request.uri.path
        if path == ECHO_PATH:
            task = asyncio.ensure_future(echo(request))
            echoes.add(task)
            task.add_done_callback(echoes.discard)
            continue
        try:
            if path == TEN_K_PATH:
                request.response.add(TEN_K)
            else:
                request.response.write("Hello, World!")
            await request.response.close()
        except (ClientDisconnected, HttpException):
            pass  # the client went away mid-request (a load generator stopping)


if __name__ == "__main__":
    run(serve)
