"""The command line: ``server-native serve module:app`` (also
``python -m server_native serve``), with options a uvicorn or Granian user
knows. A thin layer over :func:`server_native.run`."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..runtime.config import (
    BOUNDS,
    PROTOCOL_VERSIONS,
    ServerConfig,
    cipher_suites,
    out_of_bounds,
)
from ..runtime.logs import (
    LOG_LEVELS,
    LogConfigError,
    access_log_format,
    configure_logging,
)
from .runner import INTERFACES, AppLoadError, load_app, run

__all__ = ["main"]

#: The value of ``--server-header``'s ``Server`` header.
SERVER_HEADER = "server-native"
#: The first descriptor systemd passes (``SD_LISTEN_FDS_START``).
SD_LISTEN_FDS_START = 3
#: Seconds a worker has to answer a health check, unless told otherwise.
_HEALTHCHECK_TIMEOUT = 5.0
#: Where ``--metrics`` listens, unless told otherwise.
_METRICS_ADDRESS = "127.0.0.1"
_METRICS_PORT = 9090


class _Version(argparse.Action):
    """``--version``: the package's version and the native library's, found
    without building it (the library is only looked for when asked)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any, **_kwargs: Any) -> None:
        from .. import __version__

        print(f"server-native {__version__}")
        print(f"native library: {_native_version()}")
        parser.exit()


