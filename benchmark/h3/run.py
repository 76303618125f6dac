"""HTTP/3 benchmark: server_native against Hypercorn (aioquic) over HTTP/3,
and against server_native's own h2c, in one run.

Workloads: ``GET /`` (``Hello, World!``) and ``POST /echo`` (a 256-byte body
sent back). Cases:

- ``native_h3``: ``native_app.py`` over TLS with HTTP/3 (HttpServer style,
  every request through Python), loaded by ``h3load`` (this folder's Rust
  client, quinn + h3);
- ``hypercorn_h3``: Hypercorn ``--quic-bind`` serving ``apps/asgi_hello.py``, loaded
  by ``h3load``;
- ``native_h2c``: ``native_app.py`` in plaintext, prior-knowledge h2c, loaded
  by ``h2load`` (Debian ``nghttp2-client``);
- ``native_rust_only_h3`` (not in the default set): ``native_app.py
  --rust-only``, every request answered natively: the transport's ceiling.

Iterations are interleaved (round 1 of every case, then round 2...); each run
starts a fresh server. The table gives medians, and the ratios the targets:
native_h3 >= 10x hypercorn_h3 and >= 0.8x native_h2c.

    python benchmark/h3/run.py                       # 3 iterations of 5 s
    python benchmark/h3/run.py --duration 2 --iterations 1 --markdown
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
H3LOAD = HERE / "target" / "release" / "h3load"
HELLO = b"Hello, World!"
ECHO_SIZE = 256
WORKLOADS = ("get", "post")
DEFAULT_CASES = ("native_h3", "hypercorn_h3", "native_h2c")
ALL_CASES = (*DEFAULT_CASES, "native_rust_only_h3")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- setup


def build_h3load() -> None:
    if H3LOAD.exists():
        return
    log("building h3load (cargo build --release) ...")
    env = {**os.environ, "CARGO_TARGET_DIR": str(HERE / "target")}
    subprocess.run(
        ["cargo", "build", "--release", "--manifest-path", str(HERE / "Cargo.toml")], check=True, env=env
    )


def make_certs(directory: Path) -> tuple[Path, Path, Path]:
    import trustme

    ca = trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1")
    ca_path, cert_path, key_path = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    issued.private_key_pem.write_to_path(str(key_path))
    for index, pem in enumerate(issued.cert_chain_pems):
        pem.write_to_path(str(cert_path), append=index > 0)
    return ca_path, cert_path, key_path


def free_port() -> int:
    """A port free on 127.0.0.1 over both TCP and UDP (bounded retries)."""
    for _ in range(50):
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


def has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------- servers


@dataclass
class Case:
    name: str
    protocol: str  # "h3" or "h2c"
    workloads: tuple[str, ...]

    def command(self, port: int, cert: Path, key: Path) -> list[str]:
        app = [sys.executable, str(HERE / "native_app.py"), "--port", str(port)]
        if self.name == "native_h3":
            return [*app, "--cert", str(cert), "--key", str(key)]
        if self.name == "native_rust_only_h3":
            return [*app, "--cert", str(cert), "--key", str(key), "--rust-only"]
        if self.name == "native_h2c":
            return app
        if self.name == "hypercorn_h3":
            command = [
                sys.executable, "-m", "hypercorn",
                "--bind", f"127.0.0.1:{port}", "--quic-bind", f"127.0.0.1:{port}",
                "--certfile", str(cert), "--keyfile", str(key),
                "--workers", "1", "--log-level", "warning",
            ]
            if has_uvloop():
                command += ["--worker-class", "uvloop"]
            return [*command, "asgi_hello:app"]
        raise ValueError(self.name)

    def available(self) -> str | None:
        """Why this case cannot run here, or None."""
        if self.name == "hypercorn_h3":
            try:
                import aioquic  # noqa: F401
                import hypercorn  # noqa: F401
            except ImportError:
                return "hypercorn[h3] is not installed (pip install 'hypercorn[h3]')"
        if self.protocol == "h2c" and shutil.which("h2load") is None:
            return "h2load is not installed (apt-get install nghttp2-client)"
        return None


CASES = {
    "native_h3": Case("native_h3", "h3", WORKLOADS),
    "hypercorn_h3": Case("hypercorn_h3", "h3", WORKLOADS),
    "native_h2c": Case("native_h2c", "h2c", WORKLOADS),
    "native_rust_only_h3": Case("native_rust_only_h3", "h3", ("get",)),
}


class Server:
    def __init__(self, case: Case, port: int, cert: Path, key: Path, pin: str | None) -> None:
        command = case.command(port, cert, key)
        if pin is not None:
            command = ["taskset", "-c", pin, *command]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE), str(ROOT / "benchmark" / "apps")])}
        self.output = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            command, cwd=HERE, env=env, stdout=self.output, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.port = port

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                time.sleep(0.3)  # the UDP endpoint comes up with (or just after) TCP
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"server did not listen within {timeout} s: {self.tail()}")

    def cpu_seconds(self) -> tuple[float, float]:
        """User and system CPU time of every process of the server's group."""
        user = system = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:
                continue
            fields = text[text.rindex(")") + 2 :].split()
            if int(fields[2]) == self.process.pid:  # pgrp: the server's session
                user += int(fields[11])
                system += int(fields[12])
        ticks = os.sysconf("SC_CLK_TCK")
        return user / ticks, system / ticks

    def tail(self) -> str:
        self.output.seek(0)
        return "".join(self.output.readlines()[-15:])

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        self.output.close()


