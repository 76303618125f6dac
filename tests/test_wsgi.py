"""WSGI (PEP 3333) on server_native with real frameworks (Flask, Django) and
raw WSGI apps, driven by real clients (requests, httpx, raw sockets):
routing, query strings, JSON and form bodies, a streaming ``wsgi.input``,
streaming responses, ``wsgi.file_wrapper``, ``start_response`` with
``exc_info``, the ``write()`` callable, ``close()``, errors, the thread pool,
repeated headers, REMOTE_ADDR/REMOTE_PORT, SCRIPT_NAME and PATH_INFO.

Servers run ``serve_wsgi`` on a background loop (``apps.harness``); every
wait is bounded and everything is on loopback."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import django
import httpx
import pytest
import requests
from apps import django_urls, flask_app
from apps.harness import (
    TIMEOUT,
    BackgroundLoop,
    Running,
    plain_tracebacks,
    serving,
    start,
    wait_for,
)
from django.conf import settings

from server_native.interfaces.wsgi import FileWrapper, serve_wsgi

if not settings.configured:
    settings.configure(**django_urls.SETTINGS)
    django.setup()

from django.core.wsgi import get_wsgi_application

MiB = 1024 * 1024
Environ = dict[str, Any]
StartResponse = Callable[..., Callable[[bytes], None]]


def session() -> requests.Session:
    return requests.Session()


def get(url: str, **kwargs: Any) -> requests.Response:
    kwargs.setdefault("timeout", TIMEOUT)
    return requests.get(url, **kwargs)


def post(url: str, **kwargs: Any) -> requests.Response:
    kwargs.setdefault("timeout", TIMEOUT)
    return requests.post(url, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def _plain_tracebacks() -> Iterator[None]:
    with plain_tracebacks():
        yield


@pytest.fixture(scope="module")
def flask_server() -> Iterator[Running]:
    with serving(serve_wsgi, flask_app.app, threads=4) as running:
        yield running


@pytest.fixture(scope="module")
def django_server() -> Iterator[Running]:
    with serving(serve_wsgi, get_wsgi_application(), threads=4) as running:
        yield running


def run_raw(
    loop_thread: BackgroundLoop, app: Callable[[Environ, StartResponse], Iterable[bytes]], **options: Any
) -> Running:
    return start(loop_thread, serve_wsgi, app, **options)


# ================================================================ Flask


def test_flask_routing_and_converters(flask_server: Running) -> None:
    assert get(flask_server.url("/")).text == "flask home"
    data = get(flask_server.url("/items/42")).json()
    assert data == {"item_id": 42, "url": "/items/42", "external": flask_server.url("/items/42")}
    assert get(flask_server.url("/items/forty-two")).status_code == 404


def test_flask_utf8_path_is_decoded(flask_server: Running) -> None:
    data = get(flask_server.url("/words/caf%C3%A9%20cr%C3%A8me")).json()
    assert data == {"word": "café crème", "path": "/words/café crème"}


def test_flask_query_string(flask_server: Running) -> None:
    raw = "name=caf%C3%A9&x=a+b&x=%26%3D&emoji=%F0%9F%8D%95&empty="
    data = get(flask_server.url("/environ?" + raw)).json()
    assert data["QUERY_STRING"] == raw
    assert data["args"] == [["name", "café"], ["x", "a b"], ["x", "&="], ["emoji", "🍕"], ["empty", ""]]


def test_flask_environ_basics(flask_server: Running) -> None:
    with socket.create_connection(("127.0.0.1", flask_server.port), timeout=TIMEOUT) as sock:
        local_port = sock.getsockname()[1]
        sock.sendall(
            f"GET /environ?a=1 HTTP/1.1\r\nHost: 127.0.0.1:{flask_server.port}\r\nX-Multi: one\r\nX-Multi: two\r\n"
            "X-Dashed-Name: v\r\nConnection: close\r\n\r\n".encode()
        )
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    data = json.loads(body)
    assert data["REQUEST_METHOD"] == "GET"
    assert data["SCRIPT_NAME"] == ""
    assert data["PATH_INFO"] == "/environ"
    assert data["QUERY_STRING"] == "a=1"
    assert data["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert data["REMOTE_ADDR"] == "127.0.0.1"
    assert data["REMOTE_PORT"] == str(local_port)  # a string, the client's own port
    assert data["SERVER_PORT"] == str(flask_server.port)
    assert data["SERVER_NAME"] == "127.0.0.1"
    assert data["wsgi.url_scheme"] == "http"
    assert data["wsgi.version"] == [1, 0]
    assert data["wsgi.multithread"] is True and data["wsgi.multiprocess"] is False and data["wsgi.run_once"] is False
    assert data["http"]["HTTP_X_MULTI"] == "one,two"  # repeats joined with "," (CGI / PEP 3333)
    assert data["http"]["HTTP_X_DASHED_NAME"] == "v"
    assert data["http"]["HTTP_HOST"] == f"127.0.0.1:{flask_server.port}"
    assert "HTTP_CONTENT_TYPE" not in data["http"] and "HTTP_CONTENT_LENGTH" not in data["http"]
    assert data["host"] == f"127.0.0.1:{flask_server.port}"


def test_flask_methods_and_bodies(flask_server: Running) -> None:
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        response = requests.request(
            method,
            flask_server.url("/environ"),
            data=b"payload",
            headers={"content-type": "text/plain"},
            timeout=TIMEOUT,
        )
        data = response.json()
        assert (data["REQUEST_METHOD"], data["CONTENT_TYPE"], data["CONTENT_LENGTH"], data["body"]) == (
            method,
            "text/plain",
            "7",
            "payload",
        )


def test_flask_json_body(flask_server: Running) -> None:
    payload = {"name": "Zoë", "values": list(range(50)), "nested": {"ok": True}}
    response = post(flask_server.url("/json"), json=payload)
    assert response.json() == {"received": payload, "content_type": "application/json"}


def test_flask_form_and_multipart_uploads(flask_server: Running) -> None:
    big = os.urandom(4 * MiB + 3)
    small = "ünïcode\n".encode() * 100
    urlencoded = post(flask_server.url("/form"), data={"a": ["1", "2"], "name": "Zoë & co"}).json()
    assert urlencoded == {"form": {"a": ["1", "2"], "name": ["Zoë & co"]}, "files": {}}
    multipart = post(
        flask_server.url("/form"),
        data={"title": "two files"},
        files=[("doc", ("big.bin", big, "application/octet-stream")), ("doc", ("small.txt", small, "text/plain"))],
    ).json()
    assert multipart == {
        "form": {"title": ["two files"]},
        "files": {
            "doc": [
                {
                    "filename": "big.bin",
                    "content_type": "application/octet-stream",
                    "size": len(big),
                    "sha256": hashlib.sha256(big).hexdigest(),
                },
                {
                    "filename": "small.txt",
                    "content_type": "text/plain",
                    "size": len(small),
                    "sha256": hashlib.sha256(small).hexdigest(),
                },
            ]
        },
    }


def test_flask_large_upload(flask_server: Running) -> None:
    body = os.urandom(4 * MiB + 5)
    assert post(flask_server.url("/upload"), data=body).json() == {
        "size": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
    }


def test_flask_chunked_upload(flask_server: Running) -> None:
    pieces = [os.urandom(100_000 + i) for i in range(20)]
    whole = b"".join(pieces)
    chunked = post(flask_server.url("/upload"), data=iter(pieces))  # a generator: Transfer-Encoding: chunked
    assert chunked.json() == {"size": len(whole), "sha256": hashlib.sha256(whole).hexdigest()}


def test_flask_streaming_response_chunks_arrive_before_the_generator_finishes(flask_server: Running) -> None:
    name = f"s{time.monotonic_ns()}"
    expected = [f"chunk-{i};".encode() for i in range(4)]
    with get(flask_server.url(f"/stream?count=4&gate={name}"), stream=True) as response:
        assert response.headers.get("transfer-encoding") == "chunked"
        raw = response.raw.stream(amt=None, decode_content=False)
        buffer = b""
        for index, want in enumerate(expected):
            while len(buffer) < len(want):
                buffer += next(raw)
            assert buffer[: len(want)] == want
            # The generator is parked on this gate: the chunk left before it finished.
            assert not flask_app.gate(f"{name}-{index}").is_set()
            buffer = buffer[len(want) :]
            flask_app.gate(f"{name}-{index}").set()
        buffer += b"".join(raw)
    assert buffer == b""


def test_flask_send_file_uses_the_file_wrapper(flask_server: Running, data_file: tuple[Path, bytes]) -> None:
    path, data = data_file
    response = get(flask_server.url("/file"), params={"path": str(path)})
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["content-length"] == str(len(data))
    assert response.headers["content-disposition"] == "attachment; filename=data.bin"


def test_flask_cookies(flask_server: Running) -> None:
    with session() as s:
        response = s.get(flask_server.url("/cookies/set"), timeout=TIMEOUT)
        raw = response.raw.headers.getlist("set-cookie")
        assert len(raw) == 2
        assert any(v.startswith("session=abc123;") and "HttpOnly" in v and "SameSite=Lax" in v for v in raw)
        assert s.get(flask_server.url("/cookies/get"), timeout=TIMEOUT).json() == {"session": "abc123", "theme": "dark"}


def test_flask_errors_and_redirect(flask_server: Running) -> None:
    with session() as s:
        assert s.get(flask_server.url("/teapot"), timeout=TIMEOUT).status_code == 418
        assert s.get(flask_server.url("/nope"), timeout=TIMEOUT).status_code == 404
        boom = s.get(flask_server.url("/boom"), timeout=TIMEOUT)
        assert boom.status_code == 500 and b"Internal Server Error" in boom.content
        assert s.get(flask_server.url("/"), timeout=TIMEOUT).text == "flask home"  # the same connection goes on
        redirected = s.get(flask_server.url("/redirect"), allow_redirects=False, timeout=TIMEOUT)
        assert redirected.status_code == 302 and redirected.headers["location"] == "/"


def test_flask_over_http2(flask_server: Running) -> None:
    body = os.urandom(MiB)
    with httpx.Client(http1=False, http2=True, timeout=TIMEOUT) as client:
        data = client.post(flask_server.url("/environ?h2=1"), content=b"over h2").json()
        upload = client.post(flask_server.url("/upload"), content=body).json()
        streamed = client.get(flask_server.url("/stream?count=20")).text
    assert data["SERVER_PROTOCOL"] == "HTTP/2"
    assert data["body"] == "over h2"
    assert data["args"] == [["h2", "1"]]
    assert upload["sha256"] == hashlib.sha256(body).hexdigest()
    assert streamed == "".join(f"chunk-{i};" for i in range(20))


def test_flask_http2_host_from_authority(flask_server: Running) -> None:
    with httpx.Client(http1=False, http2=True, timeout=TIMEOUT) as client:
        data = client.get(flask_server.url("/environ")).json()
    assert data["http"].get("HTTP_HOST") == f"127.0.0.1:{flask_server.port}"


def test_flask_http2_split_cookie_headers(flask_server: Running) -> None:
    import h2.config
    import h2.connection
    import h2.events

    with socket.create_connection(("127.0.0.1", flask_server.port), timeout=TIMEOUT) as sock:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        conn.send_headers(
            1,
            [
                (":method", "GET"),
                (":path", "/cookies/get"),
                (":scheme", "http"),
                (":authority", f"127.0.0.1:{flask_server.port}"),
                ("cookie", "a=1"),
                ("cookie", "b=2"),
            ],
            end_stream=True,
        )
        sock.sendall(conn.data_to_send())
        body = b""
        ended = False
        deadline = time.monotonic() + TIMEOUT
        while not ended and time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    ended = True
            sock.sendall(conn.data_to_send())
    assert json.loads(body) == {"a": "1", "b": "2"}


# ================================================================ Django


def test_django_routing_reverse_and_404(django_server: Running) -> None:
    assert get(django_server.url("/")).text == "django home"
    data = get(django_server.url("/items/7/")).json()
    assert data == {"pk": 7, "url": "/items/7/", "absolute": django_server.url("/items/7/")}
    assert get(django_server.url("/missing/")).status_code == 404
    assert get(django_server.url("/no/such/url/")).status_code == 404
    # CommonMiddleware's APPEND_SLASH redirect
    slash = get(django_server.url("/items/7"), allow_redirects=False)
    assert slash.status_code == 301 and slash.headers["location"] == "/items/7/"


def test_django_meta_query_and_repeated_headers(django_server: Running) -> None:
    response = httpx.get(
        django_server.url("/meta/?q=caf%C3%A9&q=2&sp=a+b"),
        headers=[("X-Multi", "one"), ("X-Multi", "two")],
        timeout=TIMEOUT,
    )
    data = response.json()
    assert data["get"] == [["q", "café"], ["q", "2"], ["sp", "a b"]]
    assert data["meta"]["QUERY_STRING"] == "q=caf%C3%A9&q=2&sp=a+b"
    assert data["meta"]["REMOTE_ADDR"] == "127.0.0.1"
    assert data["host"] == f"127.0.0.1:{django_server.port}"
    assert data["scheme"] == "http"
    assert data["path"] == data["path_info"] == "/meta/"
    assert data["multi"] == "one,two"


def test_django_json_form_and_upload(django_server: Running) -> None:
    payload = {"ok": True, "text": "Zoë"}
    assert post(django_server.url("/json/"), json=payload).json() == {"received": payload, "method": "POST"}
    big = os.urandom(4 * MiB + 11)
    response = post(
        django_server.url("/form/"),
        data={"title": "upload", "tag": ["a", "b"]},
        files=[("doc", ("big.bin", big, "application/octet-stream"))],
    )
    assert response.json() == {
        "form": {"title": ["upload"], "tag": ["a", "b"]},
        "files": {
            "doc": [
                {
                    "name": "big.bin",
                    "content_type": "application/octet-stream",
                    "size": len(big),
                    "sha256": hashlib.sha256(big).hexdigest(),
                }
            ]
        },
    }


def test_django_streaming_file_cookies_errors_redirect(django_server: Running, data_file: tuple[Path, bytes]) -> None:
    path, data = data_file
    with session() as s:
        streamed = s.get(django_server.url("/stream/?count=5"), timeout=TIMEOUT)
        assert streamed.text == "".join(f"part-{i}\n" for i in range(5))
        assert streamed.headers.get("transfer-encoding") == "chunked"
        file = s.get(django_server.url("/file/"), params={"path": str(path)}, timeout=TIMEOUT)
        assert file.content == data
        assert file.headers["content-length"] == str(len(data))
        assert file.headers["content-disposition"] == 'attachment; filename="data.bin"'
        first = s.get(django_server.url("/cookies/"), timeout=TIMEOUT)
        assert first.json() == {}
        assert s.get(django_server.url("/cookies/"), timeout=TIMEOUT).json() == {"visited": "yes"}
        boom = s.get(django_server.url("/boom/"), timeout=TIMEOUT)
        assert boom.status_code == 500
        assert s.get(django_server.url("/"), timeout=TIMEOUT).text == "django home"
        go = s.get(django_server.url("/go/"), allow_redirects=False, timeout=TIMEOUT)
        assert go.status_code == 302 and go.headers["location"] == "/"


def test_django_script_name(loop_thread: BackgroundLoop) -> None:
    running = start(loop_thread, serve_wsgi, get_wsgi_application(), root_path="/app")
    try:
        data = get(running.url("/meta/")).json()
        item = get(running.url("/items/3/")).json()
        go = get(running.url("/go/"), allow_redirects=False)
    finally:
        running.stop()
    assert data["meta"]["SCRIPT_NAME"] == "/app"
    assert data["meta"]["PATH_INFO"] == "/meta/"
    assert data["path"] == "/app/meta/" and data["path_info"] == "/meta/"
    assert item["url"] == "/app/items/3/"
    assert go.headers["location"] == "/app/"


# ================================================================ raw WSGI apps


def environ_app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    shown = {k: v for k, v in environ.items() if isinstance(v, (str, int, bool))}
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(shown).encode()]


def environ_of(loop_thread: BackgroundLoop, request: bytes) -> dict[str, Any]:
    """The environ ``environ_app`` saw for ``request``, sent as these bytes."""
    running = run_raw(loop_thread, environ_app)
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT) as sock:
            sock.sendall(request)
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
    finally:
        running.stop()
    environ: dict[str, Any] = json.loads(raw.partition(b"\r\n\r\n")[2])
    return environ


def test_path_info_is_latin1_of_the_decoded_bytes(loop_thread: BackgroundLoop) -> None:
    data = environ_of(
        loop_thread, b"GET /caf%C3%A9/a%20b/%2F/x?q=%C3%A9 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    # PEP 3333: PATH_INFO is the percent-decoded bytes as a latin-1 "native string".
    assert data["PATH_INFO"] == "/caf\xc3\xa9/a b///x"
    assert data["PATH_INFO"].encode("latin-1").decode("utf-8") == "/café/a b///x"
    assert data["QUERY_STRING"] == "q=%C3%A9"  # not decoded


def test_environ_edge_cases(loop_thread: BackgroundLoop) -> None:
    """Stray percent signs stay in PATH_INFO, header bytes map to latin-1,
    repeats join with "," and Content-Type/Length lose their HTTP_ prefix."""
    data = environ_of(
        loop_thread,
        b"POST /a%zz/%41%4 HTTP/1.1\r\nHost: x\r\nX-Latin: caf\xe9\r\nX-Multi: 1\r\nX-Multi: 2\r\n"
        b"Content-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
    )
    assert data["PATH_INFO"] == "/a%zz/A%4"
    assert data["REQUEST_METHOD"] == "POST"
    assert data["HTTP_X_LATIN"] == "caf\xe9"
    assert data["HTTP_X_MULTI"] == "1,2"
    assert (data["CONTENT_TYPE"], data["CONTENT_LENGTH"]) == ("text/plain", "2")
    assert "HTTP_CONTENT_TYPE" not in data and "HTTP_CONTENT_LENGTH" not in data
    assert data["HTTP_HOST"] == "x"
    assert data["REMOTE_ADDR"] == "127.0.0.1" and data["REMOTE_PORT"].isdigit()


def test_script_name_root_path(loop_thread: BackgroundLoop) -> None:
    running = run_raw(loop_thread, environ_app, root_path="/mount")
    try:
        data = get(running.url("/inner/x")).json()
    finally:
        running.stop()
    assert data["SCRIPT_NAME"] == "/mount"
    assert data["PATH_INFO"] == "/inner/x"


def test_flask_under_root_path(loop_thread: BackgroundLoop) -> None:
    running = start(loop_thread, serve_wsgi, flask_app.app, root_path="/api")
    try:
        data = get(running.url("/items/5")).json()
        redirected = get(running.url("/redirect"), allow_redirects=False)
    finally:
        running.stop()
    assert data["url"] == "/api/items/5"
    assert data["external"] == running.url("/api/items/5")
    assert redirected.headers["location"] == "/api/"


class InputProbe:
    """Reads wsgi.input in the way ``environ['QUERY_STRING']`` asks: read(size),
    read(), readline(), readline(size), readlines() or iteration."""

    def __init__(self) -> None:
        self.progress = 0
        self.first_read = threading.Event()

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        stream = environ["wsgi.input"]
        mode = environ["QUERY_STRING"]
        digest = hashlib.sha256()
        count = 0
        sizes: set[int] = set()
        if mode == "read-size":
            while chunk := stream.read(65536):
                sizes.add(len(chunk))
                digest.update(chunk)
                count += 1
                self.progress += len(chunk)
                self.first_read.set()
        elif mode == "read-all":
            data = stream.read()
            digest.update(data)
            count = 1
        elif mode == "readline":
            while line := stream.readline():
                digest.update(line)
                count += 1
        elif mode == "readline-size":
            while line := stream.readline(10):
                sizes.add(len(line))
                digest.update(line)
                count += 1
        elif mode == "readlines":
            lines = stream.readlines()
            for line in lines:
                digest.update(line)
            count = len(lines)
        elif mode == "iterate":
            for line in stream:
                digest.update(line)
                count += 1
        after = stream.read(10)
        body = json.dumps(
            {
                "sha256": digest.hexdigest(),
                "count": count,
                "max_size": max(sizes, default=0),
                "after_end": after.decode(),
            }
        )
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body.encode()]


@pytest.mark.parametrize("mode", ["read-size", "read-all", "readline", "readline-size", "readlines", "iterate"])
def test_wsgi_input_4mib(loop_thread: BackgroundLoop, mode: str) -> None:
    lines = [f"line {i:07d} ".encode() + os.urandom(20).hex().encode() + b"\n" for i in range(4 * MiB // 56)]
    body = b"".join(lines) + b"no newline at the end"
    running = run_raw(loop_thread, InputProbe())
    try:
        data = post(running.url(f"/?{mode}"), data=body).json()
    finally:
        running.stop()
    assert data["sha256"] == hashlib.sha256(body).hexdigest()
    assert data["after_end"] == ""  # read past the end: empty, not blocking
    if mode == "read-size":
        assert data["max_size"] == 65536 and data["count"] == -(-len(body) // 65536)
    elif mode in ("readline", "readlines", "iterate"):
        assert data["count"] == len(lines) + 1
    elif mode == "readline-size":
        assert data["max_size"] == 10


def test_wsgi_input_streams_while_the_client_is_still_sending(loop_thread: BackgroundLoop) -> None:
    probe = InputProbe()
    running = run_raw(loop_thread, probe)
    first, second = os.urandom(MiB), os.urandom(MiB)
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT) as sock:
            sock.sendall(
                f"POST /?read-size HTTP/1.1\r\nHost: x\r\nContent-Length: {2 * MiB}\r\nConnection: close\r\n\r\n".encode()
                + first
            )
            # The app reads the first half while the second has not been sent.
            # (Bounded at 5 s; sending the rest afterwards lets the test end either way.)
            reading = probe.first_read.wait(5)
            sock.sendall(second)
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
    finally:
        running.stop()
    assert json.loads(raw.partition(b"\r\n\r\n")[2])["sha256"] == hashlib.sha256(first + second).hexdigest()
    assert reading, "the app read nothing while half of the body was still to come"


def test_wsgi_input_without_content_length_chunked(loop_thread: BackgroundLoop) -> None:
    pieces = [os.urandom(50_000) for _ in range(30)]
    running = run_raw(loop_thread, InputProbe())
    try:
        data = post(running.url("/?read-size"), data=iter(pieces)).json()
    finally:
        running.stop()
    assert data["sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()


class Closing:
    """An iterable with close(), as PEP 3333 requires servers to call."""

    def __init__(self, chunks: list[bytes], fail_at: int | None = None) -> None:
        self.chunks = chunks
        self.fail_at = fail_at
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        for index, chunk in enumerate(self.chunks):
            if index == self.fail_at:
                raise RuntimeError("iteration failed (expected by the test)")
            yield chunk

    def close(self) -> None:
        self.closed.set()


class RawApps:
    """Raw WSGI behaviours, chosen by PATH_INFO."""

    def __init__(self, file_path: Path | None = None) -> None:
        self.file_path = file_path
        self.closings: dict[str, Closing] = {}
        self.file_wrapper_type: Any = None
        self.file_closed = threading.Event()
        self.write_gate = threading.Event()
        self.reraised: BaseException | None = None

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        if path == "/file-wrapper":
            handle = open(self.file_path, "rb")  # type: ignore[arg-type]
            original_close = handle.close

            def close() -> None:
                original_close()
                self.file_closed.set()

            handle.close = close  # type: ignore[method-assign]
            wrapper = environ["wsgi.file_wrapper"](handle, 32 * 1024)
            self.file_wrapper_type = type(wrapper)
            start_response("200 OK", [("Content-Type", "application/octet-stream")])
            return wrapper
        if path == "/exc-info":
            start_response("200 OK", [("Content-Type", "text/plain"), ("X-First", "yes")])
            try:
                raise ValueError("failed after start_response (expected by the test)")
            except ValueError:
                start_response(
                    "503 Service Unavailable", [("Content-Type", "text/plain"), ("X-Second", "yes")], sys.exc_info()
                )
            return [b"recovered with exc_info"]
        if path == "/exc-info-after-body":
            write = start_response("200 OK", [("Content-Type", "text/plain")])
            write(b"headers are out")
            try:
                raise ValueError("too late (expected by the test)")
            except ValueError:
                try:
                    start_response("500 Internal Server Error", [], sys.exc_info())
                except ValueError as exc:
                    self.reraised = exc  # PEP 3333: re-raised once the headers are sent
                    raise
            return [b"never"]
        if path == "/start-twice":
            start_response("200 OK", [])
            try:
                start_response("201 Created", [])
            except AssertionError as exc:
                self.reraised = exc
                raise
            return [b"never"]
        if path == "/write":
            write = start_response("200 OK", [("Content-Type", "text/plain")])
            write(b"one,")
            write(b"two,")
            return [b"three"]
        if path == "/write-gated":
            write = start_response("200 OK", [("Content-Type", "text/plain")])
            write(b"before-gate;")
            self.write_gate.wait(TIMEOUT)
            return [b"after-gate;"]
        if path.startswith("/closing"):
            fail_at = int(environ["QUERY_STRING"]) if environ["QUERY_STRING"] else None
            closing = Closing([b"a" * 1000, b"b" * 1000, b"c" * 1000], fail_at)
            self.closings[path] = closing
            start_response("200 OK", [("Content-Type", "text/plain")])
            return closing
        if path == "/raise":
            raise RuntimeError("raised before start_response (expected by the test)")
        if path == "/no-start":
            return [b"no start_response"]
        if path == "/reason":
            start_response("299 Custom Reason", [("Content-Type", "text/plain")])
            return [b"custom"]
        if path == "/generator-fails-first":
            start_response("200 OK", [])

            def failing() -> Iterator[bytes]:
                raise RuntimeError("first chunk failed (expected by the test)")
                yield b""  # pragma: no cover

            return failing()
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"unknown"]


def raw_get(port: int, path: str) -> bytes:
    """One HTTP/1.1 GET with Connection: close; everything the server sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        raw = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            raw += chunk
    return raw


