"""server_native's ceiling: the native side answers every request without calling Python.

`native_response` is one fixed body for every path, so this case serves the hello
workload only. It runs one I/O thread, as the nginx case runs one worker process:
unpinned, a second thread only competes with the load generator for the two cores."""

from __future__ import annotations

import argparse
import asyncio
import os

os.environ.setdefault("SERVER_NATIVE_THREADS", "1")  # read when the runtime starts

from _runner import bind_options, run

from server_native import NativeHttpServer


async def serve(options: argparse.Namespace) -> None:
    # Held in a local so the listener lives as long as this coroutine.
    _server = await NativeHttpServer.bind(
        "127.0.0.1", options.port, http3=False, native_response=b"Hello, World!",
        **bind_options(options),
    )  # fmt: skip
    await asyncio.Event().wait()


if __name__ == "__main__":
    run(serve)
