#!/usr/bin/env python3
"""Server memory per idle keep-alive connection, against uvicorn and Granian.

For every case and protocol: start the server, read its memory, open N connections from
a client process of its own (each sends one `GET /`, reads the whole response, then
stays open and silent), read the memory again, and report the growth per connection.
Then the client checks that the server closed none of them, closes them all, and the
memory is read once more. Memory is the server's process tree (Granian's supervisor and
worker): VmRSS from /proc/PID/status and Private_Clean + Private_Dirty from
/proc/PID/smaps_rollup. See benchmark/README.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import re
import resource
import select
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from framework_transport_benchmark import (  # noqa: E402
    APPS,
    HOST,
    PAYLOADS,
    BenchError,
    cpu_model,
    free_ports,
    log_tail,
    machine,
    process_tree,
    stop,
)  # fmt: skip

PROTOCOLS = {
    "h1": "HTTP/1.1 over plaintext",
    "h1-tls": "HTTP/1.1 over TLS (ALPN http/1.1)",
    "h2c": "HTTP/2 over plaintext, prior knowledge",
    "h2-tls": "HTTP/2 over TLS (ALPN h2)",
}
TLS_PROTOCOLS = ("h1-tls", "h2-tls")
# The most server_native may use per idle connection (KiB of RSS), by protocol.
# Over TLS, rustls's session (its keys, state and 4 KiB record buffer, which it
# keeps between reads) comes on top: there the bound is the best peer's figure
# in the same run.
TARGETS_KIB = {"h1": 8.0, "h2c": 16.0}
KEEP_ALIVE_S = 3600  # no server may close a connection for idleness during a run
MAX_CONNECTIONS = 65536  # more than a run opens: no server may refuse one
STARTUP_TIMEOUT_S = 20.0
CONNECT_TIMEOUT_S = 10.0
CLIENT_THREADS = 8


# --- the client: opens the connections in a process of its own ---------------------


@dataclass(frozen=True)
class Target:
    port: int
    ca: str | None  # the CA to trust, for the TLS protocols


def tls_context(ca: str, alpn: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca)
    context.set_alpn_protocols([alpn])
    return context


def connect(target: Target, protocol: str, context: ssl.SSLContext | None) -> socket.socket:
    sock = socket.create_connection((HOST, target.port), timeout=CONNECT_TIMEOUT_S)
    if context is None:
        return sock
    tls = context.wrap_socket(sock, server_hostname="localhost")
    wanted = "h2" if protocol == "h2-tls" else "http/1.1"
    # A server that negotiates no ALPN speaks HTTP/1.1.
    if (tls.selected_alpn_protocol() or "http/1.1") != wanted:
        raise BenchError(f"ALPN chose {tls.selected_alpn_protocol()!r}, not {wanted}")
    return tls


def http1_request(sock: socket.socket) -> None:
    """One keep-alive `GET /`, its whole response read off the socket."""
    sock.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    response = http.client.HTTPResponse(sock)
    response.begin()
    body = response.read()
    if response.status != 200 or body != PAYLOADS.HELLO or response.will_close:
        raise BenchError(f"HTTP/1.1 answer: {response.status}, {body[:40]!r}, close={response.will_close}")


def http2_request(sock: socket.socket) -> None:
    """The HTTP/2 preface and settings, one `GET /` on stream 1, read until it ends;
    the server's settings are acknowledged."""
    import h2.config
    import h2.connection
    import h2.events

    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()
    headers = [(":method", "GET"), (":scheme", "https" if isinstance(sock, ssl.SSLSocket) else "http"),
               (":authority", HOST), (":path", "/")]  # fmt: skip
    connection.send_headers(1, headers, end_stream=True)
    sock.sendall(connection.data_to_send())
    status, body, ended = None, b"", False
    while not ended:
        data = sock.recv(65536)
        if not data:
            raise BenchError("HTTP/2: the server closed the connection")
        for event in connection.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                status = dict(event.headers).get(b":status")
            elif isinstance(event, h2.events.DataReceived):
                body += event.data
                connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                ended = True
        sock.sendall(connection.data_to_send())
    if status != b"200" or body != PAYLOADS.HELLO:
        raise BenchError(f"HTTP/2 answer: {status!r}, {body[:40]!r}")


