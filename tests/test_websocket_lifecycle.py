"""A WebSocket's life as ASGI apps and HttpServer-style handlers see it, and
as clients see it on the wire: the `websocket` scope, denials
(`websocket.http.response`, 403, 500), handshakes the server refuses
itself, keep-alive pings, and shutdown with sockets open. Every test runs
on both transports (in-process and the socket bridge), over HTTP/1.1 and
HTTP/2 (RFC 8441) where it applies, with clients driven by hand
(wsproto's frame layer, h2) or the `websockets` library."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from apps.harness import (
    TIMEOUT,
    WEBSOCKET_KEY,
    BackgroundLoop,
    H1WebSocket,
    H2WebSocket,
    RawWebSocket,
    WebSocketClosed,
    serving,
    start,
    wait_for,
)
from conftest import TRANSPORTS, Certificates, LogLines

from server_native.http.serve import serve_native_http
from server_native.http.websocket import upgrade_websocket
from server_native.interfaces.asgi import serve_asgi
from server_native.runtime.config import TlsConfig

#: The keys of the ASGI `websocket` scope, and no others.
SCOPE_KEYS = {
    "type", "asgi", "http_version", "scheme", "path", "raw_path", "query_string", "root_path",
    "headers", "client", "server", "subprotocols", "state", "extensions",
}  # fmt: skip
HTTP_VERSIONS = [pytest.param("1.1", id="http1"), pytest.param("2", id="http2")]


def connect(port: int, http_version: str, **options: Any) -> RawWebSocket:
    """A WebSocket client by hand over HTTP/1.1 or HTTP/2 (RFC 8441)."""
    return H1WebSocket(port, **options) if http_version == "1.1" else H2WebSocket(port, **options)


def client_context(certs: Certificates) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs.ca_path))


async def until(event: threading.Event) -> None:
    """Waits, on the server's loop, for an event the test thread sets."""
    while not event.is_set():
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------- the scope


class ScopeRecorder:
    """Keeps the scope, accepts with the first subprotocol offered, says
    which one it got, and closes."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept", "subprotocol": scope["subprotocols"][0]})
        await send({"type": "websocket.send", "text": "accepted"})
        await send({"type": "websocket.close"})


@pytest.mark.parametrize("secure", [False, True], ids=["ws", "wss"])
@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_the_websocket_scope_has_the_spec_keys(
    native_callback: bool, http_version: str, secure: bool, certs: Certificates
) -> None:
    app = ScopeRecorder()
    tls = TlsConfig(certificate_path=str(certs.cert_path), key_path=str(certs.key_path)) if secure else None
    with serving(serve_asgi, app, lifespan="off", native_callback=native_callback, tls=tls) as running:
        protocols = ("sec-websocket-protocol", "chat, superchat")
        headers = [("sec-websocket-version", "13"), protocols]
        if http_version == "1.1":
            headers.append(("sec-websocket-key", WEBSOCKET_KEY))
        client_tls = client_context(certs) if secure else None
        with connect(running.port, http_version, path="/chat%20room?x=1", headers=headers, tls=client_tls) as ws:
            assert ws.receive() == "accepted"
    (scope,) = app.scopes
    assert set(scope) == SCOPE_KEYS, set(scope) ^ SCOPE_KEYS
    assert scope["type"] == "websocket"
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.4"}
    assert scope["http_version"] == http_version
    assert scope["scheme"] == ("wss" if secure else "ws")
    assert (scope["path"], scope["raw_path"], scope["query_string"]) == ("/chat room", b"/chat%20room", b"x=1")
    assert scope["root_path"] == ""
    assert (b"host", f"127.0.0.1:{running.port}".encode()) in scope["headers"]
    assert (b"sec-websocket-protocol", b"chat, superchat") in scope["headers"]
    assert scope["client"][0] == "127.0.0.1"
    assert tuple(scope["server"]) == ("127.0.0.1", running.port)
    assert scope["subprotocols"] == ["chat", "superchat"]
    assert scope["state"] == {}
    assert scope["extensions"]["websocket.http.response"] == {}
    assert set(scope["extensions"]) == ({"websocket.http.response", "tls"} if secure else {"websocket.http.response"})
    if secure:
        assert scope["extensions"]["tls"]["client_cert_chain"] == []


@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_a_litestar_websocket_route(native_callback: bool) -> None:
    """Litestar routes on the scope's method, which a `websocket` scope has
    none of: a WebSocket route is found only with the spec's keys."""
    from litestar import Litestar, WebSocket, websocket
    from websockets.sync.client import connect as websocket_connect

    @websocket("/echo")
    async def echo(socket: WebSocket[Any, Any, Any]) -> None:
        await socket.accept()
        text = await socket.receive_text()
        await socket.send_text(f"echo: {text}")
        await socket.close()

    app = Litestar([echo])
    with serving(serve_asgi, app, native_callback=native_callback) as running:
        with websocket_connect(f"ws://127.0.0.1:{running.port}/echo", open_timeout=TIMEOUT) as ws:
            ws.send("hello")
            assert ws.recv(timeout=TIMEOUT) == "echo: hello"


