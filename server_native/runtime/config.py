"""Server settings: one object holding every option and limit, read by the
native side attribute by attribute."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ServerConfig", "TlsConfig"]

MiB = 1024 * 1024

#: The oldest TLS version a server may accept (Granian's ``--ssl-protocol-min`` values).
PROTOCOL_VERSIONS = ("tls1.2", "tls1.3")

#: The whole numbers each of these settings may be, inclusive: HTTP/2's own
#: bounds (RFC 9113 section 6.5.2; a flow control window below 1 KiB only
#: stalls uploads) and the I/O threads a process may run.
BOUNDS = {
    "max_concurrent_streams": (1, 2**32 - 1),
    "http2_initial_connection_window_size": (1024, 2**31 - 1),
    "http2_initial_stream_window_size": (1024, 2**31 - 1),
    "http2_max_frame_size": (16384, 2**24 - 1),
    "http2_max_headers_size": (1, 2**32 - 1),
    "runtime_threads": (1, 1024),
}

#: The settings of :data:`BOUNDS` for which None means "the default".
_NONE_IS_DEFAULT = frozenset(BOUNDS) - {"max_concurrent_streams", "http2_max_frame_size"}


def out_of_bounds(name: str, value: Any) -> str | None:
    """What is wrong with ``value`` for the setting ``name`` of :data:`BOUNDS`, or None."""
    low, high = BOUNDS[name]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        return f"must be a whole number from {low} to {high}, not {value!r}"
    return None


def cipher_suites(names: str | Sequence[str]) -> tuple[str, ...]:
    """The rustls names of cipher suites given by their rustls, IANA or
    OpenSSL names, as a sequence or one string separated by commas or colons.
    Raises ``TlsConfigError`` (a ValueError) naming the known ones for any other."""
    parts = re.split(r"[,:]", names) if isinstance(names, str) else list(names)
    if not all(isinstance(part, str) for part in parts):
        raise ValueError(f"ciphers must be names of cipher suites, not {names!r}")
    from .._dist.loader import native

    return tuple(native.tls_cipher_suites([part.strip() for part in parts if part.strip()]))


@dataclass
class TlsConfig:
    """Certificate, key and client-certificate policy for a secure server."""

    certificate_path: str
    key_path: str
    certificate_password: str | None = None
    #: Ask clients for a certificate; without ``client_ca_path`` it is handed
    #: to the application unverified (like dart:io's requestClientCertificate).
    request_client_certificate: bool = False
    #: Refuse clients that present no certificate.
    require_client_certificate: bool = False
    #: PEM bundle of CAs that client certificates must chain to.
    client_ca_path: str | None = None
    http2: bool = True
    #: The cipher suites offered, by rustls name (``TLS13_AES_256_GCM_SHA384``,
    #: ``TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256``) or OpenSSL's
    #: (``ECDHE-ECDSA-AES128-GCM-SHA256``); a sequence, or one string separated
    #: by commas or colons. Kept as rustls names. None: every suite rustls has.
    ciphers: str | Sequence[str] | None = None
    #: The oldest TLS version accepted: ``"tls1.2"`` or ``"tls1.3"``.
    protocol_min: str = "tls1.2"
    #: Certificate revocation lists (PEM or DER files) from the CAs of
    #: ``client_ca_path``: a client whose certificate, or one above it below
    #: the CA, is revoked or not covered by its issuer's list is refused.
    crl_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] = ()

    def __post_init__(self) -> None:
        self.certificate_path = _existing_file(self.certificate_path, "certificate_path")
        self.key_path = _existing_file(self.key_path, "key_path")
        if self.client_ca_path is not None:
            self.client_ca_path = _existing_file(self.client_ca_path, "client_ca_path")
        if self.ciphers is not None:
            self.ciphers = cipher_suites(self.ciphers)
        if self.protocol_min not in PROTOCOL_VERSIONS:
            raise ValueError(f"protocol_min must be one of {', '.join(PROTOCOL_VERSIONS)}, not {self.protocol_min!r}")
        crl_paths = [self.crl_paths] if isinstance(self.crl_paths, (str, os.PathLike)) else self.crl_paths
        self.crl_paths = tuple(_existing_file(path, "crl_paths") for path in crl_paths)
        asks = self.request_client_certificate or self.require_client_certificate
        if self.crl_paths and (self.client_ca_path is None or not asks):
            raise ValueError(
                "crl_paths checks client certificates: it needs client_ca_path, "
                "and request_client_certificate or require_client_certificate"
            )


def _existing_file(path: str | os.PathLike[str], what: str) -> str:
    text = os.fspath(path)
    if not text:
        raise ValueError(f"{what} must name a file")
    if not os.path.isfile(text):
        raise FileNotFoundError(2, f"{what}: no such file", text)
    return text


def _seconds(name: str, value: Any, *, none_is_no_limit: bool) -> float:
    """A timeout as a float of seconds; None is 0 (no limit) where allowed."""
    if value is None and none_is_no_limit:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        shown = "a number of seconds, 0 or None for none" if none_is_no_limit else "a number of seconds"
        raise ValueError(f"{name} must be {shown}, not {value!r}")
    return float(value)


@dataclass
class ServerConfig:
    """Socket options, protocol switches, limits and timeouts (seconds; 0 or
    None = none, except ``shutdown_timeout``: 0 = do not wait)."""

    backlog: int = 0
    v6_only: bool = False
    shared: bool = False
    #: Serve on this Unix domain socket path instead of a TCP host and port
    #: (HTTP/1.1 and h2c; no HTTP/3). A stale socket file is replaced, any
    #: other file is an error; the file is removed on close.
    uds: str | None = None
    #: The socket file's mode, e.g. ``0o660``; None leaves it to the umask.
    uds_mode: int | None = None
    #: Serve on this already listening socket (TCP or Unix, e.g. inherited
    #: from a supervisor), or on each of several (one per address), instead
    #: of binding; kept as a tuple. The server uses duplicates: the
    #: descriptors stay the caller's.
    fd: int | Sequence[int] | None = None
    #: The ``fd`` descriptors were inherited for the server alone (the CLI's
    #: ``--fd``, systemd's socket activation): it closes them once it serves
    #: duplicates, so that a socket nobody else holds stops listening as soon
    #: as the server does.
    close_fd: bool = False
    http2: bool = True
    #: HTTP/3 over QUIC on the same port (UDP); only with TLS.
    http3: bool = True
    #: Serve without HTTP/3 rather than fail when its UDP port is taken.
    http3_best_effort: bool = False
    #: Accept 0-RTT requests; they can be replayed, so they carry
    #: ``early-data: 1`` (RFC 8470) and the application may answer 425.
    http3_early_data: bool = False
    #: How long browsers may remember the ``Alt-Svc`` advertisement.
    alt_svc_max_age: int = 86400
    tls: TlsConfig | None = None
    #: Largest request head (431 beyond it) and most header lines.
    max_header_size: int = 64 * 1024
    max_headers: int = 100
    #: Largest request body (413 beyond it).
    max_body_size: int = 32 * MiB
    #: Open connections; further clients wait in the kernel's accept queue.
    max_connections: int = 10_000
    #: Requests handed to Python and not yet answered; the native side waits
    #: (and so do its clients) beyond this.
    max_pending_requests: int = 1024
    #: HTTP/2 streams a connection may have open at once (and HTTP/3's).
    max_concurrent_streams: int = 250
    #: HTTP/2 flow control: how much request body a connection, and each of
    #: its streams, may send ahead of the application reading it, in bytes
    #: (None: hyper's 1 MiB each).
    http2_initial_connection_window_size: int | None = None
    http2_initial_stream_window_size: int | None = None
    #: Size both windows from the measured bandwidth-delay product instead.
    http2_adaptive_window: bool = False
    #: Seconds between the PINGs sent to every HTTP/2 connection, idle ones
    #: included (0 or None: none); a connection whose peer leaves one
    #: unanswered for ``http2_keep_alive_timeout`` seconds is closed (GOAWAY).
    #: A PING and its answer are traffic to ``idle_timeout``.
    http2_keep_alive_interval: float | None = None
    http2_keep_alive_timeout: float = 20.0
    #: The largest HTTP/2 frame accepted (SETTINGS_MAX_FRAME_SIZE).
    http2_max_frame_size: int = 16384
    #: The largest HTTP/2 header list accepted, 431 beyond it
    #: (SETTINGS_MAX_HEADER_LIST_SIZE); None: ``max_header_size``.
    http2_max_headers_size: int | None = None
    #: The I/O threads of the process-wide runtime (Granian's
    #: ``--runtime-threads``): honoured by the first server a process starts;
    #: a later one asking for another number is refused. None: the
    #: ``SERVER_NATIVE_THREADS`` environment variable, or one per CPU this
    #: process may run on (at most 64).
    runtime_threads: int | None = None
    #: How long a request head may take to arrive in full, from its first
    #: byte (the first request's: from connecting). Between requests,
    #: ``idle_timeout`` applies.
    header_read_timeout: float | None = 30.0
    tls_handshake_timeout: float | None = 10.0
    #: How long a request body may go without a byte arriving (nginx's
    #: ``client_body_timeout``): 408 if the response has not started, else
    #: the exchange is cut off; the application's read sees a disconnect.
    body_read_timeout: float | None = 60.0
    #: Keep-alive: a connection idle this long is closed.
    idle_timeout: float | None = 120.0
    #: How long the application may take to start its response (504 after).
    response_timeout: float | None = 0.0
    #: How long a graceful close waits for in-flight requests before it cuts
    #: them: long enough for a download or an event stream to finish in a
    #: rolling deploy (gunicorn's graceful timeout; Kubernetes kills after 30 s).
    shutdown_timeout: float = 30.0
    auto_compress: bool = False
    #: A ``Date`` header on every response that has none.
    date_header: bool = True
    #: ``(name, value)`` pairs added to every response that does not set a
    #: header of that name itself (e.g. ``[("server", "server-native")]``).
    response_headers: Sequence[tuple[str, str]] = ()
    #: Largest WebSocket message (and frame) accepted, once inflated (1009 beyond it).
    websocket_max_message_size: int = 16 * MiB
    #: Compress WebSocket messages (permessage-deflate) with clients that offer it.
    websocket_compression: bool = True
    #: Every connection opens with a PROXY protocol header (HAProxy's, version
    #: 1 or 2) naming the client the proxy carries: that client is the one
    #: every API reports. A connection without a valid header, or from a peer
    #: not in ``forwarded_allow_ips``, is closed. Not for HTTP/3 (QUIC cannot
    #: carry it), which is off when this is on.
    proxy_protocol: bool = False
    #: The peers trusted to send a PROXY protocol header: addresses, networks
    #: (``"10.0.0.0/8"``) or ``"*"`` for any; a sequence or a comma-separated
    #: string. A Unix socket peer is trusted (the file's mode says who may
    #: connect).
    forwarded_allow_ips: str | Sequence[str] = ("127.0.0.1", "::1")
    #: ``(route, directory)`` pairs: a request whose path is under a route
    #: (``/static``, ``/static/...``) is answered natively from the files in
    #: that directory (GET and HEAD; 404 for a missing file), never reaching
    #: the application. The first route a path is under wins.
    static_files: Sequence[tuple[str, str | os.PathLike[str]]] = ()
    #: ``Cache-Control: max-age`` of static files, in seconds; 0 sends none.
    static_files_expires: int = 86400
    #: The file served for a directory under a static route, e.g.
    #: ``index.html``; None answers a directory 404 (nothing is listed).
    static_files_index: str | None = None
    #: The server pings every WebSocket this often (uvicorn's default) and
    #: closes one whose pong has not come within ``ws_ping_timeout`` (1011).
    ws_ping_interval: float | None = 20.0
    ws_ping_timeout: float | None = 20.0
    #: Received WebSocket messages held for the application (not yet taken
    #: by its ``receive``) at most; the server stops reading the socket
    #: beyond it, or beyond 1 MiB of them.
    ws_max_queue: int = 32
    #: Benchmark ceiling: the native side answers every request with these
    #: bytes without calling Python.
    native_response: bytes | None = None
    #: False: requests and responses cross a local socket as frames (the
    #: "bridge" transport) instead of being handed over in-process.
    native_callback: bool = True
    #: Set by the server with ``native_callback=False``: where Python listens
    #: for the bridge (``unix:/path`` or ``tcp:127.0.0.1:port``), and the
    #: token the native side presents on each connection.
    bridge_address: str | None = None
    bridge_token: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in (
            "header_read_timeout",
            "tls_handshake_timeout",
            "body_read_timeout",
            "idle_timeout",
            "response_timeout",
            "ws_ping_interval",
            "ws_ping_timeout",
        ):
            setattr(self, name, _seconds(name, getattr(self, name), none_is_no_limit=True))
        self.shutdown_timeout = _seconds("shutdown_timeout", self.shutdown_timeout, none_is_no_limit=False)
        for name in (
            "max_header_size",
            "max_headers",
            "max_body_size",
            "max_connections",
            "max_pending_requests",
            "ws_max_queue",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        self._check_tuning()
        if not 0 <= self.backlog < 2**31:
            raise ValueError("backlog must be between 0 and 2**31-1")
        if self.uds is not None:
            self.uds = os.fspath(self.uds)
        if self.uds is not None and self.fd is not None:
            raise ValueError("uds and fd are two ways to say where to listen: give one")
        if self.uds_mode is not None and (self.uds is None or not 0 <= self.uds_mode <= 0o777):
            raise ValueError("uds_mode needs uds and must be between 0 and 0o777")
        if self.fd is not None:
            self.fd = _descriptors(self.fd)
        self.response_headers = _header_pairs(self.response_headers)
        self.forwarded_allow_ips = _networks(self.forwarded_allow_ips)
        if self.native_response is not None:
            self.native_response = bytes(self.native_response)
        self.static_files = _static_mounts(self.static_files)
        expires = self.static_files_expires
        if isinstance(expires, bool) or not isinstance(expires, int) or expires < 0:
            raise ValueError(f"static_files_expires must be a whole number of seconds, 0 for none, not {expires!r}")
        index = self.static_files_index
        if index is not None and (index in ("", ".", "..") or any(c in index for c in "/\\\0")):
            raise ValueError(f"static_files_index must be a file name, not {index!r}")

    def _check_tuning(self) -> None:
        """The HTTP/2 settings and ``runtime_threads``."""
        for name in BOUNDS:
            value = getattr(self, name)
            problem = None if value is None and name in _NONE_IS_DEFAULT else out_of_bounds(name, value)
            if problem is not None:
                raise ValueError(f"{name} {problem}")
        given_windows = self.http2_initial_connection_window_size, self.http2_initial_stream_window_size
        if self.http2_adaptive_window and any(size is not None for size in given_windows):
            raise ValueError(
                "http2_adaptive_window sizes the flow control windows itself: give it or the window sizes, not both"
            )
        self.http2_keep_alive_interval = _seconds(
            "http2_keep_alive_interval", self.http2_keep_alive_interval, none_is_no_limit=True
        )
        self.http2_keep_alive_timeout = _seconds(
            "http2_keep_alive_timeout", self.http2_keep_alive_timeout, none_is_no_limit=False
        )
        if self.http2_keep_alive_timeout <= 0:
            raise ValueError("http2_keep_alive_timeout must be a number of seconds above 0")


def _descriptors(fd: int | Sequence[int]) -> tuple[int, ...]:
    fds = (fd,) if isinstance(fd, int) else tuple(fd)
    if not fds or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in fds):
        raise ValueError(f"fd must be a file descriptor number or a non-empty sequence of them, not {fd!r}")
    return fds


def _networks(items: str | Sequence[str]) -> tuple[str, ...]:
    """Each address or network in a canonical form the native side parses."""
    parts = items.split(",") if isinstance(items, str) else list(items)
    networks = []
    for part in parts:
        if not isinstance(part, str):
            raise ValueError(f"forwarded_allow_ips must hold strings, not {part!r}")
        part = part.strip()
        if part == "*":
            networks.append(part)
        elif part:
            try:
                networks.append(str(ipaddress.ip_network(part, strict=False)))
            except ValueError:
                raise ValueError(f"forwarded_allow_ips: not an IP address or network: {part!r}") from None
    return tuple(networks)


def _static_mounts(pairs: Sequence[tuple[str, str | os.PathLike[str]]]) -> tuple[tuple[str, str], ...]:
    """The pairs with each directory resolved now (a later ``chdir`` changes
    nothing); a route is a path, a directory must exist."""
    mounts = []
    for pair in pairs:
        if len(pair) != 2 or not isinstance(pair[0], str) or not isinstance(pair[1], (str, os.PathLike)):
            raise ValueError(f"static_files must be (route, directory) pairs, not {pair!r}")
        route, directory = pair[0], os.path.realpath(pair[1])
        if not route.startswith("/") or any(c in route for c in "?#%"):
            raise ValueError(f"a static_files route is a path such as '/static', not {route!r}")
        if not os.path.isdir(directory):
            raise NotADirectoryError(20, "static_files: not a directory", os.fspath(pair[1]))
        mounts.append((route, directory))
    return tuple(mounts)


def _header_pairs(pairs: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """The pairs as a tuple; the native side checks names and values."""
    checked = tuple(tuple(pair) for pair in pairs)
    for pair in checked:
        if len(pair) != 2 or not all(isinstance(part, str) for part in pair):
            raise ValueError(f"response_headers must be (name, value) pairs of strings, not {pair!r}")
    return checked  # type: ignore[return-value]
