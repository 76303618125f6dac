"""ASGI 3 on the native transport: ``http`` (streaming both ways,
``http.disconnect``, ``http.response.pathsend``, the TLS extension) and
``lifespan`` with state."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .._dist.loader import native
from ..runtime.bound import BoundServer, answer_unavailable, bind_settings, logger
from ..runtime.config import ServerConfig
from ..runtime.contract import Request
from ..runtime.logs import error_logger, log_access
from ..runtime.proxy import ProxyHeaders
from ..runtime.serving import serve_bound

__all__ = ["ASGIApp", "ASGIServer", "Lifespan", "LifespanFailure", "serve_asgi"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

_ClientDisconnected = native.ClientDisconnected
_BodyTooLarge = native.BodyTooLarge
# 2.4: an HTTP send() after the client left raises ClientDisconnected (an
# OSError), so a streaming app stops producing for nobody.
_HTTP_ASGI = {"version": "3.0", "spec_version": "2.4"}
_WEBSOCKET_ASGI = {"version": "3.0", "spec_version": "2.4"}
_PLAIN = [(b"content-type", b"text/plain; charset=utf-8")]
_BEFORE_START, _STARTED, _STREAMING, _COMPLETE = range(4)


class _HttpCycle:
    """One request's ``receive`` and ``send``, straight onto the native
    exchange. A response whose start and (only) body arrive together leaves
    in one native call."""

    __slots__ = ("_native", "_loop", "_state", "_status", "_headers", "_body_done", "_gone", "_waiting", "sent")

    def __init__(self, native_request: Request, loop: asyncio.AbstractEventLoop) -> None:
        self._native = native_request
        self._loop = loop
        self._state = _BEFORE_START
        self._status = 200
        self._headers: Any = ()
        self._body_done = False
        self._gone = False
        self._waiting: asyncio.Future[None] | None = None
        #: Response body bytes handed over, for the access log.
        self.sent = 0

    async def receive(self) -> Message:
        if self._body_done or self._gone or self._state == _COMPLETE:
            return await self._disconnect()
        native_request = self._native
        create_future = self._loop.create_future
        while True:
            try:
                step = native_request.read(create_future)
            except (_ClientDisconnected, _BodyTooLarge):
                self._gone = True
                return {"type": "http.disconnect"}
            if step.__class__ is bytes:
                break
            await step
        if not step:
            self._body_done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        # Say "no more" with the last chunk when the end is already known.
        try:
            end = native_request.read()
        except (_ClientDisconnected, _BodyTooLarge):
            self._gone = True
            return {"type": "http.request", "body": step, "more_body": True}
        if end == b"":
            self._body_done = True
            return {"type": "http.request", "body": step, "more_body": False}
        if end:
            step += end
        return {"type": "http.request", "body": step, "more_body": True}

    @property
    def client_gone(self) -> bool:
        return self._gone

    def header(self, name: str) -> str | None:
        """A request header's first value."""
        return self._native.header(name)

    @property
    def status(self) -> int:
        """The status sent (500 when the app sent none)."""
        return self._status if self._state != _BEFORE_START else 500

    async def _disconnect(self) -> Message:
        """Once the request is read, receive() waits for the client to leave
        (or the response to complete), as ASGI's ``http.disconnect`` asks."""
        if not self._gone and self._state != _COMPLETE:
            waiter = self._native.wait_disconnect(self._loop.create_future)
            if waiter is not None:
                self._waiting = waiter
                await waiter
        self._gone = self._gone or self._state != _COMPLETE
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if self._gone and self._state != _COMPLETE:
            raise _ClientDisconnected("the client disconnected")
        if kind == "http.response.body":
            if self._state == _STARTED and not message.get("more_body", False):
                # The whole response at once: the common case, without the
                # coroutine _body would cost.
                body = message.get("body", b"")
                self._complete()
                self._native.respond(self._status, self._headers, body)
                self.sent = len(body)
                return
            await self._body(message.get("body", b""), message.get("more_body", False))
        elif kind == "http.response.start":
            if self._state != _BEFORE_START:
                raise RuntimeError("ASGI: http.response.start sent twice")
            self._status = message["status"]
            self._headers = message.get("headers", ())
            self._state = _STARTED
        elif kind == "http.response.pathsend":
            await self._pathsend(message["path"])
        else:
            raise RuntimeError(f"ASGI: unexpected message {kind!r} on an http connection")

    async def _body(self, body: bytes, more: bool) -> None:
        """A body part of a response that streams (``send`` answers a whole
        one itself)."""
        state = self._state
        if state == _STARTED:
            self._state = _STREAMING
            if not self._native.start(self._status, self._headers):
                self._gone = True
                raise _ClientDisconnected("the client disconnected")
        elif state != _STREAMING:
            raise RuntimeError(
                "ASGI: http.response.body before http.response.start"
                if state == _BEFORE_START
                else "ASGI: response already complete"
            )
        if body:
            await self._write(body)
        if not more:
            self._complete()
            self._native.finish()

    async def _write(self, chunk: bytes) -> None:
        try:
            backlog = self._native.write(chunk, self._loop.create_future)
        except _ClientDisconnected:
            self._gone = True
            self._wake_receive()
            raise
        self.sent += len(chunk)
        if backlog is not None:
            await backlog

    async def _pathsend(self, path: str) -> None:
        if self._state != _STARTED:
            raise RuntimeError("ASGI: http.response.pathsend needs a started, empty response")
        with open(path, "rb") as file:
            self._state = _STREAMING
            if not self._native.start(self._status, self._headers):
                self._gone = True
                raise _ClientDisconnected("the client disconnected")
            while chunk := file.read(256 * 1024):
                await self._write(chunk)
        self._complete()
        self._native.finish()

    def _complete(self) -> None:
        self._state = _COMPLETE
        if self._waiting is not None:
            self._wake_receive()

    def _wake_receive(self) -> None:
        waiting = self._waiting
        if waiting is not None and not waiting.done():
            waiting.set_result(None)

    def close_for_app(self, error: BaseException | None) -> None:
        """The app returned or raised: make sure the client gets an answer."""
        state = self._state
        if state == _COMPLETE:
            return
        self._complete()
        if state == _STREAMING:
            if error is None:
                self._native.finish()
            else:
                self._native.abort()
        elif state == _STARTED and error is None:
            self._native.respond(self._status, self._headers, b"")
        else:
            self._native.abort()  # a 500: nothing has gone out


