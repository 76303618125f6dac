"""Shared entry point of the server_native apps: parse --port, run on uvloop if installed."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

Serve = Callable[[int], Coroutine[Any, Any, None]]


def run(serve: Serve) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(port))
    else:
        # uvloop.run picks the right loop-factory mechanism on Python 3.10-3.13.
        uvloop.run(serve(port))
