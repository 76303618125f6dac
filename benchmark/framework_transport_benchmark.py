#!/usr/bin/env python3
"""Side-by-side hello-world benchmark of server_native and its peers, driven by wrk.

Every case is a server started as a subprocess on a free port of 127.0.0.1, checked to
answer `Hello, World!`, warmed up, then measured with wrk. Iterations are interleaved
(iteration 1 of every case, then iteration 2 of every case, ...) and the report gives
medians of req/s, p50, p99 and the server's RSS, with ratios against uvicorn.
See benchmark/README.md for the setup and the meaning of each case.
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
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

APPS = Path(__file__).resolve().parent / "apps"
HOST = "127.0.0.1"
BODY = b"Hello, World!"
BASELINE = "uvicorn_asgi"
STARTUP_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
WRK_GRACE_S = 30
SERVER_CPU = 0
CLIENT_CPU = 1
SOAK_CHECKPOINTS = (50_000, 500_000)
SOAK_MAX_CHUNK_S = 10
SOAK_TIME_LIMIT_S = 900.0
BUSY_LOAD = 0.5
UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


class BenchError(Exception):
    """A case could not be started or measured; the message says why."""


# --- the cases -----------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    modules: tuple[str, ...]  # Python modules the case needs; missing -> skipped
    needs_nginx: bool
    command: Callable[[int, Path], list[str]]  # (port, scratch dir) -> argv


def native_http_command(port: int, scratch: Path) -> list[str]:
    return [sys.executable, str(APPS / "server_native_http.py"), "--port", str(port)]


def native_rust_only_command(port: int, scratch: Path) -> list[str]:
    return [sys.executable, str(APPS / "server_native_rust_only.py"), "--port", str(port)]


def uvicorn_command(port: int, scratch: Path) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", "asgi_hello:app", "--app-dir", str(APPS),
        "--host", HOST, "--port", str(port), "--workers", "1",
        "--loop", "uvloop", "--http", "httptools",
        "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip


def granian_command(port: int, scratch: Path) -> list[str]:
    return [
        sys.executable, "-m", "granian", "--interface", "asgi",
        "--host", HOST, "--port", str(port), "--workers", "1", "--runtime-threads", "1",
        "--loop", "uvloop", "--no-access-log", "--log-level", "warning",
        "--working-dir", str(APPS), "asgi_hello:app",
    ]  # fmt: skip


def nginx_command(port: int, scratch: Path) -> list[str]:
    template = (APPS / "nginx.conf.template").read_text()
    config = scratch / "nginx.conf"
    config.write_text(template.replace("@PREFIX@", str(scratch)).replace("@PORT@", str(port)))
    return [find_nginx() or "nginx", "-p", str(scratch), "-c", str(config), "-e", "stderr"]


CASES = (
    Case("native_http", "server_native, HttpServer-style hello answered by Python",
         (), False, native_http_command),
    Case("native_rust_only", "server_native, native_response: answered in Rust (ceiling)",
         (), False, native_rust_only_command),
    Case("uvicorn_asgi", "uvicorn + httptools + uvloop, raw ASGI hello, 1 worker",
         ("uvicorn", "httptools", "uvloop"), False, uvicorn_command),
    Case("granian_asgi", "Granian ASGI + uvloop, raw ASGI hello, 1 worker, 1 runtime thread",
         ("granian", "uvloop"), False, granian_command),
    Case("nginx", "nginx `return 200`, 1 process, no access log",
         (), True, nginx_command),
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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


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


def log_tail(path: Path, lines: int = 3) -> str:
    text = path.read_text(errors="replace").strip().splitlines()
    return " | ".join(line.strip() for line in text[-lines:]) or "(no output)"


def probe(port: int) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(HOST, port, timeout=2)
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def wait_until_ready(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"server exited with code {process.returncode}: {log_tail(log)}")
        try:
            status, body = probe(port)
        except (OSError, http.client.HTTPException):
            time.sleep(0.1)
            continue
        if status != 200 or body != BODY:
            raise BenchError(f"unexpected answer: HTTP {status} {body[:60]!r}")
        return
    raise BenchError(
        f"no answer on {HOST}:{port} within {STARTUP_TIMEOUT_S:.0f} s: {log_tail(log)}"
    )


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


@contextmanager
def running_server(case: Case, pinned: bool, scratch: Path) -> Iterator[tuple[int, int]]:
    """Start the case's server, yield (pid, port) once it answers, stop it on exit."""
    port = free_port()
    command = pinned_to(SERVER_CPU, pinned) + case.command(port, scratch)
    log = scratch / "server.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            wait_until_ready(process, port, log)
            yield process.pid, port
        finally:
            stop(process)


