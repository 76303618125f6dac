//! HTTP/3: a QUIC endpoint (quinn) on the UDP port of each TCP listener,
//! with the TCP certificate and ALPN `h3`, serving requests through h3 into
//! the same service as HTTP/1.1 and HTTP/2.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::FutureExt;
use h3::server::RequestStream;
use http::header::{HeaderName, CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderValue, Request, Response, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use quinn::crypto::rustls::QuicServerConfig;
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::seconds;
use crate::connection::Connection;
use crate::exchange::{Addresses, ConnInfo};
use crate::guard::{self, h3::Guarded};
use crate::server::ServerShared;
use crate::service;

/// H3_NO_ERROR: how a connection is closed once it has drained.
const H3_NO_ERROR: u32 = 0x100;

/// Binds one QUIC endpoint per address, on the same ports as TCP.
pub fn bind(
    addresses: &[SocketAddr],
    tls: &rustls::ServerConfig,
    shared: &ServerShared,
) -> io::Result<Vec<quinn::Endpoint>> {
    let mut crypto = tls.clone();
    crypto.alpn_protocols = vec![b"h3".to_vec()];
    crypto.max_early_data_size = if shared.config.http3_early_data { u32::MAX } else { 0 };
    let crypto = quic_crypto(crypto)?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(shared.config.max_concurrent_streams.into())
        .max_concurrent_uni_streams(100u32.into())
        .max_idle_timeout(
            seconds(shared.config.idle_timeout)
                .map(|d| d.min(Duration::from_secs(600)))
                .and_then(|d| quinn::IdleTimeout::try_from(d).ok()),
        );
    server_config.transport_config(Arc::new(transport));
    let runtime = quinn::default_runtime().ok_or_else(|| io::Error::other("no async runtime for QUIC"))?;
    addresses
        .iter()
        .map(|addr| {
            let socket = udp_socket(*addr, shared.config.v6_only, shared.config.shared)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot bind HTTP/3 (UDP) on {addr}: {e}")))?;
            quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(server_config.clone()), socket, runtime.clone())
        })
        .collect()
}

/// QUIC protects its Initial packets with TLS13_AES_128_GCM_SHA256 (RFC
/// 9001 section 5.2) whichever suites are left to negotiate; it needs one of
/// TLS 1.3's among them.
fn quic_crypto(crypto: rustls::ServerConfig) -> io::Result<QuicServerConfig> {
    if !crypto.crypto_provider().cipher_suites.iter().any(|suite| suite.tls13().is_some()) {
        return Err(io::Error::other("HTTP/3 needs a TLS 1.3 cipher suite, and none of those given is one"));
    }
    let initial = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .and_then(|suite| suite.quic_suite())
        .ok_or_else(|| io::Error::other("no QUIC initial cipher suite"))?;
    QuicServerConfig::with_initial(Arc::new(crypto), initial).map_err(io::Error::other)
}

