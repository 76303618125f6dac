//! One request/response exchange as the application sees it, whatever the
//! protocol underneath: head, body reader, and the way back to the client.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};

use http::request::Parts;
use http::Response;
use hyper::upgrade::OnUpgrade;
use parking_lot::Mutex;
use rustls::pki_types::CertificateDer;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::body::{BodyEnd, RequestBody, ResponseBody, ResponseStream};
use crate::boundary::queue::{Event, EventQueue, Waiter};
use crate::server::ServerShared;
use crate::websocket::{Handshake, WebSocket};

/// What a connection knows about itself, shared by its requests.
pub struct ConnInfo {
    pub addresses: Addresses,
    pub tls: bool,
    pub peer_certificate: Option<CertificateDer<'static>>,
}

/// Where a connection comes from and arrives.
pub enum Addresses {
    /// TCP or QUIC.
    Ip { peer: SocketAddr, local: SocketAddr },
    /// A Unix domain socket: the server is known by the socket's path; the
    /// client has no address worth naming (ASGI's `client` is None) unless a
    /// PROXY protocol header gave one.
    Unix { path: Arc<str>, client: Option<SocketAddr> },
}

impl Addresses {
    /// The client's IP and port; None over a Unix socket without a PROXY
    /// protocol header. IPv4 clients of a dual-stack socket appear as IPv4,
    /// not as `::ffff:a.b.c.d`.
    pub fn remote(&self) -> Option<(String, u16)> {
        let client = match self {
            Addresses::Ip { peer, .. } => peer,
            Addresses::Unix { client, .. } => client.as_ref()?,
        };
        Some((ip_text(client.ip()), client.port()))
    }

    /// " from IP:port" for a log line; nothing for a Unix socket peer.
    pub fn peer_note(&self) -> String {
        self.remote().map_or_else(String::new, |(ip, port)| format!(" from {ip}:{port}"))
    }

    /// The server's IP and port, or a Unix socket's path and no port (ASGI's
    /// `server = [path, None]`).
    pub fn local(&self) -> (String, Option<u16>) {
        match self {
            Addresses::Ip { local, .. } => (ip_text(local.ip()), Some(local.port())),
            Addresses::Unix { path, .. } => (path.to_string(), None),
        }
    }
}

/// An address as text, an IPv4 one mapped into IPv6 as IPv4. IPv4 is
/// written without `fmt`'s machinery, which costs more than the rest of
/// the work: an ASGI scope names two addresses per request.
fn ip_text(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let mut text = String::with_capacity(15);
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    text.push('.');
                }
                if octet >= 100 {
                    text.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    text.push(char::from(b'0' + octet / 10 % 10));
                }
                text.push(char::from(b'0' + octet % 10));
            }
            text
        }
        v6 => v6.to_string(),
    }
}

/// Why the response could not be handed over.
#[derive(Debug, PartialEq)]
pub enum SendError {
    /// A response head was already sent for this exchange.
    AlreadySent,
    /// The client is gone (or the exchange was answered natively, e.g. 413).
    PeerGone,
}

/// Where the response stands.
enum Responder {
    Waiting(oneshot::Sender<Response<ResponseBody>>),
    Sent,
    Gone,
}

pub struct Exchange {
    pub head: Parts,
    pub conn: Arc<ConnInfo>,
    pub body: Arc<RequestBody>,
    responder: Mutex<Responder>,
    stream: Mutex<Option<Arc<ResponseStream>>>,
    /// Fires when nobody can use the request body any more.
    pub over: CancellationToken,
    /// A Python future to resolve when the client goes away (ASGI's
    /// `http.disconnect`).
    disconnect_waiter: Mutex<Option<Waiter>>,
    events: Arc<EventQueue>,
    /// For a WebSocket request: hyper's handle on the upgraded connection,
    /// until the application accepts.
    upgrade: Mutex<Option<OnUpgrade>>,
    websocket: OnceLock<Arc<WebSocket>>,
}

