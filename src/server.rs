//! A running server: its listeners, shared settings, counters, and the
//! two-step shutdown (drain, then abort).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::CONNECTION;
use http::{HeaderMap, HeaderValue, Response, StatusCode, Version};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use parking_lot::RwLock;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::boundary::queue::EventQueue;
use crate::config::{seconds, ServerConfig};
use crate::connection;
use crate::exchange::Addresses;
use crate::listener::Listener;

/// Where a server hands its requests: to Python in this process, as
/// exchanges on the event queue, or to Python in another process, over the
/// socket bridge (`native_callback=False`).
pub enum Handoff {
    Queue,
    Bridge(Arc<crate::bridge::Bridge>),
}

/// Everything connections and requests of one server share.
pub struct ServerShared {
    pub config: ServerConfig,
    pub protocols: Protocols,
    pub tls: Option<TlsAcceptor>,
    pub handshake_timeout: Duration,
    pub events: Arc<EventQueue>,
    /// Hand a request over only once its whole body has arrived.
    pub whole_body: bool,
    /// Requests handed to Python and not yet answered: the backpressure bound.
    pub pending: Arc<Semaphore>,
    pub native_response: Option<Bytes>,
    idle_timeout_ms: AtomicU64,
    pub stats: ConnectionStats,
    /// Requests answered, over every protocol (a supervisor recycles a
    /// worker after so many).
    requests: AtomicU64,
    /// Off: every HTTP/1 response asks its client to close the connection,
    /// so that a server about to drain has no idle keep-alive connection
    /// left to close under a client's next request.
    keep_alive: AtomicBool,
    /// Stop accepting; ask connections to finish what they have.
    pub shutdown: CancellationToken,
    /// Drop every connection now.
    pub force: CancellationToken,
    pub tasks: TaskTracker,
    /// `Alt-Svc` for TCP responses once HTTP/3 is listening.
    pub alt_svc: std::sync::OnceLock<http::HeaderValue>,
    /// Headers added to responses the application sends without its own list.
    pub default_headers: RwLock<HeaderMap>,
    /// `config.response_headers`, parsed: added to every response lacking them.
    pub response_headers: HeaderMap,
    /// Where requests go.
    pub handoff: Handoff,
    /// What this server tells Python's `logging`.
    pub log: crate::log::Source,
    /// What it counts for monitoring.
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl ServerShared {
    pub fn new(
        config: ServerConfig,
        tls: Option<TlsAcceptor>,
        events: Arc<EventQueue>,
        whole_body: bool,
        response_headers: HeaderMap,
    ) -> Self {
        let protocols = Protocols::new(&config);
        let native_response = config.native_response.clone().map(Bytes::from);
        let log = crate::log::Source::new();
        let handoff = match config.bridge_address.as_deref() {
            Some(address) => {
                Handoff::Bridge(Arc::new(crate::bridge::Bridge::new(address, config.bridge_token.as_deref())))
            }
            None => Handoff::Queue,
        };
        ServerShared {
            handshake_timeout: seconds(config.tls_handshake_timeout).unwrap_or(Duration::from_secs(3600)),
            pending: Arc::new(Semaphore::new(config.max_pending_requests.max(1))),
            idle_timeout_ms: AtomicU64::new(millis(config.idle_timeout)),
            config,
            protocols,
            tls,
            events,
            whole_body,
            native_response,
            stats: ConnectionStats::default(),
            requests: AtomicU64::new(0),
            keep_alive: AtomicBool::new(true),
            shutdown: CancellationToken::new(),
            force: CancellationToken::new(),
            tasks: TaskTracker::new(),
            default_headers: RwLock::new(HeaderMap::new()),
            response_headers,
            handoff,
            log,
            metrics: crate::metrics::Metrics::register(log),
            alt_svc: std::sync::OnceLock::new(),
        }
    }

    /// Adds the configured response headers whose names `headers` lacks.
    pub fn add_response_headers(&self, headers: &mut HeaderMap) {
        for name in self.response_headers.keys() {
            if !headers.contains_key(name) {
                for value in self.response_headers.get_all(name) {
                    headers.append(name.clone(), value.clone());
                }
            }
        }
    }

    /// Counts a response on its way out, to a request that arrived at
    /// `started`; with keep-alive off, an HTTP/1 one (not a WebSocket's 101)
    /// closes its connection after it.
    pub fn answered<B>(&self, version: Version, started: Instant, response: &mut Response<B>) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.metrics.answered(version, response.status(), started);
        if version < Version::HTTP_2 && !self.keep_alive() && response.status() != StatusCode::SWITCHING_PROTOCOLS {
            response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
        }
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn keep_alive(&self) -> bool {
        self.keep_alive.load(Ordering::Relaxed)
    }

    pub fn set_keep_alive(&self, on: bool) {
        self.keep_alive.store(on, Ordering::Relaxed);
    }

    pub fn idle_timeout(&self) -> Option<Duration> {
        match self.idle_timeout_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    pub fn set_idle_timeout(&self, value: f64) {
        self.idle_timeout_ms.store(millis(value), Ordering::Relaxed);
    }

    /// Starts one accept loop per listener on the runtime. Returns the TCP
    /// addresses and the Unix socket paths listened on.
    pub fn listen(self: &Arc<Self>, listeners: Vec<Listener>) -> io::Result<(Vec<SocketAddr>, Vec<Arc<str>>)> {
        let limit = Arc::new(Semaphore::new(self.config.max_connections.max(1)));
        let addresses = listeners.iter().filter_map(Listener::tcp_address).collect::<io::Result<Vec<_>>>()?;
        // UDP first: if HTTP/3 cannot be had, nothing is left listening.
        // Unix sockets have no UDP twin: HTTP/3 is for TCP addresses only.
        self.listen_http3(&addresses)?;
        let _entered = crate::runtime::runtime().enter();
        let mut paths = Vec::new();
        for listener in listeners {
            match listener {
                Listener::Tcp(tcp) => {
                    let tcp = TcpListener::from_std(tcp)?;
                    self.tasks.spawn(accept_loop(tcp, self.clone(), limit.clone()));
                }
                #[cfg(unix)]
                Listener::Unix(unix) => {
                    let path = unix_path(&unix)?;
                    paths.push(path.clone());
                    let unix = UnixAcceptor { listener: tokio::net::UnixListener::from_std(unix)?, path };
                    self.tasks.spawn(accept_loop(unix, self.clone(), limit.clone()));
                }
            }
        }
        Ok((addresses, paths))
    }

    /// HTTP/3 on the same addresses and ports, over UDP, when TLS is on.
    /// A port that cannot be bound is an error unless `http3_best_effort`.
    fn listen_http3(self: &Arc<Self>, addresses: &[SocketAddr]) -> std::io::Result<()> {
        let Some(tls) = self.tls.as_ref().filter(|_| self.config.http3 && !addresses.is_empty()) else { return Ok(()) };
        if self.config.proxy_protocol {
            // QUIC cannot carry a PROXY header, and a proxy in front would
            // not forward the UDP that Alt-Svc points browsers at.
            let report = "HTTP/3 is off: the PROXY protocol is on, and QUIC cannot carry it; serving over TCP only";
            self.log.report(crate::log::Kind::Http3, crate::log::Level::Info, report);
            return Ok(());
        }
        let _entered = crate::runtime::runtime().enter();
        let endpoints = match crate::http3::bind(addresses, tls.config(), self) {
            Ok(endpoints) => endpoints,
            Err(error) if self.config.http3_best_effort => {
                let report =
                    format!("HTTP/3 is off: UDP {addresses:?} could not be bound ({error}); serving over TCP only");
                self.log.report(crate::log::Kind::Http3, crate::log::Level::Warning, report);
                return Ok(());
            }
            Err(error) => return Err(error),
        };
        for endpoint in endpoints {
            self.tasks.spawn(crate::http3::accept_loop(endpoint, self.clone()));
        }
        if let Some(port) = addresses.first().map(|a| a.port()) {
            let _ = self.alt_svc.set(crate::http3::alt_svc(port, self.config.alt_svc_max_age));
        }
        Ok(())
    }

    /// Graceful close: stop accepting, let connections finish within
    /// `timeout`, then abort what is left. `force` skips the wait. Accepting
    /// stops before this returns; the future it returns does the rest.
    pub fn close(self: Arc<Self>, force: bool, timeout: Option<Duration>) -> impl Future<Output = ()> {
        self.shutdown.cancel();
        self.tasks.close();
        if force {
            self.force.cancel();
        }
        self.drain(timeout)
    }

    async fn drain(self: Arc<Self>, timeout: Option<Duration>) {
        let drained = match timeout {
            Some(limit) => tokio::time::timeout(limit, self.tasks.wait()).await.is_ok(),
            None => {
                self.tasks.wait().await;
                true
            }
        };
        if !drained {
            self.force.cancel();
            self.tasks.wait().await;
        }
        self.pending.close();
        if let Handoff::Bridge(bridge) = &self.handoff {
            bridge.close();
        }
    }
}

/// What the accept loop needs of a listener: the next connection and where
/// it comes from.
trait Accept: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, Addresses)>> + Send;
}

