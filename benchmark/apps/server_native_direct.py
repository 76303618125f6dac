"""Direct handler API on server_native (serve_native_direct), prebuilt responses.

Default: an async handler on the event loop (native_direct=False). `--sync`: a sync
handler called by the native side with native_direct=True (no event-loop hop).
`--bridge`: native_callback=False (requests cross a local socket)."""

from __future__ import annotations

import argparse

from _payloads import ECHO_PATH, HELLO, TEN_K, TEN_K_PATH
from _runner import bind_options, run

from server_native import NativeDirectRequest, NativeDirectResponse, serve_native_direct

HEADERS = [("content-type", "text/plain")]
HELLO_RESPONSE = NativeDirectResponse.bytes(200, HEADERS, HELLO)
TEN_K_RESPONSE = NativeDirectResponse.bytes(200, HEADERS, TEN_K)


async def handle_async(request: NativeDirectRequest) -> NativeDirectResponse:
    path = request.path
    if path == ECHO_PATH:
        return NativeDirectResponse.bytes(200, HEADERS, await request.read())
    return TEN_K_RESPONSE if path == TEN_K_PATH else HELLO_RESPONSE


def handle_sync(request: NativeDirectRequest) -> NativeDirectResponse:
    path = request.path
    if path == ECHO_PATH:
        # With native_direct=True the body has fully arrived before the handler runs.
        return NativeDirectResponse.bytes(200, HEADERS, request.body_bytes())
    return TEN_K_RESPONSE if path == TEN_K_PATH else HELLO_RESPONSE


async def serve(options: argparse.Namespace) -> None:
    await serve_native_direct(
        handle_sync if options.sync else handle_async,
        "127.0.0.1", options.port,
        native_direct=options.sync, native_callback=not options.bridge,
        http3=False, echo=False, **bind_options(options),
    )  # fmt: skip


if __name__ == "__main__":
    run(serve)