# --- wrk -----------------------------------------------------------------------------


@dataclass
class WrkResult:
    requests: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors plus non-2xx/3xx answers
    client_cpu: float  # CPU time of wrk / wall time: 1.0 is one core saturated


def to_ms(value: str, unit: str) -> float:
    return float(value) * UNITS_MS[unit]


def wrk_field(pattern: str, output: str) -> re.Match[str]:
    match = re.search(pattern, output, re.MULTILINE)
    if match is None:
        raise BenchError(f"wrk output lacks {pattern!r}: {output.strip()[-300:]}")
    return match


def parse_wrk(output: str, client_cpu: float) -> WrkResult:
    unit = "(us|ms|s|m|h)"
    p50 = wrk_field(rf"^\s*50(?:\.0+)?%\s+([\d.]+){unit}\s*$", output)
    p99 = wrk_field(rf"^\s*99(?:\.0+)?%\s+([\d.]+){unit}\s*$", output)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = sum(int(n) for n in socket_errors.groups()) if socket_errors else 0
    return WrkResult(
        requests=int(wrk_field(r"^\s*(\d+) requests in", output).group(1)),
        requests_per_s=float(wrk_field(r"^Requests/sec:\s+([\d.]+)", output).group(1)),
        p50_ms=to_ms(*p50.groups()),
        p99_ms=to_ms(*p99.groups()),
        errors=errors + (int(non_2xx.group(1)) if non_2xx else 0),
        client_cpu=client_cpu,
    )


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_wrk(port: int, seconds: int, args: argparse.Namespace, pinned: bool) -> WrkResult:
    command = pinned_to(CLIENT_CPU, pinned) + [
        "wrk", f"-t{args.threads}", f"-c{args.concurrency}", f"-d{seconds}s", "--latency",
        f"http://{HOST}:{port}/",
    ]  # fmt: skip
    cpu_before, started = children_cpu_s(), time.monotonic()
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=seconds + WRK_GRACE_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish within {seconds + WRK_GRACE_S} s") from exc
    # wrk is the only child reaped meanwhile: the server is reaped after the run.
    client_cpu = (children_cpu_s() - cpu_before) / (time.monotonic() - started)
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr.strip()[-300:]}")
    return parse_wrk(done.stdout, client_cpu)


# --- the matrix ----------------------------------------------------------------------


@dataclass
class Run:
    case: str
    pinned: bool
    iteration: int
    load_average: float  # 1-minute load average when the run started
    error: str | None = None
    wrk: WrkResult | None = None
    rss_mib: float | None = None


def measure(case: Case, pinned: bool, iteration: int, args: argparse.Namespace) -> Run:
    run = Run(case.name, pinned, iteration, os.getloadavg()[0])
    with tempfile.TemporaryDirectory(prefix=f"bench-{case.name}-") as scratch:
        try:
            with running_server(case, pinned, Path(scratch)) as (pid, port):
                if args.warmup > 0:
                    run_wrk(port, args.warmup, args, pinned)
                run.wrk = run_wrk(port, args.duration, args, pinned)
                run.rss_mib = tree_rss_mib(pid)
        except BenchError as exc:
            run.error = str(exc)
    return run


def mode_name(pinned: bool) -> str:
    return "pinned" if pinned else "unpinned"


def mode_title(pinned: bool) -> str:
    if pinned:
        return f"Pinned: server on CPU {SERVER_CPU}, wrk on CPU {CLIENT_CPU}"
    return "Unpinned"


def describe(run: Run) -> str:
    head = (
        f"[{mode_name(run.pinned)}] iteration {run.iteration} {run.case}"
        f" (load {run.load_average:.2f}):"
    )
    if run.wrk is None:
        return f"{head} FAILED: {run.error}"
    w = run.wrk
    return (
        f"{head} {w.requests_per_s:,.0f} req/s, p50 {w.p50_ms:.3f} ms, p99 {w.p99_ms:.3f} ms,"
        f" RSS {run.rss_mib:.1f} MiB, errors {w.errors}, wrk CPU {w.client_cpu:.0%}"
    )


def run_matrix(cases: list[Case], modes: list[bool], args: argparse.Namespace) -> list[Run]:
    """Interleaved iterations; a case that fails is not retried within the same mode."""
    runs = []
    for pinned in modes:
        failed: set[str] = set()
        for iteration in range(1, args.iterations + 1):
            for case in cases:
                if case.name in failed:
                    continue
                run = measure(case, pinned, iteration, args)
                print(describe(run), file=sys.stderr, flush=True)
                runs.append(run)
                if run.error is not None:
                    failed.add(case.name)
    return runs


