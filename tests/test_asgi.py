"""ASGI 3 on server_native with real frameworks (Starlette, FastAPI) and raw
ASGI apps, driven by real clients (httpx; raw sockets where a client has to
misbehave): routing, query strings, bodies, forms and uploads, streaming,
FileResponse over ``http.response.pathsend``, cookies, errors, lifespan,
``root_path``, HTTP/2, TLS, and ``http.disconnect``.

Servers run ``serve_asgi`` on a background loop (``apps.harness``); every
wait is bounded and everything is on loopback."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import os
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from apps import fastapi_app, starlette_app
from apps.harness import (
    TIMEOUT,
    BackgroundLoop,
    Running,
    free_port,
    plain_tracebacks,
    refused,
    serving,
    start,
    uvicorn_process,
    wait_for,
)

from server_native import ClientDisconnected
from server_native.interfaces.asgi import LifespanFailure, serve_asgi
from server_native.runtime.bound import tls_settings

try:
    from .conftest import Certificates, LogLines
except ImportError:  # tests/ run as a plain directory
    from conftest import Certificates, LogLines  # type: ignore[no-redef]

MiB = 1024 * 1024


def client(**options: Any) -> httpx.Client:
    options.setdefault("timeout", TIMEOUT)
    return httpx.Client(**options)


@pytest.fixture(scope="module", autouse=True)
def _plain_tracebacks() -> Iterator[None]:
    with plain_tracebacks():
        yield


@pytest.fixture(
    scope="module",
    params=[pytest.param(True, id="native"), pytest.param(False, id="bridge")],
)
def star(request: pytest.FixtureRequest) -> Iterator[Running]:
    """The Starlette app, one server per transport for the module: every
    test using it runs in-process (native_callback=True) and over the socket
    bridge (native_callback=False): both transports must pass the same
    suite."""
    with serving(serve_asgi, starlette_app.app, native_callback=request.param) as running:
        yield running


@pytest.fixture(scope="module")
def fast() -> Iterator[Running]:
    """The FastAPI app, one server for the module."""
    with serving(serve_asgi, fastapi_app.app) as running:
        yield running


# ================================================================ Starlette


def test_routing_and_typed_path_params(star: Running) -> None:
    with client() as c:
        assert c.get(star.url("/")).text == "home"
        assert c.get(star.url("/items/42")).json() == {"item_id": 42, "type": "int"}
        assert c.get(star.url("/items/not-a-number")).status_code == 404
        assert c.get(star.url("/users/bob/files/a/b/c.txt")).json() == {"user": "bob", "rest": "a/b/c.txt"}
        assert c.get(star.url("/named")).text == star.url("/items/7")


def test_percent_encoded_utf8_path_is_decoded_and_raw_path_kept(star: Running) -> None:
    with client() as c:
        response = c.get(star.url("/users/j%C3%B6rg/files/caf%C3%A9%20menu.txt"))
    assert response.status_code == 200
    assert response.json() == {"user": "jörg", "rest": "café menu.txt"}
    with client() as c:
        raw = c.get(star.url("/raw/caf%C3%A9/a%2Fb%20c")).json()
    # scope["path"]: percent-decoded and UTF-8 decoded; raw_path: the bytes as sent.
    assert raw == {"path": "/raw/café/a/b c", "raw_path": "/raw/caf%C3%A9/a%2Fb%20c", "rest": "café/a/b c"}


def test_path_with_stray_percent_signs_and_bad_utf8(star: Running) -> None:
    """Escapes that are not two hex digits stay as sent, and bytes that are
    not UTF-8 become U+FFFD, as ``urllib.parse.unquote`` does; raw_path and a
    latin-1 header value are the bytes as sent."""
    with socket.create_connection(("127.0.0.1", star.port), timeout=10) as sock:
        sock.sendall(b"GET /raw/a%zz/%41%4/%C3x HTTP/1.1\r\nHost: x\r\nX-Latin: caf\xe9\r\nConnection: close\r\n\r\n")
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert json.loads(body) == {
        "path": "/raw/a%zz/A%4/\ufffdx",
        "raw_path": "/raw/a%zz/%41%4/%C3x",
        "rest": "a%zz/A%4/\ufffdx",
    }


def test_query_string_percent_encoded_and_utf8(star: Running) -> None:
    raw = "name=caf%C3%A9&x=a+b&x=%26%3D&emoji=%F0%9F%8D%95&empty="
    with client() as c:
        data = c.get(star.url("/scope?" + raw)).json()
    assert data["query_string"] == raw  # scope["query_string"] is the bytes as sent
    assert data["query"] == [["name", "café"], ["x", "a b"], ["x", "&="], ["emoji", "🍕"], ["empty", ""]]
    assert data["path"] == "/scope"


def test_http_scope_fields(star: Running) -> None:
    with client() as c:
        response = c.get(star.url("/scope"), headers=[("X-Multi", "one"), ("X-Multi", "two")])
    data = response.json()
    assert data["http_version"] == "1.1"
    assert data["method"] == "GET"
    assert data["scheme"] == "http"
    assert data["root_path"] == ""
    assert data["raw_path"] == "/scope"
    assert data["asgi"]["version"] == "3.0"
    assert data["client"][0] == "127.0.0.1" and 0 < data["client"][1] < 65536
    assert data["server"] == ["127.0.0.1", star.port]
    assert "http.response.pathsend" in data["extensions"]
    assert data["tls"] is None  # no TLS extension on plaintext
    names = [name for name, _ in data["headers"]]
    assert all(name == name.lower() for name in names)  # ASGI: header names lowercased
    assert [v for k, v in data["headers"] if k == "x-multi"] == ["one", "two"]  # repeats kept, in order
    assert ("host", f"127.0.0.1:{star.port}") in [tuple(h) for h in data["headers"]]


def test_methods_and_405(star: Running) -> None:
    with client() as c:
        for method in ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            assert c.request(method, star.url("/scope")).json()["method"] == method
        not_allowed = c.request("PUT", star.url("/json"))
    assert not_allowed.status_code == 405
    assert not_allowed.headers["allow"] == "POST"


def test_head_has_headers_and_no_body(star: Running) -> None:
    with client() as c:
        get = c.get(star.url("/"))
        head = c.head(star.url("/"))
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == get.headers["content-length"] == "4"


def test_json_body(star: Running) -> None:
    payload = {"name": "Zoë", "values": list(range(100)), "nested": {"ok": True, "none": None}}
    with client() as c:
        response = c.post(star.url("/json"), json=payload)
    assert response.status_code == 200
    assert response.json() == {"received": payload, "content_type": "application/json"}


def test_urlencoded_form(star: Running) -> None:
    with client() as c:
        response = c.post(star.url("/form"), data={"a": ["1", "2"], "name": "Zoë & co"})
    assert response.json() == {"a": ["1", "2"], "name": ["Zoë & co"]}


def test_multipart_upload_with_fields_and_files(star: Running) -> None:
    big = os.urandom(4 * MiB + 7)
    small = b"hello,world\n" * 10
    with client() as c:
        response = c.post(
            star.url("/form"),
            data={"title": "two files"},
            files=[("doc", ("big.bin", big, "application/octet-stream")), ("doc", ("small.csv", small, "text/csv"))],
        )
    assert response.status_code == 200, response.text
    assert response.json() == {
        "title": ["two files"],
        "doc": [
            {
                "filename": "big.bin",
                "content_type": "application/octet-stream",
                "size": len(big),
                "sha256": hashlib.sha256(big).hexdigest(),
            },
            {
                "filename": "small.csv",
                "content_type": "text/csv",
                "size": len(small),
                "sha256": hashlib.sha256(small).hexdigest(),
            },
        ],
    }


def test_large_body_4mib_with_content_length(star: Running) -> None:
    body = os.urandom(4 * MiB + 1)
    with client() as c:
        response = c.post(star.url("/upload"), content=body)
    data = response.json()
    assert (data["size"], data["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
    assert data["chunks"] > 1  # streamed to the app in parts (more_body), not one 4 MiB message


def test_large_body_chunked_transfer_encoding(star: Running) -> None:
    pieces = [os.urandom(256 * 1024 + i) for i in range(17)]

    def gen() -> Iterator[bytes]:
        yield from pieces

    with client() as c:
        response = c.put(star.url("/upload"), content=gen())  # no length: chunked
    whole = b"".join(pieces)
    assert response.json()["size"] == len(whole)
    assert response.json()["sha256"] == hashlib.sha256(whole).hexdigest()


def test_streaming_response_chunks_arrive_before_the_generator_finishes(star: Running) -> None:
    name = f"s{time.monotonic_ns()}"
    received: list[bytes] = []
    with client() as c, c.stream("GET", star.url(f"/stream?count=4&gate={name}")) as response:
        assert response.status_code == 200
        assert response.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in response.headers
        buffer = b""
        expected = [f"chunk-{i};".encode() for i in range(4)]
        chunks = response.iter_raw()
        for index, want in enumerate(expected):
            while len(buffer) < len(want):
                buffer += next(chunks)
            # The generator is parked on the gate for this chunk: the bytes
            # came while it was still running.
            assert buffer[: len(want)] == want
            assert not starlette_app.gate(f"{name}-{index}").is_set()
            received.append(buffer[: len(want)])
            buffer = buffer[len(want) :]
            starlette_app.gate(f"{name}-{index}").set()
        buffer += b"".join(chunks)
    assert buffer == b""
    assert received == expected


def test_streaming_response_many_chunks(star: Running) -> None:
    with client() as c:
        response = c.get(star.url("/stream?count=500"))
    assert response.text == "".join(f"chunk-{i};" for i in range(500))


def test_file_response_goes_through_pathsend(star: Running, data_file: tuple[Path, bytes]) -> None:
    path, data = data_file
    trace = f"file-{time.monotonic_ns()}"
    with client() as c:
        response = c.get(star.url("/file"), params={"path": str(path), "prestat": "1"}, headers={"x-trace": trace})
        extensions = c.get(star.url("/scope")).json()["extensions"]
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["content-length"] == str(len(data))
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-disposition"] == 'attachment; filename="data.bin"'
    assert "etag" in response.headers and "last-modified" in response.headers
    assert "http.response.pathsend" in extensions
    assert starlette_app.SENT[trace] == ["http.response.start", "http.response.pathsend"]


def test_file_response_head(star: Running, data_file: tuple[Path, bytes]) -> None:
    path, data = data_file
    params = {"path": str(path), "prestat": "1"}
    with client() as c:
        head = c.head(star.url("/file"), params=params)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(data))


def test_file_response_range(star: Running, data_file: tuple[Path, bytes]) -> None:
    path, data = data_file
    with client() as c:
        # A single range is not sent with pathsend: Starlette opens the file with anyio.
        ranged = c.get(
            star.url("/file"), params={"path": str(path), "prestat": "1"}, headers={"range": "bytes=100-1099"}
        )
    assert ranged.status_code == 206
    assert ranged.content == data[100:1100]
    assert ranged.headers["content-range"] == f"bytes 100-1099/{len(data)}"


def test_cookies_set_and_sent_back(star: Running) -> None:
    with client() as c:
        response = c.get(star.url("/cookies/set"))
        set_cookies = response.headers.get_list("set-cookie")
        assert len(set_cookies) == 2  # two headers, not folded into one
        assert any(v.startswith("session=abc123;") and "HttpOnly" in v and "SameSite=lax" in v for v in set_cookies)
        assert any(v.startswith("theme=dark;") and "Max-Age=3600" in v for v in set_cookies)
        echoed = c.get(star.url("/cookies/get")).json()
    assert echoed == {"session": "abc123", "theme": "dark"}


def test_http_exception_and_404(star: Running) -> None:
    with client() as c:
        teapot = c.get(star.url("/teapot"))
        missing = c.get(star.url("/no/such/route"))
    assert teapot.status_code == 418
    assert teapot.text == "I'm a teapot"
    assert teapot.headers["x-reason"] == "short and stout"
    assert missing.status_code == 404
    assert missing.text == "Not Found"


def test_redirect(star: Running) -> None:
    with client() as c:
        response = c.get(star.url("/redirect"))
        followed = c.get(star.url("/redirect"), follow_redirects=True)
    assert response.status_code == 303
    assert response.headers["location"] == star.url("/")
    assert followed.text == "home"


def test_unhandled_exception_gives_500_and_the_server_keeps_serving(star: Running) -> None:
    with client() as c:
        for _ in range(3):
            failed = c.get(star.url("/boom"))
            assert failed.status_code == 500
            assert failed.text == "Internal Server Error"
            assert c.get(star.url("/")).text == "home"  # same keep-alive connection
    with client() as fresh:
        assert fresh.get(star.url("/items/1")).json()["item_id"] == 1


def test_lifespan_state_is_visible_to_requests(star: Running) -> None:
    with client() as c:
        first = c.get(star.url("/state")).json()
        second = c.get(star.url("/state")).json()
    assert first["greeting"] == second["greeting"] == "hello from lifespan"
    # Shallow copy per request (ASGI): the objects in the state are shared.
    assert second["counter"] == first["counter"] + 1


def test_keep_alive_and_concurrent_clients(star: Running) -> None:
    def worker(index: int) -> list[int]:
        with client() as c:
            return [c.get(star.url(f"/items/{index * 100 + j}")).json()["item_id"] for j in range(20)]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(worker, range(8)))
    assert results == [[i * 100 + j for j in range(20)] for i in range(8)]


# ---------------------------------------------------------------- apps need a Task


async def task_probe(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reports what an app sees of asyncio on its first step."""
    if scope["type"] != "http":
        return
    report: dict[str, Any] = {"task": asyncio.current_task() is not None}
    try:
        import sniffio

        report["sniffio"] = sniffio.current_async_library()
    except Exception as exc:  # noqa: BLE001 - reported
        report["sniffio"] = type(exc).__name__
    if sys.version_info >= (3, 11):  # asyncio.timeout is new in 3.11
        try:
            async with asyncio.timeout(TIMEOUT):
                pass
            report["timeout"] = "ok"
        except RuntimeError as exc:
            report["timeout"] = str(exc)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(report).encode()})


