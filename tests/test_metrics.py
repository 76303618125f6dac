"""The server's figures for monitoring: ``server.metrics()`` on a server in
this process, and ``--metrics`` (the Prometheus text format on a listener
of its own) from the command line, for one process and added up over
worker processes. Real clients send known numbers of requests; the figures
must match them."""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from apps.harness import BackgroundLoop, free_port, wait_for
from cliserver import ROOT, command, environment, get, serve_once, serving
from conftest import Certificates, RunningServer
from h3client import h3_connect
from prometheus_client.parser import text_string_to_metric_families

from server_native import HttpRequest
from server_native.runtime.metrics import ServerMetrics

T = TypeVar("T")
TIMEOUT = 10
BODY = b"x" * 1000
#: Of every REQUESTS requests, one in MISSING_EVERY asks for a page that is not there.
REQUESTS = 50
MISSING_EVERY = 5
MISSING = REQUESTS // MISSING_EVERY
#: The shortest request line a client can send: a lower bound of what each request costs.
REQUEST_LINE = len(b"GET / HTTP/1.1\r\n")


async def pages(request: HttpRequest) -> None:
    if request.uri.path == "/missing":
        request.response.status_code = 404
        request.response.write("no such page")
    else:
        request.response.write(BODY)
    await request.response.close()


def path(index: int) -> str:
    return "/missing" if index % MISSING_EVERY == 0 else "/"


def once(read: Callable[[], T], ready: Callable[[T], object], what: str) -> T:
    """What ``read()`` returns once ``ready`` holds of it (bounded)."""
    read_last: list[T] = []

    def check() -> object:
        read_last[:] = [read()]
        return ready(read_last[0])

    wait_for(check, what=what)
    return read_last[0]


