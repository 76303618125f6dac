"""The command line, run as real processes: serving, workers, signals,
respawn, proxy headers, the app factory, root path, access log, HTTP
versions, reload, TLS with client certificates, and clear failures."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from apps.harness import free_port

ROOT = Path(__file__).resolve().parent.parent

CLI_APP = Path(__file__).parent / "apps" / "cliapp.py"


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    shutil.copy(CLI_APP, tmp_path / "cliapp.py")
    return tmp_path


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "server_native", *args]


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@contextmanager
def serving(app_dir: Path, *args: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    port = free_port()
    process = subprocess.Popen(
        command("serve", *args, "--port", str(port)),
        cwd=app_dir,
        env=environment(),
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
                get(port, "/")
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


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def test_serves_an_asgi_app(app_dir: Path) -> None:
    with serving(app_dir, "cliapp:app") as (_, port):
        status, body = get(port, "/")
    assert status == 200
    assert body.split()[1:3] == ["127.0.0.1", "http"]


def test_detects_a_wsgi_app(app_dir: Path) -> None:
    with serving(app_dir, "cliapp:wsgi") as (_, port):
        assert get(port, "/hello") == (200, "wsgi /hello '127.0.0.1'")


def test_trusted_proxy_headers_are_believed(app_dir: Path) -> None:
    with serving(app_dir, "cliapp:app") as (_, port):
        _, body = get(port, "/", {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"})
    assert body.split()[1:3] == ["203.0.113.7", "https"]


def test_untrusted_proxy_headers_are_ignored(app_dir: Path) -> None:
    with serving(app_dir, "cliapp:app", "--forwarded-allow-ips", "10.0.0.1") as (_, port):
        _, body = get(port, "/", {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"})
    assert body.split()[1:3] == ["127.0.0.1", "http"]


def pids_seen(port: int, attempts: int = 200) -> set[str]:
    return {get(port, "/")[1].split()[0] for _ in range(attempts)}


def test_two_workers_share_the_port(app_dir: Path) -> None:
    with serving(app_dir, "cliapp:app", "--workers", "2") as (_, port):
        deadline = time.monotonic() + 30
        pids: set[str] = set()
        while len(pids) < 2 and time.monotonic() < deadline:
            pids |= pids_seen(port, 50)
    assert len(pids) == 2


def test_a_killed_worker_is_replaced(app_dir: Path) -> None:
    with serving(app_dir, "cliapp:app", "--workers", "2") as (_, port):
        victim = int(get(port, "/")[1].split()[0])
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        replaced = False
        while not replaced and time.monotonic() < deadline:
            try:
                pids = pids_seen(port, 20)
            except OSError:
                continue
            replaced = len(pids - {str(victim)}) == 2
        assert replaced, "no second live worker appeared after the kill"


def test_sigterm_drains_requests_in_flight(app_dir: Path) -> None:
    with serving(app_dir, "cliapp:app", "--workers", "2") as (process, port):
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(get(port, "/slow")[0])) for _ in range(6)]
        for thread in threads:
            thread.start()
        time.sleep(0.3)  # let the requests reach the workers; not an assertion
        os.kill(process.pid, signal.SIGTERM)
        for thread in threads:
            thread.join(20)
        assert process.wait(30) == 0
    assert results == [200] * 6


def test_a_bad_app_path_is_one_line_and_non_zero(app_dir: Path) -> None:
    result = subprocess.run(command("serve", "cliapp:nothing"), cwd=app_dir, env=environment(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["server-native: error: module 'cliapp' has no attribute 'nothing'"]


def test_an_unimportable_module_is_one_line_and_non_zero(app_dir: Path) -> None:
    result = subprocess.run(command("serve", "nosuchmodule:app"), cwd=app_dir, env=environment(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "cannot import module 'nosuchmodule'" in result.stderr


def test_app_dir_is_where_the_app_is_imported_from(app_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    args = ("serve", "cliapp:nothing", "--app-dir", str(app_dir))
    result = subprocess.run(command(*args), cwd=elsewhere, env=environment(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    # found and imported (the attribute is what is missing), though the cwd has no cliapp
    assert result.stderr.strip().splitlines() == ["server-native: error: module 'cliapp' has no attribute 'nothing'"]


def stop(process: subprocess.Popen[str]) -> str:
    """SIGTERM the server and return everything it printed."""
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    return output


def test_factory_is_called_for_the_app(app_dir: Path) -> None:
    with serving(app_dir, "cliapp:create_app", "--factory") as (_, port):
        status, body = get(port, "/")
    assert status == 200 and body.split()[1:3] == ["127.0.0.1", "http"]


def test_root_path_reaches_the_scope(app_dir: Path) -> None:
    with serving(app_dir, "cliapp:app", "--root-path", "/api") as (_, port):
        assert get(port, "/")[1].split()[4] == "root=/api"


def test_access_log_lines_name_the_request(app_dir: Path) -> None:
    with serving(app_dir, "cliapp:app", "--access-log") as (process, port):
        assert get(port, "/logged?x=1")[0] == 200
        output = stop(process)
    assert '"GET /logged HTTP/1.1" 200' in output, output


def test_without_access_log_requests_are_not_logged(app_dir: Path) -> None:
    with serving(app_dir, "cliapp:app") as (process, port):
        assert get(port, "/quiet")[0] == 200
        output = stop(process)
    assert "/quiet" not in output, output


def h2c_prior_knowledge_answers(port: int) -> bool:
    """Whether an HTTP/2 preface gets an HTTP/2 SETTINGS frame back."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        answer = sock.recv(9)
    return len(answer) == 9 and answer[3] == 0x04


