//! Bodies in both directions, each with bounded buffering: the request body is
//! pumped from the connection into a buffer the application reads, and the
//! response body is a buffer the application fills and hyper drains.
//!
//! The application waits on either side in one of two ways: an asyncio
//! future parked here and resolved through the event queue (the loop), or a
//! consumer thread blocked on a condvar of the body itself (WSGI), which
//! therefore never depends on another thread draining the queue.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use parking_lot::{Condvar, Mutex};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::boundary::queue::{Event, EventQueue, Waiter};
use crate::exchange::Exchange;

/// How much of a request body is read ahead of the application.
pub const REQUEST_HIGH_WATER: usize = 256 * 1024;
/// How much response body the application may queue before it must wait.
const RESPONSE_HIGH_WATER: usize = 256 * 1024;

/// How a request body stopped, if it did.
#[derive(Clone, Debug, PartialEq)]
pub enum BodyEnd {
    Complete,
    TooLarge,
    Disconnected,
}

/// One step of reading the request body.
pub enum BodyRead {
    Data(Bytes),
    End,
    /// Nothing yet: the waiter (if any) is woken through the event queue.
    Pending,
    Error(BodyEnd),
}

struct RequestBodyState {
    chunks: VecDeque<Bytes>,
    buffered: usize,
    end: Option<BodyEnd>,
    waiter: Option<Waiter>,
}

/// The request body between the pump task and the application.
pub struct RequestBody {
    state: Mutex<RequestBodyState>,
    space: Notify,
    /// Signalled on every change a blocked reader may be waiting for.
    arrived: Condvar,
    events: Arc<EventQueue>,
}

impl RequestBody {
    pub fn new(events: Arc<EventQueue>, end: Option<BodyEnd>) -> Self {
        RequestBody {
            state: Mutex::new(RequestBodyState { chunks: VecDeque::new(), buffered: 0, end, waiter: None }),
            space: Notify::new(),
            arrived: Condvar::new(),
            events,
        }
    }

    /// Takes the next chunk, or parks the waiter (if one is given) until
    /// there is one.
    pub fn read(&self, waiter: impl FnOnce() -> Option<Waiter>) -> BodyRead {
        let mut state = self.state.lock();
        self.take(&mut state).unwrap_or_else(|| {
            if let Some(waiter) = waiter() {
                state.waiter = Some(waiter);
            }
            BodyRead::Pending
        })
    }

    /// Takes the next chunk, blocking the calling thread until there is one
    /// or the body ends (never `Pending`).
    pub fn read_blocking(&self) -> BodyRead {
        let mut state = self.state.lock();
        loop {
            if let Some(step) = self.take(&mut state) {
                return step;
            }
            self.arrived.wait(&mut state);
        }
    }

    /// The next chunk or the end; None while neither has come.
    fn take(&self, state: &mut RequestBodyState) -> Option<BodyRead> {
        if let Some(chunk) = state.chunks.pop_front() {
            state.buffered -= chunk.len();
            if state.buffered < REQUEST_HIGH_WATER {
                self.space.notify_one();
            }
            return Some(BodyRead::Data(chunk));
        }
        match &state.end {
            Some(BodyEnd::Complete) => Some(BodyRead::End),
            Some(end) => Some(BodyRead::Error(end.clone())),
            None => None,
        }
    }

    fn push(&self, chunk: Bytes) {
        let mut state = self.state.lock();
        state.buffered += chunk.len();
        state.chunks.push_back(chunk);
        self.wake(&mut state);
    }

    /// Records how the body ended; the first ending wins.
    pub fn finish(&self, end: BodyEnd) {
        let mut state = self.state.lock();
        if state.end.is_none() {
            state.end = Some(end);
            self.wake(&mut state);
        }
    }

    fn wake(&self, state: &mut RequestBodyState) {
        if let Some(waiter) = state.waiter.take() {
            self.events.push(Event::Wake(waiter));
        }
        self.arrived.notify_all();
    }

    fn has_room(&self, high_water: u64) -> bool {
        (self.state.lock().buffered as u64) < high_water
    }
}

/// Why a request body was refused while it arrived.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Refusal {
    /// Past `max_body_size`: 413.
    TooLarge,
    /// Framing the server cannot read (a bad chunk size, say): 400.
    Malformed,
    /// No byte for `body_read_timeout`: 408.
    Stalled,
}

impl Refusal {
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::Malformed => StatusCode::BAD_REQUEST,
            Refusal::Stalled => StatusCode::REQUEST_TIMEOUT,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Refusal::TooLarge => "request body too large",
            Refusal::Malformed => "malformed request body",
            Refusal::Stalled => "request body timed out",
        }
    }

    /// How the application's reads end: too large is said as such, the
    /// rest as the client gone.
    fn end(self) -> BodyEnd {
        match self {
            Refusal::TooLarge => BodyEnd::TooLarge,
            Refusal::Malformed | Refusal::Stalled => BodyEnd::Disconnected,
        }
    }
}