@dataclass
class Summary:
    case: str
    pinned: bool
    ok_runs: int
    runs: int
    requests_per_s: float | None = None
    ratio_vs_baseline: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    rss_mib: float | None = None
    client_cpu: float | None = None
    errors: int = 0
    failures: list[str] = field(default_factory=list)


def summarize_case(case: str, pinned: bool, runs: list[Run]) -> Summary:
    mine = [run for run in runs if run.case == case and run.pinned == pinned]
    measured = [(run.wrk, run.rss_mib) for run in mine if run.wrk and run.rss_mib is not None]
    summary = Summary(case, pinned, len(measured), len(mine))
    summary.failures = [run.error for run in mine if run.error]
    if measured:
        summary.requests_per_s = statistics.median(w.requests_per_s for w, _ in measured)
        summary.p50_ms = statistics.median(w.p50_ms for w, _ in measured)
        summary.p99_ms = statistics.median(w.p99_ms for w, _ in measured)
        summary.rss_mib = statistics.median(rss for _, rss in measured)
        summary.client_cpu = statistics.median(w.client_cpu for w, _ in measured)
        summary.errors = sum(w.errors for w, _ in measured)
    return summary


def summarize(cases: list[Case], modes: list[bool], runs: list[Run]) -> list[Summary]:
    summaries = []
    for pinned in modes:
        mode = [summarize_case(case.name, pinned, runs) for case in cases]
        baseline = next((s.requests_per_s for s in mode if s.case == BASELINE), None)
        for summary in mode:
            if baseline and summary.requests_per_s is not None:
                summary.ratio_vs_baseline = summary.requests_per_s / baseline
        summaries.extend(mode)
    return summaries


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
        "server_native": package_version("server_native"),
        "uvicorn": package_version("uvicorn"),
        "granian": package_version("granian"),
        "uvloop": package_version("uvloop"),
        "httptools": package_version("httptools"),
        "nginx": command_version([nginx, "-v"]) if nginx else None,
        "wrk": command_version(["wrk", "--version"]),
    }


# --- reports -------------------------------------------------------------------------


