"""HTTP/3 over QUIC against a real client (aioquic, through tests/h3client.py):
requests and bodies, streaming, concurrency on one connection, client
resets, IPv6 and ``localhost``, the ``Alt-Svc`` advertisement over TCP
(httpx, HTTP/1.1 and HTTP/2), every API layer, graceful and forced
shutdown, a taken UDP port, limits and 0-RTT.

Every server is real and listens on loopback with a trustme certificate;
the client's code runs on the server's loop thread (``loop_thread.run``),
blocking clients (httpx) on the test thread. Every wait is bounded."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import resource
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from aioquic.h3.connection import Setting
from conftest import (
    BackgroundLoop,
    Certificates,
    LogLines,
    RunningServer,
    requires_ipv6,
)
from h3client import H3Client, h3_connect

from server_native import (
    BodyTooLarge,
    ClientDisconnected,
    NativeDirectRequest,
    NativeDirectResponse,
    NativeServerBind,
    TlsConfig,
    serve_native_http,
    serve_secure_native_direct,
    serve_secure_native_http,
    serve_secure_native_multi,
)

TIMEOUT = 10
#: Bound on one whole scenario run on the loop thread.
SCENARIO = 60
KIB = 1024
MIB = 1024 * KIB
H3_NO_ERROR = 0x100
#: shutdown_timeout of the serve_* helpers: their drain on the shutdown
#: signal lasts this long while HTTP/3 is on (see
#: test_graceful_close_of_an_idle_server_is_prompt).
HELPER_DRAIN = 1.0
ALT_SVC = re.compile(r'^h3=":(\d+)"; ma=(\d+)$')
ECHO = re.compile(r"^Server listening on (https?)://(\[[^\]]+\]|[^:/\s]+):(\d+) via server_native")


# ---------------------------------------------------------------- helpers


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pattern(size: int) -> bytes:
    """``size`` bytes in which every byte value occurs."""
    block = bytes(range(256)) * 256
    return (block * (size // len(block) + 1))[:size]


async def hello(request: Any) -> None:
    request.response.write("hello over HTTP/" + request.protocol_version)


async def describe(request: Any) -> None:
    """Answers with what the handler saw, as JSON."""
    body = await request.read()
    info = request.connection_info
    request.response.headers.set("content-type", "application/json")
    request.response.write(
        json.dumps(
            {
                "method": request.method,
                "path": request.uri.path,
                "query": request.uri.query,
                "protocol_version": request.protocol_version,
                "scheme": request.scheme,
                "requested_uri": request.requested_uri.geturl(),
                "remote": [info.remote_address, info.remote_port],
                "local_port": info.local_port,
                "early_data": request.headers.value("early-data"),
                "x_test": request.headers.value("x-test"),
                "sha256": sha256(body),
                "length": len(body),
                "body": body.decode("latin-1") if len(body) < 1024 else None,
            }
        )
    )


def start_h3(
    serve: Callable[..., RunningServer], certs: Certificates, handler: Any, address: str = "127.0.0.1", **options: Any
) -> RunningServer:
    """A TLS server with HTTP/3 on (the ``serve`` fixture defaults it off)."""
    options.setdefault("http3", True)
    return serve(handler, address, certificate_path=certs.cert_path, key_path=certs.key_path, **options)


def run(loop_thread: BackgroundLoop, coro: Coroutine[Any, Any, Any], timeout: float = SCENARIO) -> Any:
    """Runs a client scenario on the servers' loop, bounded."""
    return loop_thread.run(asyncio.wait_for(coro, timeout), timeout=timeout + 5)


def connect(port: int, certs: Certificates, host: str = "127.0.0.1", **options: Any) -> Any:
    return h3_connect(host, port, str(certs.ca_path), **options)


async def get_json(client: H3Client, path: str = "/", **options: Any) -> dict[str, Any]:
    response = await client.request(options.pop("method", "GET"), path, **options)
    assert response.status == 200, response
    return json.loads(response.body)  # type: ignore[no-any-return]


def tls_client(certs: Certificates, http2: bool) -> httpx.Client:
    context = ssl.create_default_context(cafile=str(certs.ca_path))
    return httpx.Client(verify=context, http1=not http2, http2=http2, timeout=TIMEOUT)


def udp_port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def tcp_port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def udp_socket_on_free_port() -> socket.socket:
    """A bound UDP socket on 127.0.0.1 whose port is free over TCP too
    (bounded retries)."""
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        if tcp_port_is_free(udp.getsockname()[1]):
            return udp
        udp.close()
    raise RuntimeError("no port free over both TCP and UDP")


class Gate:
    """A handler that holds every request until :meth:`open`, then answers
    200 with the path."""

    def __init__(self, hold: float = 30) -> None:
        self.hold = hold
        self.released = asyncio.Event()
        self.arrived: list[str] = []
        self.outcomes: list[str] = []

    async def __call__(self, request: Any) -> None:
        self.arrived.append(request.uri.path)
        try:
            await asyncio.wait_for(self.released.wait(), self.hold)
        except asyncio.TimeoutError:
            self.outcomes.append("never released")
            raise
        request.response.write("done " + request.uri.path)
        self.outcomes.append("answered")

    def open(self) -> None:
        self.released.set()

    async def wait_arrived(self, count: int) -> None:
        async def arrived() -> None:
            while len(self.arrived) < count:
                await asyncio.sleep(0.005)

        try:
            await asyncio.wait_for(arrived(), TIMEOUT)
        except asyncio.TimeoutError:
            pytest.fail(f"only {len(self.arrived)} of {count} requests reached the handler")


