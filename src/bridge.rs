//! The socket bridge (`native_callback=False`): requests and responses cross
//! a local socket as length-prefixed frames, streamed in chunks both ways.
//! Python listens; this side keeps a pool of connections to it, one request
//! in flight per connection, grown on demand up to a bound, idle ones reused.
//!
//! A frame is `u32` big-endian length (of what follows), then
//! `[version = 1][type u8]` and the payload. Strings and byte strings are a
//! `u32` big-endian length and the bytes (in the request head the lengths
//! come first, as a table, and the bytes after them).
//!
//! | type | name           | direction     | payload |
//! |------|----------------|---------------|---------|
//! | 0    | hello          | Rust → Python | token (bytes); the first frame of every connection |
//! | 1    | request head   | Rust → Python | client port u16, local port u16, flags u8 (1 TLS, 2 a WebSocket request, 4 over a Unix socket: no client address, local ip is the socket path), string count u32, that many u32 lengths, then the strings back to back: method, scheme, authority (empty: none), path, query, HTTP version, client ip, local ip, peer certificate DER (empty: none), then name and value of each header in order |
//! | 2    | request chunk  | Rust → Python | body bytes (at most 64 KiB) |
//! | 3    | request end    | Rust → Python | — |
//! | 4    | response head  | Python → Rust | status u16, flags u8 (1: the server's default headers; 2: a whole body follows, collected before the head goes out), reason (empty: the standard one), header count u32, (name, value)… |
//! | 5    | response chunk | Python → Rust | body bytes (at most 64 KiB) |
//! | 6    | response end   | Python → Rust | — |
//! | 7    | abort          | both          | Rust → Python: reason u8 (1 client gone, 2 body too large, 3 body discarded: the response was complete before it was read); Python → Rust: none (a 500, or the stream is cut off) |
//! | 8    | websocket accept | Python → Rust | instead of a response head, for a WebSocket request: subprotocol (empty: none), header count u32, (name, value)… |
//! | 9    | websocket message | both       | flags u8 (1 text, 2 binary; +4 more fragments follow), data (at most 64 KiB per frame) |
//! | 10   | websocket close | both         | code u16, reason (the rest). Python → Rust: start the closing handshake; Rust → Python: the socket is closed (last frame) |
//!
//! The request head's flags say whether the request asks for a WebSocket
//! (HTTP/1.1 upgrade or HTTP/2 extended CONNECT). Once Python accepts it, the
//! connection carries that socket's messages both ways until it closes, and
//! is not reused.
//!
//! A connection goes back to the pool only after a clean exchange: the
//! request end (or a discard abort) written, the response end read, nothing
//! left over. A response that ends before its request body is read makes the
//! rest of that body be read and dropped here (as far as `max_body_size`),
//! so the client's connection stays usable. Anything else closes the bridge
//! connection; Python then sees EOF, which it reports as the client gone.
//! Every bridge failure is a 502 (or a cut-off stream once the head is out);
//! `response_timeout` is a 504.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
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
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::body::ResponseBody;
use crate::config::{seconds, ServerConfig};
use crate::connection::Connection;
use crate::exchange::ConnInfo;
use crate::server::ServerShared;
use crate::service::{error_response, RequestBodySource};
use crate::websocket::{self, Handshake, Incoming, Message};
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::OnUpgrade;

pub const VERSION: u8 = 1;
/// Largest body chunk in one frame.
pub const CHUNK: usize = 64 * 1024;
/// Largest frame either side accepts (heads carry every header).
pub const MAX_FRAME: usize = 16 * 1024 * 1024;
/// Request body bytes gathered into one write when the client sends faster
/// than Python reads.
const WRITE_BATCH: usize = 256 * 1024;

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
}

/// Why Rust gives up on a request (the payload of its abort frame).
const ABORT_CLIENT_GONE: u8 = 1;
const ABORT_TOO_LARGE: u8 = 2;
const ABORT_DISCARDED: u8 = 3;

