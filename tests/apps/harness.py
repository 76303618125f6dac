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
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT):
            return False
    except ConnectionRefusedError:
        return True


class BackgroundLoop:
    """An asyncio loop on its own thread (like conftest's ``LoopThread``,
    usable from module-scoped fixtures)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-serve-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Any, timeout: float = TIMEOUT) -> Any:
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
        future = asyncio.run_coroutine_threadsafe(helper(app, host, chosen, shutdown_signal=signal, **options), loop.loop)
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

    command = [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", "0", "--app-dir", str(TESTS_DIR), "--no-access-log", *args]
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


def h2_websocket_exchange(
    port: int, messages: list[bytes], *, deflate: bool = False
) -> tuple[dict[str, str], list[bytes]]:
    """RFC 8441: a WebSocket over an HTTP/2 extended CONNECT stream, by hand
    (h2 + wsproto's frame layer), sending ``messages`` as binary and
    collecting the echoes; with ``deflate`` offering permessage-deflate and
    compressing with what the server agreed to. Returns the response headers
    and the echoed messages."""
    import h2.config
    import h2.connection
    import h2.events
    from wsproto.extensions import PerMessageDeflate
    from wsproto.frame_protocol import FrameProtocol, Opcode

    compression = PerMessageDeflate() if deflate else None
    request = [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "http"), (":path", "/h2"),
               (":authority", f"127.0.0.1:{port}"), ("sec-websocket-version", "13")]  # fmt: skip
    if compression is not None:
        request.append(("sec-websocket-extensions", f"permessage-deflate; {compression.offer()}"))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    headers: dict[str, str] = {}
    echoed: list[bytes] = []
    partial = bytearray()
    ws: FrameProtocol | None = None
    sent = False
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(conn.data_to_send())
        while len(echoed) < len(messages):
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RemoteSettingsChanged) and not sent:
                    sent = True
                    conn.send_headers(1, request)
                elif isinstance(event, h2.events.ResponseReceived):
                    headers = dict(event.headers)
                    if headers[":status"] != "200":
                        return headers, echoed
                    extensions = []
                    if compression is not None:
                        if "sec-websocket-extensions" not in headers:
                            return headers, echoed
                        compression.finalize(headers["sec-websocket-extensions"])
                        extensions.append(compression)
                    ws = FrameProtocol(client=True, extensions=extensions)
                    for message in messages:
                        data = ws.send_data(message, fin=True)
                        for at in range(0, len(data), 16_384):  # the default frame size
                            conn.send_data(1, data[at : at + 16_384])
                elif isinstance(event, h2.events.DataReceived) and ws is not None:
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                    ws.receive_bytes(event.data)
                    for frame in ws.received_frames():  # wsproto hands over partial frames
                        if frame.opcode in (Opcode.BINARY, Opcode.TEXT, Opcode.CONTINUATION):
                            partial += frame.payload if isinstance(frame.payload, bytes) else frame.payload.encode()
                            if frame.message_finished:
                                echoed.append(bytes(partial))
                                partial.clear()
            sock.sendall(conn.data_to_send())
    return headers, echoed
