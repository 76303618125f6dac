"""server_native: a Rust-backed HTTP server runtime for Python.

hyper, tokio and rustls own the sockets and the protocols; Python owns the
application. Start with :class:`NativeHttpServer` (dart:io's HttpServer
style) or :func:`serve_native_http` (a handler callback).
"""

from __future__ import annotations

from ._loader import native as _native
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

ClientDisconnected = _native.ClientDisconnected
BodyTooLarge = _native.BodyTooLarge
TlsConfigError = _native.TlsConfigError

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
