//! One accepted connection (TCP or Unix socket): its PROXY protocol header when
//! one is expected, optional TLS handshake, then HTTP/1.1 or
//! HTTP/2 through hyper-util's auto builder, closed gracefully on shutdown or
//! when idle, and aborted on a forced close. An HTTP/1.1 connection quiet
//! between requests is parked: hyper's state and buffers for it are dropped,
//! and built anew when the client sends again.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures_util::task::AtomicWaker;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use std::future::Future;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::body::ResponseBody;
use crate::config::seconds;
use crate::exchange::{Addresses, ConnInfo};
use crate::guard::{Guard, PendingHead};
use crate::log;
use crate::server::{Protocols, ServerShared};
use crate::service;

/// Per-connection state shared by the connection task and its requests.
pub struct Connection {
    pub server: Arc<ServerShared>,
    pub info: Arc<ConnInfo>,
    in_flight: AtomicUsize,
    /// Whether a request has begun on this connection.
    begun: AtomicBool,
    /// The request head being awaited, for `header_read_timeout`.
    pub head: Arc<PendingHead>,
    /// Whether a byte was read or written since the idle check last looked: a
    /// flag, so that I/O never reads the clock.
    active: AtomicBool,
    /// Set by the first HTTP/2 request: writes are then coalesced (`Tracked`).
    multiplexed: AtomicBool,
    /// Requests whose response hyper has not yet finished (dropped its body).
    exchanges: AtomicUsize,
    /// hyper waits for the next HTTP/1 request with nothing left to write
    /// (`Tracked` keeps this up to date).
    parkable: AtomicBool,
}

impl Connection {
    fn touch(&self) {
        self.active.store(true, Ordering::Relaxed);
    }

    pub fn new(server: Arc<ServerShared>, info: ConnInfo) -> Arc<Self> {
        Arc::new(Connection {
            server,
            info: Arc::new(info),
            in_flight: AtomicUsize::new(0),
            begun: AtomicBool::new(false),
            head: Arc::new(PendingHead::new()),
            active: AtomicBool::new(false),
            multiplexed: AtomicBool::new(false),
            exchanges: AtomicUsize::new(0),
            parkable: AtomicBool::new(false),
        })
    }

    /// hyper holds nothing of this connection that a new hyper connection
    /// would not start with.
    fn may_park(&self) -> bool {
        self.parkable.load(Ordering::Relaxed) && self.exchanges.load(Ordering::Acquire) == 0
    }

    /// The connection carries many streams at once (HTTP/2).
    pub fn set_multiplexed(&self) {
        self.multiplexed.store(true, Ordering::Relaxed);
    }

    /// Counts a request as in flight until the returned guard drops.
    pub fn begin_request(self: &Arc<Self>) -> InFlight {
        if !self.begun.load(Ordering::Relaxed) {
            self.begun.store(true, Ordering::Release);
        }
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
    let _freed = ReturnFreed;
    let _permit = permit;
    let stream = crate::metrics::Counted::new(stream, server.metrics.clone());
    let Some((stream, addresses)) = crate::proxy_protocol::accept(stream, addresses, &server).await else { return };
    let counter = server.clone();
    let _counted = counter.stats.open();
    let max_head = server.config.max_header_size;
    let h2_limits = crate::guard::H2Limits {
        max_head: server.config.http2_header_list_limit(),
        max_frame: server.config.http2_max_frame_size as usize,
    };
    let log = server.log;
    match server.tls.clone() {
        None => {
            let conn = Connection::new(server, ConnInfo { addresses, tls: false, peer_certificate: None });
            run(Guard::http1(stream, max_head, h2_limits, conn.head.clone(), log), conn).await;
        }
        Some(acceptor) => {
            // Boxed: inline, the handshake's state made every connection's task larger.
            let handshake = tokio::time::timeout(server.handshake_timeout, Box::pin(acceptor.accept(stream)));
            let stream = tokio::select! {
                result = handshake => match result {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => return handshake_failed(&server, &addresses, &error),
                    Err(_) => return handshake_failed(&server, &addresses, &"timed out"),
                },
                _ = server.force.cancelled() => return,
            };
            let peer_certificate =
                stream.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.clone().into_owned());
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            let conn = Connection::new(server, ConnInfo { addresses, tls: true, peer_certificate });
            if h2 {
                run(Guard::http2(stream, h2_limits, log), conn).await;
            } else {
                run(Guard::http1(stream, max_head, h2_limits, conn.head.clone(), log), conn).await;
            }
        }
    }
}

