#!/usr/bin/env python3
"""Side-by-side benchmark of server_native's APIs and transports against its peers.

Every case is a server started as a subprocess on a free port of 127.0.0.1 that serves
every workload by path (`GET /` hello, `GET /10k`, `POST /echo`), over HTTP/1.1 and
prior-knowledge h2c on the same port; the static-file cases serve a 1 KiB and a 1 MiB
file under `/static/` (the `static1k` and `static1m` workloads). Each (protocol, workload) is checked for the
right answer, warmed up, then measured with a native load generator: wrk for HTTP/1.1,
h2load for h2c. Iterations are interleaved (iteration 1 of every case, then iteration
2 of every case, ...); the report gives, per pin mode, protocol and workload, medians of
req/s, p50, p99 and the server's RSS, ratios against uvicorn and Granian RSGI, and the
project's targets with pass/fail. See benchmark/README.md for the setup and the cases.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent
APPS = BENCH / "apps"
ECHO_LUA = BENCH / "wrk" / "echo256.lua"
HOST = "127.0.0.1"
BASELINES = ("uvicorn_asgi", "granian_rsgi")  # the ratio columns of every table
STARTUP_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
CLIENT_GRACE_S = 30
SERVER_CPU = 0
CLIENT_CPU = 1
SOAK_CHECKPOINTS = (50_000, 500_000)
SOAK_MAX_CHUNK_S = 10
SOAK_TIME_LIMIT_S = 900.0
BUSY_LOAD = 0.5
UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


class BenchError(Exception):
    """A case could not be started or measured; the message says why."""


def load_payloads() -> ModuleType:
    """apps/_payloads.py: the bodies every app serves, shared with the apps."""
    spec = importlib.util.spec_from_file_location("_payloads", APPS / "_payloads.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PAYLOADS = load_payloads()


# --- workloads and protocols ---------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    method: str
    path: str
    request_body: bytes | None
    expected: bytes  # the response body every case must give
    description: str


WORKLOADS = (
    Workload("hello", "GET", PAYLOADS.HELLO_PATH, None, PAYLOADS.HELLO,
             f"GET {PAYLOADS.HELLO_PATH}, {len(PAYLOADS.HELLO)}-byte body"),
    Workload("get10k", "GET", PAYLOADS.TEN_K_PATH, None, PAYLOADS.TEN_K,
             f"GET {PAYLOADS.TEN_K_PATH}, {len(PAYLOADS.TEN_K) // 1024} KiB body"),
    Workload("echo256", "POST", PAYLOADS.ECHO_PATH, PAYLOADS.ECHO_REQUEST, PAYLOADS.ECHO_REQUEST,
             f"POST {PAYLOADS.ECHO_PATH}, {len(PAYLOADS.ECHO_REQUEST)}-byte body echoed back"),
    Workload("static1k", "GET", PAYLOADS.STATIC_1K_PATH, None, PAYLOADS.STATIC_1K,
             f"GET {PAYLOADS.STATIC_1K_PATH}, a 1 KiB file (static-file cases)"),
    Workload("static1m", "GET", PAYLOADS.STATIC_1M_PATH, None, PAYLOADS.STATIC_1M,
             f"GET {PAYLOADS.STATIC_1M_PATH}, a 1 MiB file (static-file cases)"),
)  # fmt: skip
WORKLOADS_BY_NAME = {workload.name: workload for workload in WORKLOADS}
STATIC_WORKLOADS = ("static1k", "static1m")
#: What runs unless --workload says otherwise: the static files only on request.
DEFAULT_WORKLOADS = [workload for workload in WORKLOADS if workload.name not in STATIC_WORKLOADS]

PROTOCOLS = {
    "h1": "HTTP/1.1, wrk",
    "h2c": "HTTP/2 prior knowledge over plaintext, h2load",
}


# --- the cases -----------------------------------------------------------------------


@dataclass(frozen=True)
class Ports:
    h1: int
    h2c: int  # the same as h1 unless the case serves h2c on a port of its own


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    command: Callable[[Ports, Path], list[str]]  # (ports, scratch dir) -> argv
    modules: tuple[str, ...] = ()  # Python modules the case needs; missing -> skipped
    needs_nginx: bool = False
    h2c_own_port: bool = False
    # (protocol or workload name, why this case does not run it)
    not_run: tuple[tuple[str, str], ...] = ()
    # serves the files of static_files() under /static/: the static workloads
    static_files: bool = False

    def why_not(self, protocol: str, workload: str) -> str | None:
        reasons = dict(self.not_run)
        if workload in STATIC_WORKLOADS and not self.static_files:
            return "serves no static files"
        return reasons.get(protocol) or reasons.get(workload)


def static_files(scratch: Path) -> Path:
    """The directory the static-file cases serve under /static/, with both files in it."""
    directory = scratch / PAYLOADS.STATIC_DIR
    directory.mkdir(exist_ok=True)
    (directory / Path(PAYLOADS.STATIC_1K_PATH).name).write_bytes(PAYLOADS.STATIC_1K)
    (directory / Path(PAYLOADS.STATIC_1M_PATH).name).write_bytes(PAYLOADS.STATIC_1M)
    return directory


def python_app(script: str, *flags: str) -> Callable[[Ports, Path], list[str]]:
    """An app of apps/ that runs its own server: `python apps/<script> --port N`."""

    def command(ports: Ports, scratch: Path) -> list[str]:
        return [sys.executable, str(APPS / script), "--port", str(ports.h1), *flags]

    return command


def server_native_serve(interface: str, target: str, static: bool = False) -> Callable[[Ports, Path], list[str]]:
    """An ASGI/WSGI app through `server-native serve`, as a user would run it; with
    `static`, files under /static/ too (Granian's option names)."""

    def command(ports: Ports, scratch: Path) -> list[str]:
        mount = ["--static-path-mount", str(static_files(scratch))] if static else []
        return [
            sys.executable, "-m", "server_native", "serve", target, "--app-dir", str(APPS),
            "--interface", interface, "--host", HOST, "--port", str(ports.h1),
            "--no-http3", "--log-level", "warning", *mount,
        ]  # fmt: skip

    return command


def uvicorn_app(target: str) -> Callable[[Ports, Path], list[str]]:
    def command(ports: Ports, scratch: Path) -> list[str]:
        return [
            sys.executable, "-m", "uvicorn", target, "--app-dir", str(APPS),
            "--host", HOST, "--port", str(ports.h1), "--workers", "1",
            "--loop", "uvloop", "--http", "httptools",
            "--no-access-log", "--log-level", "warning",
        ]  # fmt: skip

    return command


def gunicorn_app(target: str) -> Callable[[Ports, Path], list[str]]:
    # gthread: keep-alive and the same 4 threads as server-native's WSGI default
    # (the sync worker closes every connection).
    def command(ports: Ports, scratch: Path) -> list[str]:
        return [
            sys.executable, "-m", "gunicorn", target, "--chdir", str(APPS),
            "--bind", f"{HOST}:{ports.h1}", "--workers", "1",
            "--worker-class", "gthread", "--threads", "4", "--log-level", "warning",
        ]  # fmt: skip

    return command


def granian_app(interface: str, target: str, static: bool = False) -> Callable[[Ports, Path], list[str]]:
    # --http is left at its default, auto: HTTP/1.1 and prior-knowledge h2c on one port.
    def command(ports: Ports, scratch: Path) -> list[str]:
        mount = ["--static-path-mount", str(static_files(scratch))] if static else []
        return [
            sys.executable, "-m", "granian", "--interface", interface,
            "--host", HOST, "--port", str(ports.h1), "--workers", "1", "--runtime-threads", "1",
            "--loop", "uvloop", "--no-access-log", "--log-level", "warning",
            "--working-dir", str(APPS), *mount, target,
        ]  # fmt: skip

    return command


def nginx_return(body: bytes, piece: int = 2048) -> str:
    """`return 200 body` from memory: an nginx configuration token is limited to 4 KiB,
    so the body is set in pieces and returned as their concatenation."""
    text = body.decode("ascii")
    assert not set(text) & set('"\\$;{}'), "the body needs no escaping in nginx.conf"
    pieces = [text[i : i + piece] for i in range(0, len(text), piece)]
    sets = [f'set $body{i} "{part}";' for i, part in enumerate(pieces)]
    joined = "".join(f"$body{i}" for i in range(len(pieces)))
    return " ".join(sets) + f' return 200 "{joined}";'


def nginx(sendfile: bool = True) -> Callable[[Ports, Path], list[str]]:
    def command(ports: Ports, scratch: Path) -> list[str]:
        template = (APPS / "nginx.conf.template").read_text()
        h2c_listen = f"listen {HOST}:{ports.h2c} http2;" if ports.h2c != ports.h1 else ""
        config = scratch / "nginx.conf"
        static_files(scratch)
        config.write_text(
            template.replace("@PREFIX@", str(scratch))
            .replace("@PORT@", str(ports.h1))
            .replace("@H2C_LISTEN@", h2c_listen)
            .replace("@TEN_K_RETURN@", nginx_return(PAYLOADS.TEN_K))
            .replace("@SENDFILE@", "on" if sendfile else "off")
        )
        return [find_nginx() or "nginx", "-p", str(scratch), "-c", str(config), "-e", "stderr"]

    return command


NO_H2C_UVICORN = (("h2c", "uvicorn has no HTTP/2"),)
RUST_ONLY_BODY = (
    ("get10k", "native_response is one fixed body for every path"),
    ("echo256", "native_response is one fixed body for every path"),
)
STATIC_ONLY = tuple((name, "a static-file case") for name in ("hello", "get10k", "echo256"))

CASES = (
    Case("native_direct_async",
         "server_native direct API, async handler returning a prebuilt response"
         " (native_direct=False), in-process transport",
         python_app("server_native_direct.py")),
    Case("native_direct_sync",
         "server_native direct API, sync handler called from the native side"
         " (native_direct=True), in-process transport",
         python_app("server_native_direct.py", "--sync")),
    Case("native_http", "server_native HttpServer-style loop, in-process transport",
         python_app("server_native_http.py")),
    Case("native_http_callback",
         "server_native HttpServer-style handler (serve_native_http), in-process transport",
         python_app("server_native_http.py", "--callback")),
    # native_direct=True has no bridge form: the handler is called in-process by design
    # (serve_native_direct raises ValueError for native_direct=True, native_callback=False).
    Case("native_direct_async_bridge",
         "native_direct_async over the socket bridge (native_callback=False)",
         python_app("server_native_direct.py", "--bridge")),
    Case("native_http_bridge", "native_http over the socket bridge (native_callback=False)",
         python_app("server_native_http.py", "--bridge")),
    Case("native_rust_only", "server_native native_response: answered in Rust (ceiling), 1 I/O thread",
         python_app("server_native_rust_only.py"), not_run=RUST_ONLY_BODY),
    Case("socketify", "socketify (uWebSockets) with its own API, sync handlers, 1 process",
         python_app("socketify_hello.py"), modules=("socketify",),
         not_run=(("h2c", "uWebSockets has no HTTP/2"),)),
    Case("granian_rsgi", "Granian RSGI + uvloop, raw RSGI app, 1 worker, 1 runtime thread",
         granian_app("rsgi", "rsgi_hello:app"), modules=("granian", "uvloop")),
    Case("granian_asgi", "Granian ASGI + uvloop, raw ASGI app, 1 worker, 1 runtime thread",
         granian_app("asgi", "asgi_hello:app"), modules=("granian", "uvloop")),
    Case("uvicorn_asgi", "uvicorn + httptools + uvloop, raw ASGI app, 1 worker",
         uvicorn_app("asgi_hello:app"), modules=("uvicorn", "httptools", "uvloop"),
         not_run=NO_H2C_UVICORN),
    Case("nginx", "nginx `return 200`, 1 process, no access log; h2c on a port of its own;"
         " static files with sendfile",
         nginx(), needs_nginx=True, h2c_own_port=True, static_files=True,
         not_run=(("echo256", "nginx-light cannot echo a request body (no echo module)"),)),
    Case("nginx_no_sendfile", "nginx static files with `sendfile off` (read into buffers, then written)",
         nginx(sendfile=False), needs_nginx=True, h2c_own_port=True, static_files=True, not_run=STATIC_ONLY),
    Case("native_static", "server-native serve --static-path-mount: files answered natively",
         server_native_serve("asgi", "asgi_hello:app", static=True), static_files=True, not_run=STATIC_ONLY),
    Case("granian_static", "Granian --static-path-mount, 1 worker, 1 runtime thread",
         granian_app("asgi", "asgi_hello:app", static=True), modules=("granian", "uvloop"),
         static_files=True, not_run=STATIC_ONLY),
    # Framework apps: the same app file on every server.
    Case("native_asgi", "server-native serve, raw ASGI app (the uvicorn/Granian one)",
         server_native_serve("asgi", "asgi_hello:app")),
    *(case
      for app, label in (("starlette", "Starlette"), ("fastapi", "FastAPI"))
      for case in (
          Case(f"native_{app}", f"server-native serve, {label} app",
               server_native_serve("asgi", f"{app}_hello:app"), modules=(app,)),
          Case(f"granian_{app}", f"Granian ASGI + uvloop, {label} app, 1 worker, 1 runtime thread",
               granian_app("asgi", f"{app}_hello:app"), modules=("granian", "uvloop", app)),
          Case(f"uvicorn_{app}", f"uvicorn + httptools + uvloop, {label} app, 1 worker",
               uvicorn_app(f"{app}_hello:app"), modules=("uvicorn", "httptools", "uvloop", app),
               not_run=NO_H2C_UVICORN),
      )),
    *(case
      for app, label, modules in (("wsgi", "raw WSGI", ()), ("flask", "Flask", ("flask",)))
      for case in (
          Case(f"native_{app}", f"server-native serve, {label} app, 4 threads",
               server_native_serve("wsgi", f"{app}_hello:app"), modules=modules),
          Case(f"granian_{app}", f"Granian WSGI, {label} app, 1 worker, 1 runtime thread",
               granian_app("wsgi", f"{app}_hello:app"), modules=("granian", *modules)),
          Case(f"gunicorn_{app}", f"gunicorn gthread, {label} app, 1 worker, 4 threads",
               gunicorn_app(f"{app}_hello:app"), modules=("gunicorn", *modules),
               not_run=(("h2c", "gunicorn has no HTTP/2"),)),
      )),
)  # fmt: skip
CASES_BY_NAME = {case.name: case for case in CASES}


def find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    return found


def missing_tool(case: Case) -> str | None:
    """Why a case cannot run on this machine, or None if its tools are installed."""
    absent = [name for name in case.modules if importlib.util.find_spec(name) is None]
    if absent:
        return f"Python package(s) not installed: {', '.join(absent)}"
    if case.needs_nginx and find_nginx() is None:
        return "nginx not installed (apt-get install -y nginx-light)"
    return None


# --- processes -----------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: the sockets are held open together while asking."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((HOST, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def pinned_to(cpu: int, pinned: bool) -> list[str]:
    return ["taskset", "-c", str(cpu)] if pinned else []


def parent_pids() -> dict[int, int]:
    """pid -> ppid for every process visible in /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the ")" closing the command name: state, ppid, ...
        parents[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    return parents


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in parent_pids().items():
        children.setdefault(ppid, []).append(pid)
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, []))
    return tree


def rss_kib(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"^VmRSS:\s+(\d+)\s+kB", status, re.MULTILINE)
    return int(match.group(1)) if match else 0


def tree_rss_mib(root: int) -> float:
    return sum(rss_kib(pid) for pid in process_tree(root)) / 1024


def tree_cpu_s(root: int) -> tuple[float, float]:
    """User and system CPU time of a process tree, every thread included."""
    user = system = 0
    for pid in process_tree(root):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        # Fields after the ")" closing the command name: utime and stime are 12th and 13th.
        fields = stat.rpartition(")")[2].split()
        user += int(fields[11])
        system += int(fields[12])
    ticks = os.sysconf("SC_CLK_TCK")
    return user / ticks, system / ticks


def log_tail(path: Path, lines: int = 3) -> str:
    text = path.read_text(errors="replace").strip().splitlines()
    return " | ".join(line.strip() for line in text[-lines:]) or "(no output)"


def probe(port: int, workload: Workload) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(HOST, port, timeout=2)
    try:
        headers = {"content-type": "application/octet-stream"} if workload.request_body else {}
        connection.request(workload.method, workload.path, workload.request_body, headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def check_answer(status: int, body: bytes, workload: Workload) -> None:
    if status != 200 or body != workload.expected:
        raise BenchError(
            f"wrong answer to {workload.method} {workload.path}: HTTP {status},"
            f" {len(body)} bytes {body[:40]!r} (expected 200, {len(workload.expected)} bytes)"
        )


def wait_until_ready(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    hello = WORKLOADS_BY_NAME["hello"]
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"server exited with code {process.returncode}: {log_tail(log)}")
        try:
            status, body = probe(port, hello)
        except (OSError, http.client.HTTPException):
            time.sleep(0.1)
            continue
        check_answer(status, body, hello)
        return
    raise BenchError(f"no answer on {HOST}:{port} within {STARTUP_TIMEOUT_S:.0f} s: {log_tail(log)}")


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after a timeout; then SIGKILL leftovers of its session."""
    tree = process_tree(process.pid)
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for pid in tree[1:]:
        try:
            # Only a process still in the session we created for this server.
            if os.getsid(pid) == process.pid:
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    ports: Ports
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def port(self, protocol: str) -> int:
        return self.ports.h2c if protocol == "h2c" else self.ports.h1

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise BenchError(f"server exited with code {self.process.returncode}: {log_tail(self.log)}")


@contextmanager
def running_server(case: Case, pinned: bool, scratch: Path, h2c: bool = False) -> Iterator[Server]:
    """Start the case's server, yield it once it answers hello, stop it on exit."""
    own_h2c_port = h2c and case.h2c_own_port
    numbers = free_ports(2 if own_h2c_port else 1)
    ports = Ports(numbers[0], numbers[-1])
    command = pinned_to(SERVER_CPU, pinned) + case.command(ports, scratch)
    log = scratch / "server.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            wait_until_ready(process, ports.h1, log)
            yield Server(process, ports, log)
        finally:
            stop(process)


# --- load generators: wrk (HTTP/1.1) and h2load (h2c) --------------------------------


@dataclass
class LoadResult:
    tool: str
    seconds: float  # the measured run's length (wall time of the tool)
    requests: int
    requests_per_s: float
    p50_ms: float | None  # h2load: only with --h2c-percentiles
    p99_ms: float | None
    mean_ms: float
    errors: int  # socket/stream errors, timeouts, and 4xx/5xx answers
    client_cpu: float  # CPU time of the load generator / wall time: 1.0 is one core
    # The server's process-tree CPU time per request, in microseconds: what each request
    # costs the server, whoever limits the rate; and the part of it spent in the kernel
    # (system time: sockets, loopback TCP, wake-ups), which every server pays alike.
    server_cpu_us: float | None = None
    server_kernel_us: float | None = None


def to_ms(value: str, unit: str) -> float:
    return float(value) * UNITS_MS[unit]


def output_field(tool: str, pattern: str, output: str) -> re.Match[str]:
    match = re.search(pattern, output, re.MULTILINE)
    if match is None:
        raise BenchError(f"{tool} output lacks {pattern!r}: {output.strip()[-300:]}")
    return match


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_client(command: list[str], budget_s: float) -> tuple[str, float, float]:
    """Runs a load generator; returns (its stdout then stderr, wall seconds, CPU time /
    wall time)."""
    cpu_before, started = children_cpu_s(), time.monotonic()
    timeout = budget_s + CLIENT_GRACE_S
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{command[0]} did not finish within {timeout:.0f} s") from exc
    # The load generator is the only child reaped meanwhile: the server is reaped later.
    wall = time.monotonic() - started
    client_cpu = (children_cpu_s() - cpu_before) / wall
    if done.returncode != 0:
        output = (done.stderr.strip() or done.stdout.strip())[-300:]
        raise BenchError(f"{Path(command[0]).name} failed ({done.returncode}): {output}")
    return done.stdout + done.stderr, wall, client_cpu


def parse_wrk(output: str, wall: float, client_cpu: float) -> LoadResult:
    unit = "(us|ms|s|m|h)"
    p50 = output_field("wrk", rf"^\s*50(?:\.0+)?%\s+([\d.]+){unit}\s*$", output)
    p99 = output_field("wrk", rf"^\s*99(?:\.0+)?%\s+([\d.]+){unit}\s*$", output)
    mean = output_field("wrk", rf"^\s*Latency\s+([\d.]+){unit}\s", output)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = sum(int(n) for n in socket_errors.groups()) if socket_errors else 0
    return LoadResult(
        tool="wrk",
        seconds=wall,
        requests=int(output_field("wrk", r"^\s*(\d+) requests in", output).group(1)),
        requests_per_s=float(output_field("wrk", r"^Requests/sec:\s+([\d.]+)", output).group(1)),
        p50_ms=to_ms(*p50.groups()),
        p99_ms=to_ms(*p99.groups()),
        mean_ms=to_ms(*mean.groups()),
        errors=errors + (int(non_2xx.group(1)) if non_2xx else 0),
        client_cpu=client_cpu,
    )


def run_wrk(port: int, workload: Workload, seconds: int, args: argparse.Namespace,
            pinned: bool) -> LoadResult:  # fmt: skip
    script = ["-s", str(ECHO_LUA)] if workload.request_body is not None else []
    command = pinned_to(CLIENT_CPU, pinned) + [
        "wrk", f"-t{args.threads}", f"-c{args.concurrency}", f"-d{seconds}s", "--latency",
        *script, f"http://{HOST}:{port}{workload.path}",
    ]  # fmt: skip
    output, wall, client_cpu = run_client(command, seconds)
    return parse_wrk(output, wall, client_cpu)


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def h2load_log_percentiles(log: Path) -> tuple[float, float]:
    """p50 and p99 in ms from h2load --log-file: start (us), status, elapsed (us) per line."""
    elapsed = []
    with log.open() as lines:
        for line in lines:
            fields = line.split("\t")
            if len(fields) >= 3:
                elapsed.append(int(fields[2]) / 1000)
    if not elapsed:
        raise BenchError("h2load wrote no per-request log")
    elapsed.sort()
    return percentile(elapsed, 0.50), percentile(elapsed, 0.99)


def parse_h2load(output: str, wall: float, client_cpu: float) -> LoadResult:
    if not re.search(r"^Application protocol: h2c$", output, re.MULTILINE):
        raise BenchError(f"h2load did not speak h2c: {output.strip()[-300:]}")
    rate = output_field("h2load", r"^finished in [\d.]+\w*, ([\d.]+) req/s", output)
    counts = output_field(
        "h2load",
        r"^requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed,"
        r" (\d+) errored, (\d+) timeout",
        output,
    )
    statuses = output_field("h2load", r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", output)
    mean = output_field("h2load", r"^time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)\s", output)
    _, _, succeeded, failed, errored, timeout = (int(n) for n in counts.groups())
    if succeeded == 0:
        wanted = ("requests:", "status codes:", "time for connect")
        summary = [line for line in output.splitlines() if line.startswith(wanted)]
        raise BenchError(f"h2load: no request succeeded: {' | '.join(summary)}")
    return LoadResult(
        tool="h2load",
        seconds=wall,
        requests=succeeded,
        requests_per_s=float(rate.group(1)),
        p50_ms=None,
        p99_ms=None,
        mean_ms=to_ms(*mean.groups()),
        errors=failed + errored + timeout + int(statuses.group(3)) + int(statuses.group(4)),
        client_cpu=client_cpu,
    )


def run_h2load(port: int, workload: Workload, args: argparse.Namespace, pinned: bool,
               scratch: Path, *, seconds: int | None = None, requests: int | None = None,
               clients: int | None = None, percentiles: bool = False) -> LoadResult:  # fmt: skip
    """One h2load run, for `seconds` (-D) or for a number of `requests` (-n)."""
    clients = clients or args.concurrency
    length = ["-D", str(seconds)] if seconds is not None else ["-n", str(requests)]
    data = []
    if workload.request_body is not None:
        body = scratch / "h2load-body"
        body.write_bytes(workload.request_body)
        data = ["-d", str(body), "-H", "content-type: application/octet-stream"]
    log = scratch / "h2load.log"
    logging = [f"--log-file={log}"] if percentiles else []
    command = pinned_to(CLIENT_CPU, pinned) + [
        "h2load", "-t", str(min(args.threads, clients)), "-c", str(clients),
        "-m", str(args.streams), *length, *data, *logging,
        f"http://{HOST}:{port}{workload.path}",
    ]  # fmt: skip
    # -n runs have no fixed length: allow a minute beyond the grace period.
    output, wall, client_cpu = run_client(command, seconds if seconds is not None else 60)
    result = parse_h2load(output, wall, client_cpu)
    if percentiles:
        result.p50_ms, result.p99_ms = h2load_log_percentiles(log)
        log.unlink()
    return result


def check_h2c(port: int, workload: Workload, args: argparse.Namespace, scratch: Path) -> None:
    """One h2c request must succeed with a 2xx (h2load shows no body; h1 checks those)."""
    result = run_h2load(port, workload, args, False, scratch, requests=1, clients=1)
    if result.requests != 1 or result.errors:
        raise BenchError(f"h2c {workload.method} {workload.path} did not answer 2xx")


# --- the matrix ----------------------------------------------------------------------


@dataclass
class Run:
    case: str
    pinned: bool
    iteration: int
    protocol: str
    workload: str
    load_average: float  # 1-minute load average when the run started
    error: str | None = None
    result: LoadResult | None = None
    rss_mib: float | None = None  # the server's process tree, after the measured run


def calibrated_seconds(rate: float, requests: int) -> int:
    """wrk runs for a time, not a count: the seconds `requests` take at `rate`."""
    return max(1, round(requests / max(rate, 1.0)))


def with_server_cpu(server: Server, run: Callable[[], LoadResult]) -> LoadResult:
    """`run`, with the server's CPU time per request during it."""
    user_before, system_before = tree_cpu_s(server.pid)
    result = run()
    user, system = tree_cpu_s(server.pid)
    requests = max(result.requests, 1)
    result.server_cpu_us = (user - user_before + system - system_before) * 1e6 / requests
    result.server_kernel_us = (system - system_before) * 1e6 / requests
    return result


def measure_h1(server: Server, workload: Workload, args: argparse.Namespace,
               pinned: bool) -> LoadResult:  # fmt: skip
    port = server.port("h1")
    status, body = probe(port, workload)
    check_answer(status, body, workload)
    warmup = run_wrk(port, workload, args.warmup, args, pinned) if args.warmup else None
    if args.requests is None:
        seconds = args.duration
    else:
        if warmup is None:  # calibrate on a 1-second run
            warmup = run_wrk(port, workload, 1, args, pinned)
        seconds = calibrated_seconds(warmup.requests_per_s, args.requests)
    return with_server_cpu(server, lambda: run_wrk(port, workload, seconds, args, pinned))


def measure_h2c(server: Server, workload: Workload, args: argparse.Namespace, pinned: bool,
                scratch: Path) -> LoadResult:  # fmt: skip
    port = server.port("h2c")
    check_h2c(port, workload, args, scratch)
    if args.warmup:
        run_h2load(port, workload, args, pinned, scratch, seconds=args.warmup)
    return with_server_cpu(server, lambda: run_h2load(
        port, workload, args, pinned, scratch,
        seconds=args.duration if args.requests is None else None, requests=args.requests,
        percentiles=args.h2c_percentiles,
    ))  # fmt: skip


def measure_case(case: Case, pinned: bool, iteration: int, pairs: list[tuple[str, str]],
                 args: argparse.Namespace) -> list[Run]:  # fmt: skip
    """One server process for the case; every (protocol, workload) of `pairs` measured on it."""
    runs: list[Run] = []
    h2c = any(protocol == "h2c" for protocol, _ in pairs)
    with tempfile.TemporaryDirectory(prefix=f"bench-{case.name}-") as scratch_dir:
        scratch = Path(scratch_dir)
        try:
            with running_server(case, pinned, scratch, h2c) as server:
                for protocol, name in pairs:
                    run = Run(case.name, pinned, iteration, protocol, name, os.getloadavg()[0])
                    workload = WORKLOADS_BY_NAME[name]
                    try:
                        server.check_alive()
                        if protocol == "h1":
                            run.result = measure_h1(server, workload, args, pinned)
                        else:
                            run.result = measure_h2c(server, workload, args, pinned, scratch)
                        run.rss_mib = tree_rss_mib(server.pid)
                    except BenchError as exc:
                        run.error = str(exc)
                    except (OSError, http.client.HTTPException) as exc:
                        run.error = f"{type(exc).__name__}: {exc}"
                    if run.error is not None and server.process.poll() is not None:
                        run.error += (
                            f"; the server exited with code {server.process.returncode}: {log_tail(server.log)}"
                        )
                    print(describe(run), file=sys.stderr, flush=True)
                    runs.append(run)
        except BenchError as exc:
            error = f"did not start: {exc}"
            print(f"[{mode_name(pinned)}] iteration {iteration} {case.name}: FAILED, {error}",
                  file=sys.stderr, flush=True)  # fmt: skip
            done = {(run.protocol, run.workload) for run in runs}
            for protocol, name in pairs:
                if (protocol, name) not in done:
                    load = os.getloadavg()[0]
                    runs.append(Run(case.name, pinned, iteration, protocol, name, load, error))
    return runs


def mode_name(pinned: bool) -> str:
    return "pinned" if pinned else "unpinned"


def mode_title(pinned: bool) -> str:
    if pinned:
        return f"Pinned: server on CPU {SERVER_CPU}, load generator on CPU {CLIENT_CPU}"
    return "Unpinned"


def describe(run: Run) -> str:
    head = (
        f"[{mode_name(run.pinned)}] iteration {run.iteration} {run.case}"
        f" {run.protocol}/{run.workload} (load {run.load_average:.2f}):"
    )
    if run.result is None:
        return f"{head} FAILED: {run.error}"
    r = run.result
    latency = f"mean {r.mean_ms:.3f} ms"
    if r.p50_ms is not None and r.p99_ms is not None:
        latency = f"p50 {r.p50_ms:.3f} ms, p99 {r.p99_ms:.3f} ms, " + latency
    server_cpu = (
        ""
        if r.server_cpu_us is None or r.server_kernel_us is None
        else f", server CPU {r.server_cpu_us:.1f} us/req ({r.server_kernel_us:.1f} in the kernel)"
    )
    return (
        f"{head} {r.requests_per_s:,.0f} req/s, {latency}, RSS {run.rss_mib:.1f} MiB,"
        f" errors {r.errors}, {r.tool} CPU {r.client_cpu:.0%}{server_cpu}"
    )


def selected_pairs(args: argparse.Namespace) -> list[tuple[str, str]]:
    return [(protocol, w.name) for protocol in args.protocol for w in args.workload]


def run_matrix(cases: list[Case], modes: list[bool], args: argparse.Namespace) -> list[Run]:
    """Interleaved iterations, one server process per case and iteration. A (case,
    protocol, workload) that fails is not retried within the same mode; a case that
    does not start is not retried either."""
    runs = []
    for pinned in modes:
        failed: set[tuple[str, str, str]] = set()
        for iteration in range(1, args.iterations + 1):
            for case in cases:
                pairs = [
                    (protocol, workload)
                    for protocol, workload in selected_pairs(args)
                    if case.why_not(protocol, workload) is None and (case.name, protocol, workload) not in failed
                ]
                if not pairs:
                    continue
                for run in measure_case(case, pinned, iteration, pairs, args):
                    runs.append(run)
                    if run.error is not None:
                        failed.add((run.case, run.protocol, run.workload))
    return runs


@dataclass
class Summary:
    case: str
    pinned: bool
    protocol: str
    workload: str
    ok_runs: int
    runs: int
    requests_per_s: float | None = None
    ratios: dict[str, float] = field(default_factory=dict)  # baseline case -> ratio
    p50_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    rss_mib: float | None = None
    client_cpu: float | None = None
    server_cpu_us: float | None = None
    server_kernel_us: float | None = None
    errors: int = 0
    failures: list[str] = field(default_factory=list)


def median_of(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def summarize_runs(mine: list[Run], first: Run) -> Summary:
    summary = Summary(first.case, first.pinned, first.protocol, first.workload, 0, len(mine))
    measured = [run for run in mine if run.result is not None and run.rss_mib is not None]
    # The same failure repeated (a case that never starts) is reported once.
    summary.failures = list(dict.fromkeys(run.error for run in mine if run.error))
    summary.ok_runs = len(measured)
    if measured:
        results = [run.result for run in measured if run.result is not None]
        summary.requests_per_s = statistics.median(r.requests_per_s for r in results)
        summary.p50_ms = median_of([r.p50_ms for r in results])
        summary.p99_ms = median_of([r.p99_ms for r in results])
        summary.mean_ms = median_of([r.mean_ms for r in results])
        summary.rss_mib = median_of([run.rss_mib for run in measured])
        summary.client_cpu = statistics.median(r.client_cpu for r in results)
        summary.server_cpu_us = median_of([r.server_cpu_us for r in results])
        summary.server_kernel_us = median_of([r.server_kernel_us for r in results])
        summary.errors = sum(r.errors for r in results)
    return summary


def summarize(runs: list[Run]) -> list[Summary]:
    """One summary per (mode, protocol, workload, case), in the order runs were made."""
    groups: dict[tuple[bool, str, str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.pinned, run.protocol, run.workload, run.case), []).append(run)
    summaries = [summarize_runs(mine, mine[0]) for mine in groups.values()]
    for summary in summaries:
        for baseline in BASELINES:
            reference = find_summary(summaries, baseline, summary.pinned, summary.protocol, summary.workload)
            if reference and reference.requests_per_s and summary.requests_per_s is not None:
                summary.ratios[baseline] = summary.requests_per_s / reference.requests_per_s
    return summaries


def find_summary(summaries: list[Summary], case: str, pinned: bool, protocol: str,
                 workload: str) -> Summary | None:  # fmt: skip
    for summary in summaries:
        if (summary.case, summary.pinned, summary.protocol, summary.workload) == (
            case, pinned, protocol, workload,
        ):  # fmt: skip
            return summary
    return None


# --- targets -------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    label: str
    case: str
    reference: str
    unpinned: float  # the ratio case / reference must reach, per mode
    pinned: float
    protocols: tuple[str, ...]
    workloads: tuple[str, ...]
    show_client_cpu: bool = False


ALL_WORKLOADS = tuple(WORKLOADS_BY_NAME)
TARGETS = (
    Target("native_direct=True GET hello >= 1.2x Granian RSGI",
           "native_direct_sync", "granian_rsgi", 1.2, 1.2, ("h1",), ("hello",)),
    Target("async direct >= 1.0x Granian RSGI",
           "native_direct_async", "granian_rsgi", 1.0, 1.0, ("h1",), ALL_WORKLOADS),
    Target("bridge >= 0.6x in-process (HttpServer-style)",
           "native_http_bridge", "native_http", 0.6, 0.6, ("h1", "h2c"), ALL_WORKLOADS),
    Target("bridge >= 0.6x in-process (direct async)",
           "native_direct_async_bridge", "native_direct_async", 0.6, 0.6, ("h1", "h2c"),
           ALL_WORKLOADS),
    Target("h2c async direct >= 1.0x Granian RSGI over h2c",
           "native_direct_async", "granian_rsgi", 1.0, 1.0, ("h2c",), ALL_WORKLOADS),
    Target("HttpServer-style hello >= 1.3x uvicorn unpinned, >= 1.1x pinned",
           "native_http", "uvicorn_asgi", 1.3, 1.1, ("h1",), ("hello",)),
    Target("HttpServer-style (`async for`) hello >= 1.3x Granian ASGI",
           "native_http", "granian_asgi", 1.3, 1.3, ("h1",), ("hello",)),
    Target("HttpServer-style (serve_native_http) hello >= 1.3x Granian ASGI",
           "native_http_callback", "granian_asgi", 1.3, 1.3, ("h1",), ("hello",)),
    Target("native_direct=True GET hello >= 1.3x socketify",
           "native_direct_sync", "socketify", 1.3, 1.3, ("h1",), ("hello",)),
    Target("Rust-only >= nginx `return 200`",
           "native_rust_only", "nginx", 1.0, 1.0, ("h1",), ("hello",), show_client_cpu=True),
    Target("raw ASGI hello >= 1.1x Granian ASGI unpinned, >= 1.3x pinned",
           "native_asgi", "granian_asgi", 1.1, 1.3, ("h1",), ("hello",)),
    Target("raw WSGI hello >= 1.1x Granian WSGI",
           "native_wsgi", "granian_wsgi", 1.1, 1.1, ("h1",), ("hello",)),
    Target("Starlette >= 1.2x Starlette on uvicorn",
           "native_starlette", "uvicorn_starlette", 1.2, 1.2, ("h1",), ALL_WORKLOADS),
    Target("FastAPI >= 1.2x FastAPI on uvicorn",
           "native_fastapi", "uvicorn_fastapi", 1.2, 1.2, ("h1",), ALL_WORKLOADS),
)  # fmt: skip


@dataclass
class TargetResult:
    label: str
    case: str
    reference: str
    pinned: bool
    protocol: str
    workload: str
    needed: float
    ratio: float | None
    passed: bool | None  # None: not measured
    note: str = ""


def absent(case: str, summary: Summary | None, skipped: dict[str, str],
           selected: set[str]) -> str | None:  # fmt: skip
    """Why `case` has no figure for a target, or None if it has one."""
    if case not in selected:
        return f"{case} not in this run"
    if case in skipped:
        return f"{case} skipped"
    if summary is None:
        return f"{case} not run for this protocol/workload"
    if summary.requests_per_s is None:
        return f"{case} failed"
    return None


def evaluate_targets(summaries: list[Summary], modes: list[bool], args: argparse.Namespace,
                     skipped: dict[str, str]) -> list[TargetResult]:  # fmt: skip
    selected = {case.name for case in args.framework}
    pairs = selected_pairs(args)
    results = []
    for target in TARGETS:
        if not {target.case, target.reference} <= selected:
            continue  # listed by unevaluated_targets()
        for pinned in modes:
            for protocol, workload in pairs:
                if protocol not in target.protocols or workload not in target.workloads:
                    continue
                mine = find_summary(summaries, target.case, pinned, protocol, workload)
                theirs = find_summary(summaries, target.reference, pinned, protocol, workload)
                needed = target.pinned if pinned else target.unpinned
                result = TargetResult(target.label, target.case, target.reference, pinned,
                                      protocol, workload, needed, None, None)  # fmt: skip
                missing = [
                    reason
                    for reason in (
                        absent(target.case, mine, skipped, selected),
                        absent(target.reference, theirs, skipped, selected),
                    )
                    if reason
                ]
                if missing:
                    result.note = "; ".join(missing)
                elif mine and theirs and mine.requests_per_s and theirs.requests_per_s:
                    result.ratio = mine.requests_per_s / theirs.requests_per_s
                    result.passed = result.ratio >= needed
                    if target.show_client_cpu:
                        result.note = (
                            f"client CPU {mine.client_cpu:.0%} vs {theirs.client_cpu:.0%}:"
                            " near 100% the load generator, not the server, is the limit"
                        )
                results.append(result)
    return results


def unevaluated_targets(args: argparse.Namespace) -> list[str]:
    """Targets this run cannot evaluate: a case they compare was not selected, or none
    of their protocol/workload combinations was."""
    selected = {case.name for case in args.framework}
    pairs = selected_pairs(args)
    lines = []
    for target in TARGETS:
        missing = [name for name in (target.case, target.reference) if name not in selected]
        if missing:
            lines.append(f"{target.label}: {', '.join(missing)} not in this run")
        elif not any(p in target.protocols and w in target.workloads for p, w in pairs):
            combos = "/".join(target.protocols) + " " + "/".join(target.workloads)
            lines.append(f"{target.label}: needs {combos}, not in this run")
    return lines


def verdict(result: TargetResult) -> str:
    if result.passed is None:
        return "n/a"
    return "PASS" if result.passed else "FAIL"


# --- the machine ---------------------------------------------------------------------


def command_version(command: list[str]) -> str | None:
    if shutil.which(command[0]) is None and not os.path.exists(command[0]):
        return None
    done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0] if lines else None


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def server_native_version() -> str | None:
    """The installed version, or the version and commit of the tree on PYTHONPATH."""
    installed = package_version("server_native")
    if installed is not None:
        return installed
    done = subprocess.run(
        [sys.executable, "-c", "import server_native as s; print(s.__version__, s.__file__)"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    if done.returncode != 0 or not done.stdout.strip():
        return None
    version, _, location = done.stdout.strip().partition(" ")
    tree = Path(location).resolve().parent.parent
    commit = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True, timeout=10, check=False,
    ).stdout.strip()  # fmt: skip
    at = f", HEAD {commit}" if commit else ""
    return f"{version} (working tree {tree}{at})"


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    return match.group(1).strip() if match else platform.processor() or "unknown"


def memory_gib() -> float:
    meminfo = Path("/proc/meminfo").read_text()
    match = re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.MULTILINE)
    return int(match.group(1)) / 1024 / 1024 if match else math.nan


def machine() -> dict[str, str | int | float | None]:
    nginx = find_nginx()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(memory_gib(), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "server_native": server_native_version(),
        "uvicorn": package_version("uvicorn"),
        "granian": package_version("granian"),
        "uvloop": package_version("uvloop"),
        "httptools": package_version("httptools"),
        "nginx": command_version([nginx, "-v"]) if nginx else None,
        "wrk": command_version(["wrk", "--version"]),
        "h2load": command_version(["h2load", "--version"]),
    }


# --- reports -------------------------------------------------------------------------


def cell(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def ratio_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def markdown_table(summaries: list[Summary], cases: list[Case], pinned: bool, protocol: str,
                   workload: Workload) -> list[str]:  # fmt: skip
    tool = "wrk" if protocol == "h1" else "h2load"
    lines = [
        f"#### {protocol} · {workload.name} ({workload.description})",
        "",
        f"| case | req/s | vs {BASELINES[0]} | vs {BASELINES[1]} | p50 ms | p99 ms | mean ms"
        f" | RSS MiB | {tool} CPU | server µs/req | of which kernel | errors | runs ok |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    not_here = []
    for case in cases:
        s = find_summary(summaries, case.name, pinned, protocol, workload.name)
        if s is None:
            why = case.why_not(protocol, workload.name)
            if why:
                not_here.append(f"{case.name} ({why})")
            continue
        rate = "failed" if s.ok_runs == 0 else cell(s.requests_per_s, 0)
        client = "-" if s.client_cpu is None else f"{s.client_cpu:.0%}"
        lines.append(
            f"| {s.case} | {rate} | {ratio_cell(s.ratios.get(BASELINES[0]))}"
            f" | {ratio_cell(s.ratios.get(BASELINES[1]))} | {cell(s.p50_ms, 3)}"
            f" | {cell(s.p99_ms, 3)} | {cell(s.mean_ms, 3)} | {cell(s.rss_mib, 1)} | {client}"
            f" | {cell(s.server_cpu_us, 1)} | {cell(s.server_kernel_us, 1)} | {s.errors} | {s.ok_runs}/{s.runs} |"
        )
    if not_here:
        lines += ["", "Not run here: " + "; ".join(not_here) + "."]
    return lines


def targets_table(targets: list[TargetResult]) -> list[str]:
    lines = [
        "| target | mode | protocol · workload | ratio | needed | result | note |",
        "| --- | --- | --- | ---: | ---: | --- | --- |",
    ]
    for t in targets:
        lines.append(
            f"| {t.label} (`{t.case}` / `{t.reference}`) | {mode_name(t.pinned)}"
            f" | {t.protocol} · {t.workload} | {ratio_cell(t.ratio)} | {t.needed:.1f}x"
            f" | {verdict(t)} | {t.note} |"
        )
    return lines


def targets_text(targets: list[TargetResult]) -> str:
    lines = ["Targets:"]
    for t in targets:
        note = f" ({t.note})" if t.note else ""
        lines.append(
            f"  {verdict(t):4} {t.label} [{mode_name(t.pinned)}, {t.protocol}/{t.workload}]:"
            f" {t.case} / {t.reference} = {ratio_cell(t.ratio)}, needed"
            f" {t.needed:.1f}x{note}"
        )
    return "\n".join(lines)


def failure_notes(summaries: list[Summary]) -> list[str]:
    """One line per (case, mode, failure), naming the protocol/workloads it hit."""
    hit: dict[tuple[str, bool, str], list[str]] = {}
    for s in summaries:
        for failure in s.failures:
            hit.setdefault((s.case, s.pinned, failure), []).append(f"{s.protocol}/{s.workload}")
    return [
        f"- {case} ({mode_name(pinned)}; {', '.join(where)}): failed, {failure}"
        for (case, pinned, failure), where in hit.items()
    ]


def length_text(args: argparse.Namespace) -> str:
    if args.requests is None:
        return f"{args.duration} s per measured run"
    return (
        f"{args.requests:,} requests per measured run (h2load -n; wrk runs for the time"
        " they take at the warm-up's rate)"
    )


def markdown_report(
    summaries: list[Summary], targets: list[TargetResult], modes: list[bool],
    skipped: dict[str, str], args: argparse.Namespace,
) -> str:  # fmt: skip
    clients = []
    if "h1" in args.protocol:
        clients.append(f"wrk -t{args.threads} -c{args.concurrency}")
    if "h2c" in args.protocol:
        clients.append(f"h2load -t{args.threads} -c{args.concurrency} -m{args.streams}")
    lines = [
        f"{', '.join(clients)}; {length_text(args)} after {args.warmup} s of warm-up;"
        f" {args.iterations} interleaved iteration(s); medians across iterations;"
        f" load average at start {args.load_average_at_start:.2f}.",
        "",
        *(f"- {case.name}: {case.description}" for case in args.framework),
        "",
        "`server µs/req`: the server's CPU time (user + system, its whole process tree)"
        " per request of the measured run; `of which kernel`: its system time, the part"
        " spent in system calls and the loopback TCP stack.",
        "",
    ]
    if "h2c" in args.protocol and not args.h2c_percentiles:
        lines += [
            "h2c: h2load reports no percentiles; p50/p99 need `--h2c-percentiles`."
            " `mean ms` is the mean request time of either tool.",
            "",
        ]
    cases = [case for case in args.framework if case.name not in skipped]
    for pinned in modes:
        lines += [f"### {mode_title(pinned)}", ""]
        for protocol in args.protocol:
            for workload in args.workload:
                lines += markdown_table(summaries, cases, pinned, protocol, workload) + [""]
    lines += ["### Targets", "", *targets_table(targets), ""]
    lines += [f"- not evaluated: {line}" for line in unevaluated_targets(args)]
    lines += [""] if unevaluated_targets(args) else []
    notes = [f"- {name}: skipped, {reason}" for name, reason in skipped.items()]
    notes += failure_notes(summaries)
    if notes:
        lines += ["Notes:", "", *notes, ""]
    lines += ["### Machine", "", *(f"- {key}: {value}" for key, value in machine().items())]
    return "\n".join(lines)


# --- RSS soak ------------------------------------------------------------------------


@dataclass
class SoakPoint:
    requests: int
    rss_mib: float


@dataclass
class Soak:
    case: str
    pinned: bool
    idle_rss_mib: float | None = None
    served: int = 0
    errors: int = 0
    points: list[SoakPoint] = field(default_factory=list)
    error: str | None = None


def load(port: int, seconds: int, soak: Soak, args: argparse.Namespace) -> float:
    """One wrk run of GET hello counted into the soak; returns its req/s."""
    result = run_wrk(port, WORKLOADS_BY_NAME["hello"], seconds, args, soak.pinned)
    soak.served += result.requests
    soak.errors += result.errors
    return result.requests_per_s


def load_until(port: int, target: int, rate: float, soak: Soak, args: argparse.Namespace,
               deadline: float) -> float:  # fmt: skip
    """wrk runs sized from the last rate until `target` requests were served in total."""
    while soak.served < target:
        if time.monotonic() > deadline:
            raise BenchError(f"soak exceeded {SOAK_TIME_LIMIT_S:.0f} s after {soak.served} requests")
        seconds = math.ceil((target - soak.served) / max(rate, 1.0))
        rate = load(port, max(1, min(SOAK_MAX_CHUNK_S, seconds)), soak, args)
    return rate


def checkpoint_list(text: str) -> tuple[int, ...]:
    points = tuple(int(part) for part in text.split(","))
    if not points or list(points) != sorted(set(points)) or points[0] <= 0:
        raise argparse.ArgumentTypeError("increasing positive request counts, e.g. 50000,500000")
    return points


def rss_soak(case: Case, pinned: bool, args: argparse.Namespace) -> Soak:
    """Steady wrk load; RSS of the server tree read at each of --soak-checkpoints."""
    soak = Soak(case.name, pinned)
    deadline = time.monotonic() + SOAK_TIME_LIMIT_S
    with tempfile.TemporaryDirectory(prefix=f"soak-{case.name}-") as scratch:
        try:
            with running_server(case, pinned, Path(scratch)) as server:
                soak.idle_rss_mib = tree_rss_mib(server.pid)
                port = server.port("h1")
                rate = load(port, 1, soak, args)  # calibration
                for target in args.soak_checkpoints:
                    rate = load_until(port, target, rate, soak, args, deadline)
                    soak.points.append(SoakPoint(soak.served, tree_rss_mib(server.pid)))
        except BenchError as exc:
            soak.error = str(exc)
    return soak


def describe_soak(soak: Soak) -> str:
    head = f"rss-soak {soak.case} [{mode_name(soak.pinned)}]:"
    if soak.error is not None:
        return f"{head} FAILED: {soak.error}"
    parts = [f"idle {soak.idle_rss_mib:.1f} MiB"]
    parts += [f"after {p.requests:,} requests {p.rss_mib:.1f} MiB" for p in soak.points]
    first, last = soak.points[0], soak.points[-1]
    parts.append(f"growth {last.rss_mib - first.rss_mib:+.1f} MiB")
    return f"{head} {'; '.join(parts)}; errors {soak.errors}"


# --- command line --------------------------------------------------------------------


def comma_list(value: str, known: dict[str, object], what: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    if names == ["all"]:
        return list(known)
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; choose from all, {', '.join(known)}")
    return list(dict.fromkeys(names))


def parse_cases(value: str) -> list[Case]:
    return [CASES_BY_NAME[n] for n in comma_list(value, dict(CASES_BY_NAME), "case(s)")]


def parse_workloads(value: str) -> list[Workload]:
    names = comma_list(value, dict(WORKLOADS_BY_NAME), "workload(s)")
    return [WORKLOADS_BY_NAME[name] for name in names]


def parse_protocols(value: str) -> list[str]:
    return comma_list(value, dict(PROTOCOLS), "protocol(s)")


def positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return number


def non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return number


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Cases: " + "; ".join(f"{c.name}: {c.description}" for c in CASES)
        + ". Workloads: " + "; ".join(f"{w.name}: {w.description}" for w in WORKLOADS) + ".",
    )  # fmt: skip
    parser.add_argument(
        "--framework", type=parse_cases, default=None,
        help="comma list of cases or 'all': " + ", ".join(CASES_BY_NAME)
        + " (default: all; native_http with --rss-soak)",
    )  # fmt: skip
    parser.add_argument(
        "--workload", type=parse_workloads, default=DEFAULT_WORKLOADS,
        help="comma list or 'all': " + ", ".join(WORKLOADS_BY_NAME)
        + " (default: " + ",".join(w.name for w in DEFAULT_WORKLOADS) + ")",
    )  # fmt: skip
    parser.add_argument(
        "--protocol", type=parse_protocols, default=list(PROTOCOLS),
        help="comma list or 'all': h1 (HTTP/1.1, wrk), h2c (prior-knowledge HTTP/2, h2load)"
        " (default: all)",
    )  # fmt: skip
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--duration", type=positive, default=10, help="seconds per measured run (default 10)")
    length.add_argument(
        "--requests", type=positive, default=None,
        help="requests per measured run instead of --duration. h2c: h2load -n exactly."
        " h1: wrk can only run for a time, so the run lasts the seconds these requests take"
        " at the rate of the warm-up just before it (or of a 1-s calibration run with"
        " --warmup 0), at least 1 s: the count is approximate",
    )  # fmt: skip
    parser.add_argument(
        "--concurrency", type=positive, default=64,
        help="wrk connections; h2load clients (connections) (default 64)",
    )  # fmt: skip
    parser.add_argument(
        "--streams", type=positive, default=10,
        help="h2load -m: concurrent streams per connection (default 10)",
    )  # fmt: skip
    parser.add_argument("--threads", type=positive, default=1, help="wrk/h2load threads (1)")
    parser.add_argument("--iterations", type=positive, default=3, help="interleaved rounds (3)")
    parser.add_argument(
        "--warmup", type=non_negative, default=2,
        help="seconds of load before each measured run, discarded (default 2)",
    )  # fmt: skip
    parser.add_argument(
        "--pin", choices=("none", "split", "both"), default="none",
        help=f"split: server on CPU {SERVER_CPU}, load generator on CPU {CLIENT_CPU}"
        " (taskset); both: the whole matrix unpinned, then pinned (default none)",
    )  # fmt: skip
    parser.add_argument(
        "--h2c-percentiles", action="store_true",
        help="p50/p99 for h2c from h2load's per-request log (--log-file); costs h2load CPU,"
        " so req/s drop where h2load is the limit. Without it h2c shows the mean only",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, metavar="PATH", help="write raw results here")
    parser.add_argument(
        "--markdown", action="store_true",
        help="print the tables, targets, notes and machine in markdown",
    )  # fmt: skip
    parser.add_argument(
        "--rss-soak", action="store_true",
        help=f"report server RSS after ~{SOAK_CHECKPOINTS[0]:,} and ~{SOAK_CHECKPOINTS[1]:,}"
        " requests of steady HTTP/1.1 GET hello load instead of the matrix",
    )  # fmt: skip
    parser.add_argument(
        "--soak-checkpoints", type=checkpoint_list, default=SOAK_CHECKPOINTS, metavar="N,N,...",
        help="request counts at which --rss-soak reads RSS (default: 50000,500000); more points"
        " tell allocator warm-up from a leak",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.concurrency < args.threads:
        parser.error("--concurrency must be at least --threads (a connection per thread)")
    if args.requests is not None and args.requests < args.concurrency:
        parser.error("--requests must be at least --concurrency (h2load -n >= -c)")
    if args.framework is None:
        args.framework = [CASES_BY_NAME["native_http"]] if args.rss_soak else list(CASES)
    if args.rss_soak:
        args.protocol = ["h1"]
    return args


def pin_modes(pin: str) -> list[bool]:
    return {"none": [False], "split": [True], "both": [False, True]}[pin]


def warn_if_busy(load: float) -> None:
    if load > BUSY_LOAD:
        print(f"warning: 1-minute load average is {load:.2f}; other work on this machine"
              " skews the figures", file=sys.stderr)  # fmt: skip


def check_environment(modes: list[bool], protocols: list[str]) -> None:
    if "h1" in protocols and shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install -y wrk (or leave out --protocol h1)")
    if "h2c" in protocols and shutil.which("h2load") is None:
        sys.exit("h2load is not installed: apt-get install -y nghttp2-client (or use --protocol h1)")
    if True in modes:
        if shutil.which("taskset") is None:
            sys.exit("taskset is not installed (util-linux); needed for --pin split/both")
        if not {SERVER_CPU, CLIENT_CPU} <= os.sched_getaffinity(0):
            sys.exit(f"--pin needs CPUs {SERVER_CPU} and {CLIENT_CPU} to be available")


def runnable(cases: list[Case]) -> tuple[list[Case], dict[str, str]]:
    skipped = {case.name: reason for case in cases if (reason := missing_tool(case))}
    for name, reason in skipped.items():
        print(f"skipping {name}: {reason}", file=sys.stderr)
    return [case for case in cases if case.name not in skipped], skipped


def not_run_notes(cases: list[Case], args: argparse.Namespace) -> dict[str, str]:
    """The selected (case, protocol/workload) combinations a case does not serve, and why."""
    notes = {}
    for case in cases:
        for protocol, workload in selected_pairs(args):
            why = case.why_not(protocol, workload)
            if why:
                notes[f"{case.name} {protocol}/{workload}"] = why
    return notes


def estimate_minutes(cases: list[Case], modes: list[bool], args: argparse.Namespace) -> float:
    per_run = args.warmup + (args.duration if args.requests is None else 5) + 1
    runs = sum(
        1 for case in cases for protocol, workload in selected_pairs(args) if case.why_not(protocol, workload) is None
    )
    sessions = len(cases) * 3  # start-up and shut-down of each server, about 3 s
    return float(len(modes) * args.iterations * (runs * per_run + sessions) / 60)


def write_json(path: Path, payload: dict[str, object]) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"raw results written to {path}", file=sys.stderr)


def main_matrix(args: argparse.Namespace, modes: list[bool]) -> int:
    cases, skipped = runnable(args.framework)
    not_run = not_run_notes(cases, args)
    for combination, why in not_run.items():
        print(f"not run: {combination}: {why}", file=sys.stderr)
    print(f"about {estimate_minutes(cases, modes, args):.0f} min", file=sys.stderr, flush=True)
    runs = run_matrix(cases, modes, args)
    summaries = summarize(runs)
    targets = evaluate_targets(summaries, modes, args, skipped)
    if args.markdown:
        print(markdown_report(summaries, targets, modes, skipped, args))
    else:
        print(targets_text(targets))
        for line in unevaluated_targets(args):
            print(f"  not evaluated: {line}")
    if args.json:
        payload = {
            "machine": machine(),
            "settings": settings(args),
            "skipped": skipped,
            "not_run": not_run,
            "runs": [asdict(run) for run in runs],
            "summary": [asdict(summary) for summary in summaries],
            "targets": [asdict(target) for target in targets],
        }
        write_json(args.json, payload)
    return 0 if any(s.ok_runs for s in summaries) else 1


def main_soak(args: argparse.Namespace, modes: list[bool]) -> int:
    cases, skipped = runnable(args.framework)
    soaks = [rss_soak(case, pinned, args) for pinned in modes for case in cases]
    for soak in soaks:
        print(describe_soak(soak), flush=True)
    if args.json:
        payload = {
            "machine": machine(),
            "settings": settings(args),
            "skipped": skipped,
            "rss_soak": [asdict(soak) for soak in soaks],
        }
        write_json(args.json, payload)
    return 0 if any(soak.error is None for soak in soaks) else 1


def settings(args: argparse.Namespace) -> dict[str, object]:
    names = (
        "protocol", "duration", "requests", "concurrency", "streams", "threads",
        "iterations", "warmup", "pin", "h2c_percentiles", "rss_soak", "load_average_at_start",
    )  # fmt: skip
    values = {name: getattr(args, name) for name in names}
    if args.requests is not None:
        values["duration"] = None  # the runs were sized by --requests
    return {
        "cases": [case.name for case in args.framework],
        "workloads": [workload.name for workload in args.workload],
    } | values


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    modes = pin_modes(args.pin)
    check_environment(modes, args.protocol)
    args.load_average_at_start = os.getloadavg()[0]
    warn_if_busy(args.load_average_at_start)
    return main_soak(args, modes) if args.rss_soak else main_matrix(args, modes)


if __name__ == "__main__":
    sys.exit(main())
