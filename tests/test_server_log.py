"""What the native side decides on its own reaches Python's ``logging`` as
``server_native.error``: request bodies it refuses (malformed chunking, a
stall), requests hyper or the guard refuse, heads that never complete, TLS
handshakes that fail, accepts that fail for want of descriptors, an HTTP/3
port it could not bind, and floods of any of those, one line per second per
kind with a count.

Each refused body is also checked on the wire: the client gets the refusal
status and a closed connection, never the application's answer."""

from __future__ import annotations

import logging
import os
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest
from apps.harness import free_port
from conftest import Certificates, LogLines
from test_bad_input import exchange, read_response, status_of

from server_native import ClientDisconnected

TIMEOUT = 10


class BodyReader:
    """Reads the whole body, records how that ended, answers 200."""

    def __init__(self) -> None:
        self.outcomes: list[str] = []

    async def __call__(self, request: Any) -> None:
        try:
            body = await request.read()
        except ClientDisconnected:
            self.outcomes.append("disconnected")
            raise
        self.outcomes.append(f"read {len(body)}")
        request.response.write("the application's answer")


def post_chunked(body: bytes) -> bytes:
    return b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body


MALFORMED_CHUNKING = {
    "size-overflow": b"fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
    "plus-sign": b"+5\r\nhello\r\n0\r\n\r\n",
    "hex-prefix": b"0x5\r\nhello\r\n0\r\n\r\n",
    "huge-extension": b"5;" + b"x" * 200_000 + b"\r\nhello\r\n0\r\n\r\n",
    "no-crlf-after-data": b"5\r\nhelloXX0\r\n\r\n",
}


@pytest.mark.parametrize("body", list(MALFORMED_CHUNKING.values()), ids=list(MALFORMED_CHUNKING))
def test_a_malformed_chunked_body_is_answered_400_not_by_the_application(
    serve: Any, body: bytes, server_log: LogLines
) -> None:
    handler = BodyReader()
    server = serve(handler)
    response = exchange(server.port, post_chunked(body), until_eof=True)
    assert status_of(response) == 400, response[:200]
    assert b"the application's answer" not in response
    assert response.count(b"HTTP/1.1 ") == 1
    assert handler.outcomes in ([], ["disconnected"])
    server_log.wait("POST /upload", "malformed request body", "answered 400")


def test_a_stalled_request_body_is_answered_408_and_the_application_told(serve: Any, server_log: LogLines) -> None:
    handler = BodyReader()
    server = serve(handler, body_read_timeout=0.5)
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly a part")
        response = read_response(sock, deadline=TIMEOUT, until_eof=True)
    assert status_of(response) == 408, response[:200]
    assert b"the application's answer" not in response
    deadline = time.monotonic() + TIMEOUT
    while not handler.outcomes and time.monotonic() < deadline:
        time.sleep(0.02)
    assert handler.outcomes == ["disconnected"]
    server_log.wait("POST /slow", "request body timed out", "answered 408")


def test_a_body_that_keeps_arriving_is_not_timed_out(serve: Any) -> None:
    """The timeout is for a stall, not for a slow whole: each byte resets it."""
    handler = BodyReader()
    server = serve(handler, body_read_timeout=0.4)
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"POST /trickle HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\n")
        for byte in b"abcdef":
            time.sleep(0.15)
            sock.sendall(bytes([byte]))
        response = read_response(sock)
    assert status_of(response) == 200
    assert handler.outcomes == ["read 6"]


@pytest.mark.parametrize(
    ("request_bytes", "needles"),
    [
        (b"GET /a#b HTTP/1.1\r\nHost: x\r\n\r\n", ("refused an HTTP/1.1 request from 127.0.0.1", "fragment")),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
            ("refused an HTTP/1.1 request from 127.0.0.1", "Transfer-Encoding"),
        ),
        (b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", ("refused an HTTP/1.1 request from 127.0.0.1", "version")),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
            ("refused an HTTP/1.1 request from 127.0.0.1", "header"),
        ),
    ],
    ids=["fragment", "double-chunked", "bad-version", "bad-header-name"],
)
def test_a_request_refused_natively_is_logged(
    serve: Any, request_bytes: bytes, needles: tuple[str, ...], server_log: LogLines
) -> None:
    server = serve(BodyReader())
    assert status_of(exchange(server.port, request_bytes, until_eof=True)) == 400
    server_log.wait(*needles)