def test_file_wrapper(loop_thread: BackgroundLoop, data_file: tuple[Path, bytes]) -> None:
    path, data = data_file
    apps = RawApps(path)
    running = run_raw(loop_thread, apps)
    try:
        response = get(running.url("/file-wrapper"))
        assert response.content == data
        assert apps.file_wrapper_type is FileWrapper
        assert apps.file_closed.wait(TIMEOUT)  # the server closed the wrapper, which closed the file
    finally:
        running.stop()


def test_file_wrapper_is_the_pep_3333_kind() -> None:
    handle = io.BytesIO(b"x" * 100_000)
    wrapper = FileWrapper(handle, 30_000)
    assert [len(chunk) for chunk in wrapper] == [30_000, 30_000, 30_000, 10_000]
    wrapper.close()
    assert handle.closed


def test_start_response_with_exc_info_replaces_the_headers(loop_thread: BackgroundLoop) -> None:
    running = run_raw(loop_thread, RawApps())
    try:
        response = get(running.url("/exc-info"))
    finally:
        running.stop()
    assert response.status_code == 503
    assert response.text == "recovered with exc_info"
    assert response.headers.get("x-second") == "yes"
    assert "x-first" not in response.headers


def test_start_response_with_exc_info_after_the_headers_reraises(loop_thread: BackgroundLoop) -> None:
    apps = RawApps()
    running = run_raw(loop_thread, apps)
    try:
        raw = raw_get(running.port, "/exc-info-after-body")
        assert get(running.url("/write")).text == "one,two,three"  # the worker goes on
    finally:
        running.stop()
    assert isinstance(apps.reraised, ValueError)
    assert raw.startswith(b"HTTP/1.1 200")
    assert b"headers are out" in raw
    assert not raw.endswith(b"0\r\n\r\n")  # cut, not a clean end of the chunked body


