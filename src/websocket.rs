//! WebSocket (RFC 6455, yawc) over a hyper upgrade: HTTP/1.1
//! `Upgrade: websocket` (101) and HTTP/2 extended CONNECT (RFC 8441, 200),
//! with permessage-deflate (RFC 7692) when the client offers it and the
//! server allows it. Messages in and out go through bounded buffers, so a
//! slow side makes the other wait instead of filling memory.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use http::header::{
    CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_EXTENSIONS, SEC_WEBSOCKET_KEY,
    SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::{HeaderMap, HeaderValue, Method, StatusCode, Version};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use pyo3::prelude::*;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use yawc::close::CloseCode;
use yawc::streaming::Streaming;
use yawc::{Frame, OpCode, Options, Role, WebSocketError};

use crate::boundary::queue::{Event, EventQueue};
use crate::config::ServerConfig;
use crate::permessage_deflate;

/// Received messages buffered ahead of the application.
const INBOX_HIGH_WATER: usize = 1024 * 1024;
/// Outgoing messages the application may queue before it must wait.
const OUTBOX_HIGH_WATER: usize = 1024 * 1024;
/// 1005: the close frame carried no code.
const NO_STATUS: u16 = 1005;
/// 1006: the connection ended without a close frame.
pub const ABNORMAL_CLOSURE: u16 = 1006;
/// How long the client has to answer our close frame, and then to close
/// the connection.
const CLOSE_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether a request asks for a WebSocket, over HTTP/1.1 or HTTP/2.
pub fn is_upgrade(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
    protocol: Option<&str>,
) -> bool {
    if version == Version::HTTP_2 {
        return method == Method::CONNECT && protocol == Some("websocket");
    }
    let has = |name, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v: &HeaderValue| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|item| item.trim().eq_ignore_ascii_case(token))
            })
    };
    method == Method::GET
        && has(UPGRADE, "websocket")
        && has(CONNECTION, "upgrade")
        && headers
            .get(SEC_WEBSOCKET_VERSION)
            .is_some_and(|v| v == "13")
        && headers.contains_key(SEC_WEBSOCKET_KEY)
}

/// What the handshake settled, for the socket to run with once upgraded.
pub struct Handshake {
    max_message_size: usize,
    /// The `Sec-WebSocket-Extensions` answer: permessage-deflate's terms.
    extensions: Option<String>,
}

/// The status and headers that accept the upgrade, and what the socket
/// runs with. The extensions answer is the engine's, not the application's:
/// only what the socket really speaks may be announced.
pub fn accept_head(
    version: Version,
    request_headers: &HeaderMap,
    headers: &mut HeaderMap,
    config: &ServerConfig,
) -> (StatusCode, Handshake) {
    let extensions = config
        .websocket_compression
        .then(|| permessage_deflate::negotiate(request_headers))
        .flatten();
    headers.remove(SEC_WEBSOCKET_EXTENSIONS);
    if let Some(answer) = &extensions {
        headers.insert(
            SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_str(answer).expect("the answer is built from tokens and digits"),
        );
    }
    let handshake = Handshake {
        max_message_size: config.websocket_max_message_size,
        extensions,
    };
    if version == Version::HTTP_2 {
        return (StatusCode::OK, handshake);
    }
    let key = request_headers
        .get(SEC_WEBSOCKET_KEY)
        .map(|k| k.as_bytes())
        .unwrap_or_default();
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(
        SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&derive_accept_key(key)).expect("base64 is a valid header value"),
    );
    (StatusCode::SWITCHING_PROTOCOLS, handshake)
}

/// RFC 6455 section 4.2.2: base64(SHA-1(key + GUID)).
fn derive_accept_key(key: &[u8]) -> String {
    use base64::Engine as _;
    use sha1::Digest as _;
    let digest = sha1::Sha1::new()
        .chain_update(key)
        .chain_update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11")
        .finalize();
    base64::engine::general_purpose::STANDARD.encode(digest)
}

impl Handshake {
    pub fn max_message_size(&self) -> usize {
        self.max_message_size
    }

    /// Takes over the upgraded connection; None when the client left first.
    pub async fn open(self, upgrade: OnUpgrade) -> Option<Socket> {
        let upgraded = upgrade.await.ok()?;
        // yawc's limit is exclusive: one more byte than the largest frame
        // (wire or inflated); messages are checked as they are put together.
        let limit = self.max_message_size.saturating_add(1);
        let mut options = Options::default().with_limits(limit, limit);
        if self.extensions.is_some() {
            // Empty messages go uncompressed: yawc 0.5.0's deflate spins
            // forever flushing an empty message right after another flush.
            options = options
                .with_low_latency_compression()
                .with_compression_threshold(1);
        }
        let frames = yawc::WebSocket::from_stream_with_extensions(
            Lingering {
                io: TokioIo::new(upgraded),
                write_shut: false,
                deadline: None,
            },
            Role::Server,
            self.extensions.as_deref(),
            options,
        )
        .expect("compression is enabled whenever an extension was agreed")
        .into_streaming();
        Some(Socket {
            frames,
            max_message_size: self.max_message_size,
            partial: None,
            ended: None,
            close_sent: false,
        })
    }
}

