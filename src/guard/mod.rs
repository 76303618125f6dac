//! A look at request bytes before hyper and h3 parse them, for the bad inputs
//! they accept silently or answer too broadly. The `http` crate drops a `#`
//! fragment from a request target instead of refusing it, in every protocol.
//! hyper drops the length of an HTTP/1 request that also says
//! `Transfer-Encoding`, takes `chunked, chunked` and `gzip, chunked` as
//! chunked, and lets UTF-8 and `"` through in a target. h2 ends the whole
//! connection over a field it cannot convert (an uppercase name, a control
//! byte in a value, an unknown pseudo-header), where only that request is
//! malformed. Such a request is spoiled on its way in, so that hyper, h2 or
//! h3 refuses it itself: HTTP/1 answers 400 and closes, HTTP/2 and HTTP/3
//! reset that stream.
//!
//! To know where each request head starts, the guard follows the framing
//! ([`h1`], then [`h2`] after the HTTP/2 preface; [`h3`] on each QUIC request
//! stream). A head that arrives in pieces is held back until it is whole, so
//! it is still ours to spoil.

mod h1;
mod h2;
pub mod h3;
mod hpack;
mod qpack;

use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::log::{Kind, Level, Source};

pub use h2::Limits as H2Limits;

/// Since when a request head has been awaited and is still incomplete: from
/// the connection's start until its first request, then from the first byte
/// of each HTTP/1 head that arrives in pieces. Idle time between requests is
/// not counted (that is `idle_timeout`'s). Set rarely, so a complete head
/// costs one atomic load, where hyper's own timeout armed a timer per request.
///
/// It also keeps why the guard spoiled an HTTP/1 head: hyper's 400 follows
/// and ends the connection, which logs it with this reason.
pub struct PendingHead {
    /// Milliseconds after `epoch`, plus one; 0 when no head is pending.
    since: AtomicU64,
    epoch: Instant,
    started: Notify,
    refused: OnceLock<&'static str>,
}

impl PendingHead {
    /// Pending from now: a new connection.
    pub fn new() -> Self {
        PendingHead {
            since: AtomicU64::new(1),
            epoch: Instant::now(),
            started: Notify::new(),
            refused: OnceLock::new(),
        }
    }

    /// Why the guard refused this connection's HTTP/1 request, if it did.
    pub fn refused(&self) -> Option<&'static str> {
        self.refused.get().copied()
    }

    fn start(&self) {
        if self.since.load(Ordering::Relaxed) == 0 {
            self.since.store(self.epoch.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
            self.started.notify_one();
        }
    }

    /// A whole head has arrived.
    pub fn finish(&self) {
        if self.since.load(Ordering::Relaxed) != 0 {
            self.since.store(0, Ordering::Relaxed);
        }
    }

    /// Resolves once one head has been pending for `limit`.
    pub async fn overdue(&self, limit: Duration) {
        loop {
            let started = self.started.notified();
            let since = self.since.load(Ordering::Relaxed);
            if since == 0 {
                started.await;
                continue;
            }
            tokio::time::sleep_until(self.epoch + Duration::from_millis(since - 1) + limit).await;
            if self.since.load(Ordering::Relaxed) == since {
                return;
            }
        }
    }
}

/// What a follower made of freshly read bytes.
enum Verdict {
    /// All of them may go on.
    Pass,
    /// From this offset on they begin a unit still arriving: hold them back.
    Hold(usize),
    /// A request is refused; what follows it is not inspected yet.
    Refuse(Refusal),
    /// HTTP/2 begins at this offset, with its preface.
    Http2(usize),
}

/// A refused request: the bytes in `range` become `spoiled`, which hyper,
/// h2 or h3 refuses on its own.
struct Refusal {
    range: Range<usize>,
    spoiled: Vec<u8>,
    /// Why, for the server's log.
    reason: &'static str,
}

impl Refusal {
    fn shifted(self, by: usize) -> Self {
        Refusal { range: self.range.start + by..self.range.end + by, ..self }
    }
}

enum Follower {
    Http1(h1::Framing),
    Http2(h2::Frames),
}

pub struct Guard<S> {
    inner: S,
    follower: Follower,
    /// What h2 takes, should the connection turn to HTTP/2.
    h2: h2::Limits,
    /// Inspected bytes not yet handed to hyper.
    out: Vec<u8>,
    out_at: usize,
    /// The start of a unit still arriving.
    held: Vec<u8>,
    log: Source,
}

impl<S> Guard<S> {
    /// A connection that begins with HTTP/1 (or the HTTP/2 preface, over
    /// cleartext).
    pub fn http1(inner: S, max_head: usize, h2: h2::Limits, pending: Arc<PendingHead>, log: Source) -> Self {
        Self::new(inner, h2, Follower::Http1(h1::Framing::new(max_head, pending)), log)
    }

    /// A connection that ALPN made HTTP/2.
    pub fn http2(inner: S, h2: h2::Limits, log: Source) -> Self {
        Self::new(inner, h2, Follower::Http2(h2::Frames::new(h2)), log)
    }

