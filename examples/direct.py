import asyncio
import os
import sys

from server_native import NativeDirectRequest, NativeDirectResponse, serve_native_direct

JSON = [("content-type", "application/json")]
TEXT = [("content-type", "text/plain; charset=utf-8")]

# Built once and returned as is for every request: already in wire form.
HEALTH = NativeDirectResponse.bytes(200, JSON, b'{"ok":true}')
NOT_FOUND = NativeDirectResponse.bytes(404, TEXT, b"Not Found")


async def handle(request: NativeDirectRequest) -> NativeDirectResponse:
    # native_direct=False: runs on the event loop, may await, streams bodies.
    if request.method == "GET" and request.path == "/health":
        return HEALTH
    if request.method == "POST" and request.path == "/echo":
        body = await request.read()  # or: async for chunk in request.body
        return NativeDirectResponse.bytes(200, TEXT, b"echo: " + body)
    return NOT_FOUND


def handle_native(request: NativeDirectRequest) -> NativeDirectResponse:
    # native_direct=True: a plain function on the native thread, no event
    # loop; the whole body has arrived before it is called.
    if request.method == "GET" and request.path == "/health":
        return HEALTH
    if request.method == "POST" and request.path == "/echo":
        return NativeDirectResponse.bytes(200, TEXT, b"echo: " + request.body_bytes())
    return NOT_FOUND


port = int(os.environ.get("PORT", "8080"))
native = os.environ.get("MODE") == "native" or "--native" in sys.argv[1:]
asyncio.run(
    serve_native_direct(
        handle_native if native else handle,
        host="127.0.0.1",
        port=port,
        native_direct=native,
        http3=False,
    )
)