fn udp_socket(addr: SocketAddr, v6_only: bool, shared: bool) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(v6_only)?;
    }
    if shared {
        socket.set_reuse_address(true)?;
        #[cfg(all(unix, not(any(target_os = "solaris", target_os = "illumos"))))]
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Accepts QUIC connections until shutdown, then lets them drain.
pub async fn accept_loop(endpoint: quinn::Endpoint, server: Arc<ServerShared>) {
    loop {
        let incoming = tokio::select! {
            biased;
            _ = server.shutdown.cancelled() => break,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { break };
        let local = endpoint
            .local_addr()
            .unwrap_or_else(|_| incoming.local_ip().map_or(incoming.remote_address(), |ip| SocketAddr::new(ip, 0)));
        server.tasks.spawn(serve_connection(incoming, local, server.clone()));
    }
    // New handshakes are refused; established connections finish on their own.
    endpoint.set_server_config(None);
    tokio::select! {
        _ = endpoint.wait_idle() => {}
        _ = server.force.cancelled() => endpoint.close(0u32.into(), b"server closed"),
    }
}

async fn serve_connection(incoming: quinn::Incoming, local: SocketAddr, server: Arc<ServerShared>) {
    let _counted = server.stats.open();
    let Some((quic, mut handshake)) = establish(incoming, &server).await else { return };
    let _bytes = server.metrics.count_quic(quic.clone());
    let peer_certificate = quic
        .peer_identity()
        .and_then(|identity| identity.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().cloned());
    let info =
        ConnInfo { addresses: Addresses::Ip { peer: quic.remote_address(), local }, tls: true, peer_certificate };
    let conn = Connection::new(server.clone(), info);
    let mut builder = h3::server::builder();
    builder.max_field_section_size(server.config.max_header_size as u64);
    let guarded = Guarded::new(h3_quinn::Connection::new(quic.clone()), server.config.max_header_size);
    let Ok(mut h3) = builder.build(guarded).await else { return };
    let requests = tokio_util::task::TaskTracker::new();
    let shutting_down = loop {
        tokio::select! {
            accepted = h3.accept() => match accepted {
                Ok(Some(resolver)) => {
                    let conn = conn.clone();
                    // quinn's own test (`RecvStream::is_0rtt`): the stream was
                    // accepted before the handshake completed.
                    let early = handshake.as_mut().is_some_and(|confirmed| confirmed.now_or_never().is_none());
                    if !early {
                        handshake = None;
                    }
                    requests.spawn(async move {
                        if let Ok((mut request, stream)) = resolver.resolve_request().await {
                            if early {
                                // RFC 8470: the application may answer 425.
                                request.headers_mut().insert("early-data", HeaderValue::from_static("1"));
                            }
                            serve_request(request, stream, conn).await;
                        }
                    });
                }
                _ => break false,
            },
            _ = server.shutdown.cancelled() => {
                // GOAWAY: requests already accepted are still answered, then
                // the connection closes (below) without waiting for the client.
                let _ = h3.shutdown(0).await;
                break true;
            }
            _ = server.force.cancelled() => {
                quic.close(0u32.into(), b"server closed");
                return;
            }
        }
    };
    let _draining = shutting_down.then(|| server.stats.closing());
    requests.close();
    tokio::select! {
        _ = async {
            requests.wait().await;
            // Closing drops unsent stream data: give the last responses a few
            // round trips to be delivered (or the client time to close).
            let linger = (quic.rtt() * 3).clamp(Duration::from_millis(50), Duration::from_secs(2));
            let _ = tokio::time::timeout(linger, quic.closed()).await;
        } => quic.close(H3_NO_ERROR.into(), b""),
        _ = server.force.cancelled() => quic.close(0u32.into(), b"server closed"),
    }
}

/// Completes the handshake. With 0-RTT on, the connection is used at once,
/// with the future that resolves once the handshake completes.
async fn establish(
    incoming: quinn::Incoming,
    server: &ServerShared,
) -> Option<(quinn::Connection, Option<quinn::ZeroRttAccepted>)> {
    let connecting = incoming.accept().ok()?;
    let connecting = if server.config.http3_early_data {
        match connecting.into_0rtt() {
            Ok((quic, confirmed)) => return Some((quic, Some(confirmed))),
            Err(connecting) => connecting,
        }
    } else {
        connecting
    };
    tokio::select! {
        result = tokio::time::timeout(server.handshake_timeout, connecting) => Some((result.ok()?.ok()?, None)),
        _ = server.force.cancelled() => None,
    }
}

type Stream = RequestStream<guard::h3::RequestStream<h3_quinn::BidiStream<Bytes>>, Bytes>;

async fn serve_request(request: Request<()>, stream: Stream, conn: Arc<Connection>) {
    let (mut send, recv) = stream.split();
    let (mut parts, ()) = request.into_parts();
    parts.version = Version::HTTP_3;
    let date_header = conn.server.config.date_header;
    let Ok(response) = service::handle(Request::from_parts(parts, H3Body::new(recv)), conn).await;
    let (mut head, mut body) = response.into_parts();
    // Connection-specific headers are malformed in HTTP/3 (RFC 9114 4.2).
    for name in [
        CONNECTION,
        TRANSFER_ENCODING,
        UPGRADE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        head.headers.remove(name);
    }
    if let Some(length) = body.size_hint().exact() {
        head.headers.entry(CONTENT_LENGTH).or_insert_with(|| HeaderValue::from(length));
    }
    if date_header {
        head.headers.entry(DATE).or_insert_with(|| {
            HeaderValue::from_str(&httpdate::fmt_http_date(std::time::SystemTime::now()))
                .expect("an HTTP date is a valid header value")
        });
    }
    if send.send_response(Response::from_parts(head, ())).await.is_err() {
        return;
    }
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            // The application aborted: reset rather than end cleanly.
            send.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
            return;
        };
        if let Ok(data) = frame.into_data() {
            if send.send_data(data).await.is_err() {
                return;
            }
        }
    }
    let _ = send.finish().await;
}

type RecvStream = RequestStream<guard::h3::RequestStream<h3_quinn::RecvStream>, Bytes>;

/// The request body of an HTTP/3 stream, as an `http_body::Body`.
struct H3Body {
    stream: RecvStream,
    /// What the stream gave when the request came, not handed on yet.
    peeked: Option<Result<Bytes, h3::error::StreamError>>,
    ended: bool,
}

impl H3Body {
    /// Reads what has already arrived. HTTP/3 has no flag for a request
    /// without a body (HTTP/2's END_STREAM), but the stream's end usually
    /// comes with the head: known at once, it spares the service waiting
    /// for a body that will never come.
    fn new(stream: RecvStream) -> Self {
        let mut body = H3Body { stream, peeked: None, ended: false };
        if let Poll::Ready(Some(first)) = body.read(&mut Context::from_waker(Waker::noop())) {
            body.peeked = Some(first);
        }
        body
    }

    fn read(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, h3::error::StreamError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match self.stream.poll_recv_data(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(mut data))) => Poll::Ready(Some(Ok(data.copy_to_bytes(data.remaining())))),
            Poll::Ready(Ok(None)) => {
                self.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Err(error)) => Poll::Ready(Some(Err(error))),
        }
    }
}

impl Body for H3Body {
    type Data = Bytes;
    type Error = h3::error::StreamError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let next = match self.peeked.take() {
            Some(first) => Poll::Ready(Some(first)),
            None => self.read(cx),
        };
        next.map(|frame| frame.map(|result| result.map(Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.peeked.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        if self.is_end_stream() {
            SizeHint::with_exact(0)
        } else {
            SizeHint::default()
        }
    }
}

/// `Alt-Svc` for TCP responses: where the same server answers over HTTP/3.
pub fn alt_svc(port: u16, max_age: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("h3=\":{port}\"; ma={max_age}")).expect("Alt-Svc is ASCII")
}
