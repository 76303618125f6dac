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
    from .config import ServerConfig, TlsConfig
    from .cookies import Cookie, SameSite
    from .direct import NativeDirectRequest, NativeDirectResponse, serve_native_direct, serve_secure_native_direct
    from .errors import HttpBodyError, HttpException
    from .headers import ContentType, HttpHeaders
    from .http_server import HttpConnectionsInfo, NativeHttpServer
    from .request import HttpConnectionInfo, HttpRequest, Uri
    from .response import HttpResponse
    from .runner import run
    from .serve import (
        NativeMultiServer,
        NativeServerBind,
        serve_native,
        serve_native_http,
        serve_native_multi,
        serve_secure_native,
        serve_secure_native_http,
        serve_secure_native_multi,
    )

# Importing the package loads no submodule and no native library: the first
# use of a name does (``python -m server_native --help``, ``setup`` and
# ``info`` never need the library, and a source checkout would build it).
_SUBMODULES = {
    "config": ("ServerConfig", "TlsConfig"),
    "cookies": ("Cookie", "SameSite"),
    "direct": ("NativeDirectRequest", "NativeDirectResponse", "serve_native_direct", "serve_secure_native_direct"),
    "errors": ("HttpBodyError", "HttpException"),
    "headers": ("ContentType", "HttpHeaders"),
    "http_server": ("HttpConnectionsInfo", "NativeHttpServer"),
    "request": ("HttpConnectionInfo", "HttpRequest", "Uri"),
    "response": ("HttpResponse",),
    "runner": ("run",),
    "serve": (
        "NativeMultiServer",
        "NativeServerBind",
        "serve_native",
        "serve_native_http",
        "serve_native_multi",
        "serve_secure_native",
        "serve_secure_native_http",
        "serve_secure_native_multi",
    ),
}
_HOME = {name: module for module, names in _SUBMODULES.items() for name in names}
_NATIVE = ("BodyTooLarge", "ClientDisconnected", "TlsConfigError")


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    elif name == "_native" or name in _NATIVE:
        from ._loader import load

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
    "run",
    "serve_native",
    "serve_native_direct",
    "serve_native_http",
    "serve_native_multi",
    "serve_secure_native",
    "serve_secure_native_direct",
    "serve_secure_native_http",
    "serve_secure_native_multi",
]
