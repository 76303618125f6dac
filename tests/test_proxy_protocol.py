"""The PROXY protocol (``proxy_protocol=True``, ``--proxy-protocol``): the
client a proxy names in its header is the client every API reports, over
HTTP/1.1, HTTP/2, TLS and Unix sockets, on both transports; a header that is
missing, malformed, truncated, oversized, late or from an untrusted peer
closes the connection with a log line. Driven by raw sockets and by a real
HAProxy (``send-proxy``, ``send-proxy-v2``) and nginx (``proxy_protocol on``)."""

from __future__ import annotations

import json
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from apps.harness import TIMEOUT, free_port, serving
from conftest import BackgroundLoop, Certificates, LogLines
from proxies import (
    GET,
    body_of,
    connect,
    haproxy,
    nginx,
    proxy_v1,
    proxy_v2,
    read_all,
    through,
    tls_context,
    tlv,
)

from server_native import NativeHttpServer, ServerConfig
from server_native.interfaces.asgi import serve_asgi
from server_native.interfaces.direct import NativeDirectResponse, serve_native_direct
from server_native.interfaces.wsgi import serve_wsgi

CLIENT = ("203.0.113.7", 56324)
CLIENT6 = ("2001:db8::7", 4242)
TRANSPORTS = [pytest.param(True, id="native"), pytest.param(False, id="bridge")]


async def who_http_server(request: Any) -> None:
    info = request.connection_info
    request.response.write(f"{info.remote_address} {info.remote_port}")
    await request.response.close()


async def who_asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    host, port = scope["client"] or ("none", 0)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": f"{host} {port}".encode()})


def who_wsgi(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("content-type", "text/plain")])
    return [f"{environ['REMOTE_ADDR']} {environ.get('REMOTE_PORT', 0)}".encode()]


async def who_direct(request: Any) -> NativeDirectResponse:
    host, port = request.client or ("none", 0)
    return NativeDirectResponse.bytes(200, [("content-type", "text/plain")], f"{host} {port}".encode())


def exchange(where: int | str, prefix: bytes, request: bytes = GET, tls: ssl.SSLContext | None = None) -> bytes:
    """``prefix`` (a PROXY header), then ``request`` (over TLS when given);
    everything the server answers until it closes."""
    with connect(where) as raw:
        if tls is None:
            # In one write: a server that refuses the prefix must not reset
            # the connection over a request it did not read.
            raw.sendall(prefix + request)
            return read_all(raw)
        raw.sendall(prefix)
        with tls.wrap_socket(raw, server_hostname="localhost") as secure:
            secure.sendall(request)
            return read_all(secure)


def h2_get(where: int | str, prefix: bytes, tls: ssl.SSLContext | None = None) -> str:
    """One HTTP/2 GET after ``prefix`` (h2c prior knowledge, or h2 over
    TLS): the response body."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(
        1,
        [(":method", "GET"), (":scheme", "https" if tls else "http"), (":authority", "app"), (":path", "/who")],
        end_stream=True,
    )
    with connect(where) as raw:
        raw.sendall(prefix)
        sock = raw if tls is None else tls.wrap_socket(raw, server_hostname="localhost")
        sock.sendall(conn.data_to_send())
        body = b""
        while True:
            data = sock.recv(65536)
            assert data, "the server closed the connection"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    body += event.data
                elif isinstance(event, h2.events.StreamEnded):
                    return body.decode()
            sock.sendall(conn.data_to_send())


# -- raw sockets: every API and protocol --------------------------------------


@pytest.mark.parametrize("header", [proxy_v1(CLIENT, ("127.0.0.1", 80)), proxy_v2(CLIENT)], ids=["v1", "v2"])
def test_http_server_reports_the_client_of_the_header_over_http1_h2c_and_tls(
    serve: Any, certs: Certificates, header: bytes
) -> None:
    plain = serve(who_http_server, proxy_protocol=True)
    assert body_of(exchange(plain.port, header)) == "203.0.113.7 56324"
    assert h2_get(plain.port, header) == "203.0.113.7 56324"
    secure = serve(who_http_server, proxy_protocol=True, certificate_path=certs.cert_path, key_path=certs.key_path)
    assert body_of(exchange(secure.port, header, tls=tls_context(certs))) == "203.0.113.7 56324"
    assert h2_get(secure.port, header, tls=tls_context(certs, "h2")) == "203.0.113.7 56324"


@pytest.mark.parametrize("native_callback", TRANSPORTS)
@pytest.mark.parametrize(
    ("helper", "app"), [(serve_asgi, who_asgi), (serve_native_direct, who_direct)], ids=["asgi", "direct"]
)
def test_asgi_and_direct_report_the_client_of_the_header(helper: Any, app: Any, native_callback: bool) -> None:
    with serving(helper, app, proxy_protocol=True, native_callback=native_callback) as server:
        assert body_of(exchange(server.port, proxy_v1(CLIENT, ("127.0.0.1", 80)))) == "203.0.113.7 56324"
        assert body_of(exchange(server.port, proxy_v2(CLIENT6))) == "2001:db8::7 4242"


def test_wsgi_reports_the_client_of_the_header() -> None:
    with serving(serve_wsgi, who_wsgi, proxy_protocol=True) as server:
        assert (
            body_of(exchange(server.port, proxy_v2(CLIENT, tlvs=tlv(0x01, b"h2") + tlv(0x04, b"\0" * 40))))
            == "203.0.113.7 56324"
        )
        assert body_of(exchange(server.port, proxy_v1(CLIENT6, ("::1", 80)))) == "2001:db8::7 4242"


def test_local_and_unknown_headers_keep_the_real_peer(serve: Any) -> None:
    """A proxy's own health checks send LOCAL (v2) or UNKNOWN (v1)."""
    server = serve(who_http_server, proxy_protocol=True)
    for header in (proxy_v2(None), b"PROXY UNKNOWN\r\n"):
        with connect(server.port) as sock:
            sock.sendall(header + GET)
            own_port = sock.getsockname()[1]
            assert body_of(read_all(sock)) == f"127.0.0.1 {own_port}"


