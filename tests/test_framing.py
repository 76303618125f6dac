"""The server owns a response's framing, on every API, transport and
protocol: an application's wrong ``Content-Length`` never reaches the wire,
a response the native side cannot send becomes a 500 (or a cut-off stream),
and a HEAD response never carries a body.

Each case runs the same misbehaving application on each interface (ASGI,
WSGI, the direct API with and without ``native_direct``, the HttpServer-style
callback), over both transports where the interface has them (in-process
and the socket bridge), and is read by a real client on HTTP/1.1 (a raw
socket parsed by h11, plain and TLS), HTTP/2 (h2 frames, h2c and TLS) and
HTTP/3 (aioquic). After a bad response the same connection must still give
the next request its own, right answer, or be closed: never a desynchronised
one."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h11
import httpx
import pytest
from apps.harness import Running, serving
from conftest import Certificates, LogLines, requires_curl
from h3client import h3_connect

from server_native import NativeDirectResponse, serve_native_direct, serve_native_http
from server_native.interfaces.asgi import serve_asgi
from server_native.interfaces.wsgi import serve_wsgi
from server_native.runtime.bound import tls_settings

TIMEOUT = 10.0
#: A response a body must never be able to smuggle onto a connection.
FORGED = b"HTTP/1.1 302 Found\r\nLocation: http://evil.example/\r\nContent-Length: 0\r\n\r\n"
OK_BODY = b"ok"


# ---------------------------------------------------------------- the misbehaving application, per interface
#
# /whole-long    Content-Length 20, a whole body of 10 bytes      -> 500
# /whole-short   Content-Length 5, a whole body with FORGED after -> 500
# /stream-short  Content-Length 20, a streamed body of 10 bytes   -> cut off
# /stream-over   Content-Length 5, "hello" then FORGED, streamed  -> cut off
# /bad-header    a header value with CR LF                         -> 500
# /bad-status    status 999                                        -> 500
# /text-body     a str body where bytes are due                    -> 500
# /head          200 with a body and a Content-Length; asked with HEAD
# /ok            200 "ok"

CASES: dict[str, tuple[int, list[tuple[str, str]], list[bytes], bool]] = {
    # path: (status, headers, body chunks, streamed)
    "/whole-long": (200, [("content-length", "20")], [b"x" * 10], False),
    "/whole-short": (200, [("content-length", "5")], [b"hello" + FORGED], False),
    "/stream-short": (200, [("content-length", "20")], [b"x" * 10], True),
    "/stream-over": (200, [("content-length", "5")], [b"hello", FORGED], True),
    "/bad-header": (200, [("x-injected", "a\r\nSet-Cookie: evil=1")], [b"x"], False),
    "/bad-status": (999, [], [b"x"], False),
    "/head": (200, [("content-length", "31")], [b"this is the body of a GET: 31 b"], False),
    "/head-stream": (200, [], [b"streamed ", b"body"], True),
    "/ok": (200, [("content-length", "2")], [OK_BODY], False),
}


def _case(path: str) -> tuple[int, list[tuple[str, str]], list[bytes], bool]:
    return CASES.get(path, CASES["/ok"])


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    if scope["path"] == "/text-body":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": "text, not bytes"})
        return
    status, headers, chunks, streamed = _case(scope["path"])
    await send(
        {"type": "http.response.start", "status": status, "headers": [(k.encode(), v.encode()) for k, v in headers]}
    )
    if not streamed:
        await send({"type": "http.response.body", "body": b"".join(chunks)})
        return
    for chunk in chunks:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await asyncio.sleep(0.01)
    await send({"type": "http.response.body", "body": b""})


def wsgi_app(environ: dict[str, Any], start_response: Any) -> Any:
    path = environ["PATH_INFO"]
    if path == "/text-body":
        start_response("200 OK", [])
        return ["text, not bytes"]
    status, headers, chunks, streamed = _case(path)
    start_response(f"{status} Whatever", headers)
    if not streamed:
        return [b"".join(chunks)]
    return iter(chunks)


async def direct_handler(request: Any) -> Any:
    status, headers, chunks, streamed = _case(request.path)
    if not streamed:
        return NativeDirectResponse.bytes(status, headers, b"".join(chunks))

    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk
            await asyncio.sleep(0.01)

    return NativeDirectResponse.stream(status, headers, body=body())


async def http_server_handler(request: Any) -> None:
    response = request.response
    if request.uri.path == "/text-body":
        response.add("text, not bytes")
        await response.close()
        return
    status, headers, chunks, streamed = _case(request.uri.path)
    response.headers.clear()
    response.status_code = status
    for name, value in headers:
        response.headers.set(name, value)
    with contextlib.suppress(Exception):  # close() reports a content_length mismatch
        if streamed:
            await response.flush()
        for chunk in chunks:
            response.add(chunk)
            if streamed:
                await response.flush()
                await asyncio.sleep(0.01)
        await response.close()


def direct_sync_handler(request: Any) -> Any:
    """The direct handler for ``native_direct=True``, which calls it on its
    own thread: synchronous, whole bodies only."""
    status, headers, chunks, _ = _case(request.path)
    return NativeDirectResponse.bytes(status, headers, b"".join(chunks))


@dataclass(frozen=True)
class Interface:
    name: str
    helper: Callable[..., Any]
    app: Any
    options: dict[str, Any] = field(default_factory=dict)
    bridge: bool = True
    streams: bool = True


INTERFACES = [
    Interface("asgi", serve_asgi, asgi_app),
    Interface("wsgi", serve_wsgi, wsgi_app, bridge=False),
    Interface("direct", serve_native_direct, direct_handler),
    Interface(
        "direct-threads", serve_native_direct, direct_sync_handler, {"native_direct": True}, bridge=False, streams=False
    ),
    Interface("http-server", serve_native_http, http_server_handler),
]

SERVERS = [
    pytest.param(interface, transport, id=f"{interface.name}-{'native' if transport else 'bridge'}")
    for interface in INTERFACES
    for transport in (True, False)
    if transport or interface.bridge
]


@contextlib.contextmanager
def running(
    interface: Interface, native_callback: bool, certs: Certificates | None = None, http3: bool = False
) -> Iterator[Running]:
    options = dict(interface.options, native_callback=native_callback, http3=http3)
    if certs is not None:
        options["tls"] = tls_settings(certificate_path=certs.cert_path, key_path=certs.key_path)
    with serving(interface.helper, interface.app, **options) as server:
        yield server


# ---------------------------------------------------------------- clients


@dataclass
class Outcome:
    """What a client saw of one response."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    #: The body arrived whole, as its framing said.
    complete: bool = False

    @property
    def cut(self) -> bool:
        """A response head that arrived with a body that never completed."""
        return self.status is not None and not self.complete


