"""Granian RSGI app (no framework), served by `granian --interface rsgi rsgi_hello:app`.

RSGI (https://github.com/emmett-framework/granian/blob/master/docs/spec/RSGI.md):
`async def app(scope, proto)`; `await proto()` reads the whole request body;
`proto.response_bytes(status, [(name, value)], body)` answers. Same paths as the
other apps: `GET /` hello, `GET /10k` 10 KiB, `POST /echo` echoes the body."""

from __future__ import annotations

from typing import Any

from _payloads import ECHO_PATH, HELLO, TEN_K, TEN_K_PATH

HEADERS = [("content-type", "text/plain")]


async def app(scope: Any, proto: Any) -> None:
    path = scope.path
    if path == ECHO_PATH:
        proto.response_bytes(200, HEADERS, await proto())
    elif path == TEN_K_PATH:
        proto.response_bytes(200, HEADERS, TEN_K)
    else:
        proto.response_bytes(200, HEADERS, HELLO)
