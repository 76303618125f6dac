"""`HttpRequest`: the request side of dart:io's HttpRequest, over a native
exchange."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import SplitResult, parse_qs, parse_qsl

from ..runtime.contract import Request
from ..runtime.loop import body_chunks
from .cookies import Cookie, parse_cookie_header
from .headers import HttpHeaders, wire_headers
from .response import HttpResponse

if TYPE_CHECKING:
    from .server import NativeHttpServer

__all__ = ["HttpConnectionInfo", "HttpRequest", "Uri"]


class Uri(SplitResult):
    """A parsed URI (``urllib.parse.SplitResult``) with dart's query helpers.
    Path and query stay percent-encoded, as sent."""

    __slots__ = ()

    @property
    def query_parameters(self) -> dict[str, str]:
        """The last value of each query parameter, decoded."""
        return dict(parse_qsl(self.query, keep_blank_values=True))

    @property
    def query_parameters_all(self) -> dict[str, list[str]]:
        return parse_qs(self.query, keep_blank_values=True)


#: Builds a Uri from its five parts without the Python-level ``__new__``.
_new_uri = tuple.__new__


class HttpConnectionInfo(NamedTuple):
    remote_address: str
    remote_port: int
    local_port: int


class HttpRequest:
    """One incoming request. Read the body with ``async for chunk in request``
    or ``await request.read()``; answer through ``request.response``."""

    __slots__ = ("_native", "_server", "_loop", "_headers", "_uri", "_cookies", "response", "__weakref__")

    def __init__(self, native_request: Request, server: NativeHttpServer, loop: asyncio.AbstractEventLoop) -> None:
        self._native = native_request
        self._server = server
        self._loop = loop
        self._headers: HttpHeaders | None = None
        self._uri: Uri | None = None
        self._cookies: list[Cookie] | None = None
        self.response = HttpResponse(native_request, server, loop)

    @property
    def method(self) -> str:
        return self._native.method

    @property
    def uri(self) -> Uri:
        """The request target: path and query as sent."""
        uri = self._uri
        if uri is None:
            native = self._native
            uri = self._uri = _new_uri(Uri, ("", "", native.path, native.query, ""))
        return uri

    @property
    def requested_uri(self) -> Uri:
        """The full URL the client asked for: scheme, authority, path, query."""
        native = self._native
        host, port = native.local_addr
        authority = native.authority or (f"{host}:{port}" if port is not None else "localhost")
        return Uri(native.scheme, authority, native.path, native.query, "")

    @property
    def scheme(self) -> str:
        return self._native.scheme

    @property
    def headers(self) -> HttpHeaders:
        if self._headers is None:
            self._headers = wire_headers(self._native)
        return self._headers

    @property
    def protocol_version(self) -> str:
        """``"1.0"``, ``"1.1"``, ``"2"`` or ``"3"``."""
        return self._native.http_version

    @property
    def connection_info(self) -> HttpConnectionInfo:
        """The real client address and port, and the local port. Over a Unix
        socket there are none: ``("", 0, 0)`` (dart:io reports port 0 there,
        gunicorn an empty ``REMOTE_ADDR``)."""
        remote = self._native.remote_addr
        if remote is None:
            return HttpConnectionInfo("", 0, 0)
        return HttpConnectionInfo(remote[0], remote[1], self._native.local_addr[1] or 0)

    @property
    def certificate(self) -> bytes | None:
        """The client's certificate (DER) when it sent one. It was verified
        only if the server was given ``client_ca_path``."""
        return self._native.peer_certificate

    @property
    def cookies(self) -> list[Cookie]:
        if self._cookies is None:
            self._cookies = [c for value in self.headers.get_all("cookie") for c in parse_cookie_header(value)]
        return self._cookies

    @property
    def content_length(self) -> int:
        """The declared body length, or -1 when there is none (chunked, HTTP/2)."""
        length = self._native.content_length
        return -1 if length is None else int(length)

    @property
    def persistent_connection(self) -> bool:
        return self.headers.persistent_connection

    def __aiter__(self) -> AsyncIterator[bytes]:
        return body_chunks(self._native, self._loop.create_future)

    async def read(self) -> bytes:
        """The whole body."""
        chunks = [chunk async for chunk in self]
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def __repr__(self) -> str:
        return f"<HttpRequest {self.method} {self._native.path}>"
