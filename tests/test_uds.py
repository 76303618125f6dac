"""Serving on a Unix domain socket (``uds=``, ``--uds``), as nginx's
``proxy_pass http://unix:/run/app.sock`` would reach it: real servers, real
clients (httpx over ``uds``, curl ``--unix-socket``, raw ``AF_UNIX``), the
CLI with workers and signals, and the socket file's life."""

from __future__ import annotations

import errno
import http.client
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from apps.harness import serving
from conftest import BackgroundLoop, Certificates, requires_curl

from server_native import NativeHttpServer
from server_native.interfaces.asgi import serve_asgi
from server_native.interfaces.direct import NativeDirectResponse, serve_native_direct
from server_native.interfaces.wsgi import serve_wsgi
from server_native.runtime.bound import tls_settings
from server_native.runtime.proxy import ProxyHeaders

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="Unix domain sockets")

ROOT = Path(__file__).resolve().parent.parent
TRANSPORTS = [pytest.param(True, id="native"), pytest.param(False, id="bridge")]


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[str]:
    # AF_UNIX paths are short (108 bytes): pytest's tmp_path can be too long.
    directory = Path(f"/tmp/sn-uds-{os.getpid()}-{tmp_path.name[-12:]}")
    directory.mkdir(exist_ok=True)
    yield str(directory / "app.sock")
    for leftover in directory.iterdir():
        leftover.unlink()
    directory.rmdir()


def uds_client(path: str, **options: Any) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=path, **options), base_url="http://app", timeout=10)


def raw_request(path: str, request: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(path)
        client.sendall(request)
        chunks = []
        while chunk := client.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def scope_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    server = scope["server"]
    body = json.dumps(
        {"client": scope["client"], "server": list(server), "version": scope["http_version"], "scheme": scope["scheme"]}
    )
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body.encode()})


@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_asgi_over_http1_and_h2c(sock_path: str, native_callback: bool) -> None:
    with serving(serve_asgi, scope_app, uds=sock_path, native_callback=native_callback):
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
        with uds_client(sock_path) as client:
            http1 = client.get("/").json()
        with uds_client(sock_path, http1=False, http2=True) as client:
            response = client.get("/")
            h2 = response.json()
        assert response.http_version == "HTTP/2"
    assert http1 == {"client": None, "server": [sock_path, None], "version": "1.1", "scheme": "http"}
    assert h2["version"] == "2" and h2["client"] is None
    assert not os.path.lexists(sock_path), "the socket file outlived the server"


