"""TLS cipher suites, the oldest TLS version and client certificate
revocation; HTTP/2 settings (read off the server's SETTINGS frame with the
h2 library on a raw socket) and keep-alive PINGs; the I/O runtime's thread
count. Real servers, real clients (Python's ssl, h2, aioquic), in-process
and through the command line."""

from __future__ import annotations

import asyncio
import datetime
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
import trustme
from apps.harness import TIMEOUT
from cliserver import command, environment, serve_once, serving
from conftest import Certificates, LogLines
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from h3client import h3_connect

from server_native import NativeHttpServer, ServerConfig, TlsConfig, TlsConfigError

#: These tests are about what the server negotiates, not how requests reach
#: Python: one transport is enough.
native_only = pytest.mark.parametrize("serve", [pytest.param(True, id="native")], indirect=True)

KIB = 1024
MIB = 1024 * KIB
#: HTTP/2's connection window before any WINDOW_UPDATE (RFC 9113 section 6.9.2).
DEFAULT_CONNECTION_WINDOW = 65535


async def ok(request: Any) -> None:
    await request.read()
    request.response.write("ok")


# ---------------------------------------------------------------- TLS clients


@dataclass
class Handshake:
    cipher: str
    version: str
    status: int


def https_get(
    port: int,
    ca_path: Path,
    *,
    maximum: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
    client: tuple[Path, Path] | None = None,
) -> Handshake:
    """A GET over Python's ssl client, restricted as given; what it
    negotiated and the status it got. Raises ssl.SSLError (or a
    ConnectionError) when the server refuses it."""
    context = ssl.create_default_context(cafile=str(ca_path))
    if maximum is not None:
        context.maximum_version = maximum
    if ciphers is not None:
        context.set_ciphers(ciphers)
    if client is not None:
        context.load_cert_chain(str(client[0]), str(client[1]))
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            response = b""
            while chunk := tls.recv(65536):
                response += chunk
            cipher, version, _ = tls.cipher()  # type: ignore[misc]
    if not response:
        raise ConnectionError("the server closed the connection without a response")
    return Handshake(cipher, version, int(response.split(b" ", 2)[1]))


def serve_tls(serve: Any, certs: Certificates, **options: Any) -> Any:
    return serve(ok, certificate_path=certs.cert_path, key_path=certs.key_path, **options)


# ---------------------------------------------------------------- cipher suites and versions


@native_only
@pytest.mark.parametrize(
    ("given", "kept", "negotiated"),
    [
        ("TLS13_CHACHA20_POLY1305_SHA256", "TLS13_CHACHA20_POLY1305_SHA256", "TLS_CHACHA20_POLY1305_SHA256"),
        ("TLS13_AES_256_GCM_SHA384", "TLS13_AES_256_GCM_SHA384", "TLS_AES_256_GCM_SHA384"),
        # IANA's (and OpenSSL's) name of a TLS 1.3 suite, in lower case
        ("tls_aes_128_gcm_sha256", "TLS13_AES_128_GCM_SHA256", "TLS_AES_128_GCM_SHA256"),
    ],
)
def test_tls13_negotiates_the_one_suite_allowed(
    serve: Any, certs: Certificates, given: str, kept: str, negotiated: str
) -> None:
    server = serve_tls(serve, certs, ciphers=[given])
    assert server.server.config.tls.ciphers == (kept,)
    handshake = https_get(server.port, certs.ca_path)
    assert (handshake.cipher, handshake.version, handshake.status) == (negotiated, "TLSv1.3", 200)