const FLAG_DEFAULT_HEADERS: u8 = 1;
const FLAG_WHOLE_BODY: u8 = 2;
/// Request head flags.
const HEAD_TLS: u8 = 1;
const HEAD_WEBSOCKET: u8 = 2;
const HEAD_UNIX: u8 = 4;
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
#[derive(Debug)]
pub enum BridgeError {
    Io(io::Error),
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
        BridgeError::Io(error)
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
    pub payload: Bytes,
}

/// Appends one frame header for a payload of `len` bytes.
fn put_header(out: &mut BytesMut, kind: u8, len: usize) {
    out.put_u32((len + 2) as u32);
    out.put_u8(VERSION);
    out.put_u8(kind);
}

fn put_frame(out: &mut BytesMut, kind: u8, payload: &[u8]) {
    put_header(out, kind, payload.len());
    out.extend_from_slice(payload);
}

/// Reads frames from one connection, keeping what arrived past the last one.
struct FrameReader {
    io: ReadHalf,
    buf: BytesMut,
}

impl FrameReader {
    fn new(io: ReadHalf) -> Self {
        FrameReader { io, buf: BytesMut::with_capacity(16 * 1024) }
    }

    /// The next frame; None at a clean end of stream (between frames).
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<FrameIn>, BridgeError>> {
        loop {
            // How much to read: the rest of a frame whose length is known, or
            // a small window (most frames are small; it is zeroed first).
            let mut want = 8 * 1024;
            if self.buf.len() >= 4 {
                let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
                if !(2..=MAX_FRAME).contains(&len) {
                    return Poll::Ready(Err(BridgeError::Malformed("frame length out of range")));
                }
                if self.buf.len() >= 4 + len {
                    let mut frame = self.buf.split_to(4 + len);
                    frame.advance(4);
                    if frame[0] != VERSION {
                        return Poll::Ready(Err(BridgeError::Malformed("unknown frame version")));
                    }
                    let kind = frame[1];
                    frame.advance(2);
                    return Poll::Ready(Ok(Some(FrameIn { kind, payload: frame.freeze() })));
                }
                want = want.max((4 + len - self.buf.len()).min(4 * CHUNK));
            }
            let start = self.buf.len();
            self.buf.resize(start + want, 0);
            let mut read = ReadBuf::new(&mut self.buf[start..]);
            let outcome = Pin::new(&mut self.io).poll_read(cx, &mut read);
            let filled = read.filled().len();
            self.buf.truncate(start + filled);
            match ready!(outcome) {
                Err(error) => return Poll::Ready(Err(error.into())),
                Ok(()) if filled == 0 => {
                    return Poll::Ready(if self.buf.is_empty() { Ok(None) } else { Err(BridgeError::Closed) });
                }
                Ok(()) => {}
            }
        }
    }

