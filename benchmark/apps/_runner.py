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
    parser.add_argument("--certfile", help="serve over TLS with this certificate chain (PEM)")
    parser.add_argument("--keyfile", help="the private key of --certfile (PEM)")
    parser.add_argument(
        "--keep-alive-timeout", type=float, default=None,
        help="close a connection idle this many seconds (default: the server's)",
    )  # fmt: skip
    options = parser.parse_args()
    if (options.certfile is None) != (options.keyfile is None):
        parser.error("--certfile and --keyfile go together")
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(options))
    else:
        # uvloop.run picks the right loop-factory mechanism on Python 3.10-3.13.
        uvloop.run(serve(options))


def bind_options(options: argparse.Namespace) -> dict[str, Any]:
    """The bind options that --certfile, --keyfile and --keep-alive-timeout ask for."""
    from server_native import TlsConfig

    bind: dict[str, Any] = {}
    if options.certfile is not None:
        bind["tls"] = TlsConfig(certificate_path=options.certfile, key_path=options.keyfile)
    if options.keep_alive_timeout is not None:
        bind["idle_timeout"] = options.keep_alive_timeout
    return bind