def open_idle(target: Target, protocol: str, context: ssl.SSLContext | None) -> socket.socket:
    """A connection that made one request and now waits, silent."""
    sock = connect(target, protocol, context)
    try:
        (http2_request if protocol.startswith("h2") else http1_request)(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def open_many(target: Target, protocol: str, count: int, threads: int = CLIENT_THREADS) -> list[socket.socket]:
    """`count` idle connections; the first that fails stops the rest."""
    alpn = "h2" if protocol == "h2-tls" else "http/1.1"
    context = tls_context(target.ca, alpn) if protocol in TLS_PROTOCOLS and target.ca else None
    opened: list[socket.socket] = []
    error: BaseException | None = None
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(open_idle, target, protocol, context) for _ in range(count)]
        for future in concurrent.futures.as_completed(futures):
            try:
                opened.append(future.result())
            except concurrent.futures.CancelledError:
                pass
            except (OSError, BenchError, http.client.HTTPException) as failure:
                error = error or failure
                pool.shutdown(wait=False, cancel_futures=True)
    if error is not None:
        for sock in opened:
            sock.close()
        raise BenchError(f"{len(opened)} of {count} connections opened before one failed: {error!r}")
    return opened


def closed_by_peer(socks: list[socket.socket]) -> int:
    """How many of `socks` the server has hung up (or reset)."""
    poller = select.poll()
    for sock in socks:
        poller.register(sock.fileno(), select.POLLRDHUP)
    hung_up = select.POLLRDHUP | select.POLLHUP | select.POLLERR
    return sum(1 for _, events in poller.poll(0) if events & hung_up)


def raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def client_main(args: argparse.Namespace) -> int:
    """The client process: `open N SECONDS` once the connections are idle; on a line
    from stdin, `closed K`, then close them all and exit at end of input."""
    raise_fd_limit()
    started = time.monotonic()
    try:
        socks = open_many(Target(args.port, args.ca), args.protocol, args.connections)
    except BenchError as error:
        print(f"error {error}", flush=True)
        return 1
    print(f"open {len(socks)} {time.monotonic() - started:.1f}", flush=True)
    sys.stdin.readline()
    print(f"closed {closed_by_peer(socks)}", flush=True)
    sys.stdin.read()
    for sock in socks:
        sock.close()
    return 0


# --- the servers -------------------------------------------------------------------


@dataclass(frozen=True)
class Tls:
    certfile: str
    keyfile: str  # PKCS#8, which Granian requires
    ca: str


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    command: Callable[[int, Tls | None], list[str]]  # (port, TLS files or None) -> argv
    protocols: tuple[str, ...] = tuple(PROTOCOLS)


def native_app(script: str) -> Callable[[int, Tls | None], list[str]]:
    def command(port: int, tls: Tls | None) -> list[str]:
        files = ["--certfile", tls.certfile, "--keyfile", tls.keyfile] if tls else []
        return [sys.executable, str(APPS / script), "--port", str(port),
                "--keep-alive-timeout", str(KEEP_ALIVE_S), *files]  # fmt: skip

    return command


def native_asgi(port: int, tls: Tls | None) -> list[str]:
    files = ["--ssl-certfile", tls.certfile, "--ssl-keyfile", tls.keyfile] if tls else []
    return [
        sys.executable, "-m", "server_native", "serve", "asgi_hello:app", "--app-dir", str(APPS),
        "--interface", "asgi", "--host", HOST, "--port", str(port), "--no-http3",
        "--log-level", "warning", "--keep-alive-timeout", str(KEEP_ALIVE_S), *files,
    ]  # fmt: skip


def uvicorn_asgi(port: int, tls: Tls | None) -> list[str]:
    files = ["--ssl-certfile", tls.certfile, "--ssl-keyfile", tls.keyfile] if tls else []
    return [
        sys.executable, "-m", "uvicorn", "asgi_hello:app", "--app-dir", str(APPS),
        "--host", HOST, "--port", str(port), "--workers", "1", "--loop", "uvloop",
        "--http", "httptools", "--no-access-log", "--log-level", "warning",
        "--timeout-keep-alive", str(KEEP_ALIVE_S), *files,
    ]  # fmt: skip


