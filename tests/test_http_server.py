"""The HttpServer-style API (`NativeHttpServer`, `HttpRequest`,
`HttpResponse`) against a real server on loopback, with real clients:
http.client, httpx (HTTP/1.1 and h2c prior knowledge), raw sockets, curl."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import gzip
import hashlib
import http.client
import json
import random
import socket
import subprocess
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
from apps.harness import refused, wait_for

from server_native import ContentType, Cookie, HttpRequest, NativeHttpServer
from server_native.runtime.addresses import ipv6_available

try:
    from .conftest import BackgroundLoop, RunningServer, requires_curl, requires_ipv6
except ImportError:  # tests/ run as a plain directory
    from conftest import BackgroundLoop, RunningServer, requires_curl, requires_ipv6  # type: ignore[no-redef]

Serve = Callable[..., RunningServer]
TIMEOUT = 10
MiB = 1024 * 1024


# ---------------------------------------------------------------- helpers


def request(
    port: int,
    method: str = "GET",
    path: str = "/",
    body: Any = None,
    headers: dict[str, str] | None = None,
    host: str = "127.0.0.1",
) -> tuple[http.client.HTTPResponse, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def h2_client(**options: Any) -> httpx.Client:
    """httpx speaking HTTP/2 with prior knowledge (h2c) on plaintext."""
    return httpx.Client(http1=False, http2=True, timeout=TIMEOUT, **options)


def on_loop(loop_thread: BackgroundLoop, fn: Callable[[], Any]) -> Any:
    async def call() -> Any:
        return fn()

    return loop_thread.run(call())


class Recorder:
    """A handler that stores ``extract(request)`` (awaited when it is a
    coroutine) and answers with ``body``."""

    def __init__(self, extract: Callable[[HttpRequest], Any], body: bytes = b"ok") -> None:
        self.seen: list[Any] = []
        self._extract = extract
        self._body = body

    async def __call__(self, request: HttpRequest) -> None:
        value = self._extract(request)
        if asyncio.iscoroutine(value):
            value = await value
        self.seen.append(value)
        request.response.add(self._body)
        await request.response.close()


async def _ok(request: HttpRequest) -> None:
    request.response.write("ok")
    await request.response.close()


def _fields(request: HttpRequest) -> dict[str, Any]:
    requested = request.requested_uri
    return {
        "method": request.method,
        "path": request.uri.path,
        "query": request.uri.query,
        "query_parameters": request.uri.query_parameters,
        "scheme": requested.scheme,
        "authority": requested.netloc,
        "requested_path": requested.path,
        "version": request.protocol_version,
        "content_length": request.content_length,
        "connection_info": tuple(request.connection_info),
        "headers": request.headers,
    }


# ---------------------------------------------------------------- async iteration


def iterate(loop_thread: BackgroundLoop, server: NativeHttpServer, count: int) -> concurrent.futures.Future[list[str]]:
    """Starts ``async for request in server`` on the loop; it answers
    ``count`` requests with their path and then stops iterating. Returns once
    the iteration is listening."""
    ready = threading.Event()

    async def run() -> list[str]:
        paths: list[str] = []

        async def consume() -> None:
            async for req in server:
                paths.append(req.uri.path)
                req.response.write(f"iterated {req.uri.path}")
                await req.response.close()
                if len(paths) == count:
                    break

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0)  # the task is now waiting inside the iterator
        ready.set()
        await task
        return paths

    future = asyncio.run_coroutine_threadsafe(run(), loop_thread.loop)
    assert ready.wait(TIMEOUT)
    return future


def test_async_for_iteration(serve: Serve, loop_thread: BackgroundLoop) -> None:
    running = serve(None)
    future = iterate(loop_thread, running.server, 3)
    with httpx.Client(timeout=TIMEOUT) as client:
        for path in ("/a", "/b", "/c"):
            response = client.get(running.url(path))
            assert response.status_code == 200
            assert response.text == f"iterated {path}"
    assert future.result(TIMEOUT) == ["/a", "/b", "/c"]
    # Nobody iterates any more: the server answers 503.
    after, _ = request(running.port)
    assert after.status == 503


def test_async_for_iteration_over_http2(serve: Serve, loop_thread: BackgroundLoop) -> None:
    running = serve(None)
    future = iterate(loop_thread, running.server, 2)
    with h2_client() as client:
        for path in ("/x", "/y"):
            response = client.get(running.url(path))
            assert response.http_version == "HTTP/2"
            assert response.text == f"iterated {path}"
    assert future.result(TIMEOUT) == ["/x", "/y"]


def test_an_answered_request_is_freed_without_the_garbage_collector(serve: Serve) -> None:
    """A request and its response form no reference cycle: once answered,
    they are freed at once, not at the collector's next pass (which, on a
    large heap, costs every request dearly)."""
    requests: list[weakref.ref[HttpRequest]] = []

    async def handler(request: HttpRequest) -> None:
        requests.append(weakref.ref(request))
        request.response.headers.set("x-seen", request.headers.value("host") or "")
        request.response.write("freed")
        await request.response.close()

    running = serve(handler)
    gc.disable()
    try:
        response, body = request(running.port)
        assert (response.status, body) == (200, b"freed")
        assert wait_for(lambda: len(requests) == 1 and requests[0]() is None)
    finally:
        gc.enable()


def test_no_listener_gives_503(serve: Serve) -> None:
    running = serve(None)
    response, body = request(running.port)
    assert response.status == 503
    assert body  # a short explanation


# ---------------------------------------------------------------- request fields


def test_request_fields_http11(serve: Serve) -> None:
    recorder = Recorder(_fields)
    running = serve(recorder)
    response, _ = request(running.port, "GET", "/a/b%20c?x=1&y=two%20words&x=3&empty=")
    assert response.status == 200
    seen = recorder.seen[0]
    assert seen["method"] == "GET"
    assert seen["path"] == "/a/b%20c"
    assert seen["query"] == "x=1&y=two%20words&x=3&empty="
    assert seen["query_parameters"] == {"x": "3", "y": "two words", "empty": ""}
    assert seen["scheme"] == "http"
    assert seen["authority"] == f"127.0.0.1:{running.port}"
    assert seen["requested_path"] == "/a/b%20c"
    assert seen["version"] == "1.1"
    assert seen["content_length"] == -1


def test_requested_uri_uses_the_host_header(serve: Serve) -> None:
    recorder = Recorder(lambda r: r.requested_uri)
    running = serve(recorder)
    request(running.port, path="/p?q=1", headers={"Host": "example.test:8080"})
    requested = recorder.seen[0]
    assert requested.scheme == "http"
    assert requested.netloc == "example.test:8080"
    assert requested.path == "/p"
    assert requested.query == "q=1"


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_request_method(serve: Serve, method: str) -> None:
    recorder = Recorder(lambda r: r.method)
    running = serve(recorder)
    response, _ = request(running.port, method, body=b"" if method in ("POST", "PUT", "PATCH") else None)
    assert response.status == 200
    assert recorder.seen == [method]


def test_request_fields_http2(serve: Serve) -> None:
    recorder = Recorder(_fields)
    running = serve(recorder)
    with h2_client() as client:
        response = client.get(running.url("/h2/path?k=v"))
    assert response.http_version == "HTTP/2"
    seen = recorder.seen[0]
    assert seen["version"] == "2"
    assert seen["path"] == "/h2/path"
    assert seen["query_parameters"] == {"k": "v"}
    assert seen["scheme"] == "http"
    # The authority comes from HTTP/2's :authority pseudo-header.
    assert seen["authority"] == f"127.0.0.1:{running.port}"


def test_request_protocol_version_10(serve: Serve) -> None:
    recorder = Recorder(lambda r: r.protocol_version)
    running = serve(recorder)
    with socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.read() == b"ok"
    assert recorder.seen == ["1.0"]


def test_request_headers_case_insensitive_and_repeated(serve: Serve) -> None:
    recorder = Recorder(lambda r: r.headers)
    running = serve(recorder)
    conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=TIMEOUT)
    try:
        conn.putrequest("GET", "/")
        conn.putheader("X-Custom-Header", "Mixed Case Value")
        conn.putheader("X-Multi", "first")
        conn.putheader("X-Multi", "second")
        conn.putheader("x-multi", "third")
        conn.endheaders()
        assert conn.getresponse().read() == b"ok"
    finally:
        conn.close()
    headers = recorder.seen[0]
    assert headers.value("x-custom-header") == "Mixed Case Value"
    assert headers.get("X-CUSTOM-HEADER") == "Mixed Case Value"
    assert "X-Custom-Header" in headers
    assert headers.get_all("X-MULTI") == ["first", "second", "third"]
    assert headers.host == "127.0.0.1"
    assert headers.port == running.port


def test_request_headers_over_http2(serve: Serve) -> None:
    recorder = Recorder(lambda r: r.headers)
    running = serve(recorder)
    with h2_client() as client:
        client.get(running.url(), headers=[("X-Custom", "v"), ("X-Multi", "1"), ("X-Multi", "2")])
    headers = recorder.seen[0]
    assert headers.value("x-custom") == "v"
    assert headers.get_all("x-multi") == ["1", "2"]


def test_connection_info_has_the_real_client_port(serve: Serve) -> None:
    recorder = Recorder(lambda r: r.connection_info)
    running = serve(recorder)
    conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=TIMEOUT)
    try:
        conn.connect()
        assert conn.sock is not None
        client_host, client_port = conn.sock.getsockname()[:2]
        conn.request("GET", "/")
        conn.getresponse().read()
    finally:
        conn.close()
    info = recorder.seen[0]
    assert info.remote_address == client_host == "127.0.0.1"
    assert info.remote_port == client_port
    assert info.remote_port != 0
    assert info.local_port == running.port


@requires_ipv6
def test_connection_info_over_ipv6(serve: Serve) -> None:
    recorder = Recorder(lambda r: r.connection_info)
    running = serve(recorder, "::1")
    with socket.create_connection(("::1", running.port), timeout=TIMEOUT) as sock:
        client_port = sock.getsockname()[1]
        sock.sendall(b"GET / HTTP/1.1\r\nHost: [::1]\r\nConnection: close\r\n\r\n")
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.read() == b"ok"
    info = recorder.seen[0]
    assert info.remote_address == "::1"
    assert info.remote_port == client_port
    assert info.local_port == running.port


def test_request_content_length(serve: Serve) -> None:
    recorder = Recorder(lambda r: r.content_length)
    running = serve(recorder)
    request(running.port, "POST", body=b"hello world")
    request(running.port, "GET")

    def chunks() -> Iterator[bytes]:
        yield b"abc"
        yield b"def"

    conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=TIMEOUT)
    try:
        conn.request("POST", "/", body=chunks(), encode_chunked=True, headers={"Transfer-Encoding": "chunked"})
        conn.getresponse().read()
    finally:
        conn.close()
    assert recorder.seen == [11, -1, -1]


def test_request_cookies(serve: Serve) -> None:
    recorder = Recorder(lambda r: [(c.name, c.value) for c in r.cookies])
    running = serve(recorder)
    request(running.port, headers={"Cookie": "session=abc123; theme=dark; empty="})
    assert recorder.seen == [[("session", "abc123"), ("theme", "dark"), ("empty", "")]]


def test_request_cookies_over_http2(serve: Serve) -> None:
    recorder = Recorder(lambda r: sorted((c.name, c.value) for c in r.cookies))
    running = serve(recorder)
    with h2_client() as client:
        client.get(running.url(), headers={"Cookie": "a=1; b=2"})
    assert recorder.seen == [[("a", "1"), ("b", "2")]]


def test_request_body_read(serve: Serve) -> None:
    async def read(r: HttpRequest) -> bytes:
        return await r.read()

    recorder = Recorder(read)
    running = serve(recorder)
    request(running.port, "POST", body=b"the whole body")
    request(running.port, "GET")
    assert recorder.seen == [b"the whole body", b""]


def test_request_body_async_iteration(serve: Serve) -> None:
    async def chunks(r: HttpRequest) -> list[bytes]:
        return [chunk async for chunk in r]

    recorder = Recorder(chunks)
    running = serve(recorder)

    def body() -> Iterator[bytes]:
        for i in range(20):
            yield f"chunk{i:02d};".encode()

    conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=TIMEOUT)
    try:
        conn.request("POST", "/", body=body(), encode_chunked=True, headers={"Transfer-Encoding": "chunked"})
        assert conn.getresponse().read() == b"ok"
    finally:
        conn.close()
    received = recorder.seen[0]
    assert all(received)  # no empty chunks are yielded
    assert b"".join(received) == b"".join(f"chunk{i:02d};".encode() for i in range(20))


def test_request_body_over_http2(serve: Serve) -> None:
    async def read(r: HttpRequest) -> bytes:
        return await r.read()

    recorder = Recorder(read)
    running = serve(recorder)
    payload = random.Random(2).randbytes(300_000)
    with h2_client() as client:
        response = client.post(running.url(), content=payload)
    assert response.status_code == 200
    assert recorder.seen == [payload]


# ---------------------------------------------------------------- responses


@pytest.mark.parametrize(
    ("status", "reason"), [(201, "Created"), (404, "Not Found"), (418, "I'm a Teapot"), (503, "Service Unavailable")]
)
def test_response_status_codes(serve: Serve, status: int, reason: str) -> None:
    async def handler(r: HttpRequest) -> None:
        r.response.status_code = status
        r.response.write(f"status {status}")
        await r.response.close()

    running = serve(handler)
    response, body = request(running.port)
    assert response.status == status
    assert response.reason.lower() == reason.lower()
    assert body == f"status {status}".encode()
    with h2_client() as client:
        assert client.get(running.url()).status_code == status


def test_not_found_route(serve: Serve) -> None:
    async def handler(r: HttpRequest) -> None:
        if r.uri.path != "/exists":
            r.response.status_code = 404
            r.response.write("no such page")
        else:
            r.response.write("here")
        await r.response.close()

    running = serve(handler)
    with httpx.Client(timeout=TIMEOUT) as client:
        found = client.get(running.url("/exists"))
        missing = client.get(running.url("/missing"))
    assert (found.status_code, found.text) == (200, "here")
    assert (missing.status_code, missing.text) == (404, "no such page")


def test_status_code_204_has_no_body(serve: Serve) -> None:
    async def handler(r: HttpRequest) -> None:
        r.response.status_code = 204
        await r.response.close()

    running = serve(handler)
    conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=TIMEOUT)
    try:
        for _ in range(2):  # the connection stays in sync
            conn.request("GET", "/")
            response = conn.getresponse()
            assert response.status == 204
            assert response.read() == b""
    finally:
        conn.close()


def test_custom_reason_phrase(serve: Serve) -> None:
    async def handler(r: HttpRequest) -> None:
        r.response.status_code = 299
        r.response.reason_phrase = "Custom Reason"
        await r.response.close()

    running = serve(handler)
    response, _ = request(running.port)
    assert response.status == 299
    assert response.reason == "Custom Reason"


def test_invalid_status_code_is_refused(serve: Serve) -> None:
    errors: list[BaseException] = []

    async def handler(r: HttpRequest) -> None:
        for code in (99, 1000):
            try:
                r.response.status_code = code
            except ValueError as exc:
                errors.append(exc)
        await r.response.close()

    running = serve(handler)
    response, _ = request(running.port)
    assert response.status == 200
    assert len(errors) == 2


def test_response_custom_and_repeated_headers(serve: Serve) -> None:
    async def handler(r: HttpRequest) -> None:
        headers = r.response.headers
        headers.set("X-Custom", "custom value")
        headers.add("X-Multi", "one")
        headers.add("X-Multi", "two")
        headers.add("x-multi", "three")
        headers.content_type = ContentType.json
        r.response.write('{"ok":true}')
        await r.response.close()

    running = serve(handler)
    response, body = request(running.port)
    assert response.getheader("x-custom") == "custom value"
    assert response.msg.get_all("x-multi") == ["one", "two", "three"]
    assert response.getheader("content-type") == "application/json; charset=utf-8"
    assert json.loads(body) == {"ok": True}
    with h2_client() as client:
        h2 = client.get(running.url())
    assert h2.headers.get_list("x-multi") == ["one", "two", "three"]
    assert h2.headers["x-custom"] == "custom value"


def test_response_headers_are_locked_after_the_head_is_sent(serve: Serve) -> None:
    errors: list[BaseException] = []

    async def handler(r: HttpRequest) -> None:
        r.response.write("streamed")
        await r.response.flush()
        try:
            r.response.status_code = 500
        except Exception as exc:  # noqa: BLE001 - recorded and checked
            errors.append(exc)
        await r.response.close()

    running = serve(handler)
    response, body = request(running.port)
    assert response.status == 200
    assert body == b"streamed"
    assert len(errors) == 1


def test_response_cookies_become_set_cookie(serve: Serve) -> None:
    async def handler(r: HttpRequest) -> None:
        r.response.cookies.append(Cookie("session", "abc", path="/", http_only=True))
        r.response.cookies.append(Cookie("theme", "dark", max_age=60))
        await r.response.close()

    running = serve(handler)
    response, _ = request(running.port)
    assert response.msg.get_all("set-cookie") == ["session=abc; Path=/; HttpOnly", "theme=dark; Max-Age=60"]
    # The defaults are still there next to the cookies.
    assert response.getheader("x-content-type-options") == "nosniff"
    with httpx.Client(timeout=TIMEOUT) as client:
        client.get(running.url())
        assert client.cookies.get("session") == "abc"
        assert client.cookies.get("theme") == "dark"


def test_redirect(serve: Serve) -> None:
    async def handler(r: HttpRequest) -> None:
        if r.uri.path == "/old":
            await r.response.redirect("/new")
            return
        if r.uri.path == "/moved":
            await r.response.redirect("/new", status=301)
            return
        r.response.write(f"landed on {r.uri.path}")
        await r.response.close()

    running = serve(handler)
    response, _ = request(running.port, path="/old")
    assert response.status == 302
    assert response.getheader("location") == "/new"
    moved, _ = request(running.port, path="/moved")
    assert moved.status == 301
    assert moved.getheader("location") == "/new"
    with httpx.Client(timeout=TIMEOUT, follow_redirects=True) as client:
        followed = client.get(running.url("/old"))
    assert followed.status_code == 200
    assert followed.text == "landed on /new"
    assert followed.url.path == "/new"
    assert [r.status_code for r in followed.history] == [302]


ALL_BYTES = bytes(range(256))


def test_binary_bodies_both_ways(serve: Serve) -> None:
    async def handler(r: HttpRequest) -> None:
        body = await r.read()
        r.response.headers.content_type = ContentType.binary
        r.response.add(body[::-1])
        await r.response.close()

    running = serve(handler)
    payload = ALL_BYTES * 4
    response, body = request(running.port, "POST", body=payload)
    assert response.getheader("content-type") == "application/octet-stream"
    assert body == payload[::-1]
    with h2_client() as client:
        assert client.post(running.url(), content=payload).content == payload[::-1]


def test_large_body_upload(serve: Serve) -> None:
    async def handler(r: HttpRequest) -> None:
        digest = hashlib.sha256()
        size = 0
        async for chunk in r:
            digest.update(chunk)
            size += len(chunk)
        r.response.write(f"{size} {digest.hexdigest()}")
        await r.response.close()

    running = serve(handler)
    payload = random.Random(8).randbytes(8 * MiB)
    response, body = request(running.port, "POST", body=payload)
    assert response.status == 200
    assert body.decode() == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}"


def test_large_body_download(serve: Serve) -> None:
    payload = random.Random(9).randbytes(8 * MiB)

    async def handler(r: HttpRequest) -> None:
        r.response.add(payload)
        await r.response.close()

    running = serve(handler)
    response, body = request(running.port)
    assert response.getheader("content-length") == str(len(payload))
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(payload).hexdigest()
    with h2_client() as client:
        assert hashlib.sha256(client.get(running.url()).content).digest() == hashlib.sha256(payload).digest()


def test_large_streamed_download(serve: Serve) -> None:
    payload = random.Random(10).randbytes(8 * MiB)

    async def handler(r: HttpRequest) -> None:
        await r.response.flush()
        for start in range(0, len(payload), 64 * 1024):
            r.response.add(payload[start : start + 64 * 1024])
            await r.response.flush()
        await r.response.close()

    running = serve(handler)
    response, body = request(running.port)
    assert response.getheader("transfer-encoding") == "chunked"
    assert hashlib.sha256(body).digest() == hashlib.sha256(payload).digest()


async def _parts() -> AsyncIterator[bytes]:
    for i in range(5):
        yield f"part{i};".encode()
        await asyncio.sleep(0)


def test_add_stream_of_an_async_generator(serve: Serve) -> None:
    async def handler(r: HttpRequest) -> None:
        if r.uri.path == "/streamed":
            await r.response.flush()
        await r.response.add_stream(_parts())
        await r.response.close()

    running = serve(handler)
    expected = b"part0;part1;part2;part3;part4;"
    response, body = request(running.port, path="/buffered")
    assert body == expected
    assert response.getheader("content-length") == str(len(expected))
    response, body = request(running.port, path="/streamed")
    assert body == expected
    assert response.getheader("transfer-encoding") == "chunked"


def _gated_handler(release: asyncio.Event, *, buffered: bool) -> Callable[[HttpRequest], Awaitable[None]]:
    async def handler(r: HttpRequest) -> None:
        r.response.buffer_output = buffered
        r.response.write("first;")
        if buffered:
            await r.response.flush()
        await asyncio.wait_for(release.wait(), TIMEOUT)
        r.response.write("second;")
        r.response.write("third")
        await r.response.close()

    return handler


@pytest.mark.parametrize("buffered", [True, False], ids=["flush", "buffer_output-false"])
def test_streamed_output_reaches_the_client_before_close(
    serve: Serve, loop_thread: BackgroundLoop, buffered: bool
) -> None:
    """The first write arrives while the handler still waits (so it was
    really sent, chunked), then the rest follows."""
    release = asyncio.Event()
    running = serve(_gated_handler(release, buffered=buffered))
    conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()  # the head is here before the handler finished
        assert response.status == 200
        assert response.getheader("transfer-encoding") == "chunked"
        assert response.getheader("content-length") is None
        received = b""
        while len(received) < len(b"first;"):
            chunk = response.read1()
            assert chunk, "the stream ended early"
            received += chunk
        assert received == b"first;"
        loop_thread.loop.call_soon_threadsafe(release.set)
        assert response.read() == b"second;third"
    finally:
        conn.close()


def test_streamed_output_over_http2(serve: Serve, loop_thread: BackgroundLoop) -> None:
    release = asyncio.Event()
    running = serve(_gated_handler(release, buffered=True))
    with h2_client() as client, client.stream("GET", running.url()) as response:
        assert response.http_version == "HTTP/2"
        chunks = response.iter_bytes()
        received = b""
        while len(received) < len(b"first;"):
            received += next(chunks)
        assert received == b"first;"
        loop_thread.loop.call_soon_threadsafe(release.set)
        assert b"".join(chunks) == b"second;third"


def test_writeln_and_write_all(serve: Serve) -> None:
    async def handler(r: HttpRequest) -> None:
        r.response.writeln("line")
        r.response.write_all([1, 2, 3], separator=",")
        r.response.write(42)
        await r.response.close()

    _, body = request(serve(handler).port)
    assert body == b"line\n1,2,342"


def test_write_sends_bytes_like_objects_as_they_are(serve: Serve) -> None:
    async def handler(r: HttpRequest) -> None:
        r.response.headers.content_type = ContentType.text
        r.response.write(b"\x00bytes;")
        r.response.write(bytearray(b"bytearray;"))
        r.response.write(memoryview(b"memoryview;\xff"))
        r.response.write("str \u00e9")
        await r.response.close()

    _, body = request(serve(handler).port)
    assert body == b"\x00bytes;bytearray;memoryview;\xffstr \xc3\xa9"


# ---------------------------------------------------------------- server settings


def test_server_header(serve: Serve) -> None:
    running = serve(_ok)
    first, _ = request(running.port)
    assert first.getheader("server") is None
    running.server.server_header = "test-server/1.0"
    second, _ = request(running.port)
    assert second.getheader("server") == "test-server/1.0"
    with h2_client() as client:
        assert client.get(running.url()).headers["server"] == "test-server/1.0"


def test_connections_info_counts_an_open_keep_alive_connection(serve: Serve, loop_thread: BackgroundLoop) -> None:
    running = serve(_ok)
    info = lambda: on_loop(loop_thread, running.server.connections_info)  # noqa: E731
    assert info().total == 0
    first = http.client.HTTPConnection("127.0.0.1", running.port, timeout=TIMEOUT)
    second = http.client.HTTPConnection("127.0.0.1", running.port, timeout=TIMEOUT)
    try:
        for conn in (first, second):
            conn.request("GET", "/")
            assert conn.getresponse().read() == b"ok"
        # Both answered connections stay open, idle (bounded wait for the
        # native side to finish its bookkeeping).
        assert wait_for(lambda: tuple(info()) == (2, 0, 2, 0)), info()
    finally:
        first.close()
        second.close()
    assert wait_for(lambda: info().total == 0), info()


def test_idle_timeout_closes_an_idle_keep_alive_connection(serve: Serve) -> None:
    running = serve(_ok)
    assert running.server.idle_timeout == 120.0
    running.server.idle_timeout = 0.5
    assert running.server.idle_timeout == 0.5
    with socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.read() == b"ok"
        assert not response.will_close
        sock.settimeout(5)  # bound only: the server must close well before
        try:
            data = sock.recv(1)
        except ConnectionResetError:
            data = b""
        assert data == b""


def test_idle_timeout_none(serve: Serve) -> None:
    running = serve(_ok)
    running.server.idle_timeout = None
    assert running.server.idle_timeout is None


def test_auto_compress_gzips_when_accepted(serve: Serve) -> None:
    text = "compress me please " * 1000

    async def handler(r: HttpRequest) -> None:
        r.response.write(text)
        await r.response.close()

    running = serve(handler, auto_compress=True)
    assert running.server.auto_compress is True
    response, body = request(running.port, headers={"Accept-Encoding": "gzip"})
    assert response.getheader("content-encoding") == "gzip"
    assert len(body) < len(text)
    assert gzip.decompress(body) == text.encode()
    plain, plain_body = request(running.port, headers={"Accept-Encoding": "identity"})
    assert plain.getheader("content-encoding") is None
    assert plain_body == text.encode()
    none, none_body = request(running.port)
    assert none.getheader("content-encoding") is None
    assert none_body == text.encode()
    with httpx.Client(timeout=TIMEOUT) as client:  # httpx sends gzip and decodes
        decoded = client.get(running.url())
    assert decoded.headers["content-encoding"] == "gzip"
    assert decoded.text == text


def test_no_compression_by_default(serve: Serve) -> None:
    text = "not compressed " * 1000

    async def handler(r: HttpRequest) -> None:
        r.response.write(text)
        await r.response.close()

    running = serve(handler)
    assert running.server.auto_compress is False
    response, body = request(running.port, headers={"Accept-Encoding": "gzip"})
    assert response.getheader("content-encoding") is None
    assert body == text.encode()


def test_handler_exception_gives_500_and_the_server_goes_on(serve: Serve) -> None:
    async def handler(r: HttpRequest) -> None:
        if r.uri.path == "/boom":
            raise RuntimeError("handler failure")
        r.response.write("fine")
        await r.response.close()

    running = serve(handler)
    conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/boom")
        failed = conn.getresponse()
        failed.read()
        assert failed.status == 500
        if failed.will_close:
            conn.close()
        conn.request("GET", "/after")
        after = conn.getresponse()
        assert after.status == 200
        assert after.read() == b"fine"
    finally:
        conn.close()
    with h2_client() as client:
        assert client.get(running.url("/boom")).status_code == 500
        assert client.get(running.url("/after")).text == "fine"


def test_handler_exception_after_the_head_cuts_the_response(serve: Serve) -> None:
    async def handler(r: HttpRequest) -> None:
        if r.uri.path == "/boom":
            r.response.write("partial")
            await r.response.flush()
            raise RuntimeError("handler failure mid-stream")
        r.response.write("fine")
        await r.response.close()

    running = serve(handler)
    conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/boom")
        # The client sees an error, never a short success: the connection
        # drops, or a chunked body stops without its last chunk.
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            response = conn.getresponse()
            assert response.status == 200
            response.read()
    finally:
        conn.close()
    assert request(running.port, path="/after")[1] == b"fine"


def test_flushed_output_reaches_the_client_before_a_failure_cuts_it(serve: Serve) -> None:
    """What a handler flushed before failing is delivered; then the body is
    cut. Repeated, since losing it is a race."""

    async def handler(r: HttpRequest) -> None:
        r.response.write("partial")
        await r.response.flush()
        raise RuntimeError("handler failure mid-stream")

    running = serve(handler)
    for _ in range(20):
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=TIMEOUT)
        try:
            conn.request("GET", "/boom")
            response = conn.getresponse()
            assert response.status == 200
            with pytest.raises(http.client.IncompleteRead) as cut:
                response.read()
            assert cut.value.partial == b"partial"
        finally:
            conn.close()


def test_handler_returning_without_close_is_closed_for_it(serve: Serve) -> None:
    async def handler(r: HttpRequest) -> None:
        r.response.write("not closed by the handler")

    response, body = request(serve(handler).port)
    assert response.status == 200
    assert body == b"not closed by the handler"


# ---------------------------------------------------------------- concurrency


def test_one_hundred_concurrent_clients(serve: Serve) -> None:
    state = {"in_flight": 0, "peak": 0}

    async def handler(r: HttpRequest) -> None:
        state["in_flight"] += 1
        state["peak"] = max(state["peak"], state["in_flight"])
        try:
            await asyncio.sleep(0.05)
            r.response.write(f"answer {r.uri.query_parameters['i']}")
        finally:
            state["in_flight"] -= 1
        await r.response.close()

    running = serve(handler)

    async def clients() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            return await asyncio.gather(*(client.get(running.url(f"/?i={i}")) for i in range(100)))

    responses = asyncio.run(clients())
    assert [r.status_code for r in responses] == [200] * 100
    assert [r.text for r in responses] == [f"answer {i}" for i in range(100)]
    assert state["peak"] > 1  # the handlers really overlapped
    assert state["in_flight"] == 0


def test_one_hundred_threads(serve: Serve) -> None:
    async def handler(r: HttpRequest) -> None:
        body = await r.read()
        r.response.add(body.upper())
        await r.response.close()

    running = serve(handler)

    def one(i: int) -> bytes:
        return request(running.port, "POST", body=f"client {i}".encode())[1]

    with concurrent.futures.ThreadPoolExecutor(100) as pool:
        results = list(pool.map(one, range(100)))
    assert results == [f"CLIENT {i}".encode() for i in range(100)]


def test_one_hundred_concurrent_http2_streams_on_one_connection(serve: Serve) -> None:
    ports: set[int] = set()

    async def handler(r: HttpRequest) -> None:
        ports.add(r.connection_info.remote_port)
        await asyncio.sleep(0.02)
        r.response.write(r.uri.query)
        await r.response.close()

    running = serve(handler)

    async def clients() -> list[httpx.Response]:
        async with httpx.AsyncClient(http1=False, http2=True, timeout=30) as client:
            return await asyncio.gather(*(client.get(running.url(f"/?n={i}")) for i in range(100)))

    responses = asyncio.run(clients())
    assert [r.text for r in responses] == [f"n={i}" for i in range(100)]
    assert {r.http_version for r in responses} == {"HTTP/2"}
    assert len(ports) == 1


# ---------------------------------------------------------------- HTTP/2 with curl


@requires_curl
def test_curl_http2_prior_knowledge(serve: Serve) -> None:
    recorder = Recorder(lambda r: r.protocol_version, body=b"from h2")
    running = serve(recorder)
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--http2-prior-knowledge",
            "-o",
            "-",
            "-w",
            "\n%{http_version}",
            "--max-time",
            "10",
            running.url(),
        ],
        capture_output=True,
        timeout=20,
        check=True,
    )
    body, version = result.stdout.rsplit(b"\n", 1)
    assert body == b"from h2"
    assert version == b"2"
    assert recorder.seen == ["2"]


@requires_curl
def test_curl_http2_prior_knowledge_refused_when_http2_is_off(serve: Serve) -> None:
    recorder = Recorder(lambda r: r.protocol_version)
    running = serve(recorder, http2=False)
    result = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "--max-time", "10", running.url()],
        capture_output=True,
        timeout=20,
    )
    assert result.returncode != 0
    assert recorder.seen == []
    # HTTP/1.1 still works.
    response, body = request(running.port)
    assert body == b"ok"
    assert recorder.seen == ["1.1"]


# ---------------------------------------------------------------- addresses


def test_address_port_and_addresses(serve: Serve) -> None:
    running = serve(_ok, "127.0.0.1")
    server = running.server
    assert 0 < server.port < 65536
    assert server.address == "127.0.0.1"
    assert server.addresses == [("127.0.0.1", server.port)]
    assert request(server.port)[1] == b"ok"


def test_explicit_port(serve: Serve) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    try:
        running = serve(_ok, "127.0.0.1", port)
    except OSError:
        pytest.skip("the probed port was taken meanwhile")
    assert running.port == port
    assert request(port)[1] == b"ok"


def test_localhost_binds_every_loopback_on_one_port(serve: Serve) -> None:
    recorder = Recorder(lambda r: r.connection_info.remote_address)
    running = serve(recorder, "localhost")
    port = running.port
    expected = [("127.0.0.1", port)] + ([("::1", port)] if ipv6_available() else [])
    assert sorted(running.server.addresses) == sorted(expected)
    assert request(port, host="127.0.0.1")[1] == b"ok"
    if ipv6_available():
        assert request(port, host="::1")[1] == b"ok"
    assert set(recorder.seen) == {host for host, _ in expected}


def test_port_zero_is_one_port_on_every_interface(serve: Serve) -> None:
    for _ in range(5):
        running = serve(_ok, "localhost", 0)
        ports = {port for _, port in running.server.addresses}
        assert ports == {running.port}
        assert len(running.server.addresses) == (2 if ipv6_available() else 1)
        for host, _ in running.server.addresses:
            assert request(running.port, host=host)[1] == b"ok"


def test_loopback_constructor(loop_thread: BackgroundLoop) -> None:
    async def scenario() -> tuple[list[tuple[str, int]], int]:
        server = await NativeHttpServer.loopback(0, http3=False)
        try:
            server.serve(_ok)
            return server.addresses, server.port
        finally:
            await server.close()

    addresses, port = loop_thread.run(scenario())
    assert ("127.0.0.1", port) in addresses
    assert all(p == port for _, p in addresses)


def test_any_answers_on_loopback(serve: Serve) -> None:
    recorder = Recorder(lambda r: r.connection_info.remote_address)
    running = serve(recorder, "any")
    port = running.port
    assert all(p == port for _, p in running.server.addresses)
    assert request(port, host="127.0.0.1")[1] == b"ok"
    if ipv6_available():
        assert request(port, host="::1")[1] == b"ok"
        assert running.server.addresses == [("::", port)]
        assert recorder.seen[1] == "::1"
    else:
        assert running.server.addresses == [("0.0.0.0", port)]
    # An IPv4 client on a dual-stack socket: plain or IPv4-mapped form.
    assert recorder.seen[0] in ("127.0.0.1", "::ffff:127.0.0.1")


@requires_ipv6
def test_any_with_v6_only_binds_both_families_on_one_port(serve: Serve) -> None:
    running = serve(_ok, "any", v6_only=True)
    port = running.port
    assert sorted(running.server.addresses) == sorted([("::", port), ("0.0.0.0", port)])
    assert request(port, host="127.0.0.1")[1] == b"ok"
    assert request(port, host="::1")[1] == b"ok"


def test_invalid_port_is_refused(loop_thread: BackgroundLoop) -> None:
    with pytest.raises(ValueError):
        loop_thread.run(NativeHttpServer.bind("127.0.0.1", 70000))


# ---------------------------------------------------------------- closing


def test_async_context_manager_closes(loop_thread: BackgroundLoop) -> None:
    async def scenario() -> tuple[int, int, str]:
        async with await NativeHttpServer.bind("127.0.0.1", 0, http3=False) as server:
            server.serve(_ok)
            port = server.port
            async with httpx.AsyncClient(timeout=TIMEOUT) as client:
                response = await client.get(f"http://127.0.0.1:{port}/")
        return port, response.status_code, response.text

    port, status, text = loop_thread.run(scenario())
    assert (status, text) == (200, "ok")
    assert refused(port)


def test_close_then_connect_fails(serve: Serve) -> None:
    running = serve(_ok)
    assert request(running.port)[1] == b"ok"
    running.close()
    assert refused(running.port)
    running.close()  # closing twice is harmless


def test_close_drains_an_in_flight_request(serve: Serve) -> None:
    started = threading.Event()

    async def handler(r: HttpRequest) -> None:
        started.set()
        await asyncio.sleep(0.5)
        r.response.write("finished")
        await r.response.close()

    running = serve(handler)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(request, running.port)
        assert started.wait(TIMEOUT)
        running.close()
        response, body = pending.result(TIMEOUT)
    assert response.status == 200
    assert body == b"finished"
    assert refused(running.port)


def test_close_force_aborts_an_in_flight_request(serve: Serve, loop_thread: BackgroundLoop) -> None:
    started = threading.Event()
    finished = threading.Event()
    release = asyncio.Event()

    async def handler(r: HttpRequest) -> None:
        started.set()
        try:
            await asyncio.wait_for(release.wait(), 30)
            r.response.write("too late")
            await r.response.close()
        finally:
            finished.set()

    running = serve(handler)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(request, running.port)
        assert started.wait(TIMEOUT)
        running.close(force=True)  # cancels the handler: no task outlives the server
        assert finished.is_set()
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            pending.result(TIMEOUT)
    assert refused(running.port)
    assert not release.is_set()
