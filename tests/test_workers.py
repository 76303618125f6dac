"""Worker processes and their drain, through the real CLI."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

from cliserver import app_dir, get, serving  # noqa: F401 - app_dir: a fixture


def test_a_client_that_connected_just_before_the_drain_is_answered(app_dir: Path) -> None:
    """Accepted, but its request not read yet when SIGTERM comes: it is
    served (then the connection closes), not closed unanswered."""
    with serving(app_dir, "cliapp:app") as (process, port):
        early = socket.create_connection(("127.0.0.1", port), timeout=10)
        # Answered after ``early`` was accepted (the accept queue is in order).
        assert get(port, "/")[0] == 200
        os.kill(process.pid, signal.SIGTERM)
        assert process.stdout is not None
        while "SIGTERM: shutting down" not in process.stdout.readline():
            pass
        early.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        response = b""
        while chunk := early.recv(65536):
            response += chunk
        early.close()
        assert process.wait(30) == 0
    assert response.startswith(b"HTTP/1.1 200 "), response