def test_start_response_twice_without_exc_info_is_an_error(loop_thread: BackgroundLoop) -> None:
    apps = RawApps()
    running = run_raw(loop_thread, apps)
    try:
        response = get(running.url("/start-twice"))
    finally:
        running.stop()
    assert isinstance(apps.reraised, AssertionError)
    assert response.status_code == 500


def test_write_callable(loop_thread: BackgroundLoop) -> None:
    apps = RawApps()
    running = run_raw(loop_thread, apps)
    try:
        assert get(running.url("/write")).text == "one,two,three"
        with get(running.url("/write-gated"), stream=True) as response:
            raw = response.raw.stream(amt=None, decode_content=False)
            first = next(raw)
            assert first == b"before-gate;"  # write() sent it while the app was still running
            assert not apps.write_gate.is_set()
            apps.write_gate.set()
            assert b"".join(raw) == b"after-gate;"
    finally:
        apps.write_gate.set()
        running.stop()


def test_iterable_close_is_called(loop_thread: BackgroundLoop) -> None:
    apps = RawApps()
    running = run_raw(loop_thread, apps)
    try:
        assert get(running.url("/closing-ok")).content == b"a" * 1000 + b"b" * 1000 + b"c" * 1000
        assert apps.closings["/closing-ok"].closed.wait(TIMEOUT)
        # close() also when iteration fails half way (the response is cut)
        raw = raw_get(running.port, "/closing-fail?1")
        assert raw.startswith(b"HTTP/1.1 200")
        assert apps.closings["/closing-fail"].closed.wait(TIMEOUT)
        # ... and when iteration fails before the first chunk (a 500)
        assert get(running.url("/closing-first?0")).status_code == 500
        assert apps.closings["/closing-first"].closed.wait(TIMEOUT)
    finally:
        running.stop()


