//! One connection to Python, multiplexed: the streams on it, their flow
//! control windows, and the loops that read and write its frames.

use super::*;

/// What the writer task sends: a frame, or a header and its payload
/// (a body chunk goes out as the client gave it, uncopied).
pub(super) struct Out(pub(super) Bytes, pub(super) Bytes);

/// Data bytes either side may send on a stream before the other grants more.
pub const WINDOW: usize = 256 * 1024;
/// Consumed bytes are granted back once this many gathered (fewer, larger
/// window frames; a small body never needs one).
pub(super) const GRANT_AT: usize = WINDOW / 4;
/// The send buffer asked for on a Unix bridge socket, as Python's end asks
/// for its own (`SEND_BUFFER` in bridge.py), so that both directions have
/// the same room; the kernel caps it at net.core.wmem_max.
pub(super) const SEND_BUFFER: usize = 1024 * 1024;

/// Where Python listens: `unix:/path` (`unix:@name`: Linux abstract
/// namespace) or `tcp:127.0.0.1:port`.
#[derive(Clone, Debug)]
pub enum Address {
    #[cfg(unix)]
    Unix(std::path::PathBuf),
    Tcp(SocketAddr),
}

impl Address {
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            #[cfg(unix)]
            {
                if path.is_empty() {
                    return Err("bridge_address: empty Unix socket path".into());
                }
                // tokio connects a path starting with NUL in the abstract namespace.
                let path = match path.strip_prefix('@') {
                    Some(name) => format!("\0{name}"),
                    None => path.to_owned(),
                };
                return Ok(Address::Unix(path.into()));
            }
            #[cfg(not(unix))]
            {
                let _ = path;
                return Err("bridge_address: Unix sockets are not available here; use tcp:127.0.0.1:PORT".into());
            }
        }
        if let Some(addr) = text.strip_prefix("tcp:") {
            return addr.parse().map(Address::Tcp).map_err(|_| format!("bridge_address: not an IP:port: {addr:?}"));
        }
        Err(format!("bridge_address must start with unix: or tcp:, not {text:?}"))
    }
}

// ------------------------------------------------------------------ streams

pub(super) enum ReadHalf {
    #[cfg(unix)]
    Unix(tokio::net::unix::OwnedReadHalf),
    Tcp(tokio::net::tcp::OwnedReadHalf),
}

pub(super) enum WriteHalf {
    #[cfg(unix)]
    Unix(tokio::net::unix::OwnedWriteHalf),
    Tcp(tokio::net::tcp::OwnedWriteHalf),
}

impl AsyncRead for ReadHalf {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            #[cfg(unix)]
            ReadHalf::Unix(half) => Pin::new(half).poll_read(cx, buf),
            ReadHalf::Tcp(half) => Pin::new(half).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            #[cfg(unix)]
            WriteHalf::Unix(half) => Pin::new(half).poll_write(cx, buf),
            WriteHalf::Tcp(half) => Pin::new(half).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            #[cfg(unix)]
            WriteHalf::Unix(half) => Pin::new(half).poll_write_vectored(cx, bufs),
            WriteHalf::Tcp(half) => Pin::new(half).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            #[cfg(unix)]
            WriteHalf::Unix(half) => Pin::new(half).poll_flush(cx),
            WriteHalf::Tcp(half) => Pin::new(half).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            #[cfg(unix)]
            WriteHalf::Unix(half) => Pin::new(half).poll_shutdown(cx),
            WriteHalf::Tcp(half) => Pin::new(half).poll_shutdown(cx),
        }
    }
}

// ------------------------------------------------------------------ frames

/// What the reader task hands one stream: its frames, and the send credit
/// the other side's window frames grant. One allocation per stream: a
/// channel and a credit cell of their own cost more than the exchange's
/// own frames.
pub(super) struct Inbox {
    pub(super) frames: Mutex<Frames>,
    pub(super) granted: AtomicUsize,
    pub(super) more: Notify,
}

#[derive(Default)]
pub(super) struct Frames {
    pub(super) queue: VecDeque<FrameIn>,
    pub(super) waker: Option<Waker>,
    /// The connection failed: nothing more will come.
    pub(super) closed: bool,
}

impl Inbox {
    pub(super) fn push(&self, frame: FrameIn) {
        self.update(|frames| frames.queue.push_back(frame));
    }

    pub(super) fn close(&self) {
        self.update(|frames| frames.closed = true);
    }