async def fails_to_connect(port: int, certs: Certificates, host: str = "127.0.0.1") -> bool:
    """True when no HTTP/3 handshake completes within 3 seconds."""
    try:
        async with connect(port, certs, host, timeout=3) as client:
            await client.request("GET", "/late", timeout=3)
    except (asyncio.TimeoutError, TimeoutError, ConnectionError):
        return True
    return False


# ---------------------------------------------------------------- requests and bodies


def test_get_and_post(serve: Any, loop_thread: BackgroundLoop, certs: Certificates) -> None:
    running = start_h3(serve, certs, describe)

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], list[tuple[str, str]]]:
        async with connect(running.port, certs) as client:
            response = await client.request("GET", "/items?x=1", headers=[("x-test", "get")])
            posted = await get_json(client, "/submit", method="POST", body=b"name=value", headers=[("x-test", "post")])
            assert response.status == 200
            return json.loads(response.body), posted, response.headers

    got, posted, headers = run(loop_thread, scenario())
    assert got["method"] == "GET" and got["path"] == "/items" and got["query"] == "x=1"
    assert got["x_test"] == "get" and got["length"] == 0
    assert posted["method"] == "POST" and posted["body"] == "name=value" and posted["x_test"] == "post"
    names = [name for name, _ in headers]
    assert ("content-type", "application/json") in headers
    assert "date" in names and "content-length" in names
    assert "alt-svc" not in names  # advertised over TCP only: this client is already on HTTP/3


def test_protocol_version_scheme_and_connection_info(
    serve: Any, loop_thread: BackgroundLoop, certs: Certificates
) -> None:
    running = start_h3(serve, certs, describe)

    async def scenario() -> dict[str, Any]:
        async with connect(running.port, certs) as client:
            return await get_json(client, "/where?q=1", authority=f"localhost:{running.port}")

    seen = run(loop_thread, scenario())
    assert seen["protocol_version"] == "3"
    assert seen["scheme"] == "https"
    assert seen["requested_uri"] == f"https://localhost:{running.port}/where?q=1"
    assert seen["remote"][0] in ("127.0.0.1", "::ffff:127.0.0.1")
    assert seen["local_port"] == running.port
    assert seen["early_data"] is None


def test_upload_128_kib(serve: Any, loop_thread: BackgroundLoop, certs: Certificates) -> None:
    async def handler(request: Any) -> None:
        chunks = [chunk async for chunk in request]
        request.response.write(f"{sum(map(len, chunks))} {sha256(b''.join(chunks))}")

    running = start_h3(serve, certs, handler)
    body = pattern(128 * KIB)

    async def scenario() -> Any:
        async with connect(running.port, certs) as client:
            return await client.request("POST", "/upload", body=body)

    response = run(loop_thread, scenario())
    assert response.status == 200
    assert response.body.decode() == f"{len(body)} {sha256(body)}"


@pytest.mark.parametrize("how", ["flush", "add_stream"])
def test_streamed_1_mib_response(serve: Any, loop_thread: BackgroundLoop, certs: Certificates, how: str) -> None:
    """1 MiB in 16 KiB chunks; the first 64 KiB reach the client before the
    handler writes the rest (it waits for the client to see them), so the
    response really streams."""
    body = pattern(MIB)
    chunk = 16 * KIB
    seen_start = asyncio.Event()

    async def rest() -> AsyncIterator[bytes]:
        for offset in range(64 * KIB, len(body), chunk):
            yield body[offset : offset + chunk]

    async def handler(request: Any) -> None:
        response = request.response
        response.headers.set("content-type", "application/octet-stream")
        for offset in range(0, 64 * KIB, chunk):
            response.add(body[offset : offset + chunk])
            await response.flush()
        await asyncio.wait_for(seen_start.wait(), TIMEOUT)
        if how == "flush":
            async for part in rest():
                response.add(part)
                await response.flush()
        else:
            await response.add_stream(rest())

    running = start_h3(serve, certs, handler)

    async def scenario() -> Any:
        async with connect(running.port, certs) as client:
            stream_id, future = client.start("GET", "/big")
            await client.wait_for(lambda: client.received(stream_id) >= 64 * KIB, "the first 64 KiB", TIMEOUT)
            assert not future.done()
            seen_start.set()
            return await asyncio.wait_for(future, TIMEOUT * 3)

    response = run(loop_thread, scenario())
    assert response.status == 200
    assert response.header("content-length") is None
    assert len(response.body) == MIB
    assert sha256(response.body) == sha256(body)


def test_100_concurrent_streams_on_one_connection(serve: Any, loop_thread: BackgroundLoop, certs: Certificates) -> None:
    """Every handler waits until all 100 requests have arrived: only streams
    served concurrently can finish."""
    count = 100
    arrived: list[int] = []
    everyone = asyncio.Event()

    async def handler(request: Any) -> None:
        arrived.append(request.connection_info.remote_port)
        if len(arrived) == count:
            everyone.set()
        await asyncio.wait_for(everyone.wait(), TIMEOUT * 2)
        request.response.write(request.uri.path)

    running = start_h3(serve, certs, handler)

    async def scenario() -> list[Any]:
        async with connect(running.port, certs) as client:
            futures = [client.start("GET", f"/c/{i}")[1] for i in range(count)]
            return await asyncio.wait_for(asyncio.gather(*futures), TIMEOUT * 3)

    responses = run(loop_thread, scenario())
    assert [r.status for r in responses] == [200] * count
    assert [r.body.decode() for r in responses] == [f"/c/{i}" for i in range(count)]
    assert len(set(arrived)) == 1  # one QUIC connection


