"""permessage-deflate (RFC 7692) on WebSockets, with real clients: the
`websockets` client (which offers it by default), wsproto over a plain
socket and over an HTTP/2 extended CONNECT stream, and handshakes written by
hand to see which offers the server takes; and the RFC 6455 guarantees
with compression on. Every `serve` test runs on both transports (in-process
and the socket bridge)."""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

import pytest
from apps.harness import h2_websocket_exchange, serving

from server_native.http.websocket import upgrade_websocket
from server_native.interfaces.asgi import serve_asgi

TIMEOUT = 10
MIB = 1 << 20
#: What every handshake here carries besides its extensions offer.
KEY = "dGhlIHNhbXBsZSBub25jZQ=="


class Echo:
    """Echoes every message; records how each socket ended."""

    def __init__(self) -> None:
        self.closed: list[tuple[int | None, str]] = []
        self.done = threading.Event()

    async def __call__(self, request: Any) -> None:
        socket_ = await upgrade_websocket(request)
        try:
            async for message in socket_:
                await socket_.send(message)
        finally:
            self.closed.append((socket_.close_code, socket_.close_reason))
            self.done.set()


def ws_url(running: Any) -> str:
    return f"ws://127.0.0.1:{running.port}/"


def compressible_text(size: int) -> str:
    line = "permessage-deflate keeps repeated text small; "
    return (line * (size // len(line) + 1))[:size]


def test_deflate_is_negotiated_and_large_messages_round_trip(serve: Any) -> None:
    from websockets.extensions.permessage_deflate import PerMessageDeflate
    from websockets.sync.client import connect

    handler = Echo()
    running = serve(handler)
    text = compressible_text(3 * MIB)
    binary = text.encode() + os.urandom(64 * 1024)
    with connect(ws_url(running), max_size=None, open_timeout=TIMEOUT, close_timeout=TIMEOUT) as ws:
        assert ws.response.headers["Sec-WebSocket-Extensions"] == "permessage-deflate"
        assert [type(extension) for extension in ws.protocol.extensions] == [PerMessageDeflate]
        for message in (text, binary, "", b"", "", "é" * 50_000, os.urandom(MIB), b"", "short"):
            ws.send(message)
            assert ws.recv(timeout=TIMEOUT) == message
    assert handler.done.wait(TIMEOUT)
    assert handler.closed == [(1000, "")]


def test_fragmented_compressed_messages(serve: Any) -> None:
    from websockets.sync.client import connect

    running = serve(Echo())
    pieces = [compressible_text(100_000), "middle", compressible_text(200_000)]
    with connect(ws_url(running), max_size=None, open_timeout=TIMEOUT, close_timeout=TIMEOUT) as ws:
        assert ws.protocol.extensions
        ws.send(iter(pieces))  # one message, one frame per piece
        assert ws.recv(timeout=TIMEOUT) == "".join(pieces)
        ws.send(iter([piece.encode() for piece in pieces]))
        assert ws.recv(timeout=TIMEOUT) == "".join(pieces).encode()


def test_reduced_windows_and_no_context_takeover(serve: Any) -> None:
    from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
    from websockets.sync.client import connect

    running = serve(Echo())
    offer = ClientPerMessageDeflateFactory(
        server_no_context_takeover=True,
        client_no_context_takeover=True,
        server_max_window_bits=9,
        client_max_window_bits=9,
    )
    with connect(
        ws_url(running),
        extensions=[offer],
        compression=None,
        max_size=None,
        open_timeout=TIMEOUT,
        close_timeout=TIMEOUT,
    ) as ws:
        assert ws.response.headers["Sec-WebSocket-Extensions"] == (
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=9"
        )
        (extension,) = ws.protocol.extensions
        assert (extension.remote_max_window_bits, extension.remote_no_context_takeover) == (9, True)
        for message in (compressible_text(MIB), compressible_text(1000), os.urandom(100_000)):
            ws.send(message)
            assert ws.recv(timeout=TIMEOUT) == message


def test_a_client_that_does_not_offer_it_gets_no_extension(serve: Any) -> None:
    from websockets.sync.client import connect

    running = serve(Echo())
    with connect(ws_url(running), compression=None, open_timeout=TIMEOUT, close_timeout=TIMEOUT) as ws:
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        assert ws.protocol.extensions == []
        ws.send("plain")
        assert ws.recv(timeout=TIMEOUT) == "plain"


def test_compression_turned_off_on_the_server(serve: Any) -> None:
    from websockets.sync.client import connect

    running = serve(Echo(), websocket_compression=False)
    with connect(ws_url(running), open_timeout=TIMEOUT, close_timeout=TIMEOUT) as ws:  # offers deflate
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        assert ws.protocol.extensions == []
        message = compressible_text(100_000)
        ws.send(message)
        assert ws.recv(timeout=TIMEOUT) == message


@pytest.mark.parametrize("fragmented", [False, True], ids=["one-frame", "fragmented"])
@pytest.mark.parametrize("compression", ["deflate", None], ids=["compressed-bomb", "plain"])
def test_a_message_over_the_limit_is_1009(serve: Any, compression: str | None, fragmented: bool) -> None:
    """8 MiB of zeros (a few KiB on the wire once deflated), whole or in
    frames each under the limit: the server stops inflating or gathering at
    its limit and closes with 1009, and keeps serving."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    handler = Echo()
    running = serve(handler, websocket_max_message_size=MIB)
    with connect(
        ws_url(running), compression=compression, max_size=None, open_timeout=TIMEOUT, close_timeout=TIMEOUT
    ) as ws:
        ws.send(b"just under" + bytes(MIB - 10))  # exactly the limit: fine
        assert len(ws.recv(timeout=TIMEOUT)) == MIB
        with pytest.raises(ConnectionClosed) as closed:
            ws.send(iter([bytes(MIB // 2)] * 16) if fragmented else bytes(8 * MIB))
            ws.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    assert handler.done.wait(TIMEOUT)
    assert handler.closed == [(1009, "")]
    with connect(ws_url(running), compression=compression, open_timeout=TIMEOUT, close_timeout=TIMEOUT) as ws:
        ws.send("still serving")
        assert ws.recv(timeout=TIMEOUT) == "still serving"


def test_ping_close_echo_and_invalid_utf8_with_compression(serve: Any) -> None:
    """RFC 6455 with deflate on: pings are answered, the client's close code
    comes back to it and reaches the application, text that is not UTF-8
    closes with 1007."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    handler = Echo()
    running = serve(handler)
    with connect(ws_url(running), open_timeout=TIMEOUT, close_timeout=TIMEOUT) as ws:
        assert ws.protocol.extensions
        assert ws.ping(b"are you there").wait(TIMEOUT)
        ws.send("after the ping")
        assert ws.recv(timeout=TIMEOUT) == "after the ping"
        ws.close(4001, "done here")
        assert ws.protocol.close_rcvd is not None
        assert (ws.protocol.close_rcvd.code, ws.protocol.close_rcvd.reason) == (4001, "done here")
    assert handler.done.wait(TIMEOUT)
    assert handler.closed == [(4001, "done here")]
    with connect(ws_url(running), open_timeout=TIMEOUT, close_timeout=TIMEOUT) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            ws.send(b"caf\xe9", text=True)  # Latin-1 sent as text
            ws.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1007


def wsproto_echo(port: int, message: str) -> tuple[list[Any], str, int]:
    """One message over wsproto offering permessage-deflate: the accepted
    extensions, the echo, and the bytes the server sent for it."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage
    from wsproto.extensions import PerMessageDeflate

    ws = WSConnection(ConnectionType.CLIENT)
    accepted: list[Any] = []
    echoed: list[str] = []
    received = 0
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(ws.send(Request(host="127.0.0.1", target="/", extensions=[PerMessageDeflate()])))
        while True:
            data = sock.recv(65536)
            assert data, "the server hung up"
            if accepted:
                received += len(data)
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    accepted = event.extensions
                    sock.sendall(ws.send(TextMessage(data=message)))
                elif isinstance(event, TextMessage):
                    echoed.append(event.data)
                    if event.message_finished:
                        sock.sendall(ws.send(CloseConnection(code=1000)))
                elif isinstance(event, CloseConnection):
                    return accepted, "".join(echoed), received


def test_the_server_compresses_what_it_sends(serve: Any) -> None:
    running = serve(Echo())
    message = compressible_text(2 * MIB)
    accepted, echoed, received = wsproto_echo(running.port, message)
    assert [extension.name for extension in accepted] == ["permessage-deflate"]
    assert echoed == message
    assert received < len(message) // 20


def handshake(sock: socket.socket, port: int, offers: list[str]) -> dict[str, str]:
    """An HTTP/1.1 upgrade written by hand; the 101's headers (lower-cased)."""
    lines = [
        "GET / HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {KEY}",
        "Sec-WebSocket-Version: 13",
        *(f"Sec-WebSocket-Extensions: {offer}" for offer in offers),
    ]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):  # byte by byte: the frames after it stay unread
        data = sock.recv(1)
        assert data, "the server hung up"
        head += data
    status, *fields = head.decode().strip().split("\r\n")
    assert status.startswith("HTTP/1.1 101")
    return {name.lower(): value.strip() for name, value in (field.split(":", 1) for field in fields)}


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv1: bool = False) -> bytes:
    """One small masked frame, as a client sends it."""
    mask = os.urandom(4)
    head = bytes([(0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode, 0x80 | len(payload)])
    return head + mask + bytes(byte ^ mask[at % 4] for at, byte in enumerate(payload))


def server_frame(sock: socket.socket) -> tuple[int, bytes]:
    """The opcode and payload of the next (small, unmasked) server frame."""

    def exactly(count: int) -> bytes:
        data = b""
        while len(data) < count:
            more = sock.recv(count - len(data))
            assert more, "the server hung up"
            data += more
        return data

    first, length = exactly(2)
    assert length < 126
    return first & 0x0F, exactly(length)


CLOSE = 0x8


@pytest.mark.parametrize(
    ("frames", "answer"),
    [
        ([client_frame(0x1, b"\xc3", fin=False), client_frame(0x0, b"\xa9")], (0x1, "é".encode())),
        ([client_frame(0x1, b"\xc3", fin=False), client_frame(0x0, b"(")], (CLOSE, 1007)),
        ([client_frame(0x0, b"nothing to continue")], (CLOSE, 1002)),
        ([client_frame(0x1, b"a", fin=False), client_frame(0x1, b"b")], (CLOSE, 1002)),
        ([client_frame(0x1, b"compressed?", rsv1=True)], (CLOSE, 1002)),
    ],
    ids=[
        "utf8-split-across-frames",
        "invalid-utf8-across-frames",
        "lone-continuation",
        "message-inside-a-message",
        "rsv1-without-deflate",
    ],
)
def test_frames_by_hand(serve: Any, frames: list[bytes], answer: tuple[int, Any]) -> None:
    running = serve(Echo())
    with socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT) as sock:
        handshake(sock, running.port, [])
        sock.sendall(b"".join(frames))
        opcode, payload = server_frame(sock)
    got = (opcode, int.from_bytes(payload[:2], "big") if opcode == CLOSE else payload)
    assert got == answer


