"""A worker's side of the channel to its supervisor (``supervisor.py``): a
Unix socket pair per worker, inherited as ``--supervisor-fd``, carrying one
JSON object per line, each with a ``type``.

From the worker:

- ``{"type": "ready"}``: it serves (after the app's startup).
- ``{"type": "pong", "id": N, "figures": {...}}``: the answer to a ping,
  written by the event loop (a blocked loop does not answer), with the
  worker's figures: ``requests`` answered, ``connections`` open and
  ``active``, and ``metrics``, its servers' figures for monitoring
  (``server.metrics()``, added up), which the supervisor serves with
  ``--metrics``.
- ``{"type": "retire", "reason": "...", "figures": {...}}``: past its request
  limit, it asks to be replaced.
- ``{"type": "figures", "figures": {...}}``: its last figures, once its
  servers have drained, as it exits.

From the supervisor:

- ``{"type": "ping", "id": N}``: answer with a pong.
- ``{"type": "retire", "reason": "..."}``: a successor is starting. Every
  HTTP/1 response from now on closes its connection, so that when the drain
  comes (SIGTERM, once the successor serves) no client is about to reuse an
  idle keep-alive connection it closes.

A message of an unknown type is ignored, so that either side may learn new
ones first. When the supervisor is gone (end of the channel), the worker
drains and exits."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import Generator
from typing import Any

from ..runtime.bound import open_servers, process_metrics
from .supervisor import decode, encode

__all__ = ["SupervisedWorker", "figures"]

logger = logging.getLogger("server_native.worker")

#: How often the worker compares its requests with its limit.
_LIMIT_CHECK_INTERVAL = 0.2


def answered() -> int:
    """Requests this process's servers answered."""
    return sum(server.requests for server in open_servers())


def figures() -> dict[str, Any]:
    """This process's figures, summed over its servers."""
    servers = open_servers()
    connections = [server.connections_info() for server in servers]
    return {
        "requests": answered(),
        "connections": sum(info.total for info in connections),
        "active": sum(info.active for info in connections),
        "metrics": process_metrics(),
    }


class SupervisedWorker:
    """Awaited beside the servers once they serve (``run(shutdown_signal=
    worker)``): says so, answers pings, retires past ``max_requests`` plus a
    random ``jitter`` and completes when the supervisor is gone, which
    drains the worker."""

    def __init__(self, fd: int, *, max_requests: int | None = None, jitter: int = 0) -> None:
        self._fd = fd
        self._limit = None if max_requests is None else max_requests + random.randint(0, jitter)
        self._writer: asyncio.StreamWriter | None = None
        self._retired = False

    def __await__(self) -> Generator[Any, None, None]:
        return self._serve().__await__()

    async def _serve(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=self._fd))
        self._send({"type": "ready"})
        watch = None if self._limit is None else asyncio.ensure_future(self._watch_requests(self._limit))
        supervisor_gone = False
        try:
            while line := await reader.readline():
                message = decode(line)
                if message is not None:
                    self._on_message(message)
            supervisor_gone = True
        except ConnectionError:
            supervisor_gone = True  # Reset: the supervisor died with our messages unread.
        finally:
            if watch is not None:
                watch.cancel()
            if not supervisor_gone:
                # Ended with the servers closed (a drain): what they counted
                # since the last pong.
                self._send({"type": "figures", "figures": figures()})
            self._writer.close()
        logger.warning("the supervisor is gone: draining")

    def _on_message(self, message: dict[str, Any]) -> None:
        if message.get("type") == "ping":
            self._send({"type": "pong", "id": message.get("id"), "figures": figures()})
        elif message.get("type") == "retire":
            self._retire(str(message.get("reason", "")))

    def _send(self, message: dict[str, Any]) -> None:
        assert self._writer is not None
        self._writer.write(encode(message))

    def _retire(self, reason: str) -> None:
        if self._retired:
            return
        self._retired = True
        logger.info("retiring (%s): HTTP/1 connections close after their next response", reason)
        for server in open_servers():
            server.keep_alive = False

    async def _watch_requests(self, limit: int) -> None:
        while (served := answered()) < limit:
            await asyncio.sleep(_LIMIT_CHECK_INTERVAL)
        reason = f"{served} requests answered, the limit is {limit}"
        self._send({"type": "retire", "reason": reason, "figures": figures()})
        self._retire(reason)
