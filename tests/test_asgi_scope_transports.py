"""The ASGI scope is the same on both transports: one app that keeps every
scope it gets is served in-process (``native_callback=True``) and over the
socket bridge (``native_callback=False``), both get the same raw requests
over real sockets (HTTP/1.1 by hand, HTTP/2 with prior knowledge through h2,
WebSocket handshakes over both), and each pair of scopes must be equal.
Each request's scope is also held against ASGI's rules: ``raw_path`` is the
target's path as sent, ``path`` is it percent-decoded as UTF-8 under
``root_path``, ``query_string`` is the query as sent, and an authority the
target carries (absolute form, ``:authority``) is the first ``host`` header
when the request has none."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from apps.harness import TIMEOUT, WEBSOCKET_KEY, H2WebSocket, Running, serving

from server_native.interfaces.asgi import serve_asgi

ROOT_PATH = "/mount"


class ScopeRecorder:
    """Keeps a copy of every scope; answers 200 with no body, or accepts a
    WebSocket with the first subprotocol offered and closes it."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scopes.append(dict(scope))
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept", "subprotocol": (scope["subprotocols"] or [None])[0]})
            await send({"type": "websocket.close"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})


@dataclass
class Served:
    running: Running
    app: ScopeRecorder = field(default_factory=ScopeRecorder)


@pytest.fixture(scope="module")
def transports() -> Iterator[dict[str, Served]]:
    """The recorder served in-process and over the bridge, one server each."""
    apps = {"native": ScopeRecorder(), "bridge": ScopeRecorder()}
    options = {"lifespan": "off", "root_path": ROOT_PATH}
    with (
        serving(serve_asgi, apps["native"], native_callback=True, **options) as native,
        serving(serve_asgi, apps["bridge"], native_callback=False, **options) as bridge,
    ):
        yield {"native": Served(native, apps["native"]), "bridge": Served(bridge, apps["bridge"])}


# ---------------------------------------------------------------- clients


def h1(request: bytes) -> Callable[[int], int]:
    """Sends ``request`` as it is and returns the response's status (read
    up to the end of its head: a WebSocket goes no further)."""

    def send(port: int) -> int:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            sock.sendall(request)
            received = b""
            while b"\r\n\r\n" not in received:
                data = sock.recv(65536)
                assert data, f"the connection closed before the response head: {received!r}"
                received += data
        return int(received.split(b" ", 2)[1])

    return send


def h2c(headers: list[tuple[bytes, bytes]]) -> Callable[[int], int]:
    """One HTTP/2 request in cleartext (prior knowledge) with ``headers``
    as they are; returns the response's status, 0 for a stream reset."""

    def send(port: int) -> int:
        config = h2.config.H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False)
        connection = h2.connection.H2Connection(config)
        connection.initiate_connection()
        connection.send_headers(1, headers, end_stream=True)
        status = 0
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            sock.sendall(connection.data_to_send())
            while True:
                data = sock.recv(65536)
                assert data, "the connection closed before the stream ended"
                for event in connection.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        status = int(dict(event.headers)[b":status"])
                    if isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                        return status
                sock.sendall(connection.data_to_send())

    return send


def h2_websocket(path: str, protocols: str) -> Callable[[int], int]:
    """An RFC 8441 WebSocket handshake offering ``protocols``; its status."""

    def send(port: int) -> int:
        headers = [("sec-websocket-version", "13"), ("sec-websocket-protocol", protocols)]
        with H2WebSocket(port, path=path, headers=headers) as ws:
            return ws.status

    return send


def http11(target: bytes, *fields: bytes) -> bytes:
    return b"\r\n".join([b"GET " + target + b" HTTP/1.1", *fields, b"Connection: close", b"", b""])


def h2_get(
    path: bytes, *fields: tuple[bytes, bytes], authority: bytes | None = b"example.test"
) -> list[tuple[bytes, bytes]]:
    pseudo = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", path)]
    if authority is not None:
        pseudo.insert(2, (b":authority", authority))
    return [*pseudo, *fields]


H1_UPGRADE = [
    b"Upgrade: websocket",
    b"Connection: Upgrade",
    b"Sec-WebSocket-Key: " + WEBSOCKET_KEY.encode(),
    b"Sec-WebSocket-Version: 13",
]