def test_the_header_is_read_once_per_connection(serve: Any) -> None:
    server = serve(who_http_server, proxy_protocol=True)
    keep_alive = b"GET /who HTTP/1.1\r\nHost: app\r\n\r\n"
    response = exchange(server.port, proxy_v1(CLIENT, ("127.0.0.1", 80)), keep_alive * 2 + GET)
    assert response.count(b"HTTP/1.1 200") == 3
    assert response.count(b"203.0.113.7 56324") == 3


@pytest.mark.skipif(sys.platform == "win32", reason="Unix domain sockets")
@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_over_a_unix_socket_the_header_names_the_client(
    tmp_path: Path, native_callback: bool, loop_thread: BackgroundLoop
) -> None:
    path = f"/tmp/sn-pp-{tmp_path.name[-10:]}.sock"
    server = loop_thread.run(NativeHttpServer.bind_unix(path, proxy_protocol=True, native_callback=native_callback))
    try:
        server.serve(who_http_server)
        assert body_of(exchange(path, proxy_v2(CLIENT))) == "203.0.113.7 56324"
        assert h2_get(path, proxy_v1(CLIENT6, ("::1", 80))) == "2001:db8::7 4242"
        # A Unix socket peer is trusted, but still has to send a header.
        assert exchange(path, b"") == b""
    finally:
        loop_thread.run(server.close(force=True))
    with serving(serve_asgi, who_asgi, uds=path, proxy_protocol=True, native_callback=native_callback):
        assert body_of(exchange(path, proxy_v1(CLIENT, ("127.0.0.1", 80)))) == "203.0.113.7 56324"
        assert body_of(exchange(path, b"PROXY UNKNOWN\r\n")) == "none 0"


# -- what is refused ----------------------------------------------------------

REFUSED = [
    pytest.param(b"", "no valid PROXY protocol header", id="missing"),
    pytest.param(b"PROXY TCP4 203.0.113.7 nonsense 1 2\r\n", "no valid PROXY protocol header", id="malformed-v1"),
    pytest.param(
        proxy_v2(CLIENT)[:12] + b"\x31\x11\x00\x0c" + bytes(12), "no valid PROXY protocol header", id="malformed-v2"
    ),
    pytest.param(b"PROXY TCP4 " + b"1" * 120 + b"\r\n", "no valid PROXY protocol header", id="oversized"),
]


@pytest.mark.parametrize(("header", "logged"), REFUSED)
def test_a_bad_or_missing_header_closes_the_connection(
    serve: Any, server_log: LogLines, header: bytes, logged: str
) -> None:
    server = serve(who_http_server, proxy_protocol=True)
    assert exchange(server.port, header) == b""
    server_log.wait("closed a connection from 127.0.0.1:", logged)
    # The server goes on serving the clients that do send one.
    assert body_of(exchange(server.port, proxy_v2(CLIENT))) == "203.0.113.7 56324"


