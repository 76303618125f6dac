//! The socket bridge (`native_callback=False`): requests and responses cross
//! a local socket as length-prefixed frames, streamed in chunks both ways.
//! Python listens; this side keeps one connection to it and multiplexes every
//! exchange over it as a stream (a new connection replaces one that died).
//!
//! A frame is `u32` big-endian length (of what follows), then
//! `[version = 2][type u8][stream u32]` and the payload. The stream id
//! (big-endian, chosen here, never reused on a connection) says which
//! exchange the frame belongs to; 0 is the connection itself. Strings and
//! byte strings are a `u32` big-endian length and the bytes (but for the
//! request head's NUL-separated strings).
//!
//! | type | name           | direction     | payload |
//! |------|----------------|---------------|---------|
//! | 0    | hello          | Rust → Python | token (bytes); the first frame of every connection, stream 0 |
//! | 1    | request head   | Rust → Python | opens a stream: client port u16, local port u16, flags u8 (1 TLS, 2 a WebSocket request, 4 no body: the request ends here, 8 over a Unix socket: local ip is the socket path), peer certificate DER (bytes; empty: none), then these strings with a NUL byte between each two (none holds one): method, scheme, authority (empty: none), path, query, HTTP version, client ip (empty: no client address, a Unix socket peer), local ip, then name and value of each header in order |
//! | 2    | request chunk  | Rust → Python | body bytes (at most 64 KiB) |
//! | 3    | request end    | Rust → Python | — |
//! | 4    | response head  | Python → Rust | status u16, flags u8 (1: the server's default headers; 2: a whole body follows, collected before the head goes out; 4: the rest of this frame is the whole body, and the response ends with it), reason (empty: the standard one), header count u32, (name, value)…, [body] |
//! | 5    | response chunk | Python → Rust | body bytes (at most 64 KiB) |
//! | 6    | response end   | Python → Rust | — |
//! | 7    | abort          | both          | Rust → Python: reason u8 (1 client gone: the stream is over; 2 body too large, 3 body discarded (the response was complete before it was read): the request side is over); Python → Rust: none (a 500, or the stream is cut off; the stream is over) |
//! | 8    | websocket accept | Python → Rust | instead of a response head, for a WebSocket request: subprotocol (empty: none), header count u32, (name, value)… |
//! | 9    | websocket message | both       | flags u8 (1 text, 2 binary; +4 more fragments follow), data (at most 64 KiB per frame) |
//! | 10   | websocket close | both         | code u16, reason (the rest). Python → Rust: start the closing handshake; Rust → Python: the socket is closed, or (1012) the server shuts down and closes it (the stream's last frame either way) |
//! | 11   | window         | both          | u32: this many more data bytes may be sent on the stream |
//!
//! Flow control is per stream and per direction, counted in data bytes (body
//! chunks, WebSocket message data): each side may send `WINDOW` bytes
//! before the other grants more with window frames, which it does as the
//! consumer (the client, the application) takes them. So a slow client or
//! handler holds back only its own stream; neither side ever stops reading
//! the connection, and what it buffers per stream stays bounded.
//!
//! The request head's flags say whether the request asks for a WebSocket
//! (HTTP/1.1 upgrade or HTTP/2 extended CONNECT). Once Python accepts it, the
//! stream carries that socket's messages both ways until it closes.
//!
//! A response that ends before its request body is read makes the rest of
//! that body be read and dropped here (as far as `max_body_size`), so the
//! client's connection stays usable; Python hears a discard abort. An
//! exchange dropped here before its response end (client gone, 504) sends
//! an abort; frames for a stream either side already finished are ignored.
//! A frame that does not parse, or the connection closing, fails every
//! stream on it: a 502 (or a cut-off stream once the head is out); a
//! response that makes no sense fails its own stream alone.
//! `response_timeout` is a 504.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::HOST;
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use hyper::ext::ReasonPhrase;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::body::{malformed, PumpLimits, Refusal, RefusalSignal, ResponseBody};
use crate::config::seconds;
use crate::connection::Connection;
use crate::exchange::ConnInfo;
use crate::server::ServerShared;
use crate::service::{self, error_response, refused, RequestBodySource};
use crate::websocket::{self, Handshake, Incoming, Message};
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::OnUpgrade;

pub const VERSION: u8 = 2;
/// Largest body chunk in one frame.
pub const CHUNK: usize = 64 * 1024;
/// Largest frame either side accepts (heads carry every header).
pub const MAX_FRAME: usize = 16 * 1024 * 1024;
/// Data bytes either side may send on a stream before the other grants more.
pub const WINDOW: usize = 256 * 1024;
/// Consumed bytes are granted back once this many gathered (fewer, larger
/// window frames; a small body never needs one).
const GRANT_AT: usize = WINDOW / 4;
/// What follows the length in every frame: version, type, stream id.
const HEADER: usize = 6;
/// Frames gathered into one vectored write, at most.
const WRITE_SLICES: usize = 256;
/// How much the reader asks the socket for at once.
const READ_SIZE: usize = 64 * 1024;
/// The send buffer asked for on a Unix bridge socket, as Python's end asks
/// for its own (`SEND_BUFFER` in bridge.py), so that both directions have
/// the same room; the kernel caps it at net.core.wmem_max.
const SEND_BUFFER: usize = 1024 * 1024;

pub mod kind {
    pub const HELLO: u8 = 0;
    pub const REQUEST_HEAD: u8 = 1;
    pub const REQUEST_CHUNK: u8 = 2;
    pub const REQUEST_END: u8 = 3;
    pub const RESPONSE_HEAD: u8 = 4;
    pub const RESPONSE_CHUNK: u8 = 5;
    pub const RESPONSE_END: u8 = 6;
    pub const ABORT: u8 = 7;
    pub const WS_ACCEPT: u8 = 8;
    pub const WS_MESSAGE: u8 = 9;
    pub const WS_CLOSE: u8 = 10;
    pub const WINDOW: u8 = 11;
}

/// Why Rust gives up on a request (the payload of its abort frame).
const ABORT_CLIENT_GONE: u8 = 1;
const ABORT_TOO_LARGE: u8 = 2;
const ABORT_DISCARDED: u8 = 3;

/// Response head flags.
const FLAG_DEFAULT_HEADERS: u8 = 1;
const FLAG_WHOLE_BODY: u8 = 2;
const FLAG_INLINE_BODY: u8 = 4;
/// Request head flags.
const HEAD_TLS: u8 = 1;
const HEAD_WEBSOCKET: u8 = 2;
const HEAD_END: u8 = 4;
const HEAD_UNIX: u8 = 8;
/// WebSocket message flags.
const WS_TEXT: u8 = 1;
const WS_BINARY: u8 = 2;
const WS_MORE: u8 = 4;
/// 1006: the connection ended without a close frame; 1011: server error.
const WS_ABNORMAL: u16 = 1006;
const WS_SERVER_ERROR: u16 = 1011;

// ------------------------------------------------------------------ address

