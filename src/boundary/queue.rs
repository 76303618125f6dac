//! The one road from tokio threads to the asyncio loop: a queue of events and a
//! wake-up byte written only when the loop is not already due to drain it.

use std::cell::Cell;
use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use pyo3::prelude::*;

use crate::exchange::Exchange;

/// What the loop thread picks up in one `drain()`.
pub enum Event {
    /// A new request for the application.
    Request(Arc<Exchange>),
    /// A Python future parked by the application (body data, writable,
    /// closed). Only a loop consumer parks futures: consumer threads wait on
    /// the exchange itself (`NativeRequest.read_blocking`/`write_blocking`).
    Wake(Waiter),
}

/// The asyncio future of an operation that had to wait (body data, room to
/// write, a disconnect): the core keeps it without knowing what it is and
/// hands it back in `Event::Wake`, and the loop resolves it.
pub struct Waiter(Py<PyAny>);

impl Waiter {
    pub fn new(future: Py<PyAny>) -> Self {
        Waiter(future)
    }

    pub fn into_future(self) -> Py<PyAny> {
        self.0
    }
}

impl Event {
    /// A thread consumer's events are all requests (see `Wake`).
    fn into_request(self) -> Option<Arc<Exchange>> {
        match self {
            Event::Request(exchange) => Some(exchange),
            Event::Wake(_) => None,
        }
    }
}

/// How the consumer is woken.
pub enum Consumer {
    /// An asyncio loop watching a socket with `add_reader`.
    Loop(WakeSignal),
    /// Python threads blocked in `wait` (the `native_direct` thread) or
    /// `wait_one` (the WSGI pool).
    Thread(Condvar),
}

/// How long queued requests wait for a busy pool thread to make progress
/// before an idle one is woken for them.
const POOL_STALL: Duration = Duration::from_millis(1);

/// At most this many events wait in a queue before a new request is
/// announced at once, even while the I/O thread still has work.
const ANNOUNCE_BATCH: usize = 32;