def test_a_bad_header_before_tls_closes_the_connection(serve: Any, certs: Certificates, server_log: LogLines) -> None:
    server = serve(who_http_server, proxy_protocol=True, certificate_path=certs.cert_path, key_path=certs.key_path)
    with connect(server.port) as raw:
        raw.sendall(b"PROXY TCP9 x\r\n")
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            tls_context(certs).wrap_socket(raw, server_hostname="localhost")
    server_log.wait("closed a connection from 127.0.0.1:", "no valid PROXY protocol header")
    # A client speaking TLS at once is no better: its ClientHello is not a header.
    with connect(server.port) as raw, pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        tls_context(certs).wrap_socket(raw, server_hostname="localhost")
    assert (
        body_of(exchange(server.port, proxy_v1(CLIENT, ("127.0.0.1", 80)), tls=tls_context(certs)))
        == "203.0.113.7 56324"
    )


def test_a_truncated_header_closes_the_connection(serve: Any, server_log: LogLines) -> None:
    server = serve(who_http_server, proxy_protocol=True)
    with connect(server.port) as sock:
        sock.sendall(proxy_v2(CLIENT)[:20])
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == b""
    server_log.wait("closed a connection from 127.0.0.1:", "it ended before a whole PROXY protocol header")


def test_a_header_that_never_completes_is_cut_at_header_read_timeout(serve: Any, server_log: LogLines) -> None:
    server = serve(who_http_server, proxy_protocol=True, header_read_timeout=0.5)
    with connect(server.port) as sock:
        sock.sendall(b"PROXY TCP4 203.0.113.7 ")
        assert read_all(sock) == b""
    server_log.wait("closed a connection from 127.0.0.1:", "no whole PROXY protocol header within header_read_timeout")


def test_a_peer_not_in_forwarded_allow_ips_is_refused(serve: Any, server_log: LogLines) -> None:
    server = serve(who_http_server, proxy_protocol=True, forwarded_allow_ips="10.0.0.0/8, 192.0.2.1")
    assert exchange(server.port, proxy_v2(CLIENT)) == b""
    server_log.wait("closed a connection from 127.0.0.1:", "the peer is not in forwarded_allow_ips")
    trusting = serve(who_http_server, proxy_protocol=True, forwarded_allow_ips=["10.0.0.0/8", "127.0.0.0/8"])
    assert body_of(exchange(trusting.port, proxy_v2(CLIENT))) == "203.0.113.7 56324"


def test_without_proxy_protocol_a_header_is_a_bad_request(serve: Any) -> None:
    server = serve(who_http_server)
    assert exchange(server.port, proxy_v1(CLIENT, ("127.0.0.1", 80))).startswith(b"HTTP/1.1 400")
    assert body_of(exchange(server.port, b"")).startswith("127.0.0.1 ")


def test_forwarded_allow_ips_must_be_addresses_or_networks() -> None:
    assert ServerConfig(forwarded_allow_ips="10.0.0.1, ::1,*").forwarded_allow_ips == ("10.0.0.1/32", "::1/128", "*")
    for wrong in ("localhost", ["10.0.0.0/33"], [1]):
        with pytest.raises(ValueError, match="forwarded_allow_ips"):
            ServerConfig(forwarded_allow_ips=wrong)  # type: ignore[arg-type]


def test_http3_is_off_with_the_proxy_protocol(serve: Any, certs: Certificates, server_log: LogLines) -> None:
    server = serve(
        who_http_server, proxy_protocol=True, http3=True, certificate_path=certs.cert_path, key_path=certs.key_path
    )
    assert not server.server.http3
    server_log.wait("HTTP/3 is off: the PROXY protocol is on")


# -- real proxies ---------------------------------------------------------------


HAPROXY_DEFAULTS = """
global
    log stdout format raw local0 info
defaults
    log global
    timeout connect 5s
    timeout client 30s
    timeout server 30s
"""


