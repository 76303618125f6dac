"""Differential test: one battery of requests sent to the same app on a
reference server and on server_native must give the same status, reason
phrase, body and headers.

- Starlette (``apps.diff_starlette``): uvicorn (``python -m uvicorn`` in a
  child process, its defaults: httptools + uvloop) vs ``serve_asgi``.
- Flask (``apps.diff_flask``): Werkzeug's threaded server (``make_server``)
  vs ``serve_wsgi``. gunicorn is not among the test packages; Werkzeug's
  server is the one Flask users run in development.

Every request goes through httpx over HTTP/1.1 on a keep-alive client per
server. Headers are compared with lowercase names, as (name, values) with the
values of one name in the order sent.

Deliberate differences that the comparison allows, and why:

1. ``date`` and ``server`` are left out: the time differs, and each server
   names itself (server_native sends no ``server`` header at all).
2. The order *between different header names* is not compared (the order of
   values within one name, e.g. two ``set-cookie`` or ``x-multi``, is).
   Field order across names carries no meaning in HTTP (RFC 9110 5.3).
   Seen: uvicorn and Werkzeug put ``date``/``server`` first, server_native
   puts ``date`` last; and an app-given ``content-length: 0`` comes out
   after the app's other headers on server_native (uvicorn keeps the app's
   order).
3. Flask only: Werkzeug's dev server adds ``connection: close`` and closes
   the connection after every response; server_native keeps HTTP/1.1
   connections alive. The ``connection`` header is left out for Flask.
4. Starlette only: ``allow`` on a 405 is a Python ``set`` joined in
   iteration order, which follows the per-process string hash seed, so two
   processes may list the methods in different orders whatever the server;
   it is compared as a set of methods.
5. Starlette only: the reason phrase is compared without case. ASGI has no
   reason phrase, so each server picks one: uvicorn takes Python's
   ``http.HTTPStatus`` phrases, server_native hyper's; they differ only in
   case (418: "I'm a Teapot" vs "I'm a teapot"), and clients ignore the
   reason phrase (RFC 9112 4). For WSGI the app gives the phrase, which must
   come out unchanged.
6. HEAD: ``transfer-encoding`` is not compared. A HEAD response has no body
   to frame; uvicorn announces ``chunked`` for a streamed GET's HEAD, hyper
   leaves the header out (both allowed by RFC 9110 9.3.2).

Nothing else is allowed: status, reason phrase, the full body, and every
other header (``content-length``, ``transfer-encoding: chunked``,
``content-type``, ``location``, each ``set-cookie``...) must be equal.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from apps import diff_flask, diff_starlette
from apps.harness import TIMEOUT, plain_tracebacks, serving, uvicorn_process
from werkzeug.serving import make_server

from server_native.interfaces.asgi import serve_asgi
from server_native.interfaces.wsgi import serve_wsgi

LARGE = diff_starlette.LARGE
assert diff_flask.LARGE == LARGE

#: Always left out (difference 1).
IGNORED = {"date", "server"}


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str
    options: dict[str, Any] = field(default_factory=dict)
    xfail_flask: str | None = None


def chunked(*pieces: bytes) -> Any:
    """A body with no length: httpx sends it with Transfer-Encoding: chunked."""

    def gen() -> Iterator[bytes]:
        yield from pieces

    return gen


BATTERY = [
    Case("get-text", "GET", "/"),
    Case("head-text", "HEAD", "/"),
    Case("get-json", "GET", "/json"),
    Case("path-param-and-repeated-query", "GET", "/items/42?b=2&a=1&a=3"),
    Case("path-param-invalid-404", "GET", "/items/abc"),
    Case("query-percent-utf8", "GET", "/echo?name=caf%C3%A9&x=a+b&e=%26%3D&emoji=%F0%9F%8D%95"),
    Case("path-percent-utf8", "GET", "/unicode/caf%C3%A9%20cr%C3%A8me"),
    Case("post-json", "POST", "/echo", {"json": {"k": "v", "n": [1, 2]}}),
    Case("post-form", "POST", "/echo", {"data": {"f": "1", "g": "a b&c"}}),
    Case("post-1mib-binary", "POST", "/echo", {"content": LARGE}),
    Case(
        "post-chunked-body",
        "POST",
        "/echo",
        {"content": chunked(b"first,", b"second,", b"third")},
    ),
    Case("put-body", "PUT", "/echo", {"content": b"put body"}),
    Case("patch-body", "PATCH", "/echo", {"content": b"patch body", "headers": {"content-type": "text/plain"}}),
    Case("delete", "DELETE", "/echo"),
    Case("options", "OPTIONS", "/echo"),
    Case("repeated-request-headers", "GET", "/echo", {"headers": [("X-Custom", "one"), ("X-Custom", "two")]}),
    Case("request-cookie", "GET", "/echo", {"headers": {"Cookie": "a=1; b=2"}}),
    Case("response-headers-repeated", "GET", "/headers"),
    Case("status-201", "GET", "/status/201"),
    Case("status-204-no-body", "GET", "/status/204"),
    Case("status-304-no-body", "GET", "/status/304"),
    Case("status-400", "GET", "/status/400"),
    Case("status-418", "GET", "/status/418"),
    Case("status-503", "GET", "/status/503"),
    Case("redirect-302", "GET", "/redirect"),
    Case("set-cookies", "GET", "/set-cookies"),
    Case("streaming-chunked", "GET", "/stream"),
    Case("head-streaming", "HEAD", "/stream"),
    Case("large-1mib", "GET", "/large"),
    Case("head-large", "HEAD", "/large"),
    Case("binary", "GET", "/binary"),
    Case("empty-body", "GET", "/empty"),
    Case("unknown-route-404", "GET", "/no/such/route"),
    Case("method-not-allowed-405", "DELETE", "/"),
    Case("app-error-500", "GET", "/error"),
]


@dataclass
class Answer:
    status: int
    reason: str
    headers: dict[str, list[str]]
    body: bytes


def fetch(client: httpx.Client, base: str, case: Case, drop: set[str]) -> Answer:
    options = dict(case.options)
    if callable(options.get("content")):
        options["content"] = options["content"]()  # a fresh generator per request
    response = client.request(case.method, base + case.path, **options)
    headers: dict[str, list[str]] = {}
    for name, value in response.headers.raw:
        key = name.decode("latin-1").lower()
        if key in IGNORED or key in drop:
            continue
        headers.setdefault(key, []).append(value.decode("latin-1"))
    if case.method == "HEAD":  # difference 6
        headers.pop("transfer-encoding", None)
    if "allow" in headers:  # difference 4 (only Starlette's varies; harmless for Flask)
        headers["allow"] = sorted(method.strip() for value in headers["allow"] for method in value.split(","))
    return Answer(response.status_code, response.reason_phrase, headers, response.content)


def compare(reference: Answer, ours: Answer, *, reason_case: bool = True) -> None:
    assert ours.status == reference.status
    if reason_case:
        assert ours.reason == reference.reason
    else:  # difference 5
        assert ours.reason.casefold() == reference.reason.casefold()
    assert ours.body == reference.body
    assert ours.headers == reference.headers


@pytest.fixture(scope="module", autouse=True)
def _plain_tracebacks() -> Iterator[None]:
    with plain_tracebacks():
        yield


@pytest.fixture(scope="module")
def starlette_servers() -> Iterator[tuple[httpx.Client, str, httpx.Client, str]]:
    with uvicorn_process("apps.diff_starlette:app") as reference, serving(serve_asgi, diff_starlette.app) as ours:
        with httpx.Client(timeout=TIMEOUT) as ref_client, httpx.Client(timeout=TIMEOUT) as our_client:
            yield ref_client, reference, our_client, ours.url("").rstrip("/")


@pytest.fixture(scope="module")
def flask_servers() -> Iterator[tuple[httpx.Client, str, httpx.Client, str]]:
    werkzeug = make_server("127.0.0.1", 0, diff_flask.app, threaded=True)
    thread = threading.Thread(target=werkzeug.serve_forever, name="werkzeug", daemon=True)
    thread.start()
    try:
        with serving(serve_wsgi, diff_flask.app, threads=4) as ours:
            with httpx.Client(timeout=TIMEOUT) as ref_client, httpx.Client(timeout=TIMEOUT) as our_client:
                yield ref_client, f"http://127.0.0.1:{werkzeug.server_port}", our_client, ours.url("").rstrip("/")
    finally:
        werkzeug.shutdown()
        thread.join(TIMEOUT)
        werkzeug.server_close()


@pytest.mark.parametrize("case", BATTERY, ids=[c.id for c in BATTERY])
def test_starlette_on_server_native_answers_as_on_uvicorn(starlette_servers: Any, case: Case) -> None:
    ref_client, reference, our_client, ours = starlette_servers
    compare(fetch(ref_client, reference, case, set()), fetch(our_client, ours, case, set()), reason_case=False)


FLASK_BATTERY = [
    pytest.param(c, marks=pytest.mark.xfail(reason=c.xfail_flask, strict=True)) if c.xfail_flask else c for c in BATTERY
]


@pytest.mark.parametrize("case", FLASK_BATTERY, ids=[c.id for c in BATTERY])
def test_flask_on_server_native_answers_as_on_werkzeug(flask_servers: Any, case: Case) -> None:
    ref_client, reference, our_client, ours = flask_servers
    compare(fetch(ref_client, reference, case, {"connection"}), fetch(our_client, ours, case, {"connection"}))


def test_the_battery_covers_what_the_brief_lists() -> None:
    """GET/POST/HEAD, headers, query, bodies, errors, redirects, cookies,
    streaming: at least ~20 requests."""
    methods = {c.method for c in BATTERY}
    assert {"GET", "POST", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS"} <= methods
    ids = " ".join(c.id for c in BATTERY)
    for word in ("query", "headers", "body", "404", "500", "redirect", "cookie", "stream"):
        assert word in ids
    assert len(BATTERY) >= 20