@native_only
def test_tls12_suites_by_openssl_name(serve: Any, certs: Certificates) -> None:
    """OpenSSL's names, colon-separated as uvicorn's --ssl-ciphers takes them;
    a TLS 1.2 client gets one of those and nothing else."""
    server = serve_tls(serve, certs, ciphers="ECDHE-ECDSA-AES256-GCM-SHA384:TLS13_AES_128_GCM_SHA256")
    assert server.server.config.tls.ciphers == ("TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", "TLS13_AES_128_GCM_SHA256")
    tls12 = https_get(server.port, certs.ca_path, maximum=ssl.TLSVersion.TLSv1_2)
    assert (tls12.cipher, tls12.version, tls12.status) == ("ECDHE-ECDSA-AES256-GCM-SHA384", "TLSv1.2", 200)
    with pytest.raises(ssl.SSLError):
        https_get(server.port, certs.ca_path, maximum=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")
    assert https_get(server.port, certs.ca_path).cipher == "TLS_AES_128_GCM_SHA256"


@native_only
def test_protocol_min_tls13_refuses_a_tls12_client(serve: Any, certs: Certificates) -> None:
    server = serve_tls(serve, certs, protocol_min="tls1.3")
    with pytest.raises(ssl.SSLError):
        https_get(server.port, certs.ca_path, maximum=ssl.TLSVersion.TLSv1_2)
    assert https_get(server.port, certs.ca_path).version == "TLSv1.3"


@native_only
def test_protocol_min_tls12_by_default(serve: Any, certs: Certificates) -> None:
    server = serve_tls(serve, certs)
    handshake = https_get(server.port, certs.ca_path, maximum=ssl.TLSVersion.TLSv1_2)
    assert (handshake.version, handshake.status) == ("TLSv1.2", 200)


def test_an_unknown_cipher_suite_is_refused_naming_the_known_ones(certs: Certificates) -> None:
    with pytest.raises(TlsConfigError) as refused:
        TlsConfig(str(certs.cert_path), str(certs.key_path), ciphers="HIGH:!aNULL")
    message = str(refused.value)
    assert message.startswith('unknown cipher suite "HIGH"')
    assert "TLS13_CHACHA20_POLY1305_SHA256 (TLS_CHACHA20_POLY1305_SHA256)" in message
    assert "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 (ECDHE-RSA-AES128-GCM-SHA256)" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"protocol_min": "tls1.1"}, "protocol_min must be one of tls1.2, tls1.3, not 'tls1.1'"),
        ({"ciphers": ""}, "no cipher suite given"),
        ({"ciphers": [1]}, "ciphers must be names of cipher suites"),
    ],
)
def test_bad_tls_settings_are_one_clear_line(certs: Certificates, options: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        TlsConfig(str(certs.cert_path), str(certs.key_path), **options)


@native_only
def test_suites_that_leave_no_allowed_version_are_refused_at_bind(serve: Any, certs: Certificates) -> None:
    with pytest.raises(TlsConfigError, match="none of the cipher suites given is for a TLS version from tls1.3 on"):
        serve_tls(serve, certs, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256", protocol_min="tls1.3")


@native_only
def test_http3_negotiates_the_suite_allowed(serve: Any, certs: Certificates, loop_thread: Any) -> None:
    """QUIC still protects its Initial packets with AES-128-GCM, which is not
    among the suites allowed; the handshake negotiates the one that is."""
    server = serve_tls(serve, certs, ciphers="TLS13_CHACHA20_POLY1305_SHA256", http3=True)
    assert server.server.http3

    async def get() -> tuple[int, Any]:
        async with h3_connect("127.0.0.1", server.port, str(certs.ca_path)) as client:
            response = await client.request("GET", "/")
            return response.status, client._quic.tls.key_schedule.cipher_suite

    status, suite = loop_thread.run(asyncio.wait_for(get(), TIMEOUT))
    assert (status, suite.name) == (200, "CHACHA20_POLY1305_SHA256")


@native_only
def test_http3_without_a_tls13_suite_is_refused(serve: Any, certs: Certificates) -> None:
    with pytest.raises(OSError, match="HTTP/3 needs a TLS 1.3 cipher suite"):
        serve_tls(serve, certs, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256", http3=True)


# ---------------------------------------------------------------- revocation


@dataclass
class Clients:
    ca_path: Path
    good: tuple[Path, Path]
    revoked: tuple[Path, Path]
    crl_pem: Path
    crl_der: Path
    #: A list from another CA: it covers none of these clients.
    foreign_crl: Path


def write_client(directory: Path, ca: trustme.CA, name: str) -> tuple[tuple[Path, Path], x509.Certificate]:
    leaf = ca.issue_cert(f"{name}@example.test")
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert_path))
    leaf.private_key_pem.write_to_path(str(key_path))
    return (cert_path, key_path), x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())