def cell(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown_table(summaries: list[Summary], pinned: bool) -> list[str]:
    lines = [
        f"### {mode_title(pinned)}",
        "",
        f"| case | req/s | vs {BASELINE} | p50 ms | p99 ms | RSS MiB | wrk CPU | errors"
        " | runs ok |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summaries:
        if s.pinned != pinned:
            continue
        ratio = "-" if s.ratio_vs_baseline is None else f"{s.ratio_vs_baseline:.2f}x"
        rate = "failed" if s.ok_runs == 0 else cell(s.requests_per_s, 0)
        client = "-" if s.client_cpu is None else f"{s.client_cpu:.0%}"
        lines.append(
            f"| {s.case} | {rate} | {ratio} | {cell(s.p50_ms, 3)} | {cell(s.p99_ms, 3)}"
            f" | {cell(s.rss_mib, 1)} | {client} | {s.errors} | {s.ok_runs}/{s.runs} |"
        )
    return lines


def markdown_report(
    summaries: list[Summary], modes: list[bool], skipped: dict[str, str],
    args: argparse.Namespace,
) -> str:  # fmt: skip
    lines = [
        f"wrk -t{args.threads} -c{args.concurrency}, {args.duration} s per run after"
        f" {args.warmup} s of warm-up, {args.iterations} interleaved iteration(s);"
        f" medians across iterations; load average at start {args.load_average_at_start:.2f}.",
        "",
        *(f"- {case.name}: {case.description}" for case in args.framework),
        "",
    ]
    for pinned in modes:
        lines += markdown_table(summaries, pinned) + [""]
    notes = [f"- {name}: skipped, {reason}" for name, reason in skipped.items()]
    notes += [
        f"- {s.case} ({mode_name(s.pinned)}): failed, {failure}"
        for s in summaries
        for failure in s.failures
    ]
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
    """One wrk run counted into the soak; returns its req/s."""
    result = run_wrk(port, seconds, args, soak.pinned)
    soak.served += result.requests
    soak.errors += result.errors
    return result.requests_per_s


def load_until(port: int, target: int, rate: float, soak: Soak, args: argparse.Namespace,
               deadline: float) -> float:  # fmt: skip
    """wrk runs sized from the last rate until `target` requests were served in total."""
    while soak.served < target:
        if time.monotonic() > deadline:
            raise BenchError(
                f"soak exceeded {SOAK_TIME_LIMIT_S:.0f} s after {soak.served} requests"
            )
        seconds = math.ceil((target - soak.served) / max(rate, 1.0))
        rate = load(port, max(1, min(SOAK_MAX_CHUNK_S, seconds)), soak, args)
    return rate


def rss_soak(case: Case, pinned: bool, args: argparse.Namespace) -> Soak:
    """Steady wrk load; RSS of the server tree read at each checkpoint of SOAK_CHECKPOINTS."""
    soak = Soak(case.name, pinned)
    deadline = time.monotonic() + SOAK_TIME_LIMIT_S
    with tempfile.TemporaryDirectory(prefix=f"soak-{case.name}-") as scratch:
        try:
            with running_server(case, pinned, Path(scratch)) as (pid, port):
                soak.idle_rss_mib = tree_rss_mib(pid)
                rate = load(port, 1, soak, args)  # calibration
                for target in SOAK_CHECKPOINTS:
                    rate = load_until(port, target, rate, soak, args, deadline)
                    soak.points.append(SoakPoint(soak.served, tree_rss_mib(pid)))
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


def parse_cases(value: str) -> list[Case]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    if names == ["all"]:
        return list(CASES)
    unknown = [name for name in names if name not in CASES_BY_NAME]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown case(s) {unknown}; choose from all, {', '.join(CASES_BY_NAME)}"
        )
    return [CASES_BY_NAME[name] for name in names]


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--framework", type=parse_cases, default=None,
        help="comma list of cases or 'all': " + ", ".join(CASES_BY_NAME)
        + " (default: all; native_http with --rss-soak)",
    )  # fmt: skip
    parser.add_argument("--duration", type=positive, default=10, help="seconds per run")
    parser.add_argument("--concurrency", type=positive, default=64, help="wrk connections")
    parser.add_argument("--threads", type=positive, default=1, help="wrk threads")
    parser.add_argument("--iterations", type=positive, default=3, help="interleaved rounds")
    parser.add_argument("--warmup", type=non_negative, default=2, help="seconds before a run")
    parser.add_argument(
        "--pin", choices=("none", "split", "both"), default="none",
        help=f"split: server on CPU {SERVER_CPU}, wrk on CPU {CLIENT_CPU} (taskset);"
        " both: the whole matrix unpinned, then pinned",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, metavar="PATH", help="write raw results here")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument(
        "--rss-soak", action="store_true",
        help=f"report server RSS after ~{SOAK_CHECKPOINTS[0]:,} and ~{SOAK_CHECKPOINTS[1]:,}"
        " requests of steady load instead of the matrix",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.concurrency < args.threads:
        parser.error("--concurrency must be at least --threads (wrk: a connection per thread)")
    if args.framework is None:
        args.framework = [CASES_BY_NAME["native_http"]] if args.rss_soak else list(CASES)
    return args


def pin_modes(pin: str) -> list[bool]:
    return {"none": [False], "split": [True], "both": [False, True]}[pin]


def warn_if_busy(load: float) -> None:
    if load > BUSY_LOAD:
        print(f"warning: 1-minute load average is {load:.2f}; other work on this machine"
              " skews the figures", file=sys.stderr)  # fmt: skip


def check_environment(modes: list[bool]) -> None:
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install -y wrk")
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


def write_json(path: Path, payload: dict[str, object]) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"raw results written to {path}", file=sys.stderr)


def main_matrix(args: argparse.Namespace, modes: list[bool]) -> int:
    cases, skipped = runnable(args.framework)
    runs = run_matrix(cases, modes, args)
    summaries = summarize(cases, modes, runs)
    if args.markdown:
        print(markdown_report(summaries, modes, skipped, args))
    if args.json:
        payload = {
            "machine": machine(),
            "settings": settings(args),
            "skipped": skipped,
            "runs": [asdict(run) for run in runs],
            "summary": [asdict(summary) for summary in summaries],
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
        "duration", "concurrency", "threads", "iterations", "warmup", "pin", "rss_soak",
        "load_average_at_start",
    )  # fmt: skip
    return {"cases": [case.name for case in args.framework]} | {
        name: getattr(args, name) for name in names
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    modes = pin_modes(args.pin)
    check_environment(modes)
    args.load_average_at_start = os.getloadavg()[0]
    warn_if_busy(args.load_average_at_start)
    return main_soak(args, modes) if args.rss_soak else main_matrix(args, modes)


if __name__ == "__main__":
    sys.exit(main())
