"""The command line as a real process, for the tests that run it: the app
it serves (tests/apps/cliapp.py, copied into a directory of its own by
conftest's ``app_dir`` fixture), the command, and a server that is up once it answers."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from apps.harness import free_port

ROOT = Path(__file__).resolve().parent.parent
CLI_APP = Path(__file__).parent / "apps" / "cliapp.py"


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "server_native", *args]


def serve_once(app_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``serve cliapp:app`` with ``args``, for options that end it before it serves."""
    return subprocess.run(
        command("serve", "cliapp:app", *args),
        cwd=app_dir,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@contextmanager
def serving(
    app_dir: Path, *args: str, ready: Callable[[int], object] | None = None, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """The CLI serving ``args`` on a free port (with ``env`` added to its
    environment), once ``ready(port)`` (a plain GET by default) stops
    raising OSError."""
    ready = ready or (lambda port: get(port, "/"))
    port = free_port()
    process = subprocess.Popen(
        command("serve", *args, "--port", str(port)),
        cwd=app_dir,
        env={**environment(), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                ready(port)
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError("the server never answered")
        yield process, port
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def get(port: int, path: str, headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def stop(process: subprocess.Popen[str]) -> str:
    """SIGTERM the server and return everything it printed."""
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    return output