    fn new(inner: S, h2: h2::Limits, follower: Follower, log: Source) -> Self {
        Guard { inner, follower, h2, out: Vec::new(), out_at: 0, held: Vec::new(), log }
    }

    /// Every byte read so far belongs to whole HTTP/1 requests (bodies
    /// included), all of them handed on.
    pub fn between_requests(&self) -> bool {
        let framing_done = matches!(&self.follower, Follower::Http1(framing) if framing.between_requests());
        framing_done && self.out_at >= self.out.len() && self.held.is_empty()
    }

    /// Lets go of the buffer of bytes already handed on.
    pub fn release_buffers(&mut self) {
        if self.out_at >= self.out.len() {
            self.out = Vec::new();
            self.out_at = 0;
        }
    }

    fn inspect(&mut self, data: &[u8]) -> Verdict {
        let mut from = 0;
        loop {
            let verdict = match &mut self.follower {
                Follower::Http1(framing) => framing.inspect(&data[from..]),
                Follower::Http2(frames) => frames.inspect(&data[from..]),
            };
            return match verdict {
                Verdict::Pass => Verdict::Pass,
                Verdict::Hold(at) => Verdict::Hold(from + at),
                Verdict::Refuse(refusal) => {
                    // HTTP/1: the connection logs hyper's 400 with the reason.
                    if let Follower::Http2(_) = self.follower {
                        self.log.report(
                            Kind::Request,
                            Level::Warning,
                            format!("refused an HTTP/2 request: {}", refusal.reason),
                        );
                        crate::metrics::Metrics::refused_by(self.log, crate::metrics::Refused::BadRequest);
                    }
                    Verdict::Refuse(refusal.shifted(from))
                }
                Verdict::Http2(at) => {
                    self.follower = Follower::Http2(h2::Frames::new(self.h2));
                    from += at;
                    continue;
                }
            };
        }
    }

    /// Inspects `bytes`, which follow the already decided `out`; what is
    /// decided becomes the next thing handed to hyper, the rest is held.
    fn release(&mut self, mut out: Vec<u8>, mut bytes: Vec<u8>) {
        let mut from = 0;
        loop {
            match self.inspect(&bytes[from..]) {
                Verdict::Pass => {
                    out.extend_from_slice(&bytes[from..]);
                    break;
                }
                Verdict::Hold(at) => {
                    out.extend_from_slice(&bytes[from..from + at]);
                    self.held = bytes.split_off(from + at);
                    break;
                }
                Verdict::Refuse(Refusal { range, spoiled, reason: _ }) => {
                    out.extend_from_slice(&bytes[from..from + range.start]);
                    out.extend_from_slice(&spoiled);
                    from += range.end;
                }
                Verdict::Http2(_) => unreachable!("resolved by inspect"),
            }
        }
        self.out = out;
        self.out_at = 0;
    }
}

impl<S: AsyncRead + Unpin> Guard<S> {
    /// Waits for the peer's next bytes (a whole request head, if that is
    /// what they begin) and keeps them for the next read. False at the end
    /// of the stream.
    pub fn poll_next_bytes(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let mut first = [0u8; 512];
        let mut first = ReadBuf::new(&mut first);
        ready!(Pin::new(&mut *self).poll_read(cx, &mut first))?;
        if first.filled().is_empty() {
            return Poll::Ready(Ok(false));
        }
        let mut out = first.filled().to_vec();
        out.extend_from_slice(&self.out[self.out_at..]);
        self.out = out;
        self.out_at = 0;
        Poll::Ready(Ok(true))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guard<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.out_at < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_at);
                buf.put_slice(&this.out[this.out_at..this.out_at + n]);
                this.out_at += n;
                return Poll::Ready(Ok(()));
            }
            if !this.held.is_empty() {
                let mut more = [0u8; 8192];
                let mut more = ReadBuf::new(&mut more);
                ready!(Pin::new(&mut this.inner).poll_read(cx, &mut more))?;
                if more.filled().is_empty() {
                    // End of stream mid-unit: let hyper see what there is.
                    this.out = std::mem::take(&mut this.held);
                    this.out_at = 0;
                    continue;
                }
                let mut bytes = std::mem::take(&mut this.held);
                bytes.extend_from_slice(more.filled());
                this.release(Vec::new(), bytes);
                continue;
            }
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            if buf.filled().len() == before {
                return Poll::Ready(Ok(()));
            }
            let (replaced, out) = match this.inspect(&buf.filled()[before..]) {
                Verdict::Pass => return Poll::Ready(Ok(())),
                Verdict::Hold(at) => (at..at, Vec::new()),
                Verdict::Refuse(Refusal { range, spoiled, reason: _ }) => (range, spoiled),
                Verdict::Http2(_) => unreachable!("resolved by inspect"),
            };
            let rest = buf.filled()[before + replaced.end..].to_vec();
            buf.set_filled(before + replaced.start);
            this.release(out, rest);
            if replaced.start > 0 {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

write_through!(Guard);