class ASGIServer(BoundServer):
    """A bound server running an ASGI application."""

    def __init__(
        self,
        config: ServerConfig,
        hosts: list[str],
        port: int,
        *,
        root_path: str = "",
        proxy: ProxyHeaders | None = None,
        access_log: bool = False,
    ) -> None:
        self._app: ASGIApp | None = None
        self._proxy = proxy
        self._access_log = access_log
        self._scope_base = {"type": "http", "asgi": _HTTP_ASGI, "root_path": root_path}
        self._websocket_scope_base = {"type": "websocket", "asgi": _WEBSOCKET_ASGI, "root_path": root_path}
        self.state: dict[str, Any] = {}
        super().__init__(config, hosts, port)

    def serve(self, app: ASGIApp) -> None:
        self._app = app

    def _on_request(self, native_request: Request) -> None:
        app = self._app
        if app is None:
            answer_unavailable(native_request)
            return
        websocket = native_request.websocket
        scope = native_request.asgi_scope(self._websocket_scope_base if websocket else self._scope_base, self.state)
        if self._proxy is not None and native_request.has_proxy_headers:
            client, scheme = self._proxy.resolve(scope["client"], scope["scheme"], scope["headers"])
            scope["client"], scope["scheme"] = client, _WEBSOCKET_SCHEMES.get(scheme, scheme) if websocket else scheme
        if native_request.tls:
            scope["extensions"]["tls"] = _tls_extension(native_request)
        if websocket:
            self._runner.start(_run_websocket(app, scope, _WebSocketCycle(native_request, self._loop)))
            return
        cycle = _HttpCycle(native_request, self._loop)
        self._runner.start(_run(app, scope, cycle, self._access_log))


def _tls_extension(native_request: Request) -> dict[str, Any]:
    certificate = native_request.peer_certificate
    return {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(certificate)] if certificate else [],
        "client_cert_name": None,
        "client_cert_error": None,
        "tls_version": None,
        "cipher_suite": None,
    }


async def _run(app: ASGIApp, scope: Scope, cycle: _HttpCycle, access_log: bool) -> None:
    started = time.perf_counter() if access_log else None
    try:
        await app(scope, cycle.receive, cycle.send)
    except BaseException as exc:  # noqa: BLE001 - the app's failure, whatever it is, ends its exchange
        cycle.close_for_app(exc)
        if cycle.client_gone:
            # Most often the app passing on our ClientDisconnected as its own.
            logger.debug(
                "ASGI app ended with an error after its client left: %s %s",
                scope["method"],
                scope["path"],
                exc_info=exc,
            )
        elif not isinstance(exc, asyncio.CancelledError):
            logger.error("ASGI app failed: %s %s", scope["method"], scope["path"], exc_info=exc)
    else:
        cycle.close_for_app(None)
    if access_log:
        log_access(
            scope["client"], scope["method"], scope["raw_path"].decode("latin-1"), scope["http_version"], cycle.status,
            query=scope["query_string"], sent=cycle.sent, started=started, header=cycle.header,
        )  # fmt: skip