def _h1_socket(port: int, context: ssl.SSLContext | None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    if context is None:
        return sock
    return context.wrap_socket(sock, server_hostname="localhost")


def h1_exchange(
    port: int, paths: list[str], method: str = "GET", context: ssl.SSLContext | None = None
) -> list[Outcome]:
    """Sends each request on one connection, one after another, while the
    connection lasts; the outcomes of those answered."""
    outcomes: list[Outcome] = []
    with _h1_socket(port, context) as sock:
        conn = h11.Connection(h11.CLIENT)
        for path in paths:
            request = h11.Request(method=method, target=path, headers=[("Host", "127.0.0.1")])
            try:
                sock.sendall(conn.send(request) + conn.send(h11.EndOfMessage()))
            except OSError:
                break
            outcome = Outcome()
            outcomes.append(outcome)
            if not _h1_read(sock, conn, outcome) or conn.our_state is not h11.DONE:
                break
            conn.start_next_cycle()
    return outcomes


def _h1_read(sock: socket.socket, conn: h11.Connection, outcome: Outcome) -> bool:
    """Reads one response into ``outcome``; False when the connection ended
    or broke instead."""
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return False
        if event is h11.NEED_DATA:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                data = b""
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Response):
            outcome.status = event.status_code
            outcome.headers = {k.decode(): v.decode("latin-1") for k, v in event.headers}
        elif isinstance(event, h11.Data):
            outcome.body += event.data
        elif isinstance(event, h11.EndOfMessage):
            outcome.complete = True
            return conn.their_state is h11.DONE
        elif isinstance(event, h11.ConnectionClosed):
            return False


