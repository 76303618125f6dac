"""Runs ``serve_asgi`` / ``serve_wsgi`` on a background event loop for tests
driven by blocking clients (httpx, requests, raw sockets).

Readiness needs no stdout scraping: the shutdown signal handed to the helper
is a coroutine that ``serve_bound`` only starts awaiting once the app is being
served, so its first step is the "ready" mark. Ports come from the kernel
(bind to port 0 and release) with a retry should another process take one in
between. Every wait is bounded."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

TIMEOUT = 10.0


@contextlib.contextmanager
def plain_tracebacks() -> Iterator[None]:
    """CPython 3.11 draws ``^^^`` markers under traceback lines by parsing
    them with ``ast``. A traceback logged while pytest itself is parsing
    source to report a failure (from a server thread, or from a finalizer
    that the garbage collector runs in the middle of pytest's parse) makes
    the two parses share ``ast``'s recursion counter, and pytest dies with
    "INTERNALERROR ... SystemError: AST constructor recursion depth mismatch"
    (CPython gh-106905, pytest #10763), hiding every later result. While
    the block runs, tracebacks are drawn without the markers."""
    import traceback

    original = getattr(traceback, "_extract_caret_anchors_from_line_segment", None)
    if original is None:
        yield
        return
    traceback._extract_caret_anchors_from_line_segment = lambda segment: None  # type: ignore[attr-defined]
    try:
        yield
    finally:
        traceback._extract_caret_anchors_from_line_segment = original  # type: ignore[attr-defined]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def refused(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens any more. A reset is a connection caught in a
    listener's backlog as it closed: not refused yet."""
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT):
            return False
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False


class BackgroundLoop:
    """An asyncio loop on its own thread, so tests drive servers with
    blocking clients (http.client, httpx, curl) from the test thread; usable
    from module-scoped fixtures too (``loop_thread`` is the per-test one)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-serve-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def stop(self) -> None:
        """Cancels what is still running on the loop (bounded), then stops
        and closes it, so no pending task is left for the garbage collector."""

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=TIMEOUT)

        if self._thread.is_alive():
            with contextlib.suppress(BaseException):
                asyncio.run_coroutine_threadsafe(cancel_all(), self.loop).result(TIMEOUT + 1)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(TIMEOUT)
        if not self._thread.is_alive():
            with contextlib.suppress(BaseException):
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()


@dataclass
class Running:
    """One ``serve_*`` helper running until :meth:`stop`."""

    loop: BackgroundLoop
    future: concurrent.futures.Future[Any]
    port: int
    scheme: str
    host: str = "127.0.0.1"
    _stop: list[asyncio.Event] = field(default_factory=list)

    def url(self, path: str = "/") -> str:
        return f"{self.scheme}://{self.host}:{self.port}{path}"

    def stop(self, timeout: float = TIMEOUT) -> Any:
        """Completes the shutdown signal (a graceful drain) and returns what
        the helper returned (or raises what it raised). A helper still in
        its startup gets the signal as soon as it starts waiting for it."""
        deadline = time.monotonic() + timeout
        while not self.future.done():
            for event in self._stop:
                self.loop.call(event.set)
            try:
                return self.future.result(0.05)
            except concurrent.futures.TimeoutError:
                if time.monotonic() > deadline:
                    raise
        return self.future.result(0)


def start(
    loop: BackgroundLoop,
    helper: Callable[..., Any],
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    wait: bool = True,
    **options: Any,
) -> Running:
    """Starts ``helper(app, host, port, shutdown_signal=..., echo=False,
    http3=False, **options)`` and waits (bounded) until it serves. With
    ``wait=False`` returns at once (for helpers expected to fail)."""
    options.setdefault("http3", False)
    options.setdefault("echo", False)
    scheme = "https" if options.get("tls") is not None else "http"
    for _attempt in range(5):
        chosen = free_port(host) if port is None else port
        ready = threading.Event()
        stop_events: list[asyncio.Event] = []

        async def until_stopped() -> None:
            event = asyncio.Event()
            stop_events.append(event)
            ready.set()
            await event.wait()

        signal = until_stopped()
        future = asyncio.run_coroutine_threadsafe(
            helper(app, host, chosen, shutdown_signal=signal, **options), loop.loop
        )
        # A helper that fails before serving never awaits its signal.
        future.add_done_callback(lambda _: signal.close())
        running = Running(loop, future, chosen, scheme, host, stop_events)
        if not wait:
            return running
        deadline = time.monotonic() + TIMEOUT
        while not ready.wait(0.01):
            if future.done():
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{helper.__name__} did not start serving within {TIMEOUT}s")
        if ready.is_set():
            return running
        error = future.exception()
        if port is None and isinstance(error, OSError) and error.errno == errno.EADDRINUSE:
            continue  # another process took the port between probe and bind
        if error is not None:
            raise error
        raise RuntimeError(f"{helper.__name__} returned before serving")
    raise RuntimeError("no free port after 5 attempts")


@contextlib.contextmanager
def serving(helper: Callable[..., Any], app: Any, **options: Any) -> Iterator[Running]:
    """A server on its own loop for the ``with`` block; stopped (gracefully)
    after it."""
    loop = BackgroundLoop()
    try:
        running = start(loop, helper, app, **options)
        try:
            yield running
        finally:
            with contextlib.suppress(BaseException):
                running.stop()
    finally:
        loop.stop()


def get(url: str, **options: Any) -> httpx.Response:
    """One GET with httpx; ``options`` go to its Client (``http2``, ``verify``...)."""
    with httpx.Client(timeout=TIMEOUT, **options) as client:
        return client.get(url)


def wait_for(predicate: Callable[[], Any], timeout: float = TIMEOUT, what: str = "condition") -> Any:
    """Polls ``predicate`` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def wait_refused(port: int, host: str = "127.0.0.1") -> bool:
    """Waits (bounded) until nothing listens on ``port``."""
    return bool(wait_for(lambda: refused(port, host), what=f"{host}:{port} to refuse connections"))


TESTS_DIR = __import__("pathlib").Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def uvicorn_process(target: str, *args: str) -> Iterator[str]:
    """Runs ``python -m uvicorn <target> --port 0`` (``target`` importable
    from tests/, e.g. ``apps.starlette_app:app``) in a child process and
    yields its base URL, read from uvicorn's "running on" line."""
    import queue
    import re
    import subprocess
    import sys

    command = [
        sys.executable,
        "-m",
        "uvicorn",
        target,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--app-dir",
        str(TESTS_DIR),
        "--no-access-log",
        *args,
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(TESTS_DIR))
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"uvicorn did not start: {''.join(seen)!r}") from None
            if line is None:
                raise RuntimeError(f"uvicorn exited: {''.join(seen)!r}")
            seen.append(line)
            match = re.search(r"Uvicorn running on (http://[^\s]+)", line)
            if match:
                yield match.group(1)
                break
    finally:
        process.terminate()
        try:
            process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(TIMEOUT)