def _native_version() -> str:
    from .._dist.loader import resolution

    result = resolution(build=False)
    if result.module is None:
        return "not found (python -m server_native info says where it was looked for)"
    return f"{result.module.__version__} (ABI {result.module.ABI_VERSION}) from {result.path}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="server-native", description="A Rust-backed HTTP server for Python apps.", allow_abbrev=False
    )
    parser.add_argument(
        "--version", action=_Version, help="print the versions of the package and of its native library"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve an ASGI, WSGI or direct-handler app",
        description="Serve an ASGI, WSGI or direct-handler app.",
        allow_abbrev=False,
    )
    serve.add_argument("app", help="the app as module:attribute, e.g. myproject.main:app")
    serve.add_argument("--interface", choices=INTERFACES, default="auto", help="app interface (default: detected)")
    serve.add_argument("--factory", action="store_true", help="APP is a factory: call it to get the app")
    serve.add_argument("--app-dir", default="", help="import the app from this directory (default: the current one)")
    serve.add_argument("--host", help="address to bind: an IP, a name, 'localhost' or 'any' (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="default 8000")
    serve.add_argument("--uds", help="bind a Unix domain socket at this path instead of a TCP port")
    serve.add_argument(
        "--uds-mode", type=_octal, help="the Unix socket file's mode, e.g. 660 (default: from the umask)"
    )
    serve.add_argument(
        "--fd",
        type=int,
        action="append",
        help="serve on this inherited listening socket (TCP or Unix) instead of binding; repeatable",
    )
    serve.add_argument("--backlog", type=int, default=0)
    serve.add_argument(
        "--workers", type=int, default=1, help="worker processes sharing the port (SO_REUSEPORT) or the Unix socket"
    )
    serve.add_argument("--threads", type=int, default=4, help="WSGI worker threads per process")
    serve.add_argument("--http", choices=("auto", "1", "2"), default="auto", help="HTTP versions over TCP")
    serve.add_argument(
        "--http3", action=argparse.BooleanOptionalAction, default=True, help="HTTP/3 over QUIC (with TLS)"
    )
    serve.add_argument("--ssl-certfile")
    serve.add_argument("--ssl-keyfile")
    serve.add_argument("--ssl-keyfile-password")
    serve.add_argument(
        "--ssl-ca-certs", "--ssl-ca", dest="ssl_ca", help="CA bundle that client certificates must chain to"
    )
    serve.add_argument(
        "--ssl-cert-reqs",
        type=int,
        choices=(0, 1, 2),
        default=0,
        help="client certificates: 0 none, 1 optional, 2 required",
    )
    serve.add_argument("--lifespan", choices=("auto", "on", "off"), default="auto")
    serve.add_argument("--root-path", default="")
    serve.add_argument(
        "--proxy-headers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="trust X-Forwarded-* / Forwarded from --forwarded-allow-ips",
    )
    serve.add_argument(
        "--forwarded-allow-ips",
        default=os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1"),
        help="comma-separated addresses or networks ('*': any) trusted with proxy headers and PROXY protocol headers",
    )
    serve.add_argument(
        "--proxy-protocol",
        action="store_true",
        help="every connection opens with a PROXY protocol header (v1 or v2) from --forwarded-allow-ips; no HTTP/3",
    )
    serve.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        help="level of the server's loggers (server_native, server_native.access); the root logger is the app's "
        "(default info, or as --log-config says)",
    )
    serve.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        help="log every request to the server_native.access logger, whatever the interface (default: off, on with --access-log-format)",
    )
    serve.add_argument(
        "--server-header",
        action=argparse.BooleanOptionalAction,
        default=False,
        help=f"send 'Server: {SERVER_HEADER}' with responses that have no Server header",
    )
    serve.add_argument(
        "--date-header",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send a Date header with responses that have none",
    )
    serve.add_argument(
        "--header",
        dest="headers",
        action="append",
        default=[],
        type=_header,
        metavar="NAME:VALUE",
        help="a header for every response that does not set it itself; repeatable",
    )
    serve.add_argument(
        "--static-path-route",
        action="append",
        default=[],
        metavar="ROUTE",
        help="serve files under this route natively (default /static with one --static-path-mount); "
        "repeatable, paired in order with --static-path-mount",
    )
    serve.add_argument(
        "--static-path-mount",
        action="append",
        default=[],
        metavar="DIRECTORY",
        help="the directory whose files a --static-path-route serves; repeatable",
    )
    serve.add_argument(
        "--static-path-expires",
        type=_duration,
        default=ServerConfig.static_files_expires,
        metavar="DURATION",
        help="Cache-Control max-age of static files: seconds or e.g. 1d, 2h30m (default 86400; 0 sends none)",
    )
    serve.add_argument(
        "--static-path-dir-to-file",
        metavar="NAME",
        help="the file served for a directory under a static route, e.g. index.html (default: 404)",
    )
    serve.add_argument("--max-body-size", type=int, help="bytes (default 32 MiB)")
    serve.add_argument("--max-header-size", type=int, help="bytes (default 64 KiB)")
    serve.add_argument("--max-connections", type=int)
    serve.add_argument(
        "--ws-max-size",
        dest="websocket_max_message_size",
        type=int,
        metavar="BYTES",
        help="largest WebSocket message accepted, in bytes (default 16 MiB; 1009 beyond it)",
    )
    serve.add_argument(
        "--ws-max-queue",
        type=int,
        metavar="N",
        help=f"received WebSocket messages held for the app at most (default {ServerConfig.ws_max_queue})",
    )
    serve.add_argument(
        "--ws-ping-interval",
        type=float,
        metavar="SECONDS",
        help=f"seconds between the server's WebSocket pings (default {ServerConfig.ws_ping_interval:g}; 0: none)",
    )
    serve.add_argument(
        "--ws-ping-timeout",
        type=float,
        metavar="SECONDS",
        help=f"seconds a pong may take before the WebSocket is closed with 1011 (default {ServerConfig.ws_ping_timeout:g}; 0: no limit)",
    )
    serve.add_argument(
        "--ws-per-message-deflate",
        dest="websocket_compression",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="WebSocket permessage-deflate compression, when the client offers it",
    )
    serve.add_argument("--header-read-timeout", type=float)
    serve.add_argument(
        "--body-read-timeout", type=float, help="seconds a request body may stall before 408 (default 60)"
    )
    serve.add_argument("--keep-alive-timeout", "--timeout-keep-alive", dest="idle_timeout", type=float)
    serve.add_argument("--response-timeout", type=float)
    serve.add_argument(
        "--shutdown-timeout",
        "--timeout-graceful-shutdown",
        dest="shutdown_timeout",
        type=float,
        help="on SIGTERM/SIGINT, seconds that requests in flight (downloads, event streams) have to finish "
        f"before they are cut (default {ServerConfig.shutdown_timeout:g}; 0 cuts at once); a second signal stops at once",
    )
    serve.add_argument("--reload", action="store_true", help="restart when Python files change (needs watchfiles)")
    serve.add_argument(
        "--reload-dir", action="append", default=[], help="directories to watch (default: the current one)"
    )
    serve.add_argument("--shared", action="store_true", help=argparse.SUPPRESS)
    _add_tuning_arguments(serve)
    _add_process_options(serve)
    _add_metrics_options(serve)
    from .._dist import setup as prebuilt

    setup = commands.add_parser("setup", help="download the prebuilt native library of a release into a cache")
    prebuilt.add_setup_arguments(setup)
    setup.set_defaults(run_command=prebuilt.run_setup)
    info = commands.add_parser("info", help="which native library is loaded, from where, and what was tried")
    prebuilt.add_info_arguments(info)
    info.set_defaults(run_command=prebuilt.run_info)
    return parser


