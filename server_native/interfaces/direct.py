"""The direct handler API: the lowest-overhead way to answer requests.

``handler(NativeDirectRequest) -> NativeDirectResponse``, sync or async. With
``native_direct=True`` a synchronous handler is called from a dedicated
thread straight out of the native queue: no event loop, no Task, no
per-request Python plumbing beyond the handler call itself.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from .._dist.loader import native
from ..runtime.bound import BoundServer, answer_unavailable, bind_settings, tls_settings
from ..runtime.config import ServerConfig
from ..runtime.contract import Request
from ..runtime.logs import log_access
from ..runtime.loop import body_chunks
from ..runtime.serving import serve_bound

__all__ = [
    "DirectHandler",
    "NativeDirectRequest",
    "NativeDirectResponse",
    "serve_native_direct",
    "serve_secure_native_direct",
]

NativeDirectResponse = native.NativeDirectResponse
_ClientDisconnected = native.ClientDisconnected


class NativeDirectRequest:
    """A request as plain fields: ``method``, ``scheme``, ``authority``,
    ``path``, ``query``, ``protocol``, ``headers`` (pairs, repeats kept),
    ``header(name)``, ``body`` (async iterator of bytes), ``uri`` and
    ``client`` (address, port; None over a Unix socket)."""

    __slots__ = ("_native", "_loop")

    def __init__(self, native_request: Request, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._native = native_request
        self._loop = loop

    @property
    def method(self) -> str:
        return self._native.method

    @property
    def scheme(self) -> str:
        return self._native.scheme

    @property
    def authority(self) -> str | None:
        return self._native.authority

    @property
    def path(self) -> str:
        return self._native.path

    @property
    def query(self) -> str:
        return self._native.query

    @property
    def protocol(self) -> str:
        """``"1.0"``, ``"1.1"``, ``"2"`` or ``"3"``."""
        return self._native.http_version

    @property
    def headers(self) -> list[tuple[str, str]]:
        return self._native.headers()

    def header(self, name: str) -> str | None:
        """The first value of a header, by case-insensitive name."""
        return self._native.header(name)

    @property
    def uri(self) -> str:
        """The request target: path, and ``?query`` when there is one."""
        query = self._native.query
        return f"{self._native.path}?{query}" if query else self._native.path

    @property
    def client(self) -> tuple[str, int] | None:
        """The client's real address and port; None over a Unix socket."""
        return self._native.remote_addr

    @property
    def body(self) -> AsyncIterator[bytes]:
        return body_chunks(self._native, (self._loop or asyncio.get_running_loop()).create_future)

    async def read(self) -> bytes:
        """The whole body."""
        chunks: list[bytes] = []
        if not _take_arrived(self._native, chunks):
            chunks += [chunk async for chunk in self.body]
        return b"".join(chunks)

    def body_bytes(self) -> bytes:
        """The whole body, synchronously. With ``native_direct=True`` the
        body has always arrived before the handler runs; elsewhere this
        raises if it has not."""
        chunks: list[bytes] = []
        if not _take_arrived(self._native, chunks):
            raise RuntimeError("the body has not fully arrived: use `await request.read()`")
        return b"".join(chunks)

    def __repr__(self) -> str:
        return f"<NativeDirectRequest {self.method} {self.uri}>"


def _take_arrived(native_request: Request, chunks: list[bytes]) -> bool:
    """Takes the body chunks that have arrived; True when that was all of it."""
    while True:
        step = native_request.read()
        if not step:
            return step is not None
        chunks.append(step)


#: Returns a NativeDirectResponse, or an awaitable of one.
DirectHandler = Callable[[NativeDirectRequest], Any]


class DirectServer(BoundServer):
    """A bound server answering through a direct handler."""

    def __init__(
        self,
        config: ServerConfig,
        hosts: list[str],
        port: int,
        *,
        native_direct: bool = False,
        access_log: bool = False,
    ) -> None:
        self._handler: DirectHandler | None = None
        self._native_direct = native_direct
        self._access_log = access_log
        # One thread serves every request: a slow upload must not hold it.
        super().__init__(config, hosts, port, threaded=native_direct, whole_body=native_direct)

    def serve(self, handler: DirectHandler) -> None:
        if self._native_direct and inspect.iscoroutinefunction(handler):
            raise TypeError("native_direct=True needs a synchronous handler (it runs outside the event loop)")
        if self._access_log:
            handler = _with_access_log(handler)
        if self._native_direct:
            thread = threading.Thread(
                target=self._native.serve_direct,
                args=(handler, NativeDirectRequest, self._report),
                name="server-native-direct",
                daemon=True,
            )
            self._consumers.append(thread)
            thread.start()
        self._handler = handler

    def _on_request(self, native_request: Request) -> None:
        handler = self._handler
        if handler is None:
            answer_unavailable(native_request)
            return
        try:
            result = handler(NativeDirectRequest(native_request, self._loop))
        except BaseException as exc:  # noqa: BLE001 - the client gets a 500
            self._fail(native_request, exc)
            return
        if result.__class__ is NativeDirectResponse and result.stream_body is None:
            native_request.send_direct(result)
        else:
            self._runner.start(self._finish(native_request, result))

    async def _finish(self, native_request: Request, result: Any) -> None:
        try:
            response = await result if inspect.isawaitable(result) else result
            if response.__class__ is not NativeDirectResponse:
                raise TypeError(f"a direct handler must return a NativeDirectResponse, not {type(response).__name__}")
            if response.stream_body is None:
                native_request.send_direct(response)
            else:
                await _stream(native_request, response, self._loop)
        except _ClientDisconnected:
            pass
        except GeneratorExit:  # closed unfinished: the loop went away
            raise
        except BaseException as exc:  # noqa: BLE001 - the client gets a 500, cancellation included
            self._fail(native_request, exc)

    def _fail(self, native_request: Request, exc: BaseException) -> None:
        self._report(exc)
        native_request.abort()  # a 500, or a cut-off stream once the head is out


