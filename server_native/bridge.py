"""The socket bridge (``native_callback=False``): Python's end.

The native server connects to a socket listened on here — a Unix socket in a
private temporary directory, or loopback TCP where there are none — and sends
every request as length-prefixed frames; the response goes back the same way,
streamed in chunks both ways. The native side keeps a pool of connections,
one request in flight on each. ``src/bridge.rs`` documents the frame layout.

:class:`BridgeRequest` has the interface of ``_native.NativeRequest`` that
the rest of the package uses, with the same return conventions, so every API
layer runs unchanged on either transport.
"""

from __future__ import annotations

import asyncio
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
from typing import Any

from ._loader import native

__all__ = ["BridgeListener", "BridgeRequest"]

VERSION = 1
HELLO, REQUEST_HEAD, REQUEST_CHUNK, REQUEST_END, RESPONSE_HEAD, RESPONSE_CHUNK, RESPONSE_END, ABORT = range(8)
WS_ACCEPT, WS_MESSAGE, WS_CLOSE = 8, 9, 10
#: Largest body chunk in one frame.
CHUNK = 64 * 1024
#: Largest frame either side accepts.
MAX_FRAME = 16 * 1024 * 1024
#: Request body buffered ahead of the application before reading pauses,
#: and response bytes queued before ``write()`` asks the caller to wait.
HIGH_WATER = 256 * 1024

#: Why the native side gave up on a request (its abort frame's payload).
_ABORT_CLIENT_GONE = 1
_ABORT_TOO_LARGE = 2
_ABORT_DISCARDED = 3

_FLAG_DEFAULT_HEADERS = 1
_FLAG_WHOLE_BODY = 2

_U32 = struct.Struct(">I")
_FRAME = struct.Struct(">IBB")
_HEAD_START = struct.Struct(">HBI")
_U16 = struct.Struct(">H")

_END_FRAME = _FRAME.pack(2, VERSION, RESPONSE_END)
_ABORT_FRAME = _FRAME.pack(2, VERSION, ABORT)
_CHUNK_HEADER = _FRAME.pack(CHUNK + 2, VERSION, RESPONSE_CHUNK)

_ClientDisconnected = native.ClientDisconnected
_BodyTooLarge = native.BodyTooLarge

# What the native side's `http` crate accepts (HeaderName, HeaderValue,
# ReasonPhrase): checked here so a bad value is a ValueError at the call,
# as it is on the in-process transport.
_token = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+").fullmatch
_field_value = re.compile(rb"[\t\x20-\x7e\x80-\xff]*").fullmatch

_WAITING, _STREAMING, _DONE, _WEBSOCKET = 0, 1, 2, 3

#: Request head flags.
_HEAD_TLS, _HEAD_WEBSOCKET, _HEAD_UNIX = 1, 2, 4
#: WebSocket message flags.
_WS_TEXT, _WS_BINARY, _WS_MORE = 1, 2, 4
#: WebSocket messages buffered ahead of the application before reading pauses.
_WS_INBOX_HIGH_WATER = 1024 * 1024


class _ProtocolError(Exception):
    pass


# ---------------------------------------------------------------- encoding


def _wire(value: Any) -> bytes:
    """Header text for the wire: latin-1 when every character fits, else
    UTF-8 (the in-process transport's rule)."""
    if value.__class__ is bytes:
        return value  # type: ignore[no-any-return]
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


def _headers_payload(headers: Iterable[tuple[Any, Any]], parts: list[bytes]) -> int:
    count = 0
    pack = _U32.pack
    for name, value in headers:
        name_bytes = _wire(name)
        value_bytes = _wire(value)
        if not _token(name_bytes):
            raise ValueError(f"invalid header name {name_bytes.decode('latin-1')!r}")
        if not _field_value(value_bytes):
            raise ValueError(f"invalid value for header {name_bytes.decode('latin-1').lower()}: {value_bytes.decode('latin-1')!r}")
        parts += (pack(len(name_bytes)), name_bytes, pack(len(value_bytes)), value_bytes)
        count += 1
    return count