def wait_until_stalled(progress: Callable[[], int]) -> int:
    """Waits (bounded) until ``progress()`` has stopped moving for a while:
    the app is blocked on its client. Returns the last value."""
    deadline = time.monotonic() + TIMEOUT
    last, since = progress(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if progress() != last:
            last, since = progress(), time.monotonic()
        elif time.monotonic() - since > 0.3:
            break
    return last


def test_iterable_close_is_called_when_the_client_goes_away(loop_thread: BackgroundLoop) -> None:
    closed = threading.Event()
    started = threading.Event()

    class Endless:
        def __iter__(self) -> Iterator[bytes]:
            started.set()
            for _ in range(100_000):  # bounded
                yield b"x" * 65536

        def close(self) -> None:
            closed.set()

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return Endless()

    running = run_raw(loop_thread, app)
    try:
        sock = socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert started.wait(TIMEOUT)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.close()
        assert closed.wait(TIMEOUT)
    finally:
        running.stop()


def test_errors_give_500_and_the_workers_go_on(loop_thread: BackgroundLoop) -> None:
    running = run_raw(loop_thread, RawApps(), threads=2)
    try:
        with session() as s:
            for path in ("/raise", "/no-start", "/generator-fails-first") * 3:
                response = s.get(running.url(path), timeout=TIMEOUT)
                assert response.status_code == 500, path
                assert response.text == "Internal Server Error"
            assert s.get(running.url("/write"), timeout=TIMEOUT).text == "one,two,three"
    finally:
        running.stop()


def test_status_reason_phrase_is_sent(loop_thread: BackgroundLoop) -> None:
    running = run_raw(loop_thread, RawApps())
    try:
        raw = raw_get(running.port, "/reason")
    finally:
        running.stop()
    assert raw.startswith(b"HTTP/1.1 299 Custom Reason\r\n")


def test_thread_pool_serves_requests_concurrently(loop_thread: BackgroundLoop) -> None:
    barrier = threading.Barrier(4, timeout=TIMEOUT)
    seen: list[str] = []
    lock = threading.Lock()

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        with lock:
            seen.append(threading.current_thread().name)
        try:
            barrier.wait()  # four requests must be in the app at once
            status = "200 OK"
        except threading.BrokenBarrierError:
            status = "503 Service Unavailable"
        start_response(status, [("Content-Type", "text/plain")])
        return [environ["PATH_INFO"].encode()]

    running = run_raw(loop_thread, app, threads=4)
    try:
        results: list[Any] = [None] * 8

        def worker(index: int) -> None:
            try:
                results[index] = get(running.url(f"/r{index}"), timeout=TIMEOUT + 5)
            except Exception as exc:  # noqa: BLE001 - reported below
                results[index] = exc

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT + 10)
    finally:
        running.stop()
    assert [(r.status_code, r.text) for r in results] == [(200, f"/r{i}") for i in range(8)]
    assert len(set(seen)) == 4  # four worker threads, no more