impl Exchange {
    pub fn new(
        head: Parts,
        conn: Arc<ConnInfo>,
        body: Arc<RequestBody>,
        responder: oneshot::Sender<Response<ResponseBody>>,
        events: Arc<EventQueue>,
    ) -> Self {
        Exchange {
            head,
            conn,
            body,
            responder: Mutex::new(Responder::Waiting(responder)),
            stream: Mutex::new(None),
            over: CancellationToken::new(),
            disconnect_waiter: Mutex::new(None),
            events,
            upgrade: Mutex::new(None),
            websocket: OnceLock::new(),
        }
    }

    /// Marks the exchange as a WebSocket request.
    pub fn set_upgrade(&self, upgrade: OnUpgrade) {
        *self.upgrade.lock() = Some(upgrade);
    }

    pub fn wants_websocket(&self) -> bool {
        self.upgrade.lock().is_some() || self.websocket.get().is_some()
    }

    /// Starts the WebSocket and sends the accepting response; None when
    /// this is not a WebSocket request, it was already accepted or answered,
    /// or the client left (the socket then ends at once, 1006).
    pub fn accept_websocket(
        &self,
        response: Response<ResponseBody>,
        handshake: Handshake,
        server: &Arc<ServerShared>,
    ) -> Option<Arc<WebSocket>> {
        if self.head_sent() {
            return None;
        }
        let upgrade = self.upgrade.lock().take()?;
        let socket = WebSocket::start(upgrade, server, handshake);
        self.websocket.set(socket.clone()).ok()?;
        self.send(response).ok()?;
        Some(socket)
    }

    pub fn websocket(&self) -> Option<&Arc<WebSocket>> {
        self.websocket.get()
    }

    /// Parks `waiter` until the client goes away; false if it already has.
    pub fn watch_disconnect(&self, waiter: impl FnOnce() -> Waiter) -> bool {
        if matches!(*self.responder.lock(), Responder::Gone) {
            return false;
        }
        *self.disconnect_waiter.lock() = Some(waiter());
        true
    }

    /// Hands the response head (and a full or streamed body) to hyper.
    pub fn send(&self, response: Response<ResponseBody>) -> Result<(), SendError> {
        let mut state = self.responder.lock();
        match std::mem::replace(&mut *state, Responder::Sent) {
            Responder::Waiting(responder) => responder.send(response).map_err(|_| {
                *state = Responder::Gone;
                SendError::PeerGone
            }),
            Responder::Sent => Err(SendError::AlreadySent),
            Responder::Gone => {
                *state = Responder::Gone;
                Err(SendError::PeerGone)
            }
        }
    }

    pub fn set_stream(&self, stream: Arc<ResponseStream>) {
        *self.stream.lock() = Some(stream);
    }

    pub fn stream(&self) -> Option<Arc<ResponseStream>> {
        self.stream.lock().clone()
    }

    pub fn head_sent(&self) -> bool {
        matches!(*self.responder.lock(), Responder::Sent)
    }

    /// The protocol side gave up on this exchange (client gone, or the
    /// request refused natively): wake whoever waits on it.
    pub fn abandon(&self) {
        *self.responder.lock() = Responder::Gone;
        if let Some(waiter) = self.disconnect_waiter.lock().take() {
            self.events.push(Event::Wake(waiter));
        }
        self.body.finish(BodyEnd::Disconnected);
        self.over.cancel();
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.over.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_text_writes_what_display_writes() {
        for ip in
            ["0.0.0.0", "127.0.0.1", "10.20.30.40", "100.9.99.255", "255.255.255.255", "::1", "2001:db8::8a2e:370:7334"]
        {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_text(ip), ip.to_string());
        }
        for octet in 0..=255u8 {
            let ip = IpAddr::from([octet, 255 - octet, octet / 3, 7]);
            assert_eq!(ip_text(ip), ip.to_string());
        }
        assert_eq!(ip_text("::ffff:192.0.2.1".parse().unwrap()), "192.0.2.1");
    }
}