#: The scheme of a WebSocket behind a proxy that reports http or https.
_WEBSOCKET_SCHEMES = {"http": "ws", "https": "wss"}


_CONNECTING, _ACCEPTED, _CLOSED, _DENYING, _DENIED = range(5)
#: What the app's receive() gets once the socket is denied, or its client gone
#: before an accept: the connection ended without a close frame.
_NEVER_OPENED = {"type": "websocket.disconnect", "code": 1006, "reason": ""}


class _WebSocketCycle:
    """ASGI ``websocket`` messages onto a native WebSocket, with the
    disconnect rules of the spec: ``send`` after the client left raises an
    ``OSError`` (``ClientDisconnected``); a server-side close is followed by
    ``websocket.disconnect`` once the client answers it; once the socket is
    denied (``websocket.close`` before accept: 403, or a
    ``websocket.http.response``), ``receive`` returns a disconnect (1006) at
    once. A denial is an HTTP response, streamed like one; one the app
    leaves unfinished, or breaks off with a wrong message, ends as a 500
    (cut off once its head is out), and so does an app that returns without
    accepting or denying."""

    def __init__(self, native_request: Request, loop: asyncio.AbstractEventLoop) -> None:
        self._native = native_request
        self._loop = loop
        self._state = _CONNECTING
        self._connect_sent = False
        #: The denial's response, once ``websocket.http.response.start`` came.
        self._denial: _HttpCycle | None = None

    async def receive(self) -> Message:
        if not self._connect_sent:
            self._connect_sent = True
            return {"type": "websocket.connect"}
        state = self._state
        if state == _CONNECTING:
            waiter = self._native.wait_disconnect(self._loop.create_future)
            if waiter is not None:
                await waiter
            return dict(_NEVER_OPENED)
        if state in (_DENYING, _DENIED):
            return dict(_NEVER_OPENED)
        create_future = self._loop.create_future
        while True:
            item = self._native.ws_receive(create_future)
            if item.__class__ is tuple:
                break
            await item
        kind, payload = item
        if kind == "text":
            return {"type": "websocket.receive", "text": payload}
        if kind == "bytes":
            return {"type": "websocket.receive", "bytes": payload}
        code, reason = payload
        return {"type": "websocket.disconnect", "code": code, "reason": reason}

    async def send(self, message: Message) -> None:
        kind = message["type"]
        state = self._state
        if kind == "websocket.send" and state == _ACCEPTED:
            data = message.get("bytes")
            if data is None:
                data = message.get("text", "")
            backlog = self._native.ws_send(data, self._loop.create_future)
            if backlog is not None:
                await backlog
        elif kind == "websocket.accept" and state == _CONNECTING:
            if not self._native.accept_websocket(message.get("subprotocol"), message.get("headers", ())):
                self._state = _DENIED
                raise _ClientDisconnected("the client left before the WebSocket was accepted")
            self._state = _ACCEPTED
        elif kind == "websocket.close" and state in (_CONNECTING, _ACCEPTED):
            if state == _CONNECTING:
                self._state = _DENIED
                self._native.respond(403, _PLAIN, b"")
            else:
                self._state = _CLOSED
                self._native.ws_close(message.get("code", 1000), message.get("reason") or "")
        elif kind == "websocket.close" and state in (_CLOSED, _DENIED):
            pass
        elif kind == "websocket.http.response.start" and state == _CONNECTING:
            self._state = _DENYING
            self._denial = _HttpCycle(self._native, self._loop)
            status = message["status"]
            if not isinstance(status, int) or not 200 <= status <= 599:
                raise RuntimeError(f"ASGI: invalid status {status!r} in websocket.http.response.start: must be 200-599")
            await self._denial.send(
                {"type": "http.response.start", "status": status, "headers": message.get("headers", ())}
            )
        elif kind == "websocket.http.response.body" and state == _DENYING and self._denial is not None:
            more = message.get("more_body", False)
            await self._denial.send({"type": "http.response.body", "body": message.get("body", b""), "more_body": more})
            if not more:
                self._state = _DENIED
        else:
            raise RuntimeError(f"ASGI: unexpected {kind!r} {_STATE_NAMES[state]} on a websocket connection")

    def close_for_app(self, error: BaseException | None) -> None:
        """The app returned or raised: a socket it never accepted or denied
        is a 500, and so is a denial it left unfinished; one it left open
        is closed (1011 on an error)."""
        state = self._state
        if state == _CONNECTING:
            self._state = _DENIED
            if error is None:
                error_logger.error(
                    "ASGI app returned without accepting or denying the WebSocket %s: answered 500", self._native.path
                )
            self._native.abort()  # a 500: nothing has gone out
        elif state == _DENYING and self._denial is not None:
            self._state = _DENIED
            if error is None:
                error_logger.error(
                    "ASGI app returned before finishing its denial of the WebSocket %s: answered 500", self._native.path
                )
            self._denial.close_for_app(error or RuntimeError("unfinished denial"))
        elif state == _ACCEPTED:
            self._state = _CLOSED
            self._native.ws_close(1011 if error is not None else 1000, "")