def test_more_requests_than_threads_queue_and_complete(loop_thread: BackgroundLoop) -> None:
    gate = threading.Event()
    inside = []
    lock = threading.Lock()

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        with lock:
            inside.append(environ["PATH_INFO"])
        gate.wait(TIMEOUT)
        start_response("200 OK", [])
        return [environ["PATH_INFO"].encode()]

    running = run_raw(loop_thread, app, threads=2)
    try:
        results: list[Any] = [None] * 6

        def worker(index: int) -> None:
            results[index] = get(running.url(f"/q{index}"), timeout=TIMEOUT + 5).text

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        wait_for(lambda: len(inside) >= 2, what="two requests in the app")
        assert len(inside) == 2  # the pool is bounded: the other four wait
        gate.set()
        for thread in threads:
            thread.join(TIMEOUT + 10)
    finally:
        gate.set()
        running.stop()
    assert results == [f"/q{i}" for i in range(6)]


def test_client_abort_mid_upload(loop_thread: BackgroundLoop) -> None:
    """A client that sends half of its body and leaves: the app never gets a
    truncated body as if it were whole, and the server goes on."""
    calls: list[tuple[str, int, str]] = []

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        try:
            data = environ["wsgi.input"].read()
            outcome = "read"
        except OSError as exc:
            data, outcome = b"", f"OSError: {exc}"
        calls.append((environ["PATH_INFO"], len(data), outcome))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(len(data)).encode()]

    running = run_raw(loop_thread, app)
    try:
        sock = socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT)
        sock.sendall(f"POST /aborted HTTP/1.1\r\nHost: x\r\nContent-Length: {4 * MiB}\r\n\r\n".encode())
        sock.sendall(os.urandom(MiB))
        sock.close()
        assert get(running.url("/after")).text == "0"
    finally:
        running.stop()
    aborted = [call for call in calls if call[0] == "/aborted"]
    # Either the app never saw it, or its read failed: never a short body read as complete.
    assert all(outcome != "read" or size == 4 * MiB for _, size, outcome in aborted), aborted
    assert ("/after", 0, "read") in calls


