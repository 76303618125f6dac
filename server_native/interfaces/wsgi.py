"""WSGI (PEP 3333) on a bounded pool of threads that take requests straight
from the native queue: no event loop between the socket and the app."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import IO, Any

from .._dist.loader import native
from ..runtime.addresses import split_host
from ..runtime.bound import BoundServer, bind_settings
from ..runtime.config import ServerConfig
from ..runtime.contract import ThreadedRequest
from ..runtime.logs import log_access
from ..runtime.proxy import ProxyHeaders
from ..runtime.serving import serve_bound

__all__ = ["FileWrapper", "WSGIApp", "WSGIServer", "serve_wsgi"]

WSGIApp = Callable[[dict[str, Any], Callable[..., Callable[[bytes], None]]], Iterable[bytes]]

_ClientDisconnected = native.ClientDisconnected
_BodyTooLarge = native.BodyTooLarge
_CHUNK = 64 * 1024


class FileWrapper:
    """``wsgi.file_wrapper``: iterates a file in blocks; the server streams
    it without the app reading it into memory."""

    def __init__(self, filelike: IO[bytes], blksize: int = _CHUNK) -> None:
        self.filelike = filelike
        self.blksize = blksize

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.filelike.read(self.blksize):
            yield chunk

    def close(self) -> None:
        close = getattr(self.filelike, "close", None)
        if close is not None:
            close()


class InputStream:
    """``wsgi.input``: the request body, read as it arrives. A read waits in
    the native side (without the GIL) for the client to send more."""

    def __init__(self, native_request: ThreadedRequest) -> None:
        self._native = native_request
        self._buffer = b""
        self._done = False

    def _next(self) -> bytes:
        """The next chunk; ``b""`` at the end of the body."""
        if self._done:
            return b""
        try:
            chunk: bytes = self._native.read_blocking()
        except (_ClientDisconnected, _BodyTooLarge) as exc:
            raise OSError(f"request body unavailable: {exc}") from exc
        self._done = not chunk
        return chunk

    def _fill(self) -> bool:
        """Appends the next chunk; False at the end of the body."""
        chunk = self._next()
        self._buffer += chunk
        return bool(chunk)

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            chunks = [self._buffer]
            while chunk := self._next():
                chunks.append(chunk)
            self._buffer = b""
            return b"".join(chunks)
        while len(self._buffer) < size and self._fill():
            pass
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def readline(self, size: int | None = -1) -> bytes:
        limit = sys.maxsize if size is None or size < 0 else size
        while b"\n" not in self._buffer and len(self._buffer) < limit and self._fill():
            pass
        end = self._buffer.find(b"\n") + 1 or len(self._buffer)
        end = min(end, limit)
        line, self._buffer = self._buffer[:end], self._buffer[end:]
        return line

    def readlines(self, hint: int = -1) -> list[bytes]:
        lines = []
        total = 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                break
        return lines

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line


class _Response:
    """``start_response`` and ``write`` for one request."""

    __slots__ = ("_native", "status", "reason", "headers", "started", "streaming", "gone", "sent")

    def __init__(self, native_request: ThreadedRequest) -> None:
        self._native = native_request
        self.status = 0
        self.reason: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.started = False
        self.streaming = False
        self.gone = False
        #: Body bytes handed over, for the access log.
        self.sent = 0

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        if exc_info is not None:
            try:
                if self.streaming:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.started:
            raise AssertionError("start_response called twice without exc_info")
        code, _, reason = status.partition(" ")
        self.status = int(code)
        self.reason = reason or None
        self.headers = headers
        self.started = True
        return self.write

    def write(self, data: bytes) -> None:
        if not self.started:
            raise AssertionError("write() before start_response()")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"a WSGI app must give bytes, not {type(data).__name__} (PEP 3333)")
        if not self.streaming:
            self.streaming = True
            if not self._native.start(self.status, self.headers, self.reason):
                self.gone = True
        if data and not self.gone:
            try:
                self._native.write_blocking(data)
                self.sent += len(data)
            except _ClientDisconnected:
                self.gone = True


class WSGIServer(BoundServer):
    """A bound server running a WSGI app on ``threads`` worker threads."""

    def __init__(
        self,
        config: ServerConfig,
        hosts: list[str],
        port: int,
        *,
        threads: int = 4,
        root_path: str = "",
        proxy: ProxyHeaders | None = None,
        access_log: bool = False,
    ) -> None:
        if threads < 1:
            raise ValueError("threads must be at least 1")
        self._threads = threads
        self._proxy = proxy
        self._access_log = access_log
        super().__init__(config, hosts, port, threaded=True)
        # Over a Unix socket, gunicorn's values: the path and no port, unless
        # the request's Host says better (see _environ).
        self._uds = self.uds
        host, server_port = (self._uds, "") if self._uds is not None else self.addresses[0]
        self._base = {
            "SERVER_NAME": host,
            "SERVER_PORT": str(server_port),
            "SCRIPT_NAME": root_path,
            "wsgi.version": (1, 0),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": threads > 1,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "wsgi.file_wrapper": FileWrapper,
            # Reading to the end is safe without a Content-Length: it stops
            # where the client's body does (chunked uploads).
            "wsgi.input_terminated": True,
        }

    def serve(self, app: WSGIApp) -> None:
        for index in range(self._threads):
            worker = threading.Thread(target=self._work, args=(app,), name=f"server-native-wsgi-{index}", daemon=True)
            self._consumers.append(worker)
            worker.start()

    def _work(self, app: WSGIApp) -> None:
        next_request = self._native.next_request
        while (native_request := next_request()) is not None:
            try:
                self._call(app, native_request)
            except Exception as exc:  # noqa: BLE001 - one request failed, the worker goes on
                self._report(exc)

    def _environ(self, native_request: ThreadedRequest) -> dict[str, Any]:
        # Built natively: the CGI variables, the headers and the client.
        environ: dict[str, Any] = native_request.wsgi_environ(self._base)
        if self._proxy is not None and native_request.has_proxy_headers:
            client, scheme = self._proxy.resolve(
                native_request.remote_addr, native_request.scheme, native_request.raw_headers()
            )
            if client is not None:
                environ["REMOTE_ADDR"], port = client
                environ["REMOTE_PORT"] = str(port)
            environ["wsgi.url_scheme"] = scheme
        if self._uds is not None and native_request.authority:
            environ["SERVER_NAME"], environ["SERVER_PORT"] = _server_name_and_port(
                native_request.authority, environ["wsgi.url_scheme"]
            )
        environ["wsgi.input"] = InputStream(native_request)
        return environ

    def _call(self, app: WSGIApp, native_request: ThreadedRequest) -> None:
        response = _Response(native_request)
        environ: dict[str, Any] = {}
        started = time.perf_counter() if self._access_log else None
        try:
            self._respond(app, native_request, response, environ)
        finally:
            if self._access_log:
                client = (
                    (environ["REMOTE_ADDR"], int(environ["REMOTE_PORT"]))
                    if "REMOTE_PORT" in environ
                    else native_request.remote_addr
                )
                log_access(
                    client, native_request.method, native_request.path, native_request.http_version, response.status,
                    query=native_request.query, sent=response.sent, started=started, header=native_request.header,
                )  # fmt: skip

    def _respond(
        self, app: WSGIApp, native_request: ThreadedRequest, response: _Response, environ: dict[str, Any]
    ) -> None:
        """Runs the app on one request and sends what it answers; ``environ``
        is filled in for the access log."""
        try:
            environ.update(self._environ(native_request))
            result = app(environ, response.start_response)
        except Exception as exc:  # noqa: BLE001 - the client gets a 500
            self._fail(native_request, response, exc)
            return
        try:
            if not response.streaming and isinstance(result, (list, tuple)) and len(result) <= 1:
                if not response.started:
                    raise AssertionError("the WSGI app returned without calling start_response()")
                body = result[0] if result else b""
                native_request.respond(response.status, response.headers, body, response.reason)
                response.sent = len(body)
                return
            for chunk in result:
                response.write(chunk)
                if response.gone:
                    break
            if not response.streaming:
                response.write(b"")
            native_request.finish()
        except Exception as exc:  # noqa: BLE001 - the client gets a 500 or a cut stream
            self._fail(native_request, response, exc)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()

    def _fail(self, native_request: ThreadedRequest, response: _Response, exc: BaseException) -> None:
        self._report(exc)
        # A 500 when no head has gone out, else a cut-off stream.
        if not response.streaming:
            response.status = 500
        native_request.abort()


def _server_name_and_port(authority: str, scheme: str) -> tuple[str, str]:
    """``SERVER_NAME`` and ``SERVER_PORT`` from a Host header value."""
    host, port = split_host(authority)
    return host or authority, str(port) if port is not None else "443" if scheme == "https" else "80"


async def serve_wsgi(
    app: WSGIApp,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    threads: int = 4,
    root_path: str = "",
    proxy: ProxyHeaders | None = None,
    access_log: bool = False,
    echo: bool = True,
    shutdown_signal: Awaitable[Any] | None = None,
    **options: Any,
) -> None:
    """Serves a WSGI app until ``shutdown_signal`` or SIGINT/SIGTERM;
    ``access_log`` logs every request to ``server_native.access``."""
    config, hosts, port = bind_settings(host, port, **options)
    server = WSGIServer(config, hosts, port, threads=threads, root_path=root_path, proxy=proxy, access_log=access_log)
    await serve_bound([server], app, echo, shutdown_signal)
