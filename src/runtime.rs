//! The process-wide tokio runtime that owns every socket.

use std::sync::OnceLock;

use tokio::runtime::Runtime;

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// I/O threads run under `SCHED_BATCH`: a response handed over by the Python
/// thread wakes one of them without preempting Python, so on a busy core
/// Python finishes its batch and the I/O thread then writes every response
/// at once, instead of the two trading the core once per request. Pinned to
/// one core this doubled FastAPI's requests per second and took the
/// Rust-only ceiling from 82k to 100k.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn yield_to_python_on_wake() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain syscall on the calling thread; failure leaves the default policy.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn yield_to_python_on_wake() {}

/// `mi_option_purge_delay`: its place in mimalloc's `mi_option_e` (mimalloc.h),
/// which the bindings do not name.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Memory the server frees goes back to the OS at once. mimalloc otherwise
/// purges it a second later, and only when it next allocates: a server whose
/// connections had all gone idle (HTTP/1.1 ones parked, their buffers freed)
/// allocated nothing more and kept it all (2,000 idle HTTP/1.1 connections:
/// 16 to 20 against 4 to 5 KiB of RSS each).
fn return_freed_memory_at_once() {
    // SAFETY: mimalloc reads its options at each use; setting one is allowed
    // at any time, from any thread.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

/// Created on first use rather than at import, so a process that forks workers
/// before serving gets its runtime threads in the child, where they are needed.
///
/// One worker per core this process may run on (its CPU affinity, so a
/// server pinned with `taskset` to one core gets one): with requests
/// announced to Python only when a worker runs out of work, a second worker
/// on the same core only takes time from Python (pinned Starlette: 29k req/s
/// with one, 20k with two). `SERVER_NATIVE_THREADS` overrides.
pub fn runtime() -> &'static Runtime {
    RUNTIME.get_or_init(|| {
        return_freed_memory_at_once();
        let workers = std::env::var("SERVER_NATIVE_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .clamp(1, 64);
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("server-native-io")
            .on_thread_start(|| {
                yield_to_python_on_wake();
                crate::boundary::queue::mark_io_thread();
            })
            .enable_all()
            .build()
            .expect("cannot start the tokio runtime")
    })
}
