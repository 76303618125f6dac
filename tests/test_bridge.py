"""The socket bridge (``native_callback=False``): the frame protocol against a
misbehaving Python end written here (failure injection: 502, 504, never a
hang), streams multiplexed on one connection with per-stream flow control,
and real applications over the bridge — streaming both ways with
backpressure, HTTP/2, TLS, every API layer.

The rest of the suite runs on both transports through the ``serve`` fixture
(see conftest.py); this file covers what only the bridge has.

The fake Python end is a plain threaded socket server speaking the frame
layout documented in ``src/bridge.rs`` (a thread reads each connection and
hands frames to their streams; each request's script runs on a thread); the native server under test is
``_native.NativeServer`` itself, created with ``ServerConfig(bridge_address=...)``.
Every client is real (http.client, httpx, raw sockets) and every wait is
bounded."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import http.client
import os
import queue
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from apps.harness import free_port, get, h2_websocket_exchange, wait_for

from server_native import (
    ClientDisconnected,
    NativeDirectResponse,
    NativeHttpServer,
    NativeServerBind,
    serve_native_direct,
    serve_native_http,
    serve_native_multi,
    serve_secure_native_http,
)
from server_native._dist.loader import native
from server_native.http.websocket import is_upgrade_request, upgrade_websocket
from server_native.runtime.config import ServerConfig

try:
    from .conftest import BackgroundLoop, Certificates
except ImportError:  # tests/ run as a plain directory
    from conftest import BackgroundLoop, Certificates  # type: ignore[no-redef]

TIMEOUT = 10
MIB = 1 << 20
KIB = 1 << 10

unix_only = pytest.mark.skipif(not hasattr(socket, "AF_UNIX") or sys.platform == "win32", reason="Unix sockets")

# ---------------------------------------------------------------- the frame layout (src/bridge.rs)

VERSION = 2
HELLO, REQUEST_HEAD, REQUEST_CHUNK, REQUEST_END, RESPONSE_HEAD, RESPONSE_CHUNK, RESPONSE_END, ABORT = range(8)
WS_ACCEPT, WS_MESSAGE, WS_CLOSE, WINDOW = 8, 9, 10, 11
DEFAULT_HEADERS, WHOLE_BODY, INLINE_BODY = 1, 2, 4
#: Request head flags.
HEAD_TLS, HEAD_WEBSOCKET, HEAD_END = 1, 2, 4
#: Data bytes either side may send on a stream before the other grants more.
WINDOW_SIZE = 256 * 1024


def frame(kind: int, payload: bytes = b"", *, stream: int = 0, version: int = VERSION) -> bytes:
    return struct.pack(">IBBI", len(payload) + 6, version, kind, stream) + payload


def string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def response_head(
    status: int,
    headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
    *,
    stream: int,
    reason: bytes = b"",
    flags: int = 0,
    body: bytes = b"",
) -> bytes:
    payload = struct.pack(">HB", status, flags) + string(reason) + struct.pack(">I", len(headers))
    payload += b"".join(string(name) + string(value) for name, value in headers)
    return frame(RESPONSE_HEAD, payload + body, stream=stream)


def whole_response(status: int, body: bytes, *, stream: int, headers: list[tuple[bytes, bytes]] = ()) -> bytes:  # type: ignore[assignment]
    out = response_head(status, headers or [(b"content-type", b"text/plain")], stream=stream, flags=WHOLE_BODY)
    if body:
        out += frame(RESPONSE_CHUNK, body, stream=stream)
    return out + frame(RESPONSE_END, stream=stream)


class Reader:
    """Reads frames from a blocking socket (every read bounded by TIMEOUT)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise EOFError("the native side closed the bridge connection")
            data += chunk
        return data

    def frame(self) -> tuple[int, int, bytes]:
        """(type, stream, payload)"""
        length, version, kind, stream = struct.unpack(">IBBI", self.exactly(10))
        assert version == VERSION
        return kind, stream, self.exactly(length - 6)


@dataclass
class Head:
    """A decoded request head frame."""

    method: str
    scheme: str
    authority: str
    path: str
    query: str
    version: str
    client: tuple[str, int]
    local: tuple[str, int]
    tls: bool
    certificate: bytes
    headers: list[tuple[bytes, bytes]]
    websocket: bool = False
    ended: bool = False

    @classmethod
    def decode(cls, payload: bytes) -> Head:
        """Client port, local port, flags, the certificate, then the strings
        with a NUL between each two: method, scheme, authority, path, query,
        version, client ip, local ip, and each header's name and value."""
        client_port, local_port, flags, certificate_size = struct.unpack_from(">HHBI", payload)
        certificate = payload[9 : 9 + certificate_size]
        assert len(certificate) == certificate_size
        strings = payload[9 + certificate_size :].split(b"\0")
        assert len(strings) >= 8 and len(strings) % 2 == 0, strings
        method, scheme, authority, path, query, version, client_ip, local_ip = strings[:8]
        text = [s.decode("latin-1") for s in (method, scheme, authority, path, query, version)]
        headers = list(zip(strings[8::2], strings[9::2]))
        return cls(
            *text,  # type: ignore[arg-type]
            (client_ip.decode(), client_port),
            (local_ip.decode(), local_port),
            bool(flags & HEAD_TLS),
            certificate,
            headers,
            bool(flags & HEAD_WEBSOCKET),
            bool(flags & HEAD_END),
        )


def request_head(method: bytes, path: bytes, headers: list[tuple[bytes, bytes]] = (), *, stream: int) -> bytes:  # type: ignore[assignment]
    strings = [method, b"http", b"x", path, b"", b"1.1", b"10.0.0.1", b"127.0.0.1"]
    strings += [part for pair in headers for part in pair]
    payload = struct.pack(">HHBI", 1, 80, 0, 0) + b"\0".join(strings)
    return frame(REQUEST_HEAD, payload, stream=stream)


class FakeStream:
    """One stream on a fake end's connection: the frames the native side
    sent on it (window frames aside), and a way to send."""

    def __init__(self, connection: FakeConnection, stream: int) -> None:
        self.connection = connection
        self.id = stream
        self.frames: queue.Queue[tuple[int, bytes] | None] = queue.Queue()
        #: Grant the native side more body as chunks are read (as Python does).
        self.grant = True
        #: Window frames the native side sent on this stream (bytes granted).
        self.granted = 0

    def frame(self, timeout: float = TIMEOUT) -> tuple[int, bytes]:
        """The next (type, payload) on this stream; EOFError once the
        connection closed."""
        try:
            item = self.frames.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no frame on stream {self.id}") from None
        if item is None:
            self.frames.put(None)
            raise EOFError("the native side closed the bridge connection")
        kind, payload = item
        if kind == REQUEST_CHUNK and self.grant:
            self.send(frame(WINDOW, struct.pack(">I", len(payload)), stream=self.id))
        return item

    def send(self, data: bytes) -> None:
        self.connection.send(data)


@dataclass
class Exchange:
    """What the fake end read of one request before its script ran."""

    head: Head
    body: bytes
    ended: bool


#: A script gets its stream and the exchange so far, and returns whether the
#: connection stays open.
Script = Callable[[FakeStream, Exchange], bool]


def read_rest(stream: FakeStream, exchange: Exchange) -> None:
    while not exchange.ended:
        kind, payload = stream.frame()
        if kind == REQUEST_CHUNK:
            exchange.body += payload
        else:
            assert kind in (REQUEST_END, ABORT), kind
            exchange.ended = True