def malformed(port: int) -> bytes:
    """A request head with a line that is no header: answered 400 by the server itself."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nno colon here\r\n\r\n")
        return client.recv(4096)


# ---------------------------------------------------------------- server.metrics()


def test_requests_refusals_and_bytes_are_counted(serve: Callable[..., RunningServer]) -> None:
    running = serve(pages, max_body_size=1000)
    with httpx.Client(base_url=running.url(), timeout=TIMEOUT) as client:
        statuses = [client.get(path(index)).status_code for index in range(REQUESTS)]
        too_large = client.post("/", content=b"y" * 2000)
    assert statuses.count(404) == MISSING and statuses.count(200) == REQUESTS - MISSING
    assert too_large.status_code == 413
    assert malformed(running.port).startswith(b"HTTP/1.1 400")
    # Counted as the connection ends, just after its 400 went out.
    figures = once(running.server.metrics, lambda figures: figures["connections_errored"], "the refusal")
    assert figures["requests"] == {"h1": REQUESTS + 1, "h2": 0, "h3": 0}
    assert figures["responses"] == {"1xx": 0, "2xx": REQUESTS - MISSING, "3xx": 0, "4xx": MISSING + 1, "5xx": 0}
    refused = {reason: count for reason, count in figures["refused"].items() if count}
    assert refused == {"bad_request": 1, "body_too_large": 1}
    # One connection for httpx (closed after its 413), one for the malformed request.
    assert figures["connections_handled"] == 2
    assert figures["connections_errored"] == 1
    assert figures["bytes_received"] >= (REQUESTS + 2) * REQUEST_LINE
    assert figures["bytes_sent"] >= (REQUESTS - MISSING) * len(BODY)
    durations = figures["request_duration_seconds"]
    assert durations["count"] == durations["buckets"]["+Inf"] == REQUESTS + 1
    assert list(durations["buckets"].values()) == sorted(durations["buckets"].values()), "cumulative"
    assert durations["sum"] > 0


def test_each_refusal_is_counted_by_its_reason(serve: Callable[..., RunningServer]) -> None:
    async def misframed(request: HttpRequest) -> None:
        request.response.headers.set("content-length", "10")
        request.response.write("short")
        await request.response.close()

    running = serve(misframed, max_header_size=1024, header_read_timeout=0.5)

    def send(data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT) as client:
            client.sendall(data)
            return client.recv(4096)

    # hyper reads heads of up to 8 KiB whatever the limit below that.
    assert send(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n").startswith(
        b"HTTP/1.1 431"
    )
    assert send(b"GET / HTTP/1.1\r\nHost: localhost\r\n") == b"", "closed: no whole head in time"
    assert send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").startswith(b"HTTP/1.1 500")
    assert send(b"GET / HTTP/1.1\r\nHost: one\r\nHost: two\r\n\r\n").startswith(b"HTTP/1.1 400")

    def counted(figures: ServerMetrics) -> bool:
        return figures["connections_errored"] == 2

    figures = once(running.server.metrics, counted, "the refusals")
    assert {reason: count for reason, count in figures["refused"].items() if count} == {
        "headers_too_large": 1, "request_timeout": 1, "response_framing": 1, "bad_request": 1,
    }  # fmt: skip
    assert figures["responses"] == {"1xx": 0, "2xx": 0, "3xx": 0, "4xx": 1, "5xx": 1}


def test_http2_and_http3_requests_are_counted_by_protocol(
    serve: Callable[..., RunningServer], loop_thread: BackgroundLoop, certs: Certificates
) -> None:
    running = serve(pages, certificate_path=certs.cert_path, key_path=certs.key_path, http3=True)
    context = ssl.create_default_context(cafile=str(certs.ca_path))
    with httpx.Client(verify=context, http1=False, http2=True, timeout=TIMEOUT) as client:
        responses = [client.get(running.url(path(index), host="localhost")) for index in range(20)]
    assert {response.http_version for response in responses} == {"HTTP/2"}

    async def over_http3() -> list[int]:
        async with h3_connect("127.0.0.1", running.port, str(certs.ca_path)) as client:
            return [(await client.request("GET", path(index))).status for index in range(10)]

    assert sorted(loop_thread.run(asyncio.wait_for(over_http3(), 60), timeout=65)) == [200] * 8 + [404] * 2
    figures = running.server.metrics()
    assert figures["requests"] == {"h1": 0, "h2": 20, "h3": 10}
    assert figures["responses"]["4xx"] == 4 + 2
    # A QUIC connection's bytes are added when it ends, soon after the client closes it.
    wait_for(lambda: running.server.metrics()["bytes_sent"] >= (16 + 8) * len(BODY), what="HTTP/3 bytes")


# ---------------------------------------------------------------- --metrics


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample at /metrics, by name and labels."""
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def requests_answered(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
    return sum(value for (name, _), value in samples.items() if name == "server_native_requests_total")


@contextmanager
def metrics_cli(app_dir: Path, *args: str) -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    """The command line serving cliapp with --metrics: its process, the
    app's port and the metrics port, once the readiness request (one GET /)
    is counted."""
    metrics_port = free_port()
    with serving(app_dir, "cliapp:app", "--metrics", "--metrics-port", str(metrics_port), *args) as (process, port):
        wait_for(lambda: requests_answered(scrape(metrics_port)) == 1, what="the readiness request counted")
        yield process, port, metrics_port


def load(port: int) -> list[str]:
    """REQUESTS requests, each on a connection of its own (so that the
    kernel spreads them over the workers): the answers' first words (the
    pid that answered)."""
    answers = []
    for index in range(REQUESTS):
        status, body = get(port, path(index), headers={"Connection": "close"})
        assert status == (404 if path(index) == "/missing" else 200)
        answers.append(body.split()[0])
    return answers


def check_counts(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> None:
    """What ``load`` and one malformed request leave, after the readiness request."""
    assert samples[("server_native_requests_total", (("protocol", "h1"),))] == REQUESTS + 1
    by_class = {
        labels[0][1]: value for (name, labels), value in samples.items() if name == "server_native_responses_total"
    }
    assert by_class == {"1xx": 0, "2xx": REQUESTS - MISSING + 1, "3xx": 0, "4xx": MISSING, "5xx": 0}
    assert samples[("server_native_refused_total", (("reason", "bad_request"),))] == 1
    assert samples[("server_native_connections_handled_total", ())] == REQUESTS + 2
    assert samples[("server_native_request_duration_seconds_count", ())] == REQUESTS + 1
    assert samples[("server_native_request_duration_seconds_bucket", (("le", "+Inf"),))] == REQUESTS + 1
    assert samples[("server_native_received_bytes_total", ())] >= (REQUESTS + 2) * REQUEST_LINE
    assert samples[("server_native_sent_bytes_total", ())] >= REQUESTS * len(b"HTTP/1.1 200 OK\r\n")


def test_one_process_serves_its_metrics_while_it_serves_requests(app_dir: Path) -> None:
    with metrics_cli(app_dir) as (_, port, metrics_port):
        seen: list[float] = []
        loading = threading.Thread(target=load, args=(port,))
        loading.start()
        while True:
            seen.append(requests_answered(scrape(metrics_port)))
            if not loading.is_alive():
                break
        loading.join()
        assert malformed(port).startswith(b"HTTP/1.1 400")
        assert seen == sorted(seen), "counters never go back"
        check_counts(scrape(metrics_port))
        assert httpx.get(f"http://127.0.0.1:{metrics_port}/other", timeout=TIMEOUT).status_code == 404


def test_workers_figures_are_added_up_by_the_supervisor(app_dir: Path) -> None:
    with metrics_cli(app_dir, "--workers", "2") as (_, port, metrics_port):
        answered_by = set(load(port))
        assert malformed(port).startswith(b"HTTP/1.1 400")
        assert len(answered_by) == 2, "both workers served"
        # Workers send their figures every second.
        samples = once(
            lambda: scrape(metrics_port),
            lambda samples: requests_answered(samples) == REQUESTS + 1 and refused(samples),
            "every worker's figures",
        )
        check_counts(samples)
        assert samples[("server_native_worker_spawns_total", ())] == 2
        assert samples[("server_native_worker_respawns_total", ())] == 0
        resident = {
            labels: value
            for (name, labels), value in samples.items()
            if name == "server_native_worker_resident_memory_bytes"
        }
        assert {dict(labels)["pid"] for labels in resident} == answered_by
        assert all(value > 1 << 20 for value in resident.values())


def test_counts_outlive_the_workers_that_made_them(app_dir: Path) -> None:
    """SIGHUP replaces every worker: what the old ones counted, up to their
    last request, stays in the totals."""
    with metrics_cli(app_dir, "--workers", "2") as (supervisor, port, metrics_port):
        old_workers = set(load(port))
        supervisor.send_signal(signal.SIGHUP)
        samples = once(
            lambda: scrape(metrics_port),
            lambda samples: (
                samples[("server_native_worker_respawns_total", ())] == 2 and not old_workers & worker_pids(samples)
            ),
            "the old workers replaced and gone",
        )
        assert requests_answered(samples) == REQUESTS + 1
        assert samples[("server_native_connections_handled_total", ())] == REQUESTS + 1
        assert samples[("server_native_connections_open", ())] == 0
        assert samples[("server_native_worker_spawns_total", ())] == 4
        load(port)
        samples = once(
            lambda: scrape(metrics_port), lambda s: requests_answered(s) == 2 * REQUESTS + 1, "the new workers' figures"
        )
        assert samples[("server_native_responses_total", (("status_class", "4xx"),))] == 2 * MISSING


def worker_pids(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> set[str]:
    return {dict(labels)["pid"] for (name, labels) in samples if name == "server_native_worker_resident_memory_bytes"}


def refused(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
    return samples.get(("server_native_refused_total", (("reason", "bad_request"),)), 0)


def test_help_and_readme_document_the_metrics_options() -> None:
    result = subprocess.run(command("serve", "--help"), env=environment(), capture_output=True, text=True, timeout=60)
    readme = (ROOT / "README.md").read_text()
    for option in ("--metrics", "--metrics-address", "--metrics-port"):
        assert option in result.stdout
        assert f"`{option}" in readme
    assert "default 9090" in result.stdout and "default 127.0.0.1" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--metrics-port", "9100"], "--metrics-port needs --metrics"),
        (["--metrics-address", "::1"], "--metrics-address needs --metrics"),
        (["--metrics", "--metrics-port", "70000"], "a port is a number from 0 to 65535"),
    ],
)
def test_metrics_options_are_checked(app_dir: Path, args: list[str], message: str) -> None:
    finished = serve_once(app_dir, *args)
    assert finished.returncode == 2
    assert message in finished.stderr


def test_a_metrics_port_in_use_is_an_error(app_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics_port = taken.getsockname()[1]
        finished = subprocess.run(
            command("serve", "cliapp:app", "--port", str(free_port()), "--metrics", "--metrics-port", str(metrics_port)),
            cwd=app_dir, env=environment(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert finished.returncode == 1
    assert f"--metrics: cannot listen on 127.0.0.1 port {metrics_port}" in finished.stderr
