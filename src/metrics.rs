//! A server's figures for monitoring: requests by protocol and status
//! class, native refusals by reason, bytes on the wire and a histogram of
//! request durations. Counted where they happen, on the I/O threads, with
//! relaxed atomics (no lock, no GIL); Python reads a snapshot
//! (`NativeServer.metrics`).
//!
//! The guard and the framing code know their server by its `log::Source`
//! alone: what they refuse is counted through a registry keyed by it, a
//! lookup as rare as the refusals (and as the log record beside each).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Weak};
use std::task::{Context, Poll};
use std::time::Instant;

use http::{StatusCode, Version};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::log::Source;

/// Upper bounds of the request duration buckets, in seconds (Prometheus'
/// default buckets); a last bucket takes the rest.
pub const DURATION_BUCKETS: [f64; 11] = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// Why the server answered a request itself, or cut an application's
/// response off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// 400: a malformed request head or body, or an invalid WebSocket
    /// handshake; an HTTP/2 request reset for a malformed head.
    BadRequest,
    /// 408: a body stalled past `body_read_timeout`, or a head past
    /// `header_read_timeout` (its connection closed).
    Timeout,
    /// 413: a body past `max_body_size`.
    TooLarge,
    /// 431: a head past `max_header_size`.
    HeadersTooLarge,
    /// 426: a WebSocket handshake of a version other than 13.
    UpgradeRequired,
    /// The application's response disagreed with its `Content-Length`: sent
    /// 500 instead, or cut off.
    ResponseFraming,
}

impl Refused {
    const ALL: [Refused; 6] = [
        Refused::BadRequest,
        Refused::Timeout,
        Refused::TooLarge,
        Refused::HeadersTooLarge,
        Refused::UpgradeRequired,
        Refused::ResponseFraming,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Refused::BadRequest => "bad_request",
            Refused::Timeout => "request_timeout",
            Refused::TooLarge => "body_too_large",
            Refused::HeadersTooLarge => "headers_too_large",
            Refused::UpgradeRequired => "upgrade_required",
            Refused::ResponseFraming => "response_framing",
        }
    }

    /// The reason a native refusal's status stands for.
    pub fn of_status(status: StatusCode) -> Refused {
        match status {
            StatusCode::REQUEST_TIMEOUT => Refused::Timeout,
            StatusCode::PAYLOAD_TOO_LARGE => Refused::TooLarge,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => Refused::HeadersTooLarge,
            StatusCode::UPGRADE_REQUIRED => Refused::UpgradeRequired,
            _ => Refused::BadRequest,
        }
    }
}

pub const PROTOCOLS: [&str; 3] = ["h1", "h2", "h3"];
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

#[derive(Default)]
pub struct Metrics {
    source: Option<Source>,
    /// Connections whose serving ended in an error: a failed TLS handshake,
    /// a malformed request, a head too slow, an HTTP/2 protocol error.
    pub connections_errored: AtomicU64,
    requests: [AtomicU64; 3],
    statuses: [AtomicU64; 5],
    refused: [AtomicU64; Refused::ALL.len()],
    received: AtomicU64,
    sent: AtomicU64,
    durations: [AtomicU64; DURATION_BUCKETS.len() + 1],
    duration_micros: AtomicU64,
}

static REGISTRY: LazyLock<Mutex<HashMap<Source, Weak<Metrics>>>> = LazyLock::new(Mutex::default);

impl Metrics {
    /// A server's figures, found by `source` until they are dropped.
    pub fn register(source: Source) -> Arc<Metrics> {
        let mut metrics = Metrics::default();
        metrics.source = Some(source);
        let metrics = Arc::new(metrics);
        REGISTRY.lock().insert(source, Arc::downgrade(&metrics));
        metrics
    }

    /// Counts a refusal of the server `source` stands for.
    pub fn refused_by(source: Source, why: Refused) {
        let metrics = REGISTRY.lock().get(&source).and_then(Weak::upgrade);
        if let Some(metrics) = metrics {
            metrics.refused(why);
        }
    }

    pub fn refused(&self, why: Refused) {
        add(&self.refused[why as usize], 1);
    }

    /// A hyper error that ended an HTTP/1 connection: a head it could not
    /// parse (answered 431 when too large, else 400).
    pub fn parse_refused(&self, error: &hyper::Error) {
        self.refused(if error.is_parse_too_large() { Refused::HeadersTooLarge } else { Refused::BadRequest });
    }

    /// A connection closed for what its client did (or did not) send.
    pub fn closed_connection(&self, why: Refused) {
        self.refused(why);
        self.connection_errored();
    }

    pub fn connection_errored(&self) {
        add(&self.connections_errored, 1);
    }

