"""Static files served natively (``static_files``): real clients (httpx over
HTTP/1.1 and HTTP/2, curl, raw sockets, aioquic over HTTP/3) against a real
server, on both transports and every interface, and the application is
never called for a path under a static route.

What is checked: types, lengths and validators; 304 from If-None-Match and
If-Modified-Since; 206, 416 and If-Range; HEAD; 405 for other methods;
directories and their index; traversal in every spelling and symlinks out of
the mount (never a byte of the file outside); a 20 MiB file by hash; the
command line's Granian-style options; and what is logged."""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import logging
import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from apps.harness import serving, wait_for
from cliserver import serve_once
from conftest import (
    BackgroundLoop,
    Certificates,
    LogLines,
    RunningServer,
    requires_curl,
)
from test_cli import serving as cli_serving
from test_http3 import connect, run, start_h3

from server_native import ServerConfig
from server_native.interfaces.asgi import serve_asgi
from server_native.interfaces.direct import NativeDirectResponse, serve_native_direct
from server_native.interfaces.wsgi import serve_wsgi

TIMEOUT = 10
MIB = 1024 * 1024
HELLO = b"hello, static world\n"
SECRET = b"TOP-SECRET-OUTSIDE-THE-MOUNT"
BIG_SIZE = 20 * MIB