@pytest.mark.parametrize("threads", [4, 1])
def test_write_blocks_for_a_slow_client(loop_thread: BackgroundLoop, threads: int) -> None:
    """WSGI backpressure: while the client reads nothing, the worker thread
    blocks in the server instead of buffering the whole response, and goes
    on once the client reads."""
    total = 256 * MiB
    progress = {"sent": 0}
    finished = threading.Event()

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Length", str(total))])

        def body() -> Iterator[bytes]:
            chunk = b"x" * 65536
            try:
                while progress["sent"] < total:
                    yield chunk
                    progress["sent"] += len(chunk)
            finally:
                finished.set()

        return body()

    running = run_raw(loop_thread, app, threads=threads)
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            last = wait_until_stalled(lambda: progress["sent"])
            assert not finished.is_set()
            assert last < 32 * MiB, f"{last} bytes taken from the app while the client read nothing"
            received = 0
            while received < 8 * MiB:
                data = sock.recv(1 << 20)
                assert data
                received += len(data)
            wait_for(lambda: progress["sent"] > last, what="the worker to resume once the client reads")
    finally:
        running.stop()


# ================================================================ workers blocked on a client


@pytest.mark.parametrize("http2", [False, True], ids=["http1-chunked", "h2c"])
def test_large_upload_is_read_piece_by_piece_as_the_client_sends_it(loop_thread: BackgroundLoop, http2: bool) -> None:
    """The client sends the next piece only once the app has read the last
    one: the app must get each piece while the rest is still to come."""
    probe = InputProbe()
    pieces = [os.urandom(256 * 1024) for _ in range(16)]

    def paced() -> Iterator[bytes]:
        sent = 0
        for piece in pieces:
            yield piece
            sent += len(piece)
            wait_for(lambda: probe.progress >= sent, what=f"the app to read {sent} bytes before the rest is sent")

    running = run_raw(loop_thread, probe, threads=1)
    try:
        with httpx.Client(http1=not http2, http2=http2, timeout=TIMEOUT) as client:
            data = client.post(running.url("/?read-size"), content=paced()).json()
    finally:
        running.stop()
    assert data["sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()
    assert probe.progress == 16 * 256 * 1024


class BlockingApps:
    """Apps that block their worker on the client, chosen by PATH_INFO:
    ``/read`` reads ``wsgi.input`` to the end (records how that ended),
    ``/download`` streams ``DOWNLOAD`` bytes of ``x`` (records how much the
    server took and when the iterable is closed); anything else answers
    ``small``."""

    DOWNLOAD = 32 * MiB

    def __init__(self) -> None:
        self.reading = threading.Event()
        self.outcomes: list[str] = []
        self.sent = 0
        self.closed = threading.Event()

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        if path == "/read":
            stream, total = environ["wsgi.input"], 0
            try:
                while chunk := stream.read(65536):
                    total += len(chunk)
                    self.reading.set()
                outcome = f"read {total}"
            except OSError as exc:
                outcome = f"OSError: {exc}"
            self.outcomes.append(outcome)
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [outcome.encode()]
        if path == "/download":
            start_response("200 OK", [("Content-Type", "application/octet-stream")])
            return self._download()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"small"]

    def _download(self) -> Iterator[bytes]:
        chunk = b"x" * 65536
        try:
            while self.sent < self.DOWNLOAD:
                yield chunk
                self.sent += len(chunk)
        finally:
            self.closed.set()