/// Dropped last when a connection ends, after everything it held: what it
/// freed goes back to the OS within about a second. Without it a server whose
/// HTTP/2 connections had closed kept their memory until it next allocated.
struct ReturnFreed;

impl Drop for ReturnFreed {
    fn drop(&mut self) {
        crate::runtime::return_freed_memory();
    }
}

/// TLS handshakes fail all day on a public port (scanners, old clients):
/// worth a debug line, no more.
fn handshake_failed(server: &ServerShared, addresses: &Addresses, why: &dyn std::fmt::Display) {
    let report = format!("TLS handshake{} failed: {why}", addresses.peer_note());
    server.metrics.connection_errored();
    server.log.report(log::Kind::TlsHandshake, log::Level::Debug, report);
}

/// How long an HTTP/1.1 connection stays quiet between requests before it is
/// parked. Under load a connection is never quiet this long, so hyper's
/// connection is built once per connection there, not once per request.
const PARK_AFTER: Duration = Duration::from_secs(1);

/// Serves a connection with hyper until it ends. Boxed, and the stream boxed
/// apart, so that the connection's task holds neither.
fn run<S>(stream: Guard<S>, conn: Arc<Connection>) -> Pin<Box<dyn Future<Output = ()> + Send>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    Box::pin(serve_http(Box::new(stream), conn))
}

async fn serve_http<S>(stream: Box<Guard<S>>, conn: Arc<Connection>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let home = Home::default();
    let io = Tracked::new(stream, conn.clone(), home.clone());
    let service = |conn: &Arc<Connection>| {
        let conn = conn.clone();
        service_fn(move |request| exchange(request, &conn))
    };
    // Boxed, so that a parked connection holds no hyper state.
    let mut parked = match &conn.server.protocols {
        Protocols::Auto(builder, _) => {
            drive(Box::pin(builder.serve_connection_with_upgrades(io, service(&conn))), &conn).await
        }
        Protocols::Http1(builder) => {
            drive(Box::pin(builder.serve_connection(io, service(&conn)).with_upgrades()), &conn).await
        }
    };
    while parked {
        let Some(mut stream) = home.lock().take() else { return };
        stream.release_buffers();
        crate::runtime::return_freed_memory();
        if !unpark(&mut stream, &conn).await {
            return;
        }
        let io = Tracked::new(stream, conn.clone(), home.clone());
        let http1 = conn.server.protocols.http1();
        parked = drive(Box::pin(http1.serve_connection(io, service(&conn)).with_upgrades()), &conn).await;
    }
}

/// One request, counted as an open exchange of its connection until hyper
/// drops the response body: by then an HTTP/1 response is wholly written to
/// hyper's buffer.
fn exchange(
    request: hyper::Request<hyper::body::Incoming>,
    conn: &Arc<Connection>,
) -> impl Future<Output = Result<hyper::Response<Exchanged<ResponseBody>>, Infallible>> {
    let open = OpenExchange::new(conn);
    // Boxed: hyper moves the service's future, and the handler's is large.
    let response = Box::pin(service::handle(request, conn.clone()));
    async move { Ok(response.await?.map(|body| Exchanged { body, _open: open })) }
}

struct OpenExchange(Arc<Connection>);

impl OpenExchange {
    fn new(conn: &Arc<Connection>) -> Self {
        conn.exchanges.fetch_add(1, Ordering::AcqRel);
        OpenExchange(conn.clone())
    }
}