# ---------------------------------------------------------------- load


@dataclass
class Result:
    case: str
    workload: str
    iteration: int
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    requests: int = 0
    errors: int = 0
    error: str | None = None
    #: CPU used over the run's wall time (100 = one core); the server's CPU
    #: time per request, the part of it spent in the kernel (system time), and
    #: the load generator's: on two cores both share one machine.
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    server_us_per_request: float = 0.0
    server_kernel_us_per_request: float = 0.0
    client_us_per_request: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def run_h3load(url: str, workload: str, ca: Path, options: argparse.Namespace, pin: str | None) -> dict[str, Any]:
    command = [
        str(H3LOAD), "-c", str(options.connections), "-m", str(options.streams),
        "-d", str(options.duration), "-w", str(options.warmup), "-t", str(options.threads), "--ca", str(ca),
    ]
    if workload == "post":
        command += ["--method", "POST", "--body-size", str(ECHO_SIZE), "-H", "content-type: application/octet-stream"]
    if pin is not None:
        command = ["taskset", "-c", pin, *command]
    done = subprocess.run(
        [*command, url], capture_output=True, text=True, timeout=options.duration + options.warmup + 60
    )
    if done.returncode != 0:
        raise RuntimeError(f"h3load failed: {done.stderr.strip()}")
    report: dict[str, Any] = json.loads(done.stdout)
    expected = HELLO if workload == "get" else b"x" * ECHO_SIZE
    first = report["first_body"].encode()
    if report["first_status"] != 200 or report["first_body_bytes"] != len(expected) or not expected.startswith(first):
        raise RuntimeError(f"unexpected first response: {report['first_status']} {report['first_body'][:60]!r}")
    return report


def children_cpu_seconds() -> float:
    """CPU time of the waited-for children: the load generators."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def check_h2c(port: int) -> None:
    """The plaintext app answers both workloads correctly (HTTP/1.1)."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/")
        assert connection.getresponse().read() == HELLO, "GET / did not answer Hello, World!"
        connection.request("POST", "/echo", body=b"x" * ECHO_SIZE)
        assert connection.getresponse().read() == b"x" * ECHO_SIZE, "POST /echo did not echo"
    finally:
        connection.close()


def run_h2load(url: str, workload: str, options: argparse.Namespace, pin: str | None, scratch: Path) -> dict[str, Any]:
    log_file = scratch / "h2load.log"
    log_file.unlink(missing_ok=True)
    command = [
        "h2load", "-c", str(options.connections), "-m", str(options.streams), "-t", str(options.threads),
        "-D", f"{round(options.duration * 1000)}ms", f"--warm-up-time={round(options.warmup * 1000)}ms",
        f"--log-file={log_file}",
    ]
    if workload == "post":
        body = scratch / "echo.bin"
        body.write_bytes(b"x" * ECHO_SIZE)
        command += ["-d", str(body), "-H", "content-type: application/octet-stream"]
    if pin is not None:
        command = ["taskset", "-c", pin, *command]
    done = subprocess.run(
        [*command, url], capture_output=True, text=True, timeout=options.duration + options.warmup + 60
    )
    if done.returncode != 0:
        raise RuntimeError(f"h2load failed: {done.stdout[-500:]} {done.stderr[-500:]}")
    rps, requests, errors = 0.0, 0, 0
    for line in done.stdout.splitlines():
        words = line.split()
        if line.startswith("finished in"):
            rps = float(words[words.index("req/s,") - 1])
        elif line.startswith("requests:"):
            requests = int(words[words.index("succeeded,") - 1])
            errors = int(words[words.index("failed,") - 1]) + int(words[words.index("errored,") - 1])
        elif line.startswith("status codes:"):
            errors += int(words[4]) + int(words[6])  # 4xx, 5xx
    latencies = []
    for row in log_file.read_text().splitlines():
        columns = row.split("\t")
        if len(columns) >= 3 and columns[1].startswith("2"):
            latencies.append(int(columns[2]) / 1000)
    latencies.sort()

    def percentile(p: float) -> float:
        return latencies[min(len(latencies) - 1, round(p / 100 * (len(latencies) - 1)))] if latencies else 0.0

    return {"rps": rps, "requests": requests, "errors": errors, "p50_ms": percentile(50), "p99_ms": percentile(99)}