def starlette_with_base_http_middleware() -> Any:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    class AddHeader(BaseHTTPMiddleware):
        async def dispatch(self, request: Any, call_next: Any) -> Any:
            response = await call_next(request)
            response.headers["x-middleware"] = "ran"
            return response

    async def home(request: Any) -> Any:
        return PlainTextResponse("through middleware")

    return Starlette(routes=[Route("/", home)], middleware=[Middleware(AddHeader)])


def test_raw_app_first_step_runs_in_an_asyncio_task(loop_thread: BackgroundLoop) -> None:
    running = start(loop_thread, serve_asgi, task_probe, lifespan="off")
    try:
        with client() as c:
            report = c.get(running.url("/")).json()
    finally:
        running.stop()
    expected = {"task": True, "sniffio": "asyncio", "timeout": "ok"}
    if sys.version_info < (3, 11):
        del expected["timeout"]
    assert report == expected


def test_starlette_sync_endpoint(star: Running) -> None:
    with client() as c:
        response = c.get(star.url("/sync"))
    assert (response.status_code, response.text) == (200, "sync in True")


def test_starlette_file_response_without_prestat(star: Running, data_file: tuple[Path, bytes]) -> None:
    path, data = data_file
    with client() as c:
        response = c.get(star.url("/file"), params={"path": str(path)})
    assert response.status_code == 200
    assert response.content == data