@pytest.mark.parametrize(("http", "h2c"), [("auto", True), ("1", False)])
def test_http_option_decides_h2c(app_dir: Path, http: str, h2c: bool) -> None:
    with serving(app_dir, "cliapp:app", "--http", http) as (_, port):
        assert h2c_prior_knowledge_answers(port) is h2c
        assert get(port, "/")[0] == 200


def test_reload_restarts_the_worker_when_a_file_changes(app_dir: Path) -> None:
    with serving(app_dir, "cliapp:app", "--reload", "--reload-dir", str(app_dir)) as (_, port):
        first = get(port, "/")[1].split()[0]
        source = app_dir / "cliapp.py"
        source.write_text(source.read_text() + "\n# changed\n")
        deadline = time.monotonic() + 30
        pid = first
        while pid == first and time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                pid = get(port, "/")[1].split()[0]
            except OSError:
                continue
    assert pid != first, "the worker was not replaced after its module changed"


def test_tls_with_required_client_certificates(app_dir: Path, tmp_path: Path) -> None:
    import ssl

    import trustme

    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    server_cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client_cert = ca.issue_cert("client@example.org")
    client_cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "client.pem"))
    port = free_port()
    args = (
        "serve", "cliapp:app", "--port", str(port), "--no-http3",
        "--ssl-certfile", str(tmp_path / "server.pem"), "--ssl-keyfile", str(tmp_path / "server.pem"),
        "--ssl-ca", str(tmp_path / "ca.pem"), "--ssl-cert-reqs", "2",
    )  # fmt: skip
    process = subprocess.Popen(command(*args), cwd=app_dir, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        with_cert = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        with_cert.load_cert_chain(str(tmp_path / "client.pem"))
        deadline = time.monotonic() + 30
        body = None
        while body is None and time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                connection = http.client.HTTPSConnection("127.0.0.1", port, context=with_cert, timeout=10)
                connection.request("GET", "/")
                body = connection.getresponse().read().decode()
                connection.close()
            except OSError:
                time.sleep(0.1)
        assert body is not None and body.split()[1:3] == ["127.0.0.1", "https"]
        without_cert = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        with pytest.raises((ssl.SSLError, ConnectionError)):
            connection = http.client.HTTPSConnection("127.0.0.1", port, context=without_cert, timeout=10)
            connection.request("GET", "/")
            connection.getresponse().read()
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def websocket_extensions(port: int) -> str | None:
    """The Sec-WebSocket-Extensions answer to an upgrade offering permessage-deflate."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/ws", headers={
            "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Extensions": "permessage-deflate",
        })
        response = connection.getresponse()
        assert response.status == 101
        return response.getheader("Sec-WebSocket-Extensions")
    finally:
        connection.close()


@pytest.mark.parametrize(("flag", "answer"), [((), "permessage-deflate"), (("--no-ws-per-message-deflate",), None)])
def test_websocket_compression_flag(app_dir: Path, flag: tuple[str, ...], answer: str | None) -> None:
    with serving(app_dir, "cliapp:app", *flag) as (_, port):
        assert websocket_extensions(port) == answer


def test_a_bad_option_exits_with_usage(app_dir: Path) -> None:
    result = subprocess.run(command("serve", "cliapp:app", "--http", "3"), cwd=app_dir, env=environment(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_the_console_script_entry_point_is_main() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import server_native.__main__ as m; print(m.main.__module__)"],
        env=environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.strip() == "server_native.cli"
