//! The process-wide tokio runtime that owns every socket.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

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
    // musl's sched_param has more fields than glibc's: start from all zeros.
    // SAFETY: sched_param holds only integers, for which zero is a valid value.
    let mut param: libc::sched_param = unsafe { std::mem::zeroed() };
    param.sched_priority = 0;
    // SAFETY: plain syscall on the calling thread; failure leaves the default policy.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn yield_to_python_on_wake() {}

/// Memory was freed for good (an idle connection let go of its buffers).
static FREED: AtomicBool = AtomicBool::new(false);
/// A task that returns freed memory to the OS is running.
static TIDYING: AtomicBool = AtomicBool::new(false);
/// How long frees are gathered before their memory goes back to the OS.
const TIDY_AFTER: Duration = Duration::from_secs(1);

/// Gives the memory just freed back to the OS within about a second.
/// mimalloc purges freed memory a second after the free, and only when it
/// next allocates or frees a page: a server whose connections had all gone idle
/// (HTTP/1.1 ones parked, their buffers freed) did neither and kept it all
/// (benchmark/idle_connections.py). Purging at every free instead
/// (mimalloc's purge delay 0) costs server CPU on every request under load.
pub fn return_freed_memory() {
    FREED.store(true, Ordering::Release);
    if !TIDYING.swap(true, Ordering::AcqRel) {
        runtime().spawn(tidy());
    }
}

/// Returns freed memory to the OS a second after frees, again each second
/// while they go on, then stops.
async fn tidy() {
    loop {
        FREED.store(false, Ordering::Release);
        tokio::time::sleep(TIDY_AFTER).await;
        // SAFETY: mimalloc allows a collection from any thread at any time;
        // forced, it purges what was freed without waiting out its delay.
        unsafe { libmimalloc_sys::mi_collect(true) };
        if !FREED.load(Ordering::Acquire) {
            TIDYING.store(false, Ordering::Release);
            // A free between the two lines above saw a tidy still running.
            if !FREED.load(Ordering::Acquire) || TIDYING.swap(true, Ordering::AcqRel) {
                return;
            }
        }
    }
}

/// The most I/O threads a process may ask for.
const MAX_THREADS: usize = 1024;

/// Held while the runtime is being built, so that two servers created at
/// once cannot both build one.
static STARTING: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

/// The runtime, started by the first server with `threads` workers, or
/// else `SERVER_NATIVE_THREADS`, or else one per core this process may run
/// on (its CPU affinity, so a server pinned with `taskset` to one core gets
/// one): with requests announced to Python only when a worker runs out of
/// work, a second worker on the same core only takes time from Python
/// (the pinned Starlette case of the benchmark). Started on first
/// use rather than at import, so a process that forks workers before
/// serving gets its runtime threads in the child, where they are needed.
///
/// The runtime is process-wide: once it runs, asking for another number of
/// threads is an error.
pub fn start(threads: Option<usize>) -> Result<&'static Runtime, String> {
    if let Some(threads) = threads {
        check_count(threads, "runtime_threads")?;
    }
    let _starting = STARTING.lock();
    if let Some(runtime) = RUNTIME.get() {
        let running = runtime.metrics().num_workers();
        return match threads {
            Some(wanted) if wanted != running => Err(format!(
                "runtime_threads={wanted} cannot apply: the process-wide I/O runtime already runs {running} threads \
                 (started by the first server); give every server of a process the same value"
            )),
            _ => Ok(runtime),
        };
    }
    let workers = match threads {
        Some(threads) => threads,
        None => {
            from_environment()?.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()).min(64))
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("server-native-io")
        .on_thread_start(|| {
            yield_to_python_on_wake();
            crate::boundary::queue::mark_io_thread();
        })
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the I/O runtime with {workers} threads: {e}"))?;
    Ok(RUNTIME.get_or_init(|| runtime))
}

/// The running runtime (every caller runs after a server started it).
pub fn runtime() -> &'static Runtime {
    match RUNTIME.get() {
        Some(runtime) => runtime,
        None => start(None).unwrap_or_else(|error| panic!("{error}")),
    }
}

/// `SERVER_NATIVE_THREADS`, when set (and not empty).
fn from_environment() -> Result<Option<usize>, String> {
    const NAME: &str = "SERVER_NATIVE_THREADS";
    let Some(value) = std::env::var_os(NAME).filter(|v| !v.is_empty()) else { return Ok(None) };
    let text = value.to_string_lossy();
    let threads = text.trim().parse::<usize>().map_err(|_| count_error(NAME, &format!("{text:?}")))?;
    check_count(threads, NAME)?;
    Ok(Some(threads))
}

fn check_count(threads: usize, name: &str) -> Result<(), String> {
    if (1..=MAX_THREADS).contains(&threads) {
        Ok(())
    } else {
        Err(count_error(name, &threads.to_string()))
    }
}

fn count_error(name: &str, value: &str) -> String {
    format!("{name} must be a number of threads from 1 to {MAX_THREADS}, not {value}")
}