# ---------------------------------------------------------------- denials


class Denials:
    """Denies each WebSocket in the way its path names, then records what
    its next receive() returns."""

    def __init__(self) -> None:
        self.after: list[dict[str, Any]] = []
        self.done = threading.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        if scope["path"] == "/returns-without-accepting":
            self.done.set()
            return
        try:
            await getattr(self, scope["path"].strip("/").replace("-", "_"))(send)
        finally:
            self.after.append(await receive())
            self.done.set()

    @staticmethod
    def start(status: Any = 400, headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
        return {"type": "websocket.http.response.start", "status": status, "headers": headers or []}

    async def streamed(self, send: Any) -> None:
        await send(self.start(400, [(b"content-length", b"20"), (b"content-type", b"text/plain")]))
        await send({"type": "websocket.http.response.body", "body": b"0123456789", "more_body": True})
        await send({"type": "websocket.http.response.body", "body": b"abcdefghij"})

    async def closed(self, send: Any) -> None:
        await send({"type": "websocket.close"})

    async def returns_after_start(self, send: Any) -> None:
        await send(self.start())

    async def raises_after_start(self, send: Any) -> None:
        await send(self.start())
        raise RuntimeError("the app failed mid-denial")

    async def second_start(self, send: Any) -> None:
        await send(self.start())
        await send(self.start())

    async def second_start_caught(self, send: Any) -> None:
        await send(self.start())
        with pytest.raises(RuntimeError):
            await send(self.start())

    async def invalid_status(self, send: Any) -> None:
        await send(self.start(99))

    async def wrong_message(self, send: Any) -> None:
        await send(self.start())
        await send({"type": "websocket.send", "text": "not now"})


#: What the app gets from receive() once the socket is denied.
NEVER_OPENED = {"type": "websocket.disconnect", "code": 1006, "reason": ""}


def denied(port: int, http_version: str, **options: Any) -> RawWebSocket:
    """The server's answer to a handshake it does not accept."""
    with connect(port, http_version, **options) as ws:
        return ws


@pytest.fixture(params=TRANSPORTS)
def denials(request: pytest.FixtureRequest) -> Iterator[tuple[Denials, Any]]:
    """The denying app, served on one transport."""
    app = Denials()
    with serving(serve_asgi, app, lifespan="off", native_callback=request.param) as running:
        yield app, running


@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
def test_a_denial_body_is_streamed(denials: tuple[Denials, Any], http_version: str) -> None:
    app, running = denials
    ws = denied(running.port, http_version, path="/streamed")
    assert ws.status == 400 and ws.body == b"0123456789abcdefghij"
    assert app.done.wait(TIMEOUT) and app.after == [NEVER_OPENED]


@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
def test_close_before_accept_is_403_and_receive_returns_at_once(
    denials: tuple[Denials, Any], http_version: str
) -> None:
    app, running = denials
    assert denied(running.port, http_version, path="/closed").status == 403
    assert app.done.wait(TIMEOUT) and app.after == [NEVER_OPENED]


@pytest.mark.parametrize(
    "path",
    ["/returns-after-start", "/raises-after-start", "/second-start", "/second-start-caught", "/invalid-status",
     "/wrong-message", "/returns-without-accepting"],
)  # fmt: skip
@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
def test_an_unfinished_denial_is_500(
    denials: tuple[Denials, Any], http_version: str, path: str, server_log: LogLines
) -> None:
    app, running = denials
    assert denied(running.port, http_version, path=path).status == 500
    assert app.done.wait(TIMEOUT) and app.after == ([] if path == "/returns-without-accepting" else [NEVER_OPENED])
    if path in ("/returns-after-start", "/second-start-caught"):
        server_log.wait("returned before finishing its denial", "answered 500")
    if path == "/returns-without-accepting":
        server_log.wait("returned without accepting or denying", "answered 500")


class Recorder:
    """Records that it was called at all."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.calls += 1
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"the app answered"})


INVALID_HANDSHAKES = {
    "no-key": ("1.1", [("Sec-WebSocket-Version", "13")], b"", 400),
    "short-key": ("1.1", [("Sec-WebSocket-Key", "c2hvcnQ="), ("Sec-WebSocket-Version", "13")], b"", 400),
    "version-12": ("1.1", [("Sec-WebSocket-Key", WEBSOCKET_KEY), ("Sec-WebSocket-Version", "12")], b"", 426),
    "no-version": ("1.1", [("Sec-WebSocket-Key", WEBSOCKET_KEY)], b"", 400),
    "a-body": ("1.1", [("Sec-WebSocket-Key", WEBSOCKET_KEY), ("Sec-WebSocket-Version", "13")], b"body", 400),
    "h2-version-12": ("2", [("sec-websocket-version", "12")], b"", 426),
    "h2-no-version": ("2", [], b"", 400),
}


@pytest.mark.parametrize("case", list(INVALID_HANDSHAKES))
@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_an_invalid_handshake_is_answered_by_the_server(native_callback: bool, case: str, server_log: LogLines) -> None:
    http_version, headers, body, status = INVALID_HANDSHAKES[case]
    app = Recorder()
    with serving(serve_asgi, app, lifespan="off", native_callback=native_callback) as running:
        options: dict[str, Any] = {"headers": headers, "path": "/chat"}
        if body:
            options["body"] = body
        ws = denied(running.port, http_version, **options)
        assert ws.status == status, ws.body
        if "version" in case:
            assert ws.headers["sec-websocket-version"] == "13"
        server_log.wait(
            "GET /chat" if http_version == "1.1" else "CONNECT /chat",
            "not a valid WebSocket handshake",
            f"answered {status}",
        )
    assert app.calls == 0


# ---------------------------------------------------------------- shutdown


class Holding:
    """Accepts, says so, and reads nothing until the client has seen the
    server's close frame; then records every message and the disconnect."""

    def __init__(self) -> None:
        self.received: list[Any] = []
        self.client_closed = threading.Event()
        self.finished = threading.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": "accepted"})
        await until(self.client_closed)
        while (message := await receive())["type"] == "websocket.receive":
            self.received.append(message["text"])
        self.received.append(message)
        self.finished.set()


class HoldingHandler(Holding):
    """The same with `upgrade_websocket` (HttpServer style)."""

    async def __call__(self, request: Any) -> None:  # type: ignore[override]
        socket_ = await upgrade_websocket(request)
        await socket_.send("accepted")
        await until(self.client_closed)
        async for message in socket_:
            self.received.append(message)
        self.received.append(socket_.close_code)
        self.finished.set()


SHUTDOWN_APPS = [
    pytest.param(serve_asgi, Holding, {"type": "websocket.disconnect", "code": 1012, "reason": ""}, id="asgi"),
    pytest.param(serve_native_http, HoldingHandler, 1012, id="upgrade_websocket"),
]


@pytest.mark.parametrize(("helper", "make_app", "disconnect"), SHUTDOWN_APPS)
@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_shutdown_closes_open_websockets_with_1012_and_waits_for_the_app(
    native_callback: bool, http_version: str, helper: Any, make_app: Any, disconnect: Any
) -> None:
    app = make_app()
    loop = BackgroundLoop()
    try:
        running = start(
            loop, helper, app, native_callback=native_callback, **({"lifespan": "off"} if helper is serve_asgi else {})
        )
        with connect(running.port, http_version) as ws:
            assert ws.receive() == "accepted"
            ws.send("before")
            ws.ping()  # the server has read "before": the app has not
            stopping = threading.Thread(target=running.stop)
            stopping.start()
            with pytest.raises(WebSocketClosed) as closed:
                ws.receive()
            assert closed.value.code == 1012
            app.client_closed.set()
            stopping.join(TIMEOUT)
        assert running.future.done() and running.future.exception() is None
        # The app's task ended before the server returned: it got what came
        # before the close, then the close's code.
        assert app.finished.is_set()
        assert app.received == ["before", disconnect]
    finally:
        loop.stop()


class Ignoring:
    """Accepts, then never reads again: its task must be cancelled."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": "accepted"})
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_a_task_that_ignores_the_disconnect_is_cancelled_after_shutdown_timeout(
    native_callback: bool, http_version: str, server_log: LogLines
) -> None:
    app = Ignoring()
    loop = BackgroundLoop()
    try:
        running = start(loop, serve_asgi, app, lifespan="off", native_callback=native_callback, shutdown_timeout=0.5)
        with connect(running.port, http_version) as ws:
            assert ws.receive() == "accepted"
            stopping = threading.Thread(target=running.stop)
            stopping.start()
            with pytest.raises(WebSocketClosed) as closed:
                ws.receive()
            assert closed.value.code == 1012
            stopping.join(TIMEOUT)
        assert running.future.done() and running.future.exception() is None
        assert app.cancelled.is_set()
        server_log.wait("cancelled 1 application task(s) still running after the shutdown timeout (0.5s)")
    finally:
        loop.stop()


@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_shutdown_waits_for_http_tasks_that_outlive_their_response(native_callback: bool) -> None:
    finished = threading.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"answered"})
        await asyncio.sleep(0.2)  # work after the response, as background tasks do
        finished.set()

    import httpx

    loop = BackgroundLoop()
    try:
        running = start(loop, serve_asgi, app, lifespan="off", native_callback=native_callback)
        assert httpx.get(running.url("/"), timeout=TIMEOUT).text == "answered"
        running.stop()
        assert finished.is_set()
    finally:
        loop.stop()


# ---------------------------------------------------------------- keep-alive pings


class Echo:
    """Echoes every message; records how the socket ended."""

    def __init__(self) -> None:
        self.ended: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        while (message := await receive())["type"] == "websocket.receive":
            await send({"type": "websocket.send", "text": message.get("text"), "bytes": message.get("bytes")})
        self.ended.append(message)


#: Pings often; a pong has time enough to come from a client on a busy machine.
PINGS = {"ws_ping_interval": 0.1, "ws_ping_timeout": 2.0}


@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_a_client_that_does_not_answer_pings_is_closed_with_1011(native_callback: bool, http_version: str) -> None:
    app = Echo()
    with serving(serve_asgi, app, lifespan="off", native_callback=native_callback, **PINGS) as running:
        with connect(running.port, http_version, answer_pings=False) as ws:
            with pytest.raises(WebSocketClosed) as closed:
                ws.receive()
            assert (closed.value.code, closed.value.reason) == (1011, "keepalive ping timeout")
            assert ws.pings >= 1
        wait_for(lambda: app.ended, what="the app's disconnect")
    assert app.ended == [{"type": "websocket.disconnect", "code": 1011, "reason": "keepalive ping timeout"}]


@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_a_client_that_answers_pings_stays(native_callback: bool, http_version: str) -> None:
    with serving(serve_asgi, Echo(), lifespan="off", native_callback=native_callback, **PINGS) as running:
        with connect(running.port, http_version) as ws:
            ws.wait_for_pings(5)
            ws.send("still here")
            assert ws.receive() == "still here"


@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_the_websockets_client_answers_pings_and_stays(native_callback: bool) -> None:
    from websockets.sync.client import connect as websocket_connect

    with serving(serve_asgi, Echo(), lifespan="off", native_callback=native_callback, **PINGS) as running:
        with websocket_connect(f"ws://127.0.0.1:{running.port}/", open_timeout=TIMEOUT, ping_interval=None) as ws:
            with pytest.raises(TimeoutError):
                ws.recv(timeout=1.0)  # several pings come and are answered meanwhile
            ws.send("still here")
            assert ws.recv(timeout=TIMEOUT) == "still here"


@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_pings_can_be_turned_off(native_callback: bool) -> None:
    with serving(serve_asgi, Echo(), lifespan="off", native_callback=native_callback, ws_ping_interval=None) as running:
        with connect(running.port, "1.1", answer_pings=False) as ws:
            ws.ping()
            ws.send("no pings")
            assert ws.receive() == "no pings"
            assert ws.pings == 0


def test_ping_options_are_checked() -> None:
    from server_native.runtime.config import ServerConfig

    with pytest.raises(ValueError, match="ws_ping_interval"):
        ServerConfig(ws_ping_interval=-1)
    with pytest.raises(ValueError, match="ws_max_queue"):
        ServerConfig(ws_max_queue=0)


# ---------------------------------------------------------------- the queue of received messages


class NotReading:
    """Accepts, then reads nothing until told."""

    def __init__(self) -> None:
        self.go = threading.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await until(self.go)
        while (await receive())["type"] == "websocket.receive":
            pass


@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
def test_ws_max_queue_stops_reading_once_that_many_messages_wait(http_version: str) -> None:
    """In process, once ``ws_max_queue`` messages wait for the app the
    server reads nothing more from the socket (a ping of the client's waits
    unanswered) until the app takes one; with room for one more, the ping
    is answered at once. (Over the socket bridge the messages in flight are
    bounded by the bridge's window, in bytes, instead.)"""
    for max_queue in (3, 2):
        app = NotReading()
        with serving(serve_asgi, app, lifespan="off", ws_max_queue=max_queue, ws_ping_interval=None) as running:
            with connect(running.port, http_version) as ws:
                ws.send("one")
                ws.send("two")
                answered = threading.Event()
                probe = threading.Thread(target=lambda: (ws.ping(), answered.set()))
                probe.start()
                if max_queue == 2:
                    assert not answered.wait(0.5), "the server read on with its queue full"
                app.go.set()
                assert answered.wait(TIMEOUT)
                probe.join(TIMEOUT)