impl Accept for TcpListener {
    type Stream = TcpStream;

    async fn accept(&self) -> io::Result<(TcpStream, Addresses)> {
        let (stream, peer) = TcpListener::accept(self).await?;
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().unwrap_or(peer);
        Ok((stream, Addresses::Ip { peer, local }))
    }
}

#[cfg(unix)]
struct UnixAcceptor {
    listener: tokio::net::UnixListener,
    path: Arc<str>,
}

#[cfg(unix)]
impl Accept for UnixAcceptor {
    type Stream = tokio::net::UnixStream;

    async fn accept(&self) -> io::Result<(tokio::net::UnixStream, Addresses)> {
        let (stream, _unnamed_peer) = self.listener.accept().await?;
        Ok((stream, Addresses::Unix { path: self.path.clone(), client: None }))
    }
}

/// The file path a Unix listener is bound to ("" for an unnamed or abstract one).
#[cfg(unix)]
fn unix_path(listener: &std::os::unix::net::UnixListener) -> io::Result<Arc<str>> {
    let address = listener.local_addr()?;
    Ok(address.as_pathname().map_or_else(|| Arc::from(""), |path| Arc::from(path.to_string_lossy())))
}

/// Accepts connections until shutdown, which is looked at first: a
/// connection waiting in the backlog when the server closes must not be
/// served (unbiased, `select!` picked either when both were ready).
async fn accept_loop<L: Accept>(listener: L, server: Arc<ServerShared>, limit: Arc<Semaphore>) {
    loop {
        let permit = tokio::select! {
            biased;
            _ = server.shutdown.cancelled() => return,
            permit = limit.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            biased;
            _ = server.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, addresses)) => {
                server.tasks.spawn(connection::serve(stream, addresses, server.clone(), permit));
            }
            // Out of file descriptors or a connection reset before accept:
            // back off briefly instead of spinning.
            Err(error) => {
                accept_failed(&server, &error);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Logs a failed accept: running out of descriptors or memory is an error
/// the operator must hear of; a connection gone before it was accepted is
/// routine.
fn accept_failed(server: &ServerShared, error: &io::Error) {
    use crate::log::{Kind, Level};
    let exhausted = matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM));
    let level = if exhausted { Level::Error } else { Level::Debug };
    server.log.report(Kind::Accept, level, format!("could not accept a connection: {error}"));
}

