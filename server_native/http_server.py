"""`NativeHttpServer`: dart:io's HttpServer on the native transport: an async
iterable of requests."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import replace
from typing import Any, NamedTuple

from ._loader import native
from ._loop import EventPump, start_coroutine
from .addresses import resolve_bind_hosts
from .config import ServerConfig, TlsConfig
from .headers import ContentType, HttpHeaders
from .request import HttpRequest

__all__ = ["HttpConnectionsInfo", "NativeHttpServer", "RequestHandler"]

RequestHandler = Callable[[HttpRequest], Coroutine[Any, Any, None]]

_DEFAULT_HEADERS = (
    ("content-type", ContentType.text.value),
    ("x-frame-options", "SAMEORIGIN"),
    ("x-content-type-options", "nosniff"),
)

_BodyTooLarge = native.BodyTooLarge
logger = logging.getLogger("server_native")


class HttpConnectionsInfo(NamedTuple):
    total: int
    active: int
    idle: int
    closing: int


class NativeHttpServer:
    """A bound server. Iterate it (``async for request in server``) or give
    it a handler with :meth:`serve`; close it with :meth:`close`."""

    def __init__(self, config: ServerConfig, hosts: list[str], port: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._config = config
        self.default_response_headers = HttpHeaders(_DEFAULT_HEADERS)
        self.server_header: str | None = None
        self._synced: tuple[int, str | None] | None = None
        self._defaults: list[tuple[str, str]] = []
        self._default_charset = "utf-8"
        self._queue: collections.deque[HttpRequest] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._listeners = 0
        self._handler: RequestHandler | None = None
        self._closing: asyncio.Future[None] | None = None
        self._pump = EventPump(self._loop, self._on_request)
        try:
            self._native = native.NativeServer(config, hosts, port, self._pump.wake_fd)
        except BaseException:
            self._pump.detach()
            raise
        self._pump.attach(self._native)
        self._closed = self._loop.create_future()

    # -- binding ------------------------------------------------------------

    @classmethod
    async def bind(
        cls,
        address: str,
        port: int = 0,
        *,
        backlog: int = 0,
        v6_only: bool = False,
        shared: bool = False,
        http2: bool = True,
        http3: bool = True,
        native_callback: bool = True,
        config: ServerConfig | None = None,
        **limits: Any,
    ) -> NativeHttpServer:
        """Binds ``address`` (an IP, a host name, ``"localhost"`` or
        ``"any"``) on ``port`` (0 picks one free port for every interface).
        ``limits`` are :class:`ServerConfig` fields (``max_body_size``...)."""
        _check_transport(native_callback)
        base = config or ServerConfig()
        settings = replace(base, backlog=backlog, v6_only=v6_only, shared=shared, http2=http2, http3=http3, **limits)
        return cls(settings, resolve_bind_hosts(address, v6_only=v6_only), _port(port))

    @classmethod
    async def loopback(cls, port: int = 0, **options: Any) -> NativeHttpServer:
        """Binds every loopback interface (127.0.0.1 and ::1 when available)."""
        return await cls.bind("localhost", port, **options)

    @classmethod
    async def bind_secure(
        cls,
        address: str,
        port: int = 0,
        *,
        certificate_path: str | os.PathLike[str],
        key_path: str | os.PathLike[str],
        certificate_password: str | None = None,
        request_client_certificate: bool = False,
        require_client_certificate: bool = False,
        client_ca_path: str | os.PathLike[str] | None = None,
        http2: bool = True,
        **options: Any,
    ) -> NativeHttpServer:
        """Like :meth:`bind`, over TLS. A missing file, a bad key or a wrong
        password raises here, before anything is bound."""
        tls = TlsConfig(
            certificate_path=os.fspath(certificate_path),
            key_path=os.fspath(key_path),
            certificate_password=certificate_password,
            request_client_certificate=request_client_certificate,
            require_client_certificate=require_client_certificate,
            client_ca_path=None if client_ca_path is None else os.fspath(client_ca_path),
            http2=http2,
        )
        return await cls.bind(address, port, http2=http2, tls=tls, **options)

    @classmethod
    async def loopback_secure(cls, port: int = 0, **options: Any) -> NativeHttpServer:
        return await cls.bind_secure("localhost", port, **options)

    # -- properties ---------------------------------------------------------

    @property
    def port(self) -> int:
        return self._native.port  # type: ignore[no-any-return]

    @property
    def address(self) -> str:
        """The first bound address."""
        return self._native.addresses[0][0]  # type: ignore[no-any-return]

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return self._native.addresses  # type: ignore[no-any-return]

    @property
    def secure(self) -> bool:
        return self._config.tls is not None

    @property
    def config(self) -> ServerConfig:
        return self._config

    @property
    def idle_timeout(self) -> float | None:
        """Seconds an idle keep-alive connection stays open; None for ever."""
        value = self._native.idle_timeout
        return None if value == 0 else value  # type: ignore[no-any-return]

    @idle_timeout.setter
    def idle_timeout(self, seconds: float | None) -> None:
        self._native.idle_timeout = 0.0 if seconds is None else float(seconds)

    @property
    def auto_compress(self) -> bool:
        return self._config.auto_compress

    def connections_info(self) -> HttpConnectionsInfo:
        return HttpConnectionsInfo(*self._native.connections_info())

    def _native_defaults(self) -> None:
        """Syncs the native copy of the default headers and returns None, the
        header list that means "the defaults". Pushed again only after the
        headers or the server header change."""
        state = (self.default_response_headers._version, self.server_header)
        if state != self._synced:
            pairs = self.default_response_headers._pairs()
            if self.server_header is not None:
                pairs.append(("server", self.server_header))
            self._native.set_default_headers(pairs)
            content_type = self.default_response_headers.content_type
            self._default_charset = (content_type.charset if content_type else None) or "latin-1"
            self._synced = state

    # -- requests -----------------------------------------------------------

    def _on_request(self, native_request: Any) -> None:
        request = HttpRequest(native_request, self, self._loop)
        handler = self._handler
        if handler is not None:
            start_coroutine(self._loop, _handle(handler, request), _unexpected)
        elif self._listeners:
            self._queue.append(request)
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        else:
            request.response._respond_status(503, b"Service Unavailable: no listener")

    async def __aiter__(self) -> AsyncIterator[HttpRequest]:
        self._listeners += 1
        try:
            while True:
                while self._queue:
                    yield self._queue.popleft()
                if self._closing is not None:
                    return
                self._waiter = self._loop.create_future()
                await self._waiter
        finally:
            self._listeners -= 1
            self._waiter = None

    def serve(self, handler: RequestHandler) -> None:
        """Calls ``handler`` for every request from now on. A handler that
        raises gets the client a 500; the response is closed for it if it
        returns without closing."""
        self._handler = handler

    # -- closing ------------------------------------------------------------

    async def close(self, force: bool = False) -> None:
        """Stops accepting, lets in-flight requests finish (up to
        ``config.shutdown_timeout`` seconds), then closes. ``force`` aborts
        every connection at once."""
        if self._closing is None:
            self._closing = self._loop.create_future()
            self._native.close(force, None if force else self._config.shutdown_timeout, self._closing)
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif force:
            self._native.close(True, 0.0, self._loop.create_future())
        await asyncio.shield(self._closing)
        if not self._closed.done():
            self._pump.detach()
            self._closed.set_result(None)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    async def __aenter__(self) -> NativeHttpServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        scheme = "https" if self.secure else "http"
        return f"<NativeHttpServer {scheme} {self.addresses}>"


async def _handle(handler: RequestHandler, request: HttpRequest) -> None:
    response = request.response
    try:
        await handler(request)
    except _BodyTooLarge:
        response._respond_status(413, b"Request body too large")
    except Exception:
        logger.exception("request handler failed: %s %s", request.method, request.uri.path)
        response._abort_for_error()
    else:
        await response.close()


def _unexpected(exc: BaseException) -> None:
    if not isinstance(exc, asyncio.CancelledError):
        asyncio.get_running_loop().call_exception_handler({"message": "server_native handler crashed", "exception": exc})


def _check_transport(native_callback: bool) -> None:
    if not native_callback:
        raise NotImplementedError("native_callback=False (the socket bridge transport) is not available yet")


def _port(port: int) -> int:
    port = int(port)
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be between 0 and 65535, not {port}")
    return port
