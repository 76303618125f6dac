"""Rolling restart behind HAProxy: three server_native instances (CLI
processes on loopback ports, PROXY protocol v2) behind deploy/haproxy/http.cfg,
a keep-alive load of GETs to a 20-50 ms handler, and the instances restarted
one after another during it: SIGTERM, wait for the exit, start again, wait
until HAProxy sees it up (``--mode instances``); or each instance run with
``--workers 2`` and sent SIGHUP (``--mode sighup``). Or no proxy at all: the
load straight on one instance that replaces its own workers, as
``--recycle-options`` say (``--mode recycle``). Counts every request the
client saw fail and every 5xx.

    python benchmark/rolling_restart.py --requests 20000 --connections 64
    python benchmark/rolling_restart.py --mode sighup --json
    python benchmark/rolling_restart.py --mode recycle --recycle-options "--workers 2 --limit-max-requests 500"

Needs haproxy (Debian's package) and trustme (for the TLS bind)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def haproxy_binary() -> str | None:
    for candidate in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy", "/usr/bin/haproxy"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@dataclass
class Report:
    mode: str
    requests: int = 0
    failed: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    requests_per_second: float = 0.0
    restarts: int = 0
    exit_codes: list[int] = field(default_factory=list)
    pids_seen: int = 0


class Instance:
    """One server_native CLI process."""

    def __init__(self, port: int, workers: int, log: Path, options: list[str] | None = None) -> None:
        self.port = port
        self.workers = workers
        self.log = log
        #: Options in place of the PROXY protocol HAProxy speaks.
        self.options = options
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "server_native", "serve", "app:app", "--app-dir", str(DEPLOY),
                   "--port", str(self.port), "--log-level", "warning"]  # fmt: skip
        command += ["--proxy-protocol"] if self.options is None else self.options
        if self.workers > 1:
            command += ["--workers", str(self.workers)]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        wait_listening(self.port)

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(TIMEOUT)


def haproxy_states(stats: str) -> dict[str, str]:
    """Each server's status in HAProxy's ``show stat`` (UP, DOWN...)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(stats)
        sock.sendall(b"show stat\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    states = {}
    for line in data.decode().splitlines():
        fields = line.split(",")
        if len(fields) > 17 and fields[0] == "app" and fields[1] not in ("BACKEND", "FRONTEND"):
            states[fields[1]] = fields[17]
    return states


def wait_up(stats: str, server: str | None = None) -> None:
    deadline = time.monotonic() + TIMEOUT
    while True:
        states = haproxy_states(stats)
        wanted = [states.get(server, "")] if server else list(states.values())
        if wanted and all(state.startswith("UP") and "going" not in state for state in wanted):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"HAProxy does not see {server or 'every server'} up: {states}")
        time.sleep(0.05)