def answer_ok(stream: FakeStream, exchange: Exchange) -> bool:
    read_rest(stream, exchange)  # a fake that did not read the body yet
    body = f"ok {exchange.head.method} {exchange.head.path} {len(exchange.body)}".encode()
    stream.send(whole_response(200, body, stream=stream.id))
    return True


def held_until(release: threading.Event, arrived: threading.Semaphore) -> Callable[[FakeStream, Exchange], bool]:
    """A script that says it has its request, then answers once released."""

    def script(stream: FakeStream, exchange: Exchange) -> bool:
        arrived.release()
        assert release.wait(TIMEOUT)
        return answer_ok(stream, exchange)

    return script


class FakeConnection:
    """One connection from the native side: a thread reads every frame and
    hands it to its stream; each request runs its script on a thread."""

    def __init__(self, end: FakeEnd, sock: socket.socket) -> None:
        self.end = end
        self.sock = sock
        self.lock = threading.Lock()
        self.streams: dict[int, FakeStream] = {}

    def send(self, data: bytes) -> None:
        with self.lock:
            self.sock.sendall(data)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def serve(self) -> None:
        reader = Reader(self.sock)
        try:
            kind, stream, token = reader.frame()
            assert (kind, stream) == (HELLO, 0)
            self.end.hellos.append(token)
            while True:
                kind, stream, payload = reader.frame()
                if kind == REQUEST_HEAD:
                    assert stream not in self.streams, "a stream id used twice"
                    fake = self.streams[stream] = FakeStream(self, stream)
                    head = Head.decode(payload)
                    exchange = Exchange(head, b"", head.ended)
                    self.end.exchanges.append(exchange)
                    thread = threading.Thread(
                        target=self.run, args=(fake, exchange), name="fake-bridge-stream", daemon=True
                    )
                    self.end.threads.append(thread)
                    thread.start()
                elif stream in self.streams:
                    if kind == WINDOW:
                        self.streams[stream].granted += struct.unpack(">I", payload)[0]
                    else:
                        self.streams[stream].frames.put((kind, payload))
        except (EOFError, OSError):
            return
        finally:
            for fake in list(self.streams.values()):
                fake.frames.put(None)
            with self.end.lock:
                self.end.open_now -= 1
            self.sock.close()

    def run(self, stream: FakeStream, exchange: Exchange) -> None:
        try:
            if self.end.read_body:
                read_rest(stream, exchange)
            try:
                script = self.end.scripts.get_nowait()
            except queue.Empty:
                script = answer_ok
            keep = script(stream, exchange)
        except (EOFError, OSError, TimeoutError):
            keep = False
        if not keep:
            self.close()


class FakeEnd:
    """A Python end of the bridge that runs one script per request (the
    queued ones first, then ``answer_ok``); records hellos, heads and the
    number of connections."""

    def __init__(self, address_kind: str = "unix", *, read_body: bool = True) -> None:
        self.read_body = read_body
        self.scripts: queue.Queue[Script] = queue.Queue()
        self.hellos: list[bytes] = []
        self.exchanges: list[Exchange] = []
        self.connections = 0
        self.open_now = 0
        self.most_open = 0
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.conns: list[FakeConnection] = []
        if address_kind == "unix":
            self.directory = tempfile.mkdtemp(prefix="bridge-test-")
            path = os.path.join(self.directory, "fake.sock")
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(path)
            self.address = "unix:" + path
        else:
            self.directory = ""
            self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.listener.bind(("127.0.0.1", 0))
            self.address = f"tcp:127.0.0.1:{self.listener.getsockname()[1]}"
        self.listener.listen(64)
        self.listener.settimeout(0.2)
        self.stopping = threading.Event()
        accept = threading.Thread(target=self._accept, name="fake-bridge-accept", daemon=True)
        accept.start()
        self.threads.append(accept)

    def then(self, *scripts: Script) -> FakeEnd:
        for script in scripts:
            self.scripts.put(script)
        return self

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            conn = FakeConnection(self, sock)
            with self.lock:
                self.conns.append(conn)
                self.connections += 1
                self.open_now += 1
                self.most_open = max(self.most_open, self.open_now)
            thread = threading.Thread(target=conn.serve, name="fake-bridge-conn", daemon=True)
            thread.start()
            self.threads.append(thread)

    def close(self) -> None:
        self.stopping.set()
        self.listener.close()
        with self.lock:
            for conn in self.conns:
                conn.close()
        for thread in list(self.threads):
            thread.join(TIMEOUT)
        if self.directory:
            import shutil

            shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class Native:
    """A native server whose requests go to a bridge address."""

    server: Any
    port: int

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def fake() -> Iterator[FakeEnd]:
    end = FakeEnd()
    yield end
    end.close()


@pytest.fixture
def native_server() -> Iterator[Callable[..., Native]]:
    made: list[Any] = []
    # The server's event queue wakes this pair (nothing is queued on the
    # bridge but the close notice, which nobody needs to read here).
    wake_read, wake_write = socket.socketpair()

    def make(address: str, **options: Any) -> Native:
        options.setdefault("http3", False)
        config = ServerConfig(bridge_address=address, **options)
        server = native.NativeServer(config, ["127.0.0.1"], 0, wake_write.fileno())
        made.append(server)
        return Native(server, server.port)

    yield make
    for server in made:
        server.close(True, 0.0, None)
    made.clear()
    wake_read.close()
    wake_write.close()


def post(url: str, body: bytes, **options: Any) -> httpx.Response:
    with httpx.Client(timeout=TIMEOUT, **options) as client:
        return client.post(url, content=body)


# ---------------------------------------------------------------- the protocol, against a fake end


def test_request_head_carries_every_field(fake: FakeEnd, native_server: Callable[..., Native]) -> None:
    running = native_server(fake.address, bridge_token=b"secret-token")
    with httpx.Client(timeout=TIMEOUT) as client:
        response = client.post(
            running.url("/a%20b/c?x=1&y=%C3%A9"), content=b"payload", headers=[("X-Twice", "1"), ("X-Twice", "2")]
        )
        local_port = response.extensions["network_stream"].get_extra_info("client_addr")[1]
    assert response.status_code == 200
    assert response.text == "ok POST /a%20b/c 7"
    assert fake.hellos == [b"secret-token"]
    (exchange,) = fake.exchanges
    head = exchange.head
    assert (head.method, head.scheme, head.path, head.query, head.version) == (
        "POST",
        "http",
        "/a%20b/c",
        "x=1&y=%C3%A9",
        "1.1",
    )
    assert head.authority == f"127.0.0.1:{running.port}"
    assert head.client == ("127.0.0.1", local_port)
    assert head.local == ("127.0.0.1", running.port)
    assert (head.tls, head.certificate) == (False, b"")
    assert [value for name, value in head.headers if name == b"x-twice"] == [b"1", b"2"]
    assert (b"content-length", b"7") in head.headers
    assert not head.ended, "a request with a body is not marked as ending with its head"
    assert exchange.body == b"payload" and exchange.ended


def test_a_request_without_a_body_ends_with_its_head(fake: FakeEnd, native_server: Callable[..., Native]) -> None:
    running = native_server(fake.address)
    assert get(running.url("/nobody")).text == "ok GET /nobody 0"
    (exchange,) = fake.exchanges
    assert exchange.head.ended