def stalled_download(port: int, apps: BlockingApps) -> socket.socket:
    """A client that asks for ``/download`` and reads nothing, once the
    worker is blocked writing to it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.sendall(b"GET /download HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    wait_for(lambda: apps.sent > 0, what="the download to start")
    wait_until_stalled(lambda: apps.sent)
    return sock


def stalled_upload(port: int, apps: BlockingApps, head: str = "") -> socket.socket:
    """A client that sends half of a 2 MiB body and stops, once the worker
    has started reading it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock.sendall(
        f"POST /read HTTP/1.1\r\nHost: x\r\nContent-Length: {2 * MiB}\r\n{head}\r\n".encode() + os.urandom(MiB)
    )
    assert apps.reading.wait(TIMEOUT)
    return sock


def read_response(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (or resets) the connection."""
    raw = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            raw += chunk
    return raw


def test_a_slow_reader_on_one_thread_holds_the_next_request_only_until_it_reads(loop_thread: BackgroundLoop) -> None:
    apps = BlockingApps()
    running = run_raw(loop_thread, apps, threads=1)
    try:
        with stalled_download(running.port, apps) as sock:
            waiting: list[Any] = []
            second = threading.Thread(
                target=lambda: waiting.append(get(running.url("/next"), timeout=TIMEOUT + 10).text)
            )
            second.start()
            head = b""
            while b"\r\n\r\n" not in head and (chunk := sock.recv(65536)):
                head += chunk
            head, _, rest = head.partition(b"\r\n\r\n")
            received = rest.count(b"x")
            while chunk := sock.recv(1 << 20):
                received += chunk.count(b"x")  # the body is x's (and chunk sizes in hex)
            second.join(TIMEOUT + 15)
    finally:
        running.stop()
    assert head.startswith(b"HTTP/1.1 200 ")
    assert received == BlockingApps.DOWNLOAD
    assert waiting == ["small"]


def test_a_request_queued_behind_a_worker_blocked_reading_gets_the_idle_thread(loop_thread: BackgroundLoop) -> None:
    # The pool leaves a new request to a busy thread; one blocked on its
    # client must hand it on, or the GET below waits for the upload forever.
    apps = BlockingApps()
    running = run_raw(loop_thread, apps, threads=2)
    try:
        with stalled_upload(running.port, apps, "Connection: close\r\n") as sock:
            assert get(running.url("/next"), timeout=TIMEOUT).text == "small"
            sock.sendall(os.urandom(MiB))
            answer = read_response(sock)
    finally:
        running.stop()
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(f"read {2 * MiB}".encode())


def test_client_gone_while_a_worker_is_blocked_writing(loop_thread: BackgroundLoop) -> None:
    apps = BlockingApps()
    running = run_raw(loop_thread, apps, threads=1)
    try:
        sock = stalled_download(running.port, apps)
        sock.close()
        assert apps.closed.wait(TIMEOUT)  # the worker stopped writing and closed the iterable
        assert get(running.url("/next")).text == "small"  # and the one worker serves the next request
    finally:
        running.stop()
    assert apps.sent < BlockingApps.DOWNLOAD


def test_client_gone_while_a_worker_is_blocked_reading(loop_thread: BackgroundLoop) -> None:
    apps = BlockingApps()
    running = run_raw(loop_thread, apps, threads=1)
    try:
        stalled_upload(running.port, apps).close()
        wait_for(lambda: apps.outcomes, what="the blocked read to end")
        assert get(running.url("/next")).text == "small"
    finally:
        running.stop()
    assert apps.outcomes == ["OSError: request body unavailable: the client disconnected"]


def test_body_too_large_while_a_worker_is_blocked_reading(loop_thread: BackgroundLoop) -> None:
    apps = BlockingApps()
    running = run_raw(loop_thread, apps, threads=1, max_body_size=MiB)
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT) as sock:
            sock.sendall(b"POST /read HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            half = MiB // 2
            sock.sendall(f"{half:x}\r\n".encode() + os.urandom(half) + b"\r\n")
            assert apps.reading.wait(TIMEOUT)
            sock.sendall(f"{half + 1:x}\r\n".encode() + os.urandom(half + 1) + b"\r\n")  # one byte over
            raw = read_response(sock)
        wait_for(lambda: apps.outcomes, what="the blocked read to end")
    finally:
        running.stop()
    assert raw.startswith(b"HTTP/1.1 413 ")
    assert apps.outcomes == ["OSError: request body unavailable: request body exceeds max_body_size"]


def test_response_timeout_wakes_a_worker_blocked_reading(loop_thread: BackgroundLoop) -> None:
    apps = BlockingApps()
    running = run_raw(loop_thread, apps, threads=1, response_timeout=0.5)
    try:
        with stalled_upload(running.port, apps) as sock:
            raw = b""
            while b"in time" not in raw and (chunk := sock.recv(65536)):
                raw += chunk
        wait_for(lambda: apps.outcomes, what="the blocked read to end")
        assert get(running.url("/next")).text == "small"
    finally:
        running.stop()
    assert raw.startswith(b"HTTP/1.1 504 ")
    assert apps.outcomes == ["OSError: request body unavailable: the client disconnected"]


@pytest.mark.parametrize("blocked_in", ["read", "write"])
def test_shutdown_wakes_a_blocked_worker(loop_thread: BackgroundLoop, blocked_in: str) -> None:
    apps = BlockingApps()
    running = run_raw(loop_thread, apps, threads=1, shutdown_timeout=0.5)
    sock = stalled_upload(running.port, apps) if blocked_in == "read" else stalled_download(running.port, apps)
    try:
        running.stop()  # a graceful drain that gives up on the stalled client
        if blocked_in == "read":
            wait_for(lambda: apps.outcomes, what="the blocked read to end")
            assert apps.outcomes == ["OSError: request body unavailable: the client disconnected"]
        else:
            assert apps.closed.wait(TIMEOUT)
            assert apps.sent < BlockingApps.DOWNLOAD
    finally:
        sock.close()


def test_a_worker_thread_cannot_park_a_future(loop_thread: BackgroundLoop) -> None:
    """A request taken by a worker thread waits natively: parking a future,
    which only an event loop would resolve, is refused rather than left to
    hang, and the body is still there to read."""
    refusals: list[str] = []

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        native_request = environ["wsgi.input"]._native
        for park in (native_request.read, native_request.wait_disconnect):
            try:
                park(concurrent.futures.Future)
            except RuntimeError as exc:
                refusals.append(str(exc))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ["wsgi.input"].read()]

    running = run_raw(loop_thread, app)
    try:
        assert post(running.url("/"), data=b"payload").text == "payload"
    finally:
        running.stop()
    assert len(refusals) == 2 and all("read_blocking()" in refusal for refusal in refusals), refusals


def test_close_waits_for_the_worker_threads(loop_thread: BackgroundLoop) -> None:
    """The workers are gone once the server has closed: none is left to be
    stopped inside native code when the interpreter exits (that aborts the
    process)."""
    before = set(threading.enumerate())
    running = run_raw(loop_thread, BlockingApps(), threads=3)
    try:
        assert get(running.url("/x")).text == "small"
        workers = [t for t in threading.enumerate() if t not in before and t.name.startswith("server-native-wsgi-")]
    finally:
        running.stop()
    assert len(workers) == 3
    assert not [worker for worker in workers if worker.is_alive()]


class H2Client:
    """A frame-level HTTP/2 client (python-h2) on one connection, for what
    httpx cannot do: stop reading, or reset a stream mid-body."""

    def __init__(self, port: int) -> None:
        import h2.config
        import h2.connection

        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())

    def close(self) -> None:
        self.sock.close()

    def start(
        self, stream_id: int, method: str, path: str, end_stream: bool, extra: tuple[tuple[str, str], ...] = ()
    ) -> None:
        headers = [
            (":method", method),
            (":path", path),
            (":scheme", "http"),
            (":authority", f"127.0.0.1:{self.port}"),
            *extra,
        ]
        self.conn.send_headers(stream_id, headers, end_stream=end_stream)
        self.sock.sendall(self.conn.data_to_send())

    def send(self, stream_id: int, data: bytes) -> None:
        """Sends ``data`` as the server's flow-control windows allow."""
        while data:
            room = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size, len(data))
            if room > 0:
                self.conn.send_data(stream_id, data[:room])
                data = data[room:]
            else:
                self._receive()
            self.sock.sendall(self.conn.data_to_send())

    def reset(self, stream_id: int, error_code: int) -> None:
        self.conn.reset_stream(stream_id, error_code)
        self.sock.sendall(self.conn.data_to_send())

    def get(self, stream_id: int, path: str) -> bytes:
        """One GET on a new stream; its body (other streams' data is read and
        acknowledged on the way)."""
        import h2.events

        self.start(stream_id, "GET", path, end_stream=True)
        body = b""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            for event in self._receive():
                if isinstance(event, h2.events.DataReceived) and event.stream_id == stream_id:
                    body += event.data
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                    return body
            self.sock.sendall(self.conn.data_to_send())
        raise AssertionError(f"no answer on stream {stream_id}")

    def _receive(self) -> list[Any]:
        import h2.events

        data = self.sock.recv(65536)
        assert data, "the server closed the connection"
        events = self.conn.receive_data(data)
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        return events