async def connection(
    port: int, budget: list[int], stop: asyncio.Event, statuses: Counter[str], errors: list[str], pids: set[str]
) -> None:
    """One keep-alive client connection sending GET /work until the budget
    is spent (and the restarts are over)."""
    reader = writer = None
    while budget[0] > 0 or not stop.is_set():
        budget[0] -= 1
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert reader is not None
            writer.write(b"GET /work HTTP/1.1\r\nHost: app\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
            status = head.split(b" ", 2)[1].decode()
            headers = {
                line.split(b":", 1)[0].strip().lower(): line.split(b":", 1)[1].strip()
                for line in head.split(b"\r\n")[1:]
                if b":" in line
            }
            body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
            statuses[status] += 1
            if status == "200":
                pids.add(body.decode())
            if headers.get(b"connection", b"").lower() == b"close":
                writer.close()
                writer = None
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, IndexError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            if writer is not None:
                writer.close()
            writer = None
    if writer is not None:
        writer.close()


async def load_and_restart(
    args: argparse.Namespace, front: int, instances: list[Instance], stats: str, report: Report
) -> None:
    budget = [args.requests]
    stop = asyncio.Event()
    statuses: Counter[str] = Counter()
    errors: list[str] = []
    pids: set[str] = set()
    started = time.monotonic()
    clients = [
        asyncio.create_task(connection(front, budget, stop, statuses, errors, pids)) for _ in range(args.connections)
    ]
    await asyncio.sleep(args.warmup)
    for index, instance in enumerate(instances if args.mode != "recycle" else ()):
        assert instance.process is not None
        old = set(pids)
        if args.mode == "sighup":
            instance.process.send_signal(signal.SIGHUP)
        else:
            report.exit_codes.append(await asyncio.to_thread(instance.stop))
            await asyncio.to_thread(instance.start)
            await asyncio.to_thread(wait_up, stats, f"app{index + 1}")
        # Until answers come from every new process: with SIGHUP each old
        # worker serves on until its successor does.
        deadline = time.monotonic() + TIMEOUT
        while len(pids - old) < instance.workers and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        report.restarts += 1
    stop.set()
    await asyncio.gather(*clients)
    report.seconds = round(time.monotonic() - started, 2)
    report.requests = sum(statuses.values()) + len(errors)
    report.failed = len(errors) + sum(count for status, count in statuses.items() if status != "200")
    report.statuses = dict(statuses)
    report.errors = errors[:20]
    report.requests_per_second = round(report.requests / report.seconds)
    report.pids_seen = len(pids)


def run_recycling(args: argparse.Namespace) -> Report:
    """The load straight on one instance, which replaces its workers itself."""
    report = Report(args.mode)
    with tempfile.TemporaryDirectory(prefix="sn-recycle-") as directory:
        log = Path(directory) / "server.log"
        instance = Instance(free_port(), 1, log, shlex.split(args.recycle_options))
        try:
            instance.start()
            asyncio.run(load_and_restart(args, instance.port, [instance], "", report))
            report.exit_codes.append(instance.stop())
        finally:
            if instance.process is not None and instance.process.poll() is None:
                instance.process.kill()
                instance.process.wait(TIMEOUT)
            if args.logs:
                print(f"== {log.name}\n{log.read_text(errors='replace')[-8000:]}", file=sys.stderr)
    return report


def run(args: argparse.Namespace) -> Report:
    if args.mode == "recycle":
        return run_recycling(args)
    import trustme

    binary = haproxy_binary()
    if binary is None:
        raise SystemExit("haproxy is not installed")
    report = Report(args.mode)
    with tempfile.TemporaryDirectory(prefix="sn-rolling-") as directory:
        work = Path(directory)
        pem = work / "site.pem"
        cert = trustme.CA().issue_cert("localhost")
        cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
        workers = 2 if args.mode == "sighup" else 1
        instances = [Instance(free_port(), workers, work / f"app{index + 1}.log") for index in range(3)]
        front = free_port()
        stats = str(work / "stats.sock")
        env = {**os.environ, "HTTP_BIND": f"127.0.0.1:{front}", "HTTPS_BIND": f"127.0.0.1:{free_port()}", "TLS_PEM": str(pem),
               "STATS_SOCKET": stats, **{f"APP{i + 1}": f"127.0.0.1:{instance.port}" for i, instance in enumerate(instances)}}  # fmt: skip
        haproxy = None
        try:
            for instance in instances:
                instance.start()
            with (work / "haproxy.log").open("wb") as out:
                haproxy = subprocess.Popen(
                    [binary, "-db", "-f", str(DEPLOY / "haproxy" / "http.cfg")],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            wait_listening(front)
            wait_up(stats)
            asyncio.run(load_and_restart(args, front, instances, stats, report))
        finally:
            if haproxy is not None:
                haproxy.terminate()
                haproxy.wait(TIMEOUT)
            for instance in instances:
                if instance.process is not None and instance.process.poll() is None:
                    instance.process.terminate()
                    instance.process.wait(TIMEOUT)
            if args.logs:
                for log in sorted(work.glob("*.log")):
                    print(f"== {log.name}\n{log.read_text(errors='replace')[-4000:]}", file=sys.stderr)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("instances", "sighup", "recycle"), default="instances")
    parser.add_argument(
        "--recycle-options",
        default="--workers 2 --limit-max-requests 500",
        help="--mode recycle: the server's options that make it replace its workers",
    )
    parser.add_argument(
        "--requests", type=int, default=20_000, help="at least this many (more if the restarts take longer)"
    )
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before the first restart")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--logs", action="store_true", help="print the servers' and HAProxy's logs on stderr")
    args = parser.parse_args()
    report = run(args)
    if args.json:
        print(json.dumps(asdict(report)))
    else:
        for name, value in asdict(report).items():
            print(f"{name}: {value}")


if __name__ == "__main__":
    main()
