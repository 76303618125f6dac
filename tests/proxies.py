"""Real reverse proxies (HAProxy, nginx) in front of a server under test,
run from a configuration text in the foreground and stopped after; and the
PROXY protocol headers they send, made by hand for raw-socket tests."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from apps.harness import TIMEOUT
from conftest import Certificates

#: Debian installs daemons in sbin, which a user's PATH may lack.
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
#: Where Debian's libnginx-mod-stream puts nginx's stream module.
NGINX_MODULES = ("/usr/lib/nginx/modules", "/usr/share/nginx/modules")


def tool(name: str) -> str | None:
    found = shutil.which(name)
    if found is not None:
        return found
    for directory in _SBIN:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def haproxy_or_skip() -> str:
    found = tool("haproxy")
    if found is None:
        pytest.skip("haproxy is not installed (.ci/run installs Debian's haproxy package)")
    return found


def nginx_stream_module_or_skip() -> tuple[str, str]:
    """nginx and its stream module (a dynamic module on Debian)."""
    found = tool("nginx")
    if found is None:
        pytest.skip("nginx is not installed (.ci/run installs Debian's nginx and libnginx-mod-stream packages)")
    for directory in NGINX_MODULES:
        module = Path(directory) / "ngx_stream_module.so"
        if module.is_file():
            return found, str(module)
    pytest.skip("nginx's stream module is not installed (Debian's libnginx-mod-stream package)")


def wait_listening(port: int, host: str = "127.0.0.1", process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            socket.create_connection((host, port), timeout=TIMEOUT).close()
            return
        except OSError:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"exited with {process.returncode} before listening on {host}:{port}") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@contextlib.contextmanager
def running(
    command: list[str], listening: list[int], log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``command`` in the foreground, its output in ``log``, until it
    listens on every port of ``listening``; terminated after the block."""
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        try:
            for port in listening:
                wait_listening(port, process=process)
        except BaseException as exc:
            raise RuntimeError(f"{command[0]} did not start: {log.read_text(errors='replace')}") from exc
        yield process
    finally:
        process.terminate()
        try:
            process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(TIMEOUT)


@contextlib.contextmanager
def haproxy(
    config: str, directory: Path, listening: list[int], env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """HAProxy on ``config`` (checked first), in the foreground (``-db``)."""
    binary = haproxy_or_skip()
    path = directory / "haproxy.cfg"
    path.write_text(config)
    check = subprocess.run(
        [binary, "-c", "-f", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=TIMEOUT,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    with running([binary, "-db", "-f", str(path)], listening, directory / "haproxy.log", env) as process:
        yield process


@contextlib.contextmanager
def nginx(config: str, directory: Path, listening: list[int]) -> Iterator[subprocess.Popen[bytes]]:
    """nginx on ``config`` (its stream module loaded first), one process in
    the foreground, every file under ``directory``."""
    binary, module = nginx_stream_module_or_skip()
    path = directory / "nginx.conf"
    head = f"load_module {module};\ndaemon off;\nmaster_process off;\npid {directory / 'nginx.pid'};\nerror_log {directory / 'error.log'} info;\n"
    path.write_text(head + config)
    command = [binary, "-p", str(directory), "-c", str(path)]
    check = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=TIMEOUT)
    assert check.returncode == 0, check.stdout + check.stderr
    with running(command, listening, directory / "nginx.log") as process:
        yield process


def proxy_v1(client: tuple[str, int], server: tuple[str, int]) -> bytes:
    family = "TCP6" if ":" in client[0] else "TCP4"
    return f"PROXY {family} {client[0]} {server[0]} {client[1]} {server[1]}\r\n".encode()


V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v2(client: tuple[str, int] | None, server: tuple[str, int] | None = None, *, tlvs: bytes = b"") -> bytes:
    """A version 2 header: PROXY for ``client`` (to ``server``, by default
    loopback port 80), LOCAL when it is None."""
    if client is None:
        return V2_SIGNATURE + bytes((0x20, 0x00)) + struct.pack("!H", len(tlvs)) + tlvs
    source = ipaddress.ip_address(client[0])
    server = server or ("::1" if source.version == 6 else "127.0.0.1", 80)
    destination = ipaddress.ip_address(server[0])
    family = 0x11 if source.version == 4 else 0x21
    addresses = source.packed + destination.packed + struct.pack("!HH", client[1], server[1])
    return V2_SIGNATURE + bytes((0x21, family)) + struct.pack("!H", len(addresses) + len(tlvs)) + addresses + tlvs


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


# -- clients that know their own port (the client port a server must report)

GET = b"GET /who HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"


def tls_context(certs: Certificates, alpn: str = "http/1.1") -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca_path))
    context.set_alpn_protocols([alpn])
    return context


def connect(where: int | str) -> socket.socket:
    if isinstance(where, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        sock.connect(where)
        return sock
    return socket.create_connection(("127.0.0.1", where), timeout=TIMEOUT)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def body_of(response: bytes) -> str:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), response
    return body.decode()


def through(port: int, request: bytes = GET, tls: ssl.SSLContext | None = None) -> tuple[str, int]:
    """A request through a proxy on ``port``: the response body, and the
    local port of our connection to the proxy (the client port the server
    must report)."""
    with connect(port) as raw:
        own_port = raw.getsockname()[1]
        sock = raw if tls is None else tls.wrap_socket(raw, server_hostname="localhost")
        sock.sendall(request)
        return body_of(read_all(sock)), own_port