class WebSocketClosed(Exception):
    """The server's close frame (code None: the connection or stream ended
    without one)."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


#: A valid Sec-WebSocket-Key (RFC 6455's example).
WEBSOCKET_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


class RawWebSocket:
    """A WebSocket client driven by hand with wsproto's frame layer, over a
    transport of its subclass's: messages, the close frame (answered), and
    the server's pings, counted in ``pings`` and answered unless
    ``answer_pings`` is off. ``status``, ``headers`` and ``body`` are the
    server's answer to the handshake (``body``: a refusal's)."""

    def __init__(self, answer_pings: bool) -> None:
        self.answer_pings = answer_pings
        self.pings = 0
        self._pongs = 0
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""
        self._ws: Any = None
        self._messages: list[Any] = []
        self._partial: list[Any] = []
        self._closed: WebSocketClosed | None = None

    def _open(self, extensions: list[Any]) -> None:
        from wsproto.frame_protocol import FrameProtocol

        self._ws = FrameProtocol(client=True, extensions=extensions)

    _sock: socket.socket

    def __enter__(self) -> RawWebSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()

    def _receive_data(self) -> bytes | None:
        """The next bytes of the WebSocket's stream; None at its end."""
        raise NotImplementedError

    def _send_data(self, data: bytes) -> None:
        raise NotImplementedError

    def send(self, message: bytes | str) -> None:
        self._send_data(self._ws.send_data(message, fin=True))

    def close(self, code: int = 1000) -> None:
        self._send_data(self._ws.close(code))

    def receive(self) -> bytes | str:
        """The next message; raises :class:`WebSocketClosed` at the server's
        close frame or the end of the stream."""
        while not self._messages:
            self._pump()
        return self._messages.pop(0)

    def wait_for_pings(self, count: int) -> None:
        """Reads until the server has sent ``count`` pings."""
        while self.pings < count:
            self._pump()

    def ping(self) -> None:
        """A ping, and its pong waited for: the server has read everything
        sent before it."""
        pongs = self._pongs
        self._send_data(self._ws.ping(b"client"))
        while self._pongs == pongs:
            self._pump()

    def _pump(self) -> None:
        """Reads once and takes in the frames that came."""
        from wsproto.frame_protocol import Opcode

        if self._closed is not None:
            raise self._closed
        data = self._receive_data()
        if data is None:
            self._closed = WebSocketClosed(None, "the stream ended")
            return
        self._ws.receive_bytes(data)
        for frame in self._ws.received_frames():  # wsproto hands over partial frames
            if frame.opcode is Opcode.PING:
                self.pings += 1
                if self.answer_pings:
                    self._send_data(self._ws.pong(frame.payload))
            elif frame.opcode is Opcode.PONG:
                self._pongs += 1
            elif frame.opcode is Opcode.CLOSE:
                code, reason = frame.payload
                self._closed = WebSocketClosed(code, reason)
                self._send_data(self._ws.close(code, reason))
            elif frame.opcode in (Opcode.BINARY, Opcode.TEXT, Opcode.CONTINUATION):
                self._partial.append(frame.payload)
                if frame.message_finished:
                    whole = "".join(self._partial) if isinstance(frame.payload, str) else b"".join(self._partial)
                    self._messages.append(whole)
                    self._partial.clear()