def test_starlette_base_http_middleware(loop_thread: BackgroundLoop) -> None:
    running = start(loop_thread, serve_asgi, starlette_with_base_http_middleware())
    try:
        with client() as c:
            response = c.get(running.url("/"))
    finally:
        running.stop()
    assert response.status_code == 200
    assert response.headers["x-middleware"] == "ran"
    assert response.text == "through middleware"


def test_fastapi_file_response(fast: Running, data_file: tuple[Path, bytes]) -> None:
    path, data = data_file
    with client() as c:
        response = c.get(fast.url("/file"), params={"path": str(path)})
    assert response.status_code == 200
    assert response.content == data


def test_fastapi_sync_endpoint_and_dependency(fast: Running) -> None:
    with client() as c:
        alice = c.get(fast.url("/sync/users/alice"))
        nobody = c.get(fast.url("/sync/users/nobody"))
    assert alice.status_code == 200 and alice.json() == {"name": "Alice", "age": 30}
    assert nobody.status_code == 404


# ---------------------------------------------------------------- backpressure


class Firehose:
    """Streams up to ``total`` bytes as fast as send() lets it."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.sent = 0
        self.done = threading.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        chunk = b"x" * 65536
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-length", str(self.total).encode())],
                }
            )
            while self.sent < self.total:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                self.sent += len(chunk)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.done.set()


def stalled(read: Any, timeout: float = TIMEOUT) -> int:
    """Waits (bounded) until ``read()`` stops growing for 0.3 s; returns it."""
    deadline = time.monotonic() + timeout
    last, since = read(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = read()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > 0.3:
            break
    return last


def test_streaming_send_waits_for_a_slow_client(loop_thread: BackgroundLoop) -> None:
    """ASGI backpressure: while the client reads nothing, send() blocks once
    the buffers are full, instead of queueing the whole response in memory."""
    total = 256 * MiB
    app = Firehose(total)
    running = start(loop_thread, serve_asgi, app, lifespan="off")
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            buffered = stalled(lambda: app.sent)
            assert not app.done.is_set()
            assert buffered < 32 * MiB, f"{buffered} bytes accepted from the app while the client read nothing"
            # Reading lets it go on.
            received = 0
            while received < 8 * MiB:
                data = sock.recv(1 << 20)
                assert data
                received += len(data)
            wait_for(lambda: app.sent > buffered, what="send() to resume once the client reads")
    finally:
        running.stop()


# ---------------------------------------------------------------- HTTP/2


def test_http2_prior_knowledge(star: Running) -> None:
    body = os.urandom(4 * MiB)
    with client(http1=False, http2=True) as c:
        scope = c.get(star.url("/scope?via=h2"))
        upload = c.post(star.url("/upload"), content=body)
        streamed = c.get(star.url("/stream?count=50"))
    assert scope.http_version == "HTTP/2"
    data = scope.json()
    assert data["http_version"] == "2"
    assert data["query"] == [["via", "h2"]]
    assert not any(name.startswith(":") for name, _ in data["headers"])  # no pseudo-headers
    assert upload.json()["sha256"] == hashlib.sha256(body).hexdigest()
    assert streamed.text == "".join(f"chunk-{i};" for i in range(50))


def test_http2_authority_becomes_the_host_header(star: Running) -> None:
    with client(http1=False, http2=True) as c:
        response = c.get(star.url("/scope"), headers={"x-after": "1"})
    assert response.http_version == "HTTP/2"
    headers = [tuple(h) for h in response.json()["headers"]]
    assert headers[0] == ("host", f"127.0.0.1:{star.port}")


def test_http2_concurrent_streams_on_one_connection(star: Running) -> None:
    """40 requests in flight at once on one connection, from one event loop.
    (Shared by ten threads, httpx's sync HTTP/2 connection, which its authors
    call not robust (encode/httpx#3324), drew a PROTOCOL_ERROR GOAWAY about
    once in five runs on a loaded machine; h2load's 64 x 10 streams in the
    benchmark never draw one.)"""

    async def concurrently() -> list[httpx.Response]:
        async with httpx.AsyncClient(http1=False, http2=True, timeout=TIMEOUT) as c:
            return await asyncio.gather(*(c.get(star.url(f"/items/{i}")) for i in range(40)))

    responses = asyncio.run(concurrently())
    assert [r.json()["item_id"] for r in responses] == list(range(40))
    assert {r.http_version for r in responses} == {"HTTP/2"}


# ---------------------------------------------------------------- root_path


def test_root_path(loop_thread: BackgroundLoop) -> None:
    running = start(loop_thread, serve_asgi, starlette_app.app, root_path="/api")
    try:
        with client() as c:
            data = c.get(running.url("/scope")).json()
            named = c.get(running.url("/named")).text
            inner = c.get(running.url("/sub/inner")).text
            redirect = c.get(running.url("/redirect"))
    finally:
        running.stop()
    # As uvicorn --root-path: scope["path"] includes root_path, raw_path does not.
    assert data["root_path"] == "/api"
    assert data["path"] == "/api/scope"
    assert data["raw_path"] == "/scope"
    assert data["url"] == running.url("/api/scope")
    assert named == running.url("/api/items/7")
    assert inner == "inner root_path=/api/sub"
    assert redirect.headers["location"] == running.url("/api/")


# ---------------------------------------------------------------- TLS


def test_tls_scope_scheme_and_extension(loop_thread: BackgroundLoop, certs: Certificates) -> None:
    tls = tls_settings(certificate_path=certs.cert_path, key_path=certs.key_path)
    running = start(loop_thread, serve_asgi, starlette_app.app, tls=tls)
    try:
        with client(verify=ssl.create_default_context(cafile=str(certs.ca_path))) as c:
            h1 = c.get(running.url("/scope")).json()
        with client(verify=ssl.create_default_context(cafile=str(certs.ca_path)), http2=True) as c:
            h2 = c.get(running.url("/scope"))
    finally:
        running.stop()
    assert running.url().startswith("https://")
    assert h1["scheme"] == "https"
    assert h1["url"].startswith("https://")
    assert "tls" in h1["extensions"] and "http.response.pathsend" in h1["extensions"]
    tls_ext = h1["tls"]
    assert set(tls_ext) >= {
        "server_cert",
        "client_cert_chain",
        "client_cert_name",
        "client_cert_error",
        "tls_version",
        "cipher_suite",
    }
    assert list(tls_ext["client_cert_chain"]) == []  # no client certificate was sent
    assert h2.http_version == "HTTP/2"  # ALPN
    assert h2.json()["http_version"] == "2" and h2.json()["scheme"] == "https"


def test_tls_client_certificate_in_extension(loop_thread: BackgroundLoop, certs: Certificates) -> None:
    tls = tls_settings(
        certificate_path=certs.cert_path,
        key_path=certs.key_path,
        request_client_certificate=True,
        client_ca_path=certs.client_ca_path,
    )
    running = start(loop_thread, serve_asgi, starlette_app.app, tls=tls)
    try:
        context = ssl.create_default_context(cafile=str(certs.ca_path))
        context.load_cert_chain(str(certs.client_cert_path), str(certs.client_key_path))
        with client(verify=context) as c:
            data = c.get(running.url("/scope")).json()
    finally:
        running.stop()
    chain = data["tls"]["client_cert_chain"]
    assert len(chain) >= 1
    assert chain[0].startswith("-----BEGIN CERTIFICATE-----")
    assert ssl.PEM_cert_to_DER_cert(chain[0]) == ssl.PEM_cert_to_DER_cert(certs.client_cert_path.read_text())


# ---------------------------------------------------------------- lifespan


class RawLifespanApp:
    """A raw ASGI app whose lifespan can fail at startup or be unsupported."""

    def __init__(
        self, *, fail_startup: bool = False, unsupported: bool = False, startup_gate: threading.Event | None = None
    ) -> None:
        self.fail_startup = fail_startup
        self.unsupported = unsupported
        self.startup_gate = startup_gate
        self.events: list[str] = []
        self.requests = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            if self.unsupported:
                raise RuntimeError("lifespan not supported by this app")
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.events.append("startup")
                    if self.startup_gate is not None:
                        await asyncio.get_running_loop().run_in_executor(None, self.startup_gate.wait, TIMEOUT)
                    if self.fail_startup:
                        await send({"type": "lifespan.startup.failed", "message": "database unreachable"})
                        return
                    scope["state"]["ready"] = "yes"
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    self.events.append("shutdown")
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        self.requests += 1
        body = json.dumps({"state": dict(scope.get("state") or {})}).encode()
        if scope.get("state") is not None:
            scope["state"]["written-by-a-request"] = True  # must not leak into the next request's copy
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


def test_starlette_lifespan_startup_and_shutdown_run(loop_thread: BackgroundLoop) -> None:
    starlette_app.LIFESPAN_EVENTS.clear()
    running = start(loop_thread, serve_asgi, starlette_app.app)
    assert starlette_app.LIFESPAN_EVENTS == ["startup"]
    with client() as c:
        assert c.get(running.url("/state")).json()["greeting"] == "hello from lifespan"
    assert running.stop() is None
    assert starlette_app.LIFESPAN_EVENTS == ["startup", "shutdown"]
    assert refused(running.port)


def test_raw_lifespan_state_and_shutdown(loop_thread: BackgroundLoop) -> None:
    app = RawLifespanApp()
    running = start(loop_thread, serve_asgi, app, lifespan="on")
    with client() as c:
        assert c.get(running.url("/")).json() == {"state": {"ready": "yes"}}
        assert c.get(running.url("/")).json() == {"state": {"ready": "yes"}}  # each request gets its own copy
    running.stop()
    assert app.events == ["startup", "shutdown"]


def test_startup_failure_raises_and_nothing_is_served(loop_thread: BackgroundLoop) -> None:
    app = RawLifespanApp(fail_startup=True)
    port = free_port()
    running = start(loop_thread, serve_asgi, app, port=port, wait=False)
    with pytest.raises(LifespanFailure, match="database unreachable"):
        running.future.result(TIMEOUT)
    assert app.events == ["startup"]
    assert refused(port)
    assert app.requests == 0


def test_starlette_startup_exception_raises(loop_thread: BackgroundLoop) -> None:
    from starlette.applications import Starlette

    @contextlib.asynccontextmanager
    async def broken(app: Any) -> Any:
        raise ConnectionError("no database")
        yield  # pragma: no cover

    port = free_port()
    running = start(loop_thread, serve_asgi, Starlette(lifespan=broken), port=port, wait=False)
    with pytest.raises(LifespanFailure, match="no database"):
        running.future.result(TIMEOUT)
    assert refused(port)


def test_lifespan_unsupported_auto_serves_on_refuses(loop_thread: BackgroundLoop) -> None:
    app = RawLifespanApp(unsupported=True)
    running = start(loop_thread, serve_asgi, app, lifespan="auto")
    with client() as c:
        assert c.get(running.url("/")).json() == {"state": {}}
    running.stop()
    port = free_port()
    strict = start(loop_thread, serve_asgi, RawLifespanApp(unsupported=True), port=port, lifespan="on", wait=False)
    with pytest.raises(LifespanFailure):
        strict.future.result(TIMEOUT)
    assert refused(port)


def test_lifespan_off_never_calls_the_lifespan_scope(loop_thread: BackgroundLoop) -> None:
    app = RawLifespanApp()
    running = start(loop_thread, serve_asgi, app, lifespan="off")
    with client() as c:
        assert c.get(running.url("/")).json() == {"state": {}}
    running.stop()
    assert app.events == []


def test_request_during_slow_startup_is_not_answered_503(loop_thread: BackgroundLoop) -> None:
    gate = threading.Event()
    app = RawLifespanApp(startup_gate=gate)
    port = free_port()
    running = start(loop_thread, serve_asgi, app, port=port, wait=False)
    try:
        wait_for(lambda: app.events == ["startup"], what="startup to begin")
        outcome: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def request() -> None:
            try:
                with client() as c:
                    outcome.set_result(c.get(f"http://127.0.0.1:{port}/").status_code)
            except httpx.ConnectError as exc:
                outcome.set_result(exc)

        threading.Thread(target=request, daemon=True).start()
        try:
            result = outcome.result(2)  # answered (or refused) while startup is still parked
        except concurrent.futures.TimeoutError:
            result = "waiting"
        gate.set()
        if result == "waiting":
            result = outcome.result(TIMEOUT)
        # Refused (not listening yet) or answered by the app once started:
        # never a server-made 503.
        assert result != 503
    finally:
        gate.set()
        with contextlib.suppress(BaseException):
            running.stop()


# ---------------------------------------------------------------- raw ASGI: errors


async def raise_before_start(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/ok":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
    elif scope["path"] == "/raise":
        raise ValueError("raised before http.response.start")
    elif scope["path"] == "/nothing":
        return  # returns without a response
    elif scope["path"] == "/mid-stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise ValueError("raised mid-stream")
    elif scope["path"] == "/start-only":
        await send({"type": "http.response.start", "status": 204, "headers": [(b"x-start", b"only")]})


def test_raw_app_errors(loop_thread: BackgroundLoop) -> None:
    running = start(loop_thread, serve_asgi, raise_before_start, lifespan="off")
    try:
        with client() as c:
            raised = c.get(running.url("/raise"))
            nothing = c.get(running.url("/nothing"))
            start_only = c.get(running.url("/start-only"))
            with pytest.raises(httpx.RemoteProtocolError):
                c.get(running.url("/mid-stream"))  # the stream is cut, not ended cleanly
        with client() as c:
            ok = c.get(running.url("/ok"))
    finally:
        running.stop()
    assert raised.status_code == 500 and raised.text == "Internal Server Error"
    assert nothing.status_code == 500
    assert start_only.status_code == 204 and start_only.headers["x-start"] == "only"
    assert ok.text == "ok"


# ---------------------------------------------------------------- raw ASGI: http.disconnect


class DisconnectProbe:
    """Reads the request body, then waits in receive() for http.disconnect,
    then sends a response anyway and records whether send() raised."""

    def __init__(self, stream_first: bool = False) -> None:
        self.stream_first = stream_first
        self.body = b""
        self.waiting = threading.Event()
        self.done = threading.Event()
        self.messages: list[str] = []
        self.second: str | None = None
        self.send_error: BaseException | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        try:
            while True:
                message = await receive()
                self.messages.append(message["type"])
                if message["type"] != "http.request":
                    break
                self.body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            if self.stream_first:
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await send({"type": "http.response.body", "body": b"first chunk", "more_body": True})
            self.waiting.set()
            message = await asyncio.wait_for(receive(), TIMEOUT)
            self.messages.append(message["type"])
            self.second = (await asyncio.wait_for(receive(), TIMEOUT))["type"]
            try:
                if not self.stream_first:
                    await send({"type": "http.response.start", "status": 200, "headers": []})
                for _ in range(20):
                    await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except BaseException as exc:  # noqa: BLE001 - recorded for the test
                self.send_error = exc
        finally:
            self.done.set()


def raw_request(port: int, body: bytes = b"hello", path: str = "/") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    )
    return sock


def test_disconnect_delivered_after_body_and_send_after_disconnect_raises_an_oserror(
    loop_thread: BackgroundLoop,
) -> None:
    probe = DisconnectProbe()
    running = start(loop_thread, serve_asgi, probe, lifespan="off")
    try:
        sock = raw_request(running.port)
        assert probe.waiting.wait(TIMEOUT)
        assert probe.messages == ["http.request"]  # nothing delivered while the client is connected
        sock.close()
        assert probe.done.wait(TIMEOUT)
        assert probe.body == b"hello"
        assert probe.messages == ["http.request", "http.disconnect"]
        assert probe.second == "http.disconnect"  # and again on every later receive()
        # ASGI 2.4: send() on a closed connection raises a subclass of OSError.
        assert isinstance(probe.send_error, ClientDisconnected) and isinstance(probe.send_error, OSError)
    finally:
        running.stop()


def test_disconnect_during_streaming_response(loop_thread: BackgroundLoop) -> None:
    probe = DisconnectProbe(stream_first=True)
    running = start(loop_thread, serve_asgi, probe, lifespan="off")
    try:
        sock = raw_request(running.port)
        assert probe.waiting.wait(TIMEOUT)
        head = b""
        while b"first chunk" not in head:
            data = sock.recv(65536)
            assert data, "connection closed before the first chunk"
            head += data
        assert head.startswith(b"HTTP/1.1 200")
        sock.close()
        assert probe.done.wait(TIMEOUT)
        assert probe.messages == ["http.request", "http.disconnect"]
        assert isinstance(probe.send_error, ClientDisconnected)
    finally:
        running.stop()


class WriterProbe:
    """Starts a streaming response, then keeps writing from one task while
    another waits in receive(): the disconnect must reach the receiver at
    the latest once a write has found the client gone."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.done = threading.Event()
        self.received: str | None = None
        self.send_error: BaseException | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        self.started.set()

        async def writer() -> None:
            try:
                for _ in range(500):  # bounded: 500 x 10 ms
                    await send({"type": "http.response.body", "body": b"x" * 4096, "more_body": True})
                    await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                raise  # the receiver got the disconnect first: cancelled below
            except BaseException as exc:  # noqa: BLE001 - recorded for the test
                self.send_error = exc

        task = asyncio.ensure_future(writer())
        try:
            self.received = (await asyncio.wait_for(receive(), TIMEOUT))["type"]
        except asyncio.TimeoutError:
            self.received = "timed out"
        finally:
            task.cancel()
            self.done.set()


def test_parked_receive_wakes_when_a_write_finds_the_client_gone(loop_thread: BackgroundLoop) -> None:
    probe = WriterProbe()
    running = start(loop_thread, serve_asgi, probe, lifespan="off")
    try:
        sock = socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert probe.started.wait(TIMEOUT)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.close()
        assert probe.done.wait(TIMEOUT + 5)
        # The writer was told (ClientDisconnected) unless the receiver's
        # disconnect cancelled it first.
        assert probe.send_error is None or isinstance(probe.send_error, ClientDisconnected)
        assert probe.received == "http.disconnect"
    finally:
        running.stop()


@pytest.mark.parametrize("server", ["server_native", "server_native-bridge", "uvicorn"])
def test_starlette_endless_stream_stops_when_the_client_leaves(server: str, server_log: LogLines) -> None:
    """Starlette's StreamingResponse stops on the OSError send() raises
    (ASGI 2.4), not by listening for http.disconnect; the app's end after
    its client left is no error of the server's."""
    name = f"inf-{time.monotonic_ns()}"
    with contextlib.ExitStack() as stack:
        if server == "uvicorn":
            base = stack.enter_context(uvicorn_process("apps.starlette_app:app"))
        else:
            running = serving(serve_asgi, starlette_app.app, native_callback=server == "server_native")
            base = stack.enter_context(running).url("").rstrip("/")
        with client() as c, c.stream("GET", f"{base}/infinite?id={name}") as response:
            assert next(response.iter_raw()).startswith(b"tick")
        # httpx closed the connection mid-stream. Ask (bounded) whether the
        # generator was stopped.
        with client() as c:
            state = None
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                state = c.get(f"{base}/infinite/status?id={name}").json()["state"]
                if state == "stopped":
                    break
                time.sleep(0.05)
    assert state == "stopped"
    assert "ASGI app failed" not in server_log.read()


def test_disconnect_over_http2_stream_reset(loop_thread: BackgroundLoop) -> None:
    import h2.config
    import h2.connection

    probe = DisconnectProbe()
    running = start(loop_thread, serve_asgi, probe, lifespan="off")
    try:
        sock = socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(
            1, [(":method", "POST"), (":path", "/"), (":scheme", "http"), (":authority", "x"), ("content-length", "5")]
        )
        conn.send_data(1, b"hello", end_stream=True)
        sock.sendall(conn.data_to_send())
        assert probe.waiting.wait(TIMEOUT)
        conn.reset_stream(1)
        sock.sendall(conn.data_to_send())
        assert probe.done.wait(TIMEOUT)
        assert probe.messages == ["http.request", "http.disconnect"]
        assert isinstance(probe.send_error, ClientDisconnected)
        sock.close()
    finally:
        running.stop()


class UploadProbe:
    """Reads the body until the end or a disconnect."""

    def __init__(self) -> None:
        self.received = 0
        self.last: str | None = None
        self.log: list[tuple[str, int, bool]] = []
        self.done = threading.Event()
        self.error: BaseException | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        try:
            if scope["path"] == "/ping":
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await send({"type": "http.response.body", "body": b"pong"})
                return
            while True:
                message = await asyncio.wait_for(receive(), TIMEOUT)
                self.last = message["type"]
                self.log.append((message["type"], len(message.get("body", b"")), bool(message.get("more_body"))))
                if message["type"] == "http.disconnect":
                    break
                self.received += len(message.get("body", b""))
                if not message.get("more_body"):
                    break
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": str(self.received).encode()})
        except BaseException as exc:  # noqa: BLE001 - recorded for the test
            self.error = exc
        finally:
            if scope["path"] != "/ping":
                self.done.set()


def test_client_abort_mid_upload_ends_the_read_and_the_server_goes_on(loop_thread: BackgroundLoop) -> None:
    probe = UploadProbe()
    running = start(loop_thread, serve_asgi, probe, lifespan="off")
    try:
        sock = socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT)
        sock.sendall(f"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {8 * MiB}\r\n\r\n".encode())
        sock.sendall(os.urandom(256 * 1024))
        wait_for(lambda: probe.received > 0, what="the app to get the first part of the body")
        sock.close()
        assert probe.done.wait(TIMEOUT + 5)  # the app's reading loop ended: no receive() hangs
        assert not isinstance(probe.error, asyncio.TimeoutError), probe.log[-3:]
        assert 0 < probe.received < 8 * MiB
        kind, _, more_body = probe.log[-1]
        assert kind == "http.disconnect" or more_body, "a cut body was presented as complete"
        with client() as c:
            assert c.get(running.url("/ping")).text == "pong"
    finally:
        running.stop()


