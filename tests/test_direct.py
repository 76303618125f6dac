"""The direct handler API: `serve_native_direct`, `serve_secure_native_direct`,
`NativeDirectRequest` and `NativeDirectResponse`, with both values of
`native_direct`, sync and async handlers, both transports (in-process and the
socket bridge, `native_callback=False`), HTTP/1.1, h2c and TLS (+ ALPN h2).

Every server here is a real `serve_native_direct(...)` call running on a
BackgroundLoop with `port=0` (the bound port is read from its echo line) and an
`asyncio.Event` as its `shutdown_signal`; every client is a real one
(http.client, httpx over HTTP/1.1 and prior-knowledge h2c, raw sockets where
the exact bytes on the wire matter). Traffic stays on 127.0.0.1 / ::1."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import hashlib
import http.client
import inspect
import json
import logging
import re
import socket
import ssl
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import h11
import httpx
import pytest
from apps.harness import free_port, refused, wait_for

from server_native import (
    ClientDisconnected,
    NativeDirectRequest,
    NativeDirectResponse,
    ServerConfig,
    serve_native_direct,
    serve_secure_native_direct,
)

try:
    from .conftest import BackgroundLoop, Certificates, LogLines, requires_ipv6
except ImportError:  # tests/ run as a plain directory
    from conftest import BackgroundLoop, Certificates, LogLines, requires_ipv6  # type: ignore[no-redef]

TIMEOUT = 10
ECHO = re.compile(r"^Server listening on (https?)://(\[[^\]]+\]|[^:/\s]+):(\d+) via server_native \(([^)]*)\)$")
MIB = 1 << 20

#: The pre-encoded form: built once at import, returned for every request.
PREBUILT = NativeDirectResponse.bytes(
    200,
    [
        ("content-type", "text/plain; charset=utf-8"),
        ("x-prebuilt", "yes"),
        ("set-cookie", "a=1"),
        ("set-cookie", "b=2"),
    ],
    b"prebuilt body \x00\xff",
)


# ---------------------------------------------------------------- helpers


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pattern(size: int) -> bytes:
    """``size`` bytes that are not all the same (every byte value occurs)."""
    block = bytes(range(256)) * 4096  # 1 MiB
    return (block * (size // len(block) + 1))[:size]


def text(status: int, body: str | bytes, *headers: tuple[str, str]) -> NativeDirectResponse:
    return NativeDirectResponse.bytes(status, [("content-type", "text/plain; charset=utf-8"), *headers], body)


def as_json(value: Any, status: int = 200) -> NativeDirectResponse:
    return NativeDirectResponse.bytes(status, [("content-type", "application/json")], json.dumps(value).encode())


def describe(request: NativeDirectRequest, body: bytes | None = None) -> dict[str, Any]:
    """Every field of the request, as JSON."""
    return {
        "method": request.method,
        "scheme": request.scheme,
        "authority": request.authority,
        "path": request.path,
        "query": request.query,
        "protocol": request.protocol,
        "headers": [list(pair) for pair in request.headers],
        "header_upper": request.header("X-TEST"),
        "header_mixed": request.header("x-Test"),
        "header_missing": request.header("x-not-sent"),
        "uri": request.uri,
        "client": list(request.client),
        "repr": repr(request),
        "body": None if body is None else body.hex(),
    }


def close_if_unstarted(awaitable: Any) -> None:
    """A helper that fails at bind never awaits its shutdown signal: close
    the coroutine so it does not warn about that."""
    if inspect.iscoroutine(awaitable) and inspect.getcoroutinestate(awaitable) == inspect.CORO_CREATED:
        awaitable.close()


@dataclass
class Running:
    """One ``serve_*_direct`` call running on the loop thread until ``stop()``."""

    scheme: str
    host: str
    port: int
    protocols: str
    future: concurrent.futures.Future[Any]
    event: asyncio.Event
    loop_thread: BackgroundLoop

    def url(self, path: str = "/", host: str | None = None) -> str:
        host = host or self.host
        shown = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{shown}:{self.port}{path}"

    def stop(self) -> Any:
        """Completes the shutdown signal; returns what the helper returned."""
        self.loop_thread.loop.call_soon_threadsafe(self.event.set)
        return self.future.result(TIMEOUT)


def get_at_once(running: Running, paths: list[str]) -> list[str]:
    """The bodies of GET requests for `paths`, all sent at once over HTTP/1.1."""

    async def run() -> list[str]:
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            return [r.text for r in await asyncio.gather(*(client.get(running.url(path)) for path in paths))]

    return asyncio.run(run())


@dataclass
class Starter:
    loop_thread: BackgroundLoop
    server_log: LogLines
    certs: Certificates | None = None
    started: list[Running] = field(default_factory=list)

    def __call__(self, handler: Any, host: str = "127.0.0.1", *, secure: bool = False, **options: Any) -> Running:
        event = asyncio.Event()
        options.setdefault("shutdown_signal", event.wait())
        options.setdefault("http3", False)
        self.server_log.read()  # forget earlier output: the next echo line is ours
        if secure:
            assert self.certs is not None
            helper = serve_secure_native_direct(
                handler, host, 0, certificate_path=self.certs.cert_path, key_path=self.certs.key_path, **options
            )
        else:
            helper = serve_native_direct(handler, host, 0, **options)
        future = asyncio.run_coroutine_threadsafe(helper, self.loop_thread.loop)
        future.add_done_callback(lambda _: close_if_unstarted(options["shutdown_signal"]))
        output = ""
        deadline = time.monotonic() + TIMEOUT
        while True:
            output += self.server_log.read()
            match = next(filter(None, (ECHO.match(line.strip()) for line in output.splitlines())), None)
            if match:
                break
            if future.done():
                future.result()  # raises what the helper raised
                pytest.fail(f"serve_native_direct returned before echoing: {output!r}")
            if time.monotonic() > deadline:
                pytest.fail(f"no echo line within {TIMEOUT}s: {output!r}")
            time.sleep(0.01)
        running = Running(
            match.group(1),
            match.group(2).strip("[]"),
            int(match.group(3)),
            match.group(4),
            future,
            event,
            self.loop_thread,
        )
        self.started.append(running)
        return running


@pytest.fixture
def start(loop_thread: BackgroundLoop, server_log: LogLines, certs: Certificates) -> Iterator[Starter]:
    """``start(handler, host="127.0.0.1", *, secure=False, **options)`` runs
    ``serve_native_direct`` (or the secure one) on a free port."""
    starter = Starter(loop_thread, server_log, certs)
    yield starter
    for running in starter.started:
        loop_thread.loop.call_soon_threadsafe(running.event.set)
        try:
            running.future.result(TIMEOUT)
        except BaseException:  # noqa: BLE001 - the test already reported it
            pass


def h1() -> httpx.Client:
    return httpx.Client(timeout=TIMEOUT)


def h2c() -> httpx.Client:
    return httpx.Client(http1=False, http2=True, timeout=TIMEOUT)


def tls_client(certs: Certificates, http2: bool) -> httpx.Client:
    context = ssl.create_default_context(cafile=str(certs.ca_path))
    return httpx.Client(verify=context, http2=http2, timeout=TIMEOUT)


def fetch(url: str) -> httpx.Response:
    with h1() as client:
        return client.get(url)


def client_addr(response: httpx.Response) -> list[Any]:
    host, port = response.extensions["network_stream"].get_extra_info("client_addr")[:2]
    return [host, port]


def raw_exchange(port: int, request: bytes, host: str = "127.0.0.1") -> bytes:
    """Sends raw bytes, reads until the server closes (the request must say
    ``Connection: close`` or be HTTP/1.0)."""
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def raw_body(response: bytes) -> tuple[int, bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


# ---------------------------------------------------------------- handlers by mode

#: "async": an async handler; "sync": a sync handler on the event loop
#: (native_direct=False); "native_direct": a sync handler on the native thread.
#: "/bridge": over the socket bridge (native_callback=False) instead of
#: in-process; native_direct=True is in-process only.
MODES = ["async", "sync", "native_direct", "async/bridge", "sync/bridge"]
#: The modes whose handlers read the body.
BODY_MODES = ["async", "native_direct", "async/bridge"]
TRANSPORTS = [pytest.param(True, id="in-process"), pytest.param(False, id="bridge")]


def kind(mode: str) -> str:
    return mode.split("/")[0]


def options_for(mode: str) -> dict[str, Any]:
    return {"native_direct": kind(mode) == "native_direct", "native_callback": not mode.endswith("/bridge")}


def make_handler(mode: str, answer: Callable[[NativeDirectRequest, bytes | None], NativeDirectResponse]) -> Any:
    """``answer(request, body)`` as a handler of the given mode. The body is
    read with ``await request.read()`` (async), ``request.body_bytes()``
    (native_direct), or not at all (sync on the loop: it may not have arrived)."""
    if kind(mode) == "async":

        async def async_handler(request: NativeDirectRequest) -> NativeDirectResponse:
            return answer(request, await request.read())

        return async_handler
    if kind(mode) == "native_direct":
        return lambda request: answer(request, request.body_bytes())
    return lambda request: answer(request, None)


def info_handler(mode: str) -> Any:
    return make_handler(mode, lambda request, body: as_json(describe(request, body)))


# ---------------------------------------------------------------- every request field


@pytest.mark.parametrize("mode", MODES)
def test_every_field_over_http1(start: Starter, mode: str) -> None:
    running = start(info_handler(mode), **options_for(mode))
    connection = http.client.HTTPConnection("127.0.0.1", running.port, timeout=TIMEOUT)
    connection.connect()
    local = connection.sock.getsockname()
    connection.putrequest("GET", "/some%20path/x.txt?b=2&a=%2F&b=3", skip_accept_encoding=True)
    connection.putheader("X-Test", "first")
    connection.putheader("x-other", "between")
    connection.putheader("x-test", "second")
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 200
    assert response.getheader("content-type") == "application/json"
    seen = json.loads(response.read())
    connection.close()

    assert seen["method"] == "GET"
    assert seen["scheme"] == "http"
    assert seen["authority"] == f"127.0.0.1:{running.port}"
    assert seen["path"] == "/some%20path/x.txt"
    assert seen["query"] == "b=2&a=%2F&b=3"
    assert seen["uri"] == "/some%20path/x.txt?b=2&a=%2F&b=3"
    assert seen["protocol"] == "1.1"
    # Pairs with names lowercase, repeats kept (not merged, not dropped) and
    # in the order sent for each name (as ASGI asks; names may be regrouped).
    assert sorted(seen["headers"]) == [
        ["host", f"127.0.0.1:{running.port}"],
        ["x-other", "between"],
        ["x-test", "first"],
        ["x-test", "second"],
    ]
    assert [value for name, value in seen["headers"] if name == "x-test"] == ["first", "second"]
    assert seen["header_upper"] == seen["header_mixed"] == "first"
    assert seen["header_missing"] is None
    assert seen["client"] == [local[0], local[1]]
    assert seen["repr"] == "<NativeDirectRequest GET /some%20path/x.txt?b=2&a=%2F&b=3>"
    assert seen["body"] == ("" if kind(mode) != "sync" else None)


@pytest.mark.parametrize("mode", MODES)
def test_every_field_over_h2c(start: Starter, mode: str) -> None:
    running = start(info_handler(mode), **options_for(mode))
    with h2c() as client:
        response = client.post(
            running.url("/h2/path?q=%C3%A9"),
            headers=[("x-test", "one"), ("x-test", "two")],
            content=b"h2 body",
        )
        address = client_addr(response)  # while the connection is open
    assert response.http_version == "HTTP/2"
    assert response.status_code == 200
    seen = response.json()
    assert seen["method"] == "POST"
    assert seen["scheme"] == "http"
    assert seen["protocol"] == "2"
    # HTTP/2 sends :authority and no Host header; authority still says it.
    assert seen["authority"] == f"127.0.0.1:{running.port}"
    assert "host" not in [name for name, _ in seen["headers"]]
    assert not any(name.startswith(":") for name, _ in seen["headers"])
    assert [value for name, value in seen["headers"] if name == "x-test"] == ["one", "two"]
    assert seen["header_upper"] == "one"
    assert seen["path"] == "/h2/path"
    assert seen["query"] == "q=%C3%A9"
    assert seen["uri"] == "/h2/path?q=%C3%A9"
    assert seen["client"] == address
    if kind(mode) != "sync":
        assert bytes.fromhex(seen["body"]) == b"h2 body"


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PURGE"])
def test_method_is_passed_as_sent(start: Starter, method: str) -> None:
    running = start(lambda request: text(200, request.method))
    with h1() as client:
        response = client.request(method, running.url("/m"))
    assert (response.status_code, response.text) == (200, method)


def test_path_without_query_has_empty_query_and_uri_is_the_path(start: Starter) -> None:
    running = start(info_handler("sync"))
    with h1() as client:
        seen = client.get(running.url("/plain")).json()
    assert (seen["path"], seen["query"], seen["uri"]) == ("/plain", "", "/plain")


def test_http_1_0_request(start: Starter) -> None:
    running = start(info_handler("native_direct"), native_direct=True)
    status, body = raw_body(raw_exchange(running.port, b"GET /old?x=1 HTTP/1.0\r\nX-Test: v\r\n\r\n"))
    assert status == 200
    seen = json.loads(body)
    assert seen["protocol"] == "1.0"
    assert seen["authority"] is None  # no Host header, no absolute target
    assert (seen["path"], seen["query"]) == ("/old", "x=1")
    assert seen["header_upper"] == "v"


def test_absolute_form_target_gives_its_authority(start: Starter) -> None:
    running = start(info_handler("sync"))
    status, body = raw_body(
        raw_exchange(
            running.port,
            b"GET http://example.test:8081/abs?q=1 HTTP/1.1\r\nHost: example.test:8081\r\nConnection: close\r\n\r\n",
        )
    )
    assert status == 200
    seen = json.loads(body)
    assert seen["authority"] == "example.test:8081"
    assert (seen["path"], seen["query"], seen["uri"]) == ("/abs", "q=1", "/abs?q=1")


def test_header_values_are_latin1_text_and_repeats_keep_their_order(start: Starter) -> None:
    running = start(info_handler("native_direct"), native_direct=True)
    request = (
        b"GET / HTTP/1.1\r\nHost: h\r\nX-Multi: 1\r\nX-Latin: caf\xe9\r\nx-multi: 2\r\nX-MULTI: 3\r\n"
        b"Connection: close\r\n\r\n"
    )
    status, body = raw_body(raw_exchange(running.port, request))
    assert status == 200
    headers = json.loads(body)["headers"]
    assert [value for name, value in headers if name == "x-multi"] == ["1", "2", "3"]
    assert ["x-latin", "café"] in headers


@requires_ipv6
def test_ipv6_client_and_authority(start: Starter) -> None:
    running = start(info_handler("native_direct"), "::1", native_direct=True)
    assert running.host == "::1"
    connection = http.client.HTTPConnection("::1", running.port, timeout=TIMEOUT)
    connection.connect()
    local = connection.sock.getsockname()
    connection.request("GET", "/v6")
    seen = json.loads(connection.getresponse().read())
    connection.close()
    assert seen["client"] == ["::1", local[1]]
    assert seen["authority"] == f"[::1]:{running.port}"


# ---------------------------------------------------------------- TLS


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("http2", [True, False], ids=["alpn-h2", "http1-only"])
def test_tls_fields(start: Starter, certs: Certificates, mode: str, http2: bool) -> None:
    running = start(info_handler(mode), secure=True, http2=http2, **options_for(mode))
    assert running.scheme == "https"
    with tls_client(certs, http2=True) as client:  # the client offers h2 either way
        # The client address, read from a first exchange on the same
        # connection (a sync handler leaves the body unread, so the server
        # may close the connection after the POST).
        address = client_addr(client.get(running.url("/first")))
        response = client.post(running.url("/secure?s=1"), headers={"x-test": "tls"}, content=b"\x00secret\xff")
    assert response.status_code == 200
    seen = response.json()
    assert seen["scheme"] == "https"
    assert seen["protocol"] == ("2" if http2 else "1.1")
    assert response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
    assert seen["authority"] == f"127.0.0.1:{running.port}"
    assert seen["uri"] == "/secure?s=1"
    assert seen["header_upper"] == "tls"
    assert seen["client"] == address
    if kind(mode) != "sync":
        assert bytes.fromhex(seen["body"]) == b"\x00secret\xff"


@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_tls_streaming_and_large_upload_over_h2(start: Starter, native_callback: bool, certs: Certificates) -> None:
    async def handler(request: NativeDirectRequest) -> NativeDirectResponse:
        body = await request.read()

        async def chunks() -> AsyncIterator[bytes]:
            for offset in range(0, len(body), 100_000):
                yield body[offset : offset + 100_000]

        return NativeDirectResponse.stream(200, [("x-sha", digest(body))], body=chunks())

    running = start(handler, secure=True, native_callback=native_callback)
    payload = pattern(3 * MIB + 17)
    with tls_client(certs, http2=True) as client:
        response = client.post(running.url("/up"), content=payload)
    assert response.http_version == "HTTP/2"
    assert response.headers["x-sha"] == digest(payload)
    assert response.content == payload


# ---------------------------------------------------------------- bytes bodies


@pytest.mark.parametrize("mode", BODY_MODES)
@pytest.mark.parametrize("client_kind", ["h1", "h2c"])
def test_binary_body_round_trip(start: Starter, mode: str, client_kind: str) -> None:
    running = start(
        make_handler(mode, lambda _request, body: NativeDirectResponse.bytes(body=body)), **options_for(mode)
    )
    payload = bytes(range(256)) * 64 + b"\r\n\r\n\x00"
    with h1() if client_kind == "h1" else h2c() as client:
        response = client.post(running.url("/echo"), content=payload)
    assert response.status_code == 200
    assert response.content == payload
    assert response.headers["content-length"] == str(len(payload))


@pytest.mark.parametrize("mode", BODY_MODES)
def test_zero_byte_bodies(start: Starter, mode: str) -> None:
    seen: list[bytes] = []

    def answer(request: NativeDirectRequest, body: bytes | None) -> NativeDirectResponse:
        assert body is not None
        seen.append(body)
        return NativeDirectResponse.bytes(204 if request.path == "/nobody" else 200)

    running = start(make_handler(mode, answer), **options_for(mode))
    with h1() as client:
        empty_post = client.post(running.url("/empty"), content=b"")
        get = client.get(running.url("/nobody"))
    assert (empty_post.status_code, empty_post.content) == (200, b"")
    assert empty_post.headers["content-length"] == "0"
    assert (get.status_code, get.content) == (204, b"")
    assert seen == [b"", b""]


def test_default_response_is_an_empty_200(start: Starter) -> None:
    running = start(lambda _request: NativeDirectResponse.bytes())
    with h1() as client:
        response = client.get(running.url())
    assert (response.status_code, response.content, response.headers["content-length"]) == (200, b"", "0")


def test_text_body_is_sent_as_utf8(start: Starter) -> None:
    running = start(
        lambda _request: NativeDirectResponse.bytes(201, [("content-type", "text/plain; charset=utf-8")], "héllo ✓")
    )
    with h1() as client:
        response = client.get(running.url())
    assert response.status_code == 201
    assert response.content == "héllo ✓".encode()


@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_response_headers_keep_repeats_and_the_handler_sets_them_all(start: Starter, native_callback: bool) -> None:
    running = start(lambda _request: PREBUILT, native_callback=native_callback)
    with h1() as client:
        response = client.get(running.url())
    assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]
    assert response.headers["x-prebuilt"] == "yes"
    # No default headers are added behind the handler's back.
    assert "x-frame-options" not in response.headers


@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_head_request_gets_no_body(start: Starter, native_callback: bool) -> None:
    running = start(lambda _request: text(200, "a body HEAD must not carry"), native_callback=native_callback)
    with h1() as client:
        head = client.head(running.url())
        after = client.get(running.url())  # same connection, still in sync
    assert (head.status_code, head.content) == (200, b"")
    assert after.text == "a body HEAD must not carry"


# ---------------------------------------------------------------- large uploads


def upload_handler(request: NativeDirectRequest) -> Any:
    """``/read``: ``await request.read()``; ``/iter``: ``async for``."""

    async def handler() -> NativeDirectResponse:
        if request.path == "/read":
            body = await request.read()
            return as_json({"size": len(body), "sha": digest(body), "chunks": None})
        hasher, size, chunks = hashlib.sha256(), 0, 0
        async for chunk in request.body:
            assert isinstance(chunk, bytes) and chunk
            hasher.update(chunk)
            size += len(chunk)
            chunks += 1
        return as_json({"size": size, "sha": hasher.hexdigest(), "chunks": chunks})

    return handler()


@pytest.mark.parametrize("route", ["/read", "/iter"])
@pytest.mark.parametrize("client_kind", ["h1", "h2c"])
@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_8_mib_upload(start: Starter, native_callback: bool, route: str, client_kind: str) -> None:
    running = start(upload_handler, native_callback=native_callback)
    payload = pattern(8 * MIB)
    with h1() if client_kind == "h1" else h2c() as client:
        response = client.post(running.url(route), content=payload)
    assert response.status_code == 200
    seen = response.json()
    assert (seen["size"], seen["sha"]) == (len(payload), digest(payload))
    if route == "/iter":
        assert seen["chunks"] > 1  # it really streamed, not one 8 MiB chunk


@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_8_mib_chunked_upload_is_iterated(start: Starter, native_callback: bool) -> None:
    running = start(upload_handler, native_callback=native_callback)
    payload = pattern(8 * MIB)

    def pieces() -> Iterator[bytes]:
        for offset in range(0, len(payload), 500_000):
            yield payload[offset : offset + 500_000]

    with h1() as client:
        response = client.post(running.url("/iter"), content=pieces())  # Transfer-Encoding: chunked
    seen = response.json()
    assert (seen["size"], seen["sha"]) == (len(payload), digest(payload))


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_native_direct_body_bytes_has_the_whole_8_mib_body(start: Starter, chunked: bool) -> None:
    def handler(request: NativeDirectRequest) -> NativeDirectResponse:
        body = request.body_bytes()
        return as_json({"size": len(body), "sha": digest(body), "again": len(request.body_bytes())})

    running = start(handler, native_direct=True)
    payload = pattern(8 * MIB)
    content: Any = payload
    if chunked:
        content = (payload[offset : offset + 1_000_000] for offset in range(0, len(payload), 1_000_000))
    with h1() as client:
        response = client.post(running.url("/up"), content=content)
    seen = response.json()
    assert (seen["size"], seen["sha"]) == (len(payload), digest(payload))
    assert seen["again"] == 0  # the body was consumed by the first call


@pytest.mark.parametrize("mode", BODY_MODES)
def test_body_over_max_body_size_is_413(start: Starter, mode: str) -> None:
    running = start(
        make_handler(mode, lambda _request, body: text(200, str(len(body or b"")))),
        max_body_size=1024,
        **options_for(mode),
    )
    with h1() as client:
        declared = client.post(running.url("/big"), content=b"x" * 4096)
        streamed = client.post(running.url("/big"), content=iter([b"x" * 1000] * 4))
        small = client.post(running.url("/small"), content=b"x" * 1024)
    assert declared.status_code == 413
    assert streamed.status_code == 413
    assert (small.status_code, small.text) == (200, "1024")


@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_client_gone_mid_body_is_reported_to_the_handler(start: Starter, native_callback: bool) -> None:
    outcome: list[BaseException | bytes] = []
    reported = threading.Event()

    async def handler(request: NativeDirectRequest) -> NativeDirectResponse:
        try:
            outcome.append(await request.read())
        except BaseException as exc:
            outcome.append(exc)
            raise
        finally:
            reported.set()
        return text(200, "done")

    running = start(handler, native_callback=native_callback)
    with socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"POST /gone HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        time.sleep(0.2)  # let the request reach the handler before leaving
    assert reported.wait(TIMEOUT), "the handler was never told"
    assert isinstance(outcome[0], ClientDisconnected)
    with h1() as client:  # and it cost nothing else
        assert client.post(running.url("/next"), content=b"ok").text == "done"


# ---------------------------------------------------------------- streaming responses


def stream_of(data: bytes, size: int = 64 * 1024) -> Callable[[], AsyncIterator[bytes]]:
    async def chunks() -> AsyncIterator[bytes]:
        for offset in range(0, len(data), size):
            yield data[offset : offset + size]

    return chunks


@pytest.mark.parametrize("client_kind", ["h1", "h2c"])
@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_4_mib_stream_checked_by_sha256(start: Starter, native_callback: bool, client_kind: str) -> None:
    data = pattern(4 * MIB + 5)
    chunks = stream_of(data)
    running = start(
        lambda _request: NativeDirectResponse.stream(
            200, [("content-type", "application/octet-stream")], body=chunks()
        ),
        native_callback=native_callback,
    )
    with h1() if client_kind == "h1" else h2c() as client:
        response = client.get(running.url("/stream"))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert len(response.content) == len(data)
    assert digest(response.content) == digest(data)
    if client_kind == "h1":
        assert response.headers.get("transfer-encoding") == "chunked"


@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_stream_from_async_handler_with_custom_status(start: Starter, native_callback: bool) -> None:
    async def handler(_request: NativeDirectRequest) -> NativeDirectResponse:
        await asyncio.sleep(0)

        async def body() -> AsyncIterator[Any]:
            yield b"bytes,"
            yield b""  # an empty chunk does not end the stream
            yield bytearray(b"bytearray,")
            await asyncio.sleep(0.01)
            yield memoryview(b"memoryview")

        return NativeDirectResponse.stream(206, [("x-kind", "stream")], body=body())

    running = start(handler, native_callback=native_callback)
    with h1() as client:
        response = client.get(running.url())
    assert (response.status_code, response.headers["x-kind"]) == (206, "stream")
    assert response.content == b"bytes,bytearray,memoryview"


@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_slow_client_gets_the_whole_stream_and_the_server_waits_for_it(start: Starter, native_callback: bool) -> None:
    total = 32 * MIB
    produced = [0]
    block = pattern(64 * 1024)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(total // len(block)):
            produced[0] += len(block)
            yield block

    running = start(lambda _request: NativeDirectResponse.stream(body=body()), native_callback=native_callback)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.settimeout(TIMEOUT)
    sock.connect(("127.0.0.1", running.port))
    connection = http.client.HTTPConnection("127.0.0.1", running.port, timeout=TIMEOUT)
    connection.sock = sock
    connection.request("GET", "/slow")
    response = connection.getresponse()
    assert response.status == 200

    # The client reads nothing: production must stall well short of the end
    # (bounded buffers), instead of the whole body piling up in memory.
    last = -1
    deadline = time.monotonic() + TIMEOUT
    while produced[0] != last and time.monotonic() < deadline:
        last = produced[0]
        time.sleep(0.3)
    assert produced[0] < total, "the response stream never waited for the client"

    hasher, received = hashlib.sha256(), 0
    expected = hashlib.sha256()
    for _ in range(total // len(block)):
        expected.update(block)
    while chunk := response.read(16 * 1024):
        hasher.update(chunk)
        received += len(chunk)
        if received % (2 * MIB) < 16 * 1024:
            time.sleep(0.01)  # and stays slow
    connection.close()
    assert received == total
    assert hasher.hexdigest() == expected.hexdigest()
    assert produced[0] == total


@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_stream_that_fails_midway_cuts_the_response_and_the_server_goes_on(
    start: Starter, native_callback: bool, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        raise RuntimeError("generator broke")

    def handler(request: NativeDirectRequest) -> NativeDirectResponse:
        if request.path == "/broken":
            return NativeDirectResponse.stream(body=body())
        return text(200, "fine")

    running = start(handler, native_callback=native_callback)
    with h1() as client:
        with pytest.raises(httpx.HTTPError):  # an error, never a short success
            client.get(running.url("/broken"))
    with h1() as client:
        assert client.get(running.url("/after")).text == "fine"
    assert any("generator broke" in str(record.exc_info[1]) for record in caplog.records if record.exc_info)


def test_stream_response_under_native_direct_is_sent_or_refused(start: Starter) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"streamed under native_direct"

    running = start(lambda _request: NativeDirectResponse.stream(body=body()), native_direct=True)
    with h1() as client:
        response = client.get(running.url())
    # Either the stream is sent, or the handler is told (500); a silent,
    # empty 200 loses the body without a trace.
    assert (response.status_code, response.content) in {
        (200, b"streamed under native_direct"),
        (500, b"internal server error"),
    }


# ---------------------------------------------------------------- pre-encoded responses


def fingerprint(response: httpx.Response) -> tuple[Any, ...]:
    headers = tuple(sorted((k, v) for k, v in response.headers.multi_items() if k != "date"))
    return (response.status_code, headers, response.content)


@pytest.mark.parametrize("mode", MODES)
def test_one_prebuilt_response_for_1000_requests(start: Starter, mode: str) -> None:
    if kind(mode) == "async":

        async def handler(_request: NativeDirectRequest) -> NativeDirectResponse:
            return PREBUILT

    else:

        def handler(_request: NativeDirectRequest) -> NativeDirectResponse:  # type: ignore[misc]
            return PREBUILT

    running = start(handler, **options_for(mode))
    with h1() as client:
        prints = {fingerprint(client.get(running.url(f"/{i}"))) for i in range(1000)}
    assert len(prints) == 1
    [(status, headers, body)] = prints
    assert status == 200
    assert body == b"prebuilt body \x00\xff"
    assert ("set-cookie", "a=1") in headers and ("set-cookie", "b=2") in headers
    assert ("content-length", str(len(body))) in headers
    # Sending it did not consume or change it.
    assert (PREBUILT.status, PREBUILT.body, PREBUILT.stream_body) == (200, b"prebuilt body \x00\xff", None)
    assert PREBUILT.headers == [
        ("content-type", "text/plain; charset=utf-8"),
        ("x-prebuilt", "yes"),
        ("set-cookie", "a=1"),
        ("set-cookie", "b=2"),
    ]


@pytest.mark.parametrize("mode", BODY_MODES)
def test_prebuilt_response_from_many_clients_at_once(start: Starter, mode: str) -> None:
    running = start(lambda _request: PREBUILT, **options_for(mode))

    def burst(kind: str) -> set[tuple[Any, ...]]:
        with h1() if kind == "h1" else h2c() as client:
            return {fingerprint(client.get(running.url("/p"))) for _ in range(125)}

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(burst, ["h1", "h2c"] * 4))
    prints = set().union(*results)
    assert len(prints) == 1
    assert next(iter(prints))[2] == PREBUILT.body


# ---------------------------------------------------------------- sync, async, native_direct


@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_async_handler_that_suspends(start: Starter, native_callback: bool) -> None:
    async def handler(request: NativeDirectRequest) -> NativeDirectResponse:
        await asyncio.sleep(0.01)
        body = await request.read()
        await asyncio.sleep(0)
        return text(200, b"async:" + body)

    running = start(handler, native_callback=native_callback)
    with h1() as client:
        assert client.post(running.url(), content=b"x").text == "async:x"


REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_async_handlers_each_run_in_a_task_and_a_context_of_their_own(start: Starter, native_callback: bool) -> None:
    """Many requests at once, some waiting: each handler runs in one real Task
    from start to end and sees no context variable another handler set."""

    async def handler(request: NativeDirectRequest) -> NativeDirectResponse:
        seen = REQUEST_ID.get()
        REQUEST_ID.set(request.query)
        task = asyncio.current_task()
        if request.query.startswith("wait"):
            await asyncio.sleep(0)
        return as_json({"seen": seen, "task": task is not None, "same": asyncio.current_task() is task})

    running = start(handler, native_callback=native_callback)

    async def run() -> list[Any]:
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            queries = [("wait" if i % 3 == 0 else "now") + str(i) for i in range(60)]
            responses = await asyncio.gather(*(client.get(running.url(f"/?{query}")) for query in queries))
        return [response.json() for response in responses]

    assert asyncio.run(run()) == [{"seen": None, "task": True, "same": True}] * 60


@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_a_waiting_handler_holds_up_no_request_after_it(start: Starter, native_callback: bool) -> None:
    """`/wait` waits until a later request sets the event: it would never be
    answered if the requests after it waited for it. (With
    ``response_timeout=None``: no limit.)"""
    released = asyncio.Event()

    async def handler(request: NativeDirectRequest) -> NativeDirectResponse:
        if request.path == "/wait":
            await released.wait()
            return text(200, "released")
        released.set()
        return text(200, "set")

    running = start(handler, native_callback=native_callback, response_timeout=None)

    assert get_at_once(running, ["/wait", *["/set"] * 20]) == ["released", *["set"] * 20]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is new in Python 3.11")
@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_asyncio_timeout_in_a_handler_cancels_that_handler_only(start: Starter, native_callback: bool) -> None:
    async def handler(request: NativeDirectRequest) -> NativeDirectResponse:
        if request.path == "/now":
            return text(200, "now")
        try:
            async with asyncio.timeout(0.05):
                await asyncio.Event().wait()
        except TimeoutError:
            return text(200, "timed out")
        return text(500, "not cancelled")

    running = start(handler, native_callback=native_callback)

    assert get_at_once(running, ["/slow", "/now"] * 10) == ["timed out", "now"] * 10


@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_a_handler_that_cancels_its_own_task_cancels_no_other(start: Starter, native_callback: bool) -> None:
    # Handlers that finish without waiting may share a Task: a cancellation
    # one of them asks for on it must not reach the next one that waits.
    async def handler(request: NativeDirectRequest) -> NativeDirectResponse:
        if request.path == "/cancel":
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            return text(200, "cancelled itself")
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            return text(500, "cancelled by another handler")
        return text(200, "waited")

    running = start(handler, native_callback=native_callback)

    assert get_at_once(running, ["/cancel", "/wait"] * 30) == ["cancelled itself", "waited"] * 30


def test_sync_handler_on_the_loop_runs_on_the_loop_thread(start: Starter, loop_thread: BackgroundLoop) -> None:
    threads: list[str] = []

    def handler(_request: NativeDirectRequest) -> NativeDirectResponse:
        threads.append(threading.current_thread().name)
        asyncio.get_running_loop()  # there is one: this is the loop thread
        return text(200, "sync")

    running = start(handler)
    with h1() as client:
        assert client.get(running.url()).text == "sync"
    assert threads == [loop_thread._thread.name]


def test_native_direct_runs_off_the_event_loop(start: Starter, loop_thread: BackgroundLoop) -> None:
    seen: list[tuple[str, bool]] = []

    def handler(request: NativeDirectRequest) -> NativeDirectResponse:
        try:
            asyncio.get_running_loop()
            has_loop = True
        except RuntimeError:
            has_loop = False
        seen.append((threading.current_thread().name, has_loop))
        return text(200, b"direct:" + request.body_bytes())

    running = start(handler, native_direct=True)
    with h1() as client:
        responses = [client.post(running.url(), content=f"{i}".encode()).text for i in range(5)]
    with h2c() as client:
        responses.append(client.post(running.url(), content=b"h2").text)
    assert responses == [f"direct:{i}" for i in range(5)] + ["direct:h2"]
    assert {thread for thread, _ in seen} == {"server-native-direct"}
    assert loop_thread._thread.name not in {thread for thread, _ in seen}
    assert not any(has_loop for _, has_loop in seen)


def test_native_direct_refuses_an_async_handler_at_start(loop_thread: BackgroundLoop) -> None:
    async def handler(_request: NativeDirectRequest) -> NativeDirectResponse:
        return text(200, "never")

    port = free_port()
    with pytest.raises(TypeError, match="synchronous"):
        loop_thread.run(
            serve_native_direct(handler, "127.0.0.1", port, native_direct=True, http3=False, echo=False), TIMEOUT
        )


def test_native_direct_refusal_leaves_nothing_listening(loop_thread: BackgroundLoop) -> None:
    async def handler(_request: NativeDirectRequest) -> NativeDirectResponse:
        return text(200, "never")

    port = free_port()
    with pytest.raises(TypeError) as refusal:
        loop_thread.run(
            serve_native_direct(handler, "127.0.0.1", port, native_direct=True, http3=False, echo=False), TIMEOUT
        )
    # While the caller still holds the exception (an `except` block that
    # falls back to native_direct=False on the same port, a logger, a
    # supervisor), nothing may be listening: a client would hang until
    # response_timeout, and a fallback bind of the port fails.
    assert refusal.value is not None
    assert refused(port)


def test_native_direct_is_in_process_only(loop_thread: BackgroundLoop) -> None:
    port = free_port()
    with pytest.raises(ValueError, match="native_callback=False"):
        loop_thread.run(
            serve_native_direct(
                lambda _request: PREBUILT,
                "127.0.0.1",
                port,
                native_direct=True,
                native_callback=False,
                http3=False,
                echo=False,
            ),
            TIMEOUT,
        )
    assert refused(port)


# ---------------------------------------------------------------- failures


def failing_handler(mode: str) -> Any:
    def answer(request: NativeDirectRequest, _body: bytes | None) -> NativeDirectResponse:
        if request.path == "/raise":
            raise ValueError("handler exploded")
        return text(200, "still serving")

    if kind(mode) == "async-after-await":

        async def handler(request: NativeDirectRequest) -> NativeDirectResponse:
            await asyncio.sleep(0.01)
            return answer(request, None)

        return handler
    return make_handler(mode, answer)


@pytest.mark.parametrize("mode", [*MODES, "async-after-await", "async-after-await/bridge"])
def test_handler_exception_is_a_500_and_the_server_goes_on(
    start: Starter, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    caplog.set_level(logging.ERROR, logger="server_native")
    running = start(failing_handler(mode), **options_for(mode))
    with h1() as client:
        for _ in range(3):
            failed = client.get(running.url("/raise"))
            assert failed.status_code == 500
            assert failed.text.lower() == "internal server error"
            assert "handler exploded" not in failed.text  # no internals leak to the client
            assert client.get(running.url("/ok")).text == "still serving"
    with h2c() as client:
        assert client.get(running.url("/raise")).status_code == 500
        assert client.get(running.url("/ok")).status_code == 200
    errors = [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], ValueError)]
    assert len(errors) == 4  # each failure is reported once


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_handler_ending_in_cancelled_error_is_a_500(start: Starter, mode: str) -> None:
    if mode == "async":

        async def handler(request: NativeDirectRequest) -> NativeDirectResponse:
            if request.path == "/cancelled":
                shared = asyncio.get_running_loop().create_future()
                asyncio.get_running_loop().call_soon(shared.cancel)  # e.g. a shared fetch that was cancelled
                await shared
            return text(200, "ok")

    else:

        def handler(request: NativeDirectRequest) -> NativeDirectResponse:  # type: ignore[misc]
            if request.path == "/cancelled":
                raise asyncio.CancelledError
            return text(200, "ok")

    running = start(handler, response_timeout=3)  # bounds the wait when it is not answered
    with h1() as client:
        assert client.get(running.url("/cancelled")).status_code == 500
        assert client.get(running.url("/ok")).text == "ok"


WRONG_VALUES: dict[str, Any] = {
    "none": None,
    "dict": {"status": 200},
    "bytes": b"body",
    "str": "body",
    "tuple": (200, [], b""),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("wrong", sorted(WRONG_VALUES))
def test_handler_returning_a_wrong_type_is_a_500(
    start: Starter, caplog: pytest.LogCaptureFixture, mode: str, wrong: str
) -> None:
    value = WRONG_VALUES[wrong]

    def answer(request: NativeDirectRequest, _body: bytes | None) -> Any:
        return text(200, "ok") if request.path == "/ok" else value

    running = start(make_handler(mode, answer), **options_for(mode))
    with h1() as client:
        assert client.get(running.url("/wrong")).status_code == 500
        assert client.get(running.url("/ok")).text == "ok"
    assert any(
        r.exc_info and isinstance(r.exc_info[1], TypeError) and "NativeDirectResponse" in str(r.exc_info[1])
        for r in caplog.records
    )


def test_native_direct_handler_returning_a_coroutine_is_a_500(start: Starter) -> None:
    async def later() -> NativeDirectResponse:
        return text(200, "too late")

    def handler(request: NativeDirectRequest) -> Any:
        if request.path == "/ok":
            return text(200, "ok")
        coroutine = later()
        coroutine.close()  # not awaited on purpose: no "never awaited" warning
        return coroutine

    running = start(handler, native_direct=True)
    with h1() as client:
        assert client.get(running.url("/coroutine")).status_code == 500
        assert client.get(running.url("/ok")).text == "ok"


@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_handler_that_never_answers_gets_504_async(start: Starter, native_callback: bool) -> None:
    async def handler(request: NativeDirectRequest) -> NativeDirectResponse:
        if request.path == "/hang":
            await asyncio.get_running_loop().create_future()  # never resolved
        return text(200, "answered")

    # The hung handlers are cancelled when the server stops, once
    # shutdown_timeout has passed.
    running = start(handler, response_timeout=0.5, shutdown_timeout=0.5, native_callback=native_callback)
    with h1() as client:
        hung = client.get(running.url("/hang"))
        assert hung.status_code == 504
        assert client.get(running.url("/ok")).text == "answered"
    with h2c() as client:
        assert client.get(running.url("/hang")).status_code == 504


@pytest.mark.parametrize("name", ["header_read_timeout", "tls_handshake_timeout", "idle_timeout", "response_timeout"])
def test_timeouts_take_none_for_no_limit(name: str) -> None:
    assert getattr(ServerConfig(**{name: None}), name) == 0.0


@pytest.mark.parametrize(
    ("name", "value"),
    [("response_timeout", -1), ("idle_timeout", "30"), ("header_read_timeout", float("nan")),
     ("tls_handshake_timeout", True), ("shutdown_timeout", None)],
)  # fmt: skip
def test_a_bad_timeout_is_refused_by_name(start: Starter, name: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"^{name} must be a number of seconds"):
        ServerConfig(**{name: value})
    with pytest.raises(ValueError, match=f"^{name} must be"):
        start(lambda request: text(200, "never"), **{name: value})


def test_handler_that_never_answers_gets_504_native_direct(start: Starter) -> None:
    release = threading.Event()
    late: list[str] = []

    def handler(request: NativeDirectRequest) -> NativeDirectResponse:
        if request.path == "/hang":
            release.wait(TIMEOUT)  # bounded: the test releases it
            late.append("returned")
        return text(200, "answered")

    running = start(handler, native_direct=True, response_timeout=0.5)
    try:
        with h1() as client:
            assert client.get(running.url("/hang")).status_code == 504
    finally:
        release.set()
    with h1() as client:  # the late answer went nowhere, the next one is fine
        assert client.get(running.url("/ok")).text == "answered"
    assert late == ["returned"]


# ---------------------------------------------------------------- serving and shutdown


@pytest.mark.parametrize("mode", MODES)
def test_shutdown_signal_drains_in_flight_requests_and_stops(start: Starter, mode: str) -> None:
    entered = threading.Event()

    def slow(request: NativeDirectRequest, _body: bytes | None) -> NativeDirectResponse:
        return text(200, f"finished {request.path}")

    if kind(mode) == "async":

        async def handler(request: NativeDirectRequest) -> NativeDirectResponse:
            entered.set()
            await asyncio.sleep(0.3)
            return slow(request, None)

    else:

        def handler(request: NativeDirectRequest) -> NativeDirectResponse:  # type: ignore[misc]
            entered.set()
            if kind(mode) == "native_direct":
                time.sleep(0.3)
            return slow(request, None)

    running = start(handler, **options_for(mode))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(fetch, running.url("/inflight"))
        assert entered.wait(TIMEOUT)
        assert running.stop() is None
        response = in_flight.result(TIMEOUT)
    assert (response.status_code, response.text) == (200, "finished /inflight")
    assert refused(running.port)


@pytest.mark.parametrize(
    "mode",
    [
        "async",
        pytest.param("native_direct"),
    ],
)
def test_shutdown_timeout_bounds_a_stuck_handler(start: Starter, mode: str) -> None:
    entered, release = threading.Event(), threading.Event()

    if mode == "async":

        async def handler(_request: NativeDirectRequest) -> NativeDirectResponse:
            entered.set()
            await asyncio.sleep(TIMEOUT)
            return text(200, "late")

    else:

        def handler(_request: NativeDirectRequest) -> NativeDirectResponse:  # type: ignore[misc]
            entered.set()
            release.wait(TIMEOUT)  # bounded; released at the end of the test
            return text(200, "late")

    running = start(handler, shutdown_timeout=0.2, **options_for(mode))
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(fetch, running.url("/stuck"))
            assert entered.wait(TIMEOUT)
            running.loop_thread.loop.call_soon_threadsafe(running.event.set)
            # The drain is bounded by shutdown_timeout (0.2 s), not by the
            # handler, which is still blocked when this returns.
            assert running.future.result(timeout=5) is None
            assert not release.is_set()
            try:
                cut = in_flight.result(TIMEOUT).status_code
            except httpx.HTTPError:
                cut = None
            assert cut != 200
        assert refused(running.port)
    finally:
        release.set()


@pytest.mark.parametrize("mode", BODY_MODES)
def test_cancelling_serve_closes_the_listener(start: Starter, mode: str) -> None:
    running = start(lambda _request: PREBUILT, **options_for(mode))
    with h1() as client:
        assert client.get(running.url()).status_code == 200
    running.loop_thread.loop.call_soon_threadsafe(running.future.cancel)
    with pytest.raises(concurrent.futures.CancelledError):
        running.future.result(TIMEOUT)
    wait_for(lambda: refused(running.port), timeout=3, what="the listener to close after cancellation")


class SlowWakeLoop(asyncio.SelectorEventLoop):
    """Widens a real window: the native_direct thread hands the close future
    to the loop with ``call_soon_threadsafe``, whose socket write releases
    the GIL; the loop may finish serving (and the process may exit) before
    that thread is done."""

    def call_soon_threadsafe(self, callback: Any, *args: Any, context: Any = None) -> asyncio.Handle:  # type: ignore[override]
        handle = super().call_soon_threadsafe(callback, *args, context=context)
        if threading.current_thread().name == "server-native-direct":
            time.sleep(0.5)
        return handle


def test_native_direct_thread_is_finished_when_serve_returns() -> None:
    loop = SlowWakeLoop()
    runner = threading.Thread(target=loop.run_forever, name="slow-wake-loop", daemon=True)
    runner.start()
    try:
        port = free_port()
        stop = asyncio.Event()
        serving = asyncio.run_coroutine_threadsafe(
            serve_native_direct(
                lambda _request: PREBUILT,
                "127.0.0.1",
                port,
                native_direct=True,
                echo=False,
                http3=False,
                shutdown_signal=stop.wait(),
            ),
            loop,
        )
        wait_for(lambda: not refused(port), what="the server to listen")
        with h1() as client:
            assert client.get(f"http://127.0.0.1:{port}/").content == PREBUILT.body
        loop.call_soon_threadsafe(stop.set)
        assert serving.result(TIMEOUT) is None
        alive = [t for t in threading.enumerate() if t.name == "server-native-direct" and t.is_alive()]
        assert alive == [], "serve_native_direct returned before its native_direct thread finished"
    finally:
        wait_for(lambda: not any(t.name == "server-native-direct" for t in threading.enumerate()), what="the thread")
        loop.call_soon_threadsafe(loop.stop)
        runner.join(TIMEOUT)
        loop.close()


def test_echo_line_names_the_protocols(start: Starter) -> None:
    plain = start(lambda _request: PREBUILT)
    assert (plain.scheme, plain.host, plain.protocols) == ("http", "127.0.0.1", "HTTP/1.1, HTTP/2")
    http1_only = start(lambda _request: PREBUILT, http2=False, native_direct=True)
    assert http1_only.protocols == "HTTP/1.1"
    with h1() as client:
        assert client.get(http1_only.url()).http_version == "HTTP/1.1"


@pytest.mark.parametrize("native_callback", TRANSPORTS)
def test_h2c_many_concurrent_streams_on_one_connection(start: Starter, native_callback: bool) -> None:
    async def handler(request: NativeDirectRequest) -> NativeDirectResponse:
        await asyncio.sleep(0.01)
        return text(200, request.query)

    running = start(handler, native_callback=native_callback)

    async def run() -> list[str]:
        async with httpx.AsyncClient(http1=False, http2=True, timeout=TIMEOUT) as client:
            responses = await asyncio.gather(*(client.get(running.url(f"/c?{i}")) for i in range(50)))
        assert {r.http_version for r in responses} == {"HTTP/2"}
        return [r.text for r in responses]

    assert asyncio.run(run()) == [str(i) for i in range(50)]


#: Around the sizes where the HTTP/2 writer changes course: h2 flushes after
#: a DATA frame of 256 bytes or more, the server holds writes under 16 KiB
#: and up to 32 KiB, and frames are 16 KiB by default.
H2_SIZES = [0, 1, 255, 256, 257, 4096, 16383, 16384, 16385, 65535, 65536, 70000, 1 << 20]


@pytest.mark.parametrize("secure", [False, True], ids=["h2c", "tls-h2"])
def test_h2_responses_of_every_size_at_once_arrive_whole(start: Starter, certs: Certificates, secure: bool) -> None:
    async def handler(request: NativeDirectRequest) -> NativeDirectResponse:
        size = int(request.query)
        return NativeDirectResponse.bytes(200, [("content-type", "application/octet-stream")], pattern(size))

    running = start(handler, secure=secure)
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(certs.ca_path)) if secure else False

    async def run() -> list[tuple[str, int, str]]:
        async with httpx.AsyncClient(http1=secure, http2=True, verify=verify, timeout=TIMEOUT) as client:
            sizes = H2_SIZES * 4
            responses = await asyncio.gather(*(client.get(running.url(f"/?{size}")) for size in sizes))
        return [(r.http_version, len(r.content), digest(r.content)) for r in responses]

    assert asyncio.run(run()) == [("HTTP/2", size, digest(pattern(size))) for size in H2_SIZES * 4]


#: Around the size up to which the server joins the pieces of an HTTP/1 write
#: (a head and its body, a chunk and its framing) into one buffer: 2 KiB.
JOIN_SIZES = [0, 1, 1024, *range(1860, 2000, 7), 2047, 2048, 2049, 4096, 70000]


@pytest.mark.parametrize("secure", [False, True], ids=["h1", "tls-h1"])
def test_h1_pipelined_responses_around_the_join_size_arrive_whole(
    start: Starter, certs: Certificates, secure: bool
) -> None:
    """Whole and streamed (chunked) bodies of every size around the join
    limit, all requested at once on one connection: each arrives whole, in
    order."""

    async def handler(request: NativeDirectRequest) -> NativeDirectResponse:
        size, _, how = request.query.partition("-")
        body = pattern(int(size))
        headers = [("content-type", "application/octet-stream")]
        if how == "whole":
            return NativeDirectResponse.bytes(200, headers, body)

        async def pieces() -> AsyncIterator[bytes]:
            for at in range(0, len(body), 1000):
                yield body[at : at + 1000]

        return NativeDirectResponse.stream(200, headers, body=pieces())

    running = start(handler, secure=secure)
    targets = [f"/?{size}-{how}" for how in ("whole", "stream") for size in JOIN_SIZES]
    requests = "".join(f"GET {target} HTTP/1.1\r\nHost: localhost\r\n\r\n" for target in targets)
    client = h11.Connection(h11.CLIENT)
    received: list[tuple[int, int, str]] = []
    context = ssl.create_default_context(cafile=str(certs.ca_path)) if secure else None
    with (
        socket.create_connection((running.host, running.port), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname="localhost") if context else raw as sock,
    ):
        sock.sendall(requests.encode())
        for target in targets:
            client.send(h11.Request(method="GET", target=target, headers=[("Host", "localhost")]))
            client.send(h11.EndOfMessage())
            status, body = 0, b""
            while not isinstance(event := client.next_event(), h11.EndOfMessage):
                if event is h11.NEED_DATA:
                    client.receive_data(sock.recv(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                else:
                    pytest.fail(f"{target}: {event!r} before the response ended")
            received.append((status, len(body), digest(body)))
            client.start_next_cycle()
    assert received == [(200, size, digest(pattern(size))) for _ in ("whole", "stream") for size in JOIN_SIZES]


# ---------------------------------------------------------------- NativeDirectResponse itself


def test_response_fields_and_defaults() -> None:
    default = NativeDirectResponse.bytes()
    assert (default.status, default.headers, default.body, default.stream_body) == (200, [], b"", None)
    built = NativeDirectResponse.bytes(status=404, headers=[("X-Name", "v"), (b"x-raw", b"\xe9")], body=b"nope")
    assert built.status == 404
    assert built.headers == [("x-name", "v"), ("x-raw", "é")]  # names lowercase, values latin-1
    assert built.body == b"nope"
    assert "404" in repr(built)

    async def body() -> AsyncIterator[bytes]:
        yield b""

    iterable = body()
    streamed = NativeDirectResponse.stream(201, [("a", "b")], body=iterable)
    assert (streamed.status, streamed.headers, streamed.body) == (201, [("a", "b")], b"")
    assert streamed.stream_body is iterable
    asyncio.run(iterable.aclose())


@pytest.mark.parametrize("status", [0, 99, 101, 1000])
def test_invalid_status_is_refused_when_building(status: int) -> None:
    with pytest.raises(ValueError, match="status"):
        NativeDirectResponse.bytes(status)


@pytest.mark.parametrize("header", [("bad name", "v"), ("x", "a\r\nb"), ("", "v")])
def test_invalid_header_is_refused_when_building(header: tuple[str, str]) -> None:
    with pytest.raises(ValueError):
        NativeDirectResponse.bytes(200, [header])


def test_stream_needs_a_body_keyword() -> None:
    with pytest.raises(TypeError):
        NativeDirectResponse.stream(200)  # type: ignore[call-arg]


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_bytes_like_body_is_accepted(kind: type) -> None:
    assert NativeDirectResponse.bytes(body=kind(b"abc")).body == b"abc"
