//! `NativeServer`: binds, runs and closes one server; the loop thread drains
//! its events in batches.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{IntoPyDict, PyDict, PyList};
use tokio_rustls::TlsAcceptor;

use parking_lot::Condvar;

use super::direct::DirectResponse;
use super::queue::{Consumer, Event, EventQueue, Waiter, WakeSignal};
use super::request::{header_map, NativeRequest};
use crate::config::{seconds, ServerConfig};
use crate::errors::TlsConfigError;
use crate::listener::{adopt, bind_all, BindError, Listener, SocketOptions};
use crate::metrics::DURATION_BUCKETS;
use crate::server::ServerShared;
use crate::tls::{self, TlsError};

#[pyclass(frozen, module = "server_native._native")]
pub struct NativeServer {
    shared: Arc<ServerShared>,
    addresses: Vec<SocketAddr>,
    unix_paths: Vec<Arc<str>>,
}

#[pymethods]
impl NativeServer {
    /// Binds every host on `port` (0: one free port for all of them), or
    /// adopts the listening socket `config.fd` (TCP or Unix) instead, and
    /// starts serving. `wake_fd` is the write end of the asyncio loop's
    /// wake-up pair; None means threads will consume, in `serve_direct` or
    /// `next_request`. `whole_body`: a request reaches the consumer only once
    /// its body has arrived (the `native_direct` thread, which must not wait
    /// on one client while others queue behind it).
    #[new]
    #[pyo3(signature = (config, hosts, port, wake_fd, whole_body = false))]
    fn new(
        config: ServerConfig,
        hosts: Vec<String>,
        port: u16,
        wake_fd: Option<i64>,
        whole_body: bool,
    ) -> PyResult<Self> {
        crate::runtime::start(config.runtime_threads).map_err(PyValueError::new_err)?;
        let ips = hosts
            .iter()
            .map(|h| h.parse::<IpAddr>().map_err(|_| PyValueError::new_err(format!("not an IP address: {h:?}"))))
            .collect::<PyResult<Vec<_>>>()?;
        let tls = match &config.tls {
            Some(settings) => Some(TlsAcceptor::from(Arc::new(tls::server_config(settings).map_err(tls_error)?))),
            None => None,
        };
        let consumer = match wake_fd {
            Some(fd) => Consumer::Loop(WakeSignal::from_fd(fd)?),
            None => Consumer::Thread(Condvar::new()),
        };
        if let Some(address) = &config.bridge_address {
            crate::bridge::Address::parse(address).map_err(PyValueError::new_err)?;
        }
        let response_headers = response_header_map(&config.response_headers)?;
        let events = Arc::new(EventQueue::new(consumer));
        let fds = config.fd.clone();
        let shared = Arc::new(ServerShared::new(config, tls, events, whole_body, response_headers));
        let (addresses, unix_paths) = match fds {
            Some(fds) => {
                let backlog = shared.config.backlog;
                let close = shared.config.close_fd;
                let listeners =
                    fds.into_iter().map(|fd| adopt(fd, backlog, close)).collect::<std::io::Result<Vec<_>>>()?;
                shared.listen(listeners)?
            }
            None => bind_and_listen(&shared, &ips, port)?,
        };
        Ok(NativeServer { shared, addresses, unix_paths })
    }

