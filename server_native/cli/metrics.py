"""``--metrics``: the server's figures in the Prometheus text format
(``runtime/metrics.py``), on a listener of their own (``GET /metrics``).

One process serves its own figures. With worker processes, the supervisor
serves them, added up over its workers: each worker sends its figures in
the pongs of the supervisor's channel, and the supervisor keeps the last
figures of the workers that exited, so that counters never go back when a
worker is replaced. That is why this is a collector of our own rather than
``prometheus_client``'s multiprocess mode: that mode has every process
write its counters to files in a shared directory, which must be created,
emptied between runs and pruned of exited processes, and it cannot count
what the native side counts without a Python call per request."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app
from prometheus_client.registry import Collector, CollectorRegistry

__all__ = ["MetricsListener"]

PATH = "/metrics"


class _QuietHandler(WSGIRequestHandler):
    """Scrapes are not logged: they come every few seconds."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class MetricsListener:
    """Serves ``collector``'s metrics at ``http://address:port/metrics``
    from a thread of its own."""

    def __init__(self, address: str, port: int, collector: Collector) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        exposition = make_wsgi_app(registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            if environ.get("PATH_INFO") != PATH:
                start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
                return [f"metrics are at {PATH}\n".encode()]
            return exposition(environ, start_response)

        server_class: type[WSGIServer] = _IPv6Server if ":" in address else ThreadingWSGIServer
        self._server = make_server(address, port, app, server_class, handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class _IPv6Server(ThreadingWSGIServer):
    address_family = socket.AF_INET6
