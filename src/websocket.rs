//! WebSocket (RFC 6455, tungstenite) over a hyper upgrade: HTTP/1.1
//! `Upgrade: websocket` (101) and HTTP/2 extended CONNECT (RFC 8441, 200).
//! Messages in and out go through bounded buffers, so a slow side makes the
//! other wait instead of filling memory.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{
    CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::{HeaderMap, HeaderValue, Method, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use pyo3::prelude::*;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::boundary::queue::{Event, EventQueue};

/// Received messages buffered ahead of the application.
const INBOX_HIGH_WATER: usize = 1024 * 1024;
/// Outgoing messages the application may queue before it must wait.
const OUTBOX_HIGH_WATER: usize = 1024 * 1024;
/// 1006: the connection ended without a close frame.
const ABNORMAL_CLOSURE: u16 = 1006;

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

/// The status and headers that accept the upgrade.
pub fn accept_head(
    version: Version,
    request_headers: &HeaderMap,
    headers: &mut HeaderMap,
) -> StatusCode {
    if version == Version::HTTP_2 {
        return StatusCode::OK;
    }
    let key = request_headers
        .get(SEC_WEBSOCKET_KEY)
        .map(|k| k.as_bytes())
        .unwrap_or_default();
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key);
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(
        SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
    );
    StatusCode::SWITCHING_PROTOCOLS
}

/// One message as the application sees it.
pub enum Received {
    Text(String),
    Binary(Bytes),
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
    messages: VecDeque<Message>,
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
    pub fn start(
        upgrade: OnUpgrade,
        events: Arc<EventQueue>,
        max_message_size: usize,
    ) -> Arc<Self> {
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
            let Ok(upgraded) = upgrade.await else {
                task.finish(ABNORMAL_CLOSURE, String::new());
                return;
            };
            let config = WebSocketConfig::default()
                .max_message_size(Some(max_message_size))
                .max_frame_size(Some(max_message_size));
            let stream = WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                Role::Server,
                Some(config),
            )
            .await;
            task.run(stream).await;
        });
        socket
    }

    async fn run<S>(self: Arc<Self>, stream: WebSocketStream<S>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
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
                match source.next().await {
                    Some(Ok(Message::Close(frame))) => {
                        let (code, reason) = frame.map_or((1005, String::new()), |f| {
                            (f.code.into(), f.reason.to_string())
                        });
                        return (code, reason);
                    }
                    Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                        self.receive(message)
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return (ABNORMAL_CLOSURE, String::new()),
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
                        Some(message) => {
                            let closing = matches!(message, Message::Close(_));
                            if sink.send(message).await.is_err() || closing {
                                return;
                            }
                        }
                        None if self.outbox.lock().closed => return,
                        None => ready.await,
                    }
                }
            };
            tokio::pin!(writing);
            let (code, reason) = tokio::select! {
                closed = reading => closed,
                _ = &mut writing => {
                    // We sent a close frame: wait (briefly) for the client's.
                    let answer = tokio::time::timeout(std::time::Duration::from_secs(5), source.next()).await;
                    match answer {
                        Ok(Some(Ok(Message::Close(frame)))) => frame.map_or((1005, String::new()), |f| (f.code.into(), f.reason.to_string())),
                        _ => (ABNORMAL_CLOSURE, String::new()),
                    }
                }
            };
            (code, reason)
        };
        let _ = sink.close().await;
        self.finish(code, reason);
    }

    fn receive(&self, message: Message) {
        let mut inbox = self.inbox.lock();
        inbox.buffered += message.len();
        inbox.messages.push_back(message);
        if let Some(waiter) = inbox.waiter.take() {
            self.events.push(Event::Wake(waiter));
        }
    }

    fn next_outgoing(&self) -> Option<Message> {
        let mut outbox = self.outbox.lock();
        let message = outbox.messages.pop_front()?;
        outbox.buffered -= message.len();
        if outbox.buffered <= OUTBOX_HIGH_WATER / 2 {
            if let Some(waiter) = outbox.waiter.take() {
                self.events.push(Event::Wake(waiter));
            }
        }
        Some(message)
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
            return match message {
                Message::Text(text) => Received::Text(text.to_string()),
                Message::Binary(data) => Received::Binary(data),
                _ => unreachable!("only data messages are queued"),
            };
        }
        if let Some((code, reason)) = &inbox.closed {
            return Received::Closed(*code, reason.clone());
        }
        inbox.waiter = Some(waiter());
        Received::Pending
    }

    /// Queues a message; a close frame never waits (its `waiter` is unused).
    pub fn send(&self, message: Message, waiter: impl FnOnce() -> Py<PyAny>) -> Sent {
        let mut outbox = self.outbox.lock();
        if outbox.closed {
            return Sent::Closed;
        }
        let closing = matches!(message, Message::Close(_));
        outbox.closed = closing;
        outbox.buffered += message.len();
        outbox.messages.push_back(message);
        self.ready.notify_one();
        if outbox.buffered > OUTBOX_HIGH_WATER && !closing {
            outbox.waiter = Some(waiter());
            Sent::Wait
        } else {
            Sent::Queued
        }
    }

    pub fn close_message(code: u16, reason: &str) -> Message {
        Message::Close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        }))
    }

    /// Whether the close handshake has finished (or the socket died).
    pub fn closed_code(&self) -> Option<u16> {
        self.inbox.lock().closed.as_ref().map(|(code, _)| *code)
    }
}