def granian_asgi(port: int, tls: Tls | None) -> list[str]:
    # Granian's HTTP/1 header read timeout also runs while a connection waits for its
    # next request, and it allows at most 60 s: the runs must be shorter. Its
    # backpressure (by default the backlog, 1024) also caps the connections it accepts.
    files = ["--ssl-certificate", tls.certfile, "--ssl-keyfile", tls.keyfile] if tls else []
    return [
        sys.executable, "-m", "granian", "--interface", "asgi", "--host", HOST,
        "--port", str(port), "--workers", "1", "--runtime-threads", "1", "--loop", "uvloop",
        "--no-access-log", "--log-level", "warning", "--http1-header-read-timeout", "60000",
        "--backpressure", str(MAX_CONNECTIONS), "--working-dir", str(APPS), *files, "asgi_hello:app",
    ]  # fmt: skip


CASES = (
    Case("native_asgi", "server-native serve, raw ASGI app (apps/asgi_hello.py)", native_asgi),
    Case("native_direct_async", "server_native direct API, async handler (apps/server_native_direct.py)",
         native_app("server_native_direct.py")),
    Case("native_rust_only", "server_native native_response, 1 I/O thread (apps/server_native_rust_only.py)",
         native_app("server_native_rust_only.py")),
    Case("uvicorn_asgi", "uvicorn + httptools + uvloop, raw ASGI app, 1 worker", uvicorn_asgi,
         protocols=("h1", "h1-tls")),
    Case("granian_asgi", "Granian ASGI + uvloop, raw ASGI app, 1 worker, 1 runtime thread",
         granian_asgi),
)  # fmt: skip
CASES_BY_NAME = {case.name: case for case in CASES}


def make_tls(directory: Path) -> Tls:
    import trustme
    from cryptography.hazmat.primitives import serialization

    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", HOST)
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    pkcs8 = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    paths = {name: directory / f"{name}.pem" for name in ("cert", "key", "ca")}
    paths["cert"].write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    paths["key"].write_bytes(pkcs8)
    ca.cert_pem.write_to_path(str(paths["ca"]))
    return Tls(str(paths["cert"]), str(paths["key"]), str(paths["ca"]))


# --- memory --------------------------------------------------------------------------


def status_kib(pid: int, field: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def private_kib(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    return sum(int(kib) for kib in re.findall(r"^Private_(?:Clean|Dirty):\s+(\d+) kB", text, re.MULTILINE))


@dataclass(frozen=True)
class Memory:
    rss_kib: int
    private_kib: int


def memory(root: int) -> Memory:
    tree = process_tree(root)
    return Memory(sum(status_kib(pid, "VmRSS") for pid in tree), sum(private_kib(pid) for pid in tree))


# --- one measurement -----------------------------------------------------------------


@dataclass
class Run:
    case: str
    protocol: str
    connections: int
    iteration: int
    load_average: float
    before: Memory | None = None
    idle: Memory | None = None
    after_close: Memory | None = None
    open_s: float | None = None
    closed_early: int | None = None
    error: str | None = None

    def per_connection_kib(self, which: str) -> float | None:
        if self.before is None or self.idle is None or self.error:
            return None
        grown = getattr(self.idle, which) - getattr(self.before, which)
        return grown / self.connections


def wait_until_ready(process: subprocess.Popen[bytes], target: Target, protocol: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"server exited with code {process.returncode}: {log_tail(log)}")
        try:
            open_many(target, protocol, 1, threads=1)[0].close()
            return
        except BenchError:
            time.sleep(0.2)
    raise BenchError(f"no answer on {HOST}:{target.port} within {STARTUP_TIMEOUT_S:.0f} s: {log_tail(log)}")


def client_command(target: Target, protocol: str, connections: int) -> list[str]:
    ca = ["--ca", target.ca] if target.ca else []
    return [sys.executable, __file__, "client", "--port", str(target.port), "--protocol", protocol,
            "--connections", str(connections), *ca]  # fmt: skip


def read_line(process: subprocess.Popen[str], deadline: float) -> str:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))
    if not ready:
        raise BenchError("the client took too long")
    line = process.stdout.readline().strip()
    if not line or line.startswith("error"):
        raise BenchError(f"client: {line or 'exited'}")
    return line