    /// Changes the frames under the lock, then wakes the stream's reader.
    pub(super) fn update(&self, change: impl FnOnce(&mut Frames)) {
        let waker = {
            let mut frames = self.frames.lock();
            change(&mut frames);
            frames.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// The next frame; None once the connection failed and every frame
    /// that came before is taken.
    pub(super) fn poll_frame(&self, cx: &mut Context<'_>) -> Poll<Option<FrameIn>> {
        let mut frames = self.frames.lock();
        if let Some(frame) = frames.queue.pop_front() {
            return Poll::Ready(Some(frame));
        }
        if frames.closed {
            return Poll::Ready(None);
        }
        if !frames.waker.as_ref().is_some_and(|waker| waker.will_wake(cx.waker())) {
            frames.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

pub(super) struct Streams {
    pub(super) map: HashMap<u32, Arc<Inbox>>,
    pub(super) next: u32,
    /// The connection failed or was shut down: no new streams.
    pub(super) closed: bool,
}

/// One connection to Python and the streams on it. A reader task hands each
/// frame to its stream; a writer task writes what every stream sends, as
/// many frames at once as are waiting.
pub(super) struct Link {
    pub(super) out: mpsc::UnboundedSender<Out>,
    pub(super) streams: Mutex<Streams>,
    /// Fired when the connection fails or shuts down: both tasks stop and
    /// the socket closes.
    pub(super) dead: CancellationToken,
    pub(super) failure: Mutex<Option<BridgeError>>,
}

impl Link {
    pub(super) fn start(reader: ReadHalf, writer: WriteHalf, hello: Bytes) -> Arc<Link> {
        let (out, queue) = mpsc::unbounded_channel();
        let _ = out.send(Out(hello, Bytes::new()));
        let link = Arc::new(Link {
            out,
            streams: Mutex::new(Streams { map: HashMap::new(), next: 1, closed: false }),
            dead: CancellationToken::new(),
            failure: Mutex::new(None),
        });
        tokio::spawn(read_loop(FrameReader::new(reader), link.clone()));
        tokio::spawn(write_loop(writer, queue, link.clone()));
        link
    }

    pub(super) fn send(&self, frame: Bytes) {
        let _ = self.out.send(Out(frame, Bytes::new()));
    }

    /// The connection is unusable: every stream on it ends (its exchange
    /// sees `error`), and it closes.
    pub(super) fn fail(&self, error: BridgeError) {
        self.failure.lock().get_or_insert(error);
        let orphans = {
            let mut streams = self.streams.lock();
            streams.closed = true;
            std::mem::take(&mut streams.map)
        };
        orphans.values().for_each(|inbox| inbox.close());
        self.dead.cancel();
    }

    pub(super) fn error(&self) -> BridgeError {
        self.failure.lock().clone().unwrap_or(BridgeError::Closed)
    }

    /// A new stream; None once the connection failed.
    pub(super) fn open(self: &Arc<Self>) -> Option<Stream> {
        let inbox =
            Arc::new(Inbox { frames: Mutex::default(), granted: AtomicUsize::new(WINDOW), more: Notify::new() });
        let id = {
            let mut streams = self.streams.lock();
            if streams.closed {
                return None;
            }
            let id = streams.next;
            streams.next = streams.next.checked_add(1).unwrap_or(1);
            streams.map.insert(id, inbox.clone());
            id
        };
        Some(Stream { link: self.clone(), id, inbox, unacknowledged: 0, end: End::Open, pump: None })
    }

    /// Hands a frame to its stream. One for a stream that is over here is
    /// dropped: it crossed our abort or the stream's end.
    pub(super) fn deliver(&self, frame: FrameIn) -> Result<(), BridgeError> {
        let streams = self.streams.lock();
        let Some(inbox) = streams.map.get(&frame.stream) else { return Ok(()) };
        if frame.kind == kind::WINDOW {
            let bytes: [u8; 4] =
                frame.payload[..].try_into().map_err(|_| BridgeError::Malformed("window frame size"))?;
            inbox.granted.fetch_add(u32::from_be_bytes(bytes) as usize, Ordering::AcqRel);
            inbox.more.notify_one();
        } else {
            inbox.push(frame);
        }
        Ok(())
    }
}

pub(super) async fn read_loop(mut reader: FrameReader, link: Arc<Link>) {
    let error = loop {
        let next = tokio::select! {
            biased;
            _ = link.dead.cancelled() => return,
            next = reader.next() => next,
        };
        match next {
            Ok(Some(frame)) => {
                if let Err(error) = link.deliver(frame) {
                    break error;
                }
            }
            Ok(None) => break BridgeError::Closed,
            Err(error) => break error,
        }
    };
    link.fail(error);
}

/// Writes everything in `queue` with vectored writes.
pub(super) async fn write_all(io: &mut WriteHalf, queue: &mut VecDeque<Bytes>) -> io::Result<()> {
    while !queue.is_empty() {
        let slices: Vec<io::IoSlice<'_>> = queue.iter().take(WRITE_SLICES).map(|b| io::IoSlice::new(b)).collect();
        let mut written = io.write_vectored(&slices).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let front = queue.front_mut().expect("written bytes came from the queue");
            if written >= front.len() {
                written -= front.len();
                queue.pop_front();
            } else {
                front.advance(written);
                written = 0;
            }
        }
    }
    Ok(())
}

pub(super) async fn write_loop(mut io: WriteHalf, mut queue: mpsc::UnboundedReceiver<Out>, link: Arc<Link>) {
    let mut pending = VecDeque::new();
    loop {
        let next = tokio::select! {
            biased;
            _ = link.dead.cancelled() => return,
            next = queue.recv() => next,
        };
        let Some(mut out) = next else { return };
        // One scheduler turn for the other exchanges that are ready now to
        // queue their frames: they then leave in this write, and Python is
        // woken once for all of them rather than once per frame.
        tokio::task::yield_now().await;
        loop {
            pending.push_back(out.0);
            if !out.1.is_empty() {
                pending.push_back(out.1);
            }
            if pending.len() >= WRITE_SLICES {
                break;
            }
            match queue.try_recv() {
                Ok(more) => out = more,
                Err(_) => break,
            }
        }
        let written = tokio::select! {
            biased;
            _ = link.dead.cancelled() => return,
            written = write_all(&mut io, &mut pending) => written,
        };
        if let Err(error) = written {
            link.fail(error.into());
            return;
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
pub(super) enum End {
    /// The response is still to come (or to finish).
    Open,
    /// The response end was read.
    Complete,
    /// Python aborted the stream.
    Aborted,
}

/// An exchange's end of its stream. Dropped before the response is complete
/// (client gone, timeout, a bad frame), it tells Python with an abort.
pub(super) struct Stream {
    pub(super) link: Arc<Link>,
    pub(super) id: u32,
    pub(super) inbox: Arc<Inbox>,
    /// Response data taken but not yet granted back.
    pub(super) unacknowledged: usize,
    pub(super) end: End,
    pub(super) pump: Option<Pump>,
}

impl Stream {
    pub(super) async fn next(&mut self) -> Result<FrameIn, BridgeError> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    pub(super) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<FrameIn, BridgeError>> {
        self.inbox.poll_frame(cx).map(|frame| frame.ok_or_else(|| self.link.error()))
    }

    /// `size` data bytes were passed on: Python may send as many more.
    pub(super) fn consumed(&mut self, size: usize) {
        self.unacknowledged += size;
        if self.unacknowledged >= GRANT_AT {
            self.link.send(frame(kind::WINDOW, self.id, &(self.unacknowledged as u32).to_be_bytes()));
            self.unacknowledged = 0;
        }
    }

    pub(super) fn sender(&self) -> Sender {
        Sender { link: self.link.clone(), id: self.id, inbox: self.inbox.clone(), available: 0 }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.link.streams.lock().map.remove(&self.id);
        if self.end == End::Open {
            self.link.send(frame(kind::ABORT, self.id, &[ABORT_CLIENT_GONE]));
        }
        if let Some(pump) = &self.pump {
            if self.end == End::Complete {
                // Whatever of the body is still to come, nobody will read:
                // the pump drops it and ends the request with a discard.
                pump.signals.discard.cancel();
            } else {
                pump.signals.stop.cancel();
            }
        }
    }
}

/// Sends data frames on a stream within the credit Python granted.
pub(super) struct Sender {
    pub(super) link: Arc<Link>,
    pub(super) id: u32,
    pub(super) inbox: Arc<Inbox>,
    pub(super) available: usize,
}

impl Sender {
    /// How many of `want` (> 0) bytes may go now, once any may; None when
    /// the connection fails first.
    pub(super) async fn reserve(&mut self, want: usize) -> Option<usize> {
        loop {
            self.available += self.inbox.granted.swap(0, Ordering::AcqRel);
            if self.available > 0 {
                let size = want.min(self.available);
                self.available -= size;
                return Some(size);
            }
            tokio::select! {
                biased;
                _ = self.link.dead.cancelled() => return None,
                _ = self.inbox.more.notified() => {}
            }
        }
    }

    pub(super) fn send(&self, kind: u8, payload: &[u8]) {
        self.link.send(frame(kind, self.id, payload));
    }

    /// A data frame: header (and `flag`, for a WebSocket message) and the
    /// data as it is.
    pub(super) fn send_data(&self, kind: u8, flag: Option<u8>, data: Bytes) {
        let mut head = BytesMut::with_capacity(4 + HEADER + 1);
        put_header(&mut head, kind, self.id, data.len() + usize::from(flag.is_some()));
        if let Some(flag) = flag {
            head.put_u8(flag);
        }
        let _ = self.link.out.send(Out(head.freeze(), data));
    }
}

// ------------------------------------------------------------------ exchanges

/// Connecting to a Unix listener whose accept queue is momentarily full
/// fails at once (EAGAIN): try a few more times before calling it a failure.
pub(super) async fn connect_retrying<S, F, Fut>(connect: F) -> io::Result<S>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = io::Result<S>>,
{
    let mut attempt = 0u32;
    loop {
        match connect().await {
            Ok(stream) => return Ok(stream),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock && attempt < 20 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(error) => return Err(error),
        }
    }
}