def revocation_list(ca: trustme.CA, revoked: list[x509.Certificate]) -> x509.CertificateRevocationList:
    """A CRL signed by ``ca``, as webpki takes them: version 2, a next update,
    a CRL number and the CA's key identifier."""
    issuer = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(now - datetime.timedelta(hours=1))
        .next_update(now + datetime.timedelta(days=1))
        .add_extension(x509.CRLNumber(1), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key()), critical=False)  # type: ignore[arg-type]
    )
    for certificate in revoked:
        entry = x509.RevokedCertificateBuilder().serial_number(certificate.serial_number).revocation_date(now).build()
        builder = builder.add_revoked_certificate(entry)
    return builder.sign(key, hashes.SHA256())  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> Clients:
    directory = tmp_path_factory.mktemp("clients")
    ca = trustme.CA()
    ca_path = directory / "client-ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    good, _ = write_client(directory, ca, "good")
    revoked, revoked_cert = write_client(directory, ca, "revoked")
    crl = revocation_list(ca, [revoked_cert])
    crl_pem, crl_der = directory / "crl.pem", directory / "crl.der"
    crl_pem.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    crl_der.write_bytes(crl.public_bytes(serialization.Encoding.DER))
    foreign_crl = directory / "foreign-crl.pem"
    foreign_crl.write_bytes(revocation_list(trustme.CA(), []).public_bytes(serialization.Encoding.PEM))
    return Clients(ca_path, good, revoked, crl_pem, crl_der, foreign_crl)


def serve_mtls(serve: Any, certs: Certificates, clients: Clients, crl_paths: Any, **options: Any) -> Any:
    return serve_tls(
        serve, certs, client_ca_path=clients.ca_path, require_client_certificate=True, crl_paths=crl_paths, **options
    )


@native_only
@pytest.mark.parametrize("encoding", ["pem", "der"])
@pytest.mark.parametrize("maximum", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["tls13", "tls12"])
def test_a_revoked_client_certificate_is_refused(
    serve: Any, certs: Certificates, clients: Clients, encoding: str, maximum: ssl.TLSVersion
) -> None:
    server = serve_mtls(serve, certs, clients, clients.crl_pem if encoding == "pem" else [clients.crl_der])
    assert https_get(server.port, certs.ca_path, maximum=maximum, client=clients.good).status == 200
    with pytest.raises(ssl.SSLError, match="CERTIFICATE_REVOKED"):
        https_get(server.port, certs.ca_path, maximum=maximum, client=clients.revoked)


@native_only
def test_without_a_crl_the_same_certificate_is_served(serve: Any, certs: Certificates, clients: Clients) -> None:
    server = serve_mtls(serve, certs, clients, ())
    assert https_get(server.port, certs.ca_path, client=clients.revoked).status == 200


@native_only
def test_a_client_no_crl_covers_is_refused(serve: Any, certs: Certificates, clients: Clients) -> None:
    """Revocation status that no list gives is not taken for good."""
    server = serve_mtls(serve, certs, clients, [clients.foreign_crl])
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https_get(server.port, certs.ca_path, client=clients.good)
    server = serve_mtls(serve, certs, clients, [clients.foreign_crl, clients.crl_pem])
    assert https_get(server.port, certs.ca_path, client=clients.good).status == 200


@native_only
def test_a_file_that_is_no_crl_is_refused_by_name(
    serve: Any, certs: Certificates, clients: Clients, tmp_path: Path
) -> None:
    not_pem = tmp_path / "garbage.crl"
    not_pem.write_bytes(b"\x30\x03\x02\x01\x01")
    with pytest.raises(TlsConfigError, match=f"{not_pem} holds no usable certificate revocation list"):
        serve_mtls(serve, certs, clients, [not_pem])
    with pytest.raises(TlsConfigError, match=f"{certs.cert_path} holds no PEM certificate revocation list"):
        serve_mtls(serve, certs, clients, [certs.cert_path])


def test_a_crl_without_verified_client_certificates_is_refused(certs: Certificates, clients: Clients) -> None:
    with pytest.raises(ValueError, match="crl_paths checks client certificates: it needs client_ca_path"):
        TlsConfig(
            str(certs.cert_path), str(certs.key_path), require_client_certificate=True, crl_paths=[clients.crl_pem]
        )
    with pytest.raises(FileNotFoundError):
        TlsConfig(
            str(certs.cert_path), str(certs.key_path), client_ca_path=str(clients.ca_path), crl_paths="missing.crl"
        )


