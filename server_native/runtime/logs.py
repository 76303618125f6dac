"""The server's loggers: ``server_native`` (and its children, among them
``server_native.error`` for startup and shutdown) and
``server_native.access`` (one line per request). The command line and
:func:`server_native.run` give them handlers of their own, as uvicorn does
with ``uvicorn.*``, and leave the root logger to the application: an app
that configures its logging sees its records once, and third-party INFO
records stay as quiet as the app's own configuration makes them."""

from __future__ import annotations

import logging
import logging.config
from typing import Any

__all__ = ["LOG_LEVELS", "access_logger", "configure_logging", "error_logger", "log_access", "logging_config"]

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")

#: Startup, shutdown and errors (uvicorn's ``uvicorn.error``).
error_logger = logging.getLogger("server_native.error")
#: One record per request, when the access log is on.
access_logger = logging.getLogger("server_native.access")

_FORMAT = "%(levelname)s %(name)s: %(message)s"


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


def configure_logging(level: str = "info") -> None:
    """Gives the server's loggers their handlers; the root logger is left alone."""
    logging.config.dictConfig(logging_config(level))


def log_access(client: tuple[str, int] | None, method: str, path: str, http_version: str, status: int) -> None:
    """The access log line every interface writes: client, request line, status."""
    access_logger.info(
        '%s - "%s %s HTTP/%s" %d',
        f"{client[0]}:{client[1]}" if client else "unix socket",
        method,
        path,
        http_version,
        status,
    )