def _head_frame(status: int, headers: Iterable[tuple[Any, Any]] | None, reason: str | None, whole: bool) -> list[bytes]:
    """A response head frame, as parts to join. Raises ValueError for what
    the native side would refuse."""
    status = int(status)
    if not 200 <= status <= 999:
        raise ValueError(f"invalid response status {status}")
    if reason is None:
        reason_bytes = b""
    else:
        reason_bytes = reason.encode("utf-8")
        if not _field_value(reason_bytes):
            raise ValueError(f"invalid reason phrase {reason!r}")
    flags = _FLAG_WHOLE_BODY if whole else 0
    parts: list[bytes] = [b"", b"", reason_bytes, b""]
    if headers is None:
        flags |= _FLAG_DEFAULT_HEADERS
        count = 0
    else:
        count = _headers_payload(headers, parts)
    parts[1] = _HEAD_START.pack(status, flags, len(reason_bytes))
    parts[3] = _U32.pack(count)
    size = sum(map(len, parts))
    parts[0] = _FRAME.pack(size + 2, VERSION, RESPONSE_HEAD)
    return parts


def _add_chunks(parts: list[bytes], body: bytes) -> None:
    size = len(body)
    if size <= CHUNK:
        if size:
            parts += (_FRAME.pack(size + 2, VERSION, RESPONSE_CHUNK), body)
        return
    view = memoryview(body)
    for start in range(0, size, CHUNK):
        piece = view[start : start + CHUNK]
        parts += (_CHUNK_HEADER if len(piece) == CHUNK else _FRAME.pack(len(piece) + 2, VERSION, RESPONSE_CHUNK), piece)  # type: ignore[arg-type]


#: Encoded `NativeDirectResponse`s (head, body and end frames), for the
#: pre-encoded form that is returned for every request. Bounded.
_direct_cache: dict[int, tuple[Any, bytes]] = {}
_direct_cache_bytes = 0
_DIRECT_CACHE_LIMIT = 1024 * 1024
_DIRECT_CACHE_BODY = 16 * 1024


def _direct_frames(response: Any) -> bytes:
    global _direct_cache_bytes
    entry = _direct_cache.get(id(response))
    if entry is not None and entry[0] is response:
        return entry[1]
    parts = _head_frame(response.status, response.headers, None, True)
    body = response.body
    _add_chunks(parts, body)
    parts.append(_END_FRAME)
    frames = b"".join(parts)
    if len(body) <= _DIRECT_CACHE_BODY:
        if _direct_cache_bytes + len(frames) > _DIRECT_CACHE_LIMIT:
            _direct_cache.clear()
            _direct_cache_bytes = 0
        _direct_cache[id(response)] = (response, frames)
        _direct_cache_bytes += len(frames)
    return frames


# ---------------------------------------------------------------- the request


_HEAD_FIXED = struct.Struct(">HHBI")
_length_tables: dict[int, struct.Struct] = {}


def _lengths(count: int) -> struct.Struct:
    table = _length_tables.get(count)
    if table is None:
        if count > 100_000:
            raise _ProtocolError("too many strings in a request head")
        table = _length_tables[count] = struct.Struct(f">{count}I")
    return table