def h2_exchange(
    port: int, paths: list[str], method: str = "GET", context: ssl.SSLContext | None = None
) -> list[Outcome]:
    """Sends every request at once on one HTTP/2 connection; the outcome of
    each stream (a reset stream is a cut or unanswered one)."""
    config = h2.config.H2Configuration(client_side=True, validate_inbound_headers=False)
    conn = h2.connection.H2Connection(config)
    outcomes: dict[int, Outcome] = {}
    with _h1_socket(port, context) as sock:
        conn.initiate_connection()
        scheme = "https" if context else "http"
        for path in paths:
            stream = conn.get_next_available_stream_id()
            outcomes[stream] = Outcome()
            headers = [(":method", method), (":path", path), (":scheme", scheme), (":authority", "127.0.0.1")]
            conn.send_headers(stream, headers, end_stream=True)
        sock.sendall(conn.data_to_send())
        open_streams = set(outcomes)
        deadline = time.monotonic() + TIMEOUT
        while open_streams and time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                break
            if not data:
                break
            try:
                events = conn.receive_data(data)
            except h2.exceptions.ProtocolError:
                break
            for event in events:
                outcome = outcomes.get(getattr(event, "stream_id", 0))
                if isinstance(event, h2.events.ResponseReceived) and outcome is not None:
                    headers = {k.decode(): v.decode("latin-1") for k, v in event.headers}
                    outcome.status = int(headers.pop(":status"))
                    outcome.headers = headers
                elif isinstance(event, h2.events.DataReceived) and outcome is not None:
                    outcome.body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded) and outcome is not None:
                    outcome.complete = True
                    open_streams.discard(event.stream_id)
                elif isinstance(event, h2.events.StreamReset):
                    open_streams.discard(event.stream_id)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    open_streams.clear()
            with contextlib.suppress(OSError):
                sock.sendall(conn.data_to_send())
    return [outcomes[stream] for stream in sorted(outcomes)]


def h3_exchange(port: int, certs: Certificates, paths: list[str], method: str = "GET") -> list[Outcome]:
    async def scenario() -> list[Outcome]:
        outcomes = []
        async with h3_connect("127.0.0.1", port, str(certs.ca_path)) as client:
            for path in paths:
                outcome = Outcome()
                try:
                    response = await client.request(method, path, timeout=TIMEOUT)
                except (ConnectionError, asyncio.TimeoutError):
                    pass
                else:
                    outcome = Outcome(response.status, dict(response.headers), response.body, True)
                outcomes.append(outcome)
        return outcomes

    return asyncio.run(asyncio.wait_for(scenario(), 4 * TIMEOUT))


PROTOCOLS = ["h1", "h1-tls", "h2c", "h2-tls", "h3"]


def exchange(
    protocol: str, server: Running, certs: Certificates, paths: list[str], method: str = "GET"
) -> list[Outcome]:
    if protocol == "h3":
        return h3_exchange(server.port, certs, paths, method)
    context = None
    if protocol.endswith("tls"):
        context = ssl.create_default_context(cafile=str(certs.ca_path))
        context.set_alpn_protocols(["h2" if protocol.startswith("h2") else "http/1.1"])
    if protocol.startswith("h2"):
        return h2_exchange(server.port, paths, method, context)
    return h1_exchange(server.port, paths, method, context)


