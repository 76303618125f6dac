"""`NativeHttpServer`: dart:io's HttpServer on the native transport: an async
iterable of requests."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

from .._dist.loader import native
from ..runtime.bound import (
    BoundServer,
    HttpConnectionsInfo,
    bind_settings,
    tls_settings,
)
from ..runtime.config import ServerConfig
from ..runtime.contract import Request
from .headers import ContentType, HttpHeaders
from .request import HttpRequest
from .response import _CLOSED

__all__ = ["HttpConnectionsInfo", "NativeHttpServer", "RequestHandler"]

RequestHandler = Callable[[HttpRequest], Coroutine[Any, Any, None]]

_DEFAULT_HEADERS = (
    ("content-type", ContentType.text.value),
    ("x-frame-options", "SAMEORIGIN"),
    ("x-content-type-options", "nosniff"),
)

_BodyTooLarge = native.BodyTooLarge


class NativeHttpServer(BoundServer):
    """A bound server. Iterate it (``async for request in server``) or give
    it a handler with :meth:`serve`; close it with :meth:`close`."""

    def __init__(self, config: ServerConfig, hosts: list[str], port: int) -> None:
        self.default_response_headers = HttpHeaders(_DEFAULT_HEADERS)
        self.server_header: str | None = None
        #: What the native copy of the default headers was made from.
        self._synced_headers: HttpHeaders | None = None
        self._synced_version = -1
        self._synced_server: str | None = None
        self._default_charset = "utf-8"
        self._queue: collections.deque[HttpRequest] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._listeners = 0
        self._handler: RequestHandler | None = None
        super().__init__(config, hosts, port)

    # -- binding ------------------------------------------------------------

    @classmethod
    async def bind(cls, address: str, port: int = 0, **options: Any) -> NativeHttpServer:
        """Binds ``address`` (an IP, a host name, ``"localhost"`` or
        ``"any"``) on ``port`` (0 picks one free port for every interface).
        Options: ``backlog``, ``v6_only``, ``shared``, ``http2``, ``http3``,
        ``native_callback``, ``config`` and any :class:`ServerConfig` field."""
        return cls(*bind_settings(address, port, **options))

    @classmethod
    async def bind_unix(cls, path: str | os.PathLike[str], **options: Any) -> NativeHttpServer:
        """Binds a Unix domain socket at ``path`` (HTTP/1.1 and h2c). A stale
        socket file is replaced; the file is removed on close. Options as for
        :meth:`bind`, and ``uds_mode`` (e.g. ``0o660``)."""
        return cls(*bind_settings("", uds=path, **options))

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
        ciphers: str | Sequence[str] | None = None,
        protocol_min: str = "tls1.2",
        crl_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] = (),
        **options: Any,
    ) -> NativeHttpServer:
        """Like :meth:`bind`, over TLS. A missing file, a bad key or a wrong
        password raises here, before anything is bound. ``ciphers``,
        ``protocol_min`` and ``crl_paths`` as in :class:`TlsConfig`."""
        tls = tls_settings(
            certificate_path=certificate_path,
            key_path=key_path,
            certificate_password=certificate_password,
            request_client_certificate=request_client_certificate,
            require_client_certificate=require_client_certificate,
            client_ca_path=client_ca_path,
            http2=http2,
            ciphers=ciphers,
            protocol_min=protocol_min,
            crl_paths=crl_paths,
        )
        return await cls.bind(address, port, http2=http2, tls=tls, **options)

    @classmethod
    async def loopback_secure(cls, port: int = 0, **options: Any) -> NativeHttpServer:
        return await cls.bind_secure("localhost", port, **options)

    # -- properties ---------------------------------------------------------

    @property
    def auto_compress(self) -> bool:
        return self._config.auto_compress

    def _native_defaults(self) -> str:
        """Syncs the native copy of the default headers (the header list None
        means "the defaults") and returns their charset. Pushed again only
        after the headers or the server header change."""
        headers = self.default_response_headers
        if (
            headers._version != self._synced_version
            or headers is not self._synced_headers
            or self.server_header != self._synced_server
        ):
            pairs = headers._pairs()
            if self.server_header is not None:
                pairs.append(("server", self.server_header))
            self._native.set_default_headers(pairs)
            content_type = headers.content_type
            self._default_charset = (content_type.charset if content_type else None) or "latin-1"
            self._synced_headers, self._synced_version, self._synced_server = (
                headers,
                headers._version,
                self.server_header,
            )
        return self._default_charset

    # -- requests -----------------------------------------------------------

    def _on_request(self, native_request: Request) -> None:
        request = HttpRequest(native_request, self, self._loop)
        handler = self._handler
        if handler is not None:
            self._runner.start(_handle(handler, request))
        elif self._listeners:
            self._queue.append(request)
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        else:
            request.response._respond_status(503, b"Service Unavailable")

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

    def _on_closing(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

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
        logging.getLogger("server_native").exception("request handler failed: %s %s", request.method, request.uri.path)
        response._abort_for_error()
    else:
        if response._state != _CLOSED:  # not closed by the handler
            await response.close()