def test_one_connection_carries_every_request(fake: FakeEnd, native_server: Callable[..., Native]) -> None:
    """Sequential and concurrent requests share one bridge connection, each
    on a stream of its own: four are open at once before any is answered."""
    release = threading.Event()
    arrived = threading.Semaphore(0)

    slow = held_until(release, arrived)

    running = native_server(fake.address)
    with httpx.Client(timeout=TIMEOUT) as client:
        for index in range(3):
            assert client.get(running.url(f"/{index}")).text == f"ok GET /{index} 0"
    fake.then(slow, slow, slow, slow)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(get, running.url(f"/c{index}")) for index in range(4)]
        for _ in range(4):
            assert arrived.acquire(timeout=TIMEOUT)
        release.set()
        texts = sorted(future.result(TIMEOUT).text for future in futures)
    assert texts == [f"ok GET /c{index} 0" for index in range(4)]
    assert fake.connections == 1
    (conn,) = fake.conns
    assert len(conn.streams) == 7, "a stream id was used twice"


def test_streams_in_flight_are_bounded(fake: FakeEnd, native_server: Callable[..., Native]) -> None:
    """Four concurrent requests, max_pending_requests=2: never more than two
    reach Python at once, and every request is answered once one frees up."""
    release = threading.Event()
    arrived = threading.Semaphore(0)

    slow = held_until(release, arrived)

    fake.then(slow, slow, slow, slow)
    running = native_server(fake.address, max_pending_requests=2)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(get, running.url(f"/{index}")) for index in range(4)]
        assert arrived.acquire(timeout=TIMEOUT) and arrived.acquire(timeout=TIMEOUT)
        assert not arrived.acquire(timeout=0.3), "a third request reached Python past the bound"
        release.set()
        statuses = [future.result(TIMEOUT).status_code for future in futures]
    assert statuses == [200] * 4
    assert len(fake.exchanges) == 4


def close_at_once(stream: FakeStream, exchange: Exchange) -> bool:
    return False


def send_then_close(data: Callable[[int], bytes]) -> Script:
    def script(stream: FakeStream, exchange: Exchange) -> bool:
        stream.send(data(stream.id))
        return False

    return script


def send_and_stay(data: Callable[[int], bytes]) -> Script:
    """Sends ``data(stream id)`` and waits until the native side gives up on
    the stream (an abort) or closes the connection; it must not wait for more."""

    def script(stream: FakeStream, exchange: Exchange) -> bool:
        stream.send(data(stream.id))
        try:
            kind, payload = stream.frame()
        except EOFError:
            return False
        assert (kind, payload) == (ABORT, b"\x01")  # the client is gone, as far as Python is concerned
        return True

    return script


def good_head(stream: int) -> bytes:
    return frame(RESPONSE_HEAD, struct.pack(">HBII", 200, 0, 0, 0), stream=stream)


#: What a broken Python end might send. Those that break the framing close
#: the connection (every stream on it fails); the others fail their stream.
FAILURES = {
    "closes-without-answering": close_at_once,
    "length-below-six": send_and_stay(lambda s: b"\x00\x00\x00\x05\x02\x04\x00\x00\x00"),
    "length-over-the-maximum": send_and_stay(lambda s: b"\xff\xff\xff\xff\x02\x04" + struct.pack(">I", s)),
    "unknown-version": send_and_stay(
        lambda s: frame(RESPONSE_HEAD, struct.pack(">HBII", 200, 0, 0, 0), stream=s, version=1)
    ),
    "window-frame-of-the-wrong-size": send_and_stay(lambda s: frame(WINDOW, b"\x00\x01", stream=s)),
    "truncated-head": send_and_stay(lambda s: frame(RESPONSE_HEAD, struct.pack(">HB", 200, 0) + b"\x00\x00", stream=s)),
    "head-with-trailing-bytes": send_and_stay(
        lambda s: frame(RESPONSE_HEAD, struct.pack(">HBII", 200, 0, 0, 0) + b"junk", stream=s)
    ),
    "string-past-the-frame": send_and_stay(lambda s: frame(RESPONSE_HEAD, struct.pack(">HBI", 200, 0, 1000), stream=s)),
    "wrong-frame-type": send_and_stay(lambda s: frame(REQUEST_CHUNK, b"not a response", stream=s)),
    "hello-from-python": send_and_stay(lambda s: frame(HELLO, b"", stream=s)),
    "unknown-frame-type": send_and_stay(lambda s: frame(99, b"", stream=s)),
    "chunk-before-head": send_and_stay(
        lambda s: frame(RESPONSE_CHUNK, b"body", stream=s) + good_head(s) + frame(RESPONSE_END, stream=s)
    ),
    "status-42": send_and_stay(lambda s: response_head(42, stream=s) + frame(RESPONSE_END, stream=s)),
    "status-1000": send_and_stay(lambda s: response_head(1000, stream=s) + frame(RESPONSE_END, stream=s)),
    "status-101": send_and_stay(lambda s: response_head(101, stream=s) + frame(RESPONSE_END, stream=s)),
    "invalid-header-name": send_and_stay(
        lambda s: response_head(200, [(b"bad name", b"v")], stream=s) + frame(RESPONSE_END, stream=s)
    ),
    "invalid-header-value": send_and_stay(
        lambda s: response_head(200, [(b"x-bad", b"a\r\nb")], stream=s) + frame(RESPONSE_END, stream=s)
    ),
    "invalid-reason": send_and_stay(
        lambda s: response_head(200, reason=b"bad\nreason", stream=s) + frame(RESPONSE_END, stream=s)
    ),
    "whole-body-without-end-then-close": send_then_close(
        lambda s: response_head(200, flags=WHOLE_BODY, stream=s) + frame(RESPONSE_CHUNK, b"partial", stream=s)
    ),
    "whole-body-wrong-frame": send_and_stay(
        lambda s: response_head(200, flags=WHOLE_BODY, stream=s) + frame(REQUEST_END, stream=s)
    ),
    "websocket-accept-for-a-plain-request": send_and_stay(
        lambda s: frame(WS_ACCEPT, string(b"") + struct.pack(">I", 0), stream=s)
    ),
    "half-a-frame-then-close": send_then_close(lambda s: response_head(200, stream=s)[:7]),
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_misbehaving_python_end_gives_502_and_the_server_goes_on(
    fake: FakeEnd, native_server: Callable[..., Native], failure: str
) -> None:
    fake.then(FAILURES[failure])
    running = native_server(fake.address)
    conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/first")
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    assert response.status == 502, (response.status, body)
    # What went wrong is logged, never told to the client.
    assert body == b"Bad Gateway", body
    logged = [message for _, message in native.take_log_records() if "socket bridge" in message]
    assert len(logged) == 1 and "answered 502" in logged[0], logged
    # The next request is answered: on the same connection when only the
    # stream failed, on a fresh one when the connection did.
    again = get(running.url("/after"))
    assert (again.status_code, again.text) == (200, "ok GET /after 0")


def test_a_bad_response_fails_its_stream_alone(fake: FakeEnd, native_server: Callable[..., Native]) -> None:
    """Two exchanges open on one connection; one gets a response that makes
    no sense (502), the other its answer, and the connection stays."""
    both = threading.Barrier(2, timeout=TIMEOUT)

    def bad(stream: FakeStream, exchange: Exchange) -> bool:
        both.wait()
        return send_and_stay(lambda s: response_head(42, stream=s) + frame(RESPONSE_END, stream=s))(stream, exchange)

    def good(stream: FakeStream, exchange: Exchange) -> bool:
        both.wait()
        time.sleep(0.2)  # let the bad answer go first (the outcome does not depend on it)
        return answer_ok(stream, exchange)

    fake.then(bad, good)
    running = native_server(fake.address)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(get, running.url("/bad"))
        assert wait_for(lambda: len(fake.exchanges) == 1)
        second = pool.submit(get, running.url("/good"))
        responses = [first.result(TIMEOUT), second.result(TIMEOUT)]
    assert [r.status_code for r in responses] == [502, 200]
    assert responses[1].text == "ok GET /good 0"
    assert fake.connections == 1


def test_a_connection_that_dies_fails_all_its_streams(fake: FakeEnd, native_server: Callable[..., Native]) -> None:
    """Three exchanges open on one connection when Python closes it: each
    gets a 502, and the next request is served on a fresh connection."""
    arrived = threading.Semaphore(0)
    close_now = threading.Event()

    def wait_then_close(stream: FakeStream, exchange: Exchange) -> bool:
        arrived.release()
        assert close_now.wait(TIMEOUT)
        return False

    fake.then(wait_then_close, wait_then_close, wait_then_close)
    running = native_server(fake.address)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(get, running.url(f"/{index}")) for index in range(3)]
        for _ in range(3):
            assert arrived.acquire(timeout=TIMEOUT)
        close_now.set()
        statuses = [future.result(TIMEOUT).status_code for future in futures]
    assert statuses == [502] * 3
    assert get(running.url("/after")).text == "ok GET /after 0"
    assert fake.connections == 2