impl Drop for OpenExchange {
    fn drop(&mut self) {
        self.0.exchanges.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its exchange open.
struct Exchanged<B> {
    body: B,
    _open: OpenExchange,
}

impl<B: http_body::Body + Unpin> http_body::Body for Exchanged<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Holds a parked connection until its client sends again (true), or closes
/// it (false): the client left, the server shuts down, `idle_timeout` passed,
/// or a request head took longer than `header_read_timeout`.
async fn unpark<S>(stream: &mut Guard<S>, conn: &Connection) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let server = &conn.server;
    let stop = tokio::select! {
        biased;
        _ = server.force.cancelled() => return false,
        more = std::future::poll_fn(|cx| stream.poll_next_bytes(cx)) => return matches!(more, Ok(true)),
        _ = head_overdue(conn) => Stop::Overdue,
        _ = server.shutdown.cancelled() => Stop::Graceful,
        stop = quiet(conn, false) => stop,
    };
    match stop {
        Stop::Overdue => overdue(conn),
        _ => {
            let _closing = server.stats.closing();
            tokio::select! {
                biased;
                _ = server.force.cancelled() => {}
                _ = tokio::io::AsyncWriteExt::shutdown(stream) => {}
            }
        }
    }
    false
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

/// How long a drain waits for the first request of a connection accepted
/// just before it.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

/// Why a connection's watch ended.
enum Stop {
    /// Finish the exchanges in flight, then close.
    Graceful,
    /// Let hyper go of an HTTP/1 connection between requests.
    Park,
    /// The server drains: as `Graceful`, once a connection that has not yet
    /// begun a request has had a moment to send it.
    Draining,
    /// Drop the connection now.
    Now,
    /// A request head took longer than `header_read_timeout`: drop it now.
    Overdue,
}

/// Runs a connection until it ends, asking it to close gracefully on server
/// shutdown or when idle, and dropping it on a forced close or a head that
/// takes longer than `header_read_timeout`. True when it ended parked: hyper
/// was quiet between HTTP/1 requests and has been dropped, its stream handed
/// back through `Tracked`'s home.
async fn drive<C, E>(mut http: Pin<Box<C>>, conn: &Connection) -> bool
where
    C: Graceful<Output = Result<(), E>> + ?Sized,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let server = &conn.server;
    let watch = WokenOnly::new(async {
        tokio::select! {
            _ = server.force.cancelled() => Stop::Now,
            _ = head_overdue(conn) => Stop::Overdue,
            _ = server.shutdown.cancelled() => Stop::Draining,
            stop = quiet(conn, true) => stop,
        }
    });
    tokio::pin!(watch);
    let stop = tokio::select! {
        biased;
        ended = http.as_mut() => {
            refused(conn, ended);
            return false;
        }
        stop = watch => stop,
    };
    match stop {
        Stop::Park => return true,
        Stop::Overdue => overdue(conn),
        Stop::Now => {}
        Stop::Graceful | Stop::Draining => {
            if let Stop::Draining = stop {
                // A client that connected just before the drain began has its
                // first request on the way: closing at once would meet it with
                // a closed connection. It gets a moment to arrive, and is then
                // answered with `Connection: close` (or a GOAWAY's last
                // stream) like any other.
                let first_request = async {
                    let waited = Instant::now();
                    while !conn.begun.load(Ordering::Acquire) && waited.elapsed() < FIRST_REQUEST_GRACE {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                };
                tokio::select! {
                    biased;
                    ended = http.as_mut() => {
                        refused(conn, ended);
                        return false;
                    }
                    _ = server.force.cancelled() => return false,
                    _ = first_request => {}
                }
            }
            http.as_mut().graceful_shutdown();
            let _closing = server.stats.closing();
            let late = WokenOnly::new(async {
                tokio::select! {
                    _ = server.force.cancelled() => {}
                    _ = head_overdue(conn) => {}
                }
            });
            tokio::select! {
                biased;
                _ = http => {}
                _ = late => {}
            }
        }
    }
    false
}

/// Resolves once a request head has been pending for `header_read_timeout`.
async fn head_overdue(conn: &Connection) {
    match seconds(conn.server.config.header_read_timeout) {
        Some(limit) => conn.head.overdue(limit).await,
        None => std::future::pending().await,
    }
}

fn overdue(conn: &Connection) {
    let peer = conn.info.addresses.peer_note();
    let report = format!("closed a connection{peer}: no whole request head within header_read_timeout");
    conn.server.metrics.closed_connection(crate::metrics::Refused::Timeout);
    conn.server.log.report(log::Kind::Request, log::Level::Info, report);
}

/// Logs how hyper or h2 refused a client: a request it could not parse
/// (hyper answered 400 or 431 and closed), an HTTP/2 connection it ended
/// with an error (GOAWAY), or one that left a keep-alive PING unanswered
/// (GOAWAY). A client that merely left is not news.
fn refused<E: Into<Box<dyn std::error::Error + Send + Sync>>>(conn: &Connection, ended: Result<(), E>) {
    let Err(error) = ended else { return };
    let error = error.into();
    let Some(error) = error.downcast_ref::<hyper::Error>() else { return };
    if error.is_timeout() {
        // hyper's own HTTP/1 header timeout is off: this is HTTP/2's keep-alive.
        let report = format!(
            "closed an HTTP/2 connection{}: a keep-alive PING went unanswered",
            conn.info.addresses.peer_note()
        );
        conn.server.metrics.connection_errored();
        return conn.server.log.report(log::Kind::Request, log::Level::Info, report);
    }
    let what = if error.is_parse() || error.is_parse_status() {
        let why = conn.head.refused().map_or_else(|| error.to_string(), str::to_owned);
        conn.server.metrics.parse_refused(error);
        format!("refused an HTTP/1.1 request{}: {why}", conn.info.addresses.peer_note())
    } else {
        let h2 = std::error::Error::source(error).and_then(|cause| cause.downcast_ref::<h2::Error>());
        match h2.and_then(h2::Error::reason) {
            Some(reason)
                if h2.is_some_and(|h2| h2.is_go_away() && !h2.is_remote()) && reason != h2::Reason::NO_ERROR =>
            {
                format!("closed an HTTP/2 connection{} with {reason:?}: {error}", conn.info.addresses.peer_note())
            }
            _ => return,
        }
    };
    conn.server.metrics.connection_errored();
    conn.server.log.report(log::Kind::Request, log::Level::Warning, what);
}

/// Resolves once the connection has had no request in flight and no traffic
/// for the server's current `idle_timeout` (give or take a quarter of it):
/// `Graceful`; or, with `may_park`, for `PARK_AFTER` (give or take as much)
/// while hyper waits between HTTP/1 requests: `Park`.
async fn quiet(conn: &Connection, may_park: bool) -> Stop {
    let mut quiet_since = Instant::now();
    loop {
        // An HTTP/2 connection is never parked: no need to look as often.
        let may_park = may_park && !conn.multiplexed.load(Ordering::Relaxed);
        let timeout = conn.server.idle_timeout();
        if conn.active.swap(false, Ordering::Relaxed) || conn.in_flight.load(Ordering::Acquire) > 0 {
            quiet_since = Instant::now();
        } else if timeout.is_some_and(|timeout| quiet_since.elapsed() >= timeout) {
            return Stop::Graceful;
        } else if may_park && quiet_since.elapsed() >= PARK_AFTER && conn.may_park() {
            return Stop::Park;
        }
        let period = timeout.map_or(Duration::from_secs(1), |timeout| (timeout / 4).max(Duration::from_millis(10)));
        tokio::time::sleep(if may_park { period.min(PARK_AFTER) } else { period }).await;
    }
}

/// A future polled only when its own wakers fired: the connection task wakes
/// for every read and write of its socket, and the watchers beside it need
/// not run each time.
struct WokenOnly<F> {
    future: Pin<Box<F>>,
    wake: Arc<WakeFlag>,
}

struct WakeFlag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl std::task::Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> WokenOnly<F> {
    fn new(future: F) -> Self {
        WokenOnly {
            future: Box::pin(future),
            wake: Arc::new(WakeFlag { woken: AtomicBool::new(true), task: AtomicWaker::new() }),
        }
    }
}

impl<F: Future> Future for WokenOnly<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        this.wake.task.register(cx.waker());
        if !this.wake.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = Waker::from(this.wake.clone());
        this.future.as_mut().poll(&mut Context::from_waker(&waker))
    }
}

