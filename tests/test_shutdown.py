"""Graceful shutdown: in-flight requests (HTTP/1.1 and HTTP/2 streams) are
answered while nothing new is accepted; ``close(force=True)`` and
``shutdown_timeout`` cut what never finishes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import http.client
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import hpack
import httpx
import hyperframe.frame
import pytest
from apps.harness import free_port, refused, wait_for, wait_refused
from conftest import requires_curl

TIMEOUT = 10


class Gate:
    """A handler that holds every request until :meth:`open` is called (or
    ``hold`` seconds pass), then answers 200 with the request path."""

    def __init__(self, loop_thread: Any, hold: float = 30) -> None:
        self.loop_thread = loop_thread
        self.hold = hold
        self.released = asyncio.Event()
        self.arrived: list[str] = []
        self.ports: set[int] = set()
        self.outcomes: list[object] = []
        self._lock = threading.Lock()

    async def __call__(self, request: Any) -> None:
        with self._lock:
            self.arrived.append(request.uri.path)
            self.ports.add(request.connection_info.remote_port)
        try:
            await asyncio.wait_for(self.released.wait(), self.hold)
        except asyncio.TimeoutError:
            self.outcomes.append("never released")
            raise
        request.response.write("done " + request.uri.path)
        self.outcomes.append("answered")

    def open(self) -> None:
        self.loop_thread.loop.call_soon_threadsafe(self.released.set)

    def wait_arrived(self, count: int) -> None:
        end = time.monotonic() + TIMEOUT
        while len(self.arrived) < count and time.monotonic() < end:
            time.sleep(0.01)
        assert len(self.arrived) >= count, f"only {len(self.arrived)} of {count} requests reached the handler"


def http11_get(port: int, path: str) -> tuple[int, bytes] | BaseException:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT + 5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    except Exception as error:  # noqa: BLE001 - recorded for the assertions
        return error
    finally:
        connection.close()


def begin_close(running: Any, force: bool = False) -> concurrent.futures.Future[None]:
    """Starts ``server.close()`` on the server's loop and returns once its
    first step (the native close: stop accepting) has run."""
    closing = asyncio.run_coroutine_threadsafe(running.server.close(force=force), running.loop_thread.loop)
    running.loop_thread.run(asyncio.sleep(0))  # queued after close's first step
    return closing


def new_connection_is_served(port: int) -> bool:
    """True when a fresh connection gets an HTTP response."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"GET /late HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.settimeout(2)
            return sock.recv(1024).startswith(b"HTTP/")
    except (TimeoutError, ConnectionRefusedError, ConnectionResetError, BrokenPipeError):
        return False


# ---------------------------------------------------------------- HTTP/1.1


def test_graceful_close_answers_every_in_flight_request(serve: Any, loop_thread: Any) -> None:
    count = 20
    gate = Gate(loop_thread)
    running = serve(gate, shutdown_timeout=30)
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        results = [pool.submit(http11_get, running.port, f"/slow/{i}") for i in range(count)]
        gate.wait_arrived(count)
        closing = begin_close(running)
        # close has begun: nothing new is accepted, and close waits for the 20
        assert not new_connection_is_served(running.port)
        assert wait_refused(running.port)
        assert not closing.done(), "close() finished while requests were still in flight"
        assert len(gate.arrived) == count
        gate.open()
        answers = [result.result(TIMEOUT + 5) for result in results]
    closing.result(TIMEOUT)
    for i, answer in enumerate(answers):
        assert answer == (200, f"done /slow/{i}".encode()), answer
    assert gate.outcomes == ["answered"] * count
    assert len(gate.arrived) == count  # the late connection never reached the handler


def test_close_idle_server_stops_accepting(serve: Any) -> None:
    async def handler(request: Any) -> None:
        request.response.write("ok")

    running = serve(handler)
    assert http11_get(running.port, "/") == (200, b"ok")
    running.close()
    assert not new_connection_is_served(running.port)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", running.port), timeout=2).close()


def test_graceful_close_closes_idle_keep_alive_connections(serve: Any) -> None:
    async def handler(request: Any) -> None:
        request.response.write("ok")

    running = serve(handler)
    with socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        running.loop_thread.run(running.server.close(), timeout=TIMEOUT)
        sock.settimeout(TIMEOUT)
        assert sock.recv(4096) == b"", "an idle keep-alive connection outlived a graceful close"


