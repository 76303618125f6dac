//! The one road from tokio threads to the asyncio loop: a queue of events and a
//! wake-up byte written only when the loop is not already due to drain it.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
    Wake(Py<PyAny>),
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

/// Tokio threads never take the GIL: they queue events and, once per batch,
/// wake the consumer (one byte on a socket, or one condvar signal).
pub struct EventQueue {
    events: Mutex<VecDeque<Event>>,
    wake_pending: AtomicBool,
    consumer: Consumer,
    /// Set once the server is closed and every event before that is queued.
    closed: AtomicBool,
}

impl EventQueue {
    pub fn new(consumer: Consumer) -> Self {
        EventQueue {
            events: Mutex::new(VecDeque::with_capacity(64)),
            wake_pending: AtomicBool::new(false),
            consumer,
            closed: AtomicBool::new(false),
        }
    }

    pub fn push(&self, event: Event) {
        self.events.lock().push_back(event);
        self.wake();
    }

    fn wake(&self) {
        match &self.consumer {
            // A wake-up byte stays in the socket until the loop reads it, so
            // one per batch is enough.
            Consumer::Loop(signal) => {
                if !self.wake_pending.swap(true, Ordering::AcqRel) {
                    signal.notify();
                }
            }
            // A condvar signal is lost when nobody waits, so every push
            // signals; with no waiter that is one atomic load.
            Consumer::Thread(condvar) => {
                condvar.notify_one();
            }
        }
    }

    /// Whether threads consume the requests (rather than an asyncio loop).
    pub fn is_thread(&self) -> bool {
        matches!(self.consumer, Consumer::Thread(_))
    }

    /// No event will follow: a waiting consumer thread returns.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let _guard = self.events.lock();
        self.wake();
    }

    /// Blocks until there is a request and takes it; None once closed and
    /// empty. For a pool of consumer threads (WSGI).
    pub fn wait_one(&self) -> Option<Arc<Exchange>> {
        let Consumer::Thread(condvar) = &self.consumer else { return None };
        let mut events = self.events.lock();
        loop {
            if let Some(exchange) = std::iter::from_fn(|| events.pop_front()).find_map(Event::into_request) {
                return Some(exchange);
            }
            if self.closed.load(Ordering::Acquire) {
                // Let the other consumers see the end too.
                condvar.notify_all();
                return None;
            }
            condvar.wait(&mut events);
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
        }
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