/// The connection's socket, noting the time of every read and write so idle
/// connections can be closed, and whether hyper may be let go of it (HTTP/1
/// between requests: see `Connection::parkable`). When hyper drops it, the
/// stream goes back to its home, so that a parked connection keeps it.
///
/// On HTTP/2 writes are held for one turn of the scheduler and then go out
/// in one system call: the responses of a batch answered by the application
/// meanwhile join them. h2 itself flushes after every DATA frame of 256 bytes
/// or more, so without this each such response cost a `writev`.
struct Tracked<S> {
    /// Taken only when dropped.
    inner: Option<TokioIo<Box<Guard<S>>>>,
    conn: Arc<Connection>,
    home: Home<S>,
    /// HTTP/2 bytes accepted from h2, not yet written to the socket.
    held: BytesMut,
    /// The connection task has run again since `held` began filling: the
    /// next flush writes it out.
    due: bool,
    /// The last read found nothing to read.
    read_waiting: bool,
    /// The last write or flush could not finish: the socket is full.
    write_blocked: bool,
    /// What the connection was last told of `parkable`.
    parkable: bool,
}

/// Where the stream goes when hyper drops its `Tracked`.
type Home<S> = Arc<parking_lot::Mutex<Option<Box<Guard<S>>>>>;

/// Past this, writes wait for the held bytes to reach the socket.
const HELD_MAX: usize = 32 * 1024;
/// A write this large goes straight to the socket: copying it gains nothing.
const WRITE_THROUGH: usize = 16 * 1024;
/// The held buffer's size, allocated at once when a batch begins: growing
/// it batch after batch cost more than the copies it saves. It is kept
/// while exchanges are open, and let go of once none is (an idle HTTP/2
/// connection would otherwise keep it).
const HELD_CAPACITY: usize = HELD_MAX + WRITE_THROUGH;
/// Writes are copied into the held buffer in pieces this size: below
/// glibc's threshold for `rep movsb` (2112 bytes on x86-64), which on AMD
/// EPYC CPUs runs at about half the speed of the vector loop copying to the
/// held buffer's unaligned offsets (the pinned h2c get10k case).
const COPY_PIECE: usize = 2048;
/// A write in several pieces (an HTTP/1 head and a small body, chunk
/// framing) up to this size is joined into one buffer and one `write`: the
/// kernel's per-piece cost of a `writev` is more than the copy (the pinned
/// Rust-only h1 hello case).
const JOIN_MAX: usize = 2048;