# ---------------------------------------------------------------- HTTP/2 settings


def h2_client() -> h2.connection.H2Connection:
    config = h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
    )
    return h2.connection.H2Connection(config=config)


def get_headers(path: str = "/", *extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [(":method", "GET"), (":scheme", "http"), (":authority", "x"), (":path", path), *extra]


@dataclass
class Http2Session:
    """One HTTP/2 connection over a raw socket (prior knowledge), with what
    the server said in its first SETTINGS frame and its connection
    WINDOW_UPDATEs."""

    sock: socket.socket
    connection: h2.connection.H2Connection
    settings: dict[int, int]
    connection_window_increments: list[int]

    def events(self) -> Iterator[h2.events.Event]:
        """Events as they come, answering the server (SETTINGS ACK, PING
        ACK) after each read, until it closes."""
        while data := self.sock.recv(65536):
            events = self.connection.receive_data(data)
            self.sock.sendall(self.connection.data_to_send())
            for event in events:
                if isinstance(event, h2.events.RemoteSettingsChanged) and not self.settings:
                    self.settings = {int(code): change.new_value for code, change in event.changed_settings.items()}
                elif isinstance(event, h2.events.WindowUpdated) and event.stream_id == 0:
                    self.connection_window_increments.append(event.delta)
            yield from events

    def outcome(self, headers: list[tuple[str, str]]) -> int | str:
        """A request's status, "reset" (PROTOCOL_ERROR on its stream), or
        "closed" when the server ends the connection first."""
        stream = self.connection.get_next_available_stream_id()
        self.connection.send_headers(stream, headers, end_stream=True)
        self.sock.sendall(self.connection.data_to_send())
        status: int | str = "closed"
        for event in self.events():
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream:
                status = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                return status
            elif isinstance(event, h2.events.StreamReset) and event.stream_id == stream:
                return "reset" if event.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR else repr(event.error_code)
            elif isinstance(event, h2.events.ConnectionTerminated):
                return "closed"
        return "closed"


def open_http2(port: int) -> Http2Session:
    """Connects and reads until the server's SETTINGS have arrived (and been
    acknowledged)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    connection = h2_client()
    connection.initiate_connection()
    sock.sendall(connection.data_to_send())
    session = Http2Session(sock, connection, {}, [])
    for _ in session.events():
        if session.settings:
            break
    return session


def settings_and_window(port: int) -> tuple[dict[int, int], int]:
    """The server's SETTINGS and its connection window, as of a request
    answered (h2 raises the connection window before it answers)."""
    session = open_http2(port)
    with session.sock:
        assert session.outcome(get_headers()) == 200
    return session.settings, DEFAULT_CONNECTION_WINDOW + sum(session.connection_window_increments)


S = h2.settings.SettingCodes


@native_only
def test_default_http2_settings(serve: Any) -> None:
    server = serve(ok)
    settings, window = settings_and_window(server.port)
    assert settings[S.MAX_CONCURRENT_STREAMS] == 250
    assert settings[S.INITIAL_WINDOW_SIZE] == 1 * MIB
    assert settings.get(S.MAX_FRAME_SIZE, 16384) == 16384
    assert settings[S.MAX_HEADER_LIST_SIZE] == ServerConfig.max_header_size
    assert window == 1 * MIB


@native_only
def test_http2_settings_are_the_ones_configured(serve: Any) -> None:
    server = serve(
        ok,
        max_concurrent_streams=17,
        http2_initial_connection_window_size=3 * MIB,
        http2_initial_stream_window_size=300_000,
        http2_max_frame_size=32 * KIB,
        http2_max_headers_size=20_000,
    )
    settings, window = settings_and_window(server.port)
    assert settings[S.MAX_CONCURRENT_STREAMS] == 17
    assert settings[S.INITIAL_WINDOW_SIZE] == 300_000
    assert settings[S.MAX_FRAME_SIZE] == 32 * KIB
    assert settings[S.MAX_HEADER_LIST_SIZE] == 20_000
    assert window == 3 * MIB


@native_only
def test_adaptive_window_starts_from_the_protocol_default(serve: Any) -> None:
    server = serve(ok, http2_adaptive_window=True)
    settings, window = settings_and_window(server.port)
    assert settings.get(S.INITIAL_WINDOW_SIZE, 65535) == 65535
    assert window == DEFAULT_CONNECTION_WINDOW


@native_only
def test_http2_max_headers_size_is_http2s_alone(serve: Any) -> None:
    """A header list over ``http2_max_headers_size`` gets 431 over HTTP/2;
    the same head is served over HTTP/1.1, where ``max_header_size`` rules."""
    server = serve(ok, http2_max_headers_size=4 * KIB)
    big = ("x-big", "v" * (6 * KIB))
    session = open_http2(server.port)
    with session.sock:
        assert session.outcome(get_headers("/big", big)) == 431
        assert session.outcome(get_headers("/small")) == 200
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{big[0]}: {big[1]}\r\n\r\n".encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")


@native_only
def test_frames_up_to_the_configured_size_are_read_and_checked(serve: Any) -> None:
    """A header block in one frame of 40 KiB is served, and one with a field
    h2 cannot take (an uppercase name) still has only its stream reset: the
    server follows frames as large as it told the client it takes."""
    server = serve(ok, http2_max_frame_size=64 * KIB)
    value = "v" * (40 * KIB)
    session = open_http2(server.port)
    with session.sock:
        assert session.connection.max_outbound_frame_size == 64 * KIB
        assert session.outcome(get_headers("/large", ("x-large", value))) == 200
        assert session.outcome(get_headers("/bad", ("X-Upper", value))) == "reset"
        assert session.outcome(get_headers("/after")) == 200


def unanswered_pings(port: int) -> tuple[int, list[Any]]:
    """Connects and never writes again (no PING ACK); the PINGs that came
    and the connection's end, GOAWAY and EOF (the socket timeout bounds
    the wait)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    connection = h2_client()
    connection.initiate_connection()
    with sock:
        sock.sendall(connection.data_to_send())
        pings, ending = 0, []
        while data := sock.recv(65536):
            for event in connection.receive_data(data):
                pings += isinstance(event, h2.events.PingReceived)
                if isinstance(event, h2.events.ConnectionTerminated):
                    ending.append(event.error_code)
        ending.append("eof")
    return pings, ending