/// How the pump reads a request body: the size limit, how far ahead of the
/// application, and how long a stall may last.
#[derive(Clone, Copy)]
pub struct PumpLimits {
    pub max_size: u64,
    pub high_water: u64,
    pub stall: Option<Duration>,
}

/// Moves a request body from the connection into `target`, enforcing the
/// limits. Stops when the body ends or `stop` fires (the exchange is over).
/// Returns why the body was refused, if it was: `target` is then left
/// unfinished, for the caller to `refuse` once the answer is decided on, so
/// that an application woken by that cannot answer first.
pub async fn pump<B>(
    body: &mut B,
    target: Arc<RequestBody>,
    limits: PumpLimits,
    stop: CancellationToken,
) -> Option<Refusal>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error + 'static,
{
    let mut total: u64 = 0;
    let declared = body.size_hint().exact();
    loop {
        loop {
            let room = target.space.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if target.has_room(limits.high_water) {
                break;
            }
            tokio::select! {
                _ = room => {}
                _ = stop.cancelled() => return None,
            }
        }
        let stalled = async {
            match limits.stall {
                Some(stall) => tokio::time::sleep(stall).await,
                None => std::future::pending().await,
            }
        };
        let frame = tokio::select! {
            frame = body.frame() => frame,
            _ = stalled => return Some(Refusal::Stalled),
            _ = stop.cancelled() => return None,
        };
        match frame {
            // hyper ends an HTTP/2 body without error on RST_STREAM(NO_ERROR),
            // "stop sending"; short of its Content-Length, it was cut off.
            None if declared.is_some_and(|length| total < length) => {
                target.finish(BodyEnd::Disconnected);
                return None;
            }
            None => {
                target.finish(BodyEnd::Complete);
                return None;
            }
            Some(Err(error)) if malformed(&error) => return Some(Refusal::Malformed),
            // The client closed or reset the stream mid-body: either way it
            // will not read a response.
            Some(Err(_)) => {
                target.finish(BodyEnd::Disconnected);
                return None;
            }
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else { continue };
                total += data.len() as u64;
                if total > limits.max_size {
                    return Some(Refusal::TooLarge);
                }
                if !data.is_empty() {
                    target.push(data);
                }
            }
        }
    }
}

/// Whether a body error is the client's bad framing (hyper's chunked
/// decoder says so with `InvalidInput` or `InvalidData`), not its leaving.
pub fn malformed(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            return matches!(io.kind(), std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData);
        }
        cause = error.source();
    }
    false
}

impl RequestBody {
    /// Ends the body for a refusal the server has answered.
    pub fn refuse(&self, refusal: Refusal) {
        self.finish(refusal.end());
    }
}

/// A refusal a body pump decided on, for its exchange to answer with.
#[derive(Clone, Default)]
pub struct RefusalSignal {
    why: Arc<OnceLock<Refusal>>,
    fired: CancellationToken,
}

impl RefusalSignal {
    /// The first refusal wins.
    pub fn fire(&self, why: Refusal) {
        if self.why.set(why).is_ok() {
            self.fired.cancel();
        }
    }

    pub fn get(&self) -> Option<Refusal> {
        self.why.get().copied()
    }

    pub async fn fired(&self) -> Refusal {
        self.fired.cancelled().await;
        self.get().expect("set before the token fires")
    }
}

struct ResponseStreamState {
    chunks: VecDeque<Bytes>,
    buffered: usize,
    finished: bool,
    aborted: bool,
    /// An abort was seen once: hyper has been given a turn to flush.
    abort_flushed: bool,
    peer_gone: bool,
    reader: Option<Waker>,
    writer: Option<Waiter>,
}

/// Outcome of queueing a response chunk.
pub enum WriteResult {
    /// Queued; the application may write more at once.
    Ready,
    /// Queued, but the buffer is full: the waiter fires when it drains.
    Wait,
    /// The client is gone; nothing was queued.
    PeerGone,
}

/// A streamed response body between the application and hyper.
pub struct ResponseStream {
    state: Mutex<ResponseStreamState>,
    /// Signalled when the buffer has drained to half, or the client left.
    drained: Condvar,
    events: Arc<EventQueue>,
}

impl ResponseStream {
    pub fn new(events: Arc<EventQueue>) -> Arc<Self> {
        Arc::new(ResponseStream {
            state: Mutex::new(ResponseStreamState {
                chunks: VecDeque::new(),
                buffered: 0,
                finished: false,
                aborted: false,
                abort_flushed: false,
                peer_gone: false,
                reader: None,
                writer: None,
            }),
            drained: Condvar::new(),
            events,
        })
    }

