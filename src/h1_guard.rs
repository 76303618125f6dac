//! A look at HTTP/1 request heads before hyper parses them, for the two bad
//! inputs hyper accepts silently: a `#` in the request target (the `http`
//! crate drops the fragment) and a request with both Content-Length and
//! Transfer-Encoding (hyper drops the length; RFC 9112 lets a server refuse,
//! and refusing is what stops request smuggling through a proxy). Such a head
//! has its first byte spoiled, so hyper itself answers 400 and closes. A head
//! that arrives in pieces is held back until it is whole, so its first byte
//! is still ours to spoil.
//!
//! To know where each head starts, the guard follows message framing with
//! httparse (the parser hyper uses): Content-Length bodies and chunked bodies
//! are skipped; after an upgrade or anything it does not follow (HTTP/2
//! preface, a head hyper will refuse anyway) it stands aside.
//!
//! Knowing where heads start also gives the header read timeout its clock
//! ([`PendingHead`]) without a timer per request.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

/// The longest chunk-size or trailer line followed before giving up.
const MAX_LINE: usize = 4096;
/// Heads with more header lines are left to hyper (which refuses them with
/// 431 under the default `max_headers`).
const MAX_HEADERS: usize = 128;

/// Since when a request head has been awaited and is still incomplete: from
/// the connection's start until its first request, then from the first byte
/// of each head that arrives in pieces. Idle time between requests is not
/// counted (that is `idle_timeout`'s). Set rarely, so a complete head costs
/// one atomic load, where hyper's own timeout armed a timer per request.
pub struct PendingHead {
    /// Milliseconds after `epoch`, plus one; 0 when no head is pending.
    since: AtomicU64,
    epoch: Instant,
    started: Notify,
}