def test_200_sequential_requests_on_one_connection(
    serve: Any, loop_thread: BackgroundLoop, certs: Certificates
) -> None:
    async def handler(request: Any) -> None:
        body = await request.read()
        request.response.write(f"{request.uri.path} {request.connection_info.remote_port} {len(body)}")

    running = start_h3(serve, certs, handler)

    async def scenario() -> list[str]:
        answers = []
        async with connect(running.port, certs) as client:
            for i in range(200):
                method, body = ("POST", b"x" * i) if i % 2 else ("GET", None)
                response = await client.request(method, f"/s/{i}", body=body, timeout=TIMEOUT)
                assert response.status == 200
                answers.append(response.body.decode())
        return answers

    answers = run(loop_thread, scenario())
    ports = set()
    for i, answer in enumerate(answers):
        path, port, length = answer.split()
        assert path == f"/s/{i}" and int(length) == (i if i % 2 else 0)
        ports.add(port)
    assert len(ports) == 1


def test_client_reset_mid_body_leaves_the_server_serving(
    serve: Any, loop_thread: BackgroundLoop, certs: Certificates
) -> None:
    """A POST whose body is half sent when the client resets the stream: the
    handler, reading the body as it streams in, gets ClientDisconnected (not
    a body that looks complete); the same connection and a new one are still
    served."""
    outcomes: list[tuple[str, int]] = []
    first_part = asyncio.Event()

    async def handler(request: Any) -> None:
        if request.uri.path == "/upload":
            received = 0
            try:
                async for chunk in request:
                    received += len(chunk)
                    first_part.set()
            except ClientDisconnected:
                outcomes.append(("disconnected", received))
                return
            outcomes.append(("complete", received))
        request.response.write("still serving " + request.uri.path)

    running = start_h3(serve, certs, handler)

    async def scenario() -> list[bytes]:
        bodies = []
        async with connect(running.port, certs) as client:
            stream_id, future = client.start("POST", "/upload", body=pattern(32 * KIB), end=False)
            await asyncio.wait_for(first_part.wait(), TIMEOUT)  # the body streams in before it ends
            client.send(stream_id, pattern(16 * KIB))
            client.reset(stream_id)
            await client.wait_for(lambda: bool(outcomes), "the handler to see the reset", TIMEOUT)
            assert future.cancelled()
            bodies.append((await client.request("GET", "/same-connection")).body)
        async with connect(running.port, certs) as client:
            bodies.append((await client.request("GET", "/new-connection")).body)
        return bodies

    bodies = run(loop_thread, scenario())
    assert len(outcomes) == 1 and outcomes[0][0] == "disconnected", outcomes
    assert 0 < outcomes[0][1] <= 48 * KIB
    assert bodies == [b"still serving /same-connection", b"still serving /new-connection"]


def test_max_body_size_applies(serve: Any, loop_thread: BackgroundLoop, certs: Certificates) -> None:
    """A body past ``max_body_size`` never reaches the handler whole."""
    outcomes: list[str] = []

    async def handler(request: Any) -> None:
        try:
            body = await request.read()
        except BodyTooLarge:
            outcomes.append("too large")
            raise
        outcomes.append(f"read {len(body)}")
        request.response.write("ok")

    running = start_h3(serve, certs, handler, max_body_size=4 * KIB)

    async def scenario() -> tuple[int, BaseException | int]:
        async with connect(running.port, certs) as client:
            small = await client.request("POST", "/small", body=b"x" * KIB)
        async with connect(running.port, certs) as client:
            try:
                large: BaseException | int = (await client.request("POST", "/large", body=b"x" * (64 * KIB))).status
            except ConnectionError as error:  # see test_native_error_responses_keep_the_connection
                large = error
        return small.status, large

    small, large = run(loop_thread, scenario())
    assert small == 200
    assert large == 413 or isinstance(large, ConnectionError)
    assert f"read {64 * KIB}" not in outcomes
    assert outcomes[0] == f"read {KIB}"


def test_native_error_responses_keep_the_connection(
    serve: Any, loop_thread: BackgroundLoop, certs: Certificates
) -> None:
    running = start_h3(serve, certs, describe, max_body_size=4 * KIB)

    async def scenario() -> tuple[int, int]:
        async with connect(running.port, certs) as client:
            large = await client.request("POST", "/large", body=b"x" * (64 * KIB))
            after = await client.request("GET", "/after")
            return large.status, after.status

    assert run(loop_thread, scenario()) == (413, 200)


def test_connection_specific_headers_are_not_sent_over_http3(
    serve: Any, loop_thread: BackgroundLoop, certs: Certificates
) -> None:
    async def handler(request: Any) -> None:
        request.response.headers.set("connection", "close")
        request.response.write("ok")

    running = start_h3(serve, certs, handler)

    async def scenario() -> Any:
        async with connect(running.port, certs) as client:
            return await client.request("GET", "/")

    response = run(loop_thread, scenario())
    assert response.status == 200 and response.header("connection") is None