/// hyper's HTTP/1 header limit when none is set. Left unset at this value:
/// hyper then parses a head into an uninitialised array, where a limit set
/// makes it fill a vector of that many entries for every request.
const HYPER_MAX_HEADERS: usize = 100;

/// The HTTP versions a server speaks. HTTP/1.1 alone uses hyper's own
/// builder: hyper-util's auto builder still accepts h2c prior knowledge when
/// told `http1_only` on connections with upgrades. With HTTP/2 too, hyper's
/// own HTTP/1 builder serves a connection again after it was parked.
///
/// hyper's HTTP/1 header timeout is off: it armed a timer per request and
/// also ran between requests; the connection keeps `header_read_timeout`
/// itself (`PendingHead`).
pub enum Protocols {
    Auto(Box<auto::Builder<TokioExecutor>>, http1::Builder),
    Http1(http1::Builder),
}

/// The HTTP/1 settings, on hyper's builder and on hyper-util's (the same
/// methods on two types).
macro_rules! http1_settings {
    ($builder:expr, $config:expr) => {
        $builder
            .header_read_timeout(None)
            .max_buf_size($config.max_header_size.max(8192))
            .auto_date_header($config.date_header)
            .keep_alive(true);
        if $config.max_headers != HYPER_MAX_HEADERS {
            $builder.max_headers($config.max_headers);
        }
    };
}