@dataclass
class Site:
    """A directory to serve, a secret file beside it, and a 20 MiB file."""

    public: Path
    secret: Path
    big_sha256: str


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    root = tmp_path_factory.mktemp("site")
    public = root / "public"
    (public / "sub").mkdir(parents=True)
    (public / "hello.txt").write_bytes(HELLO)
    (public / "style.css").write_text("body { color: red }\n")
    (public / "app.js").write_text("console.log('hi')\n")
    (public / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (public / "blob.unknownextension").write_bytes(b"\x00\x01")
    (public / "empty.txt").write_bytes(b"")
    (public / "sub" / "index.html").write_text("<h1>index</h1>\n")
    (public / "sub" / "page.html").write_text("<h1>page</h1>\n")
    (public / "café.txt").write_text("accented\n")
    secret = root / "secret.txt"
    secret.write_bytes(SECRET)
    (public / "inside-link.txt").symlink_to("hello.txt")
    (public / "escape.txt").symlink_to(secret)
    (public / "escape-dir").symlink_to(root)
    os.mkfifo(public / "fifo")
    block = hashlib.sha256(b"seed").digest() * 4096  # 128 KiB
    big = (block * (BIG_SIZE // len(block) + 1))[:BIG_SIZE]
    (public / "big.bin").write_bytes(big)
    return Site(public, secret, hashlib.sha256(big).hexdigest())


class RecordingApp:
    """A NativeHttpServer handler that notes every path it is called for."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def __call__(self, request: Any) -> None:
        self.paths.append(request.uri.path)
        request.response.write("from the app")


@pytest.fixture
def static_server(serve: Callable[..., RunningServer], site: Site) -> Callable[..., tuple[RunningServer, RecordingApp]]:
    """``static_server(**options)``: a server with ``/static`` mounted on the
    site (both transports, through ``serve``), and its recording app."""

    def start(**options: Any) -> tuple[RunningServer, RecordingApp]:
        options.setdefault("static_files", [("/static", site.public)])
        app = RecordingApp()
        return serve(app, **options), app

    return start


def mtime_date(path: Path) -> str:
    return email.utils.formatdate(int(path.stat().st_mtime), usegmt=True)


# ---------------------------------------------------------------- files and their headers


def test_a_file_is_served_with_its_type_length_and_validators(static_server: Any, site: Site) -> None:
    running, app = static_server()
    with httpx.Client(timeout=TIMEOUT) as client:
        response = client.get(running.url("/static/hello.txt"))
    assert response.status_code == 200
    assert response.content == HELLO
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.headers["content-length"] == str(len(HELLO))
    assert response.headers["last-modified"] == mtime_date(site.public / "hello.txt")
    assert response.headers["etag"].startswith('"') and response.headers["etag"].endswith('"')
    assert response.headers["cache-control"] == "max-age=86400"
    assert response.headers["accept-ranges"] == "bytes"
    assert "connection" not in response.headers
    assert app.paths == []


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("style.css", "text/css; charset=utf-8"),
        ("app.js", "text/javascript; charset=utf-8"),
        ("picture.png", "image/png"),
        ("sub/page.html", "text/html; charset=utf-8"),
        ("blob.unknownextension", "application/octet-stream"),
    ],
)
def test_content_type_by_extension(static_server: Any, name: str, content_type: str) -> None:
    running, _ = static_server()
    response = httpx.get(running.url(f"/static/{name}"), timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.headers["content-type"] == content_type


def test_an_empty_file_and_a_percent_encoded_name(static_server: Any) -> None:
    running, _ = static_server()
    with httpx.Client(timeout=TIMEOUT) as client:
        empty = client.get(running.url("/static/empty.txt"))
        accented = client.get(running.url("/static/caf%C3%A9.txt"))
    assert (empty.status_code, empty.content, empty.headers["content-length"]) == (200, b"", "0")
    assert (accented.status_code, accented.content) == (200, b"accented\n")


def test_expires_sets_cache_control_and_zero_sends_none(static_server: Any) -> None:
    hourly, _ = static_server(static_files_expires=3600)
    never, _ = static_server(static_files_expires=0)
    assert httpx.get(hourly.url("/static/hello.txt"), timeout=TIMEOUT).headers["cache-control"] == "max-age=3600"
    assert "cache-control" not in httpx.get(never.url("/static/hello.txt"), timeout=TIMEOUT).headers


def test_paths_outside_the_routes_reach_the_app(static_server: Any) -> None:
    running, app = static_server()
    with httpx.Client(timeout=TIMEOUT) as client:
        for path in ("/staticfile", "/other/hello.txt", "/"):
            assert client.get(running.url(path)).text == "from the app"
    assert app.paths == ["/staticfile", "/other/hello.txt", "/"]


def test_mounts_are_matched_in_order(static_server: Any, site: Site) -> None:
    running, app = static_server(static_files=[("/static/sub", site.public), ("/static/", site.public / "sub")])
    with httpx.Client(timeout=TIMEOUT) as client:
        first = client.get(running.url("/static/sub/hello.txt"))
        second = client.get(running.url("/static/page.html"))
    assert (first.status_code, first.content) == (200, HELLO)
    assert (second.status_code, second.text) == (200, "<h1>page</h1>\n")
    assert app.paths == []


# ---------------------------------------------------------------- conditional requests


def test_if_none_match_and_if_modified_since_answer_304(static_server: Any, site: Site) -> None:
    running, app = static_server()
    url = running.url("/static/hello.txt")
    with httpx.Client(timeout=TIMEOUT) as client:
        first = client.get(url)
        etag, modified = first.headers["etag"], first.headers["last-modified"]
        earlier = email.utils.formatdate(int((site.public / "hello.txt").stat().st_mtime) - 60, usegmt=True)
        answers = {
            "matching tag": client.get(url, headers={"if-none-match": etag}),
            "weak tag in a list": client.get(url, headers={"if-none-match": f'"other", W/{etag}'}),
            "any": client.get(url, headers={"if-none-match": "*"}),
            "same date": client.get(url, headers={"if-modified-since": modified}),
            "other tag": client.get(url, headers={"if-none-match": '"other"'}),
            "earlier date": client.get(url, headers={"if-modified-since": earlier}),
            # If-None-Match decides alone when both are sent (RFC 9110 13.2.2).
            "other tag, same date": client.get(
                url, headers={"if-none-match": '"other"', "if-modified-since": modified}
            ),
        }
    statuses = {why: response.status_code for why, response in answers.items()}
    assert statuses == {
        "matching tag": 304, "weak tag in a list": 304, "any": 304, "same date": 304,
        "other tag": 200, "earlier date": 200, "other tag, same date": 200,
    }  # fmt: skip
    not_modified = answers["matching tag"]
    assert not_modified.content == b""
    assert not_modified.headers["etag"] == etag
    assert not_modified.headers["cache-control"] == "max-age=86400"
    assert "content-length" not in not_modified.headers
    assert app.paths == []


def test_a_changed_file_gets_a_new_etag(static_server: Any, site: Site) -> None:
    running, _ = static_server()
    changing = site.public / "changing.txt"
    changing.write_bytes(b"one")
    try:
        url = running.url("/static/changing.txt")
        before = httpx.get(url, timeout=TIMEOUT).headers["etag"]
        changing.write_bytes(b"three")
        after = httpx.get(url, headers={"if-none-match": before}, timeout=TIMEOUT)
    finally:
        changing.unlink()
    assert (after.status_code, after.content) == (200, b"three")
    assert after.headers["etag"] != before


# ---------------------------------------------------------------- ranges


@pytest.mark.parametrize(
    ("value", "content_range", "body"),
    [
        ("bytes=0-4", "bytes 0-4/20", HELLO[:5]),
        ("bytes=7-", "bytes 7-19/20", HELLO[7:]),
        ("bytes=-6", "bytes 14-19/20", HELLO[-6:]),
        ("bytes=15-1000", "bytes 15-19/20", HELLO[15:]),
        ("bytes=-1000", "bytes 0-19/20", HELLO),
        ("BYTES = 19-19", "bytes 19-19/20", HELLO[19:]),
    ],
)
def test_a_single_range_answers_206(static_server: Any, value: str, content_range: str, body: bytes) -> None:
    running, _ = static_server()
    response = httpx.get(running.url("/static/hello.txt"), headers={"range": value}, timeout=TIMEOUT)
    assert response.status_code == 206
    assert response.headers["content-range"] == content_range
    assert response.headers["content-length"] == str(len(body))
    assert response.content == body


@pytest.mark.parametrize("value", ["bytes=20-", "bytes=1000-2000", "bytes=-0", "bytes=99999999999999999999999-"])
def test_a_range_past_the_end_answers_416(static_server: Any, value: str) -> None:
    running, app = static_server()
    response = httpx.get(running.url("/static/hello.txt"), headers={"range": value}, timeout=TIMEOUT)
    assert response.status_code == 416
    assert response.headers["content-range"] == "bytes */20"
    assert "connection" not in response.headers
    assert app.paths == []


@pytest.mark.parametrize(
    "value",
    # several ranges are answered with the whole file; so is a header that is not a byte range
    ["bytes=0-1,5-6", "bytes=0-1, -3", "items=0-4", "bytes=5-2", "bytes=a-b", "bytes=0-4;x", "0-4"],
)
def test_several_or_malformed_ranges_get_the_whole_file(static_server: Any, value: str) -> None:
    running, _ = static_server()
    response = httpx.get(running.url("/static/hello.txt"), headers={"range": value}, timeout=TIMEOUT)
    assert (response.status_code, response.content) == (200, HELLO)
    assert "content-range" not in response.headers


def test_if_range_applies_the_range_only_to_the_same_file(static_server: Any) -> None:
    running, _ = static_server()
    url = running.url("/static/hello.txt")
    with httpx.Client(timeout=TIMEOUT) as client:
        first = client.get(url)
        etag, modified = first.headers["etag"], first.headers["last-modified"]

        def ranged(if_range: str) -> int:
            return client.get(url, headers={"range": "bytes=0-4", "if-range": if_range}).status_code

        assert ranged(etag) == 206
        assert ranged(modified) == 206
        assert ranged('"other"') == 200
        assert ranged(f"W/{etag}") == 200  # If-Range compares strongly
        assert ranged("Mon, 01 Jan 2001 00:00:00 GMT") == 200


def test_head_and_range_is_the_whole_file_head(static_server: Any) -> None:
    running, _ = static_server()
    response = httpx.head(running.url("/static/hello.txt"), headers={"range": "bytes=0-4"}, timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.headers["content-length"] == str(len(HELLO))


# ---------------------------------------------------------------- methods


def test_head_sends_the_headers_alone_and_the_connection_goes_on(static_server: Any, site: Site) -> None:
    running, _ = static_server()
    connection = http.client.HTTPConnection("127.0.0.1", running.port, timeout=TIMEOUT)
    try:
        connection.request("HEAD", "/static/big.bin")
        head = connection.getresponse()
        assert head.status == 200 and head.read() == b""
        assert head.getheader("content-length") == str(BIG_SIZE)
        assert head.getheader("content-type") == "application/octet-stream"
        connection.request("GET", "/static/hello.txt")
        after = connection.getresponse()
        assert (after.status, after.read()) == (200, HELLO)
    finally:
        connection.close()


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_answer_405_without_the_app(static_server: Any, method: str) -> None:
    running, app = static_server()
    with httpx.Client(timeout=TIMEOUT) as client:
        refused = client.request(method, running.url("/static/hello.txt"), content=b"x" * 10)
        after = client.get(running.url("/static/hello.txt"))
    assert refused.status_code == 405
    assert refused.headers["allow"] == "GET, HEAD"
    assert after.status_code == 200
    assert app.paths == []


# ---------------------------------------------------------------- what is not a file


@pytest.mark.parametrize(
    "path",
    [
        "/static/missing.txt",
        "/static/sub/",
        "/static/sub",
        "/static/",
        "/static",
        "/static/hello.txt/",
        "/static/hello.txt/x",
        "/static/fifo",
    ],
)
def test_what_is_not_a_file_is_404_without_the_app(static_server: Any, path: str) -> None:
    running, app = static_server()
    with httpx.Client(timeout=TIMEOUT) as client:
        missing = client.get(running.url(path))
        after = client.get(running.url("/static/hello.txt"))
    assert (missing.status_code, missing.text) == (404, "not found")
    assert "connection" not in missing.headers
    assert after.status_code == 200
    assert app.paths == []


def test_a_directory_serves_its_index_when_one_is_named(static_server: Any) -> None:
    running, _ = static_server(static_files_index="index.html")
    with httpx.Client(timeout=TIMEOUT) as client:
        for path in ("/static/sub/", "/static/sub"):
            response = client.get(running.url(path))
            assert (response.status_code, response.text) == (200, "<h1>index</h1>\n"), path
            assert response.headers["content-type"] == "text/html; charset=utf-8"
        assert client.get(running.url("/static/")).status_code == 404  # the mount has no index.html


# ---------------------------------------------------------------- traversal


def raw_exchange(port: int, target: bytes) -> bytes:
    """One raw request for ``target``; everything the server sends back."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


TRAVERSALS = [
    b"/static/../secret.txt",
    b"/static/sub/../../secret.txt",
    b"/static/%2e%2e/secret.txt",
    b"/static/%2E%2E/secret.txt",
    b"/static/.%2e/secret.txt",
    b"/static/..%2fsecret.txt",
    b"/static/sub%2f..%2f..%2fsecret.txt",
    b"/static/%2e%2e%2fsecret.txt",
    b"/static/..%5csecret.txt",
    b"/static/..\\secret.txt",
    b"/static/%2fetc%2fpasswd",
    b"/static//etc/passwd",
    b"/static/../../../../../../etc/passwd",
    b"/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    b"/static/%252e%252e/secret.txt",
    b"/static/hello.txt%00.png",
    b"/static/%00",
    b"/static/%c0%ae%c0%ae/secret.txt",
    b"/static/escape.txt",
    b"/static/escape-dir/secret.txt",
    b"/static/escape-dir/public/../secret.txt",
    b"http://127.0.0.1/static/../secret.txt",
]


@pytest.mark.parametrize("target", TRAVERSALS, ids=[t.decode() for t in TRAVERSALS])
def test_traversal_never_leaves_the_mount(static_server: Any, target: bytes) -> None:
    running, app = static_server()
    received = raw_exchange(running.port, target)
    status = int(received.split(b" ", 2)[1])
    assert status in (400, 404), received[:200]
    assert SECRET not in received and b"root:" not in received
    assert app.paths == []


@requires_curl
def test_curl_as_is_traversal_and_download(static_server: Any, site: Site, tmp_path: Path) -> None:
    running, app = static_server()
    curl = shutil.which("curl") or "curl"

    def fetch(path: str, *options: str) -> subprocess.CompletedProcess[bytes]:
        args = [
            curl,
            "-sS",
            "--path-as-is",
            "-o",
            str(tmp_path / "out"),
            "-w",
            "%{http_code}",
            *options,
            running.url(path),
        ]
        return subprocess.run(args, capture_output=True, timeout=60, check=True)

    assert fetch("/static/../secret.txt").stdout == b"404"
    assert SECRET not in (tmp_path / "out").read_bytes()
    assert fetch("/static/big.bin").stdout == b"200"
    assert hashlib.sha256((tmp_path / "out").read_bytes()).hexdigest() == site.big_sha256
    assert fetch("/static/big.bin", "-r", "131000-400000").stdout == b"206"
    with (site.public / "big.bin").open("rb") as big:
        big.seek(131000)
        assert (tmp_path / "out").read_bytes() == big.read(400000 - 131000 + 1)
    assert app.paths == []


@pytest.mark.parametrize("path", ["/static/inside-link.txt", "/static/escape-dir/public/hello.txt"])
def test_a_symlink_whose_file_is_inside_the_mount_is_followed(static_server: Any, path: str) -> None:
    running, _ = static_server()
    response = httpx.get(running.url(path), timeout=TIMEOUT)
    assert (response.status_code, response.content) == (200, HELLO)


@pytest.mark.parametrize(
    ("method", "target", "logged", "level"),
    [
        (
            "GET",
            "/static/escape.txt",
            "/static/escape.txt: a link out of its static directory: answered 404",
            logging.WARNING,
        ),
        (
            "GET",
            "/static/%2e%2e/secret.txt",
            "/static/%2e%2e/secret.txt: a path that leaves its static directory: answered 404",
            logging.WARNING,
        ),
        (
            "DELETE",
            "/static/hello.txt",
            "DELETE /static/hello.txt: a static file is only read: answered 405",
            logging.INFO,
        ),
    ],
)
def test_refusals_are_logged(
    static_server: Any, server_log: LogLines, method: str, target: str, logged: str, level: int
) -> None:
    running, _ = static_server()
    connection = http.client.HTTPConnection("127.0.0.1", running.port, timeout=TIMEOUT)
    try:
        connection.request(method, target)
        connection.getresponse().read()
    finally:
        connection.close()
    assert server_log.levels[server_log.wait(logged)] == level


# ---------------------------------------------------------------- a large file on every protocol


def test_a_20_mib_file_over_http1(static_server: Any, site: Site) -> None:
    running, _ = static_server()
    digest = hashlib.sha256()
    with httpx.stream("GET", running.url("/static/big.bin"), timeout=60) as response:
        assert response.headers["content-length"] == str(BIG_SIZE)
        for chunk in response.iter_bytes():
            digest.update(chunk)
    assert digest.hexdigest() == site.big_sha256


def evicted_from_page_cache(path: Path) -> bool:
    """Drops the file's pages; whether a read that must not wait now fails."""
    with path.open("rb") as file:
        os.fsync(file.fileno())
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        try:
            os.preadv(file.fileno(), [bytearray(4096)], 0, os.RWF_NOWAIT)
        except BlockingIOError:
            return True
    return False


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="reads from the page cache alone are a Linux feature")
def test_a_file_out_of_the_page_cache_is_read_on_blocking_threads(
    static_server: Any, tmp_path: Path, site: Site
) -> None:
    running, _ = static_server(static_files=[("/static", tmp_path)])
    data = (site.public / "big.bin").read_bytes()[: 4 * MIB + 12345]
    (tmp_path / "cold.bin").write_bytes(data)
    with httpx.Client(timeout=60) as client:
        if not evicted_from_page_cache(tmp_path / "cold.bin"):
            pytest.skip("this file system keeps files in memory (tmpfs?)")
        whole = client.get(running.url("/static/cold.bin"))
        # Pages the server's read-ahead still has under I/O cannot be dropped yet.
        wait_for(lambda: evicted_from_page_cache(tmp_path / "cold.bin"), what="the file's pages dropped")
        part = client.get(running.url("/static/cold.bin"), headers={"range": "bytes=1000000-3000000"})
    assert whole.status_code == 200 and hashlib.sha256(whole.content).digest() == hashlib.sha256(data).digest()
    assert part.status_code == 206 and part.content == data[1000000:3000001]


def tls_client(certs: Certificates, http2: bool) -> httpx.Client:
    context = ssl.create_default_context(cafile=str(certs.ca_path))
    return httpx.Client(verify=context, http1=not http2, http2=http2, timeout=60)


def test_http2_file_range_304_head_and_a_20_mib_file(static_server: Any, site: Site, certs: Certificates) -> None:
    running, app = static_server(certificate_path=certs.cert_path, key_path=certs.key_path)
    with tls_client(certs, http2=True) as client:
        whole = client.get(running.url("/static/hello.txt"))
        assert (whole.http_version, whole.status_code, whole.content) == ("HTTP/2", 200, HELLO)
        assert (
            client.get(running.url("/static/hello.txt"), headers={"if-none-match": whole.headers["etag"]}).status_code
            == 304
        )
        part = client.get(running.url("/static/hello.txt"), headers={"range": "bytes=0-4"})
        assert (part.status_code, part.content, part.headers["content-range"]) == (206, HELLO[:5], "bytes 0-4/20")
        head = client.head(running.url("/static/big.bin"))
        assert (head.status_code, head.content, head.headers["content-length"]) == (200, b"", str(BIG_SIZE))
        assert client.get(running.url("/static/missing")).status_code == 404
        big = client.get(running.url("/static/big.bin"))
    assert hashlib.sha256(big.content).hexdigest() == site.big_sha256
    assert app.paths == []


def test_http3_file_range_head_traversal_and_a_20_mib_file(
    serve: Callable[..., RunningServer], site: Site, loop_thread: BackgroundLoop, certs: Certificates
) -> None:
    app = RecordingApp()
    running = start_h3(serve, certs, app, static_files=[("/static", site.public)])

    async def scenario() -> dict[str, Any]:
        async with connect(running.port, certs) as client:
            return {
                "whole": await client.request("GET", "/static/hello.txt"),
                "part": await client.request("GET", "/static/hello.txt", headers=[("range", "bytes=-6")]),
                "head": await client.request("HEAD", "/static/hello.txt"),
                "escape": await client.request("GET", "/static/%2e%2e/secret.txt"),
                "big": await client.request("GET", "/static/big.bin", timeout=120),
            }

    got = run(loop_thread, scenario(), timeout=150)
    assert (got["whole"].status, got["whole"].body) == (200, HELLO)
    assert got["whole"].header("content-type") == "text/plain; charset=utf-8"
    assert (got["part"].status, got["part"].body, got["part"].header("content-range")) == (
        206,
        HELLO[-6:],
        "bytes 14-19/20",
    )
    assert (got["head"].status, got["head"].body, got["head"].header("content-length")) == (200, b"", "20")
    assert got["escape"].status == 404 and SECRET not in got["escape"].body
    assert got["big"].header("content-length") == str(BIG_SIZE)
    assert hashlib.sha256(got["big"].body).hexdigest() == site.big_sha256
    assert app.paths == []


# ---------------------------------------------------------------- every interface


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    CALLED.append(scope["path"])
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"from the app"})