def test_max_concurrent_streams_is_the_quic_stream_limit(
    serve: Any, loop_thread: BackgroundLoop, certs: Certificates
) -> None:
    running = start_h3(serve, certs, hello, max_concurrent_streams=7)

    async def scenario() -> int:
        async with connect(running.port, certs) as client:
            # The server's transport parameter, read before any stream ends
            # (each finished stream raises the cumulative limit by one).
            limit = int(client._quic._remote_max_streams_bidi)
            assert (await client.request("GET", "/")).status == 200
            return limit

    assert run(loop_thread, scenario()) == 7


def test_idle_timeout_closes_the_connection(serve: Any, loop_thread: BackgroundLoop, certs: Certificates) -> None:
    running = start_h3(serve, certs, hello, idle_timeout=1)

    async def scenario() -> Any:
        async with connect(running.port, certs) as client:
            assert (await client.request("GET", "/")).status == 200
            return await client.wait_terminated(TIMEOUT)

    assert run(loop_thread, scenario()) is not None


# ---------------------------------------------------------------- a `#` in :path

H3_MESSAGE_ERROR = 0x10E


async def outcome(future: Any) -> int | str:
    """A response's status, or "reset" with the code the stream was reset with."""
    try:
        return (await asyncio.wait_for(future, TIMEOUT)).status  # type: ignore[no-any-return]
    except ConnectionResetError as reset:
        assert str(reset) == f"stream reset: {H3_MESSAGE_ERROR}", reset
        return "reset"


def recording(paths: list[str]) -> Callable[[Any], Awaitable[None]]:
    async def handler(request: Any) -> None:
        paths.append(request.uri.path)
        request.response.write("seen")

    return handler


def test_fragment_in_path_resets_only_its_stream(serve: Any, loop_thread: BackgroundLoop, certs: Certificates) -> None:
    """h3 builds the URI with the `http` crate, which drops a `#` fragment:
    the guard makes h3 refuse such a request (H3_MESSAGE_ERROR) instead of
    serving `/a`. The requests around it on the connection are served."""
    seen: list[str] = []
    running = start_h3(serve, certs, recording(seen))

    async def scenario() -> list[int | str]:
        async with connect(running.port, certs) as client:
            return [
                await outcome(client.start("GET", path)[1]) for path in ("/before", "/a#frag", "/after?x#y", "/last")
            ]

    assert run(loop_thread, scenario()) == [200, "reset", "reset", 200]
    assert seen == ["/before", "/last"]


def test_websocket_over_http3_is_refused_and_the_connection_goes_on(
    serve: Any, loop_thread: BackgroundLoop, certs: Certificates
) -> None:
    """WebSocket over HTTP/3 (RFC 9220) is not served: the server does not
    offer extended CONNECT, and h3 0.0.8 refuses a `:protocol` of
    `websocket` (it knows only `webtransport` and `connect-udp`). The
    handler never sees the request; the connection serves the next one."""
    seen: list[str] = []
    running = start_h3(serve, certs, recording(seen))

    async def scenario() -> tuple[int, int | str, int]:
        async with connect(running.port, certs) as client:
            await client.request("GET", "/first")  # the server's SETTINGS are in by now
            offered = client.http.received_settings.get(Setting.ENABLE_CONNECT_PROTOCOL, 0)
            headers = [(":protocol", "websocket"), ("sec-websocket-version", "13")]
            websocket = client.start("CONNECT", "/chat", headers=headers, end=False)[1]
            return offered, await outcome(websocket), (await client.request("GET", "/after")).status

    assert run(loop_thread, scenario()) == (0, "reset", 200)
    assert seen == ["/first", "/after"]


def qpack_string(text: bytes, prefix_bits: int, flags: int = 0) -> bytes:
    """A QPACK string literal, not Huffman-coded, its length under 2**prefix_bits - 1."""
    assert len(text) < (1 << prefix_bits) - 1
    return bytes([flags | len(text)]) + text


def h3_frame(kind: int, payload: bytes) -> bytes:
    assert kind < 64 and len(payload) < 16384
    return bytes([kind]) + (0x4000 | len(payload)).to_bytes(2, "big") + payload


@pytest.mark.parametrize(("path", "expected"), [(b"/a#frag", "reset"), (b"/fine", 200)])
def test_fragment_in_a_hand_made_request_stream(
    serve: Any, loop_thread: BackgroundLoop, certs: Certificates, path: bytes, expected: int | str
) -> None:
    """A grease frame before the HEADERS frame, a `:path` with a literal name
    (the form no name reference finds), and every byte in a packet of its own."""
    seen: list[str] = []
    running = start_h3(serve, certs, recording(seen))
    section = (
        b"\x00\x00"  # no dynamic table
        + bytes([0xC0 | 17, 0xC0 | 23])  # static :method GET, :scheme https
        + b"\x50"
        + qpack_string(b"localhost", 7)  # :authority, a static name
        + qpack_string(b":path", 3, 0x20)
        + qpack_string(path, 7)  # literal name and value
    )
    stream = h3_frame(0x21, b"grease") + h3_frame(0x01, section)

    async def scenario() -> int | str:
        async with connect(running.port, certs) as client:
            _, future = client.start_raw([stream[i : i + 1] for i in range(len(stream))])
            return await outcome(future)

    assert run(loop_thread, scenario()) == expected
    assert seen == ([] if expected == "reset" else [path.decode()])


