"""Callback-style boot helpers: bind, call a handler for every request, and
run until a shutdown signal (an awaitable, SIGINT or SIGTERM)."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

from ..runtime.serving import serve_bound
from .server import NativeHttpServer, RequestHandler

__all__ = [
    "NativeMultiServer",
    "NativeServerBind",
    "serve_native",
    "serve_native_http",
    "serve_native_multi",
    "serve_secure_native",
    "serve_secure_native_http",
    "serve_secure_native_multi",
]


@dataclass(frozen=True)
class NativeServerBind:
    """One listener of a multi-bind server."""

    host: str
    port: int


async def serve_native_http(
    handler: RequestHandler,
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    echo: bool = True,
    shutdown_signal: Awaitable[Any] | None = None,
    **options: Any,
) -> None:
    """Serves ``handler`` on ``host:port`` until ``shutdown_signal``
    completes or the process gets SIGINT/SIGTERM (the first drains, the
    second stops at once). ``echo`` logs where it listens (logger
    ``server_native.error``, INFO). ``options`` are those of
    ``NativeHttpServer.bind``."""
    server = await NativeHttpServer.bind(host, port, **options)
    await serve_bound([server], handler, echo, shutdown_signal)


async def serve_secure_native_http(
    handler: RequestHandler,
    address: str = "localhost",
    port: int = 443,
    *,
    certificate_path: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
    echo: bool = True,
    shutdown_signal: Awaitable[Any] | None = None,
    **options: Any,
) -> None:
    """:func:`serve_native_http` over TLS (``NativeHttpServer.bind_secure``)."""
    server = await NativeHttpServer.bind_secure(
        address, port, certificate_path=certificate_path, key_path=key_path, **options
    )
    await serve_bound([server], handler, echo, shutdown_signal)


serve_native = serve_native_http
serve_secure_native = serve_secure_native_http


async def serve_native_multi(
    handler: RequestHandler,
    binds: Sequence[NativeServerBind],
    *,
    echo: bool = True,
    shutdown_signal: Awaitable[Any] | None = None,
    **options: Any,
) -> None:
    """One handler on an explicit list of listeners."""
    servers = await _bind_all(binds, lambda b: NativeHttpServer.bind(b.host, b.port, **options))
    await serve_bound(servers, handler, echo, shutdown_signal)


async def serve_secure_native_multi(
    handler: RequestHandler,
    binds: Sequence[NativeServerBind],
    *,
    certificate_path: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
    echo: bool = True,
    shutdown_signal: Awaitable[Any] | None = None,
    **options: Any,
) -> None:
    servers = await _bind_all(
        binds,
        lambda b: NativeHttpServer.bind_secure(
            b.host, b.port, certificate_path=certificate_path, key_path=key_path, **options
        ),
    )
    await serve_bound(servers, handler, echo, shutdown_signal)


class NativeMultiServer:
    """Callback-style serving with http_multi_server address semantics:
    ``"localhost"`` is every loopback interface, ``"any"`` every interface."""

    @staticmethod
    async def bind(handler: RequestHandler, address: str, port: int = 0, **options: Any) -> None:
        await serve_native_http(handler, address, port, **options)

    @staticmethod
    async def loopback(handler: RequestHandler, port: int = 0, **options: Any) -> None:
        await serve_native_http(handler, "localhost", port, **options)

    @staticmethod
    async def bind_secure(handler: RequestHandler, address: str, port: int = 0, **options: Any) -> None:
        await serve_secure_native_http(handler, address, port, **options)

    @staticmethod
    async def loopback_secure(handler: RequestHandler, port: int = 0, **options: Any) -> None:
        await serve_secure_native_http(handler, "localhost", port, **options)


async def _bind_all(binds: Sequence[NativeServerBind], bind: Any) -> list[NativeHttpServer]:
    if not binds:
        raise ValueError("binds must name at least one NativeServerBind")
    servers: list[NativeHttpServer] = []
    try:
        for spec in binds:
            servers.append(await bind(spec))
    except BaseException:
        for server in servers:
            await server.close(force=True)
        raise
    return servers