/// An open WebSocket connection: yawc's frames (it answers pings and close
/// frames, inflates, and checks each frame and its size), put together into
/// messages here, where the whole message's size and UTF-8 are checked.
/// Closed in RFC 6455 order: when reading ended, the close frame owed to the
/// client (yawc's answer, or ours for a message we refused) goes out before
/// the connection shuts.
pub struct Socket {
    frames: Streaming<Lingering>,
    max_message_size: usize,
    /// A fragmented message being put together: its kind and bytes so far.
    partial: Option<(OpCode, BytesMut)>,
    ended: Option<Ending>,
    close_sent: bool,
}

/// How reading ended.
enum Ending {
    /// The client's close frame, or a failure yawc found: yawc has queued
    /// its answering close frame.
    Answered,
    /// A message we refused, with the code of the close frame we owe.
    Refused(u16),
}

impl Socket {
    /// The message `frame` completes, if it does; Err(close code) when the
    /// client broke the rules.
    fn assemble(&mut self, frame: Frame) -> Result<Option<Incoming>, u16> {
        if frame.opcode() == OpCode::Close {
            let code = frame.close_code().map_or(NO_STATUS, u16::from);
            let reason = frame.close_reason().ok().flatten().unwrap_or_default();
            return Ok(Some(Incoming::Closed(code, reason.to_owned())));
        }
        let (opcode, fin, payload) = frame.into_parts();
        match (opcode, self.partial.as_mut()) {
            (OpCode::Ping | OpCode::Pong, _) => Ok(None),
            (OpCode::Text | OpCode::Binary, None) if fin => whole(opcode, payload),
            (OpCode::Text | OpCode::Binary, None) => {
                self.partial = Some((opcode, BytesMut::from(payload)));
                Ok(None)
            }
            (OpCode::Continuation, Some((_, data))) => {
                if data.len() + payload.len() > self.max_message_size {
                    return Err(CloseCode::Size.into());
                }
                data.extend_from_slice(&payload);
                if !fin {
                    return Ok(None);
                }
                let (opcode, data) = self.partial.take().expect("matched above");
                whole(opcode, data.freeze())
            }
            // A continuation with nothing to continue, or a new message
            // inside a fragmented one.
            _ => Err(CloseCode::Protocol.into()),
        }
    }
}

/// A whole message; text must be UTF-8 (1007 otherwise).
fn whole(opcode: OpCode, payload: Bytes) -> Result<Option<Incoming>, u16> {
    let message = match opcode {
        OpCode::Text if std::str::from_utf8(&payload).is_err() => {
            return Err(CloseCode::Invalid.into())
        }
        OpCode::Text => Message::Text(payload),
        _ => Message::Binary(payload),
    };
    Ok(Some(Incoming::Message(message)))
}

/// The code of the close frame yawc sends for a failure it found (1006 when
/// the connection broke or ended without a close frame).
fn failure_code(error: &WebSocketError) -> u16 {
    match error {
        WebSocketError::FrameTooLarge => CloseCode::Size.into(),
        WebSocketError::InvalidUTF8 => CloseCode::Invalid.into(),
        WebSocketError::InvalidOpCode(_) => CloseCode::Unsupported.into(),
        error if error.is_protocol_error() => CloseCode::Protocol.into(),
        _ => ABNORMAL_CLOSURE,
    }
}

/// Messages from the client, ending with `Incoming::Closed`.
impl Stream for Socket {
    type Item = Incoming;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Incoming>> {
        let this = self.get_mut();
        while this.ended.is_none() {
            let assembled = match ready!(this.frames.poll_next_frame(cx)) {
                Ok(frame) => this.assemble(frame),
                Err(error) => Ok(Some(Incoming::Closed(failure_code(&error), String::new()))),
            };
            let incoming = match assembled {
                Ok(None) => continue,
                Ok(Some(incoming)) => incoming,
                Err(code) => {
                    this.ended = Some(Ending::Refused(code));
                    return Poll::Ready(Some(Incoming::Closed(code, String::new())));
                }
            };
            if matches!(incoming, Incoming::Closed(..)) {
                this.ended = Some(Ending::Answered);
            }
            return Poll::Ready(Some(incoming));
        }
        Poll::Ready(None)
    }
}

