"""What every server API shares: turning bind arguments into settings, the
native server with its loop plumbing, properties, and closing."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, NamedTuple

from .._dist.loader import native
from .addresses import resolve_bind_hosts
from .bridge import BridgeListener
from .config import ServerConfig, TlsConfig
from .contract import Request
from .loop import CoroutineRunner, EventPump
from .metrics import ServerMetrics, add_figures, total
from .unix_socket import UnixSocketFile, bind_unix_socket

__all__ = ["BoundServer", "HttpConnectionsInfo", "bind_settings", "open_servers", "process_metrics", "tls_settings"]

logger = logging.getLogger("server_native")
#: The head of the plain answers the server gives on its own.
PLAIN_TEXT = [("content-type", "text/plain; charset=utf-8")]


def answer_unavailable(native_request: Request) -> None:
    """A request that arrives while no handler is set: 503."""
    native_request.respond(503, PLAIN_TEXT, b"Service Unavailable")


#: What the native side decided on its own (refusals, framing errors of the
#: application, failed accepts and handshakes), queued natively.
native_logger = logging.getLogger("server_native.error")
#: How often a server's loop emits the natively queued records.
NATIVE_LOG_INTERVAL = 0.2
#: How long application tasks cancelled at shutdown get to end (their
#: ``finally`` blocks, a close frame) before the server stops waiting.
CANCELLED_TASKS_GRACE = 1.0


#: The servers of this process that have not closed, whatever API made them.
_open: weakref.WeakSet[BoundServer] = weakref.WeakSet()
#: What the closed servers of this process counted.
_closed_metrics: dict[str, Any] = {}
#: Held while a server joins ``_open`` or its figures move from there to
#: ``_closed_metrics``: a metrics listener's thread adds them up meanwhile.
_metrics_lock = threading.Lock()


def open_servers() -> list[BoundServer]:
    """The servers of this process that have not closed: what a supervised
    worker reports on and retires (``worker.py``)."""
    return list(_open)


def process_metrics() -> ServerMetrics:
    """The figures of every server this process has run, added up: the
    open ones' now, the counts of those closed (so that no counter goes
    back when a server closes)."""
    with _metrics_lock:
        return total([_closed_metrics, *(server.metrics() for server in _open)])


def _forget(server: BoundServer) -> None:
    """A server closes: what it counted joins what the closed ones did."""
    global _closed_metrics
    with _metrics_lock:
        if server in _open:
            _closed_metrics = add_figures(_closed_metrics, server.metrics(), counters_only=True)
            _open.discard(server)


def emit_native_log() -> None:
    """Emits the records the native side has queued since the last call."""
    for level, message in native.take_log_records():
        native_logger.log(level, message)


class HttpConnectionsInfo(NamedTuple):
    total: int
    active: int
    idle: int
    closing: int


def bind_settings(
    address: str,
    port: int = 0,
    *,
    backlog: int = 0,
    v6_only: bool = False,
    shared: bool = False,
    http2: bool = True,
    http3: bool = True,
    native_callback: bool = True,
    uds: str | os.PathLike[str] | None = None,
    config: ServerConfig | None = None,
    **limits: Any,
) -> tuple[ServerConfig, list[str], int]:
    """The settings, IP addresses and port for a bind call. ``limits`` are
    :class:`ServerConfig` fields (``max_body_size``...). ``uds`` (a Unix
    socket path) or ``fd`` (a listening socket) replace ``address`` and
    ``port``."""
    if uds is not None:
        limits["uds"] = os.fspath(uds)
    port = int(port)
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be between 0 and 65535, not {port}")
    settings = replace(
        config or ServerConfig(),
        backlog=backlog,
        v6_only=v6_only,
        shared=shared,
        http2=http2,
        http3=http3,
        native_callback=native_callback,
        **limits,
    )
    if settings.uds is not None or settings.fd is not None:
        return settings, [], 0
    return settings, resolve_bind_hosts(address, v6_only=v6_only), port


def tls_settings(
    *,
    certificate_path: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
    certificate_password: str | None = None,
    request_client_certificate: bool = False,
    require_client_certificate: bool = False,
    client_ca_path: str | os.PathLike[str] | None = None,
    http2: bool = True,
    ciphers: str | Sequence[str] | None = None,
    protocol_min: str = "tls1.2",
    crl_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] = (),
) -> TlsConfig:
    """Checks that the files exist and the names are known; the native side
    checks the files' contents."""
    return TlsConfig(
        certificate_path=os.fspath(certificate_path),
        key_path=os.fspath(key_path),
        certificate_password=certificate_password,
        request_client_certificate=request_client_certificate,
        require_client_certificate=require_client_certificate,
        client_ca_path=None if client_ca_path is None else os.fspath(client_ca_path),
        http2=http2,
        ciphers=ciphers,
        protocol_min=protocol_min,
        crl_paths=crl_paths,
    )


