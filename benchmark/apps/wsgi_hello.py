"""Raw WSGI app (no framework), `wsgi_hello:app`, for every WSGI server."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from _payloads import ECHO_PATH, HELLO, TEN_K, TEN_K_PATH


def headers(length: int) -> list[tuple[str, str]]:
    return [("Content-Type", "text/plain"), ("Content-Length", str(length))]


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    if path == ECHO_PATH:
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    else:
        body = TEN_K if path == TEN_K_PATH else HELLO
    start_response("200 OK", headers(len(body)))
    return [body]