def _add_tuning_arguments(serve: argparse.ArgumentParser) -> None:
    """TLS suites, versions and revocation, HTTP/2 settings and the I/O
    threads, named as Granian names them."""
    tls = serve.add_argument_group("TLS: cipher suites, versions, revocation")
    tls.add_argument(
        "--ssl-ciphers",
        type=_cipher_suites,
        metavar="NAMES",
        help="cipher suites, separated by commas or colons, by rustls name (TLS13_AES_256_GCM_SHA384, "
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256) or OpenSSL's (ECDHE-ECDSA-AES128-GCM-SHA256); "
        "not OpenSSL cipher strings such as HIGH:!aNULL (default: every suite rustls has)",
    )
    tls.add_argument(
        "--ssl-protocol-min",
        choices=PROTOCOL_VERSIONS,
        default="tls1.2",
        help="the oldest TLS version accepted (default tls1.2)",
    )
    tls.add_argument(
        "--ssl-crl",
        action="append",
        metavar="FILE",
        help="a certificate revocation list (PEM or DER) for client certificates, with --ssl-ca-certs and "
        "--ssl-cert-reqs 1 or 2; repeatable",
    )
    http2 = serve.add_argument_group("HTTP/2")
    http2.add_argument(
        "--http2-max-concurrent-streams",
        dest="max_concurrent_streams",
        type=_bounded("max_concurrent_streams"),
        metavar="N",
        help=f"streams a connection may have open at once, HTTP/3's too (default {ServerConfig.max_concurrent_streams})",
    )
    http2.add_argument(
        "--http2-initial-connection-window-size",
        type=_bounded("http2_initial_connection_window_size"),
        metavar="BYTES",
        help="request body a connection may send ahead of the application (default 1 MiB)",
    )
    http2.add_argument(
        "--http2-initial-stream-window-size",
        type=_bounded("http2_initial_stream_window_size"),
        metavar="BYTES",
        help="request body a stream may send ahead of the application (default 1 MiB)",
    )
    http2.add_argument(
        "--http2-adaptive-window",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="size the flow control windows from the measured bandwidth-delay product (instead of the two above)",
    )
    http2.add_argument(
        "--http2-keep-alive-interval",
        type=_milliseconds,
        metavar="MS",
        help="milliseconds between PINGs to every connection, as Granian takes it (default: none)",
    )
    http2.add_argument(
        "--http2-keep-alive-timeout",
        type=float,
        metavar="SECONDS",
        help=f"a connection that leaves a PING unanswered this long is closed (default {ServerConfig.http2_keep_alive_timeout:g})",
    )
    http2.add_argument(
        "--http2-max-frame-size",
        type=_bounded("http2_max_frame_size"),
        metavar="BYTES",
        help=f"the largest frame accepted (default {ServerConfig.http2_max_frame_size})",
    )
    http2.add_argument(
        "--http2-max-headers-size",
        type=_bounded("http2_max_headers_size"),
        metavar="BYTES",
        help="the largest header list accepted, 431 beyond it (default: --max-header-size)",
    )
    runtime = serve.add_argument_group("runtime")
    runtime.add_argument(
        "--runtime-threads",
        type=_bounded("runtime_threads"),
        metavar="N",
        help="I/O threads per process (default: $SERVER_NATIVE_THREADS, or one per CPU it may run on, at most 64)",
    )