class H1WebSocket(RawWebSocket):
    """RFC 6455 over HTTP/1.1 on a plain socket (or TLS: ``tls`` a client
    context), the handshake written by hand: ``headers`` replace the
    Upgrade request's own WebSocket headers (to send invalid ones)."""

    def __init__(
        self,
        port: int,
        *,
        path: str = "/",
        tls: Any = None,
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
        answer_pings: bool = True,
    ) -> None:
        super().__init__(answer_pings)
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname="127.0.0.1")
        self._sock = sock
        if headers is None:
            headers = [("Sec-WebSocket-Key", WEBSOCKET_KEY), ("Sec-WebSocket-Version", "13")]
        lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade"]
        lines += [f"{name}: {value}" for name, value in headers]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        received = b""
        while b"\r\n\r\n" not in received:
            data = sock.recv(65536)
            if not data:
                raise WebSocketClosed(None, f"the connection closed before the response head: {received!r}")
            received += data
        head, self._rest = received.split(b"\r\n\r\n", 1)
        status_line, *fields = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        self.headers = {
            name.strip().lower(): value.strip() for name, value in (field.split(":", 1) for field in fields)
        }
        if self.status != 101:
            length = int(self.headers.get("content-length", "0"))
            while len(self._rest) < length:
                data = sock.recv(65536)
                if not data:
                    break
                self._rest += data
            self.body = self._rest
            return
        self._open([])

    def _receive_data(self) -> bytes | None:
        if self._rest:
            data, self._rest = self._rest, b""
            return data
        return self._sock.recv(65536) or None

    def _send_data(self, data: bytes) -> None:
        self._sock.sendall(data)


