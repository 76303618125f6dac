"""The dart:io SDK-derived parity cases of the Dart server_native test suite,
ported: each runs against a real server on a loopback socket with real
clients (http.client, raw sockets)."""

from __future__ import annotations

import http.client
import socket
from collections.abc import Callable
from typing import Any

import pytest

from server_native import ContentType, HttpException, HttpRequest

try:
    from .conftest import RunningServer, requires_ipv6
except ImportError:  # tests/ run as a plain directory
    from conftest import RunningServer, requires_ipv6  # type: ignore[no-redef]

Serve = Callable[..., RunningServer]
TIMEOUT = 10


# ---------------------------------------------------------------- helpers


def get(
    server: RunningServer, path: str = "/", method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[http.client.HTTPResponse, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def connect(port: int, host: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection((host, port), timeout=TIMEOUT)
    return sock


def exchange(sock: socket.socket, request: bytes, method: str = "GET") -> tuple[http.client.HTTPResponse, bytes]:
    """Sends a raw request and parses one response off the socket."""
    sock.sendall(request)
    response = http.client.HTTPResponse(sock, method=method)
    response.begin()
    body = response.read()
    return response, body


def assert_closed_by_server(sock: socket.socket) -> None:
    """The server closed the connection: the next read sees EOF (bounded)."""
    sock.settimeout(5)
    try:
        data = sock.recv(1)
    except ConnectionResetError:
        return
    assert data == b"", f"expected EOF, got {data!r}"


def assert_still_open(sock: socket.socket, host: bytes = b"127.0.0.1") -> None:
    """The connection is still usable: a second request on it is answered."""
    response, _ = exchange(sock, b"GET /again HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert response.status == 200


def assert_truncated(conn: http.client.HTTPConnection, declared: int) -> None:
    """The response to the request just sent on ``conn`` fails on the client:
    either the connection drops before the head, or the head promises
    ``declared`` bytes and the body ends short of them."""
    try:
        response = conn.getresponse()
    except http.client.RemoteDisconnected:
        return
    assert response.getheader("content-length") == str(declared)
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        response.read()


# ---------------------------------------------------------------- default headers


async def _empty(request: HttpRequest) -> None:
    await request.response.close()


def test_default_response_headers(serve: Serve) -> None:
    server = serve(_empty)
    response, body = get(server)
    assert response.status == 200
    assert body == b""
    assert response.getheader("content-type") == "text/plain; charset=utf-8"
    assert response.getheader("x-frame-options") == "SAMEORIGIN"
    assert response.getheader("x-content-type-options") == "nosniff"


def test_default_response_headers_are_on_the_server_object(serve: Serve) -> None:
    server = serve(_empty)
    defaults = server.server.default_response_headers
    assert defaults.value("content-type") == "text/plain; charset=utf-8"
    assert defaults.value("x-frame-options") == "SAMEORIGIN"
    assert defaults.value("x-content-type-options") == "nosniff"


def test_cleared_default_response_headers(serve: Serve) -> None:
    server = serve(_empty)
    server.server.default_response_headers.clear()
    response, _ = get(server)
    assert response.status == 200
    names = {name.lower() for name, _ in response.getheaders()}
    assert "content-type" not in names
    assert "x-frame-options" not in names
    assert "x-content-type-options" not in names


def test_cleared_plus_custom_default_response_headers(serve: Serve) -> None:
    server = serve(_empty)
    defaults = server.server.default_response_headers
    defaults.clear()
    defaults.add("x-test-header", "test-value")
    defaults.add("x-test-multi", "one")
    defaults.add("x-test-multi", "two")
    response, _ = get(server)
    assert response.status == 200
    assert response.getheader("x-test-header") == "test-value"
    assert response.msg.get_all("x-test-multi") == ["one", "two"]
    names = {name.lower() for name, _ in response.getheaders()}
    assert "content-type" not in names
    assert "x-frame-options" not in names
    assert "x-content-type-options" not in names


def test_default_headers_changed_between_requests(serve: Serve) -> None:
    """The defaults are read per response, not frozen at the first one."""
    server = serve(_empty)
    first, _ = get(server)
    assert first.getheader("x-frame-options") == "SAMEORIGIN"
    server.server.default_response_headers.set("x-frame-options", "DENY")
    second, _ = get(server)
    assert second.getheader("x-frame-options") == "DENY"


def test_response_headers_start_as_a_copy_of_the_defaults(serve: Serve) -> None:
    async def handler(request: HttpRequest) -> None:
        if request.uri.path == "/modify":
            request.response.headers.remove_all("x-frame-options")
            request.response.headers.add("x-extra", "1")
        await request.response.close()

    server = serve(handler)
    response, _ = get(server, "/modify")
    assert response.getheader("x-frame-options") is None
    assert response.getheader("x-content-type-options") == "nosniff"
    assert response.getheader("x-extra") == "1"
    # The per-response change did not leak into the server's defaults.
    assert server.server.default_response_headers.value("x-frame-options") == "SAMEORIGIN"
    again, _ = get(server)
    assert again.getheader("x-frame-options") == "SAMEORIGIN"
    assert again.getheader("x-extra") is None


# ---------------------------------------------------------------- charset of write()

NON_ASCII = "æøå"


def test_write_encodes_utf8_with_the_default_content_type(serve: Serve) -> None:
    async def handler(request: HttpRequest) -> None:
        request.response.write(NON_ASCII)
        await request.response.close()

    response, body = get(serve(handler))
    assert response.getheader("content-type") == "text/plain; charset=utf-8"
    assert body == NON_ASCII.encode("utf-8")
    assert body == b"\xc3\xa6\xc3\xb8\xc3\xa5"


def test_write_encodes_latin1_when_the_content_type_has_no_charset(serve: Serve) -> None:
    async def handler(request: HttpRequest) -> None:
        request.response.headers.content_type = ContentType("text", "plain")
        request.response.write(NON_ASCII)
        await request.response.close()

    response, body = get(serve(handler))
    assert response.getheader("content-type") == "text/plain"
    assert body == NON_ASCII.encode("latin-1")
    assert body == b"\xe6\xf8\xe5"


def test_write_encodes_latin1_when_cleared_defaults_leave_no_content_type(serve: Serve) -> None:
    async def handler(request: HttpRequest) -> None:
        request.response.write(NON_ASCII)
        await request.response.close()

    server = serve(handler)
    server.server.default_response_headers.clear()
    response, body = get(server)
    assert response.getheader("content-type") is None
    assert body == b"\xe6\xf8\xe5"


def test_write_uses_an_explicit_charset(serve: Serve) -> None:
    async def handler(request: HttpRequest) -> None:
        request.response.headers.content_type = ContentType("text", "plain", charset="utf-16-le")
        request.response.write(NON_ASCII)
        await request.response.close()

    response, body = get(serve(handler))
    assert body == NON_ASCII.encode("utf-16-le")


def test_write_of_a_character_outside_latin1_without_charset_fails(serve: Serve) -> None:
    errors: list[BaseException] = []

    async def handler(request: HttpRequest) -> None:
        request.response.headers.content_type = ContentType("text", "plain")
        try:
            request.response.write("€")
        except UnicodeEncodeError as exc:
            errors.append(exc)
        request.response.write("ok")
        await request.response.close()

    response, body = get(serve(handler))
    assert response.status == 200
    assert body == b"ok"
    assert len(errors) == 1


# ---------------------------------------------------------------- Connection / persistent_connection


class Recorder:
    """A handler that records what it saw of each request and answers 'ok'."""

    def __init__(self, prepare: Callable[[HttpRequest], None] | None = None) -> None:
        self.seen: list[dict[str, Any]] = []
        self._prepare = prepare

    async def __call__(self, request: HttpRequest) -> None:
        self.seen.append(
            {
                "request_persistent": request.persistent_connection,
                "response_persistent": request.response.persistent_connection,
                "version": request.protocol_version,
                "remote_port": request.connection_info.remote_port,
                "connection": request.headers.get_all("connection"),
            }
        )
        if self._prepare is not None:
            self._prepare(request)
        request.response.write("ok")
        await request.response.close()


def test_http11_is_persistent_by_default(serve: Serve) -> None:
    recorder = Recorder()
    server = serve(recorder)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    try:
        for _ in range(3):
            conn.request("GET", "/")
            response = conn.getresponse()
            assert response.read() == b"ok"
            assert (response.getheader("connection") or "").lower() != "close"
            assert not response.will_close
    finally:
        conn.close()
    assert [s["request_persistent"] for s in recorder.seen] == [True, True, True]
    assert [s["response_persistent"] for s in recorder.seen] == [True, True, True]
    assert {s["version"] for s in recorder.seen} == {"1.1"}
    # One connection carried all three requests.
    assert len({s["remote_port"] for s in recorder.seen}) == 1


def test_client_connection_close_is_honoured(serve: Serve) -> None:
    recorder = Recorder()
    server = serve(recorder)
    with connect(server.port) as sock:
        response, body = exchange(sock, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert response.status == 200
        assert body == b"ok"
        assert (response.getheader("connection") or "").lower() == "close"
        assert_closed_by_server(sock)
    assert recorder.seen[0]["request_persistent"] is False
    assert recorder.seen[0]["response_persistent"] is False
    assert recorder.seen[0]["connection"] == ["close"]


def test_client_keep_alive_header_on_http11(serve: Serve) -> None:
    recorder = Recorder()
    server = serve(recorder)
    with connect(server.port) as sock:
        response, body = exchange(sock, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n")
        assert response.status == 200
        assert body == b"ok"
        assert (response.getheader("connection") or "").lower() != "close"
        assert_still_open(sock)
    assert recorder.seen[0]["request_persistent"] is True
    assert recorder.seen[0]["response_persistent"] is True


def test_http10_without_keep_alive_closes(serve: Serve) -> None:
    recorder = Recorder()
    server = serve(recorder)
    with connect(server.port) as sock:
        response, body = exchange(sock, b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        assert response.status == 200
        assert response.version == 10
        assert body == b"ok"
        assert_closed_by_server(sock)
    assert recorder.seen[0]["version"] == "1.0"
    assert recorder.seen[0]["request_persistent"] is False
    assert recorder.seen[0]["response_persistent"] is False


def test_http10_with_keep_alive_stays_open(serve: Serve) -> None:
    recorder = Recorder()
    server = serve(recorder)
    with connect(server.port) as sock:
        request = b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n"
        response, body = exchange(sock, request)
        assert response.status == 200
        assert body == b"ok"
        assert (response.getheader("connection") or "").lower() == "keep-alive"
        response, body = exchange(sock, request)
        assert body == b"ok"
    assert [s["version"] for s in recorder.seen] == ["1.0", "1.0"]
    assert [s["request_persistent"] for s in recorder.seen] == [True, True]
    assert recorder.seen[0]["remote_port"] == recorder.seen[1]["remote_port"]


def _close_via_response(request: HttpRequest) -> None:
    request.response.persistent_connection = False


def _close_via_headers(request: HttpRequest) -> None:
    request.response.headers.persistent_connection = False


@pytest.mark.parametrize("prepare", [_close_via_response, _close_via_headers], ids=["response", "headers"])
def test_server_side_persistent_connection_false_closes(serve: Serve, prepare: Callable[[HttpRequest], None]) -> None:
    recorder = Recorder(prepare)
    server = serve(recorder)
    with connect(server.port) as sock:
        response, body = exchange(sock, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert response.status == 200
        assert body == b"ok"
        assert (response.getheader("connection") or "").lower() == "close"
        assert_closed_by_server(sock)
    assert recorder.seen[0]["request_persistent"] is True


def test_empty_connection_header_value_is_accepted(serve: Serve) -> None:
    recorder = Recorder()
    server = serve(recorder)
    with connect(server.port) as sock:
        response, body = exchange(sock, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection:\r\n\r\n")
        assert response.status == 200
        assert body == b"ok"
        # An empty value asks for nothing: HTTP/1.1 stays persistent.
        assert_still_open(sock)
    assert recorder.seen[0]["request_persistent"] is True
    assert recorder.seen[0]["connection"] in ([""], [])


# ---------------------------------------------------------------- done and content_length


class DoneRecorder:
    """Writes ``body`` under a declared ``content_length`` and records what
    ``close()`` and ``done`` report."""

    def __init__(self, content_length: int, writes: list[str], *, flush_first: bool = False) -> None:
        self.content_length = content_length
        self.writes = writes
        self.flush_first = flush_first
        self.close_error: BaseException | None = None
        self.done_error: BaseException | None = None
        self.done_ok = False
        self.finished = False

    async def __call__(self, request: HttpRequest) -> None:
        response = request.response
        response.content_length = self.content_length
        done = response.done
        if self.flush_first:
            await response.flush()
        for text in self.writes:
            response.write(text)
        try:
            await response.close()
        except HttpException as exc:
            self.close_error = exc
        try:
            await done
            self.done_ok = True
        except HttpException as exc:
            self.done_error = exc
        self.finished = True


def test_done_fails_when_content_length_is_zero_but_a_body_is_written(serve: Serve) -> None:
    handler = DoneRecorder(0, ["x", "x"])
    server = serve(handler)
    response, body = get(server)
    # The server owns the framing: a buffered body that breaks its length
    # is answered 500 (dart:io sends it cut to the length).
    assert response.status == 500
    assert body == b"Internal Server Error"
    assert handler.finished
    assert not handler.done_ok
    assert isinstance(handler.done_error, HttpException)
    assert "exceeds" in str(handler.done_error)
    assert isinstance(handler.close_error, HttpException)


def test_done_fails_when_content_length_is_larger_than_the_body(serve: Serve) -> None:
    handler = DoneRecorder(10, ["x" * 5])
    server = serve(handler)
    response, body = get(server)
    # The client never gets the short body as a success: the server answers 500.
    assert response.status == 500
    assert body == b"Internal Server Error"
    assert handler.finished
    assert not handler.done_ok
    assert isinstance(handler.done_error, HttpException)
    assert "below" in str(handler.done_error)
    assert isinstance(handler.close_error, HttpException)


def test_done_fails_when_a_streamed_body_is_shorter_than_content_length(serve: Serve) -> None:
    handler = DoneRecorder(10, ["x" * 5], flush_first=True)
    server = serve(handler)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/")
        # The client never gets a complete response: the body is cut short.
        assert_truncated(conn, declared=10)
    finally:
        conn.close()
    assert handler.finished
    assert isinstance(handler.done_error, HttpException)
    assert isinstance(handler.close_error, HttpException)


def test_done_completes_when_the_body_matches_content_length(serve: Serve) -> None:
    handler = DoneRecorder(5, ["x" * 5])
    response, body = get(serve(handler))
    assert response.getheader("content-length") == "5"
    assert body == b"xxxxx"
    assert handler.done_ok
    assert handler.done_error is None
    assert handler.close_error is None


def test_head_with_content_length_larger_than_the_body_does_not_fail(serve: Serve) -> None:
    handler = DoneRecorder(100, [])
    server = serve(handler)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    try:
        conn.request("HEAD", "/")
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("content-length") == "100"
        assert response.read() == b""
        # The connection is still in sync: a GET on it is answered, and as
        # that GET does break its content_length, with a 500.
        conn.request("GET", "/")
        response = conn.getresponse()
        assert (response.status, response.read()) == (500, b"Internal Server Error")
    finally:
        conn.close()
    assert handler.close_error is not None  # from the GET


def test_head_done_completes(serve: Serve) -> None:
    handler = DoneRecorder(100, [])
    server = serve(handler)
    with connect(server.port) as sock:
        response, body = exchange(sock, b"HEAD / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", method="HEAD")
        assert response.status == 200
        assert response.getheader("content-length") == "100"
        assert body == b""
        # The connection stays in sync and open: a second HEAD on it works.
        again, body = exchange(sock, b"HEAD / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", method="HEAD")
        assert again.status == 200
        assert again.getheader("content-length") == "100"
        assert body == b""
    assert handler.done_ok
    assert handler.done_error is None
    assert handler.close_error is None


# ---------------------------------------------------------------- shared binding


def _naming(name: str) -> Callable[[HttpRequest], Any]:
    async def handler(request: HttpRequest) -> None:
        request.response.write(name)
        await request.response.close()

    return handler


def _who_answers(host: str, port: int, attempts: int = 64) -> set[bytes]:
    answered: set[bytes] = set()
    for _ in range(attempts):
        conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        try:
            conn.request("GET", "/", headers={"Connection": "close"})
            response = conn.getresponse()
            assert response.status == 200
            answered.add(response.read())
        finally:
            conn.close()
        if len(answered) == 2:
            break
    return answered


SHARED_CASES = [
    pytest.param("127.0.0.1", False, id="ipv4"),
    pytest.param("::1", False, id="ipv6", marks=requires_ipv6),
    pytest.param("::1", True, id="ipv6-v6only", marks=requires_ipv6),
]


@pytest.mark.parametrize(("host", "v6_only"), SHARED_CASES)
def test_bind_shared_twice_on_one_port(serve: Serve, host: str, v6_only: bool) -> None:
    first = serve(_naming("first"), host, 0, shared=True, v6_only=v6_only)
    second = serve(_naming("second"), host, first.port, shared=True, v6_only=v6_only)
    assert second.port == first.port
    assert first.server.address == host
    assert second.server.address == host
    assert _who_answers(host, first.port) == {b"first", b"second"}


@pytest.mark.parametrize(("host", "v6_only"), SHARED_CASES)
@pytest.mark.parametrize(
    ("first_shared", "second_shared"),
    [(False, False), (True, False), (False, True)],
    ids=["neither", "first-only", "second-only"],
)
def test_bind_twice_without_shared_fails(
    serve: Serve, host: str, v6_only: bool, first_shared: bool, second_shared: bool
) -> None:
    first = serve(_naming("first"), host, 0, shared=first_shared, v6_only=v6_only)
    with pytest.raises(OSError):
        serve(_naming("second"), host, first.port, shared=second_shared, v6_only=v6_only)
    # The first server is unaffected.
    assert _who_answers(host, first.port, attempts=2) == {b"first"}


@requires_ipv6
def test_v6_only_does_not_take_the_ipv4_port(serve: Serve) -> None:
    """With v6_only the ::1 listener leaves 127.0.0.1 on the same port free."""
    v6 = serve(_naming("v6"), "::1", 0, v6_only=True)
    try:
        v4 = serve(_naming("v4"), "127.0.0.1", v6.port)
    except OSError:
        pytest.skip("the IPv4 port was taken by something else meanwhile")
    assert _who_answers("::1", v6.port, attempts=2) == {b"v6"}
    assert _who_answers("127.0.0.1", v4.port, attempts=2) == {b"v4"}