def test_python_end_closing_mid_upload_gives_502(native_server: Callable[..., Native]) -> None:
    """The Python end reads the head and closes while the body is still
    coming: 502, and the next request is served."""
    end = FakeEnd(read_body=False)
    end.then(close_at_once)
    try:
        running = native_server(end.address)
        with socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT) as sock:
            sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"u" * 100_000)
            assert sock.recv(65536).startswith(b"HTTP/1.1 502")
        assert end.exchanges[0].head.path == "/up"
        assert get(running.url("/after")).text == "ok GET /after 0"
    finally:
        end.close()


def test_a_failure_over_http2_is_502_too(fake: FakeEnd, native_server: Callable[..., Native]) -> None:
    fake.then(FAILURES["wrong-frame-type"], FAILURES["status-1000"])
    running = native_server(fake.address)
    with httpx.Client(http1=False, http2=True, timeout=TIMEOUT) as client:
        statuses = [client.get(running.url(f"/{index}")).status_code for index in range(3)]
        assert client.get(running.url("/")).http_version == "HTTP/2"
    assert statuses == [502, 502, 200]


def test_nothing_listening_gives_502(native_server: Callable[..., Native], tmp_path: Any) -> None:
    running = native_server("unix:" + str(tmp_path / "nobody.sock"))
    assert get(running.url()).status_code == 502
    assert get(running.url()).status_code == 502


def test_an_end_that_never_answers_hits_response_timeout(fake: FakeEnd, native_server: Callable[..., Native]) -> None:
    silent = threading.Event()
    told: list[tuple[int, bytes]] = []

    def never(stream: FakeStream, exchange: Exchange) -> bool:
        silent.set()
        told.append(stream.frame())  # until the native side gives up on it
        return True

    fake.then(never)
    running = native_server(fake.address, response_timeout=1)
    response = get(running.url("/silent"))
    assert silent.is_set()
    assert response.status_code == 504
    assert get(running.url("/after")).text == "ok GET /after 0"
    assert wait_for(lambda: told == [(ABORT, b"\x01")]), told


def test_an_end_that_never_accepts_hits_response_timeout(native_server: Callable[..., Native]) -> None:
    """A listener that never accepts (and never answers): 504, not a hang."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        running = native_server(f"tcp:127.0.0.1:{listener.getsockname()[1]}", response_timeout=1)
        assert get(running.url()).status_code == 504


def test_a_missing_end_frame_cuts_a_streamed_response(fake: FakeEnd, native_server: Callable[..., Native]) -> None:
    """The head already went out: the client sees a broken body (never a
    short success), and the server goes on."""
    fake.then(
        send_then_close(
            lambda s: (
                response_head(200, [(b"content-type", b"text/plain")], stream=s)
                + frame(RESPONSE_CHUNK, b"x" * 1000, stream=s)
            )
        )
    )
    running = native_server(fake.address)
    conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/cut")
        response = conn.getresponse()
        assert response.status == 200
        with pytest.raises(http.client.IncompleteRead) as cut:
            response.read()
        assert cut.value.partial == b"x" * 1000
    finally:
        conn.close()
    assert get(running.url("/after")).text == "ok GET /after 0"


def test_an_abort_frame_before_the_head_is_a_500(fake: FakeEnd, native_server: Callable[..., Native]) -> None:
    fake.then(send_then_close(lambda s: frame(ABORT, stream=s)))
    running = native_server(fake.address)
    assert get(running.url()).status_code == 500
    assert get(running.url("/after")).status_code == 200


def test_an_abort_frame_mid_stream_cuts_the_response(fake: FakeEnd, native_server: Callable[..., Native]) -> None:
    def abort_mid_stream(stream: FakeStream, exchange: Exchange) -> bool:
        stream.send(
            response_head(200, stream=stream.id)
            + frame(RESPONSE_CHUNK, b"abc", stream=stream.id)
            + frame(ABORT, stream=stream.id)
        )
        return True

    fake.then(abort_mid_stream)
    running = native_server(fake.address)
    with httpx.Client(timeout=TIMEOUT) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            client.get(running.url("/aborted"))
        assert client.get(running.url("/after")).status_code == 200
    assert fake.connections == 1


def test_default_headers_flag_uses_the_servers_default_headers(
    fake: FakeEnd, native_server: Callable[..., Native]
) -> None:
    fake.then(
        send_and_stay(
            lambda s: (
                response_head(201, stream=s, flags=DEFAULT_HEADERS | WHOLE_BODY)
                + frame(RESPONSE_CHUNK, b"d", stream=s)
                + frame(RESPONSE_END, stream=s)
            )
        )
    )
    running = native_server(fake.address)
    running.server.set_default_headers([("x-default", "yes"), ("content-type", "text/x-default")])
    response = get(running.url())
    assert (response.status_code, response.text) == (201, "d")
    assert response.headers["x-default"] == "yes"
    assert response.headers["content-type"] == "text/x-default"


def test_a_whole_body_gets_content_length_and_a_reason(fake: FakeEnd, native_server: Callable[..., Native]) -> None:
    body = os.urandom(200 * KIB)  # several chunk frames

    def chunks(stream: int) -> bytes:
        return b"".join(
            frame(RESPONSE_CHUNK, body[at : at + 64 * KIB], stream=stream) for at in range(0, len(body), 64 * KIB)
        )

    fake.then(
        send_and_stay(
            lambda s: (
                response_head(299, [(b"x-a", b"1")], reason=b"Fine Thanks", flags=WHOLE_BODY, stream=s)
                + chunks(s)
                + frame(RESPONSE_END, stream=s)
            )
        )
    )
    running = native_server(fake.address)
    conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        assert (response.status, response.reason) == (299, "Fine Thanks")
        assert response.getheader("content-length") == str(len(body))
        assert response.read() == body
    finally:
        conn.close()


def test_an_inline_body_is_the_whole_response(fake: FakeEnd, native_server: Callable[..., Native]) -> None:
    def inline(stream: FakeStream, exchange: Exchange) -> bool:
        stream.send(
            response_head(
                200, [(b"content-type", b"text/plain")], flags=INLINE_BODY, body=b"all here", stream=stream.id
            )
        )
        return True

    fake.then(inline)
    running = native_server(fake.address)
    response = get(running.url())
    assert (response.status_code, response.text, response.headers["content-length"]) == (200, "all here", "8")
    assert get(running.url("/after")).text == "ok GET /after 0"


def test_request_body_too_large_is_413_and_python_is_told(native_server: Callable[..., Native]) -> None:
    """A chunked body that grows past max_body_size: 413 from the native side;
    the Python end gets an abort frame saying why."""
    end = FakeEnd()
    answered = threading.Event()

    def wait_for_413(stream: FakeStream, exchange: Exchange) -> bool:
        answered.set()
        return False

    end.then(wait_for_413)
    try:
        running = native_server(end.address, max_body_size=1000)
        with socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT) as sock:
            chunk = b"258\r\n" + b"c" * 600 + b"\r\n"
            sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk + chunk)
            assert sock.recv(65536).startswith(b"HTTP/1.1 413")
        assert answered.wait(TIMEOUT)
        (exchange,) = end.exchanges
        assert exchange.ended and len(exchange.body) <= 1000
    finally:
        end.close()


def test_an_answer_before_the_body_is_read_keeps_both_connections(native_server: Callable[..., Native]) -> None:
    """Python answers without reading the body: the native side reads and
    drops the rest, ends the request with a discard, and keeps both the
    bridge connection and the client's keep-alive connection."""
    end = FakeEnd(read_body=False)
    seen: list[int] = []

    def early(stream: FakeStream, exchange: Exchange) -> bool:
        stream.send(whole_response(403, b"no", stream=stream.id))
        while True:  # what follows until the request's end or discard
            kind, payload = stream.frame()
            if kind == ABORT:
                seen.append(payload[0])
                return True
            if kind == REQUEST_END:
                seen.append(0)
                return True

    end.then(early)
    try:
        running = native_server(end.address)
        with httpx.Client(timeout=TIMEOUT) as client:
            responses = [client.post(running.url("/big"), content=os.urandom(4 * MIB))]
            responses += [client.get(running.url("/after")) for _ in range(3)]
            ports = {r.extensions["network_stream"].get_extra_info("client_addr")[1] for r in responses}
        assert [r.status_code for r in responses] == [403, 200, 200, 200]
        assert len(ports) == 1, "the client's connection was closed after the early answer"
        assert wait_for(lambda: seen == [3])  # the rest of the body was dropped, and Python was told
        assert end.connections == 1
        assert len(end.exchanges) == 4
    finally:
        end.close()