impl Protocols {
    fn new(config: &ServerConfig) -> Self {
        let http2 = config.tls.as_ref().map_or(config.http2, |tls| tls.http2);
        let mut http1 = http1::Builder::new();
        http1_settings!(http1, config);
        if !http2 {
            return Protocols::Http1(http1);
        }
        let mut builder = auto::Builder::new(TokioExecutor::new());
        http1_settings!(builder.http1(), config);
        let mut http2 = builder.http2();
        http2
            .timer(TokioTimer::new())
            .auto_date_header(config.date_header)
            .max_concurrent_streams(config.max_concurrent_streams)
            .max_header_list_size(u32::try_from(config.http2_header_list_limit()).unwrap_or(u32::MAX))
            .max_frame_size(config.http2_max_frame_size)
            .initial_connection_window_size(config.http2_initial_connection_window_size)
            .initial_stream_window_size(config.http2_initial_stream_window_size)
            .keep_alive_interval(seconds(config.http2_keep_alive_interval))
            .keep_alive_timeout(seconds(config.http2_keep_alive_timeout).unwrap_or(HTTP2_KEEP_ALIVE_TIMEOUT))
            .enable_connect_protocol();
        if config.http2_adaptive_window {
            http2.adaptive_window(true);
        }
        Protocols::Auto(Box::new(builder), http1)
    }

    /// The builder of HTTP/1 connections.
    pub fn http1(&self) -> &http1::Builder {
        match self {
            Protocols::Auto(_, http1) | Protocols::Http1(http1) => http1,
        }
    }
}

/// hyper's wait for a keep-alive PING's answer, when none is configured.
const HTTP2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

fn millis(value: f64) -> u64 {
    seconds(value).map_or(0, |d| d.as_millis().max(1) as u64)
}

/// dart:io's `HttpConnectionsInfo` counters.
#[derive(Default)]
pub struct ConnectionStats {
    pub total: AtomicUsize,
    /// Connections opened so far.
    pub handled: AtomicU64,
    pub active: AtomicUsize,
    pub closing: AtomicUsize,
}

/// Decrements a counter when dropped.
pub struct Counted<'a>(&'a AtomicUsize);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConnectionStats {
    pub fn open(&self) -> Counted<'_> {
        self.total.fetch_add(1, Ordering::Relaxed);
        self.handled.fetch_add(1, Ordering::Relaxed);
        Counted(&self.total)
    }

    pub fn closing(&self) -> Counted<'_> {
        self.closing.fetch_add(1, Ordering::Relaxed);
        Counted(&self.closing)
    }

    /// (total, active, idle, closing)
    pub fn snapshot(&self) -> (usize, usize, usize, usize) {
        let total = self.total.load(Ordering::Relaxed);
        let active = self.active.load(Ordering::Relaxed);
        let closing = self.closing.load(Ordering::Relaxed);
        (total, active, total.saturating_sub(active + closing), closing)
    }
}
