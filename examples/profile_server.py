"""A profiling target: the same four routes on the direct handler API or on
the HttpRequest API, so a profiler (py-spy, perf) shows where each one
spends its time.

    python examples/profile_server.py --mode=direct --port 8080
    python examples/profile_server.py --mode=direct --native-direct --port 8080
    python examples/profile_server.py --mode=http --port 8080

Routes: ``GET /health`` (JSON ok), ``GET /cpu?iterations=N`` (a pure-Python
loop, returns its result), ``POST /upload`` (reads the body, returns its
size), ``POST /echo`` (returns the body).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from urllib.parse import parse_qs

from server_native import (
    HttpRequest,
    NativeDirectRequest,
    NativeDirectResponse,
    serve_native_direct,
    serve_native_http,
)

DEFAULT_ITERATIONS = 100_000
MAX_ITERATIONS = 100_000_000
JSON = "application/json"
TEXT = "text/plain; charset=utf-8"


def cpu_work(iterations: int) -> int:
    """Pure-Python work that shows up in a profile under its own name."""
    total = 0
    for i in range(iterations):
        total = (total * 31 + i) % 1_000_003
    return total


def iterations_of(query: str) -> int | None:
    values = parse_qs(query).get("iterations")
    if not values:
        return DEFAULT_ITERATIONS
    try:
        iterations = int(values[0])
    except ValueError:
        return None
    return iterations if 0 <= iterations <= MAX_ITERATIONS else None


def cpu_answer(query: str) -> tuple[int, str, bytes]:
    iterations = iterations_of(query)
    if iterations is None:
        return 400, TEXT, f"iterations must be an integer from 0 to {MAX_ITERATIONS}".encode()
    result = cpu_work(iterations)
    return 200, JSON, json.dumps({"iterations": iterations, "result": result}).encode()


def size_answer(size: int) -> tuple[int, str, bytes]:
    return 200, JSON, json.dumps({"bytes": size}).encode()


ROUTES = {"/health": "GET", "/cpu": "GET", "/upload": "POST", "/echo": "POST"}


def misrouted(method: str, path: str) -> tuple[int, str, bytes] | None:
    """404 for an unknown path, 405 for a known one with the wrong method."""
    expected = ROUTES.get(path)
    if expected is None:
        return 404, TEXT, b"Not Found"
    if method != expected:
        return 405, TEXT, b"Method Not Allowed"
    return None


# ---------------------------------------------------------------- direct handler API

HEALTH = NativeDirectResponse.bytes(200, [("content-type", JSON)], b'{"ok":true}')


def direct(status: int, content_type: str, body: bytes) -> NativeDirectResponse:
    return NativeDirectResponse.bytes(status, [("content-type", content_type)], body)


async def handle_direct(request: NativeDirectRequest) -> NativeDirectResponse:
    """``--mode=direct``: an async handler on the event loop."""
    method, path = request.method, request.path
    if method == "GET" and path == "/health":
        return HEALTH
    if (wrong := misrouted(method, path)) is not None:
        return direct(*wrong)
    if path == "/cpu":
        return direct(*cpu_answer(request.query))
    if path == "/upload":
        size = 0
        async for chunk in request.body:  # streamed, never held whole
            size += len(chunk)
        return direct(*size_answer(size))
    body = await request.read()  # /echo
    return direct(200, request.header("content-type") or "application/octet-stream", body)


def handle_native_direct(request: NativeDirectRequest) -> NativeDirectResponse:
    """``--mode=direct --native-direct``: a sync handler on the native
    thread; the body has fully arrived before it runs."""
    method, path = request.method, request.path
    if method == "GET" and path == "/health":
        return HEALTH
    if (wrong := misrouted(method, path)) is not None:
        return direct(*wrong)
    if path == "/cpu":
        return direct(*cpu_answer(request.query))
    body = request.body_bytes()
    if path == "/upload":
        return direct(*size_answer(len(body)))
    return direct(200, request.header("content-type") or "application/octet-stream", body)


# ---------------------------------------------------------------- HttpRequest API


async def handle_http(request: HttpRequest) -> None:
    """``--mode=http``: the dart:io-style request/response objects."""
    response = request.response
    method, path = request.method, request.uri.path
    if method == "GET" and path == "/health":
        status, content_type, body = 200, JSON, b'{"ok":true}'
    elif (wrong := misrouted(method, path)) is not None:
        status, content_type, body = wrong
    elif path == "/cpu":
        status, content_type, body = cpu_answer(request.uri.query)
    elif path == "/upload":
        size = 0
        async for chunk in request:
            size += len(chunk)
        status, content_type, body = size_answer(size)
    else:  # /echo
        body = await request.read()
        status, content_type = 200, request.headers.value("content-type") or "application/octet-stream"
    response.status_code = status
    response.headers.set("content-type", content_type)
    response.add(body)
    await response.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["direct", "http"], default="direct")
    parser.add_argument("--native-direct", action="store_true", help="direct mode: a sync handler on the native thread")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    if args.mode == "http":
        if args.native_direct:
            parser.error("--native-direct needs --mode=direct")
        serving = serve_native_http(handle_http, host=args.host, port=args.port, http3=False)
    else:
        handler = handle_native_direct if args.native_direct else handle_direct
        serving = serve_native_direct(
            handler, host=args.host, port=args.port, native_direct=args.native_direct, http3=False
        )
    asyncio.run(serving)


if __name__ == "__main__":
    main()