class BridgeRequest:
    """One request that came over the bridge; the interface of
    ``_native.NativeRequest``."""

    __slots__ = (
        "method",
        "path",
        "query",
        "scheme",
        "authority",
        "http_version",
        "remote_addr",
        "local_addr",
        "tls",
        "websocket",
        "peer_certificate",
        "content_length",
        "_raw",
        "_conn",
        "_chunks",
        "_buffered",
        "_end",
        "_waiter",
        "_state",
        "_gone",
        "_disconnect_waiter",
        "_ws",
    )

    def __init__(self, conn: _BridgeConnection, payload: bytes) -> None:
        # Two struct calls for every length at once: this runs for every request.
        remote_port, local_port, flags, count = _HEAD_FIXED.unpack_from(payload)
        if count < 9 or not count & 1:
            raise _ProtocolError("a malformed request head")
        at = _HEAD_FIXED.size + 4 * count
        fields = []
        for size in _lengths(count).unpack_from(payload, _HEAD_FIXED.size):
            fields.append(payload[at : at + size])
            at += size
        if at != len(payload):
            raise _ProtocolError("a malformed request head")
        method, scheme, authority, path, query, version, remote_ip, local_ip, certificate = fields[:9]
        raw = list(zip(fields[9::2], fields[10::2]))
        content_length: int | None = None
        if b"content-length" in fields:
            for name, value in raw:
                if name == b"content-length":
                    text = value.strip()
                    if text.isdigit():
                        content_length = int(text)
                    break
        self.method = method.decode("latin-1")
        self.scheme = scheme.decode("latin-1")
        self.authority = authority.decode("latin-1") if authority else None
        self.path = path.decode("latin-1")
        self.query = query.decode("latin-1")
        self.http_version = version.decode("latin-1")
        if flags & _HEAD_UNIX:
            # Over a Unix socket: no client address, the server is its path.
            self.remote_addr: tuple[str, int] | None = None
            self.local_addr: tuple[str, int | None] = (local_ip.decode("utf-8"), None)
        else:
            self.remote_addr = (remote_ip.decode("latin-1"), remote_port)
            self.local_addr = (local_ip.decode("latin-1"), local_port)
        self.tls = bool(flags & _HEAD_TLS)
        #: Whether the request asks for a WebSocket (HTTP/1.1 upgrade or
        #: HTTP/2 extended CONNECT).
        self.websocket = bool(flags & _HEAD_WEBSOCKET)
        self.peer_certificate = certificate or None
        self.content_length = content_length
        self._raw = raw
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        #: None while the body flows; True once complete; else the exception
        #: class (and message) a read raises.
        self._end: Any = None
        self._waiter: Any = None
        self._state = _WAITING
        #: The native side dropped the exchange: nothing can be sent.
        self._gone = False
        self._disconnect_waiter: Any = None
        self._ws: _WebSocket | None = None

    # -- head -------------------------------------------------------------

    @property
    def head_sent(self) -> bool:
        return self._state != _WAITING

    def headers(self) -> list[tuple[str, str]]:
        """Request headers as ``(name, value)`` pairs in order, names
        lowercase, values decoded as latin-1."""
        return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in self._raw]

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return list(self._raw)

    def header(self, name: str) -> str | None:
        """The first value of a header, by case-insensitive name."""
        key = name.lower().encode("latin-1", "replace")
        for raw_name, value in self._raw:
            if raw_name == key:
                return value.decode("latin-1")
        return None

    # -- body in ----------------------------------------------------------

    def read(self, create_future: Callable[[], Any] | None = None) -> Any:
        """The next body chunk; ``b""`` at the end; or a future (made by
        ``create_future``) that resolves when it is worth asking again (None
        without ``create_future``: just "not yet")."""
        chunks = self._chunks
        if chunks:
            chunk = chunks.popleft()
            self._buffered -= len(chunk)
            conn = self._conn
            if conn._reading_paused and self._buffered < HIGH_WATER:
                conn._resume_reading()
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

    def _feed(self, chunk: bytes) -> None:
        if self._end is not None:
            raise _ProtocolError("body data after the request end")
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        self._wake()
        if self._buffered >= HIGH_WATER and self._state != _DONE:
            self._conn._pause_reading()

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
        """The connection closed: the native side gave up on the exchange."""
        self._set_gone()
        self._finish_body((_ClientDisconnected, "the client disconnected"))
        if self._ws is not None:
            self._ws.closed_with(1006, "")

    def _set_gone(self) -> None:
        self._gone = True
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

    # -- response out -----------------------------------------------------

    def _check_unsent(self) -> None:
        if self._state != _WAITING:
            raise RuntimeError("the response was already sent")

    def respond(self, status: int, headers: Iterable[tuple[Any, Any]] | None, body: bytes, reason: str | None = None) -> bool:
        """Sends a whole response. ``headers=None`` sends the server's default
        headers. Returns False when the client is already gone."""
        parts = _head_frame(status, headers, reason, True)
        self._check_unsent()
        if self._gone:
            return False
        _add_chunks(parts, body)
        parts.append(_END_FRAME)
        self._state = _DONE
        self._conn._send(b"".join(parts))
        self._conn._response_done(self)
        return True

    def send_direct(self, response: Any) -> bool:
        """Sends a whole ``NativeDirectResponse``. Returns False when the
        client is already gone."""
        frames = _direct_frames(response)
        self._check_unsent()
        if self._gone:
            return False
        self._state = _DONE
        self._conn._send(frames)
        self._conn._response_done(self)
        return True

    def start(self, status: int, headers: Iterable[tuple[Any, Any]] | None, reason: str | None = None) -> bool:
        """Sends the response head; the body follows with ``write`` and
        ``finish``."""
        parts = _head_frame(status, headers, reason, False)
        self._check_unsent()
        if self._gone:
            return False
        self._state = _STREAMING
        self._conn._send(b"".join(parts))
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
        size = len(data)
        if not size:
            return None
        if size <= CHUNK:
            self._conn._send(_FRAME.pack(size + 2, VERSION, RESPONSE_CHUNK) + data)
        else:
            parts: list[bytes] = []
            _add_chunks(parts, data)
            self._conn._send(b"".join(parts))
        conn = self._conn
        if conn._writing_paused:
            future = create_future()
            conn._drain_waiters.append(future)
            return future
        return None

    def finish(self) -> None:
        """Ends a streamed body."""
        if self._state == _STREAMING:
            self._state = _DONE
            if not self._gone:
                self._conn._send(_END_FRAME)
                self._conn._response_done(self)

    def abort(self) -> None:
        """Gives up on the response: a streamed body is cut off (the client
        sees an error, not a short success); an unsent one becomes a 500."""
        if self._state == _DONE or self._state == _WEBSOCKET:
            return
        self._state = _DONE
        if not self._gone:
            # The connection ends with the exchange: the native side drops it.
            self._conn._send(_ABORT_FRAME)
            self._conn._close()

    # -- WebSocket --------------------------------------------------------

    def accept_websocket(self, subprotocol: str | None = None, headers: Iterable[tuple[Any, Any]] | None = None) -> bool:
        """Accepts the WebSocket: 101 (HTTP/1.1) or 200 (HTTP/2) with
        ``headers`` and the chosen ``subprotocol``. False when the client
        already left (or it was accepted before)."""
        parts: list[bytes] = [b"", b"", b""]
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
        parts[0] = _FRAME.pack(size + 2, VERSION, WS_ACCEPT)
        self._state = _WEBSOCKET
        self._ws = _WebSocket(self._conn)
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
    """An accepted WebSocket on a bridge connection: messages in (buffered,
    reading pauses past a bound) and out (``send`` waits when the native side
    reads slower than we write)."""

    __slots__ = ("_conn", "_inbox", "_buffered", "_closed", "_waiter", "_sending_closed", "_partial")

    def __init__(self, conn: _BridgeConnection) -> None:
        self._conn = conn
        self._inbox: deque[tuple[str, Any]] = deque()
        self._buffered = 0
        self._closed: tuple[int, str] | None = None
        self._waiter: Any = None
        self._sending_closed = False
        self._partial: list[bytes] = []

    def receive(self, create_future: Callable[[], Any]) -> Any:
        inbox = self._inbox
        if inbox:
            item = inbox.popleft()
            self._buffered -= len(item[1])
            conn = self._conn
            if conn._reading_paused and self._buffered < _WS_INBOX_HIGH_WATER:
                conn._resume_reading()
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
        conn = self._conn
        size = len(payload)
        if size <= CHUNK:
            conn._send(_FRAME.pack(size + 3, VERSION, WS_MESSAGE) + bytes((kind,)) + payload)
        else:
            view = memoryview(payload)
            parts: list[bytes] = []
            for start in range(0, size, CHUNK):
                piece = view[start : start + CHUNK]
                flags = kind if start + CHUNK >= size else kind | _WS_MORE
                parts += (_FRAME.pack(len(piece) + 3, VERSION, WS_MESSAGE), bytes((flags,)), piece)  # type: ignore[arg-type]
            conn._send(b"".join(parts))
        if conn._writing_paused:
            future = create_future()
            conn._drain_waiters.append(future)
            return future
        return None

    def close(self, code: int, reason: str) -> None:
        if self._sending_closed or self._closed is not None:
            return
        self._sending_closed = True
        encoded = reason.encode("utf-8")
        self._conn._send(_FRAME.pack(len(encoded) + 4, VERSION, WS_CLOSE) + _U16.pack(code) + encoded)

    def _message(self, payload: bytes) -> None:
        flags = payload[0]
        self._partial.append(payload[1:])
        if flags & _WS_MORE:
            return
        data = b"".join(self._partial) if len(self._partial) > 1 else self._partial[0]
        self._partial = []
        item = ("text", data.decode("utf-8")) if flags & _WS_TEXT else ("bytes", data)
        self._inbox.append(item)
        self._buffered += len(data)
        if self._buffered >= _WS_INBOX_HIGH_WATER:
            self._conn._pause_reading()
        self._wake()

    def closed_with(self, code: int, reason: str) -> None:
        if self._closed is None:
            self._closed = (code, reason)
            self._sending_closed = True
            self._wake()
            # The messages still buffered stay readable; reading goes on to
            # see the connection end.
            self._conn._resume_reading()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)


