"""A small HTTP/3 client on aioquic for the tests: requests on one QUIC
connection, concurrent or one after another, request bodies sent in parts,
mid-body resets, GOAWAY and connection-close tracking, and 0-RTT resumption
with a saved session ticket."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, ErrorCode, FrameType, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, QuicEvent, StreamReset
from aioquic.tls import SessionTicket

#: Seconds any single wait of this client may take.
TIMEOUT = 30


@dataclass
class H3Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]


@dataclass
class _Pending:
    future: asyncio.Future[H3Response]
    headers: list[tuple[str, str]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    received: int = 0


class _H3(H3Connection):
    """aioquic's H3Connection, noting the GOAWAY frames it otherwise skips,
    and reading the response to a HEAD request as one: aioquic checks its
    ``content-length`` against a body that HEAD never has."""

    def __init__(self, *args: Any, on_goaway: Callable[[], None], **kwargs: Any) -> None:
        self._on_goaway = on_goaway
        self.head_streams: set[int] = set()
        super().__init__(*args, **kwargs)

    def _check_content_length(self, stream: Any) -> None:
        if stream.stream_id not in self.head_streams:
            super()._check_content_length(stream)

    def _check_control_frame_type(self, frame_type: int) -> None:
        super()._check_control_frame_type(frame_type)
        if frame_type == FrameType.GOAWAY:
            self._on_goaway()


class H3Client(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.goaway = False
        self.http = _H3(self._quic, on_goaway=self._saw_goaway)
        self._pending: dict[int, _Pending] = {}
        #: The ConnectionTerminated event once the connection is closed;
        #: ``error_code`` 0x100 is H3_NO_ERROR.
        self.terminated: ConnectionTerminated | None = None

    def _saw_goaway(self) -> None:
        self.goaway = True

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamReset) and event.stream_id in self._pending:
            pending = self._pending.pop(event.stream_id)
            if not pending.future.done():
                pending.future.set_exception(ConnectionResetError(f"stream reset: {event.error_code}"))
        if isinstance(event, ConnectionTerminated):
            self.terminated = event
            for pending in self._pending.values():
                if not pending.future.done():
                    pending.future.set_exception(ConnectionError(f"connection closed: {event.error_code}"))
            self._pending.clear()
        for h3_event in self.http.handle_event(event):
            self._on_h3(h3_event)

    def _on_h3(self, event: H3Event) -> None:
        if not isinstance(event, (HeadersReceived, DataReceived)):
            return
        stream_id = event.stream_id
        pending = self._pending.get(stream_id)
        if pending is None:
            return
        if isinstance(event, HeadersReceived):
            pending.headers.extend((k.decode(), v.decode()) for k, v in event.headers)
        else:
            pending.chunks.append(event.data)
            pending.received += len(event.data)
        if event.stream_ended:
            del self._pending[stream_id]
            status = int(dict(pending.headers).get(":status", "0"))
            headers = [(k, v) for k, v in pending.headers if not k.startswith(":")]
            if not pending.future.done():
                pending.future.set_result(H3Response(status, headers, b"".join(pending.chunks)))

    # -- requests -------------------------------------------------------------

    def start(
        self,
        method: str,
        path: str,
        *,
        authority: str = "localhost",
        headers: Sequence[tuple[str, str]] = (),
        body: bytes | None = None,
        end: bool = True,
    ) -> tuple[int, asyncio.Future[H3Response]]:
        """Sends a request head (and ``body``); with ``end=False`` the stream
        stays open for :meth:`send`. Returns the stream id and a future of
        the response."""
        stream_id, future = self._expect()
        if method == "HEAD":
            self.http.head_streams.add(stream_id)
        pseudo = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", authority.encode()),
            (b":path", path.encode()),
        ]
        extra = [(k.lower().encode(), v.encode()) for k, v in headers]
        self.http.send_headers(stream_id, pseudo + extra, end_stream=body is None and end)
        if body is not None:
            self.http.send_data(stream_id, body, end_stream=end)
        self.transmit()
        return stream_id, future

    def _expect(self) -> tuple[int, asyncio.Future[H3Response]]:
        """The next request stream, and the future its response will resolve."""
        stream_id = self._quic.get_next_available_stream_id()
        future: asyncio.Future[H3Response] = asyncio.get_running_loop().create_future()
        # a request whose connection dies unawaited is not worth a warning
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._pending[stream_id] = _Pending(future)
        return stream_id, future

    def start_raw(self, pieces: Sequence[bytes]) -> tuple[int, asyncio.Future[H3Response]]:
        """Sends a request stream's bytes as given (frames made by hand), one
        QUIC packet per piece, and ends the stream."""
        stream_id, future = self._expect()
        for index, piece in enumerate(pieces):
            self._quic.send_stream_data(stream_id, piece, end_stream=index == len(pieces) - 1)
            self.transmit()
        return stream_id, future

    def send(self, stream_id: int, data: bytes, *, end: bool = False) -> None:
        """More request body on a stream started with ``end=False``."""
        self.http.send_data(stream_id, data, end_stream=end)
        self.transmit()

    def reset(self, stream_id: int) -> None:
        """Abandons a request: RESET_STREAM for our side, STOP_SENDING for the
        server's (H3_REQUEST_CANCELLED)."""
        self._quic.reset_stream(stream_id, ErrorCode.H3_REQUEST_CANCELLED)
        self._quic.stop_stream(stream_id, ErrorCode.H3_REQUEST_CANCELLED)
        pending = self._pending.pop(stream_id, None)
        if pending is not None and not pending.future.done():
            pending.future.cancel()
        self.transmit()

    def received(self, stream_id: int) -> int:
        """Response body bytes received so far on a stream still open."""
        pending = self._pending.get(stream_id)
        return 0 if pending is None else pending.received

    async def request(self, method: str, path: str, *, timeout: float = TIMEOUT, **options: Any) -> H3Response:
        _, future = self.start(method, path, **options)
        return await asyncio.wait_for(future, timeout)

    # -- connection -----------------------------------------------------------

    async def wait_terminated(self, timeout: float = TIMEOUT) -> ConnectionTerminated:
        """Waits (bounded) until the server closes the connection."""
        deadline = time.monotonic() + timeout
        while self.terminated is None:
            if time.monotonic() > deadline:
                raise TimeoutError("the connection was not closed")
            await asyncio.sleep(0.01)
        return self.terminated

    async def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            await asyncio.sleep(0.005)