impl PendingHead {
    /// Pending from now: a new connection.
    pub fn new() -> Self {
        PendingHead { since: AtomicU64::new(1), epoch: Instant::now(), started: Notify::new() }
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

enum Framing {
    Head,
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd,
    Trailers { line_len: usize },
    Off,
}

pub struct H1Guard<S> {
    inner: S,
    framing: Framing,
    /// Inspected bytes not yet handed to hyper.
    out: Vec<u8>,
    out_at: usize,
    /// The start of a head still arriving.
    held: Vec<u8>,
    /// A chunk-size line that arrived in pieces.
    line: Vec<u8>,
    max_head: usize,
    pending: Arc<PendingHead>,
}

impl<S> H1Guard<S> {
    pub fn new(inner: S, max_head: usize, pending: Arc<PendingHead>) -> Self {
        H1Guard {
            inner,
            framing: Framing::Head,
            out: Vec::new(),
            out_at: 0,
            held: Vec::new(),
            line: Vec::new(),
            max_head,
            pending,
        }
    }

    /// Follows the framing through freshly read bytes, spoiling refused
    /// heads. Returns the offset of an unfinished head to hold back.
    fn inspect(&mut self, data: &mut [u8]) -> Option<usize> {
        let mut pos = 0;
        while pos < data.len() {
            pos += match self.framing {
                Framing::Off => return None,
                Framing::Head => match self.head(&mut data[pos..]) {
                    Some(len) => len,
                    None => {
                        self.pending.start();
                        return Some(pos);
                    }
                },
                Framing::Body(left) => {
                    let take = left.min((data.len() - pos) as u64);
                    self.framing = if take == left { Framing::Head } else { Framing::Body(left - take) };
                    take as usize
                }
                Framing::ChunkSize => self.chunk_size(&data[pos..]),
                Framing::ChunkData(left) => {
                    let take = left.min((data.len() - pos) as u64);
                    self.framing = if take == left { Framing::ChunkDataEnd } else { Framing::ChunkData(left - take) };
                    take as usize
                }
                Framing::ChunkDataEnd => match data[pos..].iter().position(|&b| b == b'\n') {
                    Some(at) => {
                        self.framing = Framing::ChunkSize;
                        at + 1
                    }
                    None => data.len() - pos,
                },
                Framing::Trailers { line_len } => self.trailers(&data[pos..], line_len),
            };
        }
        None
    }

    /// Judges the head at the start of `data`: its length, or None while it
    /// is incomplete.
    fn head(&mut self, data: &mut [u8]) -> Option<usize> {
        let mut headers = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
        let mut request = httparse::Request::new(&mut []);
        let (len, next) = match request.parse_with_uninit_headers(data, &mut headers) {
            Ok(httparse::Status::Complete(len)) => {
                self.pending.finish();
                (len, judge(&request))
            }
            Ok(httparse::Status::Partial) if data.len() <= self.max_head => return None,
            // Too long or malformed: hyper refuses it on its own.
            _ => (data.len(), Next::Off),
        };
        self.framing = match next {
            Next::Refuse => {
                data[0] = 0;
                Framing::Off
            }
            Next::Off => Framing::Off,
            Next::Body(0) => Framing::Head,
            Next::Body(length) => Framing::Body(length),
            Next::Chunked => Framing::ChunkSize,
        };
        Some(len)
    }

    fn chunk_size(&mut self, data: &[u8]) -> usize {
        let Some(at) = data.iter().position(|&b| b == b'\n') else {
            self.line.extend_from_slice(data);
            if self.line.len() > MAX_LINE {
                self.framing = Framing::Off;
            }
            return data.len();
        };
        self.line.extend_from_slice(&data[..=at]);
        self.framing = match httparse::parse_chunk_size(&self.line) {
            Ok(httparse::Status::Complete((_, 0))) => Framing::Trailers { line_len: 0 },
            Ok(httparse::Status::Complete((_, size))) => Framing::ChunkData(size),
            _ => Framing::Off,
        };
        self.line.clear();
        at + 1
    }

    fn trailers(&mut self, data: &[u8], mut line_len: usize) -> usize {
        for (i, &byte) in data.iter().enumerate() {
            match byte {
                b'\n' if line_len == 0 => {
                    self.framing = Framing::Head;
                    return i + 1;
                }
                b'\n' => line_len = 0,
                b'\r' => {}
                _ => line_len += 1,
            }
        }
        self.framing = if line_len > MAX_LINE { Framing::Off } else { Framing::Trailers { line_len } };
        data.len()
    }

    /// Inspects the held head with what just arrived; whatever is decided
    /// moves to `out`.
    fn release_held(&mut self) {
        let mut bytes = std::mem::take(&mut self.held);
        if let Some(at) = self.inspect(&mut bytes) {
            self.held = bytes.split_off(at);
        }
        self.out = bytes;
        self.out_at = 0;
    }
}

enum Next {
    Refuse,
    Off,
    Body(u64),
    Chunked,
}

fn judge(request: &httparse::Request<'_, '_>) -> Next {
    if request.path.is_some_and(|p| p.contains('#')) {
        return Next::Refuse;
    }
    let mut length = None;
    let mut chunked = false;
    let mut upgrade = false;
    for header in request.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            let Some(value) = std::str::from_utf8(header.value).ok().and_then(|v| v.trim().parse::<u64>().ok())
            else {
                return Next::Off;
            };
            length = Some(value);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = true;
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    if chunked && length.is_some() {
        return Next::Refuse;
    }
    if upgrade || request.method.is_some_and(|m| m.eq_ignore_ascii_case("CONNECT")) {
        return Next::Off;
    }
    if chunked {
        Next::Chunked
    } else {
        Next::Body(length.unwrap_or(0))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for H1Guard<S> {
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
                    // End of stream mid-head: let hyper see what there is.
                    this.out = std::mem::take(&mut this.held);
                    this.out_at = 0;
                    this.framing = Framing::Off;
                    continue;
                }
                this.held.extend_from_slice(more.filled());
                this.release_held();
                continue;
            }
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            if matches!(this.framing, Framing::Off) || buf.filled().len() == before {
                return Poll::Ready(Ok(()));
            }
            let Some(at) = this.inspect(&mut buf.filled_mut()[before..]) else {
                return Poll::Ready(Ok(()));
            };
            this.held = buf.filled()[before + at..].to_vec();
            buf.set_filled(before + at);
            if at > 0 {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for H1Guard<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
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