class BoundServer:
    """A native server bound to its addresses, and its asyncio plumbing.
    Subclasses say what a request becomes (``_on_request``). With
    ``threaded`` no loop is woken: threads consume requests natively, and
    with ``whole_body`` too a request reaches them only once its body has.
    With ``config.native_callback`` False, requests come over the socket
    bridge (``bridge.py``) instead of the in-process event queue."""

    def __init__(
        self, config: ServerConfig, hosts: list[str], port: int, *, threaded: bool = False, whole_body: bool = False
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._bridge: BridgeListener | None = None
        if not config.native_callback:
            if threaded:
                raise ValueError(
                    "native_callback=False cannot be combined with a server that takes requests on its own threads "
                    "(native_direct=True, WSGI): those are called in-process by definition"
                )
            self._bridge = BridgeListener(
                self._loop, self._on_request, self._report, backlog=config.max_pending_requests
            )
            config = replace(config, bridge_address=self._bridge.address, bridge_token=self._bridge.token)
        self._config = config
        #: Runs the coroutines that answer requests.
        self._runner = CoroutineRunner(self._loop, self._report)
        self._closing: asyncio.Future[None] | None = None
        #: When a close stops waiting for the application's tasks (loop time).
        self._tasks_deadline = 0.0
        self._forced = False
        #: Threads that take requests natively (``threaded``), joined on close.
        self._consumers: list[threading.Thread] = []
        self._pump = None if threaded else EventPump(self._loop, self._on_request)
        #: The Unix socket file this server made, removed once it has closed.
        self._socket_file: UnixSocketFile | None = None
        try:
            wake_fd = None if self._pump is None else self._pump.wake_fd
            if config.uds is None:
                self._native = native.NativeServer(config, hosts, port, wake_fd, whole_body)
            else:
                sock, self._socket_file = bind_unix_socket(config.uds, backlog=config.backlog, mode=config.uds_mode)
                with sock:  # The native side serves its own duplicate.
                    adopted = replace(config, uds=None, uds_mode=None, fd=sock.fileno())
                    self._native = native.NativeServer(adopted, hosts, port, wake_fd, whole_body)
        except BaseException:
            if self._pump is not None:
                self._pump.detach()
            if self._bridge is not None:
                self._bridge.close_now()
            self._remove_socket_file()
            raise
        if self._pump is not None:
            self._pump.attach(self._native)
        self._closed = self._loop.create_future()
        self._native_log = self._loop.call_later(NATIVE_LOG_INTERVAL, self._emit_native_log)
        with _metrics_lock:
            _open.add(self)

    def _emit_native_log(self) -> None:
        emit_native_log()
        if not self._closed.done():
            self._native_log = self._loop.call_later(NATIVE_LOG_INTERVAL, self._emit_native_log)

    def _on_request(self, native_request: Request) -> None:
        raise NotImplementedError

    @property
    def port(self) -> int:
        return self._native.port  # type: ignore[no-any-return]

    @property
    def address(self) -> str:
        """The first bound address, or the Unix socket path."""
        uds = self.uds
        return uds if uds is not None else self._native.addresses[0][0]

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The TCP addresses and ports (none for a Unix socket server)."""
        return self._native.addresses  # type: ignore[no-any-return]

    @property
    def uds(self) -> str | None:
        """The Unix socket path served on, or None."""
        return self._native.unix_path  # type: ignore[no-any-return]

    @property
    def secure(self) -> bool:
        return self._config.tls is not None

    @property
    def http2(self) -> bool:
        """Whether HTTP/2 is served (over TLS: offered by ALPN)."""
        tls = self._config.tls
        return tls.http2 if tls is not None else self._config.http2

    @property
    def http3(self) -> bool:
        """Whether HTTP/3 is served: TLS, ``http3`` on and its UDP port bound."""
        return self._native.http3  # type: ignore[no-any-return]

    @property
    def config(self) -> ServerConfig:
        return self._config

    @property
    def idle_timeout(self) -> float | None:
        """Seconds an idle keep-alive connection stays open; None for ever."""
        value = self._native.idle_timeout
        return None if value == 0 else value

    @idle_timeout.setter
    def idle_timeout(self, seconds: float | None) -> None:
        self._native.idle_timeout = 0.0 if seconds is None else float(seconds)

    def connections_info(self) -> HttpConnectionsInfo:
        return HttpConnectionsInfo(*self._native.connections_info())

    def metrics(self) -> ServerMetrics:
        """The server's figures for monitoring: connections, requests by
        protocol and status class, refusals, bytes, request durations (see
        ``server_native.runtime.metrics``). Counted natively; reading them
        takes a snapshot."""
        return self._native.metrics()  # type: ignore[no-any-return]

    @property
    def requests(self) -> int:
        """Requests answered so far, over every protocol."""
        return self._native.requests  # type: ignore[no-any-return]

    @property
    def keep_alive(self) -> bool:
        """False: every HTTP/1 response carries ``Connection: close``, so
        that clients move on before the server drains (HTTP/2 and HTTP/3
        clients are told by the drain's GOAWAY)."""
        return self._native.keep_alive  # type: ignore[no-any-return]

    @keep_alive.setter
    def keep_alive(self, on: bool) -> None:
        self._native.keep_alive = bool(on)

    async def close(self, force: bool = False) -> None:
        """Stops accepting, closes every open WebSocket (1012), lets
        in-flight requests and the application's tasks finish (up to
        ``config.shutdown_timeout`` seconds in all), then aborts what is
        left and cancels the tasks still running, and returns once they have
        ended. ``force`` aborts every connection and cancels every task at
        once."""
        if self._closing is None:
            self._closing = self._loop.create_future()
            self._forced = force
            self._tasks_deadline = self._loop.time() + (0.0 if force else self._config.shutdown_timeout)
            self._native.close(force, None if force else self._config.shutdown_timeout, self._closing)
            self._on_closing()
        elif force:
            self._forced = True
            self._tasks_deadline = self._loop.time()
            self._native.close(True, 0.0, self._loop.create_future())
            self._runner.cancel()
        await asyncio.shield(self._closing)
        self._remove_socket_file()
        if self._bridge is not None:
            # The native side has drained: nothing is in flight any more.
            await self._bridge.close()
        await self._finish_tasks()
        await self._join_consumers()
        _forget(self)
        if not self._closed.done():
            if self._pump is not None:
                self._pump.detach()
            self._native_log.cancel()
            emit_native_log()
            self._closed.set_result(None)

    async def _finish_tasks(self) -> None:
        """Waits for the application's tasks until the close's deadline,
        then cancels those still running and waits (briefly) for them: no
        task of the server outlives it."""
        runner = self._runner
        if await runner.wait(self._tasks_deadline - self._loop.time()):
            return
        cancelled = runner.cancel()
        if cancelled:
            native_logger.warning(
                "shutdown: cancelled %d application task(s) still running %s",
                cancelled,
                "on a forced close"
                if self._forced
                else f"after the shutdown timeout ({self._config.shutdown_timeout:g}s)",
            )
        if not await runner.wait(CANCELLED_TASKS_GRACE):
            native_logger.error("shutdown: %d application task(s) ignored their cancellation", runner.running)

    def _remove_socket_file(self) -> None:
        if self._socket_file is not None:
            self._socket_file.remove()
            self._socket_file = None

    async def _join_consumers(self) -> None:
        """Waits (bounded) for the consumer threads, which return once the
        queue is closed and their handlers are done: they must be gone
        before the interpreter finalizes (a daemon thread stopped inside
        native code would abort the process)."""
        alive = [thread for thread in self._consumers if thread.is_alive()]
        if not alive:
            return
        deadline = time.monotonic() + self._config.shutdown_timeout + 1

        def join() -> None:
            for thread in alive:
                thread.join(max(0.0, deadline - time.monotonic()))

        await self._loop.run_in_executor(None, join)

    def _on_closing(self) -> None:
        """Called once when closing starts."""

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    def _report(self, exc: BaseException) -> None:
        if not isinstance(exc, asyncio.CancelledError):
            logger.error("request handler failed", exc_info=exc)