# ---------------------------------------------------------------- one connection


class _BridgeConnection(asyncio.Protocol):
    """One pooled connection from the native side: frames in, frames out,
    one exchange at a time."""

    def __init__(self, listener: BridgeListener) -> None:
        self._listener = listener
        self._loop = listener._loop
        self._transport: Any = None
        #: Frames queued in this loop iteration, written together at its end
        #: (or as soon as they pass HIGH_WATER): a handler that answers without
        #: awaiting has finished before its response leaves.
        self._out: list[bytes] = []
        self._out_size = 0
        self._flush_scheduled = False
        self._receiving = False
        self._close_after_flush = False
        self._pending = bytearray()
        self._need = 0
        self._greeted = False
        self._request: BridgeRequest | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._drain_waiters: list[Any] = []
        self._closed = False

    # -- asyncio callbacks ------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self._transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER)
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
        arrived: BridgeRequest | None = None
        request = self._request
        try:
            while size - offset >= 6:
                length = _U32.unpack_from(data, offset)[0]
                if length < 2 or length > MAX_FRAME:
                    raise _ProtocolError(f"frame length {length} out of range")
                end = offset + 4 + length
                if end > size:
                    break
                if data[offset + 4] != VERSION:
                    raise _ProtocolError("unknown frame version")
                kind = data[offset + 5]
                if kind == REQUEST_CHUNK:
                    if request is None:
                        raise _ProtocolError("body data before a request head")
                    request._feed(data[offset + 6 : end])
                elif kind == REQUEST_HEAD:
                    if not self._greeted or arrived is not None:
                        raise _ProtocolError("unexpected request head")
                    if request is not None and not (request._state == _DONE and request._end is not None):
                        raise _ProtocolError("a request head while another exchange is open")
                    request = arrived = BridgeRequest(self, data[offset + 6 : end])
                    self._request = request
                elif kind == REQUEST_END:
                    if request is None:
                        raise _ProtocolError("request end before a request head")
                    request._finish_body(True)
                    if request._state == _DONE:
                        self._exchange_over(request)
                elif kind == ABORT:
                    if request is None:
                        raise _ProtocolError("abort before a request head")
                    reason = data[offset + 6] if length > 2 else _ABORT_CLIENT_GONE
                    if reason == _ABORT_DISCARDED:
                        message = "the rest of the request body was dropped: the response was complete before it was read"
                        request._finish_body((_ClientDisconnected, message))
                        if request._state == _DONE:
                            self._exchange_over(request)
                    elif reason == _ABORT_TOO_LARGE:
                        request._finish_body((_BodyTooLarge, "request body exceeds max_body_size"))
                        if request._state == _WAITING:
                            # The native side answered 413 itself.
                            request._set_gone()
                    else:
                        request._set_gone()
                        request._finish_body((_ClientDisconnected, "the client disconnected"))
                elif kind == WS_MESSAGE:
                    if request is None or request._ws is None or length < 3:
                        raise _ProtocolError("a WebSocket message outside a WebSocket")
                    request._ws._message(data[offset + 6 : end])
                elif kind == WS_CLOSE:
                    if request is None or request._ws is None or length < 4:
                        raise _ProtocolError("a WebSocket close outside a WebSocket")
                    code = _U16.unpack_from(data, offset + 6)[0]
                    request._ws.closed_with(code, data[offset + 8 : end].decode("utf-8", "replace"))
                elif kind == HELLO:
                    token = self._listener.token
                    if self._greeted or (token is not None and not secrets.compare_digest(data[offset + 6 : end], token)):
                        raise _ProtocolError("bad hello")
                    self._greeted = True
                else:
                    raise _ProtocolError(f"unexpected frame type {kind}")
                offset = end
        except (_ProtocolError, struct.error, IndexError, UnicodeDecodeError):
            self._close(abort=True)
            if request is not None:
                request._lost()
            return
        if offset < size:
            rest = memoryview(data)[offset:]
            pending += rest
            self._need = 4 + _U32.unpack_from(rest)[0] if len(rest) >= 4 else 6
        if arrived is not None:
            try:
                self._listener._on_request(arrived)
            except Exception as exc:  # noqa: BLE001 - reported; the client gets a 500
                self._listener._on_error(exc)
                if not arrived.head_sent:
                    arrived.abort()

    def eof_received(self) -> None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._listener._connections.discard(self)
        request = self._request
        if request is not None and not (request._state == _DONE and request._end is not None):
            request._lost()
        self._release_writers()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._release_writers()

    # -- helpers ----------------------------------------------------------

    def _release_writers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _send(self, data: bytes) -> None:
        if self._closed:
            return
        self._out.append(data)
        self._out_size += len(data)
        if self._out_size >= HIGH_WATER:
            self._flush()
        elif not self._flush_scheduled and not self._receiving:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._out_size = 0
        if not self._closed:
            self._transport.write(data)
            if self._close_after_flush:
                self._closed = True
                self._transport.close()

    def _pause_reading(self) -> None:
        if not self._reading_paused and not self._closed:
            self._reading_paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            if not self._closed:
                self._transport.resume_reading()

    def _response_done(self, request: BridgeRequest) -> None:
        """The response end is out. Unless the request end is in too, the
        native side now reads the rest of the body and drops it, then ends
        the request with a discard abort: keep reading until it comes."""
        if request._end is None:
            self._resume_reading()
        else:
            self._exchange_over(request)

    def _exchange_over(self, request: BridgeRequest) -> None:
        """Both ends of the exchange are through; the connection is idle
        until the next request head."""
        if self._request is request:
            self._request = None

    def _close(self, abort: bool = False) -> None:
        if not self._closed:
            if abort:
                self._out.clear()
                self._closed = True
                self._transport.abort()
            elif self._out:
                # Goes with the queued frames, at the end of this iteration.
                self._close_after_flush = True
            else:
                self._closed = True
                self._transport.close()


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
            conn._close(abort=True)
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
                conn._close(abort=True)
            if server is not None and sys.version_info >= (3, 12):
                await server.wait_closed()
            self._cleanup()
            self._closing.set_result(None)
        await asyncio.shield(self._closing)
