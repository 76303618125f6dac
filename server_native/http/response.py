"""`HttpResponse`: the response side of dart:io's HttpRequest, buffered by
default and streamed once flushed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Iterable
from http import HTTPStatus
from typing import TYPE_CHECKING

from .._dist.loader import native
from ..runtime.bound import PLAIN_TEXT
from .cookies import Cookie
from .errors import HttpBodyError, HttpException
from .headers import HttpHeaders, wire_headers

if TYPE_CHECKING:
    from ..runtime.contract import Request
    from .server import NativeHttpServer

__all__ = ["HttpResponse"]

_OPEN, _STREAMING, _CLOSED = 0, 1, 2
_ClientDisconnected = native.ClientDisconnected
_error_log = logging.getLogger("server_native.error")


class HttpResponse:
    """Set ``status_code`` and ``headers``, ``write`` the body, then
    ``await close()``. Output is buffered until ``flush()`` (or always sent
    at once when ``buffer_output`` is False), so a response that fits in
    memory goes out in one native call.

    It holds the native exchange, not its ``HttpRequest``: the request
    holds the response, and a reference back would make every request a
    cycle that only the garbage collector frees."""

    __slots__ = (
        "_native",
        "_loop",
        "_server",
        "_status",
        "_reason",
        "_headers",
        "_cookies",
        "_persistent",
        "_buffer",
        "_sent",
        "_state",
        "_backlog",
        "_done",
        "_error",
        "_gone",
        "buffer_output",
    )

    def __init__(self, native_request: Request, server: NativeHttpServer, loop: asyncio.AbstractEventLoop) -> None:
        self._native = native_request
        self._loop = loop
        self._server = server
        self._status = 200
        self._reason: str | None = None
        self._headers: HttpHeaders | None = None
        self._cookies: list[Cookie] | None = None
        self._persistent: bool | None = None
        self._buffer: list[bytes] = []
        self._sent = 0
        self._state = _OPEN
        self._backlog: asyncio.Future[None] | None = None
        self._done: asyncio.Future[None] | None = None
        self._error: HttpException | None = None
        self._gone = False
        self.buffer_output = True

    # -- head ---------------------------------------------------------------

    def _check_head_open(self) -> None:
        if self._state != _OPEN:
            raise HttpException("HTTP headers were already sent", uri=self._native.path)

    @property
    def status_code(self) -> int:
        return self._status

    @status_code.setter
    def status_code(self, code: int) -> None:
        self._check_head_open()
        code = int(code)
        if not 200 <= code <= 999:
            raise ValueError(f"invalid status code {code}")
        self._status = code

    @property
    def reason_phrase(self) -> str:
        if self._reason is not None:
            return self._reason
        try:
            return HTTPStatus(self._status).phrase
        except ValueError:
            return ""

    @reason_phrase.setter
    def reason_phrase(self, phrase: str) -> None:
        self._check_head_open()
        self._reason = phrase

    @property
    def headers(self) -> HttpHeaders:
        """Starts as a copy of the server's ``default_response_headers``."""
        if self._headers is None:
            self._headers = self._server.default_response_headers.copy()
            self._headers.protocol_version = self._native.http_version
        return self._headers

    @property
    def content_length(self) -> int:
        return -1 if self._headers is None else self._headers.content_length

    @content_length.setter
    def content_length(self, length: int) -> None:
        self._check_head_open()
        self.headers.content_length = length

    @property
    def persistent_connection(self) -> bool:
        if self._persistent is None:
            return wire_headers(self._native).persistent_connection
        return self._persistent

    @persistent_connection.setter
    def persistent_connection(self, persistent: bool) -> None:
        self._check_head_open()
        self._persistent = bool(persistent)

    @property
    def cookies(self) -> list[Cookie]:
        """Cookies to set; each becomes a ``Set-Cookie`` header."""
        if self._cookies is None:
            self._cookies = []
        return self._cookies

    def _head(self) -> list[tuple[str, str]] | None:
        """Header pairs for the wire; None means the server defaults unchanged
        (``close`` checks that case itself, without this call)."""
        if self._headers is None and not self._cookies and self._persistent is None:
            self._server._native_defaults()
            return None
        pairs = self.headers._pairs()
        if self._cookies:
            pairs.extend(("set-cookie", str(cookie)) for cookie in self._cookies)
        if self._persistent is False and self._native.http_version in ("1.0", "1.1"):
            pairs = [p for p in pairs if p[0] != "connection"]
            pairs.append(("connection", "close"))
        return pairs

    # -- body ---------------------------------------------------------------

    def _encoding(self) -> str:
        if self._headers is None:
            return self._server._native_defaults()
        content_type = self._headers.content_type
        return (content_type.charset if content_type is not None else None) or "latin-1"

    def write(self, obj: object) -> None:
        """Appends ``obj``: bytes-like objects (``bytes``, ``bytearray``,
        ``memoryview``) as they are, like :meth:`add`; anything else as
        ``str(obj)``, encoded with the content type's charset (latin-1 when
        it names none, as in dart:io)."""
        if obj.__class__ is str:
            data = obj.encode(self._server._native_defaults() if self._headers is None else self._encoding())
            if self._state == _OPEN and self.buffer_output and data:
                self._buffer.append(data)  # add()'s common case, without the call
            else:
                self.add(data)
        elif isinstance(obj, (bytes, bytearray, memoryview)):
            self.add(obj)
        else:
            self.add(str(obj).encode(self._encoding()))

    def writeln(self, obj: object = "") -> None:
        self.write(f"{obj}\n")

    def write_all(self, objects: Iterable[object], separator: str = "") -> None:
        self.write(separator.join(str(o) for o in objects))

    def add(self, data: bytes | bytearray | memoryview) -> None:
        state = self._state
        if state == _CLOSED:
            raise HttpException("the response is closed", uri=self._native.path)
        chunk = data if data.__class__ is bytes else bytes(data)
        if not chunk:
            return
        if state == _OPEN and self.buffer_output:
            self._buffer.append(chunk)
        else:
            if state == _OPEN:
                self._start()
            self._send_chunk(chunk)

    async def add_stream(self, stream: AsyncIterable[bytes]) -> None:
        """Sends every chunk of ``stream``, waiting whenever the client reads
        slower than the stream produces."""
        async for chunk in stream:
            self.add(chunk)
            if self._state == _STREAMING:
                await self._drain()
            self._raise_if_gone()

    async def flush(self) -> None:
        """Sends the head and everything written so far; the rest streams."""
        if self._state == _CLOSED:
            raise HttpException("the response is closed", uri=self._native.path)
        if self._state == _OPEN:
            self._start()
        await self._drain()
        self._raise_if_gone()

    def _raise_if_gone(self) -> None:
        """Streaming code learns at its next flush that nobody is reading."""
        if self._gone:
            raise _ClientDisconnected("the client disconnected")

    def _client_gone(self) -> None:
        self._gone = True
        self._fail(HttpException("the client disconnected", uri=self._native.path))

    def _start(self) -> None:
        self._state = _STREAMING
        if not self._native.start(self._status, self._head(), self._reason):
            self._client_gone()
        buffered, self._buffer = self._buffer, []
        for chunk in buffered:
            self._send_chunk(chunk)

    def _send_chunk(self, chunk: bytes) -> None:
        if self._error is not None:
            return
        declared = self.content_length
        if declared >= 0 and self._sent + len(chunk) > declared:
            self._cut(_too_long(self._sent + len(chunk), declared, self._native.path))
            chunk = chunk[: max(declared - self._sent, 0)]
        self._sent += len(chunk)
        try:
            backlog = self._native.write(chunk, self._loop.create_future)
        except _ClientDisconnected:
            self._client_gone()
            return
        if backlog is not None:
            self._backlog = backlog

    async def _drain(self) -> None:
        backlog, self._backlog = self._backlog, None
        if backlog is not None:
            await backlog

    async def close(self) -> None:
        """Finishes the response. Raises ``HttpBodyError`` (an
        ``HttpException``) when the body did not match a declared
        ``content_length``."""
        state = self._state
        if state == _OPEN:
            # The whole response in one native call.
            native_request = self._native
            buffer = self._buffer
            body = buffer[0] if len(buffer) == 1 else b"".join(buffer)
            buffer.clear()
            headers = self._headers
            if headers is not None:
                self._check_length(len(body), headers.content_length)
                head = self._head()
            elif self._cookies or self._persistent is not None:
                head = self._head()
            else:
                self._server._native_defaults()
                head = None
            if not native_request.respond(self._status, head, body, self._reason):
                self._client_gone()
        elif state == _CLOSED:
            return
        else:
            await self._drain()
            self._finish_stream()
        self._state = _CLOSED
        if self._done is not None and not self._done.done():
            self._settle(self._done)
        if self._error is not None and isinstance(self._error, HttpBodyError):
            raise self._error

    def _check_length(self, size: int, declared: int) -> None:
        """A whole body that is not its declared ``content_length``: the
        server answers it with a 500 (it owns the framing); ``done`` fails
        as dart:io's does."""
        if declared >= 0 and size != declared and self._native.method != "HEAD":
            self._fail((_too_long if size > declared else _too_short)(size, declared, self._native.path))

    def _finish_stream(self) -> None:
        native_request = self._native
        declared = self.content_length
        if self._error is None and declared >= 0 and self._sent < declared:
            self._cut(_too_short(self._sent, declared, self._native.path))
        if self._error is None:
            native_request.finish()
        else:
            native_request.abort()

    def _fail(self, error: HttpException) -> None:
        if self._error is None:
            self._error = error

    def _cut(self, error: HttpBodyError) -> None:
        """A streamed body broke its ``content_length``: it is cut off (the
        server owns the framing), the error logged and raised by ``close``."""
        if self._error is None:
            _error_log.error("the response to %s %s is cut off: %s", self._native.method, self._native.path, error)
        self._fail(error)

    def _settle(self, future: asyncio.Future[None]) -> None:
        if self._error is None:
            future.set_result(None)
        else:
            future.set_exception(self._error)

    @property
    def done(self) -> asyncio.Future[None]:
        """Completes when the response is finished; fails like dart:io's when
        the body broke its ``content_length`` or the client went away."""
        if self._done is None:
            self._done = self._loop.create_future()
            if self._state == _CLOSED:
                self._settle(self._done)
        return self._done

    async def redirect(self, location: str, status: int = HTTPStatus.FOUND) -> None:
        self.status_code = status
        self.headers.set("location", str(location))
        await self.close()

    def _abort_for_error(self) -> None:
        """A handler failed: 500 if nothing was sent, else cut the stream."""
        if self._state == _CLOSED:
            return
        self._state = _CLOSED
        self._native.abort()  # a 500, or a cut-off stream once the head is out

    def _respond_status(self, status: int, message: bytes) -> None:
        """Answers with a bare status (no listener, body too large...)."""
        if self._state == _CLOSED:
            return
        self._state = _CLOSED
        self._native.respond(status, PLAIN_TEXT, message)


def _too_long(size: int, declared: int, uri: str) -> HttpBodyError:
    return HttpBodyError(
        f"Content size exceeds specified contentLength. {size} bytes written while expected {declared}.", uri=uri
    )


def _too_short(size: int, declared: int, uri: str) -> HttpBodyError:
    return HttpBodyError(
        f"Content size below specified contentLength.  {size} bytes written but expected {declared}.", uri=uri
    )
