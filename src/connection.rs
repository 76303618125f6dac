//! One accepted connection (TCP or Unix socket): optional TLS handshake, then HTTP/1.1 or
//! HTTP/2 through hyper-util's auto builder, closed gracefully on shutdown or
//! when idle, and aborted on a forced close.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::server::conn::auto;
use std::future::Future;
use hyper_util::rt::TokioIo;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::config::seconds;
use crate::exchange::{Addresses, ConnInfo};
use crate::h1_guard::H1Guard;
use crate::server::{Protocols, ServerShared};
use crate::service;

/// Per-connection state shared by the connection task and its requests.
pub struct Connection {
    pub server: Arc<ServerShared>,
    pub info: Arc<ConnInfo>,
    in_flight: AtomicUsize,
    /// Whether any request has started: until one does, the connection lives
    /// only `header_read_timeout` (hyper's own timer starts later than the
    /// HTTP/1-or-2 detection, which has none).
    started: AtomicBool,
    /// Milliseconds since `server.epoch` of the last byte read or written.
    last_activity: AtomicU64,
    /// Set by the first HTTP/2 request: writes are then coalesced (`Tracked`).
    multiplexed: AtomicBool,
}

impl Connection {
    fn touch(&self) {
        let now = self.server.epoch.elapsed().as_millis() as u64;
        self.last_activity.store(now, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = self.last_activity.load(Ordering::Relaxed);
        let now = self.server.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(last))
    }

    pub fn new(server: Arc<ServerShared>, info: ConnInfo) -> Arc<Self> {
        let conn = Arc::new(Connection {
            server,
            info: Arc::new(info),
            in_flight: AtomicUsize::new(0),
            started: AtomicBool::new(false),
            last_activity: AtomicU64::new(0),
            multiplexed: AtomicBool::new(false),
        });
        conn.touch();
        conn
    }

    /// The connection carries many streams at once (HTTP/2).
    pub fn set_multiplexed(&self) {
        self.multiplexed.store(true, Ordering::Relaxed);
    }

    /// Counts a request as in flight until the returned guard drops.
    pub fn begin_request(self: &Arc<Self>) -> InFlight {
        self.started.store(true, Ordering::Relaxed);
        if self.in_flight.fetch_add(1, Ordering::AcqRel) == 0 {
            self.server.stats.active.fetch_add(1, Ordering::Relaxed);
        }
        InFlight(self.clone())
    }
}

pub struct InFlight(Arc<Connection>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.server.stats.active.fetch_sub(1, Ordering::Relaxed);
        }
        self.0.touch();
    }
}

/// Serves one accepted socket until it closes; `permit` holds its place under
/// `max_connections`.
pub async fn serve<S>(stream: S, addresses: Addresses, server: Arc<ServerShared>, permit: OwnedSemaphorePermit)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let _permit = permit;
    let counter = server.clone();
    let _counted = counter.stats.open();
    match server.tls.clone() {
        None => {
            let info = ConnInfo { addresses, tls: false, peer_certificate: None };
            let guarded = H1Guard::new(stream, server.config.max_header_size);
            run(guarded, info, server).await;
        }
        Some(acceptor) => {
            let handshake = tokio::time::timeout(server.handshake_timeout, acceptor.accept(stream));
            let stream = tokio::select! {
                result = handshake => match result {
                    Ok(Ok(stream)) => stream,
                    _ => return,
                },
                _ = server.force.cancelled() => return,
            };
            let peer_certificate =
                stream.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.clone().into_owned());
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            let info = ConnInfo { addresses, tls: true, peer_certificate };
            if h2 {
                run(stream, info, server).await;
            } else {
                let guarded = H1Guard::new(stream, server.config.max_header_size);
                run(guarded, info, server).await;
            }
        }
    }
}