def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    CALLED.append(environ["PATH_INFO"])
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"from the app"]


def direct_app(request: Any) -> Any:
    CALLED.append(request.path)
    return NativeDirectResponse.bytes(200, [("content-type", "text/plain")], b"from the app")


#: Paths the interface apps were called for.
CALLED: list[str] = []


@pytest.mark.parametrize(
    ("helper", "app", "options"),
    [
        (serve_asgi, asgi_app, {"lifespan": "off"}),
        (serve_asgi, asgi_app, {"lifespan": "off", "native_callback": False}),
        (serve_wsgi, wsgi_app, {}),
        (serve_native_direct, direct_app, {}),
        (serve_native_direct, direct_app, {"native_direct": True}),
    ],
    ids=["asgi", "asgi-bridge", "wsgi", "direct", "direct-thread"],
)
def test_every_interface_serves_files_without_the_app(
    site: Site, helper: Any, app: Any, options: dict[str, Any]
) -> None:
    CALLED.clear()
    with serving(helper, app, static_files=[("/static", site.public)], **options) as running:
        with httpx.Client(timeout=TIMEOUT) as client:
            assert client.get(running.url("/static/hello.txt")).content == HELLO
            assert client.get(running.url("/static/missing")).status_code == 404
            assert client.get(running.url("/static/hello.txt"), headers={"range": "bytes=0-4"}).content == HELLO[:5]
            assert client.get(running.url("/elsewhere")).text == "from the app"
    assert CALLED == ["/elsewhere"]