def test_the_request_body_waits_for_window_frames(native_server: Callable[..., Native]) -> None:
    """Flow control toward Python: the native side sends WINDOW_SIZE bytes
    of body, then only as much more as Python grants."""
    end = FakeEnd(read_body=False)
    taken: list[int] = []

    def slow_reader(stream: FakeStream, exchange: Exchange) -> bool:
        stream.grant = False
        received = 0
        while received < WINDOW_SIZE:
            kind, payload = stream.frame()
            assert kind == REQUEST_CHUNK
            received += len(payload)
        taken.append(received)
        with pytest.raises(TimeoutError):
            stream.frame(timeout=0.5)  # nothing more until Python grants some
        stream.send(frame(WINDOW, struct.pack(">I", 1000), stream=stream.id))
        while received < WINDOW_SIZE + 1000:
            kind, payload = stream.frame()
            assert kind == REQUEST_CHUNK
            received += len(payload)
        taken.append(received)
        stream.grant = True
        stream.send(frame(WINDOW, struct.pack(">I", MIB), stream=stream.id))
        exchange.body = b"x" * received
        return answer_ok(stream, exchange)

    end.then(slow_reader)
    try:
        running = native_server(end.address)
        assert post(running.url("/up"), os.urandom(MIB)).text == f"ok POST /up {MIB}"
        assert taken == [WINDOW_SIZE, WINDOW_SIZE + 1000]
    finally:
        end.close()


def test_the_response_is_granted_back_as_the_client_takes_it(
    fake: FakeEnd, native_server: Callable[..., Native]
) -> None:
    """Flow control toward the client: a streamed response of 1 MiB goes out
    in WINDOW_SIZE steps, each sent only once the native side granted it."""
    data = os.urandom(MIB)

    def stream_it(stream: FakeStream, exchange: Exchange) -> bool:
        stream.send(response_head(200, stream=stream.id))
        sent = 0
        while sent < len(data):
            deadline = time.monotonic() + TIMEOUT
            while sent >= WINDOW_SIZE + stream.granted and time.monotonic() < deadline:
                time.sleep(0.01)
            allowed = min(len(data), WINDOW_SIZE + stream.granted) - sent
            assert allowed > 0, "the native side granted nothing back"
            for at in range(sent, sent + allowed, 64 * KIB):
                stream.send(frame(RESPONSE_CHUNK, data[at : min(at + 64 * KIB, sent + allowed)], stream=stream.id))
            sent += allowed
        stream.send(frame(RESPONSE_END, stream=stream.id))
        return True

    fake.then(stream_it)
    running = native_server(fake.address)
    assert get(running.url("/down")).content == data


def test_tcp_bridge_address(native_server: Callable[..., Native]) -> None:
    end = FakeEnd("tcp")
    try:
        running = native_server(end.address)
        assert post(running.url("/tcp"), b"12345").text == "ok POST /tcp 5"
    finally:
        end.close()


@pytest.mark.parametrize("address", ["nowhere", "unix:", "tcp:localhost", "tcp:1.2.3.4"])
def test_an_invalid_bridge_address_is_refused_at_bind(address: str) -> None:
    with pytest.raises(ValueError, match="bridge_address"):
        native.NativeServer(ServerConfig(bridge_address=address, http3=False), ["127.0.0.1"], 0, None)


# ---------------------------------------------------------------- real applications over the bridge


@pytest.fixture
def bridge(loop_thread: BackgroundLoop) -> Iterator[Callable[..., NativeHttpServer]]:
    """``bridge(handler, **options)``: a NativeHttpServer on the bridge."""
    started: list[NativeHttpServer] = []

    def start(handler: Any, **options: Any) -> NativeHttpServer:
        async def bind() -> NativeHttpServer:
            options.setdefault("http3", False)
            if "certificate_path" in options:
                server = await NativeHttpServer.bind_secure("127.0.0.1", 0, native_callback=False, **options)
            else:
                server = await NativeHttpServer.bind("127.0.0.1", 0, native_callback=False, **options)
            server.serve(handler)
            return server

        server = loop_thread.run(bind())
        started.append(server)
        return server

    yield start
    for server in started:
        try:
            loop_thread.run(server.close(force=True))
        except Exception:  # noqa: BLE001 - the test already reported it
            pass


def url(server: NativeHttpServer, path: str = "/") -> str:
    return f"{'https' if server.secure else 'http'}://127.0.0.1:{server.port}{path}"


