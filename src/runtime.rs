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
    // musl's sched_param has more fields than glibc's: start from all zeros.
    // SAFETY: sched_param holds only integers, for which zero is a valid value.
    let mut param: libc::sched_param = unsafe { std::mem::zeroed() };
    param.sched_priority = 0;
    // SAFETY: plain syscall on the calling thread; failure leaves the default policy.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn yield_to_python_on_wake() {}

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
/// (pinned Starlette: 29k req/s with one, 20k with two). Started on first
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
        None => from_environment()?
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()).min(64)),
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