def measure(case: Case, iteration: int, options: argparse.Namespace, certs: tuple[Path, Path, Path], scratch: Path) -> list[Result]:
    ca, cert, key = certs
    pins = (None, None) if options.pin == "none" else ("0", "1")
    port = free_port()
    results = []
    server = Server(case, port, cert, key, pins[0])
    try:
        server.wait_ready()
        if case.protocol == "h2c":
            check_h2c(port)
        for workload in case.workloads:
            result = Result(case.name, workload, iteration)
            path = "/" if workload == "get" else "/echo"
            try:
                (user_before, system_before), client_before = server.cpu_seconds(), children_cpu_seconds()
                started = time.monotonic()
                if case.protocol == "h3":
                    report = run_h3load(f"https://127.0.0.1:{port}{path}", workload, ca, options, pins[1])
                else:
                    report = run_h2load(f"http://127.0.0.1:{port}{path}", workload, options, pins[1], scratch)
                wall = time.monotonic() - started
                (user, system), client_cpu = server.cpu_seconds(), children_cpu_seconds() - client_before
                server_kernel = system - system_before
                server_cpu = user - user_before + server_kernel
                result.rps, result.p50_ms, result.p99_ms = report["rps"], report["p50_ms"], report["p99_ms"]
                result.requests, result.errors = report["requests"], report["errors"]
                result.server_cpu, result.client_cpu = 100 * server_cpu / wall, 100 * client_cpu / wall
                # warm-up requests are not counted: estimate them at the measured rate
                served = result.rps * (options.duration + options.warmup)
                if served:
                    result.server_us_per_request = 1e6 * server_cpu / served
                    result.server_kernel_us_per_request = 1e6 * server_kernel / served
                    result.client_us_per_request = 1e6 * client_cpu / served
                if report.get("last_error"):
                    result.extra["last_error"] = report["last_error"]
            except Exception as error:  # noqa: BLE001 - reported, the others still run
                result.error = f"{error} | server: {server.tail()[-400:]}"
            log(
                f"[{iteration + 1}] {case.name:20} {workload:4} "
                + (f"FAILED {result.error}" if result.error else
                   f"{result.rps:10.0f} req/s  p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms  errors {result.errors}"
                   f"  CPU server {result.server_cpu:3.0f}% client {result.client_cpu:3.0f}%"
                   f"  server {result.server_us_per_request:.1f} us/req"
                   f" ({result.server_kernel_us_per_request:.1f} kernel) client {result.client_us_per_request:.1f}")
            )
            results.append(result)
    except Exception as error:  # noqa: BLE001
        for workload in case.workloads:
            results.append(Result(case.name, workload, iteration, error=str(error)))
        log(f"[{iteration + 1}] {case.name:20} FAILED {error}")
    finally:
        server.stop()
    return results


# ---------------------------------------------------------------- report


def medians(results: list[Result]) -> dict[tuple[str, str], dict[str, float]]:
    table: dict[tuple[str, str], dict[str, float]] = {}
    keys = sorted({(r.case, r.workload) for r in results}, key=lambda k: (ALL_CASES.index(k[0]), k[1]))
    for key in keys:
        good = [r for r in results if (r.case, r.workload) == key and r.error is None]
        if not good:
            continue
        table[key] = {
            "rps": statistics.median(r.rps for r in good),
            "p50_ms": statistics.median(r.p50_ms for r in good),
            "p99_ms": statistics.median(r.p99_ms for r in good),
            "errors": sum(r.errors for r in good),
            "server_cpu": statistics.median(r.server_cpu for r in good),
            "client_cpu": statistics.median(r.client_cpu for r in good),
            "server_us_per_request": statistics.median(r.server_us_per_request for r in good),
            "server_kernel_us_per_request": statistics.median(r.server_kernel_us_per_request for r in good),
            "client_us_per_request": statistics.median(r.client_us_per_request for r in good),
            "runs": len(good),
        }
    return table


def ratios(table: dict[tuple[str, str], dict[str, float]]) -> list[dict[str, Any]]:
    rows = []
    for workload in WORKLOADS:
        ours = table.get(("native_h3", workload))
        for other, target in (("hypercorn_h3", 10.0), ("native_h2c", 0.8)):
            theirs = table.get((other, workload))
            if ours and theirs and theirs["rps"]:
                ratio = ours["rps"] / theirs["rps"]
                rows.append({"workload": workload, "against": other, "ratio": ratio, "target": target, "met": ratio >= target})
    return rows