def client_configuration(ca_path: str, server_name: str = "localhost") -> QuicConfiguration:
    configuration = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=server_name)
    configuration.verify_mode = ssl.CERT_REQUIRED
    configuration.load_verify_locations(ca_path)
    return configuration


@contextlib.asynccontextmanager
async def h3_connect(
    host: str,
    port: int,
    ca_path: str,
    server_name: str = "localhost",
    *,
    timeout: float = 10,
    session_ticket: SessionTicket | None = None,
    session_ticket_handler: Callable[[SessionTicket], None] | None = None,
    wait_connected: bool = True,
) -> AsyncIterator[H3Client]:
    """An HTTP/3 connection verified against ``ca_path``. The handshake must
    finish within ``timeout`` seconds. ``session_ticket`` resumes an earlier
    session; with ``wait_connected=False`` requests started before the
    handshake completes go out as 0-RTT when the ticket allows it."""
    configuration = client_configuration(ca_path, server_name)
    configuration.session_ticket = session_ticket
    async with connect(
        host,
        port,
        configuration=configuration,
        create_protocol=H3Client,
        session_ticket_handler=session_ticket_handler,
        wait_connected=False,
    ) as client:
        assert isinstance(client, H3Client)
        if wait_connected:
            client.transmit()  # the Initial, held back by wait_connected=False
            await asyncio.wait_for(client.wait_connected(), timeout)
        yield client