/// Where Python listens: `unix:/path` (`unix:@name`: Linux abstract
/// namespace) or `tcp:127.0.0.1:port`.
#[derive(Clone, Debug)]
pub enum Address {
    #[cfg(unix)]
    Unix(std::path::PathBuf),
    Tcp(SocketAddr),
}

impl Address {
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            #[cfg(unix)]
            {
                if path.is_empty() {
                    return Err("bridge_address: empty Unix socket path".into());
                }
                // tokio connects a path starting with NUL in the abstract namespace.
                let path = match path.strip_prefix('@') {
                    Some(name) => format!("\0{name}"),
                    None => path.to_owned(),
                };
                return Ok(Address::Unix(path.into()));
            }
            #[cfg(not(unix))]
            {
                let _ = path;
                return Err("bridge_address: Unix sockets are not available here; use tcp:127.0.0.1:PORT".into());
            }
        }
        if let Some(addr) = text.strip_prefix("tcp:") {
            return addr.parse().map(Address::Tcp).map_err(|_| format!("bridge_address: not an IP:port: {addr:?}"));
        }
        Err(format!("bridge_address must start with unix: or tcp:, not {text:?}"))
    }
}

// ------------------------------------------------------------------ streams

enum ReadHalf {
    #[cfg(unix)]
    Unix(tokio::net::unix::OwnedReadHalf),
    Tcp(tokio::net::tcp::OwnedReadHalf),
}

enum WriteHalf {
    #[cfg(unix)]
    Unix(tokio::net::unix::OwnedWriteHalf),
    Tcp(tokio::net::tcp::OwnedWriteHalf),
}

impl AsyncRead for ReadHalf {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            #[cfg(unix)]
            ReadHalf::Unix(half) => Pin::new(half).poll_read(cx, buf),
            ReadHalf::Tcp(half) => Pin::new(half).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            #[cfg(unix)]
            WriteHalf::Unix(half) => Pin::new(half).poll_write(cx, buf),
            WriteHalf::Tcp(half) => Pin::new(half).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            #[cfg(unix)]
            WriteHalf::Unix(half) => Pin::new(half).poll_write_vectored(cx, bufs),
            WriteHalf::Tcp(half) => Pin::new(half).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            #[cfg(unix)]
            WriteHalf::Unix(half) => Pin::new(half).poll_flush(cx),
            WriteHalf::Tcp(half) => Pin::new(half).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            #[cfg(unix)]
            WriteHalf::Unix(half) => Pin::new(half).poll_shutdown(cx),
            WriteHalf::Tcp(half) => Pin::new(half).poll_shutdown(cx),
        }
    }
}

// ------------------------------------------------------------------ frames

/// What can go wrong on the bridge; all of it is the application end's fault
/// (or absence) and becomes a 502.
#[derive(Clone, Debug)]
pub enum BridgeError {
    Io(Arc<io::Error>),
    /// The other end closed the connection mid-exchange.
    Closed,
    /// A length, version or payload that does not parse.
    Malformed(&'static str),
    /// A frame that has no business at this point.
    UnexpectedFrame(u8),
    InvalidStatus(u16),
}

impl From<io::Error> for BridgeError {
    fn from(error: io::Error) -> Self {
        BridgeError::Io(Arc::new(error))
    }
}

impl std::fmt::Display for BridgeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BridgeError::Io(error) => write!(f, "bridge I/O error: {error}"),
            BridgeError::Closed => f.write_str("the application end of the bridge closed the connection"),
            BridgeError::Malformed(what) => write!(f, "malformed bridge frame: {what}"),
            BridgeError::UnexpectedFrame(kind) => write!(f, "unexpected bridge frame type {kind}"),
            BridgeError::InvalidStatus(status) => write!(f, "invalid response status {status} on the bridge"),
        }
    }
}

pub struct FrameIn {
    pub kind: u8,
    pub stream: u32,
    pub payload: Bytes,
}

/// Appends one frame header for a payload of `len` bytes.
fn put_header(out: &mut BytesMut, kind: u8, stream: u32, len: usize) {
    out.put_u32((len + HEADER) as u32);
    out.put_u8(VERSION);
    out.put_u8(kind);
    out.put_u32(stream);
}

fn frame(kind: u8, stream: u32, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(4 + HEADER + payload.len());
    put_header(&mut out, kind, stream, payload.len());
    out.extend_from_slice(payload);
    out.freeze()
}

/// Reads frames from one connection: large reads, every complete frame in
/// the buffer taken before the next read.
struct FrameReader {
    io: ReadHalf,
    buf: BytesMut,
}

impl FrameReader {
    fn new(io: ReadHalf) -> Self {
        FrameReader { io, buf: BytesMut::with_capacity(READ_SIZE) }
    }

    /// A complete frame from the buffer; Err(n) when n more bytes must come first.
    fn take(&mut self) -> Result<Result<FrameIn, usize>, BridgeError> {
        if self.buf.len() < 4 {
            return Ok(Err(4 + HEADER - self.buf.len()));
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if !(HEADER..=MAX_FRAME).contains(&len) {
            return Err(BridgeError::Malformed("frame length out of range"));
        }
        if self.buf.len() < 4 + len {
            return Ok(Err(4 + len - self.buf.len()));
        }
        let mut frame = self.buf.split_to(4 + len);
        frame.advance(4);
        if frame[0] != VERSION {
            return Err(BridgeError::Malformed("unknown frame version"));
        }
        let kind = frame[1];
        let stream = u32::from_be_bytes([frame[2], frame[3], frame[4], frame[5]]);
        frame.advance(HEADER);
        Ok(Ok(FrameIn { kind, stream, payload: frame.freeze() }))
    }

    /// The next frame; None at a clean end of stream (between frames).
    async fn next(&mut self) -> Result<Option<FrameIn>, BridgeError> {
        loop {
            let missing = match self.take()? {
                Ok(frame) => return Ok(Some(frame)),
                Err(missing) => missing,
            };
            self.buf.reserve(missing.max(READ_SIZE));
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() { Ok(None) } else { Err(BridgeError::Closed) };
            }
        }
    }
}

/// What the writer task sends: a frame, or a header and its payload
/// (a body chunk goes out as the client gave it, uncopied).
struct Out(Bytes, Bytes);

/// Writes everything in `queue` with vectored writes.
async fn write_all(io: &mut WriteHalf, queue: &mut VecDeque<Bytes>) -> io::Result<()> {
    while !queue.is_empty() {
        let slices: Vec<io::IoSlice<'_>> = queue.iter().take(WRITE_SLICES).map(|b| io::IoSlice::new(b)).collect();
        let mut written = io.write_vectored(&slices).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let front = queue.front_mut().expect("written bytes came from the queue");
            if written >= front.len() {
                written -= front.len();
                queue.pop_front();
            } else {
                front.advance(written);
                written = 0;
            }
        }
    }
    Ok(())
}

/// A cursor over a frame payload.
struct Fields {
    payload: Bytes,
}

impl Fields {
    fn u8(&mut self) -> Result<u8, BridgeError> {
        if self.payload.remaining() < 1 {
            return Err(BridgeError::Malformed("truncated payload"));
        }
        Ok(self.payload.get_u8())
    }

