"""A server's figures for monitoring (``server.metrics()``), counted on the
native side as requests and bytes go by, and how figures add up over
servers and worker processes.

- ``connections_open``, ``connections_active`` (with a request in flight):
  now; ``connections_handled``, ``connections_errored`` (a failed TLS
  handshake, a malformed request, a head past ``header_read_timeout``, an
  HTTP/2 protocol error): so far.
- ``requests``: answered, by protocol (``h1``, ``h2``, ``h3``);
  ``responses``: by status class (``1xx`` ... ``5xx``).
- ``refused``: requests the server answered itself, by reason
  (``bad_request`` 400, ``request_timeout`` 408, ``body_too_large`` 413,
  ``headers_too_large`` 431, ``upgrade_required`` 426) and the
  application's responses that disagreed with their ``Content-Length``
  (``response_framing``).
- ``bytes_received``, ``bytes_sent``: on the wire, TLS included (HTTP/3: a
  connection's UDP bytes, added when it ends).
- ``request_duration_seconds``: from a request's head to its response's,
  in fixed buckets (cumulative, keyed by upper bound), with ``count`` and
  ``sum``.
- ``event_queue_depth``: events waiting for the Python side now.

``runtime/prometheus.py`` makes Prometheus metrics of them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypedDict, cast

__all__ = ["GAUGES", "RequestDurations", "ServerMetrics", "add_figures", "total"]


class RequestDurations(TypedDict):
    buckets: dict[str, int]
    count: int
    sum: float


class ServerMetrics(TypedDict):
    connections_open: int
    connections_active: int
    connections_handled: int
    connections_errored: int
    requests: dict[str, int]
    responses: dict[str, int]
    refused: dict[str, int]
    bytes_received: int
    bytes_sent: int
    request_duration_seconds: RequestDurations
    event_queue_depth: int


#: Figures of the moment; the others only grow.
GAUGES = frozenset({"connections_open", "connections_active", "event_queue_depth"})


def add_figures(left: Mapping[str, Any], right: Mapping[str, Any], *, counters_only: bool = False) -> dict[str, Any]:
    """The sum of two sets of figures, key by key and nested; a key only one
    has is kept. ``counters_only`` leaves out ``right``'s gauges (the last
    figures of a worker that exited: its connections are gone, its counts
    stay)."""
    summed: dict[str, Any] = dict(left)
    for key, value in right.items():
        if counters_only and key in GAUGES:
            continue
        mine = summed.get(key)
        if isinstance(value, Mapping):
            summed[key] = add_figures(mine if isinstance(mine, Mapping) else {}, value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            summed[key] = (mine if isinstance(mine, (int, float)) else 0) + value
    return summed


def total(figures: Iterable[Mapping[str, Any]]) -> ServerMetrics:
    """Several servers' figures, added up."""
    summed: dict[str, Any] = {}
    for one in figures:
        summed = add_figures(summed, one)
    return cast(ServerMetrics, summed)