@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_a_trusted_proxy_in_front_of_the_socket_names_the_client(sock_path: str, native_callback: bool) -> None:
    proxy = ProxyHeaders(["10.0.0.1"])  # Unix peers are trusted whatever the list: the file mode guards them.
    with serving(serve_asgi, scope_app, uds=sock_path, proxy=proxy, native_callback=native_callback):
        with uds_client(sock_path) as client:
            seen = client.get("/", headers={"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}).json()
    assert seen["client"] == ["203.0.113.7", 0]
    assert seen["scheme"] == "https"


def environ_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    names = ("REMOTE_ADDR", "REMOTE_PORT", "SERVER_NAME", "SERVER_PORT")
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps({name: environ.get(name) for name in names}).encode()]


def test_wsgi_environ_follows_gunicorn(sock_path: str) -> None:
    with serving(serve_wsgi, environ_app, uds=sock_path):
        with uds_client(sock_path) as client:
            with_host = client.get("http://example.com:8080/").json()
        without_host = raw_request(sock_path, b"GET / HTTP/1.0\r\n\r\n")
    assert with_host == {"REMOTE_ADDR": "", "REMOTE_PORT": None, "SERVER_NAME": "example.com", "SERVER_PORT": "8080"}
    head, _, body = without_host.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200")
    assert json.loads(body) == {"REMOTE_ADDR": "", "REMOTE_PORT": None, "SERVER_NAME": sock_path, "SERVER_PORT": ""}


@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_direct_handler_sees_no_client(sock_path: str, native_callback: bool) -> None:
    def handler(request: Any) -> NativeDirectResponse:
        return NativeDirectResponse.bytes(200, None, repr(request.client))

    with serving(serve_native_direct, handler, uds=sock_path, native_callback=native_callback):
        reply = raw_request(sock_path, b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"\r\n\r\nNone")


@contextmanager
def http_server_on(
    path: str, loop_thread: BackgroundLoop, native_callback: bool, **options: Any
) -> Iterator[NativeHttpServer]:
    async def handler(request: Any) -> None:
        info = request.connection_info
        request.response.write(f"{tuple(info)} {request.requested_uri.geturl()}")
        await request.response.close()

    async def bind() -> NativeHttpServer:
        server = await NativeHttpServer.bind_unix(path, http3=False, native_callback=native_callback, **options)
        server.serve(handler)
        return server

    server = loop_thread.run(bind())
    try:
        yield server
    finally:
        loop_thread.run(server.close())


@requires_curl
@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_http_server_bind_unix_with_curl(sock_path: str, loop_thread: BackgroundLoop, native_callback: bool) -> None:
    with http_server_on(sock_path, loop_thread, native_callback) as server:
        assert (server.uds, server.address, server.addresses, server.port) == (sock_path, sock_path, [], 0)
        outputs = [
            subprocess.run(
                ["curl", "-sS", "--max-time", "10", *flags, "--unix-socket", sock_path, "http://app/x?y=1"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout
            for flags in ([], ["--http2-prior-knowledge"])
        ]
    assert outputs == ["('', 0, 0) http://app/x?y=1"] * 2
    assert not os.path.lexists(sock_path)


@requires_curl
def test_tls_over_the_socket(sock_path: str, loop_thread: BackgroundLoop, certs: Certificates) -> None:
    tls = tls_settings(certificate_path=certs.cert_path, key_path=certs.key_path)
    with http_server_on(sock_path, loop_thread, True, tls=tls):
        output = subprocess.run(
            [
                "curl",
                "-sS",
                "--max-time",
                "10",
                "--cacert",
                str(certs.ca_path),
                "--unix-socket",
                sock_path,
                "https://localhost/",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    assert output == "('', 0, 0) https://localhost/"


def test_socket_file_mode(sock_path: str, loop_thread: BackgroundLoop) -> None:
    with http_server_on(sock_path, loop_thread, True, uds_mode=0o660):
        assert stat.S_IMODE(os.lstat(sock_path).st_mode) == 0o660


def test_a_stale_socket_file_is_replaced(sock_path: str, loop_thread: BackgroundLoop) -> None:
    with socket.socket(socket.AF_UNIX) as gone:
        gone.bind(sock_path)  # bound, never listening, closed: what a killed server leaves
    with http_server_on(sock_path, loop_thread, True):
        assert raw_request(sock_path, b"GET / HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200")


def test_a_live_socket_is_not_stolen(sock_path: str, loop_thread: BackgroundLoop) -> None:
    with http_server_on(sock_path, loop_thread, True):
        with pytest.raises(OSError) as raised:
            loop_thread.run(NativeHttpServer.bind_unix(sock_path))
        assert raised.value.errno == errno.EADDRINUSE
        assert raw_request(sock_path, b"GET / HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200")


def test_a_regular_file_is_refused_and_left_alone(sock_path: str, loop_thread: BackgroundLoop) -> None:
    Path(sock_path).write_text("precious")
    with pytest.raises(FileExistsError, match="not a socket"):
        loop_thread.run(NativeHttpServer.bind_unix(sock_path))
    assert Path(sock_path).read_text() == "precious"


def test_a_missing_directory_is_a_clear_error(sock_path: str, loop_thread: BackgroundLoop) -> None:
    with pytest.raises(FileNotFoundError, match="cannot bind unix socket"):
        loop_thread.run(NativeHttpServer.bind_unix(os.path.join(sock_path, "nowhere", "app.sock")))


def test_close_leaves_a_file_that_replaced_the_socket(sock_path: str, loop_thread: BackgroundLoop) -> None:
    with http_server_on(sock_path, loop_thread, True):
        os.unlink(sock_path)
        Path(sock_path).write_text("someone else's")
    assert Path(sock_path).read_text() == "someone else's"


def test_serves_an_inherited_listening_fd(loop_thread: BackgroundLoop) -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        server = loop_thread.run(NativeHttpServer.bind("", fd=listening.fileno(), http3=False))
        try:
            server.serve(_hello)
            assert server.port == listening.getsockname()[1]
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            connection.request("GET", "/")
            assert connection.getresponse().read() == b"hello"
            connection.close()
        finally:
            loop_thread.run(server.close())


async def _hello(request: Any) -> None:
    request.response.write("hello")
    await request.response.close()


def test_an_fd_that_is_not_a_socket_is_a_clear_error(tmp_path: Path, loop_thread: BackgroundLoop) -> None:
    with open(tmp_path / "file", "w") as file:
        with pytest.raises(OSError, match="not a stream socket"):
            loop_thread.run(NativeHttpServer.bind("", fd=file.fileno()))


# -- the command line ---------------------------------------------------------

CLI_APP = Path(__file__).parent / "apps" / "cliapp.py"


def cli(app_dir: Path, *args: str, **options: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "server_native", "serve", *args],
        cwd=app_dir,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **options,
    )


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    shutil.copy(CLI_APP, tmp_path / "udsapp.py")
    return tmp_path


def get(path: str, target: str = "/") -> str:
    with uds_client(path) as client:
        response = client.get(target)
    assert response.status_code == 200
    return response.text


@contextmanager
def cli_serving(app_dir: Path, path: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    process = cli(app_dir, *args, "--uds", path)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                get(path)
                break
            except (OSError, httpx.TransportError):
                assert time.monotonic() < deadline, "the server never answered"
                time.sleep(0.1)
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


@pytest.mark.parametrize(
    ("target", "expected"),
    [("udsapp:app", " None "), ("udsapp:wsgi", "wsgi / ''"), ("udsapp:direct", "direct None")],
)
def test_cli_serves_every_interface_and_removes_the_socket(
    app_dir: Path, sock_path: str, target: str, expected: str
) -> None:
    interface = target.split(":")[1].replace("app", "asgi")
    with cli_serving(app_dir, sock_path, target, "--interface", interface) as process:
        body = get(sock_path)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    assert expected in body
    assert not os.path.lexists(sock_path)


def test_cli_workers_share_one_socket_respawn_and_drain(app_dir: Path, sock_path: str) -> None:
    with cli_serving(app_dir, sock_path, "udsapp:app", "--workers", "2") as process:
        pids: set[str] = set()
        deadline = time.monotonic() + 30
        while len(pids) < 2 and time.monotonic() < deadline:
            pids.add(get(sock_path).split()[0])
        assert len(pids) == 2
        assert get(sock_path).split()[3] == sock_path

        victim = int(sorted(pids)[0])
        os.kill(victim, signal.SIGKILL)
        replaced: set[str] = set()
        deadline = time.monotonic() + 30
        while len(replaced - {str(victim)}) < 2 and time.monotonic() < deadline:
            try:
                replaced.add(get(sock_path).split()[0])
            except (OSError, httpx.TransportError):
                continue  # the dying worker's half-accepted connection
        assert len(replaced - {str(victim)}) == 2, "no second live worker appeared after the kill"

        results: list[int] = []

        def slow() -> None:
            with uds_client(sock_path) as client:
                results.append(client.get("/slow").status_code)

        threads = [threading.Thread(target=slow) for _ in range(4)]
        for thread in threads:
            thread.start()
        # SIGTERM once every request has reached a worker: one still in the
        # socket's backlog when the workers stop accepting is not in flight.
        deadline = time.monotonic() + 20
        while len(list(app_dir.glob("arrived-*"))) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(20)
        assert process.wait(30) == 0
    assert results == [200] * 4
    assert not os.path.lexists(sock_path)


def test_cli_replaces_a_stale_socket(app_dir: Path, sock_path: str) -> None:
    with socket.socket(socket.AF_UNIX) as gone:
        gone.bind(sock_path)
    with cli_serving(app_dir, sock_path, "udsapp:app", "--workers", "2"):
        assert get(sock_path).split()[3] == sock_path


@pytest.mark.parametrize("workers", ["1", "2"])
def test_cli_refuses_a_regular_file(app_dir: Path, sock_path: str, workers: str) -> None:
    Path(sock_path).write_text("precious")
    result = cli(app_dir, "udsapp:app", "--uds", sock_path, "--workers", workers)
    output, _ = result.communicate(timeout=60)
    assert result.returncode == 1
    assert output.strip().splitlines() == [
        f"server-native: error: [Errno 17] cannot bind unix socket {sock_path}: a file that is not a socket is in the way"
    ]
    assert Path(sock_path).read_text() == "precious"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--uds", "/tmp/x.sock", "--port", "8000"], "--uds replaces --host/--port"),
        (["--uds", "/tmp/x.sock", "--host", "127.0.0.1"], "--uds replaces --host/--port"),
        (["--uds-mode", "660"], "--uds-mode needs --uds"),
        (["--uds", "/tmp/x.sock", "--uds-mode", "9"], "not an octal file mode"),
    ],
)
def test_cli_contradictions_are_one_line(app_dir: Path, args: list[str], message: str) -> None:
    result = cli(app_dir, "udsapp:app", *args)
    output, _ = result.communicate(timeout=60)
    assert result.returncode == 2
    assert message in output.strip().splitlines()[-1]


def test_cli_missing_directory_is_one_line(app_dir: Path, sock_path: str) -> None:
    result = cli(app_dir, "udsapp:app", "--uds", os.path.join(sock_path, "nowhere", "app.sock"))
    output, _ = result.communicate(timeout=60)
    assert result.returncode == 1
    assert output.strip().splitlines()[-1].startswith("server-native: error: [Errno 2] cannot bind unix socket")