@contextlib.contextmanager
def server_for(protocol: str, interface: Interface, native_callback: bool, certs: Certificates) -> Iterator[Running]:
    secure = protocol.endswith("tls") or protocol == "h3"
    with running(interface, native_callback, certs if secure else None, http3=protocol == "h3") as server:
        yield server


def assert_next_request_served(outcomes: list[Outcome], protocol: str) -> None:
    """The request after a bad response got its own answer, or (HTTP/1.1
    only) the connection was closed before it: never someone else's."""
    if len(outcomes) == 1:
        assert protocol.startswith("h1"), "HTTP/2 and HTTP/3 answer every stream"
        return
    last = outcomes[-1]
    assert (last.status, last.body, last.complete) == (200, OK_BODY, True), last


# ---------------------------------------------------------------- a whole body that disagrees with its Content-Length


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(("interface", "native_callback"), SERVERS)
@pytest.mark.parametrize(
    ("path", "declared", "actual"), [("/whole-long", 20, 10), ("/whole-short", 5, 5 + len(FORGED))]
)
def test_a_whole_body_that_disagrees_with_its_content_length_is_answered_500(
    interface: Interface,
    native_callback: bool,
    protocol: str,
    path: str,
    declared: int,
    actual: int,
    certs: Certificates,
    server_log: LogLines,
) -> None:
    with server_for(protocol, interface, native_callback, certs) as server:
        outcomes = exchange(protocol, server, certs, [path, "/ok"])
    first = outcomes[0]
    assert first.status == 500 and first.complete, first
    assert FORGED not in first.body and b"302" not in first.body
    assert first.headers.get("content-length") != str(declared)
    assert_next_request_served(outcomes, protocol)
    server_log.wait(f"Content-Length {declared} with a body of {actual} bytes", f"GET {path}")


# ---------------------------------------------------------------- a streamed body held to its Content-Length


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(("interface", "native_callback"), SERVERS)
@pytest.mark.parametrize("path", ["/stream-short", "/stream-over"])
def test_a_streamed_body_that_breaks_its_content_length_is_cut_off(
    interface: Interface,
    native_callback: bool,
    protocol: str,
    path: str,
    certs: Certificates,
    server_log: LogLines,
) -> None:
    if not interface.streams:
        pytest.skip("native_direct=True answers with whole bodies only")
    with server_for(protocol, interface, native_callback, certs) as server:
        outcomes = exchange(protocol, server, certs, [path, "/ok"])
    first = outcomes[0]
    # The head may have gone out (it declared the length); the body never
    # completes, and no byte past the declared length reaches the client.
    assert not first.complete, first
    assert b"302" not in first.body and b"evil" not in first.body
    declared = int(first.headers.get("content-length", "0")) if first.status else 0
    assert len(first.body) <= declared
    if protocol.startswith("h1"):
        assert len(outcomes) == 1, "an HTTP/1.1 connection ends with a cut-off response"
    assert_next_request_served(outcomes, protocol)
    server_log.wait("cut off", f"GET {path}")


# ---------------------------------------------------------------- a response that cannot be sent


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(("interface", "native_callback"), SERVERS)
@pytest.mark.parametrize("path", ["/bad-header", "/bad-status", "/text-body"])
def test_a_response_the_server_cannot_send_is_answered_500(
    interface: Interface, native_callback: bool, protocol: str, path: str, certs: Certificates
) -> None:
    if interface.name.startswith("direct") and path == "/text-body":
        pytest.skip("the direct API sends a text body as UTF-8, by design")
    with server_for(protocol, interface, native_callback, certs) as server:
        outcomes = exchange(protocol, server, certs, [path, "/ok"])
    first = outcomes[0]
    assert (first.status, first.complete) == (500, True), first
    assert "x-injected" not in first.headers and "set-cookie" not in first.headers
    assert_next_request_served(outcomes, protocol)