def test_a_head_that_never_completes_is_logged(serve: Any, server_log: LogLines) -> None:
    server = serve(BodyReader(), header_read_timeout=0.3)
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        assert read_response(sock, until_eof=True) == b""
    server_log.wait("closed a connection from 127.0.0.1", "header_read_timeout")


def test_a_failed_tls_handshake_is_a_debug_line(serve: Any, certs: Certificates, server_log: LogLines) -> None:
    logger = logging.getLogger("server_native.error")
    logger.setLevel(logging.DEBUG)
    server = serve(BodyReader(), certificate_path=certs.cert_path, key_path=certs.key_path)
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # plain text to a TLS port
        read_response(sock, until_eof=True)
    line = server_log.wait("TLS handshake from 127.0.0.1", "failed")
    assert server_log.levels[line] == logging.DEBUG
    # A client that merely does not trust the certificate is no different.
    with pytest.raises(ssl.SSLError), socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        ssl.create_default_context().wrap_socket(sock, server_hostname="localhost")


def test_a_flood_of_refusals_is_one_line_a_second_with_a_count(serve: Any, server_log: LogLines) -> None:
    server = serve(BodyReader())
    started = time.monotonic()
    for _ in range(30):
        assert status_of(exchange(server.port, b"GET /a#b HTTP/1.1\r\nHost: x\r\n\r\n", until_eof=True)) == 400
    assert time.monotonic() - started < 1, "the flood must come within one second for this test to mean anything"
    counted = server_log.wait("more refused requests in the last second were not logged")
    refused = [line for line in server_log.read().splitlines() if line.startswith("refused an HTTP/1.1 request from")]
    assert len(refused) == 1, refused
    assert int(counted.split()[0]) == 29


def test_http3_left_off_for_a_taken_udp_port_is_a_warning(
    serve: Any, certs: Certificates, server_log: LogLines
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        port = free_port()  # free over TCP: only its UDP twin is taken
        taken.bind(("127.0.0.1", port))
        server = serve(
            BodyReader(),
            port=port,
            certificate_path=certs.cert_path,
            key_path=certs.key_path,
            http3=True,
            http3_best_effort=True,
        )
        assert server.port == port
        line = server_log.wait("HTTP/3 is off", "serving over TCP only")
    assert server_log.levels[line] == logging.WARNING


def test_running_out_of_descriptors_is_an_error_and_the_server_recovers(tmp_path: Any) -> None:
    """A server process whose descriptor limit is reached while clients
    connect logs the failed accept at ERROR (once a second, counted), and
    serves again once descriptors are free."""
    script = tmp_path / "server.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio, logging, os, resource, sys
            from server_native import serve_native_http

            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s", stream=sys.stdout)

            async def handle(request):
                request.response.write("ok")

            async def main():
                ready = asyncio.Event()
                async def until_told():
                    # Room for a few more descriptors than are open now.
                    open_now = len(os.listdir("/proc/self/fd"))
                    resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 6, open_now + 6))
                    print("READY", flush=True)
                    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
                await serve_native_http(handle, "127.0.0.1", int(sys.argv[1]), http3=False, shutdown_signal=until_told())

            asyncio.run(main())
            """
        )
    )
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, str(script), str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the banner comes first
            if line.strip() == "READY":
                break
        clients = []
        for _ in range(40):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT))
        time.sleep(1.5)
        for client in clients:
            client.close()
        time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert status_of(read_response(sock, until_eof=True)) == 200
    finally:
        try:
            output, _ = proc.communicate("\n", timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
    errors = [line for line in output.splitlines() if line.startswith("ERROR server_native.error could not accept")]
    assert errors, output
    assert "Too many open files" in errors[0]
    assert len(errors) <= 3, errors  # about one a second, however many accepts failed
