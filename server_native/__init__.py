"""server_native: a Rust-backed HTTP server runtime for Python.

hyper, tokio and rustls own the sockets and the protocols; Python owns the
application. Start with :class:`NativeHttpServer` (dart:io's HttpServer
style) or :func:`serve_native_http` (a handler callback).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._native import BodyTooLarge, ClientDisconnected, TlsConfigError
    from .cli.runner import run
    from .http.cookies import Cookie, SameSite
    from .http.errors import HttpBodyError, HttpException
    from .http.headers import ContentType, HttpHeaders
    from .http.request import HttpConnectionInfo, HttpRequest, Uri
    from .http.response import HttpResponse
    from .http.serve import (
        NativeMultiServer,
        NativeServerBind,
        serve_native,
        serve_native_http,
        serve_native_multi,
        serve_secure_native,
        serve_secure_native_http,
        serve_secure_native_multi,
    )
    from .http.server import HttpConnectionsInfo, NativeHttpServer
    from .http.websocket import is_upgrade_request, upgrade_websocket
    from .interfaces.asgi import serve_asgi
    from .interfaces.direct import (
        NativeDirectRequest,
        NativeDirectResponse,
        serve_native_direct,
        serve_secure_native_direct,
    )
    from .interfaces.wsgi import serve_wsgi
    from .runtime.config import ServerConfig, TlsConfig

# Importing the package loads no submodule and no native library: the first
# use of a name does (``python -m server_native --help``, ``setup`` and
# ``info`` never need the library, and a source checkout would build it).
_SUBMODULES = {
    "cli.runner": ("run",),
    "http.cookies": ("Cookie", "SameSite"),
    "http.errors": ("HttpBodyError", "HttpException"),
    "http.headers": ("ContentType", "HttpHeaders"),
    "http.request": ("HttpConnectionInfo", "HttpRequest", "Uri"),
    "http.response": ("HttpResponse",),
    "http.serve": (
        "NativeMultiServer",
        "NativeServerBind",
        "serve_native",
        "serve_native_http",
        "serve_native_multi",
        "serve_secure_native",
        "serve_secure_native_http",
        "serve_secure_native_multi",
    ),
    "http.server": ("HttpConnectionsInfo", "NativeHttpServer"),
    "http.websocket": ("is_upgrade_request", "upgrade_websocket"),
    "interfaces.asgi": ("serve_asgi",),
    "interfaces.direct": (
        "NativeDirectRequest",
        "NativeDirectResponse",
        "serve_native_direct",
        "serve_secure_native_direct",
    ),
    "interfaces.wsgi": ("serve_wsgi",),
    "runtime.config": ("ServerConfig", "TlsConfig"),
}
_HOME = {name: module for module, names in _SUBMODULES.items() for name in names}
_NATIVE = ("BodyTooLarge", "ClientDisconnected", "TlsConfigError")


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    elif name == "_native" or name in _NATIVE:
        from ._dist.loader import load

        native = load()
        value = native if name == "_native" else getattr(native, name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__version__ = "0.1.0"

__all__ = [
    "BodyTooLarge",
    "ClientDisconnected",
    "ContentType",
    "Cookie",
    "HttpConnectionInfo",
    "HttpConnectionsInfo",
    "HttpBodyError",
    "HttpException",
    "HttpHeaders",
    "HttpRequest",
    "HttpResponse",
    "NativeDirectRequest",
    "NativeDirectResponse",
    "NativeHttpServer",
    "NativeMultiServer",
    "NativeServerBind",
    "SameSite",
    "ServerConfig",
    "TlsConfig",
    "TlsConfigError",
    "Uri",
    "is_upgrade_request",
    "run",
    "serve_asgi",
    "serve_native",
    "serve_native_direct",
    "serve_native_http",
    "serve_native_multi",
    "serve_secure_native",
    "serve_secure_native_direct",
    "serve_secure_native_http",
    "serve_secure_native_multi",
    "serve_wsgi",
    "upgrade_websocket",
]
