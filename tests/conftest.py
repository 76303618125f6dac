"""Shared fixtures: real servers on loopback in a background event loop, and
certificates made by trustme for every run."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from apps.harness import BackgroundLoop
from cliserver import CLI_APP
from cryptography.hazmat.primitives import serialization

from server_native import NativeHttpServer
from server_native.runtime.addresses import ipv6_available

requires_ipv6 = pytest.mark.skipif(not ipv6_available(), reason="IPv6 loopback is not available here")
requires_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


class LogLines(logging.Handler):
    """The messages one logger gets, as text read like ``capsys``: each
    :meth:`read` returns the lines that came since the last one."""

    def __init__(self) -> None:
        super().__init__()
        self._lines: list[str] = []
        #: Each message's level.
        self.levels: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        with self.lock:
            self._lines.append(record.getMessage())
            self.levels[record.getMessage()] = record.levelno

    def read(self) -> str:
        with self.lock:
            text = "".join(f"{line}\n" for line in self._lines)
            self._lines.clear()
        return text

    def wait(self, *needles: str, timeout: float = 10.0) -> str:
        """The first line holding every needle, waited for (bounded): what
        the native side decides is emitted by a server's loop a little
        later. Raises with every line seen when none comes."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                found = next((line for line in self._lines if all(n in line for n in needles)), None)
                seen = list(self._lines)
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line with {needles}; seen: {seen}")
            time.sleep(0.05)


@pytest.fixture
def server_log() -> Iterator[LogLines]:
    """What ``server_native.error`` logs at INFO and above (the echo lines
    among it), whatever else configured logging."""
    logger = logging.getLogger("server_native.error")
    handler = LogLines()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def loop_thread() -> Iterator[BackgroundLoop]:
    """An asyncio loop on its own thread, so tests can drive servers with
    blocking clients (http.client, httpx, curl) from the test thread."""
    thread = BackgroundLoop()
    yield thread
    thread.stop()


@dataclass
class RunningServer:
    server: NativeHttpServer
    loop_thread: BackgroundLoop

    @property
    def port(self) -> int:
        return self.server.port

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        scheme = "https" if self.server.secure else "http"
        shown = f"[{host}]" if ":" in host else host
        return f"{scheme}://{shown}:{self.port}{path}"

    def close(self, force: bool = False) -> None:
        self.loop_thread.run(self.server.close(force=force))


Handler = Callable[[Any], Awaitable[None]]


#: Both transports between Rust and Python: in-process, and the socket bridge.
TRANSPORTS = [pytest.param(True, id="native"), pytest.param(False, id="bridge")]


@pytest.fixture(params=TRANSPORTS)
def serve(loop_thread: BackgroundLoop, request: pytest.FixtureRequest) -> Iterator[Callable[..., RunningServer]]:
    """``serve(handler, address="127.0.0.1", port=0, secure=False, **options)``
    binds a real server that calls ``handler`` for every request. Every test
    using it runs on both transports (``native_callback`` True and False)."""
    started: list[RunningServer] = []
    native_callback: bool = request.param

    def start(handler: Handler | None, address: str = "127.0.0.1", port: int = 0, **options: Any) -> RunningServer:
        async def bind() -> NativeHttpServer:
            options.setdefault("http3", False)
            options.setdefault("native_callback", native_callback)
            if "certificate_path" in options:
                server = await NativeHttpServer.bind_secure(address, port, **options)
            else:
                server = await NativeHttpServer.bind(address, port, **options)
            if handler is not None:
                server.serve(handler)
            return server

        running = RunningServer(loop_thread.run(bind()), loop_thread)
        started.append(running)
        return running

    yield start
    for running in started:
        with contextlib.suppress(Exception):
            running.close(force=True)


@dataclass
class Certificates:
    ca: trustme.CA
    ca_path: Path
    cert_path: Path
    key_path: Path
    encrypted_key_path: Path
    password: str
    client_cert_path: Path
    client_key_path: Path
    client_ca: trustme.CA
    client_ca_path: Path


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost", "127.0.0.1", "::1")
    ca_path = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    cert_path = directory / "server.pem"
    server_cert.cert_chain_pems[0].write_to_path(str(cert_path))
    for extra in server_cert.cert_chain_pems[1:]:
        extra.write_to_path(str(cert_path), append=True)
    key_path = directory / "server.key"
    server_cert.private_key_pem.write_to_path(str(key_path))
    password = "correct horse"
    key = serialization.load_pem_private_key(server_cert.private_key_pem.bytes(), password=None)
    encrypted_key_path = directory / "server-encrypted.key"
    encrypted_key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(password.encode()),
        )
    )
    client_ca = trustme.CA()
    client = client_ca.issue_cert("client@example.test")
    client_cert_path = directory / "client.pem"
    client.cert_chain_pems[0].write_to_path(str(client_cert_path))
    client_key_path = directory / "client.key"
    client.private_key_pem.write_to_path(str(client_key_path))
    client_ca_path = directory / "client-ca.pem"
    client_ca.cert_pem.write_to_path(str(client_ca_path))
    return Certificates(
        ca,
        ca_path,
        cert_path,
        key_path,
        encrypted_key_path,
        password,
        client_cert_path,
        client_key_path,
        client_ca,
        client_ca_path,
    )


@pytest.fixture
def data_file(tmp_path: Path) -> tuple[Path, bytes]:
    """A file of 3 MiB and a bit of random bytes, and its content."""
    data = os.urandom(3 * 1024 * 1024 + 12345)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    return path, data


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    """A directory holding the command line's test app, ``cliapp.py``."""
    shutil.copy(CLI_APP, tmp_path / "cliapp.py")
    return tmp_path
