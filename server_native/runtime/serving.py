"""Serving bound servers until a shutdown signal, for every API: the
handler goes on, the addresses are logged, SIGINT/SIGTERM drain (a second
one stops at once) and the servers close."""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from collections.abc import Awaitable, Sequence
from typing import Any

from .logs import error_logger

__all__ = ["serve_bound"]


async def serve_bound(
    servers: Sequence[Any],
    handler: Any,
    echo: bool,
    shutdown_signal: Awaitable[Any] | None,
) -> None:
    """Serves ``handler`` on bound servers until the shutdown signal, then
    drains them. Shared by every callback-style API."""
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    signals = _SignalHandlers(loop, stop, servers)
    watcher = asyncio.ensure_future(_after(shutdown_signal, stop)) if shutdown_signal is not None else None
    force_close = True
    try:
        for server in servers:
            server.serve(handler)
            if echo:
                _echo(server)
        await stop
        await asyncio.gather(*(server.close() for server in servers))
        force_close = False
    except GeneratorExit:
        # Closed with its loop gone: nothing can be awaited any more, and
        # the native servers stop when they are dropped.
        force_close = False
        raise
    finally:
        signals.remove()
        if watcher is not None:
            watcher.cancel()
        if force_close:
            # Failed to start, or cancelled: nothing may keep listening.
            await asyncio.shield(
                asyncio.gather(*(server.close(force=True) for server in servers), return_exceptions=True)
            )
    if signals.second is not None:
        raise SystemExit(128 + signals.second)


async def _after(shutdown_signal: Awaitable[Any], stop: asyncio.Future[None]) -> None:
    await shutdown_signal
    if not stop.done():
        stop.set_result(None)


class _SignalHandlers:
    """SIGINT/SIGTERM while serving: the first drains, a second one aborts
    the drain and exits with 128 + the signal number. Installed only where
    asyncio allows it (the main thread, not Windows)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stop: asyncio.Future[None], servers: Sequence[Any]) -> None:
        self._loop = loop
        self._stop = stop
        self._servers = servers
        self._installed: list[signal.Signals] = []
        self.second: int | None = None
        if threading.current_thread() is not threading.main_thread() or sys.platform == "win32":
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError, ValueError):
                continue
            self._installed.append(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if not self._stop.done():
            limit = max((server.config.shutdown_timeout for server in self._servers), default=0.0)
            error_logger.info(
                "%s: shutting down; requests in flight have up to %gs to finish (a second signal stops at once)",
                sig.name,
                limit,
            )
            self._stop.set_result(None)
            return
        error_logger.warning("%s again: closing every connection now", sig.name)
        self.second = int(sig)
        for server in self._servers:
            self._loop.create_task(server.close(force=True))

    def remove(self) -> None:
        for sig in self._installed:
            self._loop.remove_signal_handler(sig)
        self._installed.clear()


def _echo(server: Any) -> None:
    """Logs each address served and what is really spoken there: the scheme
    says whether it is TLS, then the HTTP versions."""
    scheme = "https" if server.secure else "http"
    protocols = ["HTTP/1.1"]
    if server.http2:
        protocols.append("HTTP/2")
    if server.http3:
        protocols.append("HTTP/3")
    via = f"via server_native ({', '.join(protocols)})"
    if server.uds is not None:
        error_logger.info("Server listening on unix:%s (%s) %s", server.uds, scheme, via)
    for host, port in server.addresses:
        shown = f"[{host}]" if ":" in host else host
        error_logger.info("Server listening on %s://%s:%d %s", scheme, shown, port, via)
