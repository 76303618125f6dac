//! What the native side decides on its own (a refused request, a framing
//! error of the application, a failed accept or handshake) is told through
//! Python's `logging`, as `server_native.error`. I/O threads never take the
//! GIL for that: they queue a record here, and each server's event loop
//! takes the queued records a few times a second and emits them.
//!
//! A flood (a client sending garbage in a loop, a descriptor limit hit on
//! every accept) would drown the log and cost a Python call per record, so
//! each kind of record is let through at most once per second; the ones held
//! back are counted and the count is told with the next one let through, or
//! when the second is over.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Python's logging levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Debug = 10,
    Info = 20,
    Warning = 30,
    Error = 40,
}

/// What a record is about; each kind has its own flood limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A listener could not accept a connection.
    Accept,
    /// HTTP/3 was not started.
    Http3,
    /// A TLS handshake failed.
    TlsHandshake,
    /// The socket bridge could not reach Python, or lost it.
    Bridge,
    /// An application's response could not be sent as it was given.
    Response,
    /// A request refused natively (malformed, too slow).
    Request,
    /// A static file request not answered with the file.
    StaticFile,
}

impl Kind {
    fn plural(self) -> &'static str {
        match self {
            Kind::Accept => "accept errors",
            Kind::Http3 => "HTTP/3 messages",
            Kind::TlsHandshake => "TLS handshake failures",
            Kind::Bridge => "socket bridge errors",
            Kind::Response => "response errors",
            Kind::Request => "refused requests",
            Kind::StaticFile => "static file refusals",
        }
    }
}

/// How often each kind of record is let through, per server.
const WINDOW: Duration = Duration::from_secs(1);
/// Records waiting for Python beyond this are dropped: with one record per
/// kind, server and second let through, only a loop that stopped emitting
/// gets here.
const MAX_QUEUED: usize = 1024;

pub struct Record {
    pub level: Level,
    pub message: String,
}

/// Where records come from: one server, whose floods are limited on their
/// own (another server's flood must not silence it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Source(u64);

impl Source {
    pub fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Source(NEXT.fetch_add(1, Ordering::Relaxed))
    }

    /// Queues a record for Python's `logging`; never blocks on Python.
    pub fn report(self, kind: Kind, level: Level, message: impl Into<String>) {
        let now = Instant::now();
        let mut state = QUEUE.lock();
        let flood = state.floods.entry((self, kind)).or_default();
        if flood.since.is_some_and(|since| now.duration_since(since) < WINDOW) {
            flood.held_back += 1;
            flood.level = flood.level.max(Some(level));
            return;
        }
        let mut message = message.into();
        if flood.held_back > 0 {
            message.push_str(&format!(
                " ({} more {} in the last second were not logged)",
                flood.held_back,
                kind.plural()
            ));
        }
        *flood = Flood { since: Some(now), held_back: 0, level: None };
        push(&mut state, Record { level, message });
    }
}

#[derive(Default, Clone, Copy)]
struct Flood {
    /// When the last record of this kind was let through.
    since: Option<Instant>,
    held_back: u32,
    /// The highest level held back.
    level: Option<Level>,
}

#[derive(Default)]
struct State {
    records: VecDeque<Record>,
    floods: HashMap<(Source, Kind), Flood>,
}

static QUEUE: LazyLock<Mutex<State>> = LazyLock::new(Mutex::default);

fn push(state: &mut State, record: Record) {
    if state.records.len() < MAX_QUEUED {
        state.records.push_back(record);
    }
}

/// The records queued so far; counts held back for longer than a second
/// come out as records of their own.
pub fn take() -> Vec<Record> {
    let mut state = QUEUE.lock();
    let now = Instant::now();
    let mut told = Vec::new();
    // A second over: its count is told, and the flood forgotten.
    state.floods.retain(|&(_, kind), flood| {
        let over = flood.since.is_none_or(|since| now.duration_since(since) >= WINDOW);
        if over && flood.held_back > 0 {
            let message = format!("{} more {} in the last second were not logged", flood.held_back, kind.plural());
            told.push(Record { level: flood.level.unwrap_or(Level::Info), message });
        }
        !over
    });
    for record in told {
        push(&mut state, record);
    }
    state.records.drain(..).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_let_through_once_a_second_per_server_and_counted() {
        let (one, other) = (Source::new(), Source::new());
        one.report(Kind::Accept, Level::Error, "first");
        for _ in 0..5 {
            one.report(Kind::Accept, Level::Warning, "again");
        }
        other.report(Kind::Accept, Level::Error, "another server");
        one.report(Kind::Bridge, Level::Error, "another kind");
        let messages: Vec<String> = take().into_iter().map(|r| r.message).collect();
        assert_eq!(messages, ["first", "another server", "another kind"]);
        std::thread::sleep(WINDOW);
        let records = take();
        assert_eq!(records.len(), 1, "a count only for the flood held back");
        assert_eq!(records[0].message, "5 more accept errors in the last second were not logged");
        assert_eq!(records[0].level, Level::Warning);
        one.report(Kind::Accept, Level::Error, "after the second");
        assert_eq!(take()[0].message, "after the second");
    }
}