_STATE_NAMES = {
    _CONNECTING: "before websocket.accept",
    _ACCEPTED: "after websocket.accept",
    _CLOSED: "after websocket.close",
    _DENYING: "during a websocket.http.response",
    _DENIED: "after the WebSocket was denied",
}


async def _run_websocket(app: ASGIApp, scope: Scope, cycle: _WebSocketCycle) -> None:
    try:
        await app(scope, cycle.receive, cycle.send)
    except BaseException as exc:  # noqa: BLE001 - the app's failure, whatever it is, ends its exchange
        cycle.close_for_app(exc)
        if not isinstance(exc, (asyncio.CancelledError, OSError)):
            logger.error("ASGI websocket app failed: %s", scope["path"], exc_info=exc)
    else:
        cycle.close_for_app(None)


class LifespanFailure(RuntimeError):
    """The application refused to start (``lifespan.startup.failed``)."""


class Lifespan:
    """Runs an app's ``lifespan`` scope. ``mode``: "auto" (an app that does
    not support lifespan is served anyway), "on" (it must), "off"."""

    def __init__(self, app: ASGIApp, state: dict[str, Any], mode: str = "auto") -> None:
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"lifespan must be 'auto', 'on' or 'off', not {mode!r}")
        self._app = app
        self._state = state
        self._mode = mode
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._startup: asyncio.Future[None] | None = None
        self._shutdown: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None

    async def startup(self) -> None:
        if self._mode == "off":
            return
        loop = asyncio.get_running_loop()
        self._startup = loop.create_future()
        self._shutdown = loop.create_future()
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self._state}
        self._task = loop.create_task(self._main(scope))
        await self._inbox.put({"type": "lifespan.startup"})
        await self._startup

    async def _main(self, scope: Scope) -> None:
        try:
            await self._app(scope, self._inbox.get, self._send)
        except BaseException as exc:  # noqa: BLE001 - lifespan: any failure is reported to startup or shutdown
            if self._startup is not None and not self._startup.done():
                if self._mode == "on":
                    self._startup.set_exception(LifespanFailure(f"lifespan failed: {exc!r}"))
                else:
                    logging.getLogger("server_native").info(
                        "the app does not support lifespan (%r): serving without it", exc
                    )
                    self._mode = "off"
                    self._startup.set_result(None)
            elif self._shutdown is not None and not self._shutdown.done():
                self._shutdown.set_exception(LifespanFailure(f"lifespan failed: {exc!r}"))
        finally:
            for future in (self._startup, self._shutdown):
                if future is not None and not future.done():
                    future.set_result(None)

    async def _send(self, message: Message) -> None:
        kind = message["type"]
        target = self._startup if kind.startswith("lifespan.startup") else self._shutdown
        if target is None or target.done():
            raise RuntimeError(f"ASGI lifespan: unexpected {kind!r}")
        if kind.endswith(".failed"):
            target.set_exception(LifespanFailure(message.get("message", "") or kind))
        else:
            target.set_result(None)

    async def shutdown(self) -> None:
        if self._mode == "off" or self._task is None or self._shutdown is None:
            return
        await self._inbox.put({"type": "lifespan.shutdown"})
        try:
            await self._shutdown
        finally:
            if not self._task.done():
                self._task.cancel()


async def serve_asgi(
    app: ASGIApp,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    lifespan: str = "auto",
    root_path: str = "",
    proxy: ProxyHeaders | None = None,
    access_log: bool = False,
    echo: bool = True,
    shutdown_signal: Awaitable[Any] | None = None,
    **options: Any,
) -> None:
    """Serves an ASGI app until ``shutdown_signal`` or SIGINT/SIGTERM, with
    its lifespan around it. ``options`` are those of ``NativeHttpServer.bind``."""
    config, hosts, port = bind_settings(host, port, **options)
    state: dict[str, Any] = {}
    life = Lifespan(app, state, lifespan)
    # Like uvicorn: the port opens only once startup has completed.
    await life.startup()
    try:
        server = ASGIServer(config, hosts, port, root_path=root_path, proxy=proxy, access_log=access_log)
        server.state = state
        await serve_bound([server], app, echo, shutdown_signal)
    finally:
        await life.shutdown()
