"""Worker processes replaced while the server runs, through the real CLI:
past a request limit (under keep-alive load, with no failed request), past
a lifetime, above a memory limit, or when a blocked event loop leaves a
health check unanswered; a successor that cannot start leaves the old
worker serving; and the supervisor's channel, spoken by hand to a worker."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from apps.harness import wait_for
from cliserver import ROOT, command, environment, get, serving, stop

LOAD = ROOT / "benchmark" / "rolling_restart.py"


def recycle_under_load(options: str, requests: int) -> dict[str, object]:
    """benchmark/rolling_restart.py's keep-alive load (32 connections) straight
    on a server started with ``options``; its report."""
    load = [sys.executable, str(LOAD), "--mode", "recycle", "--recycle-options", options,
            "--requests", str(requests), "--connections", "32", "--warmup", "0", "--json", "--logs"]  # fmt: skip
    result = subprocess.run(load, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-6000:]
    report: dict[str, object] = json.loads(result.stdout)
    report["log"] = result.stderr
    return report


def assert_no_failure(report: dict[str, object]) -> None:
    assert report["failed"] == 0, (report["errors"], str(report["log"])[-6000:])
    assert report["statuses"] == {"200": report["requests"]}
    assert report["exit_codes"] == [0]


def test_a_worker_past_its_request_limit_is_replaced_without_a_failed_request() -> None:
    report = recycle_under_load(
        "--workers 2 --limit-max-requests 500 --limit-max-requests-jitter 50 --log-level info", 5000
    )
    assert_no_failure(report)
    # 5000 requests over two workers replaced every 500 to 550: about ten
    # workers answered, never fewer than the two plus one replacement each.
    assert int(str(report["pids_seen"])) >= 4, report
    assert "requests answered, the limit is" in str(report["log"])


def test_a_single_process_with_a_request_limit_is_replaced_too(app_dir: Path) -> None:
    with serving(app_dir, "cliapp:app", "--limit-max-requests", "20") as (process, port):
        pids = set()
        deadline = time.monotonic() + 60
        while len(pids) < 3 and time.monotonic() < deadline:
            status, body = get(port, "/")
            assert status == 200
            pids.add(body.split()[0])
        output = stop(process)
    assert len(pids) >= 3, output
    assert process.returncode == 0


def test_a_worker_past_its_lifetime_is_replaced_without_a_failed_request() -> None:
    report = recycle_under_load("--workers 2 --workers-lifetime 2 --log-level info", 6000)
    assert_no_failure(report)
    assert int(str(report["pids_seen"])) >= 4, report
    assert "its lifetime of 2s (--workers-lifetime) is over" in str(report["log"])


def test_a_worker_above_its_memory_limit_is_replaced(app_dir: Path) -> None:
    with serving(app_dir, "cliapp:app", "--workers-max-rss", "150") as (process, port):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/allocate?mib=200")
        response = connection.getresponse()
        assert response.status == 200
        fat = response.read().decode().split()[0]
        connection.close()
        wait_for(lambda: not alive(int(fat)), 30, "the worker holding 200 MiB to be replaced")
        status, body = get(port, "/")
        assert status == 200 and body.split()[0] != fat
        output = stop(process)
    assert re.search(rf"worker {fat}: \d+ MiB resident, above --workers-max-rss 150; starting its successor", output), (
        output
    )


def test_a_worker_with_a_blocked_event_loop_is_killed_and_replaced(app_dir: Path) -> None:
    with serving(app_dir, "cliapp:app", "--workers", "2", "--timeout-worker-healthcheck", "1") as (process, port):
        blocked = socket.create_connection(("127.0.0.1", port), timeout=10)
        blocked.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        victim = parse_pid(blocked.recv(65536))
        # The same connection, so the same worker: its loop sleeps 60 s.
        blocked.sendall(b"GET /block?seconds=60 HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for((app_dir / f"blocking-{victim}").exists, 30, "the worker's loop to block")
        # Meanwhile the other worker answers.
        others = set()
        while not others and alive(victim):
            try:
                status, body = get(port, "/", timeout=0.5)
            except OSError:
                continue
            assert status == 200
            others.add(body.split()[0])
        assert others and str(victim) not in others
        wait_for(lambda: not alive(victim), 30, "the blocked worker to be killed")
        try:
            assert blocked.recv(65536) == b""  # cut off with its worker
        except ConnectionResetError:
            pass
        blocked.close()
        answers = {get(port, "/")[1].split()[0] for _ in range(50)}
        assert str(victim) not in answers
        output = stop(process)
    assert f"worker {victim} did not answer a health check within 1s" in output, output
    assert re.search(rf"worker {victim} has not answered a health check for [\d.]+s: killed", output), output


def test_a_successor_that_cannot_start_leaves_the_old_worker_serving(app_dir: Path) -> None:
    source = app_dir / "cliapp.py"
    with serving(app_dir, "cliapp:app", "--workers-lifetime", "3") as (process, port):
        first = get(port, "/")[1].split()[0]
        good = source.read_text()
        source.write_text(good + "\nraise RuntimeError('broken deploy')\n")
        # Its successors fail for a while: the first worker serves all along.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            status, body = get(port, "/")
            assert status == 200 and body.split()[0] == first
        source.write_text(good)
        wait_for(lambda: get(port, "/")[1].split()[0] != first, 30, "a successor to serve once the app is fixed")
        output = stop(process)
    assert re.search(rf"exited with 1 before it served; worker {first} serves on, another successor in 5s", output), (
        output
    )


@contextmanager
def worker_by_hand(app_dir: Path, *args: str) -> Iterator[tuple[subprocess.Popen[str], BinaryIO, int]]:
    """A worker started with one end of a socket pair, as the supervisor
    starts it: the process, our end of its channel and its port."""
    ours, theirs = socket.socketpair()
    ours.settimeout(30)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    worker = subprocess.Popen(
        command("serve", "cliapp:app", "--fd", str(listener.fileno()), "--supervisor-fd", str(theirs.fileno()), *args),
        cwd=app_dir, env=environment(), pass_fds=(listener.fileno(), theirs.fileno()),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    theirs.close()
    listener.close()
    # The socket closes with the file: closing ``lines`` ends the channel.
    with ours:
        lines = ours.makefile("rwb")
    try:
        with lines:
            assert json.loads(lines.readline()) == {"type": "ready"}
            yield worker, lines, port
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)


def test_the_channel_carries_readiness_pings_and_retirement(app_dir: Path) -> None:
    """A worker answers what the supervisor would say."""
    with worker_by_hand(app_dir, "--limit-max-requests", "3") as (worker, lines, port):

        def ask(message: dict[str, object]) -> dict[str, object]:
            lines.write(json.dumps(message).encode() + b"\n")
            lines.flush()
            return dict(json.loads(lines.readline()))

        pong = ask({"type": "ping", "id": 7})
        assert pong["type"] == "pong" and pong["id"] == 7
        figures = pong["figures"]
        assert isinstance(figures, dict)
        metrics = figures.pop("metrics")
        assert figures == {"requests": 0, "connections": 0, "active": 0}
        assert metrics["requests"] == {"h1": 0, "h2": 0, "h3": 0}  # for --metrics (tests/test_metrics.py)
        for _ in range(3):
            assert get(port, "/")[0] == 200
        # Past its limit, it asks to be replaced, and closes its connections.
        retire = json.loads(lines.readline())
        assert retire["type"] == "retire" and retire["figures"]["requests"] == 3, retire
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/")
        assert connection.getresponse().getheader("connection") == "close"
        connection.close()
        assert ask({"type": "ping", "id": 8})["figures"]["requests"] == 4
        # The supervisor gone, the worker drains and exits.
        lines.close()
        output, _ = worker.communicate(timeout=30)
        assert worker.returncode == 0, output
        assert "the supervisor is gone: draining" in output


def test_a_draining_worker_sends_its_last_figures_as_it_exits(app_dir: Path) -> None:
    with worker_by_hand(app_dir) as (worker, lines, port):
        for _ in range(3):
            assert get(port, "/")[0] == 200
        worker.send_signal(signal.SIGTERM)
        last = json.loads(lines.readline())
        assert last["type"] == "figures", last
        assert last["figures"]["metrics"]["requests"]["h1"] == 3
        assert last["figures"]["metrics"]["responses"]["2xx"] == 3
        worker.communicate(timeout=30)
        assert worker.returncode == 0


def test_sighup_replaces_every_worker_once_its_successor_serves(app_dir: Path) -> None:
    with serving(app_dir, "cliapp:app", "--workers", "2") as (process, port):
        before = pids_answering(port, 2)
        os.kill(process.pid, signal.SIGHUP)
        wait_for(lambda: not any(alive(int(pid)) for pid in before), 30, "the old workers to exit")
        after = pids_answering(port, 2)
        output = stop(process)
    assert not before & after
    for pid in before:
        assert re.search(rf"worker {pid}: SIGHUP; starting its successor", output), output
        assert re.search(rf"worker \d+ serves in place of worker {pid}, which drains", output), output


def test_a_worker_whose_supervisor_is_killed_drains_and_exits(app_dir: Path) -> None:
    """Even when the supervisor died with the worker's last message unread
    (the worker's end of the channel is then reset, not closed)."""
    with serving(app_dir, "cliapp:app", "--limit-max-requests", "1") as (process, port):
        assert process.stdout is not None
        os.kill(process.pid, signal.SIGSTOP)
        worker = int(get(port, "/")[1].split()[0])
        while "retiring" not in process.stdout.readline():
            pass  # its message to the supervisor is sent, and left unread
        os.kill(process.pid, signal.SIGKILL)
        wait_for(lambda: not alive(worker), 30, "the orphaned worker to exit")


def pids_answering(port: int, count: int) -> set[str]:
    pids: set[str] = set()
    deadline = time.monotonic() + 30
    while len(pids) < count and time.monotonic() < deadline:
        pids.add(get(port, "/")[1].split()[0])
    assert len(pids) == count, pids
    return pids


def parse_pid(response: bytes) -> int:
    return int(response.split(b"\r\n\r\n", 1)[1].split()[0])


def alive(pid: int) -> bool:
    """Whether a worker still runs (exited and not reaped yet is not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone, before or while it was read
        return False
