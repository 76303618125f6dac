//! The native side of server_native: hyper, tokio and rustls own the sockets
//! and the protocols; Python owns the application.

#[macro_use]
mod write_through;

mod body;
mod boundary;
mod bridge;
mod compress;
mod config;
mod connection;
mod errors;
mod exchange;
mod framing;
mod guard;
mod http3;
mod listener;
mod log;
mod metrics;
mod permessage_deflate;
mod proxy_protocol;
mod runtime;
mod server;
mod service;
mod static_files;
mod tls;
mod websocket;

use pyo3::prelude::*;

/// The native heap: with glibc's malloc, buffers freed by one tokio worker
/// and reused by another spread over per-thread arenas, and a server's RSS
/// crept up for millions of requests; mimalloc keeps it flat (and is faster
/// at the small allocations every request makes). Local-dynamic TLS because
/// this library is loaded with dlopen.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Bumped whenever the Python package and this library stop fitting each
/// other; the loader refuses a library whose number differs.
const ABI_VERSION: u32 = 3;

#[pymodule]
mod _native {
    #[pymodule_export]
    use crate::boundary::asgi::bridge_asgi_scope;
    #[pymodule_export]
    use crate::boundary::bridge::bridge_response_head;
    #[pymodule_export]
    use crate::boundary::direct::DirectResponse;
    #[pymodule_export]
    use crate::boundary::log::take_log_records;
    #[pymodule_export]
    use crate::boundary::request::NativeRequest;
    #[pymodule_export]
    use crate::boundary::server::{tls_cipher_suites, NativeServer};
    #[pymodule_export]
    use crate::errors::{BodyTooLarge, ClientDisconnected, TlsConfigError};

    use pyo3::prelude::*;

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("ABI_VERSION", super::ABI_VERSION)?;
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        m.add("FEATURES", ("tls-rustls-ring", "http1", "http2", "http3"))?;
        Ok(())
    }
}