@pytest.mark.parametrize(
    ("blocked_in", "error_code"),
    [("read", "CANCEL"), ("read", "NO_ERROR"), ("write", "CANCEL")],
)
def test_h2_stream_reset_while_a_worker_is_blocked(
    loop_thread: BackgroundLoop, blocked_in: str, error_code: str
) -> None:
    """The client resets its stream while the one worker waits on it; the
    worker goes on to the next request on the same connection. (hyper ends
    a body reset with NO_ERROR as if it were complete: short of its
    Content-Length it must still read as cut off.)"""
    import h2.errors

    apps = BlockingApps()
    running = run_raw(loop_thread, apps, threads=1)
    client = H2Client(running.port)
    try:
        if blocked_in == "read":
            client.start(1, "POST", "/read", end_stream=False, extra=(("content-length", str(MiB)),))
            client.send(1, os.urandom(256 * 1024))
            assert apps.reading.wait(TIMEOUT)
        else:
            client.start(1, "GET", "/download", end_stream=True)  # and read nothing
            wait_for(lambda: apps.sent > 0, what="the download to start")
            wait_until_stalled(lambda: apps.sent)
        client.reset(1, h2.errors.ErrorCodes[error_code])
        assert client.get(3, "/next") == b"small"
    finally:
        client.close()
        running.stop()
    if blocked_in == "read":
        assert apps.outcomes == ["OSError: request body unavailable: the client disconnected"]
    else:
        assert apps.closed.is_set() and apps.sent < BlockingApps.DOWNLOAD
