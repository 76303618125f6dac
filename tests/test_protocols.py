"""Protocols against real clients: HTTP/1.1, h2c with prior knowledge, TLS
with ALPN (h2 and http/1.1), TLS material errors at bind time, and client
certificates. Every server is real and listens on loopback."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import httpx
import pytest
import trustme
from conftest import Certificates, requires_curl, requires_ipv6
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import server_native
from server_native import TlsConfigError

TIMEOUT = 10


# ---------------------------------------------------------------- helpers


class Recorder:
    """A handler that notes what it saw of every request and answers with it
    as JSON."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def __call__(self, request: Any) -> None:
        info = request.connection_info
        uri = request.requested_uri
        certificate = request.certificate
        entry = {
            "method": request.method,
            "path": request.uri.path,
            "query": request.uri.query,
            "protocol_version": request.protocol_version,
            "scheme": request.scheme,
            "requested_uri": uri.geturl(),
            "uri_scheme": uri.scheme,
            "uri_netloc": uri.netloc,
            "remote_address": info.remote_address,
            "remote_port": info.remote_port,
            "local_port": info.local_port,
            "certificate": certificate,
            "body": (await request.read()).decode("latin-1"),
        }
        self.seen.append(entry)
        request.response.headers.set("content-type", "application/json")
        shown = dict(entry, certificate=None if certificate is None else len(certificate))
        request.response.write(json.dumps(shown))


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    """Runs curl; stdout ends with a line `VERSION <http_version>`."""
    return subprocess.run(
        ["curl", "-sS", "--max-time", str(TIMEOUT), "-w", "\nVERSION %{http_version}", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT + 5,
    )


def curl_result(completed: subprocess.CompletedProcess[str]) -> tuple[str, str]:
    """(body, http_version) of a successful curl run."""
    assert completed.returncode == 0, completed.stderr
    body, _, version = completed.stdout.rpartition("\nVERSION ")
    return body, version.strip()


def tls_context(certs: Certificates, *, client_cert: bool = False, alpn: list[str] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca_path))
    if client_cert:
        context.load_cert_chain(str(certs.client_cert_path), str(certs.client_key_path))
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


def secure_options(certs: Certificates, **extra: Any) -> dict[str, Any]:
    return {"certificate_path": certs.cert_path, "key_path": certs.key_path, **extra}


def der_of(pem_path: Path) -> bytes:
    return x509.load_pem_x509_certificate(pem_path.read_bytes()).public_bytes(serialization.Encoding.DER)


# ---------------------------------------------------------------- HTTP/1.1 plaintext


def test_http11_plaintext_with_http_client(serve: Any) -> None:
    recorder = Recorder()
    server = serve(recorder)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    try:
        connection.request("POST", "/echo/path?x=1&y=two", body=b"hello body")
        response = connection.getresponse()
        payload = json.loads(response.read())
        assert response.status == 200
        assert response.version == 11
        # keep-alive: a second request on the same connection
        connection.request("GET", "/second")
        second = connection.getresponse()
        assert second.status == 200
        assert json.loads(second.read())["path"] == "/second"
    finally:
        connection.close()
    assert payload["method"] == "POST"
    assert payload["path"] == "/echo/path"
    assert payload["query"] == "x=1&y=two"
    assert payload["body"] == "hello body"
    assert payload["protocol_version"] == "1.1"
    assert payload["scheme"] == "http"
    assert payload["requested_uri"] == f"http://127.0.0.1:{server.port}/echo/path?x=1&y=two"
    assert len(recorder.seen) == 2


def test_http11_plaintext_with_httpx(serve: Any) -> None:
    server = serve(Recorder())
    with httpx.Client(timeout=TIMEOUT) as client:
        response = client.get(server.url("/hello"))
    assert response.status_code == 200
    assert response.http_version == "HTTP/1.1"
    assert response.json()["protocol_version"] == "1.1"


# ---------------------------------------------------------------- h2c prior knowledge


def test_h2c_prior_knowledge_with_httpx(serve: Any) -> None:
    recorder = Recorder()
    server = serve(recorder)
    with httpx.Client(http1=False, http2=True, timeout=TIMEOUT) as client:
        response = client.post(server.url("/h2?a=b"), content=b"over h2c")
    assert response.status_code == 200
    assert response.http_version == "HTTP/2"
    payload = response.json()
    assert payload["protocol_version"] == "2"
    assert payload["body"] == "over h2c"
    assert payload["path"] == "/h2"
    assert payload["query"] == "a=b"
    assert payload["scheme"] == "http"
    assert recorder.seen[0]["protocol_version"] == "2"