def _bounded(name: str) -> Callable[[str], int]:
    """An argument type: a whole number within ``name``'s bounds."""

    def parse(text: str) -> int:
        value: Any = text
        try:
            value = int(text)
        except ValueError:
            pass
        problem = out_of_bounds(name, value)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return int(value)

    parse.__name__ = name
    return parse


def _milliseconds(text: str) -> float:
    """Milliseconds from the command line, as seconds."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of milliseconds from 1, not {text!r}")
    return value / 1000


def _cipher_suites(text: str) -> tuple[str, ...]:
    try:
        return cipher_suites(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _check_tuning(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """TLS options need TLS; revocation lists need verified client certificates."""
    tls_only = {
        "--ssl-ciphers": args.ssl_ciphers,
        "--ssl-crl": args.ssl_crl,
        "--ssl-protocol-min": args.ssl_protocol_min != "tls1.2",
    }
    given = [flag for flag, value in tls_only.items() if value]
    if given and not args.ssl_certfile:
        parser.error(f"{', '.join(given)} needs --ssl-certfile and --ssl-keyfile")
    if args.ssl_crl and (not args.ssl_ca or not args.ssl_cert_reqs):
        parser.error("--ssl-crl checks client certificates: it needs --ssl-ca-certs and --ssl-cert-reqs 1 or 2")
    if args.http2_keep_alive_timeout is not None and not args.http2_keep_alive_timeout > 0:
        parser.error(
            f"--http2-keep-alive-timeout must be a number of seconds above 0, not {args.http2_keep_alive_timeout:g}"
        )
    windows = args.http2_initial_connection_window_size, args.http2_initial_stream_window_size
    if args.http2_adaptive_window and any(size is not None for size in windows):
        parser.error(
            "--http2-adaptive-window sizes the flow control windows itself: give it or the window sizes, not both"
        )


def _tuning_options(args: argparse.Namespace) -> dict[str, Any]:
    """run() keyword arguments of the HTTP/2 and runtime options given."""
    names = (*BOUNDS, "http2_keep_alive_interval", "http2_keep_alive_timeout")
    options: dict[str, Any] = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    options["http2_adaptive_window"] = args.http2_adaptive_window
    return options


def _add_process_options(serve: argparse.ArgumentParser) -> None:
    """Worker recycling and health, the pid file, the environment file and
    the logging configuration."""
    group = serve.add_argument_group("worker processes, pid file, environment, logging")
    group.add_argument(
        "--limit-max-requests",
        type=_at_least(1, int),
        metavar="N",
        help="replace a worker once it has answered N requests (a successor starts first, then it drains); "
        "runs the server under a supervisor even without --workers",
    )
    group.add_argument(
        "--limit-max-requests-jitter",
        type=_at_least(0, int),
        default=0,
        metavar="J",
        help="each worker's limit is --limit-max-requests plus a random 0 to J, so that workers are not replaced together",
    )
    group.add_argument(
        "--workers-lifetime",
        type=_above_zero,
        metavar="SECONDS",
        help="replace a worker this long after it started, as --limit-max-requests does",
    )
    group.add_argument(
        "--workers-max-rss",
        type=_at_least(1, int),
        metavar="MiB",
        help="replace a worker whose resident memory (VmRSS, read every second) is above this, as --limit-max-requests does",
    )
    group.add_argument(
        "--timeout-worker-healthcheck",
        type=_at_least(0, float),
        metavar="SECONDS",
        help="replace a worker whose event loop leaves a ping unanswered this long, and kill it (SIGKILL) "
        f"if it does not answer as long again (default {_HEALTHCHECK_TIMEOUT:g} with worker processes, none with --reload; 0: none)",
    )
    group.add_argument("--pid-file", metavar="PATH", help="write the server's process id to this file; removed at exit")
    group.add_argument(
        "--env-file",
        type=_existing_file,
        metavar="PATH",
        help="load environment variables from this dotenv file before the app is imported; "
        "variables already set win (needs python-dotenv)",
    )
    group.add_argument(
        "--log-config",
        type=_existing_file,
        metavar="PATH",
        help="logging configuration replacing the server's: .json or .yaml (dictConfig), else .ini (fileConfig)",
    )
    group.add_argument(
        "--access-log-format",
        type=_access_log_format,
        metavar="FORMAT",
        help="the access log line, with gunicorn's atoms, e.g. '%%(h)s \"%%(r)s\" %%(s)s %%(b)s %%(D)s' "
        "(see the README); turns the access log on",
    )
    group.add_argument("--supervisor-fd", type=int, help=argparse.SUPPRESS)


def _add_metrics_options(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group("metrics")
    group.add_argument(
        "--metrics",
        action="store_true",
        help="serve the server's figures (connections, requests by protocol and status class, refusals, bytes, "
        "request durations; with --workers, added up over the workers, and their spawns and memory) "
        "in the Prometheus text format at http://ADDRESS:PORT/metrics",
    )
    group.add_argument(
        "--metrics-address",
        default=None,
        metavar="ADDRESS",
        help=f"the address --metrics listens on (default {_METRICS_ADDRESS})",
    )
    group.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        metavar="PORT",
        help=f"the port --metrics listens on (default {_METRICS_PORT})",
    )


def _metrics_listen(args: argparse.Namespace) -> tuple[str, int] | None:
    """Where --metrics listens, or None without it."""
    if not args.metrics:
        return None
    address = _METRICS_ADDRESS if args.metrics_address is None else args.metrics_address
    return address, _METRICS_PORT if args.metrics_port is None else args.metrics_port


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 0 to 65535, not {text!r}")
    return port


def _at_least(low: float, kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"not {'a whole number' if kind is int else 'a number'}: {text!r}"
            ) from None
        if not value >= low:  # NaN too
            raise argparse.ArgumentTypeError(f"must be at least {low:g}, not {text}")
        return value

    return parse


def _above_zero(text: str) -> float:
    value = _at_least(0, float)(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return float(value)


def _existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return text


def _access_log_format(text: str) -> str:
    try:
        return access_log_format(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _header(text: str) -> tuple[str, str]:
    name, colon, value = text.partition(":")
    if not colon or not name.strip():
        raise argparse.ArgumentTypeError(f"a header is NAME:VALUE, not {text!r}")
    return name.strip(), value.strip()


_DURATION = re.compile(r"(?:(?P<d>\d+)d)?(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m)?(?:(?P<s>\d+)s)?")


def _duration(text: str) -> int:
    """Seconds, as a number or in days, hours, minutes and seconds (``1h30m``)."""
    if text.isdigit():
        return int(text)
    match = _DURATION.fullmatch(text)
    if not text or match is None:
        raise argparse.ArgumentTypeError(f"a duration is a number of seconds or e.g. 1d, 2h30m, 90s, not {text!r}")
    scale = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    return sum(int(match[unit] or 0) * seconds for unit, seconds in scale.items())


def _octal(text: str) -> int:
    try:
        mode = int(text.removeprefix("0o"), 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal file mode: {text!r}") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"file mode must be between 000 and 777, not {text!r}")
    return mode


def _socket_activation(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """systemd's socket activation (``sd_listen_fds``): the listening sockets
    it passed this process (``LISTEN_PID``), descriptors 3 onwards
    (``LISTEN_FDS``), are served as ``--fd`` would. The variables are
    removed, so that no child takes them for its own."""
    count, pid = os.environ.get("LISTEN_FDS"), os.environ.get("LISTEN_PID")
    if count is None or pid != str(os.getpid()):
        return
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if not count.isdigit() or int(count) < 1:
        parser.error(f"LISTEN_FDS must be a number of sockets, not {count!r}")
    if args.fd is not None or args.uds is not None or args.host is not None or args.port is not None:
        parser.error(
            f"systemd passed {count} listening socket(s) (LISTEN_FDS): --host, --port, --uds and --fd would listen elsewhere"
        )
    args.fd = [SD_LISTEN_FDS_START + index for index in range(int(count))]


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuses contradictory options, then fills in the TCP defaults."""
    tcp_given = args.host is not None or args.port is not None
    if args.uds is not None and tcp_given:
        parser.error("--uds replaces --host/--port: give one or the other")
    if args.fd is not None and (tcp_given or args.uds is not None):
        parser.error("--fd replaces --host/--port and --uds: give one or the other")
    if args.uds_mode is not None and args.uds is None:
        parser.error("--uds-mode needs --uds")
    if args.uds == "":
        parser.error("--uds needs a socket file path")
    args.host = "127.0.0.1" if args.host is None else args.host
    args.port = 8000 if args.port is None else args.port
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, not {args.port}")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.workers > 1 and args.port == 0 and args.uds is None and args.fd is None:
        parser.error("--workers needs an explicit --port (every worker binds the same one)")
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        parser.error("--ssl-certfile and --ssl-keyfile go together")
    if args.ssl_cert_reqs and not args.ssl_certfile:
        parser.error("--ssl-cert-reqs needs --ssl-certfile and --ssl-keyfile")
    _check_static(args, parser)
    _check_tuning(args, parser)
    _check_process_options(args, parser)
    for option in ("--metrics-address", "--metrics-port"):
        if getattr(args, option[2:].replace("-", "_")) is not None and not args.metrics:
            parser.error(f"{option} needs --metrics")


