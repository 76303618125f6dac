//! WebSocket (RFC 6455, yawc) over a hyper upgrade: HTTP/1.1
//! `Upgrade: websocket` (101) and HTTP/2 extended CONNECT (RFC 8441, 200),
//! with permessage-deflate (RFC 7692) when the client offers it and the
//! server allows it. Messages in and out go through bounded buffers, so a
//! slow side makes the other wait instead of filling memory. The server
//! pings an idle client (`ws_ping_interval`) and closes one that does not
//! answer (1011); on shutdown every open socket is closed with 1012.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use http::header::{
    CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_EXTENSIONS, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Version};
use http_body::Body;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Sleep;
use yawc::close::CloseCode;
use yawc::streaming::Streaming;
use yawc::{Frame, OpCode, Options, Role, WebSocketError};

use crate::boundary::queue::{Event, EventQueue, Waiter};
use crate::config::{seconds, ServerConfig};
use crate::permessage_deflate;
use crate::server::ServerShared;
use tokio_util::sync::CancellationToken;

/// Received messages buffered ahead of the application, in bytes (besides
/// `ws_max_queue`, their count).
const INBOX_HIGH_WATER: usize = 1024 * 1024;
/// Outgoing messages the application may queue before it must wait.
const OUTBOX_HIGH_WATER: usize = 1024 * 1024;
/// 1005: the close frame carried no code.
const NO_STATUS: u16 = 1005;
/// 1006: the connection ended without a close frame.
pub const ABNORMAL_CLOSURE: u16 = 1006;
/// 1011: the server failed; also a client that stopped answering pings.
pub const INTERNAL_ERROR: u16 = 1011;
/// 1012 (service restart): every open socket's close code when the server
/// shuts down. A drain is nearly always a restart or a deploy; 1012 tells
/// the client to reconnect (to the next instance), where 1001 (going away)
/// says only that this end is leaving. It is also what uvicorn sends.
pub const SERVICE_RESTART: u16 = 1012;
/// How long the client has to answer our close frame, and then to close
/// the connection.
pub const CLOSE_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether a request asks for a WebSocket: an HTTP/1.1 `GET` with
/// `Upgrade: websocket` and `Connection: upgrade`, or an HTTP/2 extended
/// CONNECT for `websocket`. Whether it is a valid handshake is `invalid`'s.
pub fn requested<B>(request: &Request<B>) -> bool {
    let headers = request.headers();
    match request.version() {
        Version::HTTP_2 => {
            let protocol = request.extensions().get::<hyper::ext::Protocol>();
            request.method() == Method::CONNECT && protocol.is_some_and(|p| p.as_str() == "websocket")
        }
        Version::HTTP_11 => {
            request.method() == Method::GET
                && has_token(headers, UPGRADE, "websocket")
                && has_token(headers, CONNECTION, "upgrade")
        }
        _ => false,
    }
}

fn has_token(headers: &HeaderMap, name: http::header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v: &HeaderValue| v.to_str().ok())
        .any(|v| v.split(',').any(|item| item.trim().eq_ignore_ascii_case(token)))
}

/// A request that asks for a WebSocket and is no valid handshake (RFC 6455
/// section 4.2.1, RFC 8441 section 5): the status the server answers it
/// with itself, and why.
pub struct InvalidHandshake {
    pub status: StatusCode,
    pub why: &'static str,
    /// The version was the problem: the answer names the one spoken here
    /// (`Sec-WebSocket-Version: 13`).
    pub version: bool,
}