@requires_curl
def test_h2c_prior_knowledge_with_curl(serve: Any) -> None:
    recorder = Recorder()
    server = serve(recorder)
    body, version = curl_result(curl("--http2-prior-knowledge", server.url("/curl")))
    assert version == "2"
    assert json.loads(body)["protocol_version"] == "2"
    assert recorder.seen[0]["path"] == "/curl"


def test_http2_false_serves_http11(serve: Any) -> None:
    server = serve(Recorder(), http2=False)
    with httpx.Client(timeout=TIMEOUT) as client:
        response = client.get(server.url("/yes"))
    assert response.status_code == 200
    assert response.http_version == "HTTP/1.1"
    assert response.json()["protocol_version"] == "1.1"


@requires_curl
def test_http2_false_refuses_h2c_prior_knowledge_with_curl(serve: Any) -> None:
    recorder = Recorder()
    server = serve(recorder, http2=False)
    completed = curl("--http2-prior-knowledge", server.url("/nope"))
    if completed.returncode == 0:
        version = completed.stdout.rpartition("\nVERSION ")[2].strip()
        assert version != "2", "an http2=False server answered over HTTP/2"
    assert not recorder.seen, "an h2c request reached the handler of an http2=False server"
    # HTTP/1.1 still works on the same server afterwards
    with httpx.Client(timeout=TIMEOUT) as client:
        response = client.get(server.url("/yes"))
    assert response.http_version == "HTTP/1.1"


def test_http2_false_refuses_h2c_prior_knowledge_with_httpx(serve: Any) -> None:
    recorder = Recorder()
    server = serve(recorder, http2=False)
    with httpx.Client(http1=False, http2=True, timeout=TIMEOUT) as client:
        with pytest.raises(httpx.HTTPError):
            client.get(server.url("/nope"))
    assert not recorder.seen


