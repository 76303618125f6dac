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

mod codec;
mod link;
mod pump;
mod tunnel;

pub use codec::*;
pub use link::Address;
use link::*;
use pump::*;
use tunnel::*;

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
        let whole_body =
            first.take_if(|data| body.is_end_stream() && data.len() <= CHUNK && data.len() as u64 <= limit);
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

/// 502, with what went wrong on the bridge logged (never sent to the client).
fn bad_gateway(server: &ServerShared, error: &BridgeError) -> Response<ResponseBody> {
    let report = format!("the socket bridge to Python failed ({error}): answered 502");
    server.log.report(crate::log::Kind::Bridge, crate::log::Level::Error, report);
    error_response(StatusCode::BAD_GATEWAY, "Bad Gateway")
}
