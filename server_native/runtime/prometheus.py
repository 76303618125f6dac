"""The server's figures (``runtime/metrics.py``) as Prometheus metrics,
named ``server_native_*``: for ``--metrics``, and for an application that
serves them on a route of its own (examples/metrics_route.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["FiguresCollector", "WorkerFigures"]

PREFIX = "server_native"


class WorkerFigures:
    """The supervisor's figures of its own: workers started, and each
    running worker's resident memory."""

    def __init__(self, spawns: int, respawns: int, resident: list[tuple[int, int, int]]) -> None:
        self.spawns = spawns
        self.respawns = respawns
        #: (slot, pid, bytes) for each running worker.
        self.resident = resident


class FiguresCollector(Collector):
    """Prometheus metrics from ``figures()`` (the server's figures, summed
    over servers and workers) and, under a supervisor, ``workers()``."""

    def __init__(
        self,
        figures: Callable[[], Mapping[str, Any]],
        workers: Callable[[], WorkerFigures] | None = None,
    ) -> None:
        self._figures = figures
        self._workers = workers

    def collect(self) -> Iterator[Metric]:
        yield from server_families(self._figures())
        if self._workers is not None:
            yield from worker_families(self._workers())


def server_families(figures: Mapping[str, Any]) -> Iterator[Metric]:
    def count(key: str) -> float:
        value = figures.get(key, 0)
        return float(value) if isinstance(value, (int, float)) else 0.0

    def labelled(family: CounterMetricFamily, key: str) -> CounterMetricFamily:
        for label, value in (figures.get(key) or {}).items():
            family.add_metric([label], value)
        return family

    yield GaugeMetricFamily(f"{PREFIX}_connections_open", "Connections open now.", value=count("connections_open"))
    yield GaugeMetricFamily(
        f"{PREFIX}_connections_active", "Connections with a request in flight now.", value=count("connections_active")
    )
    yield CounterMetricFamily(
        f"{PREFIX}_connections_handled", "Connections accepted.", value=count("connections_handled")
    )
    yield CounterMetricFamily(
        f"{PREFIX}_connections_errored",
        "Connections ended by an error (TLS handshake, malformed request, slow head, HTTP/2 protocol error).",
        value=count("connections_errored"),
    )
    yield labelled(
        CounterMetricFamily(f"{PREFIX}_requests", "Requests answered, by protocol.", labels=["protocol"]), "requests"
    )
    yield labelled(
        CounterMetricFamily(f"{PREFIX}_responses", "Responses, by status class.", labels=["status_class"]), "responses"
    )
    yield labelled(
        CounterMetricFamily(
            f"{PREFIX}_refused",
            "Requests the server answered itself, and responses it refused for their framing, by reason.",
            labels=["reason"],
        ),
        "refused",
    )
    yield CounterMetricFamily(
        f"{PREFIX}_received_bytes", "Bytes received, TLS included.", value=count("bytes_received")
    )
    yield CounterMetricFamily(f"{PREFIX}_sent_bytes", "Bytes sent, TLS included.", value=count("bytes_sent"))
    durations = figures.get("request_duration_seconds")
    if durations:
        yield HistogramMetricFamily(
            f"{PREFIX}_request_duration_seconds",
            "Time from a request's head to its response's.",
            buckets=list(durations["buckets"].items()),
            sum_value=durations["sum"],
        )
    yield GaugeMetricFamily(
        f"{PREFIX}_event_queue_depth", "Events waiting for the Python side.", value=count("event_queue_depth")
    )


def worker_families(workers: WorkerFigures) -> Iterator[Metric]:
    yield CounterMetricFamily(f"{PREFIX}_worker_spawns", "Worker processes started.", value=workers.spawns)
    yield CounterMetricFamily(
        f"{PREFIX}_worker_respawns", "Worker processes started to replace another.", value=workers.respawns
    )
    resident = GaugeMetricFamily(
        f"{PREFIX}_worker_resident_memory_bytes", "Each worker's resident memory.", labels=["slot", "pid"]
    )
    for slot, pid, size in workers.resident:
        resident.add_metric([str(slot), str(pid)], size)
    yield resident