def pattern(size: int) -> bytes:
    block = bytes(range(256)) * 256  # 64 KiB, every byte value
    return (block * (size // len(block) + 1))[:size]


def test_the_bridge_is_really_used(bridge: Callable[..., NativeHttpServer]) -> None:
    """The request object is the bridge's, and the server listens on a
    private Unix socket (loopback TCP where there are none)."""
    kinds: list[str] = []

    async def handler(request: Any) -> None:
        kinds.append(type(request._native).__name__)
        request.response.write("hi")

    server = bridge(handler)
    assert get(url(server)).text == "hi"
    assert kinds == ["BridgeRequest"]
    address = server.config.bridge_address
    assert address is not None
    if hasattr(socket, "AF_UNIX") and sys.platform != "win32":
        assert address.startswith("unix:")
        directory = os.path.dirname(address[5:])
        assert os.stat(directory).st_mode & 0o077 == 0, "the socket's directory is private"
    else:
        assert address.startswith("tcp:127.0.0.1:")


def test_upload_of_4_mib_is_read_in_chunks(bridge: Callable[..., NativeHttpServer]) -> None:
    sizes: list[int] = []

    async def handler(request: Any) -> None:
        digest = hashlib.sha256()
        async for chunk in request:
            sizes.append(len(chunk))
            digest.update(chunk)
        request.response.write(digest.hexdigest())

    server = bridge(handler)
    body = os.urandom(4 * MIB)
    response = post(url(server, "/upload"), body)
    assert response.text == hashlib.sha256(body).hexdigest()
    assert sum(sizes) == len(body)
    assert len(sizes) > 1 and max(sizes) <= 64 * KIB


def test_streamed_download_of_4_mib(bridge: Callable[..., NativeHttpServer]) -> None:
    data = pattern(4 * MIB)

    async def handler(request: Any) -> None:
        response = request.response
        for at in range(0, len(data), 100_000):
            response.add(data[at : at + 100_000])
            await response.flush()
        await response.close()

    server = bridge(handler)
    digest = hashlib.sha256()
    with httpx.Client(timeout=TIMEOUT) as client, client.stream("GET", url(server, "/download")) as response:
        assert response.status_code == 200
        assert response.headers.get("transfer-encoding") == "chunked"
        for chunk in response.iter_bytes():
            digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


def test_streaming_echo_both_ways_at_once(bridge: Callable[..., NativeHttpServer]) -> None:
    """Each chunk read is written back before the next is read: the request
    and response bodies are in flight together on one bridge connection."""

    async def handler(request: Any) -> None:
        response = request.response
        response.headers.content_type = "application/octet-stream"
        await response.flush()
        async for chunk in request:
            response.add(chunk)
            await response.flush()
        await response.close()

    server = bridge(handler)
    body = os.urandom(3 * MIB + 17)
    response = post(url(server, "/echo"), body)
    assert response.content == body


def test_http2_over_the_bridge(bridge: Callable[..., NativeHttpServer]) -> None:
    async def handler(request: Any) -> None:
        body = await request.read()
        request.response.write(f"{request.protocol_version} {request.uri.path} {hashlib.sha256(body).hexdigest()}")

    server = bridge(handler)
    bodies = [os.urandom(size) for size in (0, 10, 70 * KIB, 1 * MIB)]
    with httpx.Client(http1=False, http2=True, timeout=TIMEOUT) as client:
        responses = [client.post(url(server, f"/{len(body)}"), content=body) for body in bodies]
    for body, response in zip(bodies, responses):
        assert response.http_version == "HTTP/2"
        assert response.text == f"2 /{len(body)} {hashlib.sha256(body).hexdigest()}"


def test_tls_and_http2_over_the_bridge(bridge: Callable[..., NativeHttpServer], certs: Certificates) -> None:
    data = pattern(2 * MIB)

    async def handler(request: Any) -> None:
        body = await request.read()
        response = request.response
        response.headers.set("x-seen", f"{request.requested_uri.scheme} {request.protocol_version} {len(body)}")
        response.add(data)
        await response.flush()
        await response.close()

    server = bridge(handler, certificate_path=certs.cert_path, key_path=certs.key_path)
    context = ssl.create_default_context(cafile=str(certs.ca_path))
    for http2, version in ((False, "1.1"), (True, "2")):
        with httpx.Client(verify=context, http2=http2, timeout=TIMEOUT) as client:
            response = client.post(url(server, "/tls"), content=b"z" * 5000)
        assert response.headers["x-seen"] == f"https {version} 5000"
        assert hashlib.sha256(response.content).digest() == hashlib.sha256(data).digest()


def test_a_client_certificate_crosses_the_bridge(bridge: Callable[..., NativeHttpServer], certs: Certificates) -> None:
    seen: list[bytes | None] = []

    async def handler(request: Any) -> None:
        seen.append(request.certificate)
        request.response.write("ok")

    server = bridge(handler, certificate_path=certs.cert_path, key_path=certs.key_path, request_client_certificate=True)
    context = ssl.create_default_context(cafile=str(certs.ca_path))
    context.load_cert_chain(str(certs.client_cert_path), str(certs.client_key_path))
    with httpx.Client(verify=context, timeout=TIMEOUT) as client:
        assert client.get(url(server)).text == "ok"
    assert seen == [ssl.PEM_cert_to_DER_cert(certs.client_cert_path.read_text())]


def stalled_progress(progress: Callable[[], int], deadline: float = 20) -> int:
    """Waits (bounded) until ``progress()`` stops growing for a while; returns it."""
    end = time.monotonic() + deadline
    last, steady = -1, 0
    while time.monotonic() < end:
        now = progress()
        steady = steady + 1 if now == last else 0
        if steady >= 5:
            return now
        last = now
        time.sleep(0.1)
    return progress()


def test_a_slow_client_slows_the_handler_down(bridge: Callable[..., NativeHttpServer]) -> None:
    """Backpressure toward Python: while the client reads nothing, the
    handler's writes stop far short of its 96 MiB."""
    total = 96 * MIB
    chunk = pattern(256 * KIB)
    written = [0]
    finished = threading.Event()

    async def handler(request: Any) -> None:
        response = request.response
        response.content_length = total
        try:
            while written[0] < total:
                response.add(chunk)
                written[0] += len(chunk)
                await response.flush()
            await response.close()
        finally:
            finished.set()

    server = bridge(handler)
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KIB)
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        stalled = stalled_progress(lambda: written[0])
        assert stalled < 32 * MIB, f"the handler wrote {stalled} bytes to a client that reads nothing"
        assert not finished.is_set()
        received = 0
        deadline = time.monotonic() + 60
        while received < total and time.monotonic() < deadline:
            data = sock.recv(4 * MIB)
            if not data:
                break
            received += len(data)
    assert finished.wait(TIMEOUT)
    assert received > total  # the body and its head


def test_a_handler_that_does_not_read_slows_the_client_down(bridge: Callable[..., NativeHttpServer]) -> None:
    """Backpressure toward the client: nobody reads the body, so the upload
    stalls far short of its size (32 MiB allowed by max_body_size)."""
    release = asyncio.Event()
    got: list[int] = []

    async def handler(request: Any) -> None:
        await asyncio.wait_for(release.wait(), 60)
        got.append(len(await request.read()))
        request.response.write("done")

    server = bridge(handler, max_body_size=64 * MIB)
    size = 48 * MIB
    sent = [0]
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * KIB)
        sock.sendall(f"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())
        sock.setblocking(False)
        block = b"u" * (64 * KIB)

        def push() -> int:
            while sent[0] < size:
                try:
                    sent[0] += sock.send(block[: size - sent[0]])
                except BlockingIOError:
                    break
            return sent[0]

        stalled = stalled_progress(push)
        assert stalled < 24 * MIB, f"{stalled} bytes were taken while nobody read"
        server._loop.call_soon_threadsafe(release.set)
        sock.setblocking(True)
        sock.settimeout(TIMEOUT)
        sock.sendall(b"u" * (size - sent[0]))
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200")
    assert got == [size]


def test_a_slow_client_does_not_stall_the_others(bridge: Callable[..., NativeHttpServer]) -> None:
    """Every exchange shares one bridge connection: while a client reads
    nothing of a large streamed response (its stream waits for window
    frames), uploads and downloads of other clients still go through."""
    block = pattern(256 * KIB)
    written = [0]

    async def handler(request: Any) -> None:
        response = request.response
        if request.uri.path == "/slow":
            response.content_length = 64 * MIB
            try:
                while written[0] < 64 * MIB:
                    response.add(block)
                    written[0] += len(block)
                    await response.flush()
                await response.close()
            except ClientDisconnected:
                pass
            return
        body = await request.read()
        response.add(hashlib.sha256(body).hexdigest().encode() + block * 4)
        await response.close()

    server = bridge(handler)
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as slow:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KIB)
        slow.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        stalled = stalled_progress(lambda: written[0])
        assert stalled < 32 * MIB
        body = os.urandom(2 * MIB)
        with httpx.Client(timeout=TIMEOUT) as client:
            for _ in range(3):
                response = client.post(url(server, "/other"), content=body)
                assert response.content == hashlib.sha256(body).hexdigest().encode() + block * 4