@pytest.mark.parametrize(
    ("offers", "answer"),
    [
        (["permessage-deflate; client_max_window_bits"], "permessage-deflate"),
        (["permessage-deflate; client_max_window_bits=10"], "permessage-deflate"),
        (
            ["permessage-deflate; server_max_window_bits=12; client_no_context_takeover"],
            "permessage-deflate; server_max_window_bits=12; client_no_context_takeover",
        ),
        # zlib cannot keep to a 2^8 window: that offer is declined, the next one taken
        (
            ["permessage-deflate; server_max_window_bits=8, permessage-deflate; server_max_window_bits=10"],
            "permessage-deflate; server_max_window_bits=10",
        ),
        (
            ["x-webkit-deflate-frame", "PerMessage-Deflate; server_no_context_takeover"],
            "permessage-deflate; server_no_context_takeover",
        ),
        (["permessage-deflate; unknown_parameter, permessage-deflate"], "permessage-deflate"),
        (['permessage-deflate; server_max_window_bits="11"'], "permessage-deflate; server_max_window_bits=11"),
        (["permessage-deflate; server_max_window_bits=8"], None),
        (["permessage-deflate; server_max_window_bits"], None),
        (["permessage-deflate; client_max_window_bits=16"], None),
        (["permessage-deflate; client_max_window_bits=09"], None),
        (["permessage-deflate; server_no_context_takeover; server_no_context_takeover"], None),
        (["permessage-deflate; server_no_context_takeover=1"], None),
        (["x-webkit-deflate-frame"], None),
    ],
)
def test_which_offer_is_taken(serve: Any, offers: list[str], answer: str | None) -> None:
    running = serve(Echo())
    with socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT) as sock:
        assert handshake(sock, running.port, offers).get("sec-websocket-extensions") == answer