impl<S> Tracked<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    fn new(stream: Box<Guard<S>>, conn: Arc<Connection>, home: Home<S>) -> Self {
        Tracked {
            inner: Some(TokioIo::new(stream)),
            conn,
            home,
            held: BytesMut::new(),
            due: false,
            read_waiting: false,
            write_blocked: false,
            parkable: false,
        }
    }

    fn io(&mut self) -> Pin<&mut TokioIo<Box<Guard<S>>>> {
        Pin::new(self.inner.as_mut().expect("taken only when dropped"))
    }

    /// Tells the connection whether hyper now waits for the next HTTP/1
    /// request with every byte written.
    fn note<T>(&mut self, poll: &Poll<T>, reading: bool) {
        if reading {
            self.read_waiting = poll.is_pending();
        } else {
            self.write_blocked = poll.is_pending();
        }
        let parkable = self.read_waiting
            && !self.write_blocked
            && self.held.is_empty()
            && self.inner.as_ref().is_some_and(|io| io.inner().between_requests());
        if parkable != self.parkable {
            self.parkable = parkable;
            self.conn.parkable.store(parkable, Ordering::Relaxed);
        }
    }

    fn poll_write_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.held.is_empty() {
            let held = &self.held;
            let written = ready!(Pin::new(self.inner.as_mut().expect("taken only when dropped")).poll_write(cx, held))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.held.advance(written);
            self.conn.touch();
        }
        if self.conn.exchanges.load(Ordering::Acquire) == 0 {
            self.held = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_send(&mut self, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        if !self.conn.multiplexed.load(Ordering::Relaxed) {
            return self.poll_write_through(cx, bufs);
        }
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if self.held.len() >= HELD_MAX || (len >= WRITE_THROUGH && !self.held.is_empty()) {
            ready!(self.poll_write_held(cx))?;
        }
        if len >= WRITE_THROUGH {
            return self.poll_write_through(cx, bufs);
        }
        if self.held.is_empty() {
            self.held.reserve(HELD_CAPACITY);
            self.due = false;
            cx.waker().wake_by_ref();
        }
        for piece in bufs.iter().flat_map(|b| b.chunks(COPY_PIECE)) {
            self.held.extend_from_slice(piece);
        }
        Poll::Ready(Ok(len))
    }

    fn flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.due {
            ready!(self.poll_write_held(cx))?;
        }
        self.io().poll_flush(cx)
    }

    fn poll_write_through(&mut self, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let inner = self.io();
        let poll = if bufs.len() > 1 && bufs.iter().map(|b| b.len()).sum::<usize>() <= JOIN_MAX {
            let mut joined = [0u8; JOIN_MAX];
            let mut end = 0;
            for buf in bufs {
                joined[end..end + buf.len()].copy_from_slice(buf);
                end += buf.len();
            }
            inner.poll_write(cx, &joined[..end])
        } else {
            inner.poll_write_vectored(cx, bufs)
        };
        if poll.is_ready() {
            self.conn.touch();
        }
        poll
    }
}

impl<S> Drop for Tracked<S> {
    fn drop(&mut self) {
        if let Some(io) = self.inner.take() {
            *self.home.lock() = Some(io.into_inner());
        }
    }
}

impl<S> Read for Tracked<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        // h2 reads at the start of each run of its task and flushes at the end.
        if !self.held.is_empty() {
            self.due = true;
        }
        let poll = self.io().poll_read(cx, buf);
        if poll.is_ready() {
            self.conn.touch();
        }
        self.note(&poll, true);
        poll
    }
}

impl<S> Write for Tracked<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = self.poll_send(cx, &[io::IoSlice::new(buf)]);
        self.note(&poll, false);
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = self.poll_send(cx, bufs);
        self.note(&poll, false);
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|io| io.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = self.flush(cx);
        self.note(&poll, false);
        poll
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_write_held(cx))?;
        self.io().poll_shutdown(cx)
    }
}