# ---------------------------------------------------------------- addresses


@requires_ipv6
def test_ipv6_loopback(serve: Any, loop_thread: BackgroundLoop, certs: Certificates) -> None:
    running = start_h3(serve, certs, describe, "::1")

    async def scenario() -> dict[str, Any]:
        async with connect(running.port, certs, "::1") as client:
            return await get_json(client, "/v6")

    seen = run(loop_thread, scenario())
    assert seen["protocol_version"] == "3"
    assert seen["remote"][0] == "::1"


def test_localhost_binding_answers_http3_on_every_loopback(
    serve: Any, loop_thread: BackgroundLoop, certs: Certificates
) -> None:
    from server_native.runtime.addresses import ipv6_available

    running = start_h3(serve, certs, describe, "localhost")
    hosts = ["127.0.0.1", "::1"] if ipv6_available() else ["127.0.0.1"]
    assert sorted(host for host, _ in running.server.addresses) == sorted(hosts)

    async def scenario() -> list[dict[str, Any]]:
        seen = []
        for host in hosts:
            async with connect(running.port, certs, host) as client:
                seen.append(await get_json(client, "/loopback"))
        return seen

    for seen in run(loop_thread, scenario()):
        assert seen["protocol_version"] == "3" and seen["local_port"] == running.port
    for host in hosts:
        assert not udp_port_is_free(running.port, host), f"no UDP endpoint on {host}"


# ---------------------------------------------------------------- Alt-Svc


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "http2"])
def test_alt_svc_is_advertised_over_tcp(serve: Any, certs: Certificates, http2: bool) -> None:
    running = start_h3(serve, certs, hello)
    with tls_client(certs, http2) as client:
        response = client.get(running.url("/"))
    assert response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
    assert response.text == ("hello over HTTP/2" if http2 else "hello over HTTP/1.1")
    assert response.headers.get_list("alt-svc") == [f'h3=":{running.port}"; ma=86400']


def test_alt_svc_max_age_is_configurable(serve: Any, certs: Certificates) -> None:
    running = start_h3(serve, certs, hello, alt_svc_max_age=60)
    with tls_client(certs, http2=True) as client:
        response = client.get(running.url("/"))
    assert response.headers.get_list("alt-svc") == [f'h3=":{running.port}"; ma=60']


def test_alt_svc_absent_when_http3_is_off(serve: Any, certs: Certificates) -> None:
    running = start_h3(serve, certs, hello, http3=False)
    for http2 in (False, True):
        with tls_client(certs, http2) as client:
            response = client.get(running.url("/"))
        assert response.status_code == 200
        assert "alt-svc" not in response.headers
    assert udp_port_is_free(running.port), "http3=False still bound the UDP port"


def test_plaintext_server_has_no_http3_and_no_alt_svc(serve: Any) -> None:
    """``http3`` defaults to True and is silently off without TLS."""
    running = serve(hello, http3=True)
    assert running.server.config.http3 is True
    for http2 in (False, True):
        with httpx.Client(http1=not http2, http2=http2, timeout=TIMEOUT) as client:
            response = client.get(running.url("/"))
        assert response.status_code == 200
        assert "alt-svc" not in response.headers
    assert udp_port_is_free(running.port), "a plaintext server bound a UDP port"


def test_application_alt_svc_is_not_duplicated(serve: Any, certs: Certificates) -> None:
    own = 'h3=":443"; ma=3600, h2=":443"'

    async def handler(request: Any) -> None:
        request.response.headers.set("Alt-Svc", own)
        request.response.write("own")

    running = start_h3(serve, certs, handler)
    for http2 in (False, True):
        with tls_client(certs, http2) as client:
            response = client.get(running.url("/"))
        assert response.headers.get_list("alt-svc") == [own]


@pytest.mark.parametrize("answer", ["refusal_413", "native_response"])
def test_alt_svc_on_natively_answered_responses(serve: Any, certs: Certificates, answer: str) -> None:
    options: dict[str, Any] = {"max_body_size": 16} if answer == "refusal_413" else {"native_response": b"canned"}
    running = start_h3(serve, certs, hello, **options)
    for http2 in (False, True):
        with tls_client(certs, http2) as client:
            if answer == "refusal_413":
                response = client.post(running.url("/"), content=b"x" * 64)  # declared length: refused at once
                assert response.status_code == 413
            else:
                response = client.get(running.url("/"))
                assert response.text == "canned"
        assert response.headers.get_list("alt-svc") == [f'h3=":{running.port}"; ma=86400']


def test_client_switches_from_http2_to_http3_after_alt_svc(
    serve: Any, loop_thread: BackgroundLoop, certs: Certificates
) -> None:
    """What a browser does: the first request goes over TCP (HTTP/2), the
    answer's Alt-Svc names the HTTP/3 port, the next request goes there."""
    running = start_h3(serve, certs, describe)
    with tls_client(certs, http2=True) as client:
        first = client.get(running.url("/first"))
    assert first.http_version == "HTTP/2"
    assert first.json()["protocol_version"] == "2"
    advertised = ALT_SVC.match(first.headers["alt-svc"])
    assert advertised, first.headers["alt-svc"]
    port, max_age = int(advertised.group(1)), int(advertised.group(2))
    assert max_age == 86400

    async def scenario() -> dict[str, Any]:
        # same host as the TCP origin, the advertised UDP port
        async with connect(port, certs, first.url.host) as h3:
            return await get_json(h3, "/second")

    second = run(loop_thread, scenario())
    assert second["protocol_version"] == "3"
    assert second["path"] == "/second"
    assert second["local_port"] == running.port