def test_many_concurrent_requests(bridge: Callable[..., NativeHttpServer]) -> None:
    async def handler(request: Any) -> None:
        await asyncio.sleep(0.01)
        request.response.write(request.uri.path)

    server = bridge(handler)
    with httpx.Client(timeout=TIMEOUT, limits=httpx.Limits(max_connections=50)) as client:
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            texts = list(pool.map(lambda i: client.get(url(server, f"/{i}")).text, range(200)))
    assert texts == [f"/{i}" for i in range(200)]


def test_a_foreign_connection_without_the_token_is_refused(bridge: Callable[..., NativeHttpServer]) -> None:
    calls: list[str] = []

    async def handler(request: Any) -> None:
        calls.append(request.uri.path)
        request.response.write("ok")

    server = bridge(handler)
    address = server.config.bridge_address
    assert address is not None
    if address.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        sock.connect(address[5:])
    else:
        host, port = address[4:].rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=TIMEOUT)
    with sock:
        sock.sendall(
            frame(HELLO, b"not the token") + request_head(b"GET", b"/forged", stream=1) + frame(REQUEST_END, stream=1)
        )
        assert sock.recv(65536) == b"", "the bridge answered a connection without the token"
    assert get(url(server, "/real")).text == "ok"
    assert calls == ["/real"]


def test_closing_removes_the_socket(loop_thread: BackgroundLoop) -> None:
    async def scenario() -> tuple[str, bool]:
        server = await NativeHttpServer.bind("127.0.0.1", 0, native_callback=False, http3=False)
        address = server.config.bridge_address
        assert address is not None
        await server.close()
        path = address[5:] if address.startswith("unix:") else ""
        return path, bool(path) and os.path.exists(path)

    path, exists = loop_thread.run(scenario())
    assert not exists, path


def test_native_direct_cannot_use_the_bridge(loop_thread: BackgroundLoop) -> None:
    def handler(request: Any) -> Any:
        return NativeDirectResponse.bytes(200, [], b"x")

    with pytest.raises(ValueError, match="native_callback=False"):
        loop_thread.run(
            serve_native_direct(
                handler, "127.0.0.1", 0, native_direct=True, native_callback=False, http3=False, echo=False
            )
        )


# ---------------------------------------------------------------- every API layer


@dataclass
class Helper:
    """A ``serve_*`` helper running on the loop thread until stopped."""

    loop_thread: BackgroundLoop
    event: asyncio.Event
    future: concurrent.futures.Future[Any]

    def stop(self) -> None:
        self.loop_thread.loop.call_soon_threadsafe(self.event.set)
        self.future.result(TIMEOUT)


def run_helper(loop_thread: BackgroundLoop, make: Callable[[asyncio.Event], Any]) -> Helper:
    event = asyncio.Event()
    future = asyncio.run_coroutine_threadsafe(make(event), loop_thread.loop)
    return Helper(loop_thread, event, future)


def wait_for_answer(target: str, **options: Any) -> httpx.Response:
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            return get(target, **options)
        except httpx.ConnectError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


async def describe(request: Any) -> None:
    body = await request.read()
    request.response.write(f"{type(request._native).__name__} {request.method} {request.uri.path} {len(body)}")


def test_serve_native_http_on_the_bridge(loop_thread: BackgroundLoop) -> None:
    port = free_port()
    helper = run_helper(
        loop_thread,
        lambda event: serve_native_http(
            describe, "127.0.0.1", port, native_callback=False, http3=False, echo=False, shutdown_signal=event.wait()
        ),
    )
    try:
        assert wait_for_answer(f"http://127.0.0.1:{port}/cb").text == "BridgeRequest GET /cb 0"
    finally:
        helper.stop()


def test_serve_native_multi_on_the_bridge(loop_thread: BackgroundLoop) -> None:
    ports = [free_port(), free_port()]
    helper = run_helper(
        loop_thread,
        lambda event: serve_native_multi(
            describe,
            [NativeServerBind("127.0.0.1", ports[0]), NativeServerBind("127.0.0.1", ports[1])],
            native_callback=False,
            http3=False,
            echo=False,
            shutdown_signal=event.wait(),
        ),
    )
    try:
        for port in ports:
            assert wait_for_answer(f"http://127.0.0.1:{port}/multi").text == "BridgeRequest GET /multi 0"
    finally:
        helper.stop()


def test_serve_secure_native_http_on_the_bridge(loop_thread: BackgroundLoop, certs: Certificates) -> None:
    port = free_port()
    helper = run_helper(
        loop_thread,
        lambda event: serve_secure_native_http(
            describe,
            "127.0.0.1",
            port,
            certificate_path=certs.cert_path,
            key_path=certs.key_path,
            native_callback=False,
            http3=False,
            echo=False,
            shutdown_signal=event.wait(),
        ),
    )
    try:
        context = ssl.create_default_context(cafile=str(certs.ca_path))
        assert wait_for_answer(f"https://127.0.0.1:{port}/s", verify=context).text == "BridgeRequest GET /s 0"
    finally:
        helper.stop()


def test_serve_native_direct_on_the_bridge(loop_thread: BackgroundLoop) -> None:
    prebuilt = NativeDirectResponse.bytes(200, [("content-type", "text/plain"), ("x-prebuilt", "1")], b"prebuilt")

    async def chunks() -> Any:
        for index in range(5):
            yield f"part{index};".encode()

    async def handler(request: Any) -> Any:
        if request.path == "/prebuilt":
            return prebuilt
        if request.path == "/stream":
            return NativeDirectResponse.stream(200, [("content-type", "text/plain")], body=chunks())
        body = await request.read()
        kind = type(request._native).__name__
        return NativeDirectResponse.bytes(201, [("x-kind", kind)], f"{request.method} {request.uri} {len(body)}")

    port = free_port()
    helper = run_helper(
        loop_thread,
        lambda event: serve_native_direct(
            handler, "127.0.0.1", port, native_callback=False, http3=False, echo=False, shutdown_signal=event.wait()
        ),
    )
    try:
        first = wait_for_answer(f"http://127.0.0.1:{port}/direct?q=1")
        assert (first.status_code, first.text, first.headers["x-kind"]) == (201, "GET /direct?q=1 0", "BridgeRequest")
        assert post(f"http://127.0.0.1:{port}/up", b"x" * 100_000).text == "POST /up 100000"
        for _ in range(3):  # the same object every time
            again = get(f"http://127.0.0.1:{port}/prebuilt")
            assert (again.text, again.headers["x-prebuilt"], again.headers["content-length"]) == ("prebuilt", "1", "8")
        assert get(f"http://127.0.0.1:{port}/stream").text == "part0;part1;part2;part3;part4;"
    finally:
        helper.stop()


# ---------------------------------------------------------------- WebSocket (both transports, through `serve`)