@native_only
def test_a_peer_that_leaves_a_ping_unanswered_is_closed(serve: Any, server_log: LogLines) -> None:
    server = serve(ok, http2_keep_alive_interval=0.2, http2_keep_alive_timeout=0.5)
    pings, ending = unanswered_pings(server.port)
    assert pings >= 1
    assert ending == [h2.errors.ErrorCodes.NO_ERROR, "eof"]
    assert server_log.levels[server_log.wait("a keep-alive PING went unanswered")] == 20  # INFO


@native_only
def test_a_peer_that_answers_pings_stays(serve: Any) -> None:
    server = serve(ok, http2_keep_alive_interval=0.2, http2_keep_alive_timeout=0.5)
    session = open_http2(server.port)
    pings = 0
    with session.sock:
        # Several keep-alive timeouts' worth of PINGs, each answered.
        for event in session.events():
            pings += isinstance(event, h2.events.PingReceived)
            assert not isinstance(event, h2.events.ConnectionTerminated)
            if pings == 6:
                break
        assert session.outcome(get_headers()) == 200


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (
            {"http2_max_frame_size": 1024},
            "http2_max_frame_size must be a whole number from 16384 to 16777215, not 1024",
        ),
        (
            {"http2_initial_stream_window_size": 2**31},
            "http2_initial_stream_window_size must be a whole number from 1024 to 2147483647",
        ),
        ({"http2_initial_connection_window_size": "1M"}, "http2_initial_connection_window_size must be a whole number"),
        ({"max_concurrent_streams": 0}, "max_concurrent_streams must be a whole number from 1"),
        ({"http2_max_headers_size": 0}, "http2_max_headers_size must be a whole number from 1"),
        ({"http2_keep_alive_timeout": 0}, "http2_keep_alive_timeout must be a number of seconds above 0"),
        ({"http2_keep_alive_interval": -1}, "http2_keep_alive_interval must be a number of seconds"),
        (
            {"http2_adaptive_window": True, "http2_initial_stream_window_size": 100_000},
            "http2_adaptive_window sizes the flow control windows itself",
        ),
        ({"runtime_threads": 0}, "runtime_threads must be a whole number from 1 to 1024, not 0"),
    ],
)
def test_bad_http2_and_runtime_settings_are_refused_before_binding(
    loop_thread: Any, options: dict[str, Any], error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        loop_thread.run(NativeHttpServer.bind("127.0.0.1", 0, **options))


# ---------------------------------------------------------------- the command line


def ready_for(ca_path: Path, client: tuple[Path, Path] | None = None) -> Any:
    return lambda port: https_get(port, ca_path, client=client)


def test_cli_tls_options(app_dir: Path, certs: Certificates, clients: Clients) -> None:
    tls = (
        "--ssl-certfile", str(certs.cert_path), "--ssl-keyfile", str(certs.key_path), "--no-http3",
        "--ssl-ca-certs", str(clients.ca_path), "--ssl-cert-reqs", "2", "--ssl-crl", str(clients.crl_pem),
        "--ssl-ciphers", "TLS13_CHACHA20_POLY1305_SHA256,ECDHE-ECDSA-AES256-GCM-SHA384", "--ssl-protocol-min", "tls1.3",
    )  # fmt: skip
    with serving(app_dir, "cliapp:app", *tls, ready=ready_for(certs.ca_path, clients.good)) as (_, port):
        handshake = https_get(port, certs.ca_path, client=clients.good)
        assert (handshake.cipher, handshake.version, handshake.status) == (
            "TLS_CHACHA20_POLY1305_SHA256",
            "TLSv1.3",
            200,
        )
        with pytest.raises(ssl.SSLError, match="CERTIFICATE_REVOKED"):
            https_get(port, certs.ca_path, client=clients.revoked)
        with pytest.raises(ssl.SSLError):
            https_get(port, certs.ca_path, client=clients.good, maximum=ssl.TLSVersion.TLSv1_2)


def test_cli_http2_options(app_dir: Path) -> None:
    flags = (
        "--http2-max-concurrent-streams", "33", "--http2-initial-connection-window-size", "2000000",
        "--http2-initial-stream-window-size", "100000", "--http2-max-frame-size", "20000",
        "--http2-max-headers-size", "30000", "--http2-keep-alive-interval", "200", "--http2-keep-alive-timeout", "0.5",
    )  # fmt: skip
    with serving(app_dir, "cliapp:app", *flags) as (_, port):
        settings, window = settings_and_window(port)
        assert (settings[S.MAX_CONCURRENT_STREAMS], settings[S.INITIAL_WINDOW_SIZE]) == (33, 100_000)
        assert (settings[S.MAX_FRAME_SIZE], settings[S.MAX_HEADER_LIST_SIZE], window) == (20_000, 30_000, 2_000_000)
        pings, ending = unanswered_pings(port)
        assert pings >= 1 and ending == [h2.errors.ErrorCodes.NO_ERROR, "eof"]


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (("--ssl-ciphers", "HIGH"), 'argument --ssl-ciphers: unknown cipher suite "HIGH"'),
        (("--ssl-protocol-min", "tls1.1"), "argument --ssl-protocol-min: invalid choice: 'tls1.1'"),
        (("--ssl-ciphers", "TLS13_AES_128_GCM_SHA256"), "--ssl-ciphers needs --ssl-certfile and --ssl-keyfile"),
        (
            ("--ssl-certfile", "c", "--ssl-keyfile", "k", "--ssl-crl", "x.crl"),
            "--ssl-crl checks client certificates: it needs --ssl-ca-certs",
        ),
        (
            ("--http2-max-frame-size", "1000"),
            "argument --http2-max-frame-size: must be a whole number from 16384 to 16777215, not 1000",
        ),
        (
            ("--http2-initial-stream-window-size", "big"),
            "argument --http2-initial-stream-window-size: must be a whole number from 1024 to 2147483647, not 'big'",
        ),
        (
            ("--http2-keep-alive-interval", "0"),
            "argument --http2-keep-alive-interval: must be a whole number of milliseconds from 1, not '0'",
        ),
        (("--http2-keep-alive-timeout", "0"), "--http2-keep-alive-timeout must be a number of seconds above 0, not 0"),
        (
            ("--http2-adaptive-window", "--http2-initial-connection-window-size", "99999"),
            "--http2-adaptive-window sizes the flow control windows itself",
        ),
        (("--runtime-threads", "0"), "argument --runtime-threads: must be a whole number from 1 to 1024, not 0"),
    ],
)
def test_cli_refuses_bad_values_with_one_line(app_dir: Path, flags: tuple[str, ...], error: str) -> None:
    result = serve_once(app_dir, *flags)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert error in last, result.stderr