async fn run<S>(stream: S, info: ConnInfo, server: Arc<ServerShared>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = Connection::new(server.clone(), info);
    let io = Tracked { inner: TokioIo::new(stream), conn: conn.clone(), write_put_off: false };
    let handler = conn.clone();
    let service = service_fn(move |request| service::handle(request, handler.clone()));
    match &server.protocols {
        Protocols::Auto(builder) => drive(builder.serve_connection_with_upgrades(io, service), &conn).await,
        Protocols::Http1(builder) => drive(builder.serve_connection(io, service).with_upgrades(), &conn).await,
    }
}

/// A hyper connection that can be asked to finish its current exchanges and
/// close (HTTP/1: after the response in flight; HTTP/2: GOAWAY).
trait Graceful: Future {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S, E, B> Graceful for auto::UpgradeableConnection<'_, I, S, E>
where
    Self: Future,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: Read + Write + Unpin + Send + 'static,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        auto::UpgradeableConnection::graceful_shutdown(self)
    }
}

impl<I, S, B> Graceful for http1::UpgradeableConnection<I, S>
where
    Self: Future,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: Read + Write + Unpin + Send + 'static,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        http1::UpgradeableConnection::graceful_shutdown(self)
    }
}

/// Runs a connection until it ends, asking it to close gracefully on server
/// shutdown or when idle, and dropping it on a forced close.
async fn drive<C: Graceful>(http: C, conn: &Connection) {
    let server = &conn.server;
    tokio::pin!(http);
    let first_head = async {
        match seconds(server.config.header_read_timeout) {
            Some(limit) => tokio::time::sleep(limit).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(first_head);
    let mut closing = None;
    loop {
        tokio::select! {
            _ = http.as_mut() => break,
            _ = server.force.cancelled() => break,
            _ = first_head.as_mut(), if !conn.started.load(Ordering::Relaxed) => {
                if !conn.started.load(Ordering::Relaxed) {
                    break;
                }
            }
            _ = server.shutdown.cancelled(), if closing.is_none() => {
                http.as_mut().graceful_shutdown();
                closing = Some(server.stats.closing());
            }
            _ = idle(conn), if closing.is_none() => {
                http.as_mut().graceful_shutdown();
                closing = Some(server.stats.closing());
            }
        }
    }
}

/// Resolves once the connection has had no request in flight and no traffic
/// for the server's current `idle_timeout`.
async fn idle(conn: &Connection) {
    loop {
        let Some(timeout) = conn.server.idle_timeout() else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let idle_for = conn.idle_for();
        if conn.in_flight.load(Ordering::Acquire) == 0 && idle_for >= timeout {
            return;
        }
        let wait = timeout.saturating_sub(idle_for).max(Duration::from_millis(50));
        tokio::time::sleep_until(Instant::now() + wait).await;
    }
}

/// The connection's socket, noting the time of every read and write so idle
/// connections can be closed.
///
/// On HTTP/2 each write is put off by one turn of the scheduler: the streams
/// whose responses became ready meanwhile (a batch answered by the
/// application) then go out in the same writev. Without it, tokio ran the
/// connection task right after each stream task that woke it, and wrote one
/// response per system call.
struct Tracked<S> {
    inner: TokioIo<S>,
    conn: Arc<Connection>,
    write_put_off: bool,
}

impl<S> Tracked<S> {
    /// True (and the task rescheduled behind the tasks already queued) when
    /// this write should wait for one turn.
    fn put_off(&mut self, cx: &Context<'_>) -> bool {
        if self.write_put_off || !self.conn.multiplexed.load(Ordering::Relaxed) {
            self.write_put_off = false;
            return false;
        }
        self.write_put_off = true;
        cx.waker().wake_by_ref();
        true
    }
}

impl<S> Read for Tracked<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if poll.is_ready() {
            self.conn.touch();
        }
        poll
    }
}

impl<S> Write for Tracked<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.put_off(cx) {
            return Poll::Pending;
        }
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if poll.is_ready() {
            self.conn.touch();
        }
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.put_off(cx) {
            return Poll::Pending;
        }
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if poll.is_ready() {
            self.conn.touch();
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