def machine() -> dict[str, str]:
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
        platform.processor(),
    )
    versions = {}
    for name in ("aioquic", "hypercorn", "uvloop"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:  # noqa: BLE001
            versions[name] = "not installed"
    h2load = subprocess.run(["h2load", "--version"], capture_output=True, text=True).stdout.strip() if shutil.which("h2load") else "not installed"
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load average at the start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        **versions,
        "h2load": h2load,
    }


def markdown(table: dict[tuple[str, str], dict[str, float]], rows: list[dict[str, Any]], options: argparse.Namespace, info: dict[str, str]) -> str:
    lines = [
        f"{options.iterations} iteration(s) of {options.duration:g} s (+{options.warmup:g} s warm-up), "
        f"{options.connections} connections x {options.streams} streams, client threads {options.threads}, pin {options.pin}",
        "",
        "| case | workload | req/s (median) | p50 ms | p99 ms | errors | server CPU | client CPU"
        " | server µs/req | of which kernel | client µs/req |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (case, workload), row in table.items():
        lines.append(
            f"| `{case}` | {workload} | {row['rps']:,.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['errors']:.0f} "
            f"| {row['server_cpu']:.0f}% | {row['client_cpu']:.0f}% | {row['server_us_per_request']:.1f}"
            f" | {row['server_kernel_us_per_request']:.1f} | {row['client_us_per_request']:.1f} |"
        )
    lines += ["", "| workload | native_h3 against | ratio | target | met |", "| --- | --- | ---: | ---: | --- |"]
    for row in rows:
        lines.append(f"| {row['workload']} | `{row['against']}` | {row['ratio']:.2f}x | >= {row['target']:g}x | {'yes' if row['met'] else 'no'} |")
    lines += ["", "Machine:", ""] + [f"- {key}: {value}" for key, value in info.items()]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"comma list of {', '.join(ALL_CASES)}")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run [5]")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds before each run [1]")
    parser.add_argument("--iterations", type=int, default=3, help="interleaved rounds [3]")
    parser.add_argument("--connections", type=int, default=10, help="connections [10]")
    parser.add_argument("--streams", type=int, default=10, help="concurrent streams per connection [10]")
    parser.add_argument("--threads", type=int, default=1, help="load generator threads [1]")
    parser.add_argument("--pin", choices=("none", "split"), default="none", help="split: server on CPU 0, client on CPU 1")
    parser.add_argument("--json", type=Path, help="write every run, the medians and the ratios here")
    parser.add_argument("--markdown", action="store_true", help="print the tables in markdown")
    options = parser.parse_args()

    names = [name.strip() for name in options.cases.split(",") if name.strip()]
    unknown = [name for name in names if name not in CASES]
    if unknown:
        parser.error(f"unknown case(s): {', '.join(unknown)}")
    cases = []
    for name in names:
        reason = CASES[name].available()
        if reason:
            log(f"skipping {name}: {reason}")
        else:
            cases.append(CASES[name])
    if any(case.protocol == "h3" for case in cases):
        build_h3load()
    if options.pin == "split" and shutil.which("taskset") is None:
        parser.error("--pin split needs taskset (util-linux)")
    if os.getloadavg()[0] > 0.5:
        log(f"warning: load average {os.getloadavg()[0]:.2f} at the start: other work skews the figures")

    info = machine()
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as scratch:
        certs = make_certs(Path(scratch))
        for iteration in range(options.iterations):
            for case in cases:
                results.extend(measure(case, iteration, options, certs, Path(scratch)))

    table = medians(results)
    rows = ratios(table)
    if options.json:
        options.json.write_text(
            json.dumps(
                {
                    "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(options).items()},
                    "runs": [vars(r) for r in results],
                    "medians": [{"case": c, "workload": w, **row} for (c, w), row in table.items()],
                    "ratios": rows,
                    "machine": info,
                },
                indent=2,
            )
        )
    if options.markdown:
        print(markdown(table, rows, options, info))
    else:
        for (name, workload), row in table.items():
            print(
                f"{name:20} {workload:4} {row['rps']:10.0f} req/s  p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms"
                f"  errors {row['errors']:.0f}  CPU server {row['server_cpu']:.0f}% client {row['client_cpu']:.0f}%"
                f"  server {row['server_us_per_request']:.1f} us/req ({row['server_kernel_us_per_request']:.1f} kernel)"
                f"  client {row['client_us_per_request']:.1f} us/req"
            )
        for row in rows:
            print(f"native_h3 / {row['against']:12} {row['workload']:4} {row['ratio']:6.2f}x (target >= {row['target']:g}x: {'met' if row['met'] else 'NOT met'})")
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