def test_help_lists_the_options() -> None:
    result = subprocess.run(command("serve", "--help"), env=environment(), capture_output=True, text=True, timeout=60)
    for flag in (
        "--ssl-ciphers", "--ssl-protocol-min", "--ssl-crl", "--http2-max-concurrent-streams",
        "--http2-initial-connection-window-size", "--http2-initial-stream-window-size", "--http2-adaptive-window",
        "--http2-keep-alive-interval", "--http2-keep-alive-timeout", "--http2-max-frame-size", "--http2-max-headers-size",
        "--runtime-threads",
    ):  # fmt: skip
        assert flag in result.stdout


# ---------------------------------------------------------------- runtime threads


def io_threads(pid: int) -> int:
    """The process's tokio threads, by name (Linux cuts it to 15 bytes)."""
    names = (Path(task, "comm").read_text().strip() for task in Path(f"/proc/{pid}/task").iterdir())
    return sum(name == "server-native-i" for name in names)


requires_proc = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="threads are counted through /proc")


@requires_proc
@pytest.mark.parametrize(
    ("flags", "variable", "threads"),
    [(("--runtime-threads", "3"), None, 3), ((), "2", 2), (("--runtime-threads", "5"), "2", 5)],
    ids=["option", "environment", "option-over-environment"],
)
def test_runtime_threads(
    app_dir: Path, monkeypatch: pytest.MonkeyPatch, flags: tuple[str, ...], variable: str | None, threads: int
) -> None:
    if variable is None:
        monkeypatch.delenv("SERVER_NATIVE_THREADS", raising=False)
    else:
        monkeypatch.setenv("SERVER_NATIVE_THREADS", variable)
    with serving(app_dir, "cliapp:app", *flags) as (process, _):
        assert io_threads(process.pid) == threads


