"""The command line, run as real processes: serving, workers, signals,
respawn, proxy headers, the app factory, root path, access log, HTTP
versions, reload, TLS with client certificates, logging, response headers,
--version, and clear failures."""

from __future__ import annotations

import asyncio
import email.utils
import http.client
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from apps.harness import H1WebSocket, WebSocketClosed, free_port, wait_refused
from cliserver import command, environment, get, serve_once, serving, stop
from conftest import Certificates
from h3client import H3Response


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
        # SIGTERM once every request has reached a worker: one still in the
        # socket's backlog when the workers stop accepting is not in flight.
        deadline = time.monotonic() + 20
        while len(list(app_dir.glob("arrived-*"))) < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGTERM)
        for thread in threads:
            thread.join(20)
        assert process.wait(30) == 0
    assert results == [200] * 6


def test_a_bad_app_path_is_one_line_and_non_zero(app_dir: Path) -> None:
    result = subprocess.run(
        command("serve", "cliapp:nothing"), cwd=app_dir, env=environment(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["server-native: error: module 'cliapp' has no attribute 'nothing'"]


def test_an_unimportable_module_is_one_line_and_non_zero(app_dir: Path) -> None:
    result = subprocess.run(
        command("serve", "nosuchmodule:app"), cwd=app_dir, env=environment(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "cannot import module 'nosuchmodule'" in result.stderr


def test_app_dir_is_where_the_app_is_imported_from(app_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    args = ("serve", "cliapp:nothing", "--app-dir", str(app_dir))
    result = subprocess.run(
        command(*args), cwd=elsewhere, env=environment(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    # found and imported (the attribute is what is missing), though the cwd has no cliapp
    assert result.stderr.strip().splitlines() == ["server-native: error: module 'cliapp' has no attribute 'nothing'"]


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
    process = subprocess.Popen(
        command(*args),
        cwd=app_dir,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
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
        connection.request(
            "GET",
            "/ws",
            headers={
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Extensions": "permessage-deflate",
            },
        )
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
    result = serve_once(app_dir, "--http", "3")
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
    assert result.stdout.strip() == "server_native.cli.main"


# ---------------------------------------------------------------- logging

DJANGO_APP = """
import logging

from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY="server-native-tests",
    ALLOWED_HOSTS=["127.0.0.1"],
    ROOT_URLCONF=__name__,
    INSTALLED_APPS=[],
    MIDDLEWARE=[],
    DATABASES={},
    # The app's own logging: its "shop" logger to stdout in its own format;
    # the root logger and everyone else left at Python's defaults.
    LOGGING={
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"shop": {"format": "SHOP-FORMAT %(message)s"}},
        "handlers": {"shop": {"class": "logging.StreamHandler", "formatter": "shop", "stream": "ext://sys.stdout"}},
        "loggers": {"shop": {"handlers": ["shop"], "level": "INFO"}},
    },
)

from django.core.asgi import get_asgi_application  # noqa: E402
from django.http import HttpResponse  # noqa: E402
from django.urls import path  # noqa: E402


def order(request):
    logging.getLogger("shop").info("order placed")
    logging.getLogger("chatty.library").info("third-party chatter")
    return HttpResponse("ordered")


urlpatterns = [path("order", order)]
application = get_asgi_application()
"""


def test_an_app_that_configures_its_logging_sees_each_record_once(app_dir: Path) -> None:
    (app_dir / "djangoapp.py").write_text(DJANGO_APP)
    with serving(app_dir, "djangoapp:application", "--lifespan", "off", "--access-log") as (process, port):
        assert get(port, "/order") == (200, "ordered")
        output = stop(process)
    assert output.count("order placed") == 1, output
    assert "SHOP-FORMAT order placed" in output
    assert "third-party chatter" not in output, output
    # The server's own loggers still speak.
    assert "INFO server_native.error: Server listening on http://127.0.0.1:" in output, output
    assert '"GET /order HTTP/1.1" 200' in output, output


# ---------------------------------------------------------------- shutdown

#: ~8 s of response: longer than a 5 s drain would let it run.
LONG_STREAM = 17
STREAM_BODY = "".join(f"chunk {index}\n" for index in range(LONG_STREAM)) + "end\n"


def open_stream(port: int, chunks: int = LONG_STREAM) -> http.client.HTTPResponse:
    """A streamed response, once its first chunk has arrived."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", f"/stream?chunks={chunks}")
    response = connection.getresponse()
    assert response.readline() == b"chunk 0\n"
    return response


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_lets_a_long_stream_finish(app_dir: Path, workers: str) -> None:
    with serving(app_dir, "cliapp:app", "--workers", workers) as (process, port):
        response = open_stream(port)
        os.kill(process.pid, signal.SIGTERM)
        rest = response.read()  # IncompleteRead if the drain cut it
        assert process.wait(30) == 0
    assert "chunk 0\n" + rest.decode() == STREAM_BODY


@pytest.mark.parametrize(
    ("workers", "first", "second"),
    [("1", signal.SIGTERM, signal.SIGTERM), ("1", signal.SIGTERM, signal.SIGINT), ("2", signal.SIGINT, signal.SIGTERM)],
)
def test_a_second_signal_cuts_a_long_stream_at_once(
    app_dir: Path, workers: str, first: signal.Signals, second: signal.Signals
) -> None:
    with serving(app_dir, "cliapp:app", "--workers", workers) as (process, port):
        response = open_stream(port, chunks=120)  # a minute
        os.kill(process.pid, first)
        wait_refused(port)
        assert process.poll() is None  # still draining the stream
        os.kill(process.pid, second)
        assert process.wait(10) == 128 + second
        with pytest.raises(http.client.IncompleteRead):
            response.read()


# ---------------------------------------------------------------- reload


def test_reload_keeps_the_port_open_while_the_worker_is_replaced(app_dir: Path) -> None:
    """Clients connecting all along get answers, never ECONNREFUSED: the
    supervisor holds the listening socket across the restarts."""
    reloads = 3
    source = app_dir / "cliapp.py"
    with serving(app_dir, "cliapp:app", "--reload", "--reload-dir", str(app_dir)) as (_, port):
        pids = [get(port, "/")[1].split()[0]]
        edited_for = ""
        failures: list[OSError] = []
        answers = 0
        deadline = time.monotonic() + 90
        while len(pids) <= reloads and time.monotonic() < deadline:
            if edited_for != pids[-1]:
                # One edit per worker: the next reload.
                source.write_text(source.read_text() + f"\n# change {len(pids)}\n")
                edited_for = pids[-1]
            try:
                status, body = get(port, "/", {"Connection": "close"})
            except OSError as exc:
                failures.append(exc)
                time.sleep(0.01)
                continue
            answers += 1
            assert status == 200
            if (pid := body.split()[0]) not in pids:
                pids.append(pid)
    assert failures == [], f"{len(failures)} failed of {answers + len(failures)}: {failures[:5]}"
    assert len(pids) > reloads, f"only {len(pids) - 1} reloads happened"


# ---------------------------------------------------------------- --version, --help


def test_version_names_the_package_and_the_native_library() -> None:
    import server_native

    result = subprocess.run(command("--version"), env=environment(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    package, native = result.stdout.splitlines()
    assert package == f"server-native {server_native.__version__}"
    assert native.startswith(
        f"native library: {server_native._native.__version__} (ABI {server_native._native.ABI_VERSION}) from "
    )


def test_help_lists_the_commands_and_exits_0() -> None:
    result = subprocess.run(command("--help"), env=environment(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "{serve,setup,info}" in result.stdout and "--version" in result.stdout
    assert result.stderr == ""


# ---------------------------------------------------------------- access log, every interface


@pytest.mark.parametrize(
    "app",
    [("cliapp:app",), ("cliapp:wsgi",), ("cliapp:direct", "--interface", "direct")],
    ids=["asgi", "wsgi", "direct"],
)
def test_access_log_for_every_interface(app_dir: Path, app: tuple[str, ...]) -> None:
    with serving(app_dir, *app, "--access-log") as (process, port):
        assert get(port, "/logged?x=1")[0] == 200
        output = stop(process)
    assert re.search(r'INFO server_native\.access: 127\.0\.0\.1:\d+ - "GET /logged HTTP/1\.1" 200$', output, re.M), (
        output
    )


RUN_SCRIPT = """
import os
import sys

import server_native
import cliapp

interface, port = sys.argv[1], int(sys.argv[2])
apps = {"asgi": cliapp.app, "wsgi": cliapp.wsgi, "direct": cliapp.direct, "native_direct": cliapp.direct}
options = {"native_direct": True} if interface == "native_direct" else {}
server_native.run(
    apps[interface], port=port, interface=interface.removeprefix("native_"), access_log=True, http3=False, **options
)
"""


@pytest.mark.parametrize("interface", ["asgi", "wsgi", "direct", "native_direct"])
def test_access_log_through_run(app_dir: Path, interface: str) -> None:
    (app_dir / "runit.py").write_text(RUN_SCRIPT)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "runit.py", interface, str(port)], cwd=app_dir, env=environment(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None and time.monotonic() < deadline, process.communicate(timeout=10)[0]
            try:
                status, _ = get(port, "/through-run")
                break
            except OSError:
                time.sleep(0.1)
        assert status == 200
        output = stop(process)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    assert re.search(
        r'INFO server_native\.access: 127\.0\.0\.1:\d+ - "GET /through-run HTTP/1\.1" 200$', output, re.M
    ), output
    assert "Server listening on http://127.0.0.1:" in output  # run() configures the server's loggers


# ---------------------------------------------------------------- response headers


def response_headers(port: int, http2: bool = False) -> httpx.Headers:
    with httpx.Client(http1=not http2, http2=http2, timeout=10) as client:
        response = client.get(f"http://127.0.0.1:{port}/")
    assert response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
    return response.headers


@pytest.mark.parametrize("app", ["cliapp:app", "cliapp:wsgi"])
def test_default_headers_are_a_date_and_no_server(app_dir: Path, app: str) -> None:
    with serving(app_dir, app) as (_, port):
        for http2 in (False, True):
            headers = response_headers(port, http2)
            assert "server" not in headers
            assert email.utils.parsedate_to_datetime(headers["date"]).tzinfo is not None


@pytest.mark.parametrize(
    "app",
    [("cliapp:app",), ("cliapp:wsgi",), ("cliapp:direct", "--interface", "direct")],
    ids=["asgi", "wsgi", "direct"],
)
def test_server_date_and_extra_headers(app_dir: Path, app: tuple[str, ...]) -> None:
    options = (
        "--server-header",
        "--no-date-header",
        "--header",
        "X-Deploy: blue",
        "--header",
        "x-region:eu",
        "--header",
        "Content-Type: application/json",
    )
    with serving(app_dir, *app, *options) as (_, port):
        for http2 in (False, True):
            headers = response_headers(port, http2)
            assert headers["server"] == "server-native"
            assert "date" not in headers
            assert (headers["x-deploy"], headers["x-region"]) == ("blue", "eu")
            # The app's own header wins over a configured one.
            assert headers["content-type"].startswith("text/plain")


def test_a_server_given_with_header_replaces_the_server_header(app_dir: Path) -> None:
    with serving(app_dir, "cliapp:app", "--server-header", "--header", "Server: edge/2") as (_, port):
        assert response_headers(port).get_list("server") == ["edge/2"]


def test_a_bad_header_option_exits_with_usage(app_dir: Path) -> None:
    result = serve_once(app_dir, "--header", "no-colon")
    assert result.returncode == 2
    assert "a header is NAME:VALUE, not 'no-colon'" in result.stderr


def test_over_http3_the_banner_says_so_and_the_headers_apply(app_dir: Path, certs: Certificates) -> None:
    from h3client import h3_connect

    tls = ("--ssl-certfile", str(certs.cert_path), "--ssl-keyfile", str(certs.key_path))
    context = ssl.create_default_context(cafile=str(certs.ca_path))

    def https_get(port: int) -> None:
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
        try:
            connection.request("GET", "/")
            connection.getresponse().read()
        finally:
            connection.close()

    async def h3_get(port: int) -> H3Response:
        async with h3_connect("127.0.0.1", port, str(certs.ca_path)) as client:
            return await client.request("GET", "/")

    options = ("--server-header", "--no-date-header", "--header", "x-deploy:blue")
    with serving(app_dir, "cliapp:app", *tls, *options, ready=https_get) as (process, port):
        response = asyncio.run(h3_get(port))
        output = stop(process)
    assert response.status == 200
    assert (response.header("server"), response.header("x-deploy"), response.header("date")) == (
        "server-native",
        "blue",
        None,
    )
    assert f"Server listening on https://127.0.0.1:{port} via server_native (HTTP/1.1, HTTP/2, HTTP/3)" in output, (
        output
    )


def test_without_http3_the_banner_leaves_it_out(app_dir: Path, certs: Certificates) -> None:
    tls = ("--ssl-certfile", str(certs.cert_path), "--ssl-keyfile", str(certs.key_path), "--no-http3")
    context = ssl.create_default_context(cafile=str(certs.ca_path))

    def https_get(port: int) -> None:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="localhost"),
        ):
            pass

    with serving(app_dir, "cliapp:app", *tls, ready=https_get) as (process, port):
        output = stop(process)
    assert f"Server listening on https://127.0.0.1:{port} via server_native (HTTP/1.1, HTTP/2)" in output, output


# ---------------------------------------------------------------- WebSocket limits


def test_ws_max_size_closes_a_larger_message_with_1009(app_dir: Path) -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with serving(app_dir, "cliapp:app", "--ws-max-size", "1024") as (_, port):
        with connect(f"ws://127.0.0.1:{port}/ws", max_size=None, open_timeout=10) as socket_at_limit:
            socket_at_limit.send(b"x" * 1024)  # the app returns after one message: a normal close
            with pytest.raises(ConnectionClosed) as closed:
                socket_at_limit.recv(timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
        with connect(f"ws://127.0.0.1:{port}/ws", max_size=None, open_timeout=10) as socket_over_limit:
            socket_over_limit.send(b"x" * 1025)
            with pytest.raises(ConnectionClosed) as closed:
                socket_over_limit.recv(timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


def test_sigterm_closes_open_websockets_with_1012_and_exits(app_dir: Path) -> None:
    """The app's receive() gets the disconnect (the cli app then returns),
    so the server exits at once with status 0."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with serving(app_dir, "cliapp:app") as (process, port):
        with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=10) as ws:
            os.killpg(process.pid, signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
        assert process.wait(30) == 0


def test_ws_ping_options_close_a_silent_client_with_1011(app_dir: Path) -> None:
    with serving(app_dir, "cliapp:app", "--ws-ping-interval", "0.1", "--ws-ping-timeout", "0.3") as (_, port):
        with H1WebSocket(port, path="/ws", answer_pings=False) as ws:
            with pytest.raises(WebSocketClosed) as closed:
                ws.receive()
    assert (closed.value.code, closed.value.reason) == (1011, "keepalive ping timeout")


def test_ws_max_queue_must_be_positive(app_dir: Path) -> None:
    result = serve_once(app_dir, "--ws-max-queue", "0")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["server-native: error: ValueError: ws_max_queue must be positive"]