/// Why a request that asks for a WebSocket is no valid handshake: 426 for
/// a version other than 13, else 400 (as wsproto answers).
pub fn invalid<B: Body>(request: &Request<B>) -> Option<InvalidHandshake> {
    let refused = |status, why, version| Some(InvalidHandshake { status, why, version });
    let headers = request.headers();
    let versions = headers.get_all(SEC_WEBSOCKET_VERSION).iter().collect::<Vec<_>>();
    match versions.as_slice() {
        [] => return refused(StatusCode::BAD_REQUEST, "no Sec-WebSocket-Version", true),
        [version] if *version == "13" => {}
        _ => return refused(StatusCode::UPGRADE_REQUIRED, "Sec-WebSocket-Version must be 13", true),
    }
    if request.version() == Version::HTTP_2 {
        return None;
    }
    let mut keys = headers.get_all(SEC_WEBSOCKET_KEY).iter();
    if !keys.next().is_some_and(valid_key) || keys.next().is_some() {
        return refused(StatusCode::BAD_REQUEST, "Sec-WebSocket-Key must be one base64-encoded 16-byte value", false);
    }
    if !request.body().is_end_stream() {
        return refused(StatusCode::BAD_REQUEST, "a WebSocket handshake has no body", false);
    }
    None
}

fn valid_key(key: &HeaderValue) -> bool {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(key.as_bytes()).is_ok_and(|bytes| bytes.len() == 16)
}

/// The server's keep-alive pings: one every `interval` (counted from the
/// last pong); no pong within `timeout` (when set) closes with 1011.
#[derive(Clone, Copy)]
pub struct Pings {
    interval: Duration,
    timeout: Option<Duration>,
}

impl Pings {
    pub fn from_config(config: &ServerConfig) -> Option<Self> {
        seconds(config.ws_ping_interval).map(|interval| Pings { interval, timeout: seconds(config.ws_ping_timeout) })
    }
}

/// What the handshake settled, for the socket to run with once upgraded.
pub struct Handshake {
    max_message_size: usize,
    /// The `Sec-WebSocket-Extensions` answer: permessage-deflate's terms.
    extensions: Option<String>,
    pings: Option<Pings>,
    /// Received messages held for the application at most (`ws_max_queue`).
    max_queue: usize,
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
    let extensions = config.websocket_compression.then(|| permessage_deflate::negotiate(request_headers)).flatten();
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
        pings: Pings::from_config(config),
        max_queue: config.ws_max_queue.max(1),
    };
    if version == Version::HTTP_2 {
        return (StatusCode::OK, handshake);
    }
    let key = request_headers.get(SEC_WEBSOCKET_KEY).map(|k| k.as_bytes()).unwrap_or_default();
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
    let digest = sha1::Sha1::new().chain_update(key).chain_update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").finalize();
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
            options = options.with_low_latency_compression().with_compression_threshold(1);
        }
        let frames = yawc::WebSocket::from_stream_with_extensions(
            Lingering { io: TokioIo::new(upgraded), write_shut: false, deadline: None },
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
            keepalive: self.pings.map(KeepAlive::new),
        })
    }
}

/// An open WebSocket connection: yawc's frames (it answers pings and close
/// frames, inflates, and checks each frame and its size), put together into
/// messages here, where the whole message's size and UTF-8 are checked.
/// Closed in RFC 6455 order: when reading ended, the close frame owed to the
/// client (yawc's answer, or ours for a message we refused) goes out before
/// the connection shuts. Reading also sends the keep-alive pings: the
/// reading and writing halves run in one task, and a ping written from
/// either half goes out the same way.
pub struct Socket {
    frames: Streaming<Lingering>,
    max_message_size: usize,
    /// A fragmented message being put together: its kind and bytes so far.
    partial: Option<(OpCode, BytesMut)>,
    ended: Option<Ending>,
    close_sent: bool,
    keepalive: Option<KeepAlive>,
}

/// Where the keep-alive pings stand.
struct KeepAlive {
    pings: Pings,
    /// When the next ping is due, or (`awaiting`) when its pong is overdue.
    timer: Pin<Box<Sleep>>,
    awaiting: bool,
    /// A ping was queued and is not flushed yet.
    unflushed: bool,
}

