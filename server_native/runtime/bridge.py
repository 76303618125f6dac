"""The socket bridge (``native_callback=False``): Python's end.

The native server connects to a socket listened on here — a Unix socket in a
private temporary directory, or loopback TCP where there are none — and sends
every request as length-prefixed frames; the response goes back the same way,
streamed in chunks both ways. Every exchange is a stream of its own on one
connection: frames carry a stream id, each read takes every complete frame
that arrived, and the frames the handlers send in one loop iteration leave
in one write. Per-stream flow control (window frames) bounds what either side
buffers. ``src/bridge.rs`` documents the frame layout.

:class:`BridgeRequest` has the interface of ``_native.NativeRequest`` that
the rest of the package uses, with the same return conventions, so every API
layer runs unchanged on either transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import socket
import struct
import sys
import tempfile
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .._dist.loader import native
from .proxy import PROXY_HEADER_NAMES

if TYPE_CHECKING:
    from .contract import Request

__all__ = ["BridgeListener", "BridgeRequest"]

VERSION = 2
HELLO, REQUEST_HEAD, REQUEST_CHUNK, REQUEST_END, RESPONSE_HEAD, RESPONSE_CHUNK, RESPONSE_END, ABORT = range(8)
WS_ACCEPT, WS_MESSAGE, WS_CLOSE, WINDOW = 8, 9, 10, 11
#: Largest body chunk in one frame.
CHUNK = 64 * 1024
#: Largest frame either side accepts.
MAX_FRAME = 16 * 1024 * 1024
#: Data bytes either side may send on a stream before the other grants more.
WINDOW_SIZE = 256 * 1024
#: Consumed bytes are granted back once this many gathered.
GRANT_AT = WINDOW_SIZE // 4
#: Frames queued before they are written at once, mid-iteration; and the
#: connection's write buffer past which writers wait.
HIGH_WATER = 1024 * 1024

#: The send buffer asked for on a Unix bridge socket (the kernel caps it at
#: net.core.wmem_max). Its default, about 200 KiB, is twenty 10 KiB
#: responses: each write then carried fewer responses per client
#: connection, and the native side flushed each to its client alone.
SEND_BUFFER = 1024 * 1024

#: Why the native side gave up on a request (its abort frame's payload).
_ABORT_CLIENT_GONE = 1
_ABORT_TOO_LARGE = 2
_ABORT_DISCARDED = 3

_U32 = struct.Struct(">I")
#: Length (of what follows), version, type, stream id.
_FRAME = struct.Struct(">IBBI")
_HEADER = 6  # what the length counts of the frame header
_HEAD_START = struct.Struct(">HBI")
_U16 = struct.Struct(">H")

_ClientDisconnected = native.ClientDisconnected
_BodyTooLarge = native.BodyTooLarge
#: (stream, status, headers, reason, body) -> a response head frame; checks
#: what the in-process transport checks (ValueError); with a body of at most
#: CHUNK bytes, the whole response.
_response_head = native.bridge_response_head
#: (head strings, head flags, client, server, base, state) -> the ASGI scope.
_asgi_scope: Callable[..., dict[str, Any]] = native.bridge_asgi_scope

# What the native side's `http` crate accepts (HeaderName, HeaderValue,
# ReasonPhrase): checked here so a bad value is a ValueError at the call,
# as it is on the in-process transport.
_token = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+").fullmatch
_field_value = re.compile(rb"[\t\x20-\x7e\x80-\xff]*").fullmatch

_WAITING, _STREAMING, _DONE, _WEBSOCKET = 0, 1, 2, 3

#: Request head flags.
_HEAD_TLS, _HEAD_WEBSOCKET, _HEAD_END, _HEAD_UNIX = 1, 2, 4, 8
#: WebSocket message flags.
_WS_TEXT, _WS_BINARY, _WS_MORE = 1, 2, 4


class _ProtocolError(Exception):
    pass


# ---------------------------------------------------------------- encoding


def _wire(value: Any) -> bytes:
    """Header text for the wire: latin-1 when every character fits, else
    UTF-8 (the in-process transport's rule)."""
    if value.__class__ is bytes:
        return value
    if isinstance(value, str):
        if value.isascii():
            return value.encode("ascii")
        try:
            return value.encode("latin-1")
        except UnicodeEncodeError:
            return value.encode("utf-8")
    if isinstance(value, bytes):
        return bytes(value)
    raise TypeError(f"header names and values must be str or bytes, not {type(value).__name__}")


def _headers_payload(headers: Iterable[tuple[Any, Any]], parts: list[Any]) -> int:
    count = 0
    pack = _U32.pack
    for name, value in headers:
        name_bytes = _wire(name)
        value_bytes = _wire(value)
        if not _token(name_bytes):
            raise ValueError(f"invalid header name {name_bytes.decode('latin-1')!r}")
        if not _field_value(value_bytes):
            raise ValueError(
                f"invalid value for header {name_bytes.decode('latin-1').lower()}: {value_bytes.decode('latin-1')!r}"
            )
        parts += (pack(len(name_bytes)), name_bytes, pack(len(value_bytes)), value_bytes)
        count += 1
    return count


def _frame(kind: int, stream: int, payload: bytes = b"") -> bytes:
    return _FRAME.pack(len(payload) + _HEADER, VERSION, kind, stream) + payload


# ---------------------------------------------------------------- the request


_HEAD_FIXED = struct.Struct(">HHBI")


def _head_string(index: int) -> Any:
    """A string of the request head, decoded only when asked for."""
    return property(lambda request: request._fields[index].decode("latin-1"))


class BridgeRequest:
    """One request that came over the bridge (one stream); the interface of
    ``_native.NativeRequest``."""

    __slots__ = (
        "_fixed",
        "_fields",
        "peer_certificate",
        "_conn",
        "_id",
        "_chunks",
        "_end",
        "_waiter",
        "_state",
        "_gone",
        "_disconnect_waiter",
        "_ws",
        "_credit",
        "_pending",
        "_send_waiter",
        "_consumed",
    )

    # Every request makes one, so it does little: one struct call and one
    # split for the whole head; the fields are decoded when asked for; as
    # few container objects as can be (each adds to the garbage collector's
    # work while requests are in flight).
    def __init__(self, conn: _BridgeConnection, stream: int, data: bytes, start: int, end: int) -> None:
        #: client port, local port, flags, certificate size
        fixed = self._fixed = _HEAD_FIXED.unpack_from(data, start)
        strings_at = start + _HEAD_FIXED.size + fixed[3]
        fields = data[strings_at:end].split(b"\0")
        if len(fields) < 8 or len(fields) & 1 or strings_at > end:
            raise _ProtocolError("a malformed request head")
        #: The head's strings; the headers' names and values from index 8.
        self._fields = fields
        self.peer_certificate = data[start + _HEAD_FIXED.size : strings_at] if fixed[3] else None
        self._conn = conn
        self._id = stream
        self._chunks: deque[bytes] | None = None
        #: None while the body flows; True once complete; else the exception
        #: class (and message) a read raises.
        self._end: Any = True if fixed[2] & _HEAD_END else None
        self._waiter: Any = None
        self._state = _WAITING
        #: The native side dropped the exchange: nothing can be sent.
        self._gone = False
        self._disconnect_waiter: Any = None
        self._ws: _WebSocket | None = None
        #: Data bytes we may still send (the native side's window frames add).
        self._credit = WINDOW_SIZE
        #: What waits for credit, in order: (type, flags, data) for data;
        #: (None, 0, frame) for a frame that must follow it.
        self._pending: deque[tuple[Any, int, Any]] | None = None
        self._send_waiter: Any = None
        #: Data bytes taken in but not yet granted back.
        self._consumed = 0

    # -- head -------------------------------------------------------------

    method = _head_string(0)
    scheme = _head_string(1)

    @property
    def authority(self) -> str | None:
        authority = self._fields[2]
        return authority.decode("latin-1") if authority else None

    path = _head_string(3)
    query = _head_string(4)
    http_version = _head_string(5)

    @property
    def remote_addr(self) -> tuple[str, int] | None:
        """None over a Unix socket, where the client has no address (unless
        a PROXY protocol header gave one)."""
        if not self._fields[6]:
            return None
        return (self._fields[6].decode("latin-1"), self._fixed[0])

    @property
    def local_addr(self) -> tuple[str, int | None]:
        """Over a Unix socket: the socket's path and no port."""
        if self._fixed[2] & _HEAD_UNIX:
            return (self._fields[7].decode("utf-8"), None)
        return (self._fields[7].decode("latin-1"), self._fixed[1])

    @property
    def tls(self) -> bool:
        return bool(self._fixed[2] & _HEAD_TLS)

    @property
    def websocket(self) -> bool:
        """Whether the request asks for a WebSocket (HTTP/1.1 upgrade or
        HTTP/2 extended CONNECT)."""
        return bool(self._fixed[2] & _HEAD_WEBSOCKET)

    @property
    def content_length(self) -> int | None:
        fields = self._fields
        for index in range(8, len(fields), 2):
            if fields[index] == b"content-length":
                text = fields[index + 1].strip()
                return int(text) if text.isdigit() else None
        return None

    @property
    def head_sent(self) -> bool:
        return self._state != _WAITING

    def headers(self) -> list[tuple[str, str]]:
        """Request headers as ``(name, value)`` pairs in order, names
        lowercase, values decoded as latin-1."""
        fields = self._fields
        return [
            (fields[index].decode("latin-1"), fields[index + 1].decode("latin-1")) for index in range(8, len(fields), 2)
        ]

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        fields = self._fields
        return list(zip(fields[8::2], fields[9::2]))

    @property
    def has_proxy_headers(self) -> bool:
        return not PROXY_HEADER_NAMES.isdisjoint(self._fields[8::2])

    def asgi_scope(self, base: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
        """The ASGI ``http`` or ``websocket`` scope, built by the native
        code that builds ``NativeRequest.asgi_scope``."""
        return _asgi_scope(self._fields, self._fixed[2], self.remote_addr, self.local_addr, base, state)

    def header(self, name: str) -> str | None:
        """The first value of a header, by case-insensitive name."""
        key = name.lower().encode("latin-1", "replace")
        fields = self._fields
        for index in range(8, len(fields), 2):
            if fields[index] == key:
                return fields[index + 1].decode("latin-1")
        return None

    # -- body in ----------------------------------------------------------

    def read(self, create_future: Callable[[], Any] | None = None) -> Any:
        """The next body chunk; ``b""`` at the end; or a future (made by
        ``create_future``) that resolves when it is worth asking again (None
        without ``create_future``: just "not yet")."""
        chunks = self._chunks
        if chunks:
            chunk = chunks.popleft()
            if self._end is None:
                self._grant(len(chunk))
            return chunk
        end = self._end
        if end is True:
            return b""
        if end is not None:
            raise end[0](end[1])
        if create_future is None:
            return None
        future = create_future()
        self._waiter = future
        return future

    def _grant(self, size: int) -> None:
        """``size`` data bytes were taken by the application: the native
        side may send as many more (granted in batches)."""
        consumed = self._consumed + size
        if consumed >= GRANT_AT:
            self._consumed = 0
            self._conn._send(_FRAME.pack(_HEADER + 4, VERSION, WINDOW, self._id) + _U32.pack(consumed))
        else:
            self._consumed = consumed

    def _feed(self, chunk: bytes) -> None:
        if self._end is not None:
            raise _ProtocolError("body data after the request end")
        if self._chunks is None:
            self._chunks = deque()
        self._chunks.append(chunk)
        self._wake()

    def _finish_body(self, end: Any) -> None:
        if self._end is None:
            self._end = end
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _lost(self) -> None:
        """The native side gave up on the exchange (or the connection closed)."""
        self._set_gone()
        self._finish_body((_ClientDisconnected, "the client disconnected"))
        if self._ws is not None:
            self._ws.closed_with(1006, "")

    def _set_gone(self) -> None:
        self._gone = True
        self._pending = None
        self._release_sender()
        waiter = self._disconnect_waiter
        if waiter is not None:
            self._disconnect_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def wait_disconnect(self, create_future: Callable[[], Any]) -> Any:
        """None when the client is already gone, else a future (made by
        ``create_future``) resolved when it goes."""
        if self._gone:
            return None
        future = create_future()
        self._disconnect_waiter = future
        return future

    # -- frames out -------------------------------------------------------

    def _out_data(self, kind: int, flags: int, data: Any) -> None:
        """Queues body data (or a WebSocket message, ``flags`` its type) as
        frames of at most CHUNK bytes within the stream's credit; what does
        not fit waits for window frames."""
        if data.__class__ is not bytes:
            data = bytes(data)  # the caller may change its buffer once we return
        size = len(data)
        if not self._pending and size <= self._credit and size <= CHUNK:
            self._credit -= size
            if kind == WS_MESSAGE:
                self._conn._send_parts(
                    _FRAME.pack(size + _HEADER + 1, VERSION, WS_MESSAGE, self._id) + bytes((flags,)), data
                )
            else:
                self._conn._send_parts(_FRAME.pack(size + _HEADER, VERSION, kind, self._id), data)
            return
        if self._pending is None:
            self._pending = deque()
        self._pending.append((kind, flags, memoryview(data)))
        self._send_pending()

    def _out_frame(self, frame: bytes) -> None:
        """Queues a frame that must follow the data queued before it."""
        if self._pending:
            self._pending.append((None, 0, frame))
        else:
            self._conn._send(frame)

    def _send_pending(self) -> None:
        pending = self._pending
        assert pending is not None
        conn = self._conn
        stream = self._id
        while pending:
            kind, flags, data = pending[0]
            if kind is None:
                conn._send(data)
                pending.popleft()
                continue
            size = len(data)
            take = min(size, self._credit, CHUNK)
            if size and not take:
                break
            self._credit -= take
            if kind == WS_MESSAGE:
                more = _WS_MORE if take < size else 0
                conn._send_parts(
                    _FRAME.pack(take + _HEADER + 1, VERSION, WS_MESSAGE, stream) + bytes((flags | more,)), data[:take]
                )
            else:
                conn._send_parts(_FRAME.pack(take + _HEADER, VERSION, kind, stream), data[:take])
            if take == size:
                pending.popleft()
            else:
                pending[0] = (kind, flags, data[take:])
        if not pending:
            self._release_sender()
            self._maybe_over()

    def _window(self, size: int) -> None:
        self._credit += size
        if self._pending:
            self._send_pending()

    def _release_sender(self) -> None:
        waiter = self._send_waiter
        if waiter is not None:
            self._send_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _backlog(self, create_future: Callable[[], Any]) -> Any:
        """None when more may be sent at once, else a future to await first:
        the stream waits for credit, or the connection for the socket."""
        conn = self._conn
        if self._pending:
            future = create_future()
            self._send_waiter = future
            return future
        if conn._writing_paused:
            future = create_future()
            conn._drain_waiters.append(future)
            return future
        return None

    def _maybe_over(self) -> None:
        """Forgets the stream once both directions are through: the response
        out, nothing waiting for credit, and the request's end in."""
        if self._state == _DONE and self._end is not None and not self._pending:
            self._conn._forget(self)

    # -- response out -----------------------------------------------------

    def _check_unsent(self) -> None:
        if self._state != _WAITING:
            raise RuntimeError("the response was already sent")

    def respond(
        self,
        status: int,
        headers: Iterable[tuple[Any, Any]] | None,
        body: bytes | bytearray | memoryview,
        reason: str | None = None,
    ) -> bool:
        """Sends a whole response. ``headers=None`` sends the server's default
        headers. Returns False when the client is already gone."""
        self._check_unsent()
        try:
            if body.__class__ is not bytes:
                if isinstance(body, str):
                    raise TypeError("a response body must be bytes, not str")
                body = bytes(body)  # it is sent as it is, after this returns
            frame = _response_head(self._id, status, headers, reason, len(body))
        except BaseException:
            self.abort()
            raise
        if self._gone:
            return False
        self._state = _DONE
        if len(body) > CHUNK:
            self._conn._send(frame)
            self._out_data(RESPONSE_CHUNK, 0, body)
            self._out_frame(_FRAME.pack(_HEADER, VERSION, RESPONSE_END, self._id))
        elif body:
            self._conn._send_parts(frame, body)
        else:
            self._conn._send(frame)
        self._maybe_over()
        return True

    def send_direct(self, response: Any) -> bool:
        """Sends a whole ``NativeDirectResponse``. Returns False when the
        client is already gone."""
        payload = response._bridge_payload()
        if payload is None:
            return self.respond(response.status, response.headers, response.body)
        if self._state != _WAITING:
            raise RuntimeError("the response was already sent")
        if self._gone:
            return False
        self._state = _DONE
        conn = self._conn
        conn._send_parts(_FRAME.pack(len(payload) + _HEADER, VERSION, RESPONSE_HEAD, self._id), payload)
        if self._end is not None:
            conn._forget(self)
        return True

    def start(self, status: int, headers: Iterable[tuple[Any, Any]] | None, reason: str | None = None) -> bool:
        """Sends the response head; the body follows with ``write`` and
        ``finish``."""
        self._check_unsent()
        try:
            frame = _response_head(self._id, status, headers, reason, None)
        except BaseException:
            self.abort()
            raise
        if self._gone:
            return False
        self._state = _STREAMING
        self._conn._send(frame)
        return True

    def write(self, data: bytes, create_future: Callable[[], Any]) -> Any:
        """Queues a body chunk. Returns None when more may be written at once,
        or a future to await first (the client reads slower than we write)."""
        state = self._state
        if state != _STREAMING:
            if state == _WAITING:
                raise RuntimeError("write() before start()")
            return None
        if self._gone:
            raise _ClientDisconnected("the client disconnected")
        if not data:
            return None
        self._out_data(RESPONSE_CHUNK, 0, data)
        return self._backlog(create_future)

    def finish(self) -> None:
        """Ends a streamed body."""
        if self._state == _STREAMING:
            self._state = _DONE
            if not self._gone:
                self._out_frame(_FRAME.pack(_HEADER, VERSION, RESPONSE_END, self._id))
                self._maybe_over()

    def abort(self) -> None:
        """Gives up on the response: a streamed body is cut off (the client
        sees an error, not a short success); an unsent one becomes a 500.
        The stream is over."""
        if self._state == _DONE or self._state == _WEBSOCKET:
            return
        self._state = _DONE
        if not self._gone:
            self._conn._send(_FRAME.pack(_HEADER, VERSION, ABORT, self._id))
            self._conn._forget(self)
            self._set_gone()
            self._finish_body((_ClientDisconnected, "the response was aborted"))

    # -- WebSocket --------------------------------------------------------

    def accept_websocket(
        self, subprotocol: str | None = None, headers: Iterable[tuple[Any, Any]] | None = None
    ) -> bool:
        """Accepts the WebSocket: 101 (HTTP/1.1) or 200 (HTTP/2) with
        ``headers`` and the chosen ``subprotocol``. False when the client
        already left (or it was accepted before)."""
        parts: list[Any] = [b"", b"", b""]
        count = 0 if headers is None else _headers_payload(headers, parts)
        chosen = b"" if subprotocol is None else _wire(subprotocol)
        if subprotocol is not None and not (chosen and _field_value(chosen)):
            raise ValueError(f"invalid subprotocol {subprotocol!r}")
        if not self.websocket:
            raise RuntimeError("not a WebSocket request")
        if self._state != _WAITING or self._gone:
            return False
        parts[1] = _U32.pack(len(chosen)) + chosen
        parts[2] = _U32.pack(count)
        size = sum(map(len, parts))
        parts[0] = _FRAME.pack(size + _HEADER, VERSION, WS_ACCEPT, self._id)
        self._state = _WEBSOCKET
        self._ws = _WebSocket(self)
        self._conn._send(b"".join(parts))
        return True

    def _socket(self) -> _WebSocket:
        if self._ws is None:
            raise RuntimeError("the WebSocket is not accepted")
        return self._ws

    def ws_receive(self, create_future: Callable[[], Any]) -> Any:
        """The next message: ``("text", str)``, ``("bytes", bytes)`` or
        ``("close", (code, reason))``; or a future to await first."""
        return self._socket().receive(create_future)

    def ws_send(self, data: str | bytes, create_future: Callable[[], Any]) -> Any:
        """Queues a text (str) or binary (bytes) message. None, or a future to
        await before sending more; raises ClientDisconnected once closed."""
        return self._socket().send(data, create_future)

    def ws_close(self, code: int = 1000, reason: str = "") -> None:
        """Starts the closing handshake (no-op once closed)."""
        self._socket().close(code, reason)

    def __repr__(self) -> str:
        return f"<BridgeRequest {self.method} {self.path}>"


class _WebSocket:
    """An accepted WebSocket on a bridge stream: messages in (granted back
    as the application takes them) and out (``send`` waits when the native
    side reads slower than we write)."""

    __slots__ = ("_request", "_inbox", "_closed", "_waiter", "_sending_closed", "_partial")

    def __init__(self, request: BridgeRequest) -> None:
        self._request = request
        #: (message, data bytes still to grant back once it is taken)
        self._inbox: deque[tuple[tuple[str, Any], int]] = deque()
        self._closed: tuple[int, str] | None = None
        self._waiter: Any = None
        self._sending_closed = False
        self._partial: list[bytes] = []

    def receive(self, create_future: Callable[[], Any]) -> Any:
        inbox = self._inbox
        if inbox:
            item, owed = inbox.popleft()
            if self._closed is None:
                self._request._grant(owed)
            return item
        if self._closed is not None:
            return ("close", self._closed)
        future = create_future()
        self._waiter = future
        return future

    def send(self, data: str | bytes, create_future: Callable[[], Any]) -> Any:
        if isinstance(data, str):
            kind, payload = _WS_TEXT, data.encode("utf-8")
        elif isinstance(data, (bytes, bytearray, memoryview)):
            kind, payload = _WS_BINARY, bytes(data)
        else:
            raise TypeError(f"a WebSocket message is str or bytes, not {type(data).__name__}")
        if self._sending_closed or self._closed is not None:
            raise _ClientDisconnected("the WebSocket is closed")
        request = self._request
        request._out_data(WS_MESSAGE, kind, payload)
        return request._backlog(create_future)

    def close(self, code: int, reason: str) -> None:
        if self._sending_closed or self._closed is not None:
            return
        self._sending_closed = True
        request = self._request
        request._out_frame(_frame(WS_CLOSE, request._id, _U16.pack(code) + reason.encode("utf-8")))

    def _message(self, payload: bytes) -> None:
        flags = payload[0]
        data = payload[1:]
        if flags & _WS_MORE:
            # Part of a message: held here (the native side bounds the
            # message's size), so granted back at once.
            self._partial.append(data)
            self._request._grant(len(data))
            return
        if self._partial:
            self._partial.append(data)
            whole = b"".join(self._partial)
            self._partial = []
        else:
            whole = data
        item = ("text", whole.decode("utf-8")) if flags & _WS_TEXT else ("bytes", whole)
        self._inbox.append((item, len(data)))
        self._wake()

    def closed_with(self, code: int, reason: str) -> None:
        if self._closed is None:
            self._closed = (code, reason)
            self._sending_closed = True
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)


# ---------------------------------------------------------------- one connection


class _BridgeConnection(asyncio.Protocol):
    """The connection from the native side: every exchange a stream on it.
    Each read parses every complete frame; the frames sent in one loop
    iteration go out in one write."""

    def __init__(self, listener: BridgeListener) -> None:
        self._listener = listener
        self._loop = listener._loop
        self._transport: Any = None
        #: Frames queued in this loop iteration, written together at its end
        #: (or as soon as they pass HIGH_WATER): a handler that answers without
        #: awaiting has finished before its response leaves.
        self._out: list[Any] = []
        self._out_size = 0
        self._flush_scheduled = False
        self._receiving = False
        self._pending = bytearray()
        self._need = 0
        self._greeted = False
        #: The open streams, by id.
        self._streams: dict[int, BridgeRequest] = {}
        self._writing_paused = False
        self._drain_waiters: list[Any] = []
        self._closed = False

    # -- asyncio callbacks ------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self._transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == getattr(socket, "AF_UNIX", None):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self._listener._connections.add(self)

    def data_received(self, data: bytes) -> None:
        self._receiving = True
        try:
            self._receive(data)
        finally:
            self._receiving = False
            if self._out:
                self._flush()

    def _receive(self, data: bytes) -> None:
        pending = self._pending
        if pending:
            pending += data
            if len(pending) < self._need:
                return
            data = bytes(pending)
            pending.clear()
        size = len(data)
        offset = 0
        arrived: list[BridgeRequest] = []
        streams = self._streams
        unpack = _FRAME.unpack_from
        try:
            while size - offset >= 10:
                length, version, kind, stream = unpack(data, offset)
                if length < _HEADER or length > MAX_FRAME:
                    raise _ProtocolError(f"frame length {length} out of range")
                end = offset + 4 + length
                if end > size:
                    break
                if version != VERSION:
                    raise _ProtocolError("unknown frame version")
                start = offset + 10
                offset = end
                request = streams.get(stream)
                if request is None:
                    if kind == REQUEST_HEAD:
                        if not self._greeted or not stream:
                            raise _ProtocolError("unexpected request head")
                        request = streams[stream] = BridgeRequest(self, stream, data, start, end)
                        arrived.append(request)
                    elif kind == HELLO:
                        token = self._listener.token
                        if self._greeted or (token is not None and not secrets.compare_digest(data[start:end], token)):
                            raise _ProtocolError("bad hello")
                        self._greeted = True
                    elif kind > WINDOW or not self._greeted:
                        raise _ProtocolError(f"unexpected frame type {kind}")
                    # else: a stream that is over here (its frames crossed
                    # our end or abort)
                elif kind == REQUEST_CHUNK:
                    request._feed(data[start:end])
                elif kind == REQUEST_END:
                    request._finish_body(True)
                    request._maybe_over()
                elif kind == WINDOW:
                    if length != _HEADER + 4:
                        raise _ProtocolError("a malformed window frame")
                    request._window(_U32.unpack_from(data, start)[0])
                elif kind == ABORT:
                    reason = data[start] if end > start else _ABORT_CLIENT_GONE
                    if reason == _ABORT_DISCARDED:
                        message = (
                            "the rest of the request body was dropped: the response was complete before it was read"
                        )
                        request._finish_body((_ClientDisconnected, message))
                        request._maybe_over()
                    elif reason == _ABORT_TOO_LARGE:
                        request._finish_body((_BodyTooLarge, "request body exceeds max_body_size"))
                        if request._state == _WAITING:
                            # The native side answered 413 itself.
                            self._forget(request)
                            request._set_gone()
                        else:
                            request._maybe_over()
                    else:
                        self._forget(request)
                        request._lost()
                elif kind == WS_MESSAGE:
                    if request._ws is None or length < _HEADER + 1:
                        raise _ProtocolError("a WebSocket message outside a WebSocket")
                    request._ws._message(data[start:end])
                elif kind == WS_CLOSE:
                    if request._ws is None or length < _HEADER + 2:
                        raise _ProtocolError("a WebSocket close outside a WebSocket")
                    code = _U16.unpack_from(data, start)[0]
                    self._forget(request)
                    request._ws.closed_with(code, data[start + 2 : end].decode("utf-8", "replace"))
                else:
                    raise _ProtocolError(f"unexpected frame type {kind}")
        except (_ProtocolError, struct.error, IndexError, UnicodeDecodeError):
            self._close()
            self._lose_all()
            return
        if offset < size:
            rest = memoryview(data)[offset:]
            pending += rest
            self._need = 4 + _U32.unpack_from(rest)[0] if len(rest) >= 4 else 10
        on_request = self._listener._on_request
        for request in arrived:
            try:
                on_request(request)
            except Exception as exc:  # noqa: BLE001 - reported; the client gets a 500
                self._listener._on_error(exc)
                if not request.head_sent:
                    request.abort()

    def eof_received(self) -> None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._listener._connections.discard(self)
        self._lose_all()
        self._release_writers()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._release_writers()

    # -- helpers ----------------------------------------------------------

    def _lose_all(self) -> None:
        streams = list(self._streams.values())
        self._streams.clear()
        for request in streams:
            request._lost()

    def _forget(self, request: BridgeRequest) -> None:
        if self._streams.get(request._id) is request:
            del self._streams[request._id]

    def _release_writers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _send(self, data: Any) -> None:
        if self._closed:
            return
        self._out.append(data)
        self._out_size += len(data)
        if self._out_size >= HIGH_WATER:
            self._flush()
        elif not self._flush_scheduled and not self._receiving:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _send_parts(self, head: bytes, data: Any) -> None:
        """A frame header and its payload, sent without joining them here."""
        if self._closed:
            return
        self._out.append(head)
        self._send(data)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        if not out:
            return
        self._out_size = 0
        if not self._closed:
            # One vectored write under uvloop; the bodies are not copied.
            self._transport.writelines(out)
        out.clear()

    def _close(self) -> None:
        """Closes at once; every stream on the connection is lost."""
        if not self._closed:
            self._closed = True
            self._out.clear()
            self._transport.abort()


# ---------------------------------------------------------------- the listener


def _unix_sockets(loop: asyncio.AbstractEventLoop) -> bool:
    return hasattr(socket, "AF_UNIX") and sys.platform != "win32" and hasattr(loop, "create_unix_server")


def _remove(directory: str | None) -> None:
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


class BridgeListener:
    """Python's end of the bridge: listens, authenticates each connection by
    its hello token, and hands every request to ``on_request``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_request: Callable[[BridgeRequest], None],
        on_error: Callable[[BaseException], None],
        *,
        backlog: int = 1024,
    ) -> None:
        self._loop = loop
        self._on_request = on_request
        self._on_error = on_error
        self.token: bytes | None = secrets.token_bytes(16)
        self._connections: set[_BridgeConnection] = set()
        self._closing: asyncio.Future[None] | None = None
        directory = None
        backlog = max(128, min(backlog, 65535))
        if _unix_sockets(loop):
            directory = tempfile.mkdtemp(prefix="server-native-")
            path = os.path.join(directory, "bridge.sock")
            if len(path.encode()) > 100:  # sun_path is ~104-108 bytes
                shutil.rmtree(directory, ignore_errors=True)
                directory = tempfile.mkdtemp(prefix="sn-", dir="/tmp")
                path = os.path.join(directory, "b.sock")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address = "unix:" + path
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._cleanup = weakref.finalize(self, _remove, directory)
        try:
            if directory is not None:
                sock.bind(path)
            else:
                sock.bind(("127.0.0.1", 0))
                address = f"tcp:127.0.0.1:{sock.getsockname()[1]}"
            # Listening now: the native side may connect before the loop
            # runs the task below; its connections wait in the backlog.
            sock.listen(backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            self._cleanup()
            raise
        self.address = address
        self._sock = sock
        if directory is not None:
            serving = loop.create_unix_server(self._protocol, sock=sock, backlog=backlog)
        else:
            serving = loop.create_server(self._protocol, sock=sock, backlog=backlog)
        self._server_task: asyncio.Task[Any] = loop.create_task(serving)

    def _protocol(self) -> _BridgeConnection:
        return _BridgeConnection(self)

    def close_now(self) -> None:
        """Closes at once, without waiting (the server could not start)."""
        if self._closing is None:
            self._closing = self._loop.create_future()
            self._closing.set_result(None)
        self._server_task.cancel()
        self._sock.close()
        for conn in list(self._connections):
            conn._close()
        self._cleanup()

    async def close(self) -> None:
        """Stops listening and closes every connection (the native side has
        drained by now). Safe to call more than once, concurrently too."""
        if self._closing is None:
            self._closing = self._loop.create_future()
            try:
                server = await self._server_task
            except BaseException:  # noqa: BLE001 - never started: nothing to close but the socket
                server = None
                self._sock.close()
            if server is not None:
                server.close()
            for conn in list(self._connections):
                conn._close()
            if server is not None and sys.version_info >= (3, 12):
                await server.wait_closed()
            self._cleanup()
            self._closing.set_result(None)
        await asyncio.shield(self._closing)


if TYPE_CHECKING:

    def _bridge_keeps_the_request_contract(request: BridgeRequest) -> Request:
        return request