    fn u16(&mut self) -> Result<u16, BridgeError> {
        if self.payload.remaining() < 2 {
            return Err(BridgeError::Malformed("truncated payload"));
        }
        Ok(self.payload.get_u16())
    }

    fn u32(&mut self) -> Result<u32, BridgeError> {
        if self.payload.remaining() < 4 {
            return Err(BridgeError::Malformed("truncated payload"));
        }
        Ok(self.payload.get_u32())
    }

    fn bytes(&mut self) -> Result<Bytes, BridgeError> {
        let len = self.u32()? as usize;
        if self.payload.remaining() < len {
            return Err(BridgeError::Malformed("string runs past the payload"));
        }
        Ok(self.payload.split_to(len))
    }
}

// ------------------------------------------------------------------ heads

fn version_text(version: Version) -> &'static [u8] {
    match version {
        Version::HTTP_2 => b"2",
        Version::HTTP_3 => b"3",
        Version::HTTP_10 => b"1.0",
        Version::HTTP_09 => b"0.9",
        _ => b"1.1",
    }
}

/// The request head: the fixed fields and the certificate, then every
/// string with a NUL byte between them — so the Python end takes them apart
/// with one `split`. False (nothing written) when a string holds a NUL,
/// which neither a URI nor a header value may.
fn encode_request_head(out: &mut BytesMut, stream: u32, head: &Parts, info: &ConnInfo, websocket: bool, end: bool) -> bool {
    let (peer_ip, peer_port) = info.addresses.remote().unwrap_or_default();
    let (local_ip, local_port) = info.addresses.local();
    let authority = match head.uri.authority() {
        Some(authority) => authority.as_str().as_bytes(),
        None => head.headers.get(HOST).map_or(&b""[..], |v| v.as_bytes()),
    };
    let fixed: [&[u8]; 8] = [
        head.method.as_str().as_bytes(),
        if info.tls { b"https" } else { b"http" },
        authority,
        head.uri.path().as_bytes(),
        head.uri.query().unwrap_or("").as_bytes(),
        version_text(head.version),
        peer_ip.as_bytes(),
        local_ip.as_bytes(),
    ];
    let certificate = info.peer_certificate.as_ref().map_or(&b""[..], |c| c.as_ref());
    let strings = || {
        fixed.iter().copied().chain(head.headers.iter().flat_map(|(name, value)| [name.as_str().as_bytes(), value.as_bytes()]))
    };
    let mut bytes = 0;
    for string in strings() {
        if string.contains(&0) {
            return false;
        }
        bytes += string.len() + 1;
    }
    put_header(out, kind::REQUEST_HEAD, stream, 9 + certificate.len() + bytes - 1);
    out.put_u16(peer_port);
    out.put_u16(local_port.unwrap_or(0));
    let unix = if local_port.is_none() { HEAD_UNIX } else { 0 };
    out.put_u8(if info.tls { HEAD_TLS } else { 0 } | if websocket { HEAD_WEBSOCKET } else { 0 } | if end { HEAD_END } else { 0 } | unix);
    out.put_u32(certificate.len() as u32);
    out.extend_from_slice(certificate);
    for (index, string) in strings().enumerate() {
        if index > 0 {
            out.put_u8(0);
        }
        out.extend_from_slice(string);
    }
    true
}

struct ResponseHead {
    status: StatusCode,
    headers: HeaderMap,
    reason: Option<ReasonPhrase>,
    body: BodyShape,
}

/// How the response body follows its head.
enum BodyShape {
    /// Chunk frames, passed on as they come.
    Streamed,
    /// Chunk frames, collected before the head goes out.
    Whole,
    /// In the head frame itself; the response is complete.
    Inline(Bytes),
}