impl KeepAlive {
    fn new(pings: Pings) -> Self {
        KeepAlive { pings, timer: Box::pin(tokio::time::sleep(pings.interval)), awaiting: false, unflushed: false }
    }

    /// The client answered: the next ping is due an interval from now.
    fn pong(&mut self) {
        self.awaiting = false;
        self.timer.as_mut().reset(tokio::time::Instant::now() + self.pings.interval);
    }
}

/// How reading ended.
enum Ending {
    /// The client's close frame, or a failure yawc found: yawc has queued
    /// its answering close frame.
    Answered,
    /// A message we refused, or a pong overdue: the close frame we owe.
    Refused(u16, &'static str),
}

impl Socket {
    /// Sends a ping when one is due; true once a pong is overdue (the
    /// client is closed with 1011). Pending writes only delay a ping.
    fn poll_keepalive(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(keepalive) = self.keepalive.as_mut().filter(|_| !self.close_sent) else { return false };
        if keepalive.unflushed && Pin::new(&mut self.frames).poll_flush(cx).is_ready() {
            keepalive.unflushed = false;
        }
        if keepalive.timer.as_mut().poll(cx).is_pending() {
            return false;
        }
        if keepalive.awaiting {
            return true;
        }
        match Pin::new(&mut self.frames).poll_ready(cx) {
            Poll::Ready(Ok(())) => {}
            // A broken connection shows on the next read.
            Poll::Ready(Err(_)) | Poll::Pending => return false,
        }
        if Pin::new(&mut self.frames).start_send(Frame::ping(Bytes::new())).is_err() {
            return false;
        }
        keepalive.unflushed = Pin::new(&mut self.frames).poll_flush(cx).is_pending();
        let wait = match keepalive.pings.timeout {
            Some(timeout) => {
                keepalive.awaiting = true;
                timeout
            }
            None => keepalive.pings.interval,
        };
        keepalive.timer.as_mut().reset(tokio::time::Instant::now() + wait);
        // Registers the new deadline's waker.
        let _ = keepalive.timer.as_mut().poll(cx);
        false
    }

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
        OpCode::Text if std::str::from_utf8(&payload).is_err() => return Err(CloseCode::Invalid.into()),
        OpCode::Text => Message::Text(payload),
        _ => Message::Binary(payload),
    };
    Ok(Some(Incoming::Message(message)))
}

/// The reason given to a client (and the application) whose pong was overdue.
pub const PING_TIMEOUT: &str = "keepalive ping timeout";

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
            if this.poll_keepalive(cx) {
                this.ended = Some(Ending::Refused(INTERNAL_ERROR, PING_TIMEOUT));
                return Poll::Ready(Some(Incoming::Closed(INTERNAL_ERROR, PING_TIMEOUT.to_owned())));
            }
            let assembled = match ready!(this.frames.poll_next_frame(cx)) {
                Ok(frame) if frame.opcode() == OpCode::Pong => {
                    if let Some(keepalive) = this.keepalive.as_mut() {
                        keepalive.pong();
                    }
                    continue;
                }
                Ok(frame) => this.assemble(frame),
                Err(error) => Ok(Some(Incoming::Closed(failure_code(&error), String::new()))),
            };
            let incoming = match assembled {
                Ok(None) => continue,
                Ok(Some(incoming)) => incoming,
                Err(code) => {
                    this.ended = Some(Ending::Refused(code, ""));
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
            Some(Ending::Refused(code, reason)) => {
                ready!(Pin::new(&mut this.frames).poll_ready(cx))?;
                Pin::new(&mut *this).start_send(close_frame(code, reason))?;
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
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
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
        let deadline = this.deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(CLOSE_ANSWER_TIMEOUT)));
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
    waiter: Option<Waiter>,
}

struct Outbox {
    messages: VecDeque<Frame>,
    buffered: usize,
    /// No more sends: a close frame was queued or the peer is gone.
    closed: bool,
    waiter: Option<Waiter>,
}