@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_haproxy_tcp_mode_in_front(tmp_path: Path, send_proxy: str, native_callback: bool, certs: Certificates) -> None:
    front, front_tls = free_port(), free_port()
    with serving(serve_asgi, who_asgi, proxy_protocol=True, native_callback=native_callback) as plain, serving(
        serve_asgi, who_asgi, proxy_protocol=True, native_callback=native_callback,
        tls=_tls(certs),
    ) as secure:  # fmt: skip
        config = (
            HAPROXY_DEFAULTS
            + f"""
listen plain
    mode tcp
    bind 127.0.0.1:{front}
    server app 127.0.0.1:{plain.port} {send_proxy}
listen passthrough
    mode tcp
    bind 127.0.0.1:{front_tls}
    server app 127.0.0.1:{secure.port} {send_proxy}
"""
        )
        with haproxy(config, tmp_path, [front, front_tls]):
            body, own_port = through(front)
            assert body == f"127.0.0.1 {own_port}"
            body, own_port = through(front_tls, tls=tls_context(certs))
            assert body == f"127.0.0.1 {own_port}"


def _tls(certs: Certificates) -> Any:
    from server_native.runtime.bound import tls_settings

    return tls_settings(certificate_path=certs.cert_path, key_path=certs.key_path)


def test_haproxy_http_mode_speaking_h2_to_the_server(tmp_path: Path) -> None:
    front = free_port()
    with serving(serve_native_direct, who_direct, proxy_protocol=True) as server:
        config = (
            HAPROXY_DEFAULTS
            + f"""
listen web
    mode http
    bind 127.0.0.1:{front}
    server app 127.0.0.1:{server.port} send-proxy-v2 proto h2
"""
        )
        with haproxy(config, tmp_path, [front]):
            for _ in range(3):
                body, own_port = through(front)
                assert body == f"127.0.0.1 {own_port}"


@pytest.mark.skipif(sys.platform == "win32", reason="Unix domain sockets")
@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_nginx_stream_with_proxy_protocol_on(tmp_path: Path, native_callback: bool) -> None:
    front, front_unix = free_port(), free_port()
    path = f"/tmp/sn-ngx-{tmp_path.name[-10:]}.sock"
    with (
        serving(serve_asgi, who_asgi, proxy_protocol=True, native_callback=native_callback) as tcp,
        serving(serve_asgi, who_asgi, uds=path, proxy_protocol=True, native_callback=native_callback),
    ):
        config = f"""
events {{}}
stream {{
    server {{
        listen 127.0.0.1:{front};
        proxy_pass 127.0.0.1:{tcp.port};
        proxy_protocol on;
    }}
    server {{
        listen 127.0.0.1:{front_unix};
        proxy_pass unix:{path};
        proxy_protocol on;
    }}
}}
"""
        with nginx(config, tmp_path, [front, front_unix]):
            for port in (front, front_unix):
                body, own_port = through(port)
                assert body == f"127.0.0.1 {own_port}"


def test_haproxy_health_checks_and_real_clients_through_the_cli(tmp_path: Path, server_log: LogLines) -> None:
    """The CLI's --proxy-protocol, with HAProxy's checks (check-send-proxy
    sends the header too) and a client whose address must come through."""
    import subprocess

    from proxies import wait_listening

    app_port, front = free_port(), free_port()
    command = [sys.executable, "-m", "server_native", "serve", "app:app", "--port", str(app_port),
               "--proxy-protocol", "--app-dir", str(Path(__file__).parents[1] / "deploy")]  # fmt: skip
    with (tmp_path / "server.log").open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_listening(app_port, process=process)
        config = (
            HAPROXY_DEFAULTS
            + f"""
backend app
    mode http
    option httpchk GET /health
    server app 127.0.0.1:{app_port} send-proxy-v2 check check-send-proxy inter 200ms
frontend web
    mode http
    bind 127.0.0.1:{front}
    default_backend app
"""
        )
        with haproxy(config, tmp_path, [front]):
            deadline = time.monotonic() + TIMEOUT
            while True:
                with connect(front) as sock:
                    own_port = sock.getsockname()[1]
                    sock.sendall(b"GET /client HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
                    response = read_all(sock)
                if response.startswith(b"HTTP/1.1 200") or time.monotonic() > deadline:
                    break
                time.sleep(0.1)  # HAProxy has not seen a passing check yet
            assert json.loads(body_of(response)) == {"client": ["127.0.0.1", own_port], "scheme": "http"}
    finally:
        process.terminate()
        process.wait(TIMEOUT)
    assert process.returncode == 0
    assert "PROXY protocol" not in (tmp_path / "server.log").read_text()
