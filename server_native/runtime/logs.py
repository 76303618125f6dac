"""The server's loggers: ``server_native`` (and its children, among them
``server_native.error`` for startup and shutdown) and
``server_native.access`` (one line per request). The command line and
:func:`server_native.run` give them handlers of their own, as uvicorn does
with ``uvicorn.*``, and leave the root logger to the application: an app
that configures its logging sees its records once, and third-party INFO
records stay as quiet as the app's own configuration makes them."""

from __future__ import annotations

import json
import logging
import logging.config
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "ACCESS_LOG_ATOMS",
    "LOG_LEVELS",
    "LogConfigError",
    "access_log_format",
    "access_logger",
    "configure_logging",
    "error_logger",
    "load_logging_config",
    "log_access",
    "logging_config",
    "set_access_log_format",
]

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")

#: Startup, shutdown and errors (uvicorn's ``uvicorn.error``).
error_logger = logging.getLogger("server_native.error")
#: One record per request, when the access log is on.
access_logger = logging.getLogger("server_native.access")

_FORMAT = "%(levelname)s %(name)s: %(message)s"


class LogConfigError(ValueError):
    """A ``--log-config`` file that cannot be read or applied."""


def logging_config(level: str = "info") -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` configuration for the server's
    loggers alone: messages to stderr, the access log to stdout, neither
    passed on to the root logger."""
    if level not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": {"format": _FORMAT}},
        "handlers": {
            "default": {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"},
            "access": {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stdout"},
        },
        "loggers": {
            "server_native": {"handlers": ["default"], "level": level.upper(), "propagate": False},
            "server_native.error": {"level": level.upper()},
            "server_native.access": {"handlers": ["access"], "level": level.upper(), "propagate": False},
        },
    }


def configure_logging(level: str | None = "info", config_file: str | os.PathLike[str] | None = None) -> None:
    """Gives the server's loggers their handlers; the root logger is left
    alone. ``config_file`` (see :func:`load_logging_config`) replaces that
    configuration; ``level``, if given too, is then the level of the
    server's loggers."""
    if config_file is None:
        logging.config.dictConfig(logging_config(level or "info"))
        return
    load_logging_config(config_file)
    if level is not None:
        for name in ("server_native", "server_native.error", "server_native.access"):
            logging.getLogger(name).setLevel(level.upper())


def load_logging_config(path: str | os.PathLike[str]) -> None:
    """Applies a logging configuration file, as uvicorn's ``--log-config``
    takes: ``.json``, ``.yaml`` or ``.yml`` for :func:`logging.config.dictConfig`
    (YAML needs PyYAML), anything else an ``.ini`` file for
    :func:`logging.config.fileConfig`. Loggers it does not name are kept.
    Raises :class:`LogConfigError` with the reason."""
    file = Path(path)
    suffix = file.suffix.lower()
    try:
        if suffix in (".json", ".yaml", ".yml"):
            text = file.read_text(encoding="utf-8")
            config = json.loads(text) if suffix == ".json" else _yaml(text)
            if not isinstance(config, dict):
                raise LogConfigError("not a dictConfig mapping")
            config.setdefault("disable_existing_loggers", False)
            logging.config.dictConfig(config)
        else:
            logging.config.fileConfig(file, disable_existing_loggers=False)
    except LogConfigError as exc:
        raise LogConfigError(f"{file}: {exc}") from None
    except Exception as exc:
        raise LogConfigError(f"{file}: {type(exc).__name__}: {exc}") from exc


def _yaml(text: str) -> Any:
    try:
        import yaml
    except ImportError:
        raise LogConfigError("a YAML logging configuration needs PyYAML (pip install pyyaml)") from None
    return yaml.safe_load(text)


class _Access(NamedTuple):
    """What an access log line can tell of one request."""

    client: tuple[str, int] | None
    method: str
    path: str
    query: str
    http_version: str
    status: int
    sent: int
    seconds: float
    header: Callable[[str], str | None]


def _dash(value: str | None) -> str:
    return value if value else "-"


def _request_time(access: _Access) -> str:
    return time.strftime("[%d/%b/%Y:%H:%M:%S %z]", time.localtime(time.time() - access.seconds))


#: The atoms of ``--access-log-format``, gunicorn's: ``%(h)s``...; besides
#: these, ``%({name}i)s`` is the request header ``name``.
ACCESS_LOG_ATOMS: dict[str, tuple[str, Callable[[_Access], Any]]] = {
    "h": ("client address", lambda a: a.client[0] if a.client else "-"),
    "l": ("'-'", lambda a: "-"),
    "u": ("user name ('-')", lambda a: "-"),
    "t": ("time the request came, [10/Oct/2000:13:55:36 +0000]", _request_time),
    "r": (
        "request line: GET /path?query HTTP/1.1",
        lambda a: f"{a.method} {a.path}{'?' if a.query else ''}{a.query} HTTP/{a.http_version}",
    ),
    "m": ("method", lambda a: a.method),
    "U": ("path, without the query", lambda a: a.path),
    "q": ("query string", lambda a: a.query),
    "H": ("protocol: HTTP/1.1, HTTP/2, HTTP/3", lambda a: f"HTTP/{a.http_version}"),
    "s": ("status", lambda a: a.status),
    "B": ("response body bytes", lambda a: a.sent),
    "b": ("response body bytes, '-' for none", lambda a: a.sent or "-"),
    "f": ("Referer header", lambda a: _dash(a.header("referer"))),
    "a": ("User-Agent header", lambda a: _dash(a.header("user-agent"))),
    "T": ("duration, whole seconds", lambda a: int(a.seconds)),
    "M": ("duration, milliseconds", lambda a: int(a.seconds * 1e3)),
    "D": ("duration, microseconds", lambda a: int(a.seconds * 1e6)),
    "L": ("duration, decimal seconds", lambda a: f"{a.seconds:.6f}"),
    "p": ("process id, <12345>", lambda a: f"<{os.getpid()}>"),
}
_KEY = re.compile(r"%\(([^)]*)\)")
_HEADER_ATOM = re.compile(r"\{([^{}]+)\}i")
_SAMPLE = _Access(("203.0.113.7", 50000), "GET", "/", "a=1", "1.1", 200, 2, 0.001, lambda name: "x")

#: The custom format and what it needs per request, or None for the default line.
_custom: tuple[str, list[tuple[str, Callable[[_Access], Any]]]] | None = None


def _atom(key: str) -> Callable[[_Access], Any]:
    header = _HEADER_ATOM.fullmatch(key)
    if header is not None:
        name = header.group(1).lower()
        return lambda a: _dash(a.header(name))
    if key not in ACCESS_LOG_ATOMS:
        raise ValueError(
            f"unknown access log atom %({key})s: the atoms are {', '.join(ACCESS_LOG_ATOMS)} and {{name}}i"
        )
    return ACCESS_LOG_ATOMS[key][1]


def access_log_format(text: str) -> str:
    """``text`` when it is a valid access log format (``%(h)s %(r)s``...),
    else ValueError saying why."""
    atoms = {key: _atom(key) for key in _KEY.findall(text)}
    try:
        text % {key: atom(_SAMPLE) for key, atom in atoms.items()}
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"not an access log format ({exc}): {text!r}") from None
    return text


def set_access_log_format(text: str | None) -> None:
    """The access log's line from now on: ``text`` with gunicorn's atoms
    (:data:`ACCESS_LOG_ATOMS`), or None for the default line (client,
    request line, status)."""
    global _custom
    if text is None:
        _custom = None
        return
    access_log_format(text)
    _custom = (text, [(key, _atom(key)) for key in dict.fromkeys(_KEY.findall(text))])


def _no_header(_name: str) -> None:
    return None


def log_access(
    client: tuple[str, int] | None,
    method: str,
    path: str,
    http_version: str,
    status: int,
    *,
    query: str | bytes = "",
    sent: int = 0,
    started: float | None = None,
    header: Callable[[str], str | None] = _no_header,
) -> None:
    """The access log line every interface writes: by default client,
    request line and status; with :func:`set_access_log_format`, that
    format. ``started``: the request's ``time.perf_counter()``; ``header``
    looks a request header up by name."""
    if _custom is None:
        access_logger.info(
            '%s - "%s %s HTTP/%s" %d',
            f"{client[0]}:{client[1]}" if client else "unix socket",
            method,
            path,
            http_version,
            status,
        )
        return
    if not access_logger.isEnabledFor(logging.INFO):
        return
    text, atoms = _custom
    seconds = 0.0 if started is None else time.perf_counter() - started
    if isinstance(query, bytes):
        query = query.decode("latin-1")
    access = _Access(client, method, path, query, http_version, status, sent, seconds, header)
    if atoms:
        # The atoms stay the record's args, for handlers that want them.
        access_logger.info(text, {key: atom(access) for key, atom in atoms})
    else:
        access_logger.info("%s", text % {})
