"""Shared entry point of the server_native apps: parse the options, run on uvloop if installed."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

Serve = Callable[[argparse.Namespace], Coroutine[Any, Any, None]]


def run(serve: Serve) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--bridge", action="store_true",
        help="the socket bridge transport (native_callback=False) instead of in-process calls",
    )  # fmt: skip
    parser.add_argument("--sync", action="store_true", help="direct app: native_direct=True")
    parser.add_argument("--callback", action="store_true", help="HttpServer-style app: serve_native_http(handler)")
    options = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(options))
    else:
        # uvloop.run picks the right loop-factory mechanism on Python 3.10-3.13.
        uvloop.run(serve(options))