/// An accepted WebSocket, between the application and its socket task.
pub struct WebSocket {
    inbox: Mutex<Inbox>,
    room: Notify,
    outbox: Mutex<Outbox>,
    ready: Notify,
    events: Arc<EventQueue>,
    /// Received messages held for the application at most.
    max_queue: usize,
}

/// Ends the application's side of a socket whose task ends, however it
/// ends: 1006 unless the task said otherwise first.
struct FinishOnDrop(Arc<WebSocket>);

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        self.0.finish(ABNORMAL_CLOSURE, String::new());
    }
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
    /// Starts the socket task, which takes over the upgraded connection
    /// once hyper hands it over. The task is the server's: its drain waits
    /// for it, shutdown closes the socket (1012), a forced close drops it.
    /// Started before the accepting response is sent, so that the drain
    /// cannot miss it.
    pub fn start(upgrade: OnUpgrade, server: &Arc<ServerShared>, handshake: Handshake) -> Arc<Self> {
        let socket = Arc::new(WebSocket {
            inbox: Mutex::new(Inbox { messages: VecDeque::new(), buffered: 0, closed: None, waiter: None }),
            room: Notify::new(),
            outbox: Mutex::new(Outbox { messages: VecDeque::new(), buffered: 0, closed: false, waiter: None }),
            ready: Notify::new(),
            events: server.events.clone(),
            max_queue: handshake.max_queue,
        });
        let task = socket.clone();
        let shutdown = server.shutdown.clone();
        spawn_tracked(server, async move {
            // Dropped unfinished by a forced close, the task still tells the
            // application (finishing twice changes nothing).
            let finished = FinishOnDrop(task.clone());
            if let Some(stream) = handshake.open(upgrade).await {
                task.run(stream, shutdown).await;
            }
            drop(finished);
        });
        socket
    }

    async fn run(self: Arc<Self>, stream: Socket, shutdown: CancellationToken) {
        let (mut sink, mut source) = stream.split();
        let reading = async {
            loop {
                loop {
                    let room = self.room.notified();
                    tokio::pin!(room);
                    room.as_mut().enable();
                    if self.has_room() {
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
        // Shutdown closes the socket as the application would, and tells
        // the application at once; this never ends by itself.
        let going_away = async {
            shutdown.cancelled().await;
            self.close_for_shutdown();
            std::future::pending::<()>().await
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
            tokio::pin!(going_away);
            tokio::select! {
                closed = reading => closed,
                () = &mut going_away => unreachable!("shutdown only queues a close frame"),
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

    /// Whether the inbox may take another message: under both its size and
    /// its count bound.
    fn has_room(&self) -> bool {
        let inbox = self.inbox.lock();
        inbox.buffered < INBOX_HIGH_WATER && inbox.messages.len() < self.max_queue
    }

    /// The server shuts down: the client gets a close frame with 1012 after
    /// what the application already queued, and the application's receive
    /// 1012 once it has taken the messages that came before.
    fn close_for_shutdown(&self) {
        {
            let mut inbox = self.inbox.lock();
            inbox.closed.get_or_insert((SERVICE_RESTART, String::new()));
            if let Some(waiter) = inbox.waiter.take() {
                self.events.push(Event::Wake(waiter));
            }
        }
        self.send(close_frame(SERVICE_RESTART, ""), || unreachable!("a close frame never waits"));
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

    pub fn recv(&self, waiter: impl FnOnce() -> Waiter) -> Received {
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
    pub fn send(&self, frame: Frame, waiter: impl FnOnce() -> Waiter) -> Sent {
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

/// Runs a socket's task as one of the server's: the drain waits for it, and
/// a forced close drops it (and its connection) at once.
pub fn spawn_tracked(server: &ServerShared, task: impl Future<Output = ()> + Send + 'static) {
    let force = server.force.clone();
    let task = async move {
        force.run_until_cancelled(task).await;
    };
    server.tasks.spawn_on(task, crate::runtime::runtime().handle());
}