    /// A response on its way out, for a request that arrived at `started`:
    /// the duration runs until the response head is ready.
    pub fn answered(&self, version: Version, status: StatusCode, started: Instant) {
        let protocol = match version {
            Version::HTTP_2 => 1,
            Version::HTTP_3 => 2,
            _ => 0,
        };
        add(&self.requests[protocol], 1);
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        add(&self.statuses[class], 1);
        let elapsed = started.elapsed();
        let seconds = elapsed.as_secs_f64();
        let bucket = DURATION_BUCKETS.iter().position(|&bound| seconds <= bound).unwrap_or(DURATION_BUCKETS.len());
        add(&self.durations[bucket], 1);
        add(&self.duration_micros, u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn received(&self, bytes: usize) {
        add(&self.received, bytes as u64);
    }

    pub fn sent(&self, bytes: usize) {
        add(&self.sent, bytes as u64);
    }

    /// Counts a QUIC connection's UDP bytes once it ends (quinn keeps them).
    pub fn count_quic(self: &Arc<Self>, connection: quinn::Connection) -> QuicBytes {
        QuicBytes { metrics: self.clone(), connection }
    }

    pub fn snapshot(&self) -> Snapshot {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Snapshot {
            connections_errored: load(&self.connections_errored),
            requests: PROTOCOLS.iter().zip(&self.requests).map(|(name, count)| (*name, load(count))).collect(),
            statuses: STATUS_CLASSES.iter().zip(&self.statuses).map(|(name, count)| (*name, load(count))).collect(),
            refused: Refused::ALL.iter().map(|why| (why.name(), load(&self.refused[*why as usize]))).collect(),
            bytes_received: load(&self.received),
            bytes_sent: load(&self.sent),
            durations: self.durations.iter().map(load).collect(),
            duration_seconds: load(&self.duration_micros) as f64 / 1e6,
        }
    }
}

impl Drop for Metrics {
    fn drop(&mut self) {
        if let Some(source) = self.source {
            REGISTRY.lock().remove(&source);
        }
    }
}

fn add(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// The figures at one moment. Each counter is read on its own: a snapshot
/// taken under load may be a request apart between two of them.
pub struct Snapshot {
    pub connections_errored: u64,
    pub requests: Vec<(&'static str, u64)>,
    pub statuses: Vec<(&'static str, u64)>,
    pub refused: Vec<(&'static str, u64)>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// Per bucket of `DURATION_BUCKETS`, then the rest (not cumulative).
    pub durations: Vec<u64>,
    pub duration_seconds: f64,
}

/// A socket whose bytes read and written are counted (TCP and Unix sockets:
/// what went over the wire, TLS and PROXY headers included).
pub struct Counted<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S> Counted<S> {
    pub fn new(inner: S, metrics: Arc<Metrics>) -> Self {
        Counted { inner, metrics }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            self.metrics.received(buf.filled().len() - before);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(written)) = poll {
            self.metrics.sent(written);
        }
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(written)) = poll {
            self.metrics.sent(written);
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Adds a QUIC connection's UDP bytes to the figures when dropped.
pub struct QuicBytes {
    metrics: Arc<Metrics>,
    connection: quinn::Connection,
}

impl Drop for QuicBytes {
    fn drop(&mut self) {
        let stats = self.connection.stats();
        add(&self.metrics.received, stats.udp_rx.bytes);
        add(&self.metrics.sent, stats.udp_tx.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_is_counted_by_protocol_class_and_duration() {
        let metrics = Metrics::default();
        metrics.answered(Version::HTTP_11, StatusCode::NOT_FOUND, Instant::now());
        metrics.answered(Version::HTTP_2, StatusCode::OK, Instant::now() - std::time::Duration::from_secs(7));
        let snapshot = metrics.snapshot();
        assert_eq!(snapshot.requests, [("h1", 1), ("h2", 1), ("h3", 0)]);
        assert_eq!(snapshot.statuses, [("1xx", 0), ("2xx", 1), ("3xx", 0), ("4xx", 1), ("5xx", 0)]);
        assert_eq!(snapshot.durations[0], 1);
        assert_eq!(snapshot.durations[DURATION_BUCKETS.len()], 1, "past the last bound");
        assert!(snapshot.duration_seconds >= 7.0);
    }

    #[test]
    fn refusals_reach_their_server_by_its_source_until_it_is_gone() {
        let source = Source::new();
        let metrics = Metrics::register(source);
        Metrics::refused_by(source, Refused::TooLarge);
        assert!(metrics.snapshot().refused.contains(&("body_too_large", 1)));
        drop(metrics);
        Metrics::refused_by(source, Refused::TooLarge);
        assert!(REGISTRY.lock().get(&source).is_none());
    }
}