def test_a_connection_accepted_before_the_drain_has_its_first_request_answered(serve: Any) -> None:
    """A client that connected just before the drain began sends its request
    a moment later: it gets the answer, with ``Connection: close``, not a
    closed connection."""

    async def handler(request: Any) -> None:
        request.response.write("ok")

    running = serve(handler)
    with socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT) as sock:
        wait_for(lambda: running.server.connections_info().total == 1, what="the connection to be accepted")
        closing = begin_close(running)
        assert wait_refused(running.port)  # the drain has begun
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(TIMEOUT)
        response = b""
        while chunk := sock.recv(4096):
            response += chunk
    closing.result(TIMEOUT)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), response
    assert b"connection: close" in head.lower()
    assert body == b"ok"


# ---------------------------------------------------------------- HTTP/2


@pytest.mark.xfail(
    reason="CLIENT BUG, not the server: python-h2 (under httpx) moves its connection to CLOSED on the first GOAWAY "
    "(python-hyper/h2#1181) and fails the in-flight streams with LocalProtocolError; see the curl and frame-level "
    "tests below for the server's side",
    strict=True,
)
def test_graceful_close_finishes_http2_streams_httpx(serve: Any, loop_thread: Any) -> None:
    count = 10
    gate = Gate(loop_thread)
    running = serve(gate, shutdown_timeout=1)
    with httpx.Client(http1=False, http2=True, timeout=TIMEOUT) as client:

        def fetch(i: int) -> httpx.Response | BaseException:
            try:
                return client.get(running.url(f"/h2/{i}"))
            except Exception as error:  # noqa: BLE001 - recorded for the assertions
                return error

        with concurrent.futures.ThreadPoolExecutor(count) as pool:
            results = [pool.submit(fetch, i) for i in range(count)]
            gate.wait_arrived(count)
            assert len(gate.ports) == 1, "the streams did not share one HTTP/2 connection"
            closing = begin_close(running)
            assert wait_refused(running.port)
            gate.open()
            responses = [result.result(TIMEOUT + 5) for result in results]
    closing.result(TIMEOUT)
    for i, response in enumerate(responses):
        assert isinstance(response, httpx.Response), response
        assert response.http_version == "HTTP/2"
        assert response.status_code == 200
        assert response.text == f"done /h2/{i}"