impl Sink<Frame> for Socket {
    type Error = WebSocketError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.get_mut().frames).poll_ready(cx)
    }

    fn start_send(self: Pin<&mut Self>, frame: Frame) -> Result<(), Self::Error> {
        let this = self.get_mut();
        this.close_sent |= frame.opcode() == OpCode::Close;
        Pin::new(&mut this.frames).start_send(frame)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.get_mut().frames).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let this = self.get_mut();
        match this.ended {
            _ if this.close_sent => {}
            // yawc sends the frames it owes on a read (which then ends).
            Some(Ending::Answered) => {
                let _ = ready!(this.frames.poll_next_frame(cx));
                this.close_sent = true;
            }
            Some(Ending::Refused(code)) => {
                ready!(Pin::new(&mut this.frames).poll_ready(cx))?;
                Pin::new(&mut *this).start_send(close_frame(code, ""))?;
            }
            None => {}
        }
        Pin::new(&mut this.frames).poll_close(cx)
    }
}

/// A data message.
pub enum Message {
    /// Valid UTF-8.
    Text(Bytes),
    Binary(Bytes),
}

impl Message {
    fn len(&self) -> usize {
        match self {
            Message::Text(data) | Message::Binary(data) => data.len(),
        }
    }
}

/// The upgraded connection, shut down gracefully: after our FIN, what the
/// client still sends (the rest of a message we refused, its close frame) is
/// read and dropped until it closes too, for a bounded time. Closing with
/// unread data would reset the connection, and a reset can destroy the close
/// frame the client has not read yet.
pub struct Lingering {
    io: TokioIo<Upgraded>,
    write_shut: bool,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl AsyncRead for Lingering {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.write_shut {
            ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
            this.write_shut = true;
        }
        let deadline = this
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(CLOSE_ANSWER_TIMEOUT)));
        let mut scratch = [0u8; 8192];
        loop {
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut unread = ReadBuf::new(&mut scratch);
            match ready!(Pin::new(&mut this.io).poll_read(cx, &mut unread)) {
                Ok(()) if !unread.filled().is_empty() => {}
                // The client closed (or the connection broke): done.
                _ => return Poll::Ready(Ok(())),
            }
        }
    }
}

/// What the client sent: a data message, or how the socket ended.
pub enum Incoming {
    Message(Message),
    /// The close code and reason, ours when the client broke the protocol.
    Closed(u16, String),
}

/// The next message, or how the socket ended.
pub async fn next_incoming(source: &mut (impl Stream<Item = Incoming> + Unpin)) -> Incoming {
    let ended = || Incoming::Closed(ABNORMAL_CLOSURE, String::new());
    source.next().await.unwrap_or_else(ended)
}

pub fn close_frame(code: u16, reason: &str) -> Frame {
    Frame::close(CloseCode::from(code), reason)
}

/// One message as the application sees it.
pub enum Received {
    Message(Message),
    /// The socket is closed: the close code and reason.
    Closed(u16, String),
    /// Nothing yet: the waiter fires when something arrives.
    Pending,
}

struct Inbox {
    messages: VecDeque<Message>,
    buffered: usize,
    closed: Option<(u16, String)>,
    waiter: Option<Py<PyAny>>,
}

struct Outbox {
    messages: VecDeque<Frame>,
    buffered: usize,
    /// No more sends: a close frame was queued or the peer is gone.
    closed: bool,
    waiter: Option<Py<PyAny>>,
}

/// An accepted WebSocket, between the application and its socket task.
pub struct WebSocket {
    inbox: Mutex<Inbox>,
    room: Notify,
    outbox: Mutex<Outbox>,
    ready: Notify,
    events: Arc<EventQueue>,
}

/// What `send` did.
pub enum Sent {
    Queued,
    /// Queued; wait for the waiter before sending more.
    Wait,
    /// The socket is closed; nothing was queued.
    Closed,
}

impl WebSocket {
    /// Starts the socket task once hyper hands over the upgraded connection.
    pub fn start(upgrade: OnUpgrade, events: Arc<EventQueue>, handshake: Handshake) -> Arc<Self> {
        let socket = Arc::new(WebSocket {
            inbox: Mutex::new(Inbox {
                messages: VecDeque::new(),
                buffered: 0,
                closed: None,
                waiter: None,
            }),
            room: Notify::new(),
            outbox: Mutex::new(Outbox {
                messages: VecDeque::new(),
                buffered: 0,
                closed: false,
                waiter: None,
            }),
            ready: Notify::new(),
            events,
        });
        let task = socket.clone();
        crate::runtime::runtime().spawn(async move {
            match handshake.open(upgrade).await {
                Some(stream) => task.run(stream).await,
                None => task.finish(ABNORMAL_CLOSURE, String::new()),
            }
        });
        socket
    }