# ---------------------------------------------------------------- every API


def test_httpserver_iteration(serve: Any, loop_thread: BackgroundLoop, certs: Certificates) -> None:
    running = start_h3(serve, certs, None)

    async def loop() -> None:
        async for request in running.server:
            request.response.write(f"iterated over HTTP/{request.protocol_version}")
            await request.response.close()

    async def scenario() -> Any:
        task = asyncio.ensure_future(loop())
        try:
            async with connect(running.port, certs) as client:
                return await client.request("GET", "/it")
        finally:
            task.cancel()

    response = run(loop_thread, scenario())
    assert (response.status, response.body) == (200, b"iterated over HTTP/3")


@asynccontextmanager
async def helper_running(
    helper: Callable[[Awaitable[Any]], Coroutine[Any, Any, Any]],
    server_log: LogLines,
    listeners: int = 1,
) -> AsyncIterator[list[int]]:
    """Runs a ``serve_*`` helper with a shutdown signal until the block ends;
    yields the ports of its echo lines."""
    stop = asyncio.Event()
    server_log.read()
    task = asyncio.ensure_future(helper(stop.wait()))
    ports: list[int] = []
    output = ""
    for _ in range(int(TIMEOUT / 0.01)):
        output += server_log.read()
        ports = [int(m.group(3)) for m in (ECHO.match(line.strip()) for line in output.splitlines()) if m]
        if len(ports) >= listeners or task.done():
            break
        await asyncio.sleep(0.01)
    if task.done():
        task.result()
    assert len(ports) >= listeners, output
    try:
        yield ports
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT)


@pytest.mark.parametrize("helper_name", ["serve_secure_native_http", "serve_native_http"])
def test_callback_api(loop_thread: BackgroundLoop, certs: Certificates, server_log: LogLines, helper_name: str) -> None:
    def helper(stop: Awaitable[Any]) -> Coroutine[Any, Any, Any]:
        if helper_name == "serve_secure_native_http":
            return serve_secure_native_http(
                hello,
                "127.0.0.1",
                0,
                certificate_path=certs.cert_path,
                key_path=certs.key_path,
                shutdown_signal=stop,
                shutdown_timeout=HELPER_DRAIN,
            )
        tls = TlsConfig(certificate_path=str(certs.cert_path), key_path=str(certs.key_path))
        return serve_native_http(hello, "127.0.0.1", 0, tls=tls, shutdown_signal=stop, shutdown_timeout=HELPER_DRAIN)

    async def scenario() -> Any:
        async with helper_running(helper, server_log) as (port,):
            async with connect(port, certs) as client:
                return await client.request("GET", "/cb")

    response = run(loop_thread, scenario())
    assert (response.status, response.body) == (200, b"hello over HTTP/3")


def test_multi_bind_api(loop_thread: BackgroundLoop, certs: Certificates, server_log: LogLines) -> None:
    async def handler(request: Any) -> None:
        request.response.write(f"{request.protocol_version} on {request.connection_info.local_port}")

    def helper(stop: Awaitable[Any]) -> Coroutine[Any, Any, Any]:
        binds = [NativeServerBind("127.0.0.1", 0), NativeServerBind("127.0.0.1", 0)]
        return serve_secure_native_multi(
            handler,
            binds,
            certificate_path=certs.cert_path,
            key_path=certs.key_path,
            shutdown_signal=stop,
            shutdown_timeout=HELPER_DRAIN,
        )

    async def scenario() -> tuple[list[int], list[bytes]]:
        bodies = []
        async with helper_running(helper, server_log, listeners=2) as ports:
            for port in ports:
                async with connect(port, certs) as client:
                    bodies.append((await client.request("GET", "/multi")).body)
        return ports, bodies

    ports, bodies = run(loop_thread, scenario())
    assert len(set(ports)) == 2
    assert bodies == [f"3 on {port}".encode() for port in ports]


@pytest.mark.parametrize("native_direct", [False, True], ids=["loop", "native_direct"])
def test_direct_api(
    loop_thread: BackgroundLoop, certs: Certificates, server_log: LogLines, native_direct: bool
) -> None:
    def handler(request: NativeDirectRequest) -> NativeDirectResponse:
        body = request.body_bytes() if native_direct else b""
        text = f"{request.protocol} {request.scheme} {request.method} {request.uri} {len(body)}"
        return NativeDirectResponse.bytes(200, [("content-type", "text/plain")], text.encode())

    async def async_handler(request: NativeDirectRequest) -> NativeDirectResponse:
        body = await request.read()
        text = f"{request.protocol} {request.scheme} {request.method} {request.uri} {len(body)}"
        return NativeDirectResponse.bytes(200, [("content-type", "text/plain")], text.encode())

    def helper(stop: Awaitable[Any]) -> Coroutine[Any, Any, Any]:
        return serve_secure_native_direct(
            handler if native_direct else async_handler,
            "127.0.0.1",
            0,
            certificate_path=certs.cert_path,
            key_path=certs.key_path,
            native_direct=native_direct,
            shutdown_signal=stop,
            shutdown_timeout=HELPER_DRAIN,
        )

    async def scenario() -> list[Any]:
        async with helper_running(helper, server_log) as (port,):
            async with connect(port, certs) as client:
                return [
                    await client.request("GET", "/d?x=1"),
                    await client.request("POST", "/d", body=b"12345"),
                ]

    get, post = run(loop_thread, scenario())
    assert (get.status, get.body) == (200, b"3 https GET /d?x=1 0")
    assert (post.status, post.body) == (200, b"3 https POST /d 5")