class EchoSocket:
    """Echoes every message; ``close-please`` makes it close with 4000;
    ``/refuse`` answers 403 instead of accepting. Records how each socket
    ended."""

    def __init__(self) -> None:
        self.closed: list[tuple[int | None, str]] = []
        self.done = threading.Event()
        self.kinds: list[str] = []

    async def __call__(self, request: Any) -> None:
        self.kinds.append(type(request._native).__name__)
        if not is_upgrade_request(request):
            request.response.status_code = 426
            request.response.write("a WebSocket endpoint")
            return
        if request.uri.path == "/refuse":
            request.response.status_code = 403
            request.response.write("no")
            return
        socket_ = await upgrade_websocket(request, protocol_selector=lambda offered: offered[-1])
        try:
            async for message in socket_:
                if message == "close-please":
                    await socket_.close(4000, "bye")
                    break
                await socket_.send(message)
        finally:
            self.closed.append((socket_.close_code, socket_.close_reason))
            self.done.set()


def ws_url(running: Any, path: str = "/") -> str:
    return f"ws://127.0.0.1:{running.port}{path}"


def test_websocket_echo_text_binary_and_large_messages(serve: Any) -> None:
    from websockets.sync.client import connect

    handler = EchoSocket()
    running = serve(handler)
    big = os.urandom(3 * MIB)
    text = "é" * 100_000  # 200 KB of UTF-8, several frames on the bridge
    with connect(
        ws_url(running), subprotocols=["chat", "superchat"], max_size=None, open_timeout=TIMEOUT, close_timeout=TIMEOUT
    ) as ws:
        assert ws.subprotocol == "superchat"
        ws.send("hello")
        assert ws.recv(timeout=TIMEOUT) == "hello"
        ws.send(b"\x00\x01\xff")
        assert ws.recv(timeout=TIMEOUT) == b"\x00\x01\xff"
        ws.send(big)
        assert ws.recv(timeout=TIMEOUT) == big
        ws.send(text)
        assert ws.recv(timeout=TIMEOUT) == text
        ws.send(b"")
        assert ws.recv(timeout=TIMEOUT) == b""
    assert handler.done.wait(TIMEOUT)
    assert handler.closed == [(1000, "")]
    # the plain request to the same path is still plain HTTP
    assert get(running.url("/")).status_code == 426


def test_websocket_closed_by_the_server(serve: Any) -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    handler = EchoSocket()
    running = serve(handler)
    with connect(ws_url(running), open_timeout=TIMEOUT, close_timeout=TIMEOUT) as ws:
        ws.send("close-please")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4000, "bye")
    assert handler.done.wait(TIMEOUT)
    assert handler.closed == [(4000, "bye")]
    assert get(running.url("/after")).status_code == 426


def test_websocket_client_vanishing_is_1006(serve: Any) -> None:
    from websockets.sync.client import connect

    handler = EchoSocket()
    running = serve(handler)
    with connect(ws_url(running), open_timeout=TIMEOUT, close_timeout=1) as ws:
        ws.send("one")
        assert ws.recv(timeout=TIMEOUT) == "one"
        ws.socket.shutdown(socket.SHUT_RDWR)  # gone, without a close frame
    assert handler.done.wait(TIMEOUT), "the handler never learned that its client left"
    assert handler.closed == [(1006, "")]


def test_websocket_refused_with_a_plain_response(serve: Any) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    handler = EchoSocket()
    running = serve(handler)
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(running, "/refuse"), open_timeout=TIMEOUT)
    assert refused.value.response.status_code == 403
    assert refused.value.response.body == b"no"


def test_websocket_send_after_close_raises(serve: Any, loop_thread: BackgroundLoop) -> None:
    from websockets.sync.client import connect

    outcome: list[object] = []
    done = threading.Event()

    async def handler(request: Any) -> None:
        socket_ = await upgrade_websocket(request)
        assert await socket_.receive() == "go"
        socket_._native.ws_close(1000, "")
        try:
            await socket_.send("too late")
        except ClientDisconnected as error:
            outcome.append(error)
        while await socket_.receive() is not None:
            pass
        outcome.append(socket_.close_code)
        done.set()

    running = serve(handler)
    with connect(ws_url(running), open_timeout=TIMEOUT, close_timeout=TIMEOUT) as ws:
        ws.send("go")
        assert done.wait(TIMEOUT)
    assert isinstance(outcome[0], ClientDisconnected) and outcome[1] == 1000


def test_websocket_over_http2(serve: Any) -> None:
    handler = EchoSocket()
    running = serve(handler)
    messages = [b"first", os.urandom(40_000)]  # within the default flow-control window
    headers, echoed = h2_websocket_exchange(running.port, messages)
    assert headers[":status"] == "200"
    assert echoed == messages
    assert handler.kinds[0] in ("NativeRequest", "BridgeRequest")


def test_websocket_through_a_fake_python_end(fake: FakeEnd, native_server: Callable[..., Native]) -> None:
    """The frames themselves: the head says "WebSocket", Python accepts with
    a subprotocol, messages cross both ways, Python closes with 4001 and
    hears the client's answer."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    heard: list[tuple[int, bytes]] = []

    def accept(stream: FakeStream, exchange: Exchange) -> bool:
        assert exchange.head.websocket
        s = stream.id
        stream.send(
            frame(WS_ACCEPT, string(b"proto-x") + struct.pack(">I", 1) + string(b"x-extra") + string(b"1"), stream=s)
        )
        for _ in range(2):
            kind, payload = stream.frame()
            assert kind == WS_MESSAGE
            heard.append((payload[0], payload[1:]))
        stream.send(
            frame(WS_MESSAGE, b"\x01" + "hé".encode(), stream=s)
            + frame(WS_MESSAGE, b"\x06" + b"ab", stream=s)
            + frame(WS_MESSAGE, b"\x02" + b"cd", stream=s)
        )
        stream.send(frame(WS_CLOSE, struct.pack(">H", 4001) + b"done", stream=s))
        kind, payload = stream.frame()  # the socket's end, with the client's code
        heard.append((kind, payload))
        return True

    fake.then(accept)
    running = native_server(fake.address)
    with connect(
        f"ws://127.0.0.1:{running.port}/fake", subprotocols=["proto-x"], open_timeout=TIMEOUT, close_timeout=TIMEOUT
    ) as ws:
        assert ws.subprotocol == "proto-x"
        assert ws.response.headers["x-extra"] == "1"
        ws.send("tx")
        ws.send(b"\x00bin")
        assert ws.recv(timeout=TIMEOUT) == "hé"
        assert ws.recv(timeout=TIMEOUT) == b"abcd"  # two fragments, one message
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
    deadline = time.monotonic() + TIMEOUT
    while len(heard) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert heard[:2] == [(1, b"tx"), (2, b"\x00bin")]
    assert heard[2][0] == WS_CLOSE and struct.unpack(">H", heard[2][1][:2])[0] == 4001


def test_open_websockets_do_not_hold_the_bound(bridge: Callable[..., NativeHttpServer]) -> None:
    """An accepted WebSocket is a stream that no longer counts against the
    requests in flight: with room for one, two open sockets still leave
    plain requests served."""
    from websockets.sync.client import connect

    handler = EchoSocket()
    server = bridge(handler, max_pending_requests=1)
    with connect(f"ws://127.0.0.1:{server.port}/a", open_timeout=TIMEOUT) as first:
        with connect(f"ws://127.0.0.1:{server.port}/b", open_timeout=TIMEOUT) as second:
            first.send("1")
            second.send("2")
            assert (first.recv(timeout=TIMEOUT), second.recv(timeout=TIMEOUT)) == ("1", "2")
            assert get(url(server, "/plain")).status_code == 426