    async fn run(self: Arc<Self>, stream: Socket) {
        let (mut sink, mut source) = stream.split();
        let reading = async {
            loop {
                loop {
                    let room = self.room.notified();
                    tokio::pin!(room);
                    room.as_mut().enable();
                    if self.inbox.lock().buffered < INBOX_HIGH_WATER {
                        break;
                    }
                    room.await;
                }
                match next_incoming(&mut source).await {
                    Incoming::Message(message) => self.receive(message),
                    Incoming::Closed(code, reason) => return (code, reason),
                }
            }
        };
        let (code, reason) = {
            let writing = async {
                loop {
                    let ready = self.ready.notified();
                    tokio::pin!(ready);
                    ready.as_mut().enable();
                    let next = self.next_outgoing();
                    match next {
                        Some(frame) => {
                            let closing = frame.opcode() == OpCode::Close;
                            if sink.send(frame).await.is_err() || closing {
                                return;
                            }
                        }
                        None if self.outbox.lock().closed => return,
                        None => ready.await,
                    }
                }
            };
            tokio::pin!(writing);
            tokio::select! {
                closed = reading => closed,
                _ = &mut writing => {
                    // We sent a close frame: the client has a moment to answer
                    // (data it sent meanwhile is dropped).
                    let answer = async {
                        loop {
                            if let Incoming::Closed(code, reason) = next_incoming(&mut source).await {
                                return (code, reason);
                            }
                        }
                    };
                    tokio::time::timeout(CLOSE_ANSWER_TIMEOUT, answer)
                        .await
                        .unwrap_or((ABNORMAL_CLOSURE, String::new()))
                }
            }
        };
        // The application learns the outcome now; the connection then shuts
        // down gracefully (see `Lingering`).
        self.finish(code, reason);
        let _ = sink.close().await;
    }

    fn receive(&self, message: Message) {
        let mut inbox = self.inbox.lock();
        inbox.buffered += message.len();
        inbox.messages.push_back(message);
        if let Some(waiter) = inbox.waiter.take() {
            self.events.push(Event::Wake(waiter));
        }
    }

    fn next_outgoing(&self) -> Option<Frame> {
        let mut outbox = self.outbox.lock();
        let frame = outbox.messages.pop_front()?;
        outbox.buffered -= frame.payload().len();
        if outbox.buffered <= OUTBOX_HIGH_WATER / 2 {
            if let Some(waiter) = outbox.waiter.take() {
                self.events.push(Event::Wake(waiter));
            }
        }
        Some(frame)
    }

    /// The socket is gone: the application's receive learns the code, its
    /// sends fail.
    fn finish(&self, code: u16, reason: String) {
        {
            let mut inbox = self.inbox.lock();
            inbox.closed.get_or_insert((code, reason));
            if let Some(waiter) = inbox.waiter.take() {
                self.events.push(Event::Wake(waiter));
            }
        }
        let mut outbox = self.outbox.lock();
        outbox.closed = true;
        outbox.messages.clear();
        if let Some(waiter) = outbox.waiter.take() {
            self.events.push(Event::Wake(waiter));
        }
    }

    pub fn recv(&self, waiter: impl FnOnce() -> Py<PyAny>) -> Received {
        let mut inbox = self.inbox.lock();
        if let Some(message) = inbox.messages.pop_front() {
            inbox.buffered -= message.len();
            self.room.notify_one();
            return Received::Message(message);
        }
        if let Some((code, reason)) = &inbox.closed {
            return Received::Closed(*code, reason.clone());
        }
        inbox.waiter = Some(waiter());
        Received::Pending
    }

    /// Queues a message; a close frame never waits (its `waiter` is unused).
    pub fn send(&self, frame: Frame, waiter: impl FnOnce() -> Py<PyAny>) -> Sent {
        let mut outbox = self.outbox.lock();
        if outbox.closed {
            return Sent::Closed;
        }
        let closing = frame.opcode() == OpCode::Close;
        outbox.closed = closing;
        outbox.buffered += frame.payload().len();
        outbox.messages.push_back(frame);
        self.ready.notify_one();
        if outbox.buffered > OUTBOX_HIGH_WATER && !closing {
            outbox.waiter = Some(waiter());
            Sent::Wait
        } else {
            Sent::Queued
        }
    }

    /// Whether the close handshake has finished (or the socket died).
    pub fn closed_code(&self) -> Option<u16> {
        self.inbox.lock().closed.as_ref().map(|(code, _)| *code)
    }
}