# ---------------------------------------------------------------- shutdown


def test_graceful_close_answers_streams_in_flight(serve: Any, loop_thread: BackgroundLoop, certs: Certificates) -> None:
    """close() with 10 streams held by the handler: GOAWAY arrives, no new
    connection is accepted, and once released every stream gets its 200."""
    count = 10
    gate = Gate()
    running = start_h3(serve, certs, gate, shutdown_timeout=30)

    async def scenario() -> tuple[list[Any], bool]:
        async with connect(running.port, certs) as client:
            futures = [client.start("GET", f"/slow/{i}")[1] for i in range(count)]
            await gate.wait_arrived(count)
            asyncio.ensure_future(running.server.close())
            await client.wait_for(lambda: client.goaway, "GOAWAY", TIMEOUT)
            refused = await fails_to_connect(running.port, certs)
            assert not any(f.done() for f in futures), "a held stream ended before the handler answered"
            gate.open()
            return await asyncio.wait_for(asyncio.gather(*futures), TIMEOUT), refused

    responses, refused = run(loop_thread, scenario())
    assert [(r.status, r.body) for r in responses] == [(200, f"done /slow/{i}".encode()) for i in range(count)]
    assert gate.outcomes == ["answered"] * count
    assert refused, "a new HTTP/3 connection was served after close()"
    assert len(gate.arrived) == count


def test_graceful_close_then_closes_the_connection_with_h3_no_error(
    serve: Any, loop_thread: BackgroundLoop, certs: Certificates
) -> None:
    count = 3
    gate = Gate()
    running = start_h3(serve, certs, gate, shutdown_timeout=30)

    async def scenario() -> tuple[list[Any], Any]:
        async with connect(running.port, certs) as client:
            futures = [client.start("GET", f"/slow/{i}")[1] for i in range(count)]
            await gate.wait_arrived(count)
            asyncio.ensure_future(running.server.close())
            await client.wait_for(lambda: client.goaway, "GOAWAY", TIMEOUT)
            gate.open()
            responses = await asyncio.wait_for(asyncio.gather(*futures), TIMEOUT)
            return responses, await client.wait_terminated(5)

    responses, terminated = run(loop_thread, scenario())
    assert [r.status for r in responses] == [200] * count
    assert terminated.error_code == H3_NO_ERROR, terminated


def test_graceful_close_of_an_idle_server_is_prompt(
    serve: Any, loop_thread: BackgroundLoop, certs: Certificates
) -> None:
    running = start_h3(serve, certs, hello, shutdown_timeout=60)

    async def scenario() -> None:
        async with connect(running.port, certs) as client:
            assert (await client.request("GET", "/")).status == 200
        await asyncio.wait_for(running.server.close(), 5)

    run(loop_thread, scenario())


def test_force_close_aborts_streams_in_flight(serve: Any, loop_thread: BackgroundLoop, certs: Certificates) -> None:
    gate = Gate(hold=30)
    running = start_h3(serve, certs, gate, shutdown_timeout=60)

    async def scenario() -> tuple[BaseException | None, Any]:
        async with connect(running.port, certs) as client:
            _, future = client.start("GET", "/hang")
            await gate.wait_arrived(1)
            # bounded far below shutdown_timeout: only force can explain it
            await asyncio.wait_for(running.server.close(force=True), TIMEOUT)
            terminated = await client.wait_terminated(TIMEOUT)
            try:
                await asyncio.wait_for(future, TIMEOUT)
            except (ConnectionError, asyncio.CancelledError) as error:
                return error, terminated
            return None, terminated

    error, terminated = run(loop_thread, scenario())
    gate.open()
    assert isinstance(error, ConnectionError), "the request in flight was answered despite force"
    assert terminated.error_code != H3_NO_ERROR, terminated


# ---------------------------------------------------------------- a taken UDP port


def test_taken_udp_port_is_a_clear_error(loop_thread: BackgroundLoop, certs: Certificates) -> None:
    from server_native import NativeHttpServer

    with udp_socket_on_free_port() as udp:
        port = udp.getsockname()[1]
        with pytest.raises(OSError, match="HTTP/3") as raised:
            loop_thread.run(
                NativeHttpServer.bind_secure(
                    "127.0.0.1", port, certificate_path=certs.cert_path, key_path=certs.key_path
                )
            )
    assert str(port) in str(raised.value)


def test_taken_udp_port_leaves_the_tcp_port_free(loop_thread: BackgroundLoop, certs: Certificates) -> None:
    from server_native import NativeHttpServer

    with udp_socket_on_free_port() as udp:
        port = udp.getsockname()[1]
        with pytest.raises(OSError, match="HTTP/3"):
            loop_thread.run(
                NativeHttpServer.bind_secure(
                    "127.0.0.1", port, certificate_path=certs.cert_path, key_path=certs.key_path
                )
            )
    assert tcp_port_is_free(port), "the failed bind left its TCP listener bound"