def _with_access_log(handler: DirectHandler) -> DirectHandler:
    """``handler``, logging every request it answers (500 when it raises or
    returns anything but a NativeDirectResponse); a streamed response once
    its body has gone."""

    def log(request: NativeDirectRequest, started: float, status: int, sent: int) -> None:
        log_access(
            request.client, request.method, request.path, request.protocol, status,
            query=request.query, sent=sent, started=started, header=request.header,
        )  # fmt: skip

    def answered(request: NativeDirectRequest, started: float, response: Any) -> Any:
        if response.__class__ is not NativeDirectResponse:
            log(request, started, 500, 0)
        elif response.stream_body is None:
            log(request, started, response.status, len(response.body))
        else:
            body = _counted(response.stream_body, lambda sent: log(request, started, response.status, sent))
            return NativeDirectResponse.stream(response.status, response.headers, body=body)
        return response

    async def answered_when_done(request: NativeDirectRequest, started: float, result: Awaitable[Any]) -> Any:
        try:
            response = await result
        except BaseException:
            log(request, started, 500, 0)
            raise
        return answered(request, started, response)

    if inspect.iscoroutinefunction(handler):
        return lambda request: answered_when_done(request, time.perf_counter(), handler(request))

    def logged(request: NativeDirectRequest) -> Any:
        started = time.perf_counter()
        try:
            result = handler(request)
        except BaseException:
            log(request, started, 500, 0)
            raise
        if inspect.isawaitable(result):
            return answered_when_done(request, started, result)
        return answered(request, started, result)

    return logged


async def _counted(body: Any, done: Callable[[int], None]) -> AsyncIterator[Any]:
    """``body``'s chunks; ``done`` gets their bytes once it ends or fails."""
    sent = 0
    try:
        async for chunk in body:
            sent += len(chunk)
            yield chunk
    finally:
        done(sent)


async def _stream(native_request: Request, response: Any, loop: asyncio.AbstractEventLoop) -> None:
    if not native_request.start(response.status, response.headers):
        return
    create_future = loop.create_future
    async for chunk in response.stream_body:
        backlog = native_request.write(chunk if chunk.__class__ is bytes else bytes(chunk), create_future)
        if backlog is not None:
            await backlog
    native_request.finish()


async def serve_native_direct(
    handler: DirectHandler,
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    native_direct: bool = False,
    access_log: bool = False,
    echo: bool = True,
    shutdown_signal: Awaitable[Any] | None = None,
    response_timeout: float | None = 30.0,
    **options: Any,
) -> None:
    """Serves a direct handler until ``shutdown_signal`` or SIGINT/SIGTERM.
    A handler that does not answer within ``response_timeout`` seconds
    (None: no limit) gets its client a 504; one that raises, a 500.
    ``access_log`` logs every request to ``server_native.access``.
    ``options`` are those of ``NativeHttpServer.bind``."""
    config, hosts, port = bind_settings(host, port, response_timeout=response_timeout, **options)
    server = DirectServer(config, hosts, port, native_direct=native_direct, access_log=access_log)
    await serve_bound([server], handler, echo, shutdown_signal)


async def serve_secure_native_direct(
    handler: DirectHandler,
    address: str = "localhost",
    port: int = 443,
    *,
    certificate_path: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
    certificate_password: str | None = None,
    http2: bool = True,
    ciphers: str | Sequence[str] | None = None,
    protocol_min: str = "tls1.2",
    **options: Any,
) -> None:
    """:func:`serve_native_direct` over TLS; ``ciphers`` and ``protocol_min``
    as in :class:`TlsConfig`."""
    tls = tls_settings(
        certificate_path=certificate_path,
        key_path=key_path,
        certificate_password=certificate_password,
        http2=http2,
        ciphers=ciphers,
        protocol_min=protocol_min,
    )
    await serve_native_direct(handler, address, port, http2=http2, tls=tls, **options)