thread_local! {
    /// Whether this consumer thread holds a request taken with `wait_one`.
    static IN_REQUEST: Cell<bool> = const { Cell::new(false) };
    /// Whether this is a tokio worker, whose pushes are announced late.
    static IO_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// For tokio's `on_thread_start`.
pub fn mark_io_thread() {
    IO_THREAD.set(true);
}

/// Tokio threads never take the GIL: they queue events and, once per batch,
/// wake the consumer (one byte on a socket, or one condvar signal).
///
/// A pool of consumer threads (WSGI) shares the GIL, so waking a second
/// thread while one is running Python only makes them trade the GIL per
/// request (the pinned WSGI case of the benchmark). A request that comes while a pool thread is busy is left for that
/// thread to take when it is done; an idle thread is woken only when no busy
/// thread finishes anything for `POOL_STALL` (it is blocked: a slow upstream,
/// a sleep) or when a busy thread blocks natively on its client.
pub struct EventQueue {
    events: Mutex<VecDeque<Event>>,
    wake_pending: AtomicBool,
    consumer: Consumer,
    /// Set once the server is closed and every event before that is queued.
    closed: AtomicBool,
    /// Pool threads that hold a request and are not blocked natively.
    busy: AtomicUsize,
    /// Requests pool threads have finished: the stall watchdog's sign of life.
    finished: AtomicU64,
    watchdog: AtomicBool,
    /// Set once a thread consumes with `wait_one`.
    pool: AtomicBool,
    /// An announcement of the requests pushed by I/O threads is on its way.
    announcing: AtomicBool,
}

impl EventQueue {
    pub fn new(consumer: Consumer) -> Self {
        EventQueue {
            events: Mutex::new(VecDeque::with_capacity(64)),
            wake_pending: AtomicBool::new(false),
            consumer,
            closed: AtomicBool::new(false),
            busy: AtomicUsize::new(0),
            finished: AtomicU64::new(0),
            watchdog: AtomicBool::new(false),
            pool: AtomicBool::new(false),
            announcing: AtomicBool::new(false),
        }
    }

    pub fn push(&self, event: Event) {
        self.events.lock().push_back(event);
        self.wake();
    }

    /// Queues a new request. Pushed by an I/O thread, it is announced after
    /// the tasks already due to run there: the other connections read in
    /// the same batch queue their requests first, and the consumer is woken
    /// once for all of them. Waking per request had the consumer (whom the
    /// scheduler favours on wake-up) take the core from the I/O thread once
    /// per request.
    pub fn push_request(self: &Arc<Self>, exchange: Arc<Exchange>) {
        let queued = {
            let mut events = self.events.lock();
            events.push_back(Event::Request(exchange));
            events.len()
        };
        if !IO_THREAD.get() || queued >= ANNOUNCE_BATCH {
            self.announce();
        } else if !self.announcing.swap(true, Ordering::AcqRel) {
            let queue = self.clone();
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                queue.announcing.store(false, Ordering::Release);
                queue.announce();
            });
        }
    }

    /// Wakes the consumer for queued requests; for a pool with a busy
    /// thread, that thread takes them next unless the watchdog sees it stall.
    fn announce(self: &Arc<Self>) {
        let signalled = self.busy.load(Ordering::Acquire) == 0 && self.wake();
        if !signalled && self.pool.load(Ordering::Relaxed) {
            self.watch_stall();
        }
    }

    /// While requests wait, checks every `POOL_STALL` that the busy threads
    /// finish some; if none did, wakes an idle thread.
    fn watch_stall(self: &Arc<Self>) {
        if self.watchdog.swap(true, Ordering::AcqRel) {
            return;
        }
        let queue = self.clone();
        crate::runtime::runtime().spawn(async move {
            loop {
                let seen = queue.finished.load(Ordering::Acquire);
                tokio::time::sleep(POOL_STALL).await;
                if queue.events.lock().is_empty() {
                    break;
                }
                let stalled = queue.finished.load(Ordering::Acquire) == seen;
                match &queue.consumer {
                    Consumer::Thread(condvar) if stalled => {
                        condvar.notify_one();
                    }
                    _ => {}
                }
            }
            queue.watchdog.store(false, Ordering::Release);
            // A request pushed just before the flag fell found it still set.
            if !queue.events.lock().is_empty() && queue.busy.load(Ordering::Acquire) > 0 {
                queue.watch_stall();
            }
        });
    }

    /// Signals the consumer unless a signal is already on its way (false
    /// then). A wake-up byte stays in the socket until the loop reads it; a
    /// signalled thread looks at the whole queue before it waits again, and
    /// waking a second one meanwhile would only have two wait for the GIL.
    fn wake(&self) -> bool {
        if self.wake_pending.swap(true, Ordering::AcqRel) {
            return false;
        }
        match &self.consumer {
            Consumer::Loop(signal) => signal.notify(),
            Consumer::Thread(condvar) => {
                // Nobody waiting: a thread on its way back looks at the queue.
                if !condvar.notify_one() {
                    self.wake_pending.store(false, Ordering::Release);
                }
            }
        }
        true
    }

    /// Whether threads consume the requests (rather than an asyncio loop).
    pub fn is_thread(&self) -> bool {
        matches!(self.consumer, Consumer::Thread(_))
    }

    /// No event will follow: a waiting consumer thread returns.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let _guard = self.events.lock();
        match &self.consumer {
            Consumer::Loop(signal) => signal.notify(),
            Consumer::Thread(condvar) => {
                condvar.notify_all();
            }
        }
    }

    /// A pool thread is done with the request it took (if any).
    pub fn request_done(&self) {
        if IN_REQUEST.replace(false) {
            self.busy.fetch_sub(1, Ordering::AcqRel);
            self.finished.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn pop_request(&self, events: &mut VecDeque<Event>) -> Option<Arc<Exchange>> {
        let exchange = std::iter::from_fn(|| events.pop_front()).find_map(Event::into_request)?;
        IN_REQUEST.set(true);
        self.busy.fetch_add(1, Ordering::AcqRel);
        Some(exchange)
    }

    /// A queued request, without waiting: a pool thread that finds one keeps
    /// the GIL instead of handing it to another thread.
    pub fn try_take_one(&self) -> Option<Arc<Exchange>> {
        self.pop_request(&mut self.events.lock())
    }

    /// Runs `block` (a pool thread waiting on its client) with the thread
    /// counted as idle, so queued requests get another thread meanwhile.
    pub fn while_blocked<T>(&self, block: impl FnOnce() -> T) -> T {
        if !IN_REQUEST.get() {
            return block();
        }
        self.busy.fetch_sub(1, Ordering::AcqRel);
        if !self.events.lock().is_empty() {
            self.wake();
        }
        let result = block();
        self.busy.fetch_add(1, Ordering::AcqRel);
        result
    }

    /// Blocks until there is a request and takes it; None once closed and
    /// empty. For a pool of consumer threads (WSGI).
    pub fn wait_one(&self) -> Option<Arc<Exchange>> {
        let Consumer::Thread(condvar) = &self.consumer else { return None };
        self.pool.store(true, Ordering::Relaxed);
        let mut events = self.events.lock();
        loop {
            if let Some(exchange) = self.pop_request(&mut events) {
                return Some(exchange);
            }
            if self.closed.load(Ordering::Acquire) {
                // Let the other consumers see the end too.
                condvar.notify_all();
                return None;
            }
            condvar.wait(&mut events);
            self.wake_pending.store(false, Ordering::Release);
        }
    }

    /// Blocks until there are requests and takes them all; None once closed
    /// and empty. For the one `native_direct` thread.
    pub fn wait(&self) -> Option<Vec<Arc<Exchange>>> {
        let Consumer::Thread(condvar) = &self.consumer else { return None };
        let mut events = self.events.lock();
        loop {
            let requests: Vec<_> = events.drain(..).filter_map(Event::into_request).collect();
            if !requests.is_empty() {
                return Some(requests);
            }
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            condvar.wait(&mut events);
            self.wake_pending.store(false, Ordering::Release);
        }
    }

    /// Events waiting for the consumer.
    pub fn depth(&self) -> usize {
        self.events.lock().len()
    }

    /// Takes everything queued. The flag is cleared first, so an event pushed
    /// while the loop drains writes a new wake-up byte rather than being lost.
    pub fn take(&self) -> VecDeque<Event> {
        self.wake_pending.store(false, Ordering::Release);
        std::mem::take(&mut *self.events.lock())
    }
}

/// The write end of the loop's wake-up socket pair, duplicated so its lifetime
/// is ours. Writes never block: a full buffer already means "wake up".
pub struct WakeSignal {
    #[cfg(unix)]
    stream: std::os::unix::net::UnixStream,
    #[cfg(windows)]
    stream: std::net::TcpStream,
}

impl WakeSignal {
    /// `fd` is the `fileno()` of the Python socket; it is duplicated, not taken.
    pub fn from_fd(fd: i64) -> std::io::Result<Self> {
        #[cfg(unix)]
        let stream = {
            use std::os::fd::{BorrowedFd, OwnedFd};
            let raw = i32::try_from(fd).map_err(|_| std::io::ErrorKind::InvalidInput)?;
            // SAFETY: Python keeps the socket open for this call; we only clone it.
            let owned: OwnedFd = unsafe { BorrowedFd::borrow_raw(raw) }.try_clone_to_owned()?;
            std::os::unix::net::UnixStream::from(owned)
        };
        #[cfg(windows)]
        let stream = {
            use std::os::windows::io::{BorrowedSocket, OwnedSocket};
            let raw = u64::try_from(fd).map_err(|_| std::io::ErrorKind::InvalidInput)?;
            // SAFETY: Python keeps the socket open for this call; we only clone it.
            let owned: OwnedSocket = unsafe { BorrowedSocket::borrow_raw(raw as _) }.try_clone_to_owned()?;
            std::net::TcpStream::from(owned)
        };
        stream.set_nonblocking(true)?;
        Ok(WakeSignal { stream })
    }

    fn notify(&self) {
        let _ = (&self.stream).write(&[1]);
    }
}