    /// Everything that happened since the last call: new `NativeRequest`s and
    /// futures to resolve, in order.
    fn drain<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for event in self.shared.events.take() {
            match event {
                Event::Request(exchange) => {
                    list.append(NativeRequest::new(exchange, self.shared.clone()))?;
                }
                Event::Wake(waiter) => list.append(waiter.into_future())?,
            }
        }
        Ok(list)
    }

    /// The `native_direct` loop: blocks this thread (without the GIL while
    /// idle) and calls `handler(wrap(request))` for every request until the
    /// server is closed. The handler must return a `NativeDirectResponse`;
    /// anything else, or an exception, is passed to `on_error` and answered
    /// with 500.
    fn serve_direct(
        &self,
        py: Python<'_>,
        handler: &Bound<'_, PyAny>,
        wrap: &Bound<'_, PyAny>,
        on_error: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let events = self.shared.events.clone();
        while let Some(batch) = py.detach(|| events.wait()) {
            for exchange in batch {
                let request = Bound::new(py, NativeRequest::new(exchange.clone(), self.shared.clone()))?;
                let outcome = wrap.call1((request,)).and_then(|r| handler.call1((r,)));
                let response = match outcome {
                    Ok(value) => match value.cast::<DirectResponse>() {
                        Ok(response) if response.get().is_stream() => {
                            on_error.call1((PyTypeError::new_err(
                                "a native_direct handler cannot stream: use native_direct=False for NativeDirectResponse.stream",
                            ),))?;
                            internal_error()
                        }
                        Ok(response) => response.get().to_response(),
                        Err(_) => {
                            let message = format!(
                                "a native_direct handler must return a NativeDirectResponse, not {}",
                                value.get_type().name()?
                            );
                            on_error.call1((PyTypeError::new_err(message),))?;
                            internal_error()
                        }
                    },
                    Err(error) => {
                        on_error.call1((error,))?;
                        internal_error()
                    }
                };
                let _ = exchange.send(response);
            }
        }
        Ok(())
    }

    /// For a pool of consumer threads: blocks (without the GIL) until a
    /// request comes and returns it; None once the server is closed.
    fn next_request(&self, py: Python<'_>) -> Option<NativeRequest> {
        let events = self.shared.events.clone();
        events.request_done();
        let exchange = events.try_take_one().or_else(|| py.detach(|| events.wait_one()))?;
        Some(NativeRequest::new(exchange, self.shared.clone()))
    }

    /// The bound addresses as `(host, port)`.
    #[getter]
    fn addresses(&self) -> Vec<(String, u16)> {
        self.addresses.iter().map(|a| (a.ip().to_string(), a.port())).collect()
    }

    /// The Unix socket path served on, when the server listens on one.
    #[getter]
    fn unix_path(&self) -> Option<&str> {
        self.unix_paths.first().map(|path| &**path)
    }

    /// Whether HTTP/3 is being served (TLS, `http3`, and its UDP port bound).
    #[getter]
    fn http3(&self) -> bool {
        self.shared.alt_svc.get().is_some()
    }

    #[getter]
    fn port(&self) -> u16 {
        self.addresses.first().map_or(0, |a| a.port())
    }

    /// Starts closing; `future` is resolved (through the event queue) once
    /// every connection is gone. Graceful unless `force`; `timeout` bounds the
    /// drain (None waits as long as it takes).
    #[pyo3(signature = (force, timeout, future))]
    fn close(&self, force: bool, timeout: Option<f64>, future: Py<PyAny>) {
        let shared = self.shared.clone();
        let limit =
            timeout.and_then(seconds).or(if timeout.is_some() { Some(std::time::Duration::ZERO) } else { None });
        let closed = shared.clone().close(force, limit);
        crate::runtime::runtime().spawn(async move {
            closed.await;
            if shared.events.is_thread() {
                // The consumer thread may be stuck in a handler: tell the
                // loop directly (the one time a tokio thread takes the GIL).
                Python::attach(|py| {
                    if let Err(error) = resolve(future.bind(py)) {
                        error.write_unraisable(py, None);
                    }
                });
            } else {
                shared.events.push(Event::Wake(Waiter::new(future)));
            }
            shared.events.close();
        });
    }

    /// `(total, active, idle, closing)` connection counts.
    fn connections_info(&self) -> (usize, usize, usize, usize) {
        self.shared.stats.snapshot()
    }

    /// The server's figures for monitoring, as a dict of counts (see
    /// `server_native.runtime.metrics`).
    fn metrics<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let shared = &self.shared;
        let snapshot = shared.metrics.snapshot();
        let load = |counter: &std::sync::atomic::AtomicUsize| counter.load(std::sync::atomic::Ordering::Relaxed);
        let figures = PyDict::new(py);
        figures.set_item("connections_open", load(&shared.stats.total))?;
        figures.set_item("connections_active", load(&shared.stats.active))?;
        figures.set_item("connections_handled", shared.stats.handled.load(std::sync::atomic::Ordering::Relaxed))?;
        figures.set_item("connections_errored", snapshot.connections_errored)?;
        figures.set_item("requests", snapshot.requests.into_py_dict(py)?)?;
        figures.set_item("responses", snapshot.statuses.into_py_dict(py)?)?;
        figures.set_item("refused", snapshot.refused.into_py_dict(py)?)?;
        figures.set_item("bytes_received", snapshot.bytes_received)?;
        figures.set_item("bytes_sent", snapshot.bytes_sent)?;
        // Cumulative, as Prometheus has them: each bucket counts those below it.
        let buckets = PyDict::new(py);
        let bounds = DURATION_BUCKETS.iter().map(|bound| format!("{bound:?}")).chain(["+Inf".to_owned()]);
        let mut count = 0;
        for (bound, in_bucket) in bounds.zip(&snapshot.durations) {
            count += in_bucket;
            buckets.set_item(bound, count)?;
        }
        let duration = PyDict::new(py);
        duration.set_item("buckets", buckets)?;
        duration.set_item("count", count)?;
        duration.set_item("sum", snapshot.duration_seconds)?;
        figures.set_item("request_duration_seconds", duration)?;
        figures.set_item("event_queue_depth", shared.events.depth())?;
        Ok(figures)
    }

    /// Requests answered so far, over every protocol.
    #[getter]
    fn requests(&self) -> u64 {
        self.shared.requests()
    }

    /// False: every HTTP/1 response closes its connection after it.
    #[getter]
    fn keep_alive(&self) -> bool {
        self.shared.keep_alive()
    }

    #[setter]
    fn set_keep_alive(&self, on: bool) {
        self.shared.set_keep_alive(on);
    }

    #[getter]
    fn idle_timeout(&self) -> f64 {
        self.shared.idle_timeout().map_or(0.0, |d| d.as_secs_f64())
    }

    #[setter]
    fn set_idle_timeout(&self, seconds: f64) {
        self.shared.set_idle_timeout(seconds);
    }

    /// Headers sent with every response that does not bring its own list.
    fn set_default_headers(&self, headers: &Bound<'_, PyAny>) -> PyResult<()> {
        *self.shared.default_headers.write() = header_map(headers)?;
        Ok(())
    }
}