class LateReader:
    """Waits (bounded) for the test's go before reading the body, so the
    client is already gone when it starts."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.go = threading.Event()
        self.done = threading.Event()
        self.messages: list[tuple[str, int]] = []
        self.error: BaseException | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.entered.set()
        try:
            deadline = time.monotonic() + TIMEOUT
            while not self.go.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            while True:
                message = await asyncio.wait_for(receive(), TIMEOUT)
                self.messages.append((message["type"], len(message.get("body", b""))))
                if message["type"] == "http.disconnect" or not message.get("more_body"):
                    break
        except BaseException as exc:  # noqa: BLE001 - recorded for the test
            self.error = exc
        finally:
            self.done.set()


def test_client_abort_mid_upload_gives_http_disconnect(loop_thread: BackgroundLoop) -> None:
    probe = LateReader()
    running = start(loop_thread, serve_asgi, probe, lifespan="off")
    try:
        sock = socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT)
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"a" * 100)
        assert probe.entered.wait(TIMEOUT)
        sock.close()
        time.sleep(0.3)  # settle: let the server see the close before the app reads (not asserted on)
        probe.go.set()
        assert probe.done.wait(TIMEOUT + 5)
    finally:
        running.stop()
    assert probe.error is None
    assert probe.messages[-1] == ("http.disconnect", 0)
    assert sum(size for kind, size in probe.messages if kind == "http.request") == 100


# ================================================================ FastAPI


def test_fastapi_routing_and_typed_params(fast: Running) -> None:
    with client() as c:
        assert c.get(fast.url("/")).json() == {"hello": "fastapi"}
        data = c.get(fast.url("/items/5?q=caf%C3%A9&tag=a&tag=b")).json()
        assert data == {"item_id": 5, "q": "café", "tags": ["a", "b"]}
        bad = c.get(fast.url("/items/five"))
    assert bad.status_code == 422
    detail = bad.json()["detail"]
    assert detail[0]["loc"] == ["path", "item_id"]
    assert detail[0]["type"] == "int_parsing"


def test_fastapi_json_body_and_validation(fast: Running) -> None:
    with client() as c:
        created = c.post(fast.url("/items"), json={"name": "pen", "price": 1.25, "tags": ["x"]})
        invalid = c.post(fast.url("/items"), json={"name": "pen"})
        not_json = c.post(fast.url("/items"), content=b"{not json", headers={"content-type": "application/json"})
    assert created.status_code == 201
    assert created.json() == {"created": {"name": "pen", "price": 1.25, "tags": ["x"]}, "total": 2.5}
    assert invalid.status_code == 422
    assert invalid.json()["detail"][0]["loc"] == ["body", "price"]
    assert not_json.status_code == 422


def test_fastapi_dependency_with_lifespan_state_and_http_exception(fast: Running) -> None:
    with client() as c:
        alice = c.get(fast.url("/users/alice"))
        bob = c.get(fast.url("/users/bob"))
    assert alice.json() == {"name": "Alice", "age": 30}
    assert bob.status_code == 404
    assert bob.json() == {"detail": "no user bob"}


def test_fastapi_header_param(fast: Running) -> None:
    with client() as c:
        ok = c.get(fast.url("/header"), headers={"X-Token": "t0k3n"})
        missing = c.get(fast.url("/header"))
    assert ok.json() == {"x_token": "t0k3n"}
    assert missing.status_code == 422


def test_fastapi_form_and_uploads(fast: Running) -> None:
    one = os.urandom(4 * MiB)
    two = "ünïcode text\n".encode() * 100
    with client() as c:
        form = c.post(fast.url("/form"), data={"username": "zoë", "password": "hunter2"})
        upload = c.post(
            fast.url("/upload"),
            data={"description": "two files"},
            files=[("files", ("one.bin", one, "application/octet-stream")), ("files", ("two.txt", two, "text/plain"))],
        )
        missing = c.post(fast.url("/upload"), data={"description": "no files"})
    assert form.json() == {"username": "zoë", "password_length": "7"}
    assert upload.status_code == 200, upload.text
    assert upload.json() == {
        "description": "two files",
        "files": [
            {
                "filename": "one.bin",
                "content_type": "application/octet-stream",
                "size": len(one),
                "sha256": hashlib.sha256(one).hexdigest(),
            },
            {
                "filename": "two.txt",
                "content_type": "text/plain",
                "size": len(two),
                "sha256": hashlib.sha256(two).hexdigest(),
            },
        ],
    }
    assert missing.status_code == 422


def test_fastapi_streaming_errors_and_openapi(fast: Running) -> None:
    with client() as c:
        streamed = c.get(fast.url("/stream?count=5"))
        boom = c.get(fast.url("/boom"))
        after = c.get(fast.url("/plain"))
        openapi = c.get(fast.url("/openapi.json"))
    assert streamed.text == "0\n1\n2\n3\n4\n"
    assert boom.status_code == 500
    assert after.text == "plain text"
    assert openapi.status_code == 200 and "/items/{item_id}" in openapi.json()["paths"]


def test_fastapi_lifespan_runs(loop_thread: BackgroundLoop) -> None:
    fastapi_app.EVENTS.clear()
    running = start(loop_thread, serve_asgi, fastapi_app.app)
    with client() as c:
        assert c.get(running.url("/users/alice")).status_code == 200
    running.stop()
    assert fastapi_app.EVENTS == ["startup", "shutdown"]


# ================================================================ Django (ASGI)


@pytest.fixture(scope="module")
def django_asgi() -> Iterator[Running]:
    import django
    from apps import django_urls
    from django.conf import settings

    if not settings.configured:
        settings.configure(**django_urls.SETTINGS)
        django.setup()
    from django.core.asgi import get_asgi_application

    with serving(serve_asgi, get_asgi_application()) as running:
        yield running


# Django's own advice for a sync iterator under ASGI (the view is shared with WSGI).
@pytest.mark.filterwarnings("ignore:StreamingHttpResponse must consume synchronous iterators")
def test_django_asgi(django_asgi: Running, data_file: tuple[Path, bytes]) -> None:
    path, data = data_file
    with client() as c:
        assert c.get(django_asgi.url("/")).text == "django home"
        item = c.get(django_asgi.url("/items/3/")).json()
        assert item == {"pk": 3, "url": "/items/3/", "absolute": django_asgi.url("/items/3/")}
        meta = c.get(django_asgi.url("/meta/?q=caf%C3%A9"), headers=[("X-Multi", "one"), ("X-Multi", "two")]).json()
        assert meta["get"] == [["q", "café"]]
        assert meta["meta"]["REMOTE_ADDR"] == "127.0.0.1"
        assert meta["multi"] == "one,two"
        assert c.post(django_asgi.url("/json/"), json={"a": [1, 2]}).json() == {
            "received": {"a": [1, 2]},
            "method": "POST",
        }
        big = os.urandom(4 * MiB)
        form = c.post(
            django_asgi.url("/form/"), data={"t": "x"}, files={"doc": ("big.bin", big, "application/octet-stream")}
        ).json()
        assert form["files"]["doc"][0]["sha256"] == hashlib.sha256(big).hexdigest()
        assert c.get(django_asgi.url("/stream/?count=3")).text == "part-0\npart-1\npart-2\n"
        assert c.get(django_asgi.url("/file/"), params={"path": str(path)}).content == data
        assert c.get(django_asgi.url("/missing/")).status_code == 404
        assert c.get(django_asgi.url("/boom/")).status_code == 500
        assert c.get(django_asgi.url("/go/")).headers["location"] == "/"
        assert c.get(django_asgi.url("/cookies/"), headers={"cookie": "visited=before"}).json() == {"visited": "before"}


# ================================================================ the socket bridge


def test_bridge_disconnect(loop_thread: BackgroundLoop) -> None:
    probe = DisconnectProbe()
    running = start(loop_thread, serve_asgi, probe, lifespan="off", native_callback=False)
    try:
        sock = raw_request(running.port)
        assert probe.waiting.wait(TIMEOUT)
        sock.close()
        assert probe.done.wait(TIMEOUT)
        assert probe.messages == ["http.request", "http.disconnect"]
        assert isinstance(probe.send_error, ClientDisconnected)
    finally:
        running.stop()


# ================================================================ proxy headers


async def client_and_scheme(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = json.dumps({"client": scope["client"], "scheme": scope["scheme"]}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


@pytest.mark.parametrize(
    ("trusted", "headers", "client", "scheme"),
    [
        (["127.0.0.0/8"], {}, "127.0.0.1", "http"),
        (
            ["127.0.0.0/8"],
            {"X-Forwarded-For": "203.0.113.7, 127.0.0.5", "X-Forwarded-Proto": "https"},
            "203.0.113.7",
            "https",
        ),
        (["127.0.0.0/8"], {"Forwarded": 'for="[2001:db8::1]:4711";proto=https'}, "2001:db8::1", "https"),
        (["10.0.0.0/8"], {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}, "127.0.0.1", "http"),
    ],
    ids=["no-headers", "trusted-chain", "forwarded", "untrusted-peer"],
)
def test_proxy_headers_believed_only_from_trusted_peers(
    loop_thread: BackgroundLoop, trusted: list[str], headers: dict[str, str], client: str, scheme: str
) -> None:
    from server_native.runtime.proxy import ProxyHeaders

    running = start(loop_thread, serve_asgi, client_and_scheme, lifespan="off", proxy=ProxyHeaders(trusted))
    try:
        with httpx.Client() as c:
            # twice: the second answer comes from the remembered trust of the peer
            answers = [c.get(running.url("/"), headers=headers).json() for _ in range(2)]
    finally:
        running.stop()
    assert answers[0] == answers[1]
    assert answers[0]["client"][0] == client
    assert answers[0]["scheme"] == scheme
