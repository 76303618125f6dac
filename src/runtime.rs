//! The process-wide tokio runtime that owns every socket.

use std::sync::OnceLock;

use tokio::runtime::Runtime;

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// Created on first use rather than at import, so a process that forks workers
/// before serving gets its runtime threads in the child, where they are needed.
///
/// At least two workers even on one core: with a single worker, every
/// response handed over from the Python thread must wake the one thread that
/// is also the I/O driver, and a server pinned to one core measured half the
/// requests per second of two workers on the same core.
pub fn runtime() -> &'static Runtime {
    RUNTIME.get_or_init(|| {
        let workers = std::env::var("SERVER_NATIVE_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()).max(2))
            .clamp(1, 64);
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("server-native-io")
            .enable_all()
            .build()
            .expect("cannot start the tokio runtime")
    })
}