def test_deflate_over_http2(serve: Any) -> None:
    running = serve(Echo())
    # compressible: 200 KB that fit the default 64 KiB flow-control window once deflated
    messages = [b"first", compressible_text(200_000).encode(), b""]
    headers, echoed = h2_websocket_exchange(running.port, messages, deflate=True)
    assert headers[":status"] == "200"
    assert headers["sec-websocket-extensions"] == "permessage-deflate; server_max_window_bits=15"
    assert echoed == messages


async def asgi_echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    while (message := await receive())["type"] == "websocket.receive":
        await send({"type": "websocket.send", "text": message.get("text"), "bytes": message.get("bytes")})


@pytest.mark.parametrize("compression", [True, False], ids=["compression-on", "compression-off"])
@pytest.mark.parametrize("transport", [True, False], ids=["native", "bridge"])
def test_asgi_app(transport: bool, compression: bool) -> None:
    from websockets.sync.client import connect

    message = compressible_text(MIB)
    with serving(serve_asgi, asgi_echo, native_callback=transport, websocket_compression=compression) as running:
        with connect(
            f"ws://127.0.0.1:{running.port}/", max_size=None, open_timeout=TIMEOUT, close_timeout=TIMEOUT
        ) as ws:
            assert bool(ws.protocol.extensions) is compression
            ws.send(message)
            assert ws.recv(timeout=TIMEOUT) == message
            ws.send(b"bytes")
            assert ws.recv(timeout=TIMEOUT) == b"bytes"