    /// Queues a chunk; when that fills the buffer, parks the waiter.
    pub fn write(&self, chunk: Bytes, waiter: impl FnOnce() -> Waiter) -> WriteResult {
        let mut state = self.state.lock();
        let result = Self::queue(&mut state, chunk);
        if let WriteResult::Wait = result {
            state.writer = Some(waiter());
        }
        result
    }

    /// Queues a chunk without waiting: `Wait` says the buffer is full, and a
    /// thread should block in `wait_drained` before it writes more.
    pub fn write_nowait(&self, chunk: Bytes) -> WriteResult {
        Self::queue(&mut self.state.lock(), chunk)
    }

    /// Blocks the calling thread until hyper has sent half of the buffer;
    /// false when the client went away instead.
    pub fn wait_drained(&self) -> bool {
        let mut state = self.state.lock();
        while state.buffered > RESPONSE_HIGH_WATER / 2 && !state.peer_gone {
            self.drained.wait(&mut state);
        }
        !state.peer_gone
    }

    fn queue(state: &mut ResponseStreamState, chunk: Bytes) -> WriteResult {
        if state.peer_gone {
            return WriteResult::PeerGone;
        }
        if !chunk.is_empty() {
            state.buffered += chunk.len();
            state.chunks.push_back(chunk);
            if let Some(reader) = state.reader.take() {
                reader.wake();
            }
        }
        if state.buffered > RESPONSE_HIGH_WATER {
            WriteResult::Wait
        } else {
            WriteResult::Ready
        }
    }

    /// Ends the body normally (`aborted == false`) or with an error that makes
    /// hyper reset the stream or close the connection.
    pub fn end(&self, aborted: bool) {
        let mut state = self.state.lock();
        state.finished = true;
        state.aborted |= aborted;
        if let Some(reader) = state.reader.take() {
            reader.wake();
        }
    }

    fn poll_chunk(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, std::io::Error>>> {
        let mut state = self.state.lock();
        if let Some(chunk) = state.chunks.pop_front() {
            state.buffered -= chunk.len();
            if state.buffered <= RESPONSE_HIGH_WATER / 2 {
                if let Some(writer) = state.writer.take() {
                    self.events.push(Event::Wake(writer));
                }
                self.drained.notify_all();
            }
            return Poll::Ready(Some(Ok(chunk)));
        }
        if state.aborted {
            if !state.abort_flushed {
                // hyper flushes its buffer when the body is not ready; only
                // then does the error cut the connection, so the client gets
                // what was sent before the abort.
                state.abort_flushed = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            return Poll::Ready(Some(Err(std::io::Error::other("response aborted by the application"))));
        }
        if state.finished {
            return Poll::Ready(None);
        }
        state.reader = Some(cx.waker().clone());
        Poll::Pending
    }

    /// hyper let go of the body; true when that was before its end.
    fn peer_gone(&self) -> bool {
        let mut state = self.state.lock();
        let cut_short = !state.finished;
        state.peer_gone |= cut_short;
        if let Some(writer) = state.writer.take() {
            self.events.push(Event::Wake(writer));
        }
        self.drained.notify_all();
        cut_short
    }
}

/// What hyper sends as a response body.
pub enum ResponseBody {
    Full(Option<Bytes>),
    Stream(StreamBody),
    /// A body produced natively by other means (the socket bridge's).
    Boxed(http_body_util::combinators::BoxBody<Bytes, std::io::Error>),
}

impl ResponseBody {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        ResponseBody::Full((!bytes.is_empty()).then_some(bytes))
    }

    pub fn empty() -> Self {
        ResponseBody::Full(None)
    }
}

/// hyper's handle on a `ResponseStream`; when hyper drops it before the end,
/// the client went away: a blocked writer and a parked `wait_disconnect`
/// (ASGI's `http.disconnect`) are both told, even if the app writes nothing.
pub struct StreamBody {
    stream: Arc<ResponseStream>,
    exchange: Weak<Exchange>,
}

impl StreamBody {
    pub fn new(stream: Arc<ResponseStream>, exchange: &Arc<Exchange>) -> Self {
        StreamBody { stream, exchange: Arc::downgrade(exchange) }
    }
}

impl Drop for StreamBody {
    fn drop(&mut self) {
        if self.stream.peer_gone() {
            if let Some(exchange) = self.exchange.upgrade() {
                exchange.abandon();
            }
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ResponseBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ResponseBody::Stream(stream) => stream.stream.poll_chunk(cx).map(|c| c.map(|r| r.map(Frame::data))),
            ResponseBody::Boxed(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Boxed(body) => body.is_end_stream(),
            _ => matches!(self, ResponseBody::Full(None)),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            ResponseBody::Stream(_) => SizeHint::default(),
            ResponseBody::Boxed(body) => body.size_hint(),
        }
    }
}