def test_port_zero_picks_again_when_its_udp_twin_is_taken(loop_thread: BackgroundLoop, certs: Certificates) -> None:
    """With ``port=0`` the port TCP was given can be taken over UDP (by any
    process's client socket): the server picks another instead of failing."""
    from server_native import NativeHttpServer

    low, high = (int(n) for n in open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    wanted = (high - low) // 8 + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"needs {wanted} file descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    taken: list[socket.socket] = []
    try:
        # An eighth of the ephemeral ports (a quarter of the odd ones, which
        # Linux gives bind(0) first), so most of these binds meet one.
        for port in range(low + (1 - low) % 8, high, 8):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                udp.close()
                continue
            taken.append(udp)
        ports = set()
        for _ in range(40):
            server = loop_thread.run(
                NativeHttpServer.bind_secure("127.0.0.1", 0, certificate_path=certs.cert_path, key_path=certs.key_path)
            )
            ports.add(server.port)
            assert not udp_port_is_free(server.port), "no HTTP/3 endpoint on the port picked"
            loop_thread.run(server.close(force=True))
    finally:
        for udp in taken:
            udp.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(taken) > wanted // 2 and len(ports) > 1


def test_taken_udp_port_with_best_effort_serves_without_http3(serve: Any, certs: Certificates) -> None:
    with udp_socket_on_free_port() as udp:
        port = udp.getsockname()[1]
        running = start_h3(serve, certs, hello, port=port, http3_best_effort=True)
        assert running.port == port
        for http2 in (False, True):
            with tls_client(certs, http2) as client:
                response = client.get(running.url("/"))
            assert response.status_code == 200
            assert "alt-svc" not in response.headers  # nothing is advertised that is not served


def test_best_effort_still_serves_http3_when_the_port_is_free(
    serve: Any, loop_thread: BackgroundLoop, certs: Certificates
) -> None:
    running = start_h3(serve, certs, hello, http3_best_effort=True)
    with tls_client(certs, http2=True) as client:
        assert client.get(running.url("/")).headers["alt-svc"] == f'h3=":{running.port}"; ma=86400'

    async def scenario() -> Any:
        async with connect(running.port, certs) as client:
            return await client.request("GET", "/")

    assert run(loop_thread, scenario()).body == b"hello over HTTP/3"


def test_shared_servers_on_one_port_with_http3(serve: Any, certs: Certificates) -> None:
    first = start_h3(serve, certs, hello, shared=True)
    second = start_h3(serve, certs, hello, port=first.port, shared=True)
    assert second.port == first.port


# ---------------------------------------------------------------- 0-RTT


async def zero_rtt_attempt(port: int, certs: Certificates) -> tuple[Any, dict[str, Any], dict[str, Any], bool]:
    """A first connection that collects a session ticket, then a resumed one
    whose request is sent before the handshake completes (0-RTT when the
    ticket allows early data). Returns (ticket, first answer, resumed answer,
    whether the server accepted early data)."""
    tickets: list[Any] = []
    async with connect(port, certs, session_ticket_handler=tickets.append) as client:
        first = await get_json(client, "/first")
        await client.wait_for(lambda: bool(tickets), "a session ticket", TIMEOUT)
    async with connect(port, certs, session_ticket=tickets[-1], wait_connected=False) as client:
        resumed = await get_json(client, "/early")
        assert client._quic.tls.session_resumed, "the session was not resumed"
        accepted = bool(client._quic.tls.early_data_accepted)
    return tickets[-1], first, resumed, accepted


def test_zero_rtt_is_off_by_default(serve: Any, loop_thread: BackgroundLoop, certs: Certificates) -> None:
    running = start_h3(serve, certs, describe)
    ticket, first, resumed, accepted = run(loop_thread, zero_rtt_attempt(running.port, certs))
    assert ticket.max_early_data_size is None  # the server never offers early data
    assert not accepted
    assert first["early_data"] is None and resumed["early_data"] is None


def test_zero_rtt_requests_are_marked_early_data(serve: Any, loop_thread: BackgroundLoop, certs: Certificates) -> None:
    running = start_h3(serve, certs, describe, http3_early_data=True)
    ticket, first, resumed, accepted = run(loop_thread, zero_rtt_attempt(running.port, certs))
    if not ticket.max_early_data_size or not accepted:
        pytest.skip("aioquic did not send the request as 0-RTT")
    assert ticket.max_early_data_size == 0xFFFFFFFF  # QUIC's only allowed value
    assert resumed["early_data"] == "1"
    assert resumed["protocol_version"] == "3" and resumed["path"] == "/early"


def test_full_handshake_requests_are_not_marked_early_data(
    serve: Any, loop_thread: BackgroundLoop, certs: Certificates
) -> None:
    running = start_h3(serve, certs, describe, http3_early_data=True)

    async def scenario() -> list[str | None]:
        marks = []
        for _ in range(60):
            async with connect(running.port, certs) as client:
                marks.append((await get_json(client, "/"))["early_data"])
        return marks

    marks = run(loop_thread, scenario())
    assert marks.count("1") == 0, f"{marks.count('1')} of {len(marks)} full-handshake requests marked early"