    async fn next(&mut self) -> Result<FrameIn, BridgeError> {
        std::future::poll_fn(|cx| self.poll_frame(cx)).await?.ok_or(BridgeError::Closed)
    }
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

/// The request head: the fixed fields, then every string's `u32` length
/// (a table), then the strings back to back — so the Python end takes them
/// apart with two `struct` calls instead of one per string.
fn encode_request_head(out: &mut BytesMut, head: &Parts, info: &ConnInfo, websocket: bool) {
    let (peer_ip, peer_port) = info.addresses.remote().unwrap_or_default();
    let (local_ip, local_port) = info.addresses.local();
    let authority = match head.uri.authority() {
        Some(authority) => authority.as_str().as_bytes(),
        None => head.headers.get(HOST).map_or(&b""[..], |v| v.as_bytes()),
    };
    let fixed: [&[u8]; 9] = [
        head.method.as_str().as_bytes(),
        if info.tls { b"https" } else { b"http" },
        authority,
        head.uri.path().as_bytes(),
        head.uri.query().unwrap_or("").as_bytes(),
        version_text(head.version),
        peer_ip.as_bytes(),
        local_ip.as_bytes(),
        info.peer_certificate.as_ref().map_or(&b""[..], |c| c.as_ref()),
    ];
    let headers = || head.headers.iter().flat_map(|(name, value)| [name.as_str().as_bytes(), value.as_bytes()]);
    let count = fixed.len() + 2 * head.headers.len();
    let bytes: usize = fixed.iter().map(|s| s.len()).sum::<usize>() + headers().map(<[u8]>::len).sum::<usize>();
    put_header(out, kind::REQUEST_HEAD, 9 + 4 * count + bytes);
    out.put_u16(peer_port);
    out.put_u16(local_port.unwrap_or(0));
    let unix = if local_port.is_none() { HEAD_UNIX } else { 0 };
    out.put_u8(if info.tls { HEAD_TLS } else { 0 } | if websocket { HEAD_WEBSOCKET } else { 0 } | unix);
    out.put_u32(count as u32);
    for field in fixed.iter().copied().chain(headers()) {
        out.put_u32(field.len() as u32);
    }
    for field in fixed.iter().copied().chain(headers()) {
        out.extend_from_slice(field);
    }
}

struct ResponseHead {
    status: StatusCode,
    headers: HeaderMap,
    reason: Option<ReasonPhrase>,
    whole: bool,
}

fn decode_response_head(payload: Bytes, defaults: &HeaderMap) -> Result<ResponseHead, BridgeError> {
    let mut fields = Fields { payload };
    let code = fields.u16()?;
    let status = StatusCode::from_u16(code)
        .ok()
        .filter(|s| s.as_u16() >= 200)
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
    if fields.payload.has_remaining() {
        return Err(BridgeError::Malformed("bytes after the response head"));
    }
    Ok(ResponseHead { status, headers, reason, whole: flags & FLAG_WHOLE_BODY != 0 })
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

// ------------------------------------------------------------------ pool

/// One pooled connection to Python.
struct Conn {
    reader: FrameReader,
    writer: WriteHalf,
}

pub struct Bridge {
    address: Result<Address, String>,
    token: Vec<u8>,
    idle: Mutex<Vec<Conn>>,
    /// One permit per connection in use: the pool's bound.
    slots: Arc<Semaphore>,
    closed: CancellationToken,
}

/// How a bridged request failed before its response head.
enum Failure {
    Bridge(BridgeError),
    TooLarge,
    Closed,
}

impl From<BridgeError> for Failure {
    fn from(error: BridgeError) -> Self {
        Failure::Bridge(error)
    }
}

impl From<io::Error> for Failure {
    fn from(error: io::Error) -> Self {
        Failure::Bridge(BridgeError::Io(error))
    }
}

impl Bridge {
    pub fn new(address: &str, token: Option<&[u8]>, max_connections: usize) -> Self {
        Bridge {
            address: Address::parse(address),
            token: token.unwrap_or_default().to_vec(),
            idle: Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(max_connections.clamp(1, Semaphore::MAX_PERMITS))),
            closed: CancellationToken::new(),
        }
    }

    /// The server stopped: idle connections close (Python sees EOF) and no
    /// new ones are made.
    pub fn close(&self) {
        self.closed.cancel();
        self.slots.close();
        self.idle.lock().clear();
    }

    async fn connect(&self) -> Result<Conn, BridgeError> {
        let address = self.address.as_ref().map_err(|m| BridgeError::Io(io::Error::other(m.clone())))?;
        let (reader, mut writer) = match address {
            #[cfg(unix)]
            Address::Unix(path) => {
                let stream = connect_retrying(|| tokio::net::UnixStream::connect(path.clone())).await?;
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
        let mut hello = BytesMut::with_capacity(6 + self.token.len());
        put_frame(&mut hello, kind::HELLO, &self.token);
        writer.write_all(&hello).await?;
        Ok(Conn { reader: FrameReader::new(reader), writer })
    }

    async fn checkout(self: &Arc<Self>) -> Result<Lease, Failure> {
        let permit = self.slots.clone().acquire_owned().await.map_err(|_| Failure::Closed)?;
        let conn = self.idle.lock().pop();
        let conn = match conn {
            Some(conn) => conn,
            None => self.connect().await?,
        };
        Ok(Lease {
            bridge: self.clone(),
            reader: Some(conn.reader),
            writer: Writer::Here(conn.writer),
            permit: Some(permit),
        })
    }

    fn put_back(&self, conn: Conn) {
        if !self.closed.is_cancelled() {
            self.idle.lock().push(conn);
        }
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
            Err(Failure::TooLarge) => error_response(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"),
            Err(Failure::Closed) => error_response(StatusCode::SERVICE_UNAVAILABLE, "server is closing"),
            Err(Failure::Bridge(error)) => bad_gateway(&error),
        }
    }

    async fn exchange<B: RequestBodySource>(
        self: &Arc<Self>,
        request: Request<B>,
        info: &ConnInfo,
        server: &ServerShared,
    ) -> Result<Response<ResponseBody>, Failure> {
        let mut request = request;
        let protocol = request.extensions().get::<hyper::ext::Protocol>().map(|p| p.as_str().to_owned());
        let upgrade = websocket::is_upgrade(request.method(), request.version(), request.headers(), protocol.as_deref())
            .then(|| hyper::upgrade::on(&mut request));
        let mut lease = self.checkout().await?;
        let (head, body) = request.into_parts();
        let mut out = BytesMut::with_capacity(512);
        encode_request_head(&mut out, &head, info, upgrade.is_some());
        let too_large = CancellationToken::new();
        if body.is_end_stream() {
            put_frame(&mut out, kind::REQUEST_END, &[]);
            lease.writer_mut().expect("a fresh lease has its writer").write_all(&out).await?;
        } else {
            let Writer::Here(writer) = std::mem::replace(&mut lease.writer, Writer::Gone) else {
                unreachable!("a fresh lease has its writer")
            };
            let signals = PumpSignals {
                too_large: too_large.clone(),
                stop: CancellationToken::new(),
                discard: CancellationToken::new(),
            };
            let task = tokio::spawn(pump(body, writer, out, server.config.max_body_size, signals.clone()));
            lease.writer = Writer::Pumping { task, signals };
        }
        let reader = lease.reader.as_mut().expect("a fresh lease has its reader");
        let frame = tokio::select! {
            biased;
            _ = too_large.cancelled() => return Err(Failure::TooLarge),
            frame = reader.next() => frame?,
        };
        match frame.kind {
            kind::RESPONSE_HEAD => {}
            kind::WS_ACCEPT if upgrade.is_some() => {
                let upgrade = upgrade.expect("checked above");
                return accept_websocket(lease, upgrade, &head, frame.payload, &server.config).await;
            }
            kind::ABORT => {
                return Ok(error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal server error"));
            }
            other => return Err(BridgeError::UnexpectedFrame(other).into()),
        }
        let head = decode_response_head(frame.payload, &server.default_headers.read())?;
        if !head.whole {
            let body = BridgeBody { lease: Some(lease), failing: None };
            return Ok(build_response(head, ResponseBody::Boxed(BoxBody::new(body))));
        }
        // A whole body: gathered here, so hyper knows its length.
        let mut collected = BytesMut::new();
        loop {
            let reader = lease.reader.as_mut().expect("the lease keeps its reader");
            let frame = tokio::select! {
                biased;
                _ = too_large.cancelled() => return Err(Failure::TooLarge),
                frame = reader.next() => frame?,
            };
            match frame.kind {
                kind::RESPONSE_CHUNK => collected.extend_from_slice(&frame.payload),
                kind::RESPONSE_END => {
                    lease.release();
                    return Ok(build_response(head, ResponseBody::full(collected.freeze())));
                }
                kind::ABORT => {
                    return Ok(error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal server error"));
                }
                other => return Err(BridgeError::UnexpectedFrame(other).into()),
            }
        }
    }
}

/// Python accepted a WebSocket: the accepting response goes to the client,
/// and the connection becomes that socket's tunnel.
async fn accept_websocket(
    mut lease: Lease,
    upgrade: OnUpgrade,
    request: &Parts,
    payload: Bytes,
    config: &ServerConfig,
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
    let (status, handshake) = websocket::accept_head(request.version, &request.headers, &mut headers, config);
    // The request side is through before the socket starts (an upgrade
    // request has no body; should one come, it is written out first).
    let writer = match std::mem::replace(&mut lease.writer, Writer::Gone) {
        Writer::Here(writer) => writer,
        Writer::Pumping { task, signals: _ } => match task.await {
            Ok(Some(writer)) => writer,
            _ => return Err(BridgeError::Closed.into()),
        },
        Writer::Gone => return Err(BridgeError::Closed.into()),
    };
    let reader = lease.reader.take().expect("the lease keeps its reader");
    // The connection leaves the pool for good: a long-lived socket must not
    // hold one of the slots that bound requests in flight.
    drop(lease);
    tokio::spawn(tunnel(upgrade, reader, writer, handshake));
    let mut response = Response::new(ResponseBody::empty());
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Ok(response)
}

/// Appends a message as frames of at most `CHUNK` bytes.
fn put_ws_message(out: &mut BytesMut, kind: u8, data: &[u8]) {
    let mut pieces = data.chunks(CHUNK).peekable();
    if pieces.peek().is_none() {
        put_frame(out, kind::WS_MESSAGE, &[kind]);
        return;
    }
    while let Some(piece) = pieces.next() {
        let flags = if pieces.peek().is_some() { kind | WS_MORE } else { kind };
        put_header(out, kind::WS_MESSAGE, 1 + piece.len());
        out.put_u8(flags);
        out.extend_from_slice(piece);
    }
}

fn ws_close_frame(code: u16, reason: &str) -> BytesMut {
    let mut out = BytesMut::with_capacity(8 + reason.len());
    put_header(&mut out, kind::WS_CLOSE, 2 + reason.len());
    out.put_u16(code);
    out.extend_from_slice(reason.as_bytes());
    out
}

/// Carries one accepted WebSocket's messages between the client and Python
/// until either side closes. The two directions run independently, so a
/// full buffer one way never stops the other; each frame is written whole.
async fn tunnel(upgrade: OnUpgrade, mut reader: FrameReader, mut writer: WriteHalf, handshake: Handshake) {
    let max_message_size = handshake.max_message_size();
    let Some(stream) = handshake.open(upgrade).await else {
        let _ = writer.write_all(&ws_close_frame(WS_ABNORMAL, "")).await;
        return;
    };
    let (mut sink, mut source) = stream.split();
    let client_done = CancellationToken::new();
    let we_closed = CancellationToken::new();
    let python_gone = std::sync::atomic::AtomicBool::new(false);
    let from_client = async {
        let mut out = BytesMut::new();
        let outcome = loop {
            let next = tokio::select! {
                biased;
                next = websocket::next_incoming(&mut source) => next,
                // After our close frame, the client has a moment to answer.
                _ = async {
                    we_closed.cancelled().await;
                    tokio::time::sleep(Duration::from_secs(5)).await;
                } => break (WS_ABNORMAL, String::new()),
            };
            let (kind, data) = match next {
                Incoming::Message(Message::Text(text)) => (WS_TEXT, text),
                Incoming::Message(Message::Binary(data)) => (WS_BINARY, data),
                Incoming::Closed(code, reason) => break (code, reason),
            };
            if python_gone.load(std::sync::atomic::Ordering::Relaxed) {
                continue;
            }
            out.clear();
            put_ws_message(&mut out, kind, &data);
            if writer.write_all(&out).await.is_err() {
                python_gone.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        };
        client_done.cancel();
        outcome
    };
    let from_python = async {
        let mut message: Option<(u8, BytesMut)> = None;
        let limit = max_message_size.max(MAX_FRAME);
        loop {
            let frame = tokio::select! {
                biased;
                _ = client_done.cancelled() => return,
                frame = reader.next() => frame,
            };
            let close = match frame {
                Ok(FrameIn { kind: kind::WS_MESSAGE, mut payload }) if !payload.is_empty() => {
                    let flags = payload.get_u8();
                    let (kind, data) = message.get_or_insert_with(|| (flags & (WS_TEXT | WS_BINARY), BytesMut::new()));
                    data.extend_from_slice(&payload);
                    if data.len() > limit {
                        Some((WS_SERVER_ERROR, "message too large"))
                    } else if flags & WS_MORE != 0 {
                        continue;
                    } else {
                        let (kind, data) = (*kind, std::mem::take(data).freeze());
                        message = None;
                        let outgoing = if kind == WS_TEXT {
                            match std::str::from_utf8(&data) {
                                Ok(_) => yawc::Frame::text(data),
                                Err(_) => {
                                    python_gone.store(true, std::sync::atomic::Ordering::Relaxed);
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
                        None
                    }
                }
                Ok(FrameIn { kind: kind::WS_CLOSE, payload }) if payload.len() >= 2 => {
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    let reason = String::from_utf8_lossy(&payload[2..]).into_owned();
                    let _ = sink.send(websocket::close_frame(code, &reason)).await;
                    we_closed.cancel();
                    return;
                }
                // Python went away or broke the protocol: the client is told.
                _ => Some((WS_SERVER_ERROR, "")),
            };
            if let Some((code, reason)) = close {
                python_gone.store(true, std::sync::atomic::Ordering::Relaxed);
                let _ = sink.send(websocket::close_frame(code, reason)).await;
                we_closed.cancel();
                return;
            }
        }
    };
    let ((code, reason), ()) = tokio::join!(from_client, from_python);
    let _ = sink.close().await;
    if !python_gone.load(std::sync::atomic::Ordering::Relaxed) {
        let _ = writer.write_all(&ws_close_frame(code, &reason)).await;
    }
}

/// 502, saying what went wrong on the bridge.
fn bad_gateway(error: &BridgeError) -> Response<ResponseBody> {
    let mut response = error_response(StatusCode::BAD_GATEWAY, "");
    *response.body_mut() = ResponseBody::full(format!("bad gateway: {error}"));
    response
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

/// The request side of a lease.
enum Writer {
    Here(WriteHalf),
    /// The body is being pumped; the task gives the writer back once it has
    /// written the request end.
    Pumping { task: JoinHandle<Option<WriteHalf>>, signals: PumpSignals },
    Gone,
}

/// A connection taken from the pool for one exchange. Dropped without
/// `release`, the connection closes.
struct Lease {
    bridge: Arc<Bridge>,
    reader: Option<FrameReader>,
    writer: Writer,
    permit: Option<OwnedSemaphorePermit>,
}

impl Lease {
    fn writer_mut(&mut self) -> Option<&mut WriteHalf> {
        match &mut self.writer {
            Writer::Here(writer) => Some(writer),
            _ => None,
        }
    }

    /// The response end was read: the connection goes back to the pool
    /// once the request side is through too.
    fn release(&mut self) {
        let Some(reader) = self.reader.take() else { return };
        if !reader.buf.is_empty() {
            return; // more than one response: not a connection to reuse
        }
        match std::mem::replace(&mut self.writer, Writer::Gone) {
            Writer::Here(writer) => self.bridge.put_back(Conn { reader, writer }),
            Writer::Pumping { task, signals } => {
                // Whatever of the body is still to come, nobody will read:
                // the pump drops it and ends the request with a discard.
                signals.discard.cancel();
                let bridge = self.bridge.clone();
                let permit = self.permit.take();
                tokio::spawn(async move {
                    if let Ok(Some(writer)) = task.await {
                        bridge.put_back(Conn { reader, writer });
                    }
                    drop(permit);
                });
            }
            Writer::Gone => {}
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Writer::Pumping { signals, .. } = &self.writer {
            signals.stop.cancel();
        }
    }
}

/// How the exchange steers its body pump.
#[derive(Clone)]
struct PumpSignals {
    /// Fired by the pump: the body passed `max_body_size` (413).
    too_large: CancellationToken,
    /// The exchange failed: stop at once (the connection closes).
    stop: CancellationToken,
    /// The response is complete: read the rest of the body and drop it.
    discard: CancellationToken,
}

/// Moves the request body to Python as chunk frames after `out` (the head),
/// enforcing `limit`. Writes what is ready in one go. Returns the writer once
/// the request end (or a discard abort) is written; None when the body failed
/// or `stop` fired.
async fn pump<B: RequestBodySource>(
    mut body: B,
    mut writer: WriteHalf,
    mut out: BytesMut,
    limit: u64,
    signals: PumpSignals,
) -> Option<WriteHalf> {
    let PumpSignals { too_large, stop, discard } = signals;
    let mut total: u64 = 0;
    let mut discarded = false;
    loop {
        // Everything the body has ready now joins the pending write.
        loop {
            let next = if out.is_empty() {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => return None,
                    frame = body.frame() => frame,
                }
            } else {
                tokio::select! {
                    biased;
                    frame = body.frame() => frame,
                    _ = std::future::ready(()) => break,
                }
            };
            // (the body's error type need not be Send: drop it before awaiting)
            match next.map(|frame| frame.map_err(drop)) {
                None if discarded => {
                    put_frame(&mut out, kind::ABORT, &[ABORT_DISCARDED]);
                    return write_or_stop(&mut writer, &out, &stop).await.then_some(writer);
                }
                None => {
                    put_frame(&mut out, kind::REQUEST_END, &[]);
                    return write_or_stop(&mut writer, &out, &stop).await.then_some(writer);
                }
                Some(Err(())) => {
                    put_frame(&mut out, kind::ABORT, &[ABORT_CLIENT_GONE]);
                    let _ = write_or_stop(&mut writer, &out, &stop).await;
                    return None;
                }
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else { continue };
                    total += data.len() as u64;
                    if total > limit {
                        too_large.cancel();
                        // Python learns why (BodyTooLarge) even though the
                        // exchange is over for the client.
                        put_frame(&mut out, kind::ABORT, &[ABORT_TOO_LARGE]);
                        let _ = writer.write_all(&out).await;
                        return None;
                    }
                    if discard.is_cancelled() {
                        discarded |= !data.is_empty();
                        continue;
                    }
                    for piece in data.chunks(CHUNK) {
                        put_frame(&mut out, kind::REQUEST_CHUNK, piece);
                    }
                    if out.len() >= WRITE_BATCH {
                        break;
                    }
                }
            }
        }
        if !write_or_stop(&mut writer, &out, &stop).await {
            return None;
        }
        out.clear();
    }
}

async fn write_or_stop(writer: &mut WriteHalf, out: &[u8], stop: &CancellationToken) -> bool {
    tokio::select! {
        biased;
        _ = stop.cancelled() => false,
        written = writer.write_all(out) => written.is_ok(),
    }
}

// ------------------------------------------------------------------ response body

/// A streamed response body read from the bridge: the next frame is read
/// only when hyper asks for the next chunk, so a slow client slows Python.
struct BridgeBody {
    lease: Option<Lease>,
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
            this.lease = None;
            return Poll::Ready(Some(Err(io::Error::other(message))));
        }
        let Some(lease) = this.lease.as_mut() else { return Poll::Ready(None) };
        let reader = lease.reader.as_mut().expect("a streaming lease keeps its reader");
        loop {
            let failure = match ready!(reader.poll_frame(cx)) {
                Ok(Some(FrameIn { kind: kind::RESPONSE_CHUNK, payload })) => {
                    if payload.is_empty() {
                        continue;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(payload))));
                }
                Ok(Some(FrameIn { kind: kind::RESPONSE_END, .. })) => {
                    let mut lease = this.lease.take().expect("checked above");
                    lease.release();
                    return Poll::Ready(None);
                }
                Ok(Some(FrameIn { kind: kind::ABORT, .. })) => "response aborted by the application",
                Ok(Some(_)) => "unexpected frame on the bridge",
                Ok(None) | Err(_) => "the bridge failed mid-response",
            };
            // Drop the connection now; error on the next poll, after hyper
            // has flushed what the client should still get.
            this.lease = None;
            this.failing = Some(failure);
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
    }

    fn is_end_stream(&self) -> bool {
        self.lease.is_none() && self.failing.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