def measure_idle(run: Run, server: subprocess.Popen[bytes], target: Target, args: argparse.Namespace) -> None:
    run.before = memory(server.pid)
    client = subprocess.Popen(
        client_command(target, run.protocol, run.connections),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert client.stdin is not None
    try:
        deadline = time.monotonic() + args.time_limit
        _, _count, seconds = read_line(client, deadline).split()
        run.open_s = float(seconds)
        time.sleep(args.settle)
        run.idle = memory(server.pid)
        client.stdin.write("check\n")
        client.stdin.flush()
        run.closed_early = int(read_line(client, deadline).split()[1])
        client.stdin.close()
        client.wait(60)
        time.sleep(args.settle)
        run.after_close = memory(server.pid)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()


def measure(case: Case, protocol: str, iteration: int, tls: Tls, args: argparse.Namespace, scratch: Path) -> Run:
    run = Run(case.name, protocol, args.connections, iteration, os.getloadavg()[0])
    (port,) = free_ports(1)
    secure = protocol in TLS_PROTOCOLS
    target = Target(port, tls.ca if secure else None)
    log = scratch / f"{case.name}-{protocol}.log"
    with log.open("wb") as output:
        server = subprocess.Popen(
            case.command(port, tls if secure else None),
            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            wait_until_ready(server, target, protocol, log)
            time.sleep(args.settle)
            measure_idle(run, server, target, args)
            if server.poll() is not None:
                raise BenchError(f"server exited with code {server.returncode}: {log_tail(log)}")
        except BenchError as error:
            run.error = str(error)
        finally:
            stop(server)
    return run


def describe(run: Run) -> str:
    head = f"{run.case} {run.protocol} #{run.iteration} (load {run.load_average:.2f})"
    if run.error:
        return f"{head}: FAILED {run.error}"
    assert run.before and run.idle and run.after_close
    return (
        f"{head}: {run.connections} idle in {run.open_s:.1f} s, RSS {run.before.rss_kib / 1024:.1f} ->"
        f" {run.idle.rss_kib / 1024:.1f} -> {run.after_close.rss_kib / 1024:.1f} MiB after close,"
        f" {run.per_connection_kib('rss_kib'):.1f} KiB/conn RSS,"
        f" {run.per_connection_kib('private_kib'):.1f} KiB/conn private, {run.closed_early} closed early"
    )


# --- the report ----------------------------------------------------------------------


def median(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown(runs: list[Run], cases: list[Case], protocols: list[str]) -> str:
    lines = [
        "| case | protocol | connections | RSS before MiB | RSS idle MiB | KiB/conn RSS |"
        " KiB/conn private | RSS after close MiB | closed early | runs ok |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for protocol in protocols:
        for case in cases:
            mine = [run for run in runs if run.case == case.name and run.protocol == protocol]
            if not mine:
                continue
            ok = [run for run in mine if not run.error]
            lines.append(
                f"| {case.name} | {protocol} | {mine[0].connections:,}"
                f" | {cell(median([r.before.rss_kib / 1024 for r in ok if r.before]))}"
                f" | {cell(median([r.idle.rss_kib / 1024 for r in ok if r.idle]))}"
                f" | {cell(median([r.per_connection_kib('rss_kib') for r in ok]))}"
                f" | {cell(median([r.per_connection_kib('private_kib') for r in ok]))}"
                f" | {cell(median([r.after_close.rss_kib / 1024 for r in ok if r.after_close]))}"
                f" | {max((r.closed_early or 0 for r in ok), default=0)} | {len(ok)}/{len(mine)} |"
            )
    return "\n".join(lines)


def targets(runs: list[Run]) -> list[str]:
    def per_connection(case: str, protocol: str) -> float | None:
        return median([r.per_connection_kib("rss_kib") for r in runs
                       if r.case == case and r.protocol == protocol and not r.error])  # fmt: skip

    cases = sorted({run.case for run in runs})
    lines = []
    for protocol in PROTOCOLS:
        if protocol in TARGETS_KIB:
            limit, named = TARGETS_KIB[protocol], f"{TARGETS_KIB[protocol]:.0f}"
        else:
            measured = {case: value for case in cases if not case.startswith("native")
                        if (value := per_connection(case, protocol)) is not None}  # fmt: skip
            if not measured:
                continue
            best = min(measured, key=measured.__getitem__)
            limit, named = measured[best], f"{best}'s {measured[best]:.1f}"
        for case in (case for case in cases if case.startswith("native")):
            value = per_connection(case, protocol)
            if value is not None:
                verdict = "PASS" if value <= limit else "FAIL"
                lines.append(f"{case} {protocol}: {value:.1f} KiB/conn RSS, target <= {named}: {verdict}")
    return lines


# --- command line --------------------------------------------------------------------


def comma_list(value: str, known: list[str], what: str) -> list[str]:
    names = known if value == "all" else [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Cases: " + "; ".join(f"{c.name}: {c.description}" for c in CASES)
        + ". Protocols: " + "; ".join(f"{p}: {d}" for p, d in PROTOCOLS.items()) + ".",
    )  # fmt: skip
    commands = parser.add_subparsers(dest="command")
    client = commands.add_parser("client", help="(internal) the client process")
    client.add_argument("--port", type=int, required=True)
    client.add_argument("--protocol", choices=PROTOCOLS, required=True)
    client.add_argument("--connections", type=int, required=True)
    client.add_argument("--ca")
    parser.add_argument(
        "--framework", default="all", type=lambda v: comma_list(v, list(CASES_BY_NAME), "case"),
        help="comma list of cases or 'all': " + ", ".join(CASES_BY_NAME) + " (default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--protocol", default="all", type=lambda v: comma_list(v, list(PROTOCOLS), "protocol"),
        help="comma list or 'all': " + ", ".join(PROTOCOLS) + " (default: all)",
    )  # fmt: skip
    parser.add_argument("--connections", type=int, default=10_000, help="idle connections (10000)")
    parser.add_argument("--iterations", type=int, default=1, help="interleaved rounds (1)")
    parser.add_argument(
        "--settle", type=float, default=2.0,
        help="seconds to wait before each memory reading (2)",
    )  # fmt: skip
    parser.add_argument(
        "--time-limit", type=float, default=300.0,
        help="seconds the client may take to open the connections (300)",
    )  # fmt: skip
    parser.add_argument("--markdown", action="store_true", help="print the table in markdown")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write every run as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "client":
        return client_main(args)
    # SIGTERM ends the run through the `finally` blocks that stop the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    raise_fd_limit()
    needed = args.connections + 100
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < needed:
        sys.exit(f"{args.connections} connections need {needed} file descriptors per process;"
                 f" the hard limit is {resource.getrlimit(resource.RLIMIT_NOFILE)[1]}")  # fmt: skip
    cases = [CASES_BY_NAME[name] for name in args.framework]
    runs = []
    with tempfile.TemporaryDirectory(prefix="idle-connections-") as directory:
        scratch = Path(directory)
        tls = make_tls(scratch)
        for iteration in range(1, args.iterations + 1):
            for protocol in args.protocol:
                for case in cases:
                    if protocol not in case.protocols:
                        continue
                    run = measure(case, protocol, iteration, tls, args, scratch)
                    print(describe(run), file=sys.stderr, flush=True)
                    runs.append(run)
    if args.markdown:
        print(markdown(runs, cases, args.protocol))
        print()
    for line in targets(runs):
        print(line)
    if args.json:
        payload = {"machine": machine() | {"cpu": cpu_model()}, "settings": vars(args) | {"json": str(args.json)},
                   "runs": [asdict(run) | {"kib_per_connection_rss": run.per_connection_kib("rss_kib"),
                                           "kib_per_connection_private": run.per_connection_kib("private_kib")}
                            for run in runs]}  # fmt: skip
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return 0 if any(not run.error for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
