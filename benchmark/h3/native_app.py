"""The benchmark app on server_native, HttpServer style (every request goes
through Python): ``GET /`` answers ``Hello, World!``, ``POST /echo`` sends
the request body back, as ``../apps/asgi_hello.py`` does for Hypercorn.

With ``--cert``/``--key`` it serves TLS with HTTP/1.1, HTTP/2 and HTTP/3
(QUIC on the same port number); without them plaintext HTTP/1.1 and h2c.
``--rust-only`` answers every request natively (``native_response``) to show
the transport's own ceiling."""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from server_native import (
    ClientDisconnected,
    HttpException,
    HttpRequest,
    NativeHttpServer,
)

HELLO = b"Hello, World!"


async def echo(request: HttpRequest) -> None:
    try:
        request.response.add(await request.read())
        await request.response.close()
    except (ClientDisconnected, HttpException):
        pass  # the load generator stopped mid-request


async def serve(options: argparse.Namespace) -> None:
    extra: dict[str, Any] = {"native_response": HELLO} if options.rust_only else {}
    if options.cert:
        server = await NativeHttpServer.bind_secure(
            "127.0.0.1", options.port, certificate_path=options.cert, key_path=options.key, http3=True, **extra
        )
    else:
        server = await NativeHttpServer.bind("127.0.0.1", options.port, **extra)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.close(force=True)))
    print(f"listening on {server.port}", flush=True)
    echoes: set[asyncio.Task[None]] = set()  # strong references until each is done
    async for request in server:
        if request.uri.path == "/echo":
            task = asyncio.ensure_future(echo(request))
            echoes.add(task)
            task.add_done_callback(echoes.discard)
            continue
        try:
            request.response.add(HELLO)
            await request.response.close()
        except (ClientDisconnected, HttpException):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--rust-only", action="store_true")
    options = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(options))
    else:
        uvloop.run(serve(options))


if __name__ == "__main__":
    main()