# ---------------------------------------------------------------- settings and the command line


def test_settings_are_checked(site: Site, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="route is a path"):
        ServerConfig(static_files=[("static", site.public)])
    with pytest.raises(NotADirectoryError):
        ServerConfig(static_files=[("/static", tmp_path / "missing")])
    with pytest.raises(NotADirectoryError):
        ServerConfig(static_files=[("/static", site.public / "hello.txt")])
    with pytest.raises(ValueError, match="static_files_expires"):
        ServerConfig(static_files_expires=-1)
    with pytest.raises(ValueError, match="static_files_index"):
        ServerConfig(static_files_index="../index.html")
    relative = ServerConfig(static_files=[("/static", os.path.relpath(site.public))])
    assert relative.static_files == (("/static", os.path.realpath(site.public)),)


def test_cli_granian_options(app_dir: Path, site: Site) -> None:
    (app_dir / "assets").mkdir()
    (app_dir / "assets" / "a.css").write_text("a {}\n")
    options = (
        "--static-path-route", "/static", "--static-path-mount", str(site.public),
        "--static-path-route", "/assets", "--static-path-mount", "assets",
        "--static-path-expires", "1h30m", "--static-path-dir-to-file", "index.html",
    )  # fmt: skip
    with cli_serving(app_dir, "cliapp:app", *options) as (_, port):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT) as client:
            hello = client.get("/static/hello.txt")
            css = client.get("/assets/a.css")
            index = client.get("/static/sub/")
            app = client.get("/elsewhere")
    assert (hello.content, hello.headers["cache-control"]) == (HELLO, "max-age=5400")
    assert (css.text, css.headers["content-type"]) == ("a {}\n", "text/css; charset=utf-8")
    assert index.text == "<h1>index</h1>\n"
    assert app.status_code == 200 and "root=" in app.text


def test_cli_one_mount_alone_is_served_under_static(app_dir: Path, site: Site) -> None:
    with cli_serving(app_dir, "cliapp:app", "--static-path-mount", str(site.public)) as (_, port):
        response = httpx.get(f"http://127.0.0.1:{port}/static/hello.txt", timeout=TIMEOUT)
    assert (response.content, response.headers["cache-control"]) == (HELLO, "max-age=86400")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--static-path-route", "/a", "--static-path-route", "/b", "--static-path-mount", "."), "go in pairs"),
        (("--static-path-mount", "no-such-directory"), "not a directory"),
        (("--static-path-mount", ".", "--static-path-expires", "soon"), "a duration is"),
    ],
)
def test_cli_refuses_bad_static_options(app_dir: Path, args: tuple[str, ...], message: str) -> None:
    result = serve_once(app_dir, *args)
    assert result.returncode == 2
    assert message in result.stderr