@requires_curl
def test_graceful_close_finishes_http2_streams_curl(serve: Any, loop_thread: Any, certs: Any) -> None:
    """curl multiplexes its parallel transfers on one TLS HTTP/2 connection;
    all of them are held when the close begins, and all get their 200."""
    count = 10
    gate = Gate(loop_thread)
    running = serve(gate, shutdown_timeout=30, certificate_path=certs.cert_path, key_path=certs.key_path)
    urls = [arg for i in range(count) for arg in (running.url(f"/h2/{i}"), "-o", "/dev/null")]
    curl = subprocess.Popen(
        [
            "curl",
            "-sS",
            "--http2",
            "--cacert",
            str(certs.ca_path),
            "--parallel",
            "--max-time",
            "20",
            "-w",
            "%{http_code} %{http_version} %{url_effective}\\n",
            *urls,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        gate.wait_arrived(count)
        assert len(gate.ports) == 1, "curl did not multiplex the transfers on one connection"
        closing = begin_close(running)
        assert wait_refused(running.port)
        assert not closing.done(), "close() finished while streams were still in flight"
        gate.open()
        out, err = curl.communicate(timeout=30)
    finally:
        if curl.poll() is None:
            curl.kill()
            curl.wait()
    closing.result(TIMEOUT)
    assert curl.returncode == 0, err
    results = sorted(line for line in out.splitlines() if line)
    assert len(results) == count, out
    for line in results:
        code, version, _ = line.split(" ", 2)
        assert (code, version) == ("200", "2"), line
    assert gate.outcomes == ["answered"] * count


class FrameClient:
    """A bare HTTP/2 client at the frame level (hyperframe + hpack), so every
    frame the server sends during a graceful close is seen as it is."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.buffer = b""
        self.statuses: dict[int, int] = {}
        self.bodies: dict[int, bytes] = {}
        self.ended: set[int] = set()
        self.goaways: list[tuple[int, int]] = []
        self.resets: dict[int, int] = {}
        self.closed = False
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + hyperframe.frame.SettingsFrame(0).serialize())

    def request(self, stream_id: int, path: str) -> None:
        block = self.encoder.encode([(":method", "GET"), (":scheme", "http"), (":authority", "x"), (":path", path)])
        frame = hyperframe.frame.HeadersFrame(stream_id, data=block, flags=["END_HEADERS", "END_STREAM"])
        self.sock.sendall(frame.serialize())

    def pump(self, until: Any, timeout: float = TIMEOUT) -> None:
        end = time.monotonic() + timeout
        while not until() and not self.closed and time.monotonic() < end:
            self.sock.settimeout(max(end - time.monotonic(), 0.01))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            if not data:
                self.closed = True
                break
            self.buffer += data
            while len(self.buffer) >= 9:
                frame, length = hyperframe.frame.Frame.parse_frame_header(memoryview(self.buffer[:9]))
                if len(self.buffer) < 9 + length:
                    break
                frame.parse_body(memoryview(self.buffer[9 : 9 + length]))
                self.buffer = self.buffer[9 + length :]
                self.handle(frame)

    def handle(self, frame: Any) -> None:
        frames = hyperframe.frame
        if isinstance(frame, frames.SettingsFrame) and "ACK" not in frame.flags:
            self.sock.sendall(frames.SettingsFrame(0, flags=["ACK"]).serialize())
        elif isinstance(frame, frames.PingFrame) and "ACK" not in frame.flags:
            self.sock.sendall(frames.PingFrame(0, opaque_data=frame.opaque_data, flags=["ACK"]).serialize())
        elif isinstance(frame, frames.HeadersFrame):
            headers: dict[Any, Any] = dict(self.decoder.decode(frame.data))
            self.statuses[frame.stream_id] = int(headers[":status"])
        elif isinstance(frame, frames.DataFrame):
            self.bodies[frame.stream_id] = self.bodies.get(frame.stream_id, b"") + frame.data
        elif isinstance(frame, frames.GoAwayFrame):
            self.goaways.append((frame.last_stream_id, frame.error_code))
        elif isinstance(frame, frames.RstStreamFrame):
            self.resets[frame.stream_id] = frame.error_code
        if "END_STREAM" in frame.flags and isinstance(frame, (frames.HeadersFrame, frames.DataFrame)):
            self.ended.add(frame.stream_id)


def test_graceful_close_sends_goaway_and_finishes_streams(serve: Any, loop_thread: Any) -> None:
    """GOAWAY (NO_ERROR) arrives while the streams are held, a stream opened
    after it never reaches the handler, and every earlier stream still ends
    with its 200."""
    count = 5
    gate = Gate(loop_thread)
    running = serve(gate, shutdown_timeout=30)
    with socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT) as sock:
        client = FrameClient(sock)
        streams = [1 + 2 * i for i in range(count)]
        for i, stream_id in enumerate(streams):
            client.request(stream_id, f"/s/{i}")
        gate.wait_arrived(count)
        closing = begin_close(running)
        # the final GOAWAY names the last stream the server will process
        client.pump(lambda: any(last < 2**31 - 1 for last, _ in client.goaways))
        assert client.goaways, "no GOAWAY during a graceful close"
        assert all(code == 0 for _, code in client.goaways), client.goaways
        final_last = min(last for last, _ in client.goaways)
        assert final_last >= max(streams), client.goaways
        assert not client.ended, "streams ended before the handler answered"
        late = max(streams) + 2
        client.request(late, "/late")  # forbidden after GOAWAY: must not be processed
        gate.open()
        client.pump(lambda: client.ended >= set(streams))
    closing.result(TIMEOUT)
    for i, stream_id in enumerate(streams):
        assert client.statuses.get(stream_id) == 200
        assert client.bodies.get(stream_id) == f"done /s/{i}".encode()
    assert late not in client.statuses
    assert "/late" not in gate.arrived
    assert len(gate.arrived) == count


# ---------------------------------------------------------------- forced and timed-out close


def test_force_close_cuts_a_hanging_request(serve: Any, loop_thread: Any) -> None:
    gate = Gate(loop_thread, hold=30)
    running = serve(gate, shutdown_timeout=60)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        result = pool.submit(http11_get, running.port, "/hang")
        gate.wait_arrived(1)
        # bounded: far below shutdown_timeout, so only force can explain it
        running.loop_thread.run(running.server.close(force=True), timeout=TIMEOUT)
        outcome = result.result(TIMEOUT)
    assert isinstance(outcome, (ConnectionError, http.client.HTTPException)), outcome
    assert not new_connection_is_served(running.port)
    gate.open()


def test_force_close_cuts_http2_streams(serve: Any, loop_thread: Any) -> None:
    gate = Gate(loop_thread, hold=30)
    running = serve(gate, shutdown_timeout=60)
    with httpx.Client(http1=False, http2=True, timeout=TIMEOUT + 5) as client:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            result = pool.submit(client.get, running.url("/hang"))
            gate.wait_arrived(1)
            running.loop_thread.run(running.server.close(force=True), timeout=TIMEOUT)
            with pytest.raises(httpx.TransportError):
                result.result(TIMEOUT)
    gate.open()


def test_force_close_during_graceful_close(serve: Any, loop_thread: Any) -> None:
    """A graceful close waiting on a hanging request can be hurried with force."""
    gate = Gate(loop_thread, hold=30)
    running = serve(gate, shutdown_timeout=60)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        result = pool.submit(http11_get, running.port, "/hang")
        gate.wait_arrived(1)
        graceful = begin_close(running)
        assert not graceful.done()
        running.loop_thread.run(running.server.close(force=True), timeout=TIMEOUT)
        graceful.result(TIMEOUT)
        outcome = result.result(TIMEOUT)
    assert isinstance(outcome, (ConnectionError, http.client.HTTPException)), outcome
    gate.open()


def test_shutdown_timeout_cuts_a_request_that_never_finishes(serve: Any, loop_thread: Any) -> None:
    gate = Gate(loop_thread, hold=30)
    running = serve(gate, shutdown_timeout=0.5)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        result = pool.submit(http11_get, running.port, "/never")
        gate.wait_arrived(1)
        running.loop_thread.run(running.server.close(), timeout=TIMEOUT)  # graceful, bounded at 10 s
        outcome = result.result(TIMEOUT)
    assert isinstance(outcome, (ConnectionError, http.client.HTTPException)), outcome
    assert not new_connection_is_served(running.port)
    gate.open()


def test_shutdown_timeout_keeps_requests_that_finish_in_time(serve: Any, loop_thread: Any) -> None:
    """The control case: with a generous timeout the held request is answered."""
    gate = Gate(loop_thread, hold=30)
    running = serve(gate, shutdown_timeout=30)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        result = pool.submit(http11_get, running.port, "/soon")
        gate.wait_arrived(1)
        closing = begin_close(running)
        gate.open()
        closing.result(TIMEOUT)
        assert result.result(TIMEOUT) == (200, b"done /soon")


def test_async_context_manager_closes(loop_thread: Any) -> None:
    from server_native import NativeHttpServer

    async def scenario() -> int:
        async with await NativeHttpServer.bind("127.0.0.1", 0, http3=False) as server:
            port = server.port
            assert port > 0
        return port

    port = loop_thread.run(scenario())
    assert not new_connection_is_served(port)


def test_a_close_that_ends_after_its_loop_closed_reports_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """With native_direct=True a tokio thread resolves the close's future
    once the drain ends. The application may have closed its loop by then
    (here while the drain waits out ``shutdown_timeout`` for a handler that
    does not return): nobody is left to tell, and nothing is reported as an
    unraisable exception."""
    from server_native import NativeDirectResponse, serve_native_direct

    reported: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, name="closing-loop", daemon=True)
    runner.start()
    arrived, release = threading.Event(), threading.Event()

    def handler(request: Any) -> Any:
        arrived.set()
        release.wait(TIMEOUT)
        return NativeDirectResponse.bytes(200, [], b"late")

    port = free_port()
    stop = asyncio.Event()
    serving = asyncio.run_coroutine_threadsafe(
        serve_native_direct(
            handler, "127.0.0.1", port, native_direct=True, shutdown_timeout=0.5,
            echo=False, http3=False, shutdown_signal=stop.wait(),
        ),
        loop,
    )  # fmt: skip
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            end = time.monotonic() + TIMEOUT
            while refused(port) and time.monotonic() < end:
                time.sleep(0.02)
            result = pool.submit(http11_get, port, "/never")
            assert arrived.wait(TIMEOUT)
            loop.call_soon_threadsafe(stop.set)
            assert wait_refused(port)  # the drain has begun
            loop.call_soon_threadsafe(loop.stop)
            runner.join(TIMEOUT)
            serving.cancel()
            loop.close()
            outcome = result.result(TIMEOUT)  # cut when shutdown_timeout ends the drain
        assert isinstance(outcome, (ConnectionError, http.client.HTTPException)), outcome
        time.sleep(1)  # the drain's end reaches the closed loop just after the cut
        assert reported == []
    finally:
        release.set()


def test_a_serve_coroutine_closed_with_its_loop_gone_stops_quietly() -> None:
    """A serve helper's coroutine closed without its loop (GeneratorExit, as
    when an abandoned task is collected) cannot await its servers' close:
    it returns at once, and the listener closes when the server is dropped."""
    from server_native import NativeDirectResponse, serve_native_direct

    port = free_port()
    loop = asyncio.new_event_loop()
    serving = serve_native_direct(
        lambda _request: NativeDirectResponse.bytes(200, [], b"up"), "127.0.0.1", port, echo=False, http3=False
    )
    task = loop.create_task(serving)

    async def until_listening() -> None:
        end = time.monotonic() + TIMEOUT
        while refused(port) and time.monotonic() < end:
            await asyncio.sleep(0.02)

    loop.run_until_complete(until_listening())
    assert loop.run_until_complete(loop.run_in_executor(None, http11_get, port, "/")) == (200, b"up")
    loop.close()
    serving.close()  # raised "coroutine ignored GeneratorExit" while it awaited in its finally
    del task, serving
    gc.collect()
    assert wait_refused(port)