# ---------------------------------------------------------------- HEAD


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(("interface", "native_callback"), SERVERS)
def test_a_head_response_carries_no_body_and_keeps_its_length(
    interface: Interface, native_callback: bool, protocol: str, certs: Certificates
) -> None:
    paths = ["/head", "/head-stream"] if interface.streams else ["/head", "/head"]
    with server_for(protocol, interface, native_callback, certs) as server:
        heads = exchange(protocol, server, certs, paths, method="HEAD")
        after = exchange(protocol, server, certs, ["/head", "/ok"])
    head, streamed_head = heads
    assert (head.status, head.body, head.complete) == (200, b"", True), head
    assert head.headers.get("content-length") == "31"
    assert (streamed_head.status, streamed_head.body, streamed_head.complete) == (200, b"", True), streamed_head
    if interface.streams:
        # A streamed GET has no length: its HEAD must not claim one.
        assert "content-length" not in streamed_head.headers, streamed_head
    assert [(o.status, o.body) for o in after] == [(200, CASES["/head"][2][0]), (200, OK_BODY)]


# ---------------------------------------------------------------- HEAD with real apps and clients


def _django(kind: str) -> Any:
    import django
    from apps import django_urls
    from django.conf import settings

    if not settings.configured:
        settings.configure(**django_urls.SETTINGS)
        django.setup()
    if kind == "wsgi":
        from django.core.wsgi import get_wsgi_application

        return get_wsgi_application()
    from django.core.asgi import get_asgi_application

    return get_asgi_application()


def _fastapi() -> Any:
    from apps import fastapi_app

    return fastapi_app.app


REAL_APPS = {
    # name: (serve helper, app factory, path, the status its HEAD gets)
    "django-wsgi": (serve_wsgi, lambda: _django("wsgi"), "/", 200),
    "django-asgi": (serve_asgi, lambda: _django("asgi"), "/", 200),
    "fastapi-405": (serve_asgi, _fastapi, "/items", 405),
}


@requires_curl
@pytest.mark.parametrize("client", ["curl-h2c", "curl-h2-tls", "httpx-h2-tls", "curl-h1"])
@pytest.mark.parametrize("app_name", list(REAL_APPS))
def test_head_of_a_real_app_view_over_every_client(app_name: str, client: str, certs: Certificates) -> None:
    """Apps leave HEAD bodies to the server (every Django view, Starlette's
    error responses): curl -I and httpx must get a clean head over HTTP/2."""
    helper, app, path, status = REAL_APPS[app_name]
    tls = client.endswith("tls")
    options: dict[str, Any] = {}
    if tls:
        options["tls"] = tls_settings(certificate_path=certs.cert_path, key_path=certs.key_path)
    with serving(helper, app(), **options) as server:
        url = server.url(path).replace("127.0.0.1", "localhost") if tls else server.url(path)
        if client.startswith("httpx"):
            with httpx.Client(
                http2=True, http1=False, verify=ssl.create_default_context(cafile=str(certs.ca_path)), timeout=TIMEOUT
            ) as c:
                response = c.head(url)
            assert (response.http_version, response.status_code, response.content) == ("HTTP/2", status, b"")
            return
        flags = {
            "curl-h2c": ["--http2-prior-knowledge"],
            "curl-h2-tls": ["--http2", "--cacert", str(certs.ca_path)],
            "curl-h1": ["--http1.1"],
        }[client]
        done = subprocess.run(
            ["curl", "-sS", "-I", "--max-time", str(TIMEOUT), *flags, url],
            capture_output=True,
            text=True,
            timeout=TIMEOUT + 5,
        )
    assert done.returncode == 0, done.stderr
    status_line = done.stdout.splitlines()[0]
    assert status_line.split()[:2] == ["HTTP/1.1" if client == "curl-h1" else "HTTP/2", str(status)], done.stdout