def _check_static(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Pairs routes with mounts: one mount alone is served under /static."""
    routes, mounts = args.static_path_route, args.static_path_mount
    if len(mounts) == 1 and not routes:
        routes = ["/static"]
    if len(routes) != len(mounts):
        parser.error("--static-path-route and --static-path-mount go in pairs: give as many of each")
    for mount in mounts:
        if not os.path.isdir(mount):
            parser.error(f"--static-path-mount: not a directory: {mount!r}")
    args.static_files = list(zip(routes, mounts))


def _check_process_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from .supervisor import CHANNELS

    if args.limit_max_requests_jitter and args.limit_max_requests is None:
        parser.error("--limit-max-requests-jitter needs --limit-max-requests")
    recycling = ("--limit-max-requests", "--workers-lifetime", "--workers-max-rss", "--timeout-worker-healthcheck")
    for option in recycling:
        if getattr(args, option[2:].replace("-", "_")) is not None and not CHANNELS:
            parser.error(f"{option} needs a POSIX system (the supervisor's channel to its workers)")
    if args.workers_max_rss is not None and not os.path.exists("/proc/self/status"):
        parser.error("--workers-max-rss reads /proc/PID/status, which this system does not have")
    if args.pid_file == "":
        parser.error("--pid-file needs a path")
    if args.metrics and _supervised(args) and not CHANNELS:
        parser.error("--metrics with worker processes needs a POSIX system (the supervisor's channel to its workers)")


def _supervised(args: argparse.Namespace) -> bool:
    """Whether workers run under a supervisor: several of them, --reload,
    or an option that replaces a worker (which even a single process needs
    a supervisor for: its successor starts beside it)."""
    replacing = (args.limit_max_requests, args.workers_lifetime, args.workers_max_rss, args.timeout_worker_healthcheck)
    return args.workers > 1 or args.reload or any(value is not None for value in replacing)


def _recycling(args: argparse.Namespace) -> Any:
    from .supervisor import Recycling

    timeout = args.timeout_worker_healthcheck
    if timeout is None:
        # A debugger stopped at a breakpoint blocks the loop: not a fault.
        timeout = None if args.reload else _HEALTHCHECK_TIMEOUT
    return Recycling(
        lifetime=args.workers_lifetime, max_rss_mib=args.workers_max_rss, healthcheck_timeout=timeout or None
    )


def _load_env_file(path: str) -> None:
    """The dotenv file's variables, into this process's environment (and
    so its workers'); those already set are kept, as uvicorn does."""
    try:
        from dotenv import load_dotenv
    except ImportError:
        sys.exit("server-native: error: --env-file needs python-dotenv (pip install 'server-native[dotenv]')")
    load_dotenv(path, override=False)


@contextmanager
def _pid_file(path: str | None, parser: argparse.ArgumentParser) -> Iterator[None]:
    """This process's id in ``path`` while it runs (a stale file is
    replaced); removed at exit if it still names this process."""
    if path is None:
        yield
        return
    pid = str(os.getpid())
    temporary = f"{path}.{pid}.tmp"
    try:
        with open(temporary, "w", encoding="ascii") as file:
            file.write(f"{pid}\n")
        os.replace(temporary, path)
    except OSError as exc:
        parser.error(f"--pid-file {path}: {exc.strerror or exc}")
    try:
        yield
    finally:
        try:
            with open(path, encoding="ascii") as file:
                ours = file.read().strip() == pid
            if ours:
                os.remove(path)
        except OSError:
            pass


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """run() keyword arguments from the parsed command line."""
    options: dict[str, Any] = {"interface": args.interface, "backlog": args.backlog, "shared": args.shared}
    for name in ("uds", "uds_mode", "fd"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    # Inherited (from a supervisor, systemd or a shell) for this process alone.
    options["close_fd"] = args.fd is not None
    if args.http != "auto":
        options["http2"] = args.http == "2"
    options["http3"] = args.http3 and bool(args.ssl_certfile) and not args.proxy_protocol
    options["websocket_compression"] = args.websocket_compression
    options["proxy_protocol"] = args.proxy_protocol
    options["forwarded_allow_ips"] = args.forwarded_allow_ips
    options["date_header"] = args.date_header
    options["response_headers"] = _response_headers(args)
    if args.static_files:
        options["static_files"] = args.static_files
        options["static_files_expires"] = args.static_path_expires
        options["static_files_index"] = args.static_path_dir_to_file
    options.update(_tuning_options(args))
    limits = (
        "max_body_size", "max_header_size", "max_connections", "websocket_max_message_size",
        "ws_max_queue", "ws_ping_interval", "ws_ping_timeout",
        "header_read_timeout", "body_read_timeout", "idle_timeout", "response_timeout", "shutdown_timeout",
    )  # fmt: skip
    for name in limits:
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    if args.ssl_certfile:
        from ..runtime.bound import tls_settings

        options["tls"] = tls_settings(
            certificate_path=args.ssl_certfile,
            key_path=args.ssl_keyfile,
            certificate_password=args.ssl_keyfile_password,
            request_client_certificate=args.ssl_cert_reqs >= 1,
            require_client_certificate=args.ssl_cert_reqs == 2,
            client_ca_path=args.ssl_ca,
            http2=options.get("http2", True),
            ciphers=args.ssl_ciphers,
            protocol_min=args.ssl_protocol_min,
            crl_paths=args.ssl_crl or (),
        )
    interface = args.interface
    if interface in ("auto", "asgi", "wsgi"):
        options["root_path"] = args.root_path
        if args.proxy_headers:
            from ..runtime.proxy import ProxyHeaders

            options["proxy"] = ProxyHeaders(args.forwarded_allow_ips.split(","))
    if interface in ("auto", "asgi"):
        options["lifespan"] = args.lifespan
    if interface in ("auto", "wsgi"):
        options["threads"] = args.threads
    options["access_log"] = bool(args.access_log_format) if args.access_log is None else args.access_log
    options["access_log_format"] = args.access_log_format
    if args.supervisor_fd is not None:
        from .worker import SupervisedWorker

        options["shutdown_signal"] = SupervisedWorker(
            args.supervisor_fd, max_requests=args.limit_max_requests, jitter=args.limit_max_requests_jitter
        )
    return options


def _response_headers(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``--header`` pairs, and uvicorn's rule for ``--server-header``: a
    ``Server`` given with ``--header`` replaces ours."""
    headers = list(args.headers)
    if args.server_header and not any(name.lower() == "server" for name, _ in headers):
        headers.insert(0, ("server", SERVER_HEADER))
    return headers


def _serve_one(args: argparse.Namespace) -> int:
    sys.path.insert(0, os.path.abspath(args.app_dir))
    try:
        app = load_app(args.app, factory=args.factory)
    except AppLoadError as exc:
        print(f"server-native: error: {exc}", file=sys.stderr)
        return 1
    options = _options(args)
    if options["interface"] == "auto":
        from .runner import detect_interface

        options["interface"] = detect_interface(app)
    adapter_only = {"asgi": ("lifespan", "root_path", "proxy"), "wsgi": ("threads", "root_path", "proxy")}
    keep = set(adapter_only.get(options["interface"], ()))
    for name in ("lifespan", "threads", "root_path", "proxy"):
        if name not in keep:
            options.pop(name, None)
    try:
        with _metrics_listener(_metrics_listen(args)):
            run(app, args.host, args.port, log_level=None, **options)
    except OSError as exc:
        print(f"server-native: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - lifespan failures and the like: one line, non-zero
        print(f"server-native: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


@contextmanager
def _metrics_listener(listen: tuple[str, int] | None) -> Iterator[None]:
    """With --metrics, this process's servers' figures served while it runs."""
    if listen is None:
        yield
        return
    from ..runtime.bound import process_metrics
    from ..runtime.prometheus import FiguresCollector
    from .metrics import MetricsListener

    try:
        listener = MetricsListener(*listen, FiguresCollector(process_metrics))
    except OSError as exc:
        raise OSError(
            exc.errno, f"--metrics: cannot listen on {listen[0]} port {listen[1]}: {exc.strerror or exc}"
        ) from None
    try:
        yield
    finally:
        listener.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw)
    if args.command in ("setup", "info"):
        return int(args.run_command(args))
    _socket_activation(args, parser)
    _check(args, parser)
    # Both before the app is imported (and before workers start, which
    # inherit the environment): an app that configures its logging as it is
    # imported may then change the server's loggers too.
    if args.env_file is not None:
        _load_env_file(args.env_file)
    try:
        configure_logging(args.log_level, args.log_config)
    except LogConfigError as exc:
        parser.error(f"--log-config {exc}")
    with _pid_file(args.pid_file, parser):
        if args.supervisor_fd is None and _supervised(args):
            from .supervisor import supervise

            return supervise(
                raw,
                workers=args.workers,
                reload=args.reload,
                reload_dirs=args.reload_dir or [os.getcwd()],
                host=args.host,
                port=args.port,
                uds=args.uds,
                uds_mode=args.uds_mode,
                fds=args.fd,
                backlog=args.backlog,
                shutdown_timeout=ServerConfig.shutdown_timeout
                if args.shutdown_timeout is None
                else args.shutdown_timeout,
                recycling=_recycling(args),
                metrics=_metrics_listen(args),
            )
        return _serve_one(args)