fn decode_response_head(payload: Bytes, defaults: &HeaderMap) -> Result<ResponseHead, BridgeError> {
    let mut fields = Fields { payload };
    let code = fields.u16()?;
    let status = StatusCode::from_u16(code)
        .ok()
        .filter(|s| (200..=599).contains(&s.as_u16()))
        .ok_or(BridgeError::InvalidStatus(code))?;
    let flags = fields.u8()?;
    let reason = fields.bytes()?;
    let reason = if reason.is_empty() {
        None
    } else {
        Some(ReasonPhrase::try_from(reason).map_err(|_| BridgeError::Malformed("invalid reason phrase"))?)
    };
    let count = fields.u32()?;
    let mut headers = if flags & FLAG_DEFAULT_HEADERS != 0 { defaults.clone() } else { HeaderMap::new() };
    for _ in 0..count {
        let name = fields.bytes()?;
        let value = fields.bytes()?;
        let name = HeaderName::from_bytes(&name).map_err(|_| BridgeError::Malformed("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(value).map_err(|_| BridgeError::Malformed("invalid header value"))?;
        headers.append(name, value);
    }
    let body = if flags & FLAG_INLINE_BODY != 0 {
        BodyShape::Inline(fields.payload)
    } else if fields.payload.has_remaining() {
        return Err(BridgeError::Malformed("bytes after the response head"));
    } else if flags & FLAG_WHOLE_BODY != 0 {
        BodyShape::Whole
    } else {
        BodyShape::Streamed
    };
    Ok(ResponseHead { status, headers, reason, body })
}

/// A response head frame as Python's end sends it — built here, where the
/// headers are already checked (`_native.bridge_response_head`,
/// `NativeDirectResponse._bridge_payload`). With `body_size`, the whole
/// response: inline when it fits one frame (see `inlines`), its bytes
/// counted in the frame's length but left to the caller to append, so that
/// a large body is not copied into the frame; else announced as a whole body
/// whose chunk frames follow. Without, the head of a streamed body.
/// `headers` None: the server's default headers. `stream` None: the payload
/// alone, without the frame header.
pub fn put_response_head(
    out: &mut BytesMut,
    stream: Option<u32>,
    status: StatusCode,
    headers: Option<&HeaderMap>,
    reason: &[u8],
    body_size: Option<usize>,
) {
    let inline = body_size.filter(|&size| inlines(size));
    let mut flags = match (body_size, inline) {
        (Some(_), Some(_)) => FLAG_INLINE_BODY,
        (Some(_), None) => FLAG_WHOLE_BODY,
        (None, _) => 0,
    };
    if headers.is_none() {
        flags |= FLAG_DEFAULT_HEADERS;
    }
    let header_bytes: usize = headers.map_or(0, |h| h.iter().map(|(n, v)| 8 + n.as_str().len() + v.len()).sum());
    let size = 2 + 1 + 4 + reason.len() + 4 + header_bytes + inline.unwrap_or(0);
    out.reserve(4 + HEADER + size - inline.unwrap_or(0));
    if let Some(stream) = stream {
        put_header(out, kind::RESPONSE_HEAD, stream, size);
    }
    out.put_u16(status.as_u16());
    out.put_u8(flags);
    out.put_u32(reason.len() as u32);
    out.extend_from_slice(reason);
    out.put_u32(headers.map_or(0, HeaderMap::len) as u32);
    for (name, value) in headers.into_iter().flatten() {
        out.put_u32(name.as_str().len() as u32);
        out.extend_from_slice(name.as_str().as_bytes());
        out.put_u32(value.len() as u32);
        out.extend_from_slice(value.as_bytes());
    }
}

/// Whether a whole body of `size` bytes goes inline in its head frame.
pub fn inlines(size: usize) -> bool {
    size <= CHUNK
}

fn build_response(head: ResponseHead, body: ResponseBody) -> Response<ResponseBody> {
    let mut response = Response::new(body);
    *response.status_mut() = head.status;
    *response.headers_mut() = head.headers;
    if let Some(reason) = head.reason {
        response.extensions_mut().insert(reason);
    }
    response
}

// ------------------------------------------------------------------ the connection

/// What the reader task hands one stream: its frames, and the send credit
/// the other side's window frames grant. One allocation per stream: a
/// channel and a credit cell of their own cost more than the exchange's
/// own frames.
struct Inbox {
    frames: Mutex<Frames>,
    granted: AtomicUsize,
    more: Notify,
}

#[derive(Default)]
struct Frames {
    queue: VecDeque<FrameIn>,
    waker: Option<Waker>,
    /// The connection failed: nothing more will come.
    closed: bool,
}

impl Inbox {
    fn push(&self, frame: FrameIn) {
        self.update(|frames| frames.queue.push_back(frame));
    }

    fn close(&self) {
        self.update(|frames| frames.closed = true);
    }

    /// Changes the frames under the lock, then wakes the stream's reader.
    fn update(&self, change: impl FnOnce(&mut Frames)) {
        let waker = {
            let mut frames = self.frames.lock();
            change(&mut frames);
            frames.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// The next frame; None once the connection failed and every frame
    /// that came before is taken.
    fn poll_frame(&self, cx: &mut Context<'_>) -> Poll<Option<FrameIn>> {
        let mut frames = self.frames.lock();
        if let Some(frame) = frames.queue.pop_front() {
            return Poll::Ready(Some(frame));
        }
        if frames.closed {
            return Poll::Ready(None);
        }
        if !frames.waker.as_ref().is_some_and(|waker| waker.will_wake(cx.waker())) {
            frames.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

struct Streams {
    map: HashMap<u32, Arc<Inbox>>,
    next: u32,
    /// The connection failed or was shut down: no new streams.
    closed: bool,
}

/// One connection to Python and the streams on it. A reader task hands each
/// frame to its stream; a writer task writes what every stream sends, as
/// many frames at once as are waiting.
struct Link {
    out: mpsc::UnboundedSender<Out>,
    streams: Mutex<Streams>,
    /// Fired when the connection fails or shuts down: both tasks stop and
    /// the socket closes.
    dead: CancellationToken,
    failure: Mutex<Option<BridgeError>>,
}

impl Link {
    fn start(reader: ReadHalf, writer: WriteHalf, hello: Bytes) -> Arc<Link> {
        let (out, queue) = mpsc::unbounded_channel();
        let _ = out.send(Out(hello, Bytes::new()));
        let link = Arc::new(Link {
            out,
            streams: Mutex::new(Streams { map: HashMap::new(), next: 1, closed: false }),
            dead: CancellationToken::new(),
            failure: Mutex::new(None),
        });
        tokio::spawn(read_loop(FrameReader::new(reader), link.clone()));
        tokio::spawn(write_loop(writer, queue, link.clone()));
        link
    }

    fn send(&self, frame: Bytes) {
        let _ = self.out.send(Out(frame, Bytes::new()));
    }

    /// The connection is unusable: every stream on it ends (its exchange
    /// sees `error`), and it closes.
    fn fail(&self, error: BridgeError) {
        self.failure.lock().get_or_insert(error);
        let orphans = {
            let mut streams = self.streams.lock();
            streams.closed = true;
            std::mem::take(&mut streams.map)
        };
        orphans.values().for_each(|inbox| inbox.close());
        self.dead.cancel();
    }

    fn error(&self) -> BridgeError {
        self.failure.lock().clone().unwrap_or(BridgeError::Closed)
    }

    /// A new stream; None once the connection failed.
    fn open(self: &Arc<Self>) -> Option<Stream> {
        let inbox = Arc::new(Inbox { frames: Mutex::default(), granted: AtomicUsize::new(WINDOW), more: Notify::new() });
        let id = {
            let mut streams = self.streams.lock();
            if streams.closed {
                return None;
            }
            let id = streams.next;
            streams.next = streams.next.checked_add(1).unwrap_or(1);
            streams.map.insert(id, inbox.clone());
            id
        };
        Some(Stream { link: self.clone(), id, inbox, unacknowledged: 0, end: End::Open, pump: None })
    }

    /// Hands a frame to its stream. One for a stream that is over here is
    /// dropped: it crossed our abort or the stream's end.
    fn deliver(&self, frame: FrameIn) -> Result<(), BridgeError> {
        let streams = self.streams.lock();
        let Some(inbox) = streams.map.get(&frame.stream) else { return Ok(()) };
        if frame.kind == kind::WINDOW {
            let bytes: [u8; 4] = frame.payload[..].try_into().map_err(|_| BridgeError::Malformed("window frame size"))?;
            inbox.granted.fetch_add(u32::from_be_bytes(bytes) as usize, Ordering::AcqRel);
            inbox.more.notify_one();
        } else {
            inbox.push(frame);
        }
        Ok(())
    }
}

async fn read_loop(mut reader: FrameReader, link: Arc<Link>) {
    let error = loop {
        let next = tokio::select! {
            biased;
            _ = link.dead.cancelled() => return,
            next = reader.next() => next,
        };
        match next {
            Ok(Some(frame)) => {
                if let Err(error) = link.deliver(frame) {
                    break error;
                }
            }
            Ok(None) => break BridgeError::Closed,
            Err(error) => break error,
        }
    };
    link.fail(error);
}

async fn write_loop(mut io: WriteHalf, mut queue: mpsc::UnboundedReceiver<Out>, link: Arc<Link>) {
    let mut pending = VecDeque::new();
    loop {
        let next = tokio::select! {
            biased;
            _ = link.dead.cancelled() => return,
            next = queue.recv() => next,
        };
        let Some(mut out) = next else { return };
        // One scheduler turn for the other exchanges that are ready now to
        // queue their frames: they then leave in this write, and Python is
        // woken once for all of them rather than once per frame.
        tokio::task::yield_now().await;
        loop {
            pending.push_back(out.0);
            if !out.1.is_empty() {
                pending.push_back(out.1);
            }
            if pending.len() >= WRITE_SLICES {
                break;
            }
            match queue.try_recv() {
                Ok(more) => out = more,
                Err(_) => break,
            }
        }
        let written = tokio::select! {
            biased;
            _ = link.dead.cancelled() => return,
            written = write_all(&mut io, &mut pending) => written,
        };
        if let Err(error) = written {
            link.fail(error.into());
            return;
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum End {
    /// The response is still to come (or to finish).
    Open,
    /// The response end was read.
    Complete,
    /// Python aborted the stream.
    Aborted,
}

/// An exchange's end of its stream. Dropped before the response is complete
/// (client gone, timeout, a bad frame), it tells Python with an abort.
struct Stream {
    link: Arc<Link>,
    id: u32,
    inbox: Arc<Inbox>,
    /// Response data taken but not yet granted back.
    unacknowledged: usize,
    end: End,
    pump: Option<Pump>,
}

impl Stream {
    async fn next(&mut self) -> Result<FrameIn, BridgeError> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<FrameIn, BridgeError>> {
        self.inbox.poll_frame(cx).map(|frame| frame.ok_or_else(|| self.link.error()))
    }

    /// `size` data bytes were passed on: Python may send as many more.
    fn consumed(&mut self, size: usize) {
        self.unacknowledged += size;
        if self.unacknowledged >= GRANT_AT {
            self.link.send(frame(kind::WINDOW, self.id, &(self.unacknowledged as u32).to_be_bytes()));
            self.unacknowledged = 0;
        }
    }

    fn sender(&self) -> Sender {
        Sender { link: self.link.clone(), id: self.id, inbox: self.inbox.clone(), available: 0 }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.link.streams.lock().map.remove(&self.id);
        if self.end == End::Open {
            self.link.send(frame(kind::ABORT, self.id, &[ABORT_CLIENT_GONE]));
        }
        if let Some(pump) = &self.pump {
            if self.end == End::Complete {
                // Whatever of the body is still to come, nobody will read:
                // the pump drops it and ends the request with a discard.
                pump.signals.discard.cancel();
            } else {
                pump.signals.stop.cancel();
            }
        }
    }
}

/// Sends data frames on a stream within the credit Python granted.
struct Sender {
    link: Arc<Link>,
    id: u32,
    inbox: Arc<Inbox>,
    available: usize,
}

impl Sender {
    /// How many of `want` (> 0) bytes may go now, once any may; None when
    /// the connection fails first.
    async fn reserve(&mut self, want: usize) -> Option<usize> {
        loop {
            self.available += self.inbox.granted.swap(0, Ordering::AcqRel);
            if self.available > 0 {
                let size = want.min(self.available);
                self.available -= size;
                return Some(size);
            }
            tokio::select! {
                biased;
                _ = self.link.dead.cancelled() => return None,
                _ = self.inbox.more.notified() => {}
            }
        }
    }

    fn send(&self, kind: u8, payload: &[u8]) {
        self.link.send(frame(kind, self.id, payload));
    }

    /// A data frame: header (and `flag`, for a WebSocket message) and the
    /// data as it is.
    fn send_data(&self, kind: u8, flag: Option<u8>, data: Bytes) {
        let mut head = BytesMut::with_capacity(4 + HEADER + 1);
        put_header(&mut head, kind, self.id, data.len() + usize::from(flag.is_some()));
        if let Some(flag) = flag {
            head.put_u8(flag);
        }
        let _ = self.link.out.send(Out(head.freeze(), data));
    }
}

// ------------------------------------------------------------------ exchanges

pub struct Bridge {
    address: Result<Address, String>,
    /// The hello frame: the first thing on every connection.
    hello: Bytes,
    link: Mutex<Option<Arc<Link>>>,
    /// One connection attempt at a time; the others wait for its outcome.
    connecting: tokio::sync::Mutex<()>,
    closed: CancellationToken,
}

/// How a bridged request failed before its response head.
enum Failure {
    Bridge(BridgeError),
    /// The request body broke off (the client went away mid-upload).
    BadBody,
    Closed,
}

impl From<BridgeError> for Failure {
    fn from(error: BridgeError) -> Self {
        Failure::Bridge(error)
    }
}

impl From<io::Error> for Failure {
    fn from(error: io::Error) -> Self {
        Failure::Bridge(error.into())
    }
}

impl Bridge {
    pub fn new(address: &str, token: Option<&[u8]>) -> Self {
        Bridge {
            address: Address::parse(address),
            hello: frame(kind::HELLO, 0, token.unwrap_or_default()),
            link: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            closed: CancellationToken::new(),
        }
    }

    /// The server stopped (and drained): the connection closes (Python sees
    /// EOF) and no new one is made.
    pub fn close(&self) {
        self.closed.cancel();
        if let Some(link) = self.link.lock().take() {
            link.fail(BridgeError::Closed);
        }
    }

    fn current(&self) -> Option<Arc<Link>> {
        self.link.lock().as_ref().filter(|link| !link.dead.is_cancelled()).cloned()
    }

    /// The live connection, or a new one in place of one that died.
    async fn link(&self) -> Result<Arc<Link>, Failure> {
        if let Some(link) = self.current() {
            return Ok(link);
        }
        let _turn = self.connecting.lock().await;
        if let Some(link) = self.current() {
            return Ok(link);
        }
        if self.closed.is_cancelled() {
            return Err(Failure::Closed);
        }
        let link = self.connect().await?;
        if self.closed.is_cancelled() {
            link.fail(BridgeError::Closed);
            return Err(Failure::Closed);
        }
        *self.link.lock() = Some(link.clone());
        Ok(link)
    }

    /// A new stream, on a fresh connection should the current one have
    /// just died.
    async fn open_stream(&self) -> Result<Stream, Failure> {
        let link = self.link().await?;
        if let Some(stream) = link.open() {
            return Ok(stream);
        }
        self.link().await?.open().ok_or_else(|| link.error().into())
    }

    async fn connect(&self) -> Result<Arc<Link>, BridgeError> {
        let address = self.address.as_ref().map_err(|m| BridgeError::from(io::Error::other(m.clone())))?;
        let (reader, writer) = match address {
            #[cfg(unix)]
            Address::Unix(path) => {
                let stream = connect_retrying(|| tokio::net::UnixStream::connect(path.clone())).await?;
                let _ = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER);
                let (r, w) = stream.into_split();
                (ReadHalf::Unix(r), WriteHalf::Unix(w))
            }
            Address::Tcp(addr) => {
                let stream = connect_retrying(|| tokio::net::TcpStream::connect(*addr)).await?;
                let _ = stream.set_nodelay(true);
                let (r, w) = stream.into_split();
                (ReadHalf::Tcp(r), WriteHalf::Tcp(w))
            }
        };
        Ok(Link::start(reader, writer, self.hello.clone()))
    }

    /// One request over the bridge: head and body out, response back.
    pub async fn dispatch<B: RequestBodySource>(
        self: &Arc<Self>,
        request: Request<B>,
        conn: &Arc<Connection>,
    ) -> Response<ResponseBody> {
        let server = &conn.server;
        let exchange = self.exchange(request, &conn.info, server);
        let outcome = match seconds(server.config.response_timeout) {
            Some(limit) => match tokio::time::timeout(limit, exchange).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    return error_response(StatusCode::GATEWAY_TIMEOUT, "the application did not answer in time");
                }
            },
            None => exchange.await,
        };
        match outcome {
            Ok(response) => response,
            Err(Failure::BadBody) => error_response(StatusCode::BAD_REQUEST, "the request body broke off"),
            Err(Failure::Closed) => error_response(StatusCode::SERVICE_UNAVAILABLE, "server is closing"),
            Err(Failure::Bridge(error)) => bad_gateway(server, &error),
        }
    }

    async fn exchange<B: RequestBodySource>(
        self: &Arc<Self>,
        request: Request<B>,
        info: &ConnInfo,
        server: &Arc<ServerShared>,
    ) -> Result<Response<ResponseBody>, Failure> {
        let mut request = request;
        let upgrade = websocket::requested(&request).then(|| hyper::upgrade::on(&mut request));
        let (head, mut body) = request.into_parts();
        let limits = PumpLimits {
            max_size: server.config.max_body_size,
            high_water: CHUNK as u64,
            stall: seconds(server.config.body_read_timeout),
        };
        let limit = limits.max_size;
        // What has already arrived goes with the head: a body that is whole
        // now, and small, needs no pump task.
        let mut no_body = body.is_end_stream();
        let mut first = None;
        if !no_body {
            match futures_util::FutureExt::now_or_never(body.frame()) {
                Some(None) => no_body = true,
                Some(Some(Ok(frame))) => first = frame.into_data().ok().filter(|data| !data.is_empty()),
                Some(Some(Err(error))) if malformed(&error) => return Ok(refused(server, Refusal::Malformed, &head)),
                Some(Some(Err(_))) => return Err(Failure::BadBody),
                None => {}
            }
        }
        let whole_body = first.take_if(|data| body.is_end_stream() && data.len() <= CHUNK && data.len() as u64 <= limit);
        let mut stream = self.open_stream().await?;
        let link = stream.link.clone();
        let mut out = BytesMut::with_capacity(512);
        if !encode_request_head(&mut out, stream.id, &head, info, upgrade.is_some(), no_body) {
            stream.end = End::Complete; // Python never heard of it
            return Ok(error_response(StatusCode::BAD_REQUEST, "a NUL byte in the request head"));
        }
        match whole_body {
            Some(data) => {
                put_header(&mut out, kind::REQUEST_CHUNK, stream.id, data.len());
                let _ = link.out.send(Out(out.freeze(), data));
                link.send(frame(kind::REQUEST_END, stream.id, &[]));
            }
            None => {
                link.send(out.freeze());
                if !no_body {
                    let signals = PumpSignals {
                        refused: RefusalSignal::default(),
                        broke_off: CancellationToken::new(),
                        stop: CancellationToken::new(),
                        discard: CancellationToken::new(),
                    };
                    let body = Prefixed { first, body };
                    let task = tokio::spawn(pump(body, stream.sender(), limits, signals.clone()));
                    stream.pump = Some(Pump { task, signals });
                }
            }
        }
        let signals = stream.pump.as_ref().map(|pump| pump.signals.clone());
        let refusal = signals.as_ref().map(|signals| &signals.refused);
        let broke_off = signals.as_ref().map(|signals| &signals.broke_off);
        let frame = tokio::select! {
            biased;
            why = service::fired(refusal) => return Ok(refused(server, why, &head)),
            _ = fired(broke_off) => return Err(Failure::BadBody),
            frame = stream.next() => frame?,
        };
        match frame.kind {
            kind::RESPONSE_HEAD => {}
            kind::WS_ACCEPT if upgrade.is_some() => {
                let upgrade = upgrade.expect("checked above");
                return accept_websocket(stream, upgrade, &head, frame.payload, server).await;
            }
            kind::ABORT => {
                stream.end = End::Aborted;
                return Ok(error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal server error"));
            }
            other => return Err(BridgeError::UnexpectedFrame(other).into()),
        }
        let request = head;
        let mut head = decode_response_head(frame.payload, &server.default_headers.read())?;
        match std::mem::replace(&mut head.body, BodyShape::Streamed) {
            BodyShape::Inline(body) => {
                stream.end = End::Complete;
                Ok(build_response(head, ResponseBody::full(body)))
            }
            BodyShape::Streamed => {
                let body = BridgeBody { stream: Some(stream), failing: None };
                Ok(build_response(head, ResponseBody::Boxed(BoxBody::new(body))))
            }
            BodyShape::Whole => {
                // Gathered here, so hyper knows its length.
                let mut collected = BytesMut::new();
                loop {
                    let frame = tokio::select! {
                        biased;
                        why = service::fired(refusal) => return Ok(refused(server, why, &request)),
                        frame = stream.next() => frame?,
                    };
                    match frame.kind {
                        kind::RESPONSE_CHUNK => {
                            collected.extend_from_slice(&frame.payload);
                            stream.consumed(frame.payload.len());
                        }
                        kind::RESPONSE_END => {
                            stream.end = End::Complete;
                            return Ok(build_response(head, ResponseBody::full(collected.freeze())));
                        }
                        kind::ABORT => {
                            stream.end = End::Aborted;
                            return Ok(error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal server error"));
                        }
                        other => return Err(BridgeError::UnexpectedFrame(other).into()),
                    }
                }
            }
        }
    }
}

/// Resolves when `signal` fires; never without one.
async fn fired(signal: Option<&CancellationToken>) {
    match signal {
        Some(signal) => signal.cancelled().await,
        None => std::future::pending().await,
    }
}

/// A request body with the frame already taken from it put back in front.
struct Prefixed<B> {
    first: Option<Bytes>,
    body: B,
}

impl<B: RequestBodySource> Body for Prefixed<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.first.take() {
            Some(first) => Poll::Ready(Some(Ok(Frame::data(first)))),
            None => Pin::new(&mut self.body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.body.is_end_stream()
    }
}

/// The request body's pump, steered by its exchange.
struct Pump {
    task: JoinHandle<()>,
    signals: PumpSignals,
}

#[derive(Clone)]
struct PumpSignals {
    /// Fired by the pump: the body was refused (too large, malformed, stalled).
    refused: RefusalSignal,
    /// Fired by the pump: the body failed (the client is gone).
    broke_off: CancellationToken,
    /// The exchange failed: stop at once.
    stop: CancellationToken,
    /// The response is complete: read the rest of the body and drop it.
    discard: CancellationToken,
}

/// Moves the request body to Python as chunk frames, within the stream's
/// credit, enforcing `limits`; ends with the request end, or an abort.
async fn pump<B: RequestBodySource>(mut body: B, mut sender: Sender, limits: PumpLimits, signals: PumpSignals) {
    let PumpSignals { refused, broke_off, stop, discard } = signals;
    let mut total: u64 = 0;
    let mut discarded = false;
    loop {
        let stalled = async {
            match limits.stall {
                Some(stall) => tokio::time::sleep(stall).await,
                None => std::future::pending().await,
            }
        };
        let next = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = sender.link.dead.cancelled() => return,
            frame = body.frame() => frame,
            _ = stalled => {
                refused.fire(Refusal::Stalled);
                return sender.send(kind::ABORT, &[ABORT_CLIENT_GONE]);
            }
        };
        // (the body's error type need not be Send: judge it before awaiting)
        match next.map(|frame| frame.map_err(|error| malformed(&error))) {
            None if discarded => return sender.send(kind::ABORT, &[ABORT_DISCARDED]),
            None => return sender.send(kind::REQUEST_END, &[]),
            Some(Err(true)) => {
                refused.fire(Refusal::Malformed);
                return sender.send(kind::ABORT, &[ABORT_CLIENT_GONE]);
            }
            Some(Err(false)) => {
                sender.send(kind::ABORT, &[ABORT_CLIENT_GONE]);
                broke_off.cancel();
                return;
            }
            Some(Ok(frame)) => {
                let Ok(mut data) = frame.into_data() else { continue };
                total += data.len() as u64;
                if total > limits.max_size {
                    refused.fire(Refusal::TooLarge);
                    // Python learns why (BodyTooLarge) even though the
                    // exchange is over for the client.
                    return sender.send(kind::ABORT, &[ABORT_TOO_LARGE]);
                }
                while !data.is_empty() && !discard.is_cancelled() {
                    let size = tokio::select! {
                        biased;
                        _ = stop.cancelled() => return,
                        _ = discard.cancelled() => break,
                        size = sender.reserve(data.len().min(CHUNK)) => size,
                    };
                    let Some(size) = size else { return };
                    sender.send_data(kind::REQUEST_CHUNK, None, data.split_to(size));
                }
                discarded |= !data.is_empty();
            }
        }
    }
}

// ------------------------------------------------------------------ response body

/// A streamed response body read from the bridge: each chunk is granted back
/// to Python only when hyper takes it, so a slow client slows Python.
struct BridgeBody {
    stream: Option<Stream>,
    /// The stream broke; hyper gets one turn to flush what it has before the
    /// error cuts the connection.
    failing: Option<&'static str>,
}

impl Body for BridgeBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        if let Some(message) = this.failing {
            return Poll::Ready(Some(Err(io::Error::other(message))));
        }
        let Some(stream) = this.stream.as_mut() else { return Poll::Ready(None) };
        loop {
            let failure = match ready!(stream.poll_next(cx)) {
                Ok(FrameIn { kind: kind::RESPONSE_CHUNK, payload, .. }) => {
                    if payload.is_empty() {
                        continue;
                    }
                    stream.consumed(payload.len());
                    return Poll::Ready(Some(Ok(Frame::data(payload))));
                }
                Ok(FrameIn { kind: kind::RESPONSE_END, .. }) => {
                    stream.end = End::Complete;
                    this.stream = None;
                    return Poll::Ready(None);
                }
                Ok(FrameIn { kind: kind::ABORT, .. }) => {
                    stream.end = End::Aborted;
                    "response aborted by the application"
                }
                Ok(_) => "unexpected frame on the bridge",
                Err(_) => "the bridge failed mid-response",
            };
            // Drop the stream now; error on the next poll, after hyper has
            // flushed what the client should still get.
            this.stream = None;
            this.failing = Some(failure);
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_none() && self.failing.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

// ------------------------------------------------------------------ WebSocket

/// Python accepted a WebSocket: the accepting response goes to the client,
/// and the stream carries that socket's messages.
async fn accept_websocket(
    mut stream: Stream,
    upgrade: OnUpgrade,
    request: &Parts,
    payload: Bytes,
    server: &Arc<ServerShared>,
) -> Result<Response<ResponseBody>, Failure> {
    let mut fields = Fields { payload };
    let subprotocol = fields.bytes()?;
    let count = fields.u32()?;
    let mut headers = HeaderMap::new();
    for _ in 0..count {
        let name = HeaderName::from_bytes(&fields.bytes()?).map_err(|_| BridgeError::Malformed("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(fields.bytes()?).map_err(|_| BridgeError::Malformed("invalid header value"))?;
        headers.append(name, value);
    }
    if !subprotocol.is_empty() {
        let value = HeaderValue::from_maybe_shared(subprotocol).map_err(|_| BridgeError::Malformed("invalid subprotocol"))?;
        headers.insert(http::header::SEC_WEBSOCKET_PROTOCOL, value);
    }
    let (status, handshake) = websocket::accept_head(request.version, &request.headers, &mut headers, &server.config);
    // The request side is through before the socket starts (an upgrade
    // request has no body; should one come, it is sent first).
    if let Some(pump) = stream.pump.take() {
        if pump.task.await.is_err() || pump.signals.broke_off.is_cancelled() {
            return Err(BridgeError::Closed.into());
        }
    }
    // The tunnel holds no permit of the server's: a long-lived socket does
    // not count against the requests in flight. It is one of the server's
    // tasks all the same: the drain waits for it.
    websocket::spawn_tracked(server, tunnel(upgrade, stream, handshake, server.shutdown.clone()));
    let mut response = Response::new(ResponseBody::empty());
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Ok(response)
}

/// Sends a message as frames of at most `CHUNK` bytes, within the credit;
/// false when the connection failed.
async fn send_ws_message(sender: &mut Sender, kind: u8, mut data: Bytes) -> bool {
    if data.is_empty() {
        sender.send_data(kind::WS_MESSAGE, Some(kind), data);
        return true;
    }
    while !data.is_empty() {
        let Some(size) = sender.reserve(data.len().min(CHUNK)).await else { return false };
        let piece = data.split_to(size);
        let flags = if data.is_empty() { kind } else { kind | WS_MORE };
        sender.send_data(kind::WS_MESSAGE, Some(flags), piece);
    }
    true
}

fn ws_close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason.as_bytes());
    payload
}

/// Fires a while after our close frame went out: the client's time to answer.
async fn close_grace(we_closed: &CancellationToken) {
    we_closed.cancelled().await;
    tokio::time::sleep(websocket::CLOSE_ANSWER_TIMEOUT).await;
}

/// Carries one accepted WebSocket's messages between the client and Python
/// until either side closes, or the server shuts down: then the client gets
/// a close frame with 1012, and Python the same code at once, after the
/// messages that came before. The two directions run independently, so a
/// full buffer one way never stops the other.
async fn tunnel(upgrade: OnUpgrade, mut stream: Stream, handshake: Handshake, shutdown: CancellationToken) {
    let max_message_size = handshake.max_message_size();
    let Some(socket) = handshake.open(upgrade).await else {
        stream.link.send(frame(kind::WS_CLOSE, stream.id, &ws_close_payload(WS_ABNORMAL, "")));
        stream.end = End::Complete;
        return;
    };
    let (mut sink, mut source) = socket.split();
    let mut sender = stream.sender();
    let client_done = CancellationToken::new();
    let we_closed = CancellationToken::new();
    let python_gone = AtomicBool::new(false);
    let from_client = async {
        let outcome = loop {
            let next = tokio::select! {
                biased;
                next = websocket::next_incoming(&mut source) => next,
                _ = close_grace(&we_closed) => break (WS_ABNORMAL, String::new()),
            };
            let (kind, data) = match next {
                Incoming::Message(Message::Text(text)) => (WS_TEXT, text),
                Incoming::Message(Message::Binary(data)) => (WS_BINARY, data),
                Incoming::Closed(code, reason) => break (code, reason),
            };
            if python_gone.load(Ordering::Relaxed) {
                continue;
            }
            let sent = tokio::select! {
                biased;
                sent = send_ws_message(&mut sender, kind, data) => sent,
                _ = close_grace(&we_closed) => break (WS_ABNORMAL, String::new()),
            };
            if !sent {
                python_gone.store(true, Ordering::Relaxed);
            }
        };
        client_done.cancel();
        outcome
    };
    let from_python = async {
        let mut message: Option<(u8, BytesMut)> = None;
        let limit = max_message_size.max(MAX_FRAME);
        // Shutting down: Python was told; what it sent before goes out, then
        // the close frame.
        let mut shutting = false;
        loop {
            let frame = if shutting {
                match futures_util::FutureExt::now_or_never(stream.next()) {
                    Some(frame) => frame,
                    None => Err(BridgeError::Closed),
                }
            } else {
                tokio::select! {
                    biased;
                    _ = client_done.cancelled() => return,
                    _ = shutdown.cancelled() => {
                        shutting = true;
                        python_gone.store(true, Ordering::Relaxed);
                        stream.link.send(frame(kind::WS_CLOSE, stream.id, &ws_close_payload(websocket::SERVICE_RESTART, "")));
                        stream.end = End::Complete;
                        continue;
                    }
                    frame = stream.next() => frame,
                }
            };
            let close = match frame {
                Ok(FrameIn { kind: kind::WS_MESSAGE, mut payload, .. }) if !payload.is_empty() => {
                    let flags = payload.get_u8();
                    let size = payload.len();
                    let (kind, data) = message.get_or_insert_with(|| (flags & (WS_TEXT | WS_BINARY), BytesMut::new()));
                    data.extend_from_slice(&payload);
                    if data.len() > limit {
                        Some((WS_SERVER_ERROR, "message too large"))
                    } else if flags & WS_MORE != 0 {
                        stream.consumed(size);
                        continue;
                    } else {
                        let (kind, data) = (*kind, std::mem::take(data).freeze());
                        message = None;
                        let outgoing = if kind == WS_TEXT {
                            match std::str::from_utf8(&data) {
                                Ok(_) => yawc::Frame::text(data),
                                Err(_) => {
                                    python_gone.store(true, Ordering::Relaxed);
                                    let _ = sink.send(websocket::close_frame(WS_SERVER_ERROR, "")).await;
                                    we_closed.cancel();
                                    return;
                                }
                            }
                        } else {
                            yawc::Frame::binary(data)
                        };
                        if sink.send(outgoing).await.is_err() {
                            return;
                        }
                        stream.consumed(size);
                        None
                    }
                }
                Ok(FrameIn { kind: kind::WS_CLOSE, payload, .. }) if payload.len() >= 2 => {
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    let reason = String::from_utf8_lossy(&payload[2..]).into_owned();
                    let _ = sink.send(websocket::close_frame(code, &reason)).await;
                    we_closed.cancel();
                    return;
                }
                _ if shutting => Some((websocket::SERVICE_RESTART, "")),
                // Python went away, aborted or broke the protocol: the client is told.
                _ => Some((WS_SERVER_ERROR, "")),
            };
            if let Some((code, reason)) = close {
                python_gone.store(true, Ordering::Relaxed);
                let _ = sink.send(websocket::close_frame(code, reason)).await;
                we_closed.cancel();
                return;
            }
        }
    };
    let ((code, reason), ()) = tokio::join!(from_client, from_python);
    let _ = sink.close().await;
    if !python_gone.load(Ordering::Relaxed) {
        stream.link.send(frame(kind::WS_CLOSE, stream.id, &ws_close_payload(code, &reason)));
        stream.end = End::Complete;
    }
}

/// 502, with what went wrong on the bridge logged (never sent to the client).
fn bad_gateway(server: &ServerShared, error: &BridgeError) -> Response<ResponseBody> {
    let report = format!("the socket bridge to Python failed ({error}): answered 502");
    server.log.report(crate::log::Kind::Bridge, crate::log::Level::Error, report);
    error_response(StatusCode::BAD_GATEWAY, "Bad Gateway")
}

/// Connecting to a Unix listener whose accept queue is momentarily full
/// fails at once (EAGAIN): try a few more times before calling it a failure.
async fn connect_retrying<S, F, Fut>(connect: F) -> io::Result<S>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = io::Result<S>>,
{
    let mut attempt = 0u32;
    loop {
        match connect().await {
            Ok(stream) => return Ok(stream),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock && attempt < 20 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(error) => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(status: u16, headers: Option<&HeaderMap>, reason: &[u8], body_size: Option<usize>) -> Bytes {
        let mut out = BytesMut::new();
        put_response_head(&mut out, None, StatusCode::from_u16(status).unwrap(), headers, reason, body_size);
        out.freeze()
    }

    #[test]
    fn a_response_head_comes_back_as_it_went() {
        let mut headers = HeaderMap::new();
        headers.append("x-one", HeaderValue::from_static("1"));
        headers.append("x-one", HeaderValue::from_static("again"));
        let mut payload = BytesMut::from(&head(201, Some(&headers), b"Made", Some(4))[..]);
        payload.extend_from_slice(b"body");
        let decoded = decode_response_head(payload.freeze(), &HeaderMap::new()).unwrap();
        assert_eq!(decoded.status, StatusCode::CREATED);
        assert_eq!(decoded.reason.as_ref().map(|r| r.as_bytes()), Some(&b"Made"[..]));
        let values: Vec<_> = decoded.headers.get_all("x-one").iter().collect();
        assert_eq!(values, ["1", "again"]);
        assert!(matches!(decoded.body, BodyShape::Inline(body) if body == "body"));
    }

    #[test]
    fn default_headers_and_body_shapes_follow_the_flags() {
        let mut defaults = HeaderMap::new();
        defaults.insert("content-type", HeaderValue::from_static("text/plain"));
        let streamed = decode_response_head(head(200, None, b"", None), &defaults).unwrap();
        assert_eq!(streamed.headers.get("content-type").unwrap(), "text/plain");
        assert!(matches!(streamed.body, BodyShape::Streamed));
        let whole = decode_response_head(head(200, Some(&HeaderMap::new()), b"", Some(CHUNK + 1)), &defaults).unwrap();
        assert!(whole.headers.is_empty());
        assert!(matches!(whole.body, BodyShape::Whole));
    }

    #[test]
    fn a_bad_head_is_an_error_not_a_response() {
        let mut status = head(200, None, b"", None).to_vec();
        status[..2].copy_from_slice(&999u16.to_be_bytes());
        assert!(decode_response_head(Bytes::from(status), &HeaderMap::new()).is_err());
        let cut = head(200, Some(&HeaderMap::new()), b"Reason", None);
        assert!(decode_response_head(cut.slice(..cut.len() - 3), &HeaderMap::new()).is_err());
        let mut trailing = head(200, Some(&HeaderMap::new()), b"", None).to_vec();
        trailing.push(0);
        assert!(decode_response_head(Bytes::from(trailing), &HeaderMap::new()).is_err());
    }
}
