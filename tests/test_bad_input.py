"""Bad input and failure: malformed requests are refused by the native side
without reaching Python, limits answer 431/413, slow and excess clients are
handled, and failing handlers or vanishing clients cost nothing else.

Malformed input is written with raw sockets, so exactly those bytes reach the
server."""

from __future__ import annotations

import asyncio
import http.client
import socket
import ssl
import threading
import time
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import hpack
import pytest
from apps.harness import wait_for

from server_native import BodyTooLarge, ClientDisconnected, HttpException

TIMEOUT = 5


# ---------------------------------------------------------------- helpers


class Calls:
    """A handler that records every call and answers 200 "ok"."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def __call__(self, request: Any) -> None:
        self.paths.append(request.uri.path)
        await request.read()
        request.response.write("ok")


def read_response(sock: socket.socket, deadline: float = TIMEOUT, until_eof: bool = False) -> bytes:
    """Everything the server sends until it closes the connection or (unless
    ``until_eof``) the first head and Content-Length body have arrived;
    bounded by ``deadline``."""
    sock.settimeout(deadline)
    data = b""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep and not until_eof:
            length = _content_length(head)
            if length is not None and len(body) >= length:
                break
    return data


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return None


def status_of(response: bytes) -> int:
    """The status code of a raw HTTP/1.x response (0 when there is none)."""
    line = response.split(b"\r\n", 1)[0]
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        return 0
    return int(parts[1])


def exchange(port: int, data: bytes, until_eof: bool = False) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        return read_response(sock, until_eof=until_eof)


def get_ok(port: int, path: str = "/ok") -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def settle(loop_thread: Any) -> None:
    """Lets the server's loop finish the step it is in (e.g. logging what a
    handler left behind) before the test goes on: CPython 3.11's traceback
    rendering is not safe to run on two threads at once."""
    loop_thread.run(asyncio.sleep(0.01))


# ---------------------------------------------------------------- malformed requests → 400


MALFORMED: dict[str, bytes] = {
    "garbage request line": b"GARBAGE\r\n\r\n",
    "missing target and version": b"GET\r\nHost: x\r\n\r\n",
    "bad version": b"GET / HTTX/1.1\r\nHost: x\r\n\r\n",
    "bad method byte": b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n",
    "space in target": b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n",
    "control byte in target": b"GET /a\x01b HTTP/1.1\r\nHost: x\r\n\r\n",
    "control byte in header value": b"GET / HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\n\r\n",
    "NUL in header value": b"GET / HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n",
    "space in header name": b"GET / HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n",
    "space before colon": b"GET / HTTP/1.1\r\nHost: x\r\nX-Name : v\r\n\r\n",
    "header without colon": b"GET / HTTP/1.1\r\nHost: x\r\nNoColonHere\r\n\r\n",
    "obs-fold continuation line": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: one\r\n two\r\n\r\n",
    "two different Content-Length values": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
    ),
    "Content-Length list with different values": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 4\r\n\r\nabcd"),
    "non-numeric Content-Length": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "negative Content-Length": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "missing Host on HTTP/1.1": b"GET / HTTP/1.1\r\n\r\n",
    "Host with a space": b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
    "Host with user info": b"GET / HTTP/1.1\r\nHost: user@x\r\n\r\n",
    "empty Host": b"GET / HTTP/1.1\r\nHost: \r\n\r\n",
    "two Host headers": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "two identical Host headers": b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
}


MALFORMED_CASES = [pytest.param(data, id=name) for name, data in MALFORMED.items()] + [
    pytest.param(b"GET / HTTP/1.1\r\nHost: x:notaport\r\n\r\n", id="Host with a non-numeric port"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x:99999\r\n\r\n", id="Host with an out-of-range port"),
]


@pytest.mark.parametrize("request_bytes", MALFORMED_CASES)
def test_malformed_request_gets_400_without_reaching_python(serve: Any, request_bytes: bytes) -> None:
    calls = Calls()
    server = serve(calls)
    response = exchange(server.port, request_bytes)
    assert status_of(response) == 400, response
    assert calls.paths == []
    # the server is still fine
    assert get_ok(server.port) == 200
    assert calls.paths == ["/ok"]


def test_fragment_in_target_gets_400(serve: Any) -> None:
    calls = Calls()
    server = serve(calls)
    response = exchange(server.port, b"GET /a#frag HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(response) == 400, response
    assert calls.paths == []


def test_content_length_with_chunked_gets_400(serve: Any) -> None:
    calls = Calls()
    server = serve(calls)
    response = exchange(
        server.port,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    assert status_of(response) == 400, response
    assert calls.paths == []


def test_fragment_in_second_request_on_a_connection_gets_400(serve: Any) -> None:
    """The check must follow the connection past a body, not only look at
    the first head."""
    calls = Calls()
    server = serve(calls)
    response = exchange(
        server.port,
        b"POST /first HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nGET /x#y Hi"
        b"GET /second#frag HTTP/1.1\r\nHost: x\r\n\r\n",
        until_eof=True,
    )
    assert response.startswith(b"HTTP/1.1 200"), response
    assert b"HTTP/1.1 400" in response, response
    assert calls.paths == ["/first"]


def test_fragment_after_chunked_body_gets_400(serve: Any) -> None:
    calls = Calls()
    server = serve(calls)
    response = exchange(
        server.port,
        b"POST /first HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nab#cd\r\n0\r\n\r\n"
        b"GET /second#frag HTTP/1.1\r\nHost: x\r\n\r\n",
        until_eof=True,
    )
    assert response.startswith(b"HTTP/1.1 200"), response
    assert b"HTTP/1.1 400" in response, response
    assert calls.paths == ["/first"]


def test_smuggling_head_arriving_in_pieces_gets_400(serve: Any) -> None:
    calls = Calls()
    server = serve(calls)
    pieces = [
        b"POST / HTTP/1.1\r\nHo",
        b"st: x\r\nContent-Len",
        b"gth: 4\r\nTransfer-Encoding: chu",
        b"nked\r\n\r\n0\r\n\r\n",
    ]
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(0.05)  # separate segments, so the head really arrives in pieces
        response = read_response(sock)
    assert status_of(response) == 400, response
    assert calls.paths == []


def test_fragment_in_target_over_tls_gets_400(serve: Any, certs: Any) -> None:
    calls = Calls()
    server = serve(calls, certificate_path=certs.cert_path, key_path=certs.key_path)
    context = ssl.create_default_context(cafile=str(certs.ca_path))
    context.set_alpn_protocols(["http/1.1"])
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /a#frag HTTP/1.1\r\nHost: x\r\n\r\n")
            response = read_response(tls)
    assert status_of(response) == 400, response
    assert calls.paths == []


def _h2_outcomes(
    port: int, requests: list[list[tuple[str, str]]], context: ssl.SSLContext | None = None
) -> list[int | str]:
    """What became of each HTTP/2 request, sent exactly as given on one
    connection (h2 library, prior knowledge, or ALPN over ``context``): its
    status, "reset" when the server reset its stream with PROTOCOL_ERROR,
    "closed" when the connection ended first."""
    config = h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
    )
    connection = h2.connection.H2Connection(config=config)
    outcomes: dict[int, int | str] = {}
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        sock = context.wrap_socket(raw, server_hostname="localhost") if context else raw
        connection.initiate_connection()
        streams = []
        for headers in requests:
            streams.append(connection.get_next_available_stream_id())
            connection.send_headers(streams[-1], headers, end_stream=True)
        sock.sendall(connection.data_to_send())
        while len(outcomes) < len(streams):
            data = sock.recv(65536)
            if not data:
                break
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    outcomes[event.stream_id] = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.StreamReset):
                    protocol_error = event.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
                    outcomes[event.stream_id] = "reset" if protocol_error else f"reset {event.error_code!r}"
                elif isinstance(event, h2.events.ConnectionTerminated):
                    return [outcomes.get(stream, "closed") for stream in streams]
            sock.sendall(connection.data_to_send())
    return [outcomes.get(stream, "closed") for stream in streams]


def _h2_statuses(port: int, requests: list[list[tuple[str, str]]], context: ssl.SSLContext | None = None) -> list[int]:
    """The status of each HTTP/2 request (see ``_h2_outcomes``); 0 for a
    request whose stream or connection the server reset."""
    return [outcome if isinstance(outcome, int) else 0 for outcome in _h2_outcomes(port, requests, context)]


def _h2_status(port: int, headers: list[tuple[str, str]]) -> int:
    return _h2_statuses(port, [headers])[0]


def _get(path: str) -> list[tuple[str, str]]:
    return [(":method", "GET"), (":scheme", "http"), (":authority", "x"), (":path", path)]


def test_http2_fragment_in_path_is_refused(serve: Any) -> None:
    calls = Calls()
    server = serve(calls)
    status = _h2_status(server.port, _get("/a#frag"))
    assert status == 0 or 400 <= status < 500, status
    assert calls.paths == []


def test_http2_fragment_refusal_resets_only_its_stream(serve: Any) -> None:
    """The second '#' path comes from the HPACK dynamic table (the client
    indexed the first), so the guard's table must follow the client's; the
    requests around them are served on the same connection."""
    calls = Calls()
    server = serve(calls)
    statuses = _h2_statuses(server.port, [_get("/before"), _get("/a#frag"), _get("/a#frag"), _get("/after")])
    assert statuses == [200, 0, 0, 200]
    assert sorted(calls.paths) == ["/after", "/before"]


def test_http2_fragment_checks_follow_the_dynamic_table_through_evictions(serve: Any) -> None:
    """120 requests on one connection, each with a large header of its own,
    so the client's HPACK table keeps evicting; a third of the paths are
    sent again (indexed when still in the table). Every '#' path is reset,
    every other one served."""
    calls = Calls()
    server = serve(calls)
    paths = []
    for i in range(120):
        path = f"/bad{i}#x" if i % 2 else f"/ok{i}"
        paths.append(paths[i - 3] if i % 3 == 0 and i >= 3 else path)
    requests = [_get(path) + [(f"x-filler-{i}", "v" * (100 + i))] for i, path in enumerate(paths)]
    statuses = _h2_statuses(server.port, requests)
    assert statuses == [0 if "#" in path else 200 for path in paths]
    assert sorted(calls.paths) == sorted(path for path in paths if "#" not in path)


def test_http2_fragment_in_path_over_tls_is_refused(serve: Any, certs: Any) -> None:
    calls = Calls()
    server = serve(calls, certificate_path=certs.cert_path, key_path=certs.key_path)
    context = ssl.create_default_context(cafile=str(certs.ca_path))
    context.set_alpn_protocols(["h2"])
    statuses = _h2_statuses(server.port, [_get("/a#frag"), _get("/fine")], context)
    assert statuses == [0, 200]
    assert calls.paths == ["/fine"]


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


PROTOCOL_ERROR = (1).to_bytes(4, "big")


def _raw_h2_outcome(port: int, data: bytes, piece: int, context: ssl.SSLContext | None = None) -> int | str:
    """Sends ``data`` after the HTTP/2 preface (prior knowledge, or ALPN over
    ``context``) in pieces of ``piece`` bytes, each its own segment, and
    reads frames until stream 1 is answered: its status, "reset", "goaway",
    "closed" when the connection ended without GOAWAY, or "no answer"."""
    data = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(0x4, 0, 0, b"") + data
    decoder = hpack.Decoder()
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = context.wrap_socket(raw, server_hostname="localhost") if context else raw
        for at in range(0, len(data), piece):
            try:
                sock.sendall(data[at : at + piece])
            except (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError):
                break  # closed early: what it said before is still to be read
            time.sleep(0.01)  # separate segments, so frames really arrive in pieces
        received = b""
        while True:
            while len(received) < 9 or len(received) < 9 + int.from_bytes(received[:3], "big"):
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    return "closed"
                except TimeoutError:
                    return "no answer"
                if not chunk:
                    return "closed"
                received += chunk
            length = int.from_bytes(received[:3], "big")
            kind, stream, payload = received[3], int.from_bytes(received[5:9], "big"), received[9 : 9 + length]
            received = received[9 + length :]
            if kind == 0x7:
                return "goaway"
            if kind == 0x3 and stream == 1:
                return "reset" if payload == PROTOCOL_ERROR else f"reset {payload.hex()}"
            if kind == 0x1 and stream == 1:
                return int(dict(decoder.decode(payload))[":status"])


@pytest.mark.parametrize(("path", "outcome"), [("/a#frag", "reset"), ("/fine", 200)])
def test_http2_header_block_padded_split_and_in_pieces(serve: Any, path: str, outcome: int | str) -> None:
    """A block split over a padded, prioritised HEADERS frame and a
    CONTINUATION, with the path as a plain (not Huffman) literal, arriving a
    few bytes at a time: held back until whole, then refused or passed on."""
    calls = Calls()
    server = serve(calls)
    block = b"\x82\x86\x41\x01x\x04" + bytes([len(path)]) + path.encode()
    end_stream, end_headers, padded, priority = 0x1, 0x4, 0x8, 0x20
    headers = _frame(0x1, end_stream | padded | priority, 1, b"\x03" + bytes(4) + b"\x0f" + block[:5] + bytes(3))
    continuation = _frame(0x9, end_headers, 1, block[5:])
    assert _raw_h2_outcome(server.port, headers + continuation, piece=7) == outcome
    assert calls.paths == ([] if outcome == "reset" else [path])


@pytest.fixture(params=[pytest.param(False, id="h2c"), pytest.param(True, id="h2-tls")])
def h2_context(request: pytest.FixtureRequest, certs: Any) -> ssl.SSLContext | None:
    """None for HTTP/2 by prior knowledge over cleartext, or a client
    context that asks for h2 by ALPN."""
    if not request.param:
        return None
    context = ssl.create_default_context(cafile=str(certs.ca_path))
    context.set_alpn_protocols(["h2"])
    return context


def _serve_h2(serve: Any, calls: Calls, context: ssl.SSLContext | None, certs: Any) -> Any:
    if context is None:
        return serve(calls)
    return serve(calls, certificate_path=certs.cert_path, key_path=certs.key_path)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(("X-Upper", "v"), id="uppercase name"),
        pytest.param(("x-bad", "a\r\nb"), id="CR LF in value"),
        pytest.param(("x-bad", "a\x00b"), id="NUL in value"),
        pytest.param((":foo", "bar"), id="unknown pseudo-header"),
    ],
)
def test_http2_malformed_field_resets_only_its_stream(
    serve: Any, certs: Any, h2_context: ssl.SSLContext | None, bad: tuple[str, str]
) -> None:
    """RFC 9113 sections 8.2.1 and 8.3 make such a request malformed, a
    stream error: the requests around it go on over the same connection. The
    client indexes the bad field (Huffman-coded) and sends it again as a
    reference to its dynamic table entry, which is refused too."""
    calls = Calls()
    server = _serve_h2(serve, calls, h2_context, certs)
    name, value = bad
    with_bad = _get("/bad")[:3] + [(name, value)] + _get("/bad")[3:] if name.startswith(":") else _get("/bad") + [bad]
    requests = [_get("/one"), with_bad, _get("/two"), with_bad, _get("/three")]
    assert _h2_outcomes(server.port, requests, h2_context) == [200, "reset", 200, "reset", 200]
    assert sorted(calls.paths) == ["/one", "/three", "/two"]


@pytest.mark.parametrize(
    "field",
    [
        pytest.param(b"\x00\x05X-Bad\x01v", id="uppercase name, not indexed"),
        pytest.param(b"\x40\x05x-bad\x03a\nb", id="LF in value, indexed"),
        pytest.param(b"\x10\x04:foo\x01v", id="unknown pseudo-header, never indexed"),
    ],
)
def test_http2_malformed_raw_literal_resets_its_stream(serve: Any, field: bytes) -> None:
    """The same as plain (not Huffman) literals, in a block split over
    HEADERS and CONTINUATION arriving a few bytes at a time."""
    calls = Calls()
    server = serve(calls)
    block = b"\x82\x86\x41\x01x\x84" + field
    end_stream, end_headers = 0x1, 0x4
    frames = _frame(0x1, end_stream, 1, block[:4]) + _frame(0x9, end_headers, 1, block[4:])
    assert _raw_h2_outcome(server.port, frames, piece=7) == "reset"
    assert calls.paths == []


@pytest.mark.parametrize(
    "flood",
    [
        pytest.param(b"".join(_frame(0x9, 0, 1, b"") for _ in range(100)), id="empty CONTINUATION frames"),
        pytest.param(b"".join(_frame(0x9, 0, 1, b"\x40\x01a\x01b" * 1000) for _ in range(20)), id="full ones"),
        # 20000 bytes: over h2's 16 KiB frame limit, so h2 refuses it on its head alone
        pytest.param((20000).to_bytes(3, "big") + b"\x09\x00\x00\x00\x00\x01", id="one too large, head only"),
    ],
)
def test_http2_continuation_flood_gets_goaway(
    serve: Any, certs: Any, h2_context: ssl.SSLContext | None, flood: bytes
) -> None:
    """A header block that never ends is a connection error: the server
    says GOAWAY (h2's ENHANCE_YOUR_CALM or FRAME_SIZE_ERROR) before it
    closes, over cleartext as over TLS, without waiting for more."""
    calls = Calls()
    server = _serve_h2(serve, calls, h2_context, certs)
    data = _frame(0x1, 0x1, 1, b"\x82\x86\x41\x01x\x84") + flood
    assert _raw_h2_outcome(server.port, data, piece=len(data), context=h2_context) == "goaway"
    assert calls.paths == []


@pytest.mark.parametrize(
    "authority",
    [
        pytest.param("a b", id="space"),
        pytest.param("user@x", id="userinfo"),
    ],
)
def test_http2_invalid_authority_is_refused(serve: Any, authority: str) -> None:
    calls = Calls()
    server = serve(calls)
    status = _h2_status(
        server.port, [(":method", "GET"), (":scheme", "http"), (":authority", authority), (":path", "/")]
    )
    assert status == 0 or 400 <= status < 500, status
    assert calls.paths == []


def test_http2_control_byte_in_header_value_is_refused(serve: Any) -> None:
    calls = Calls()
    server = serve(calls)
    status = _h2_status(
        server.port,
        [(":method", "GET"), (":scheme", "http"), (":authority", "x"), (":path", "/"), ("x-bad", "a\x01b")],
    )
    assert status == 0 or 400 <= status < 500, status
    assert calls.paths == []


def test_transfer_encoding_not_ending_in_chunked_gets_400(serve: Any) -> None:
    calls = Calls()
    server = serve(calls)
    response = exchange(server.port, b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc")
    assert status_of(response) == 400, response
    assert calls.paths == []


@pytest.mark.parametrize(
    "codings",
    [
        pytest.param(b"Transfer-Encoding: chunked, chunked\r\n", id="chunked twice in one field"),
        pytest.param(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", id="chunked in two fields"),
        pytest.param(b"Transfer-Encoding: gzip, chunked\r\n", id="gzip then chunked"),
    ],
)
@pytest.mark.parametrize("tls", [pytest.param(False, id="cleartext"), pytest.param(True, id="tls")])
def test_transfer_encoding_other_than_one_chunked_gets_400_and_close(
    serve: Any, certs: Any, codings: bytes, tls: bool
) -> None:
    """RFC 9112 section 6.3: only chunked, once, frames a request body; the
    request that follows on the connection is not read (h11 answers 501 and
    httptools refuses all but gzip-then-chunked)."""
    calls = Calls()
    request = b"POST /te HTTP/1.1\r\nHost: x\r\n" + codings + b"\r\n3\r\nabc\r\n0\r\n\r\n"
    after = b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n"
    if tls:
        server = serve(calls, certificate_path=certs.cert_path, key_path=certs.key_path)
        context = ssl.create_default_context(cafile=str(certs.ca_path))
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as sock:
                sock.sendall(request + after)
                response = read_response(sock, until_eof=True)
    else:
        server = serve(calls)
        response = exchange(server.port, request + after, until_eof=True)
    assert status_of(response) == 400, response
    assert response.count(b"HTTP/1.1") == 1, response
    assert calls.paths == []


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("/caf\u00e9".encode(), id="UTF-8"),
        pytest.param(b"/a\x80", id="lone byte above 0x7f"),
        pytest.param(b"/q?x=\xff", id="byte above 0x7f in the query"),
        pytest.param(b'/a"b', id="double quote"),
        pytest.param(b"/a<b>", id="angle brackets"),
    ],
)
def test_target_byte_outside_rfc3986_gets_400(serve: Any, target: bytes) -> None:
    """h11 and httptools refuse every byte above 0x7f too."""
    calls = Calls()
    server = serve(calls)
    response = exchange(server.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n", until_eof=True)
    assert status_of(response) == 400, response
    assert calls.paths == []


def test_target_bytes_browsers_send_raw_are_served(serve: Any) -> None:
    """The control case: RFC 3986 leaves out `[]{}|^`\\` too, but browsers
    send them unencoded (h11 and httptools accept them)."""
    calls = Calls()
    server = serve(calls)
    for target in (b"/a|b^c?f[x]={y}&g=`\\", b"http://example.test/abs?x=[1]"):
        response = exchange(server.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status_of(response) == 200, (target, response)
    assert calls.paths == ["/a|b^c", "/abs"]


def test_http10_without_host_is_served(serve: Any) -> None:
    """Host is required by HTTP/1.1 only: the control case for the 400s above."""
    calls = Calls()
    server = serve(calls)
    response = exchange(server.port, b"GET /old HTTP/1.0\r\n\r\n")
    assert status_of(response) == 200, response
    assert response.endswith(b"ok")
    assert calls.paths == ["/old"]


def test_absolute_form_target_without_host_is_served(serve: Any) -> None:
    calls = Calls()
    server = serve(calls)
    response = exchange(server.port, b"GET http://example.test/abs HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert status_of(response) == 200, response
    assert calls.paths == ["/abs"]


def test_valid_host_forms_are_served(serve: Any) -> None:
    calls = Calls()
    server = serve(calls)
    for host in (b"example.test", b"example.test:8080", b"127.0.0.1", b"[::1]:80"):
        response = exchange(server.port, b"GET /h HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
        assert status_of(response) == 200, (host, response)
    assert calls.paths == ["/h"] * 4


# ---------------------------------------------------------------- limits


def test_header_block_over_max_header_size_gets_431(serve: Any) -> None:
    calls = Calls()
    server = serve(calls, max_header_size=16 * 1024)
    big = b"X-Big: " + b"a" * (32 * 1024) + b"\r\n"
    response = exchange(server.port, b"GET /big HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n")
    assert status_of(response) == 431, response[:200]
    assert calls.paths == []
    # a head under the limit is served
    fits = b"X-Fits: " + b"a" * (8 * 1024) + b"\r\n"
    response = exchange(server.port, b"GET /fits HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + fits + b"\r\n")
    assert status_of(response) == 200, response[:200]
    assert calls.paths == ["/fits"]


def test_header_block_over_max_header_size_split_over_many_headers(serve: Any) -> None:
    calls = Calls()
    server = serve(calls, max_header_size=16 * 1024)
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(40))
    response = exchange(server.port, b"GET /many HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert status_of(response) == 431, response[:200]
    assert calls.paths == []


def test_more_headers_than_max_headers_gets_431(serve: Any) -> None:
    calls = Calls()
    server = serve(calls, max_headers=10)
    many = b"".join(b"X-N%d: v\r\n" % i for i in range(20))
    response = exchange(server.port, b"GET /many HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert status_of(response) == 431, response[:200]
    assert calls.paths == []
    few = b"".join(b"X-N%d: v\r\n" % i for i in range(5))
    response = exchange(server.port, b"GET /few HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + few + b"\r\n")
    assert status_of(response) == 200, response[:200]
    assert calls.paths == ["/few"]


def test_the_default_max_headers_lets_100_header_lines_through_and_refuses_101(serve: Any) -> None:
    calls = Calls()
    server = serve(calls)
    head = b"GET /%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    fits = b"".join(b"X-N%d: v\r\n" % i for i in range(98))  # with Host and Connection: 100
    response = exchange(server.port, head % 100 + fits + b"\r\n")
    assert status_of(response) == 200, response[:200]
    response = exchange(server.port, head % 101 + fits + b"X-Last: v\r\n\r\n")
    assert status_of(response) == 431, response[:200]
    assert calls.paths == ["/100"]


def test_declared_body_over_max_body_size_gets_413_without_handler(serve: Any) -> None:
    calls = Calls()
    server = serve(calls, max_body_size=1000)
    # only the head is sent: the server must answer without waiting for the body
    response = exchange(server.port, b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
    assert status_of(response) == 413, response
    assert calls.paths == []
    # exactly at the limit is fine
    response = exchange(
        server.port, b"POST /up HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 1000\r\n\r\n" + b"b" * 1000
    )
    assert status_of(response) == 200, response
    assert calls.paths == ["/up"]


def test_chunked_body_growing_past_max_body_size_gets_413(serve: Any) -> None:
    seen: list[object] = []

    async def handler(request: Any) -> None:
        try:
            body = await request.read()
        except Exception as error:  # recorded: what the handler is told
            seen.append(error)
            raise
        seen.append(len(body))
        request.response.write("read it all")

    server = serve(handler, max_body_size=1000)
    chunk = b"258\r\n" + b"c" * 600 + b"\r\n"  # 0x258 = 600
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"POST /chunks HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk + chunk)
        response = read_response(sock)
    assert status_of(response) == 413, response
    assert wait_for(lambda: len(seen) == 1)
    assert isinstance(seen[0], BodyTooLarge), seen
    assert get_ok(server.port) == 200


def test_chunked_body_under_max_body_size_is_read(serve: Any) -> None:
    seen: list[bytes] = []

    async def handler(request: Any) -> None:
        seen.append(await request.read())

    server = serve(handler, max_body_size=1000)
    chunk = b"190\r\n" + b"c" * 400 + b"\r\n"  # 0x190 = 400
    response = exchange(
        server.port,
        b"POST /chunks HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunk
        + chunk
        + b"0\r\n\r\n",
    )
    assert status_of(response) == 200, response
    assert seen == [b"c" * 800]


def read_until_closed(sock: socket.socket, deadline: float = TIMEOUT) -> tuple[bytes, bool]:
    """(everything received, whether the server closed the connection)
    within ``deadline`` seconds; a reset counts as closed."""
    data = b""
    end = time.monotonic() + deadline
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return data, False
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data, False
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param(b"GET /slow HTTP/1.1\r\nHost: x\r\n", id="half a head"),
        pytest.param(b"GET /slow HT", id="part of the request line"),
        pytest.param(b"", id="nothing at all"),
    ],
)
def test_header_read_timeout_disconnects_a_stalled_client(serve: Any, sent: bytes) -> None:
    calls = Calls()
    server = serve(calls, header_read_timeout=0.5)
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(sent)  # then nothing
        received, closed = read_until_closed(sock, deadline=TIMEOUT)
    assert closed, "the connection is still open 5 s after a 0.5 s header_read_timeout"
    assert received == b"" or status_of(received) == 408, received
    assert calls.paths == []
    assert get_ok(server.port) == 200


def test_header_read_timeout_disconnects_a_stalled_second_head(serve: Any) -> None:
    """The timeout applies to every head, not only the first: a keep-alive
    connection whose next head stops halfway is closed."""
    calls = Calls()
    server = serve(calls, header_read_timeout=0.5)
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(read_response(sock)) == 200
        sock.sendall(b"GET /second HTTP/1.1\r\nHost: x\r\n")  # then nothing
        received, closed = read_until_closed(sock, deadline=TIMEOUT)
    assert closed, "the connection is still open 5 s after a 0.5 s header_read_timeout"
    assert received == b"" or status_of(received) == 408, received
    assert calls.paths == ["/first"]


def test_header_read_timeout_leaves_idle_keep_alive_to_idle_timeout(serve: Any) -> None:
    """Waiting between requests is idle time, not a slow head: a connection
    quiet for longer than header_read_timeout (but not idle_timeout) serves
    its next request."""
    calls = Calls()
    server = serve(calls, header_read_timeout=0.3, idle_timeout=30)
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(read_response(sock)) == 200
        time.sleep(1.0)
        sock.sendall(b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(read_response(sock)) == 200
    assert calls.paths == ["/first", "/second"]


def test_header_read_timeout_spares_a_complete_head(serve: Any) -> None:
    """The control case: a head sent in time is served even when the body
    then takes longer than header_read_timeout."""
    seen: list[bytes] = []

    async def handler(request: Any) -> None:
        seen.append(await request.read())
        request.response.write("got it")

    server = serve(handler, header_read_timeout=0.5)
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"POST /slow-body HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab")
        time.sleep(1.0)  # the body is not covered by header_read_timeout
        sock.sendall(b"cd")
        response = read_response(sock)
    assert status_of(response) == 200, response
    assert seen == [b"abcd"]


def test_max_connections_holds_back_a_third_connection(serve: Any) -> None:
    calls = Calls()
    server = serve(calls, max_connections=2)
    request = b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n"
    first = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    second = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    third = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    try:
        for sock in (first, second):  # both accepted and served, then held open
            sock.sendall(request)
            assert status_of(read_response(sock)) == 200
        assert calls.paths == ["/c", "/c"]
        third.sendall(b"GET /third HTTP/1.1\r\nHost: x\r\n\r\n")
        # not served while two connections are open (bounded wait)
        assert read_response(third, deadline=1.0) == b""
        assert calls.paths == ["/c", "/c"]
        first.close()
        response = read_response(third)
        assert status_of(response) == 200, response
        assert calls.paths == ["/c", "/c", "/third"]
    finally:
        for sock in (first, second, third):
            sock.close()


def test_handler_exception_gives_500_and_server_goes_on(serve: Any) -> None:
    calls: list[str] = []

    async def handler(request: Any) -> None:
        calls.append(request.uri.path)
        if request.uri.path == "/boom":
            raise RuntimeError("handler failure on purpose")
        request.response.write("fine")

    server = serve(handler)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    try:
        connection.request("GET", "/boom")
        failed = connection.getresponse()
        failed_body = failed.read()
    finally:
        connection.close()
    assert failed.status == 500
    assert b"handler failure on purpose" not in failed_body  # no traceback leaks to the client
    for _ in range(3):
        assert get_ok(server.port, "/after") == 200
    assert calls == ["/boom", "/after", "/after", "/after"]


def test_handler_exception_after_flush_cuts_the_response(serve: Any) -> None:
    """Once the head is on its way a 500 is impossible: the client must see a
    broken response, never a short one that looks complete."""

    async def handler(request: Any) -> None:
        if request.uri.path == "/half":
            request.response.content_length = 100
            request.response.write("partial")
            await request.response.flush()
            raise RuntimeError("failure mid-stream")
        request.response.write("fine")

    server = serve(handler)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    try:
        connection.request("GET", "/half")
        with pytest.raises((http.client.IncompleteRead, http.client.RemoteDisconnected, ConnectionResetError)):
            response = connection.getresponse()
            response.read()
    finally:
        connection.close()
    assert get_ok(server.port) == 200


def test_client_disconnect_mid_upload(serve: Any, loop_thread: Any) -> None:
    seen: list[object] = []
    finished = threading.Event()
    started = threading.Event()

    async def handler(request: Any) -> None:
        if request.uri.path != "/upload":
            request.response.write("ok")
            return
        started.set()
        try:
            body = await request.read()
            seen.append(len(body))
        except Exception as error:  # noqa: BLE001 - recorded for the assertions
            seen.append(error)
        finally:
            finished.set()

    server = serve(handler)
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"u" * 1000)
        assert started.wait(TIMEOUT)
    # the socket is closed with 99000 bytes still owed
    assert finished.wait(TIMEOUT), "the handler is still waiting for a body that will never come"
    assert len(seen) == 1
    assert isinstance(seen[0], ClientDisconnected), seen
    for _ in range(3):
        assert get_ok(server.port) == 200
    assert wait_for(lambda: server.server.connections_info().active == 0)


def test_client_disconnect_mid_upload_is_client_disconnected(serve: Any) -> None:
    """The more precise report: the handler learns that the client went away."""
    seen: list[object] = []
    finished = threading.Event()
    started = threading.Event()

    async def handler(request: Any) -> None:
        started.set()
        try:
            seen.append(await request.read())
        except Exception as error:  # noqa: BLE001 - recorded for the assertions
            seen.append(error)
        finally:
            finished.set()

    server = serve(handler)
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"u" * 1000)
        assert started.wait(TIMEOUT)
    assert finished.wait(TIMEOUT)
    assert isinstance(seen[0], ClientDisconnected), seen


class LateResponder:
    """A handler that waits until released, then answers; it records what it
    was told: ``"completed"`` or the exception it got."""

    def __init__(self, loop_thread: Any) -> None:
        self.loop_thread = loop_thread
        self.release = asyncio.Event()
        self.started = threading.Event()
        self.finished = threading.Event()
        self.seen: list[object] = []

    async def __call__(self, request: Any) -> None:
        if request.uri.path != "/wait":
            request.response.write("ok")
            return
        self.started.set()
        try:
            await asyncio.wait_for(self.release.wait(), TIMEOUT)
            request.response.write("too late")
            await request.response.close()
            await request.response.done
            self.seen.append("completed")
        except Exception as error:  # noqa: BLE001 - recorded for the assertions
            self.seen.append(error)
        finally:
            self.finished.set()

    def leave_then_release(self, server: Any) -> None:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
        sock.sendall(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
        assert self.started.wait(TIMEOUT)
        sock.close()
        # the native side notices the closed connection and drops it
        assert wait_for(lambda: server.server.connections_info().total == 0), server.server.connections_info()
        self.loop_thread.loop.call_soon_threadsafe(self.release.set)
        assert self.finished.wait(TIMEOUT), "the handler hangs after its client left"
        settle(self.loop_thread)


def test_client_disconnect_before_response(serve: Any, loop_thread: Any) -> None:
    handler = LateResponder(loop_thread)
    server = serve(handler)
    handler.leave_then_release(server)
    assert len(handler.seen) == 1
    assert handler.seen[0] != "completed", "the handler was told its response reached a client that had left"
    assert isinstance(handler.seen[0], Exception), handler.seen
    for _ in range(3):
        assert get_ok(server.port) == 200


def test_client_disconnect_before_response_is_reported_as_disconnect(serve: Any, loop_thread: Any) -> None:
    handler = LateResponder(loop_thread)
    server = serve(handler)
    handler.leave_then_release(server)
    error = handler.seen[0]
    assert isinstance(error, (HttpException, ClientDisconnected)), repr(error)
    assert "disconnect" in str(error)


class EndlessStreamer:
    """A handler streaming 64 KiB chunks for as long as it is let (bounded at
    20000 writes); records ``(outcome, writes)``."""

    chunk = b"s" * 65536
    limit = 20000

    def __init__(self) -> None:
        self.finished = threading.Event()
        self.seen: list[tuple[object, int]] = []

    async def __call__(self, request: Any) -> None:
        if request.uri.path != "/stream":
            request.response.write("ok")
            return
        response = request.response
        writes = 0
        try:
            for writes in range(1, self.limit + 1):  # noqa: B007 - read after the loop
                response.add(self.chunk)
                await response.flush()
            await response.close()
            await response.done
            self.seen.append(("completed", writes))
        except Exception as error:  # noqa: BLE001 - recorded for the assertions
            self.seen.append((error, writes))
        finally:
            self.finished.set()

    def read_a_little_then_leave(self, port: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        assert self.finished.wait(30), "the streaming handler hangs after the client left"


def test_client_disconnect_during_streamed_response(serve: Any) -> None:
    handler = EndlessStreamer()
    server = serve(handler)
    handler.read_a_little_then_leave(server.port)
    outcome, _ = handler.seen[0]
    assert outcome != "completed", "a response cut off by the client was reported as complete"
    assert isinstance(outcome, Exception)
    for _ in range(3):
        assert get_ok(server.port) == 200


def test_client_disconnect_stops_a_streaming_handler_early(serve: Any) -> None:
    handler = EndlessStreamer()
    server = serve(handler)
    handler.read_a_little_then_leave(server.port)
    outcome, writes = handler.seen[0]
    assert isinstance(outcome, (HttpException, ClientDisconnected)), outcome
    assert writes < EndlessStreamer.limit, "flush() never reported the disconnect"