impl Drop for NativeServer {
    /// A server nobody can reach from Python any more stops at once.
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
        self.shared.force.cancel();
        self.shared.events.close();
    }
}

/// Resolves an asyncio future from outside its loop's thread. A loop closed
/// meanwhile has nobody left waiting: that is not an error.
fn resolve(future: &Bound<'_, PyAny>) -> PyResult<()> {
    let set_result = future.getattr("set_result")?;
    let event_loop = future.call_method0("get_loop")?;
    match event_loop.call_method1("call_soon_threadsafe", (set_result, future.py().None())) {
        Err(_) if event_loop.call_method0("is_closed")?.is_truthy()? => Ok(()),
        result => result.map(drop),
    }
}

/// `config.response_headers` as a header map; a bad name or value is a ValueError.
fn response_header_map(pairs: &[(String, String)]) -> PyResult<http::HeaderMap> {
    let mut headers = http::HeaderMap::new();
    for (name, value) in pairs {
        let invalid = || PyValueError::new_err(format!("invalid response header {name:?}: {value:?}"));
        let name = http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid())?;
        let value = http::HeaderValue::from_str(value).map_err(|_| invalid())?;
        headers.append(name, value);
    }
    Ok(headers)
}

fn internal_error() -> http::Response<crate::body::ResponseBody> {
    crate::service::error_response(http::StatusCode::INTERNAL_SERVER_ERROR, "internal server error")
}

/// The rustls names of the cipher suites `names` gives (rustls's, IANA's
/// or OpenSSL's), in order; every suite the server knows when None.
#[pyfunction]
#[pyo3(signature = (names = None))]
pub fn tls_cipher_suites(names: Option<Vec<String>>) -> PyResult<Vec<String>> {
    let suites = match names {
        Some(names) => tls::cipher_suites(&names).map_err(tls_error)?,
        None => rustls::crypto::ring::default_provider().cipher_suites,
    };
    Ok(suites.iter().filter_map(|suite| suite.suite().as_str()).map(str::to_owned).collect())
}

fn tls_error(error: TlsError) -> PyErr {
    match error {
        TlsError::Io { path, error } if error.kind() == std::io::ErrorKind::NotFound => {
            PyFileNotFoundError::new_err((error.raw_os_error().unwrap_or(2), error.to_string(), path))
        }
        TlsError::Io { path, error } => PyOSError::new_err(format!("cannot read {path}: {error}")),
        TlsError::Invalid(message) => TlsConfigError::new_err(message),
    }
}

/// How often `port=0` picks another port when the one TCP got is taken on UDP,
/// where HTTP/3 needs the same number.
const UDP_TWIN_ATTEMPTS: usize = 16;

/// Binds the TCP listeners and starts serving, HTTP/3 included.
fn bind_and_listen(
    shared: &Arc<ServerShared>,
    ips: &[IpAddr],
    port: u16,
) -> PyResult<(Vec<SocketAddr>, Vec<Arc<str>>)> {
    let config = &shared.config;
    let options = SocketOptions { backlog: config.backlog, v6_only: config.v6_only, shared: config.shared };
    let mut attempts_left = UDP_TWIN_ATTEMPTS;
    loop {
        let listeners = bind_all(ips, port, options).map_err(bind_error)?.into_iter().map(Listener::Tcp).collect();
        attempts_left -= 1;
        match shared.listen(listeners) {
            Err(error) if port == 0 && error.kind() == std::io::ErrorKind::AddrInUse && attempts_left > 0 => {}
            result => return Ok(result?),
        }
    }
}

fn bind_error(error: BindError) -> PyErr {
    let message = match error.addr {
        Some(addr) => format!("cannot bind {addr}: {}", error.error),
        None => error.error.to_string(),
    };
    match error.error.raw_os_error() {
        Some(code) => PyOSError::new_err((code, message)),
        None => PyOSError::new_err(message),
    }
}