def _h2_exchange(sock: socket.socket, headers: list[tuple[str, str]]) -> tuple[int, bytes]:
    """One HTTP/2 request with exactly these pseudo-headers and headers, sent
    with the h2 library over an already connected socket (prior knowledge)."""
    connection = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()
    stream_id = connection.get_next_available_stream_id()
    connection.send_headers(stream_id, headers, end_stream=True)
    sock.sendall(connection.data_to_send())
    status = 0
    body = b""
    while True:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed before the HTTP/2 response ended")
        for event in connection.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                status = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                body += event.data
                connection.acknowledge_received_data(event.flow_controlled_length, stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                return status, body
        outgoing = connection.data_to_send()
        if outgoing:
            sock.sendall(outgoing)


def _h2_request(port: int, headers: list[tuple[str, str]]) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        return _h2_exchange(sock, headers)


def test_http2_authority_reaches_requested_uri(serve: Any) -> None:
    recorder = Recorder()
    server = serve(recorder)
    status, body = _h2_request(
        server.port,
        [(":method", "GET"), (":scheme", "http"), (":authority", "example.test:8443"), (":path", "/auth?k=v")],
    )
    assert status == 200, body
    payload = json.loads(body)
    assert payload["uri_netloc"] == "example.test:8443"
    assert payload["requested_uri"] == "http://example.test:8443/auth?k=v"
    assert payload["protocol_version"] == "2"


def test_http2_authority_with_httpx_host(serve: Any) -> None:
    server = serve(Recorder())
    with httpx.Client(http1=False, http2=True, timeout=TIMEOUT) as client:
        response = client.get(server.url("/x"))
    assert response.http_version == "HTTP/2"
    assert response.json()["uri_netloc"] == f"127.0.0.1:{server.port}"


# ---------------------------------------------------------------- client address


def test_connection_info_has_real_client_address_and_port(serve: Any) -> None:
    recorder = Recorder()
    server = serve(recorder)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    try:
        connection.connect()
        client_port = connection.sock.getsockname()[1]
        connection.request("GET", "/who")
        response = connection.getresponse()
        payload = json.loads(response.read())
    finally:
        connection.close()
    assert payload["remote_address"] == "127.0.0.1"
    assert payload["remote_port"] == client_port
    assert payload["local_port"] == server.port


def test_connection_info_over_http2(serve: Any) -> None:
    server = serve(Recorder())
    transport = httpx.HTTPTransport(http1=False, http2=True, local_address="127.0.0.1")
    with httpx.Client(transport=transport, timeout=TIMEOUT) as client:
        response = client.get(server.url("/who"))
    payload = response.json()
    assert response.http_version == "HTTP/2"
    assert payload["remote_address"] == "127.0.0.1"
    assert payload["remote_port"] not in (0, server.port)
    assert payload["local_port"] == server.port


@requires_ipv6
def test_connection_info_ipv6(serve: Any) -> None:
    server = serve(Recorder(), address="::1")
    connection = http.client.HTTPConnection("::1", server.port, timeout=TIMEOUT)
    try:
        connection.connect()
        client_port = connection.sock.getsockname()[1]
        connection.request("GET", "/v6")
        payload = json.loads(connection.getresponse().read())
    finally:
        connection.close()
    assert payload["remote_address"] == "::1"
    assert payload["remote_port"] == client_port
    assert payload["local_port"] == server.port


# ---------------------------------------------------------------- TLS


def test_tls_http2_by_alpn_with_httpx(serve: Any, certs: Certificates) -> None:
    recorder = Recorder()
    server = serve(recorder, **secure_options(certs))
    with httpx.Client(http2=True, verify=tls_context(certs), timeout=TIMEOUT) as client:
        response = client.get(server.url("/secure?q=1"))
    assert response.status_code == 200
    assert response.http_version == "HTTP/2"
    payload = response.json()
    assert payload["protocol_version"] == "2"
    assert payload["scheme"] == "https"
    assert payload["uri_scheme"] == "https"
    assert payload["requested_uri"] == f"https://127.0.0.1:{server.port}/secure?q=1"
    assert payload["certificate"] is None


def test_tls_http11_with_httpx(serve: Any, certs: Certificates) -> None:
    server = serve(Recorder(), **secure_options(certs))
    with httpx.Client(verify=tls_context(certs), timeout=TIMEOUT) as client:
        response = client.post(server.url("/one"), content=b"tls body")
    assert response.status_code == 200
    assert response.http_version == "HTTP/1.1"
    payload = response.json()
    assert payload["protocol_version"] == "1.1"
    assert payload["scheme"] == "https"
    assert payload["requested_uri"].startswith("https://")
    assert payload["body"] == "tls body"


def test_tls_alpn_offers_h2_then_http11(serve: Any, certs: Certificates) -> None:
    server = serve(Recorder(), **secure_options(certs))
    for offered, expected in ((["h2", "http/1.1"], "h2"), (["http/1.1"], "http/1.1")):
        context = tls_context(certs, alpn=offered)
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.selected_alpn_protocol() == expected


@requires_curl
def test_tls_curl_http2(serve: Any, certs: Certificates) -> None:
    recorder = Recorder()
    server = serve(recorder, **secure_options(certs))
    body, version = curl_result(curl("--http2", "--cacert", str(certs.ca_path), server.url("/curl-tls")))
    assert version == "2"
    payload = json.loads(body)
    assert payload["protocol_version"] == "2"
    assert payload["scheme"] == "https"


@requires_curl
def test_tls_http2_false_gives_http11_only(serve: Any, certs: Certificates) -> None:
    recorder = Recorder()
    server = serve(recorder, http2=False, **secure_options(certs))
    body, version = curl_result(curl("--http2", "--cacert", str(certs.ca_path), server.url("/fallback")))
    assert version == "1.1"
    assert json.loads(body)["protocol_version"] == "1.1"
    with httpx.Client(http2=True, verify=tls_context(certs), timeout=TIMEOUT) as client:
        response = client.get(server.url("/httpx"))
    assert response.http_version == "HTTP/1.1"
    assert response.json()["scheme"] == "https"
    # ALPN: the server never selects h2
    context = tls_context(certs, alpn=["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.selected_alpn_protocol() in (None, "http/1.1")


def test_tls_http2_false_refuses_h2_preface_after_http11_alpn(serve: Any, certs: Certificates) -> None:
    """ALPN picked http/1.1, so an HTTP/2 preface on that connection must not
    be answered as HTTP/2."""
    recorder = Recorder()
    server = serve(recorder, http2=False, **secure_options(certs))
    context = tls_context(certs, alpn=["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.selected_alpn_protocol() == "http/1.1"
            headers = [(":method", "GET"), (":scheme", "https"), (":authority", "localhost"), (":path", "/h2")]
            with pytest.raises((ConnectionError, OSError, h2.exceptions.ProtocolError)):
                _h2_exchange(tls, headers)
    assert not recorder.seen


def test_tls_connection_info(serve: Any, certs: Certificates) -> None:
    server = serve(Recorder(), **secure_options(certs))
    connection = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=TIMEOUT, context=tls_context(certs))
    try:
        connection.connect()
        client_port = connection.sock.getsockname()[1]
        connection.request("GET", "/who")
        payload = json.loads(connection.getresponse().read())
    finally:
        connection.close()
    assert payload["remote_address"] == "127.0.0.1"
    assert payload["remote_port"] == client_port
    assert payload["local_port"] == server.port
    assert payload["scheme"] == "https"


@pytest.mark.parametrize("key_type", [trustme.KeyType.RSA, trustme.KeyType.ECDSA], ids=["rsa", "ecdsa"])
def test_rsa_and_ec_keys(serve: Any, tmp_path: Path, key_type: trustme.KeyType) -> None:
    ca = trustme.CA(key_type=key_type)
    issued = ca.issue_cert("127.0.0.1", "localhost", key_type=key_type)
    cert_path, key_path, ca_path = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert_path))
    issued.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    header = key_path.read_text().splitlines()[0]
    assert ("RSA" if key_type == trustme.KeyType.RSA else "EC") in header or "BEGIN PRIVATE KEY" in header
    server = serve(Recorder(), certificate_path=cert_path, key_path=key_path)
    context = ssl.create_default_context(cafile=str(ca_path))
    with httpx.Client(http2=True, verify=context, timeout=TIMEOUT) as client:
        response = client.get(server.url("/key"))
    assert response.status_code == 200
    assert response.json()["scheme"] == "https"


def test_unencrypted_pkcs8_key(serve: Any, certs: Certificates, tmp_path: Path) -> None:
    key = serialization.load_pem_private_key(certs.key_path.read_bytes(), password=None)
    pkcs8 = tmp_path / "pkcs8.key"
    pkcs8.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    assert pkcs8.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    server = serve(Recorder(), certificate_path=certs.cert_path, key_path=pkcs8)
    with httpx.Client(verify=tls_context(certs), timeout=TIMEOUT) as client:
        assert client.get(server.url("/")).status_code == 200


def test_encrypted_pkcs8_key_with_right_password(serve: Any, certs: Certificates) -> None:
    assert "ENCRYPTED PRIVATE KEY" in certs.encrypted_key_path.read_text()
    server = serve(
        Recorder(),
        certificate_path=certs.cert_path,
        key_path=certs.encrypted_key_path,
        certificate_password=certs.password,
    )
    with httpx.Client(http2=True, verify=tls_context(certs), timeout=TIMEOUT) as client:
        response = client.get(server.url("/encrypted"))
    assert response.status_code == 200
    assert response.json()["scheme"] == "https"


def test_encrypted_key_with_wrong_password_raises_at_bind(serve: Any, certs: Certificates) -> None:
    with pytest.raises(TlsConfigError) as raised:
        serve(
            Recorder(),
            certificate_path=certs.cert_path,
            key_path=certs.encrypted_key_path,
            certificate_password="wrong " + certs.password,
        )
    message = str(raised.value)
    assert "password" in message.lower()
    assert str(certs.encrypted_key_path) in message


def test_encrypted_key_without_password_raises_at_bind(serve: Any, certs: Certificates) -> None:
    with pytest.raises(TlsConfigError) as raised:
        serve(Recorder(), certificate_path=certs.cert_path, key_path=certs.encrypted_key_path)
    message = str(raised.value)
    assert "password" in message.lower() or "encrypted" in message.lower()
    assert str(certs.encrypted_key_path) in message


def test_missing_certificate_path_raises_at_bind(serve: Any, certs: Certificates, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-cert.pem"
    with pytest.raises(FileNotFoundError) as raised:
        serve(Recorder(), certificate_path=missing, key_path=certs.key_path)
    assert str(missing) in str(raised.value)


def test_missing_key_path_raises_at_bind(serve: Any, certs: Certificates, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-key.pem"
    with pytest.raises(FileNotFoundError) as raised:
        serve(Recorder(), certificate_path=certs.cert_path, key_path=missing)
    assert str(missing) in str(raised.value)


def test_key_not_matching_certificate_raises_at_bind(serve: Any, certs: Certificates, tmp_path: Path) -> None:
    other = trustme.CA().issue_cert("localhost")
    other_key = tmp_path / "other.key"
    other.private_key_pem.write_to_path(str(other_key))
    with pytest.raises(TlsConfigError) as raised:
        serve(Recorder(), certificate_path=certs.cert_path, key_path=other_key)
    assert str(other_key) in str(raised.value) or str(certs.cert_path) in str(raised.value)


def test_garbage_key_file_raises_at_bind(serve: Any, certs: Certificates, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.key"
    garbage.write_text("this is not a key\n")
    with pytest.raises(TlsConfigError) as raised:
        serve(Recorder(), certificate_path=certs.cert_path, key_path=garbage)
    assert str(garbage) in str(raised.value)


def test_tls_config_error_is_exported() -> None:
    assert server_native.TlsConfigError is TlsConfigError
    assert issubclass(TlsConfigError, Exception)


# ---------------------------------------------------------------- client certificates


def test_optional_client_certificate_presented(serve: Any, certs: Certificates) -> None:
    recorder = Recorder()
    server = serve(recorder, request_client_certificate=True, **secure_options(certs))
    context = tls_context(certs, client_cert=True)
    connection = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=TIMEOUT, context=context)
    try:
        connection.request("GET", "/with-cert")
        response = connection.getresponse()
        payload = json.loads(response.read())
    finally:
        connection.close()
    assert response.status == 200
    assert payload["certificate"] is not None
    assert recorder.seen[0]["certificate"] == der_of(certs.client_cert_path)
    assert isinstance(recorder.seen[0]["certificate"], bytes)


def test_optional_client_certificate_presented_over_http2(serve: Any, certs: Certificates) -> None:
    recorder = Recorder()
    server = serve(recorder, request_client_certificate=True, **secure_options(certs))
    with httpx.Client(http2=True, verify=tls_context(certs, client_cert=True), timeout=TIMEOUT) as client:
        response = client.get(server.url("/with-cert-h2"))
    assert response.http_version == "HTTP/2"
    assert recorder.seen[0]["certificate"] == der_of(certs.client_cert_path)


def test_optional_client_certificate_absent(serve: Any, certs: Certificates) -> None:
    recorder = Recorder()
    server = serve(recorder, request_client_certificate=True, **secure_options(certs))
    with httpx.Client(verify=tls_context(certs), timeout=TIMEOUT) as client:
        response = client.get(server.url("/without-cert"))
    assert response.status_code == 200
    assert recorder.seen[0]["certificate"] is None


def test_no_client_certificate_requested_by_default(serve: Any, certs: Certificates) -> None:
    recorder = Recorder()
    server = serve(recorder, **secure_options(certs))
    with httpx.Client(verify=tls_context(certs, client_cert=True), timeout=TIMEOUT) as client:
        response = client.get(server.url("/"))
    assert response.status_code == 200
    assert recorder.seen[0]["certificate"] is None


def test_required_client_certificate_refuses_client_without_one(serve: Any, certs: Certificates) -> None:
    recorder = Recorder()
    server = serve(
        recorder, client_ca_path=certs.client_ca_path, require_client_certificate=True, **secure_options(certs)
    )
    with httpx.Client(verify=tls_context(certs), timeout=TIMEOUT) as client:
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            client.get(server.url("/refused"))
    assert not recorder.seen


def test_required_client_certificate_serves_client_with_one(serve: Any, certs: Certificates) -> None:
    recorder = Recorder()
    server = serve(
        recorder, client_ca_path=certs.client_ca_path, require_client_certificate=True, **secure_options(certs)
    )
    with httpx.Client(http2=True, verify=tls_context(certs, client_cert=True), timeout=TIMEOUT) as client:
        response = client.get(server.url("/admitted"))
    assert response.status_code == 200
    assert recorder.seen[0]["certificate"] == der_of(certs.client_cert_path)


def test_required_client_certificate_refuses_certificate_from_other_ca(
    serve: Any, certs: Certificates, tmp_path: Path
) -> None:
    stranger = trustme.CA().issue_cert("stranger@example.test")
    cert_path, key_path = tmp_path / "stranger.pem", tmp_path / "stranger.key"
    stranger.cert_chain_pems[0].write_to_path(str(cert_path))
    stranger.private_key_pem.write_to_path(str(key_path))
    recorder = Recorder()
    server = serve(
        recorder, client_ca_path=certs.client_ca_path, require_client_certificate=True, **secure_options(certs)
    )
    context = tls_context(certs)
    context.load_cert_chain(str(cert_path), str(key_path))
    with httpx.Client(verify=context, timeout=TIMEOUT) as client:
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            client.get(server.url("/stranger"))
    assert not recorder.seen