def test_a_bad_thread_count_in_the_environment_is_one_line(app_dir: Path) -> None:
    result = subprocess.run(
        command("serve", "cliapp:app", "--port", "0"), cwd=app_dir,
        env={**environment(), "SERVER_NATIVE_THREADS": "lots"}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        'server-native: error: ValueError: SERVER_NATIVE_THREADS must be a number of threads from 1 to 1024, not "lots"'
    )


RUNTIME_SCRIPT = """
import asyncio, os, sys
from server_native import NativeHttpServer

async def main():
    first = await NativeHttpServer.bind("127.0.0.1", 0, runtime_threads=2)
    same = await NativeHttpServer.bind("127.0.0.1", 0, runtime_threads=2)
    unspecified = await NativeHttpServer.bind("127.0.0.1", 0)
    try:
        await NativeHttpServer.bind("127.0.0.1", 0, runtime_threads=3)
    except ValueError as exc:
        print("refused:", exc)
    def count():
        names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
        return names.count("server-native-i")
    # A thread names itself once it runs: wait for the two, then for any more.
    deadline = asyncio.get_running_loop().time() + 10
    while count() < 2 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    print("threads:", count())
    for server in (first, same, unspecified):
        await server.close()

asyncio.run(main())
"""


@requires_proc
def test_the_runtime_is_process_wide(tmp_path: Path) -> None:
    """The first server starts it; a later one asking for another thread
    count is refused, one asking for the same or none is served."""
    result = subprocess.run(
        [sys.executable, "-c", RUNTIME_SCRIPT], env={**environment(), "SERVER_NATIVE_THREADS": "7"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "refused: runtime_threads=3 cannot apply: the process-wide I/O runtime already runs 2 threads "
        "(started by the first server); give every server of a process the same value",
        "threads: 2",
    ]