#: name: (the request, what its scope must hold under ASGI's rules; or the
#: status of its refusal (0: a stream reset), the app never called).
CASES: dict[str, tuple[Callable[[int], int], dict[str, Any] | int]] = {
    "origin-form": (
        h1(http11(b"/plain/path?a=1&b=two", b"Host: example.test")),
        {"type": "http", "http_version": "1.1", "method": "GET", "scheme": "http", "root_path": ROOT_PATH,
         "path": ROOT_PATH + "/plain/path", "raw_path": b"/plain/path", "query_string": b"a=1&b=two"},
    ),
    "absolute-form without Host": (
        h1(http11(b"http://example.com/p?q=1")),
        {"path": ROOT_PATH + "/p", "raw_path": b"/p", "query_string": b"q=1",
         "headers": [(b"host", b"example.com"), (b"connection", b"close")]},
    ),
    "absolute-form with Host": (
        h1(http11(b"http://example.com/p", b"Host: other.test")),
        {"raw_path": b"/p", "headers": [(b"host", b"other.test"), (b"connection", b"close")]},
    ),
    "percent-encoded": (
        h1(http11(b"/a%2Fb%20c%25d/caf%C3%A9?x=%2F%20%25&y=caf%C3%A9", b"Host: example.test")),
        {"path": ROOT_PATH + "/a/b c%d/café", "raw_path": b"/a%2Fb%20c%25d/caf%C3%A9", "query_string": b"x=%2F%20%25&y=caf%C3%A9"},
    ),
    # HTTP/1.1 refuses a target that is not ASCII before any app sees it.
    "raw UTF-8 in the target": (h1(http11(b"/caf\xc3\xa9?name=j\xc3\xb6rg", b"Host: example.test")), 400),
    "raw latin-1 in the target": (h1(http11(b"/caf\xe9?name=j\xf6rg", b"Host: example.test")), 400),
    "latin-1 header value": (
        h1(http11(b"/", b"Host: example.test", b"X-Name: caf\xe9")),
        {"headers": [(b"host", b"example.test"), (b"x-name", b"caf\xe9"), (b"connection", b"close")]},
    ),
    "extension method": (
        h1(b"PURGE /cache HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n"),
        {"method": "PURGE", "path": ROOT_PATH + "/cache"},
    ),
    "HTTP/1.0": (
        h1(b"GET /old?x HTTP/1.0\r\nHost: example.test\r\n\r\n"),
        {"http_version": "1.0", "path": ROOT_PATH + "/old", "query_string": b"x"},
    ),
    "HTTP/2 :authority": (
        h2c(h2_get(b"/h2/a%2Fb%20c?x=%25")),
        {"http_version": "2", "path": ROOT_PATH + "/h2/a/b c", "raw_path": b"/h2/a%2Fb%20c", "query_string": b"x=%25",
         "headers": [(b"host", b"example.test")]},
    ),
    "HTTP/2 host header": (
        h2c(h2_get(b"/h2", (b"host", b"other.test"), authority=None)),
        {"http_version": "2", "headers": [(b"host", b"other.test")]},
    ),
    "HTTP/2 raw UTF-8 in the path": (
        h2c(h2_get(b"/caf\xc3\xa9?name=j\xc3\xb6rg")),
        {"path": ROOT_PATH + "/café", "raw_path": b"/caf\xc3\xa9", "query_string": b"name=j\xc3\xb6rg"},
    ),
    # HTTP/2 takes UTF-8 in :path as it is, and resets a stream whose
    # :path is not UTF-8.
    "HTTP/2 raw latin-1 in the path": (h2c(h2_get(b"/caf\xe9?name=j\xf6rg")), 0),
    "WebSocket over HTTP/1.1": (
        h1(b"\r\n".join([b"GET /chat%20room?x=1 HTTP/1.1", b"Host: example.test", *H1_UPGRADE,
                         b"Sec-WebSocket-Protocol: chat, superchat", b"Sec-WebSocket-Protocol: v2", b"", b""])),
        {"type": "websocket", "http_version": "1.1", "scheme": "ws", "path": ROOT_PATH + "/chat room",
         "raw_path": b"/chat%20room", "query_string": b"x=1", "subprotocols": ["chat", "superchat", "v2"]},
    ),
    "WebSocket over HTTP/2": (
        h2_websocket("/chat%20room?x=1", "chat, superchat"),
        {"type": "websocket", "http_version": "2", "scheme": "ws", "path": ROOT_PATH + "/chat room",
         "raw_path": b"/chat%20room", "query_string": b"x=1", "subprotocols": ["chat", "superchat"]},
    ),
}  # fmt: skip


def exchange(served: Served, send: Callable[[int], int]) -> tuple[int, dict[str, Any] | None]:
    """The response's status, and the scope the app got (None: none)."""
    before = len(served.app.scopes)
    status = send(served.running.port)
    scopes = served.app.scopes[before:]
    assert len(scopes) <= 1, scopes
    return status, scopes[0] if scopes else None


def comparable(scope: dict[str, Any], port: int) -> dict[str, Any]:
    """The scope with what is each server's or connection's own taken out:
    the client's port (every connection has its own) and the server's port
    (each transport has its own listener), also where a header repeats it.
    Nothing else in a scope depends on the transport."""
    host, client_port = scope["client"]
    assert isinstance(client_port, int)
    assert scope["server"] == ("127.0.0.1", port)
    own_port = str(port).encode()
    return {
        **scope,
        "client": (host, "<client port>"),
        "server": ("127.0.0.1", "<server port>"),
        "headers": [(name, value.replace(own_port, b"<server port>")) for name, value in scope["headers"]],
    }


@pytest.mark.parametrize("case", list(CASES))
def test_both_transports_build_the_same_scope(transports: dict[str, Served], case: str) -> None:
    send, expected = CASES[case]
    outcomes = {name: exchange(served, send) for name, served in transports.items()}
    (native_status, native_scope), (bridge_status, bridge_scope) = outcomes["native"], outcomes["bridge"]
    assert native_status == bridge_status
    if isinstance(expected, int):
        assert (native_status, native_scope, bridge_scope) == (expected, None, None)
        return
    assert native_scope is not None and bridge_scope is not None, (native_status, bridge_status)
    native = comparable(native_scope, transports["native"].running.port)
    bridge = comparable(bridge_scope, transports["bridge"].running.port)
    assert bridge == native
    assert {key: native[key] for key in expected} == expected
    assert native["root_path"] == ROOT_PATH
    assert native["client"] == ("127.0.0.1", "<client port>")