class H2WebSocket(RawWebSocket):
    """RFC 8441 by hand: one WebSocket on an HTTP/2 extended CONNECT stream,
    at the frame level (hyperframe + hpack: a stream goes on after a GOAWAY,
    which h2's state machine refuses to see) with wsproto's frame layer, in
    cleartext or over TLS (``tls``: a client context; ALPN h2). ``headers``
    replace the request's ``sec-websocket-version``; with ``deflate``
    permessage-deflate is offered and used as agreed. ``goaways`` lists the
    GOAWAY frames' error codes."""

    STREAM = 1

    def __init__(
        self,
        port: int,
        *,
        path: str = "/h2",
        deflate: bool = False,
        tls: Any = None,
        headers: list[tuple[str, str]] | None = None,
        answer_pings: bool = True,
    ) -> None:
        import hpack
        from wsproto.extensions import PerMessageDeflate

        super().__init__(answer_pings)
        compression = PerMessageDeflate() if deflate else None
        request = [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "https" if tls else "http"),
                   (":path", path), (":authority", f"127.0.0.1:{port}")]  # fmt: skip
        request += headers if headers is not None else [("sec-websocket-version", "13")]
        if compression is not None:
            request.append(("sec-websocket-extensions", f"permessage-deflate; {compression.offer()}"))
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        if tls is not None:
            tls.set_alpn_protocols(["h2"])
            sock = tls.wrap_socket(sock, server_hostname="127.0.0.1")
        self._sock = sock
        self._decoder = hpack.Decoder()
        self._buffer = b""
        self._data: list[bytes] = []
        self._ended = False
        self.goaways: list[int] = []
        frames = self._frames()
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frames.SettingsFrame(0).serialize())
        block = hpack.Encoder().encode(request)
        sock.sendall(frames.HeadersFrame(self.STREAM, data=block, flags=["END_HEADERS"]).serialize())
        while not self.status or (self.status != 200 and not self._ended):
            if self._ended and not self.status:
                raise WebSocketClosed(None, "the connection closed before the response")
            self._read()
        if self.status != 200:
            self.body = b"".join(self._data)
            return
        extensions = []
        if compression is not None and "sec-websocket-extensions" in self.headers:
            compression.finalize(self.headers["sec-websocket-extensions"])
            extensions.append(compression)
        self._open(extensions)

    @staticmethod
    def _frames() -> Any:
        import hyperframe.frame

        return hyperframe.frame

    def _read(self) -> None:
        """Reads once; answers SETTINGS and PING, grants back what DATA
        took, and keeps the stream's data and whether it ended."""
        frames = self._frames()
        data = self._sock.recv(65536)
        if not data:
            self._ended = True
            return
        self._buffer += data
        while len(self._buffer) >= 9:
            frame, length = frames.Frame.parse_frame_header(memoryview(self._buffer[:9]))
            if len(self._buffer) < 9 + length:
                break
            frame.parse_body(memoryview(self._buffer[9 : 9 + length]))
            self._buffer = self._buffer[9 + length :]
            if isinstance(frame, frames.SettingsFrame) and "ACK" not in frame.flags:
                self._sock.sendall(frames.SettingsFrame(0, flags=["ACK"]).serialize())
            elif isinstance(frame, frames.PingFrame) and "ACK" not in frame.flags:
                self._sock.sendall(frames.PingFrame(0, opaque_data=frame.opaque_data, flags=["ACK"]).serialize())
            elif isinstance(frame, frames.GoAwayFrame):
                self.goaways.append(frame.error_code)
            elif frame.stream_id != self.STREAM:
                continue
            elif isinstance(frame, frames.HeadersFrame):
                self.headers = {
                    name.decode(): value.decode() for name, value in self._decoder.decode(frame.data, raw=True)
                }
                self.status = int(self.headers[":status"])
            elif isinstance(frame, frames.DataFrame):
                self._data.append(frame.data)
                if length:
                    for stream in (0, self.STREAM):
                        self._sock.sendall(frames.WindowUpdateFrame(stream, window_increment=length).serialize())
            elif isinstance(frame, frames.RstStreamFrame):
                self._ended = True
            if "END_STREAM" in frame.flags:
                self._ended = True

    def _receive_data(self) -> bytes | None:
        while not self._data and not self._ended:
            self._read()
        data = b"".join(self._data)
        self._data.clear()
        return data or None

    def _send_data(self, data: bytes) -> None:
        frames = self._frames()
        for at in range(0, len(data), 16_384):  # the default frame size
            self._sock.sendall(frames.DataFrame(self.STREAM, data=data[at : at + 16_384]).serialize())


def h2_websocket_exchange(
    port: int, messages: list[bytes], *, deflate: bool = False
) -> tuple[dict[str, str], list[bytes]]:
    """Sends ``messages`` as binary over an RFC 8441 WebSocket
    (:class:`H2WebSocket`) and collects the echoes; with ``deflate``
    offering permessage-deflate. Returns the response headers and the
    echoed messages."""
    with H2WebSocket(port, deflate=deflate) as ws:
        if ws.status != 200 or (deflate and "sec-websocket-extensions" not in ws.headers):
            return ws.headers, []
        for message in messages:
            ws.send(message)
        return ws.headers, [bytes(ws.receive()) for _ in messages]
