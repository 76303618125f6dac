//! `NativeServer`: binds, runs and closes one server; the loop thread drains
//! its events in batches.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyList;
use tokio_rustls::TlsAcceptor;

use super::queue::{Event, EventQueue, WakeSignal};
use super::request::{header_map, NativeRequest};
use crate::config::{seconds, ServerConfig};
use crate::errors::TlsConfigError;
use crate::listener::{bind_all, BindError, SocketOptions};
use crate::server::ServerShared;
use crate::tls::{self, TlsError};

#[pyclass(frozen, module = "server_native._native")]
pub struct NativeServer {
    shared: Arc<ServerShared>,
    addresses: Vec<SocketAddr>,
}

#[pymethods]
impl NativeServer {
    /// Binds every host on `port` (0: one free port for all of them) and
    /// starts serving. `wake_fd` is the write end of the loop's wake-up pair.
    #[new]
    fn new(config: ServerConfig, hosts: Vec<String>, port: u16, wake_fd: i64) -> PyResult<Self> {
        let ips = hosts
            .iter()
            .map(|h| h.parse::<IpAddr>().map_err(|_| PyValueError::new_err(format!("not an IP address: {h:?}"))))
            .collect::<PyResult<Vec<_>>>()?;
        let tls = match &config.tls {
            Some(settings) => Some(TlsAcceptor::from(Arc::new(tls::server_config(settings).map_err(tls_error)?))),
            None => None,
        };
        let events = Arc::new(EventQueue::new(WakeSignal::from_fd(wake_fd)?));
        let options = SocketOptions { backlog: config.backlog, v6_only: config.v6_only, shared: config.shared };
        let listeners = bind_all(&ips, port, options).map_err(bind_error)?;
        let shared = Arc::new(ServerShared::new(config, tls, events));
        let addresses = shared.listen(listeners)?;
        Ok(NativeServer { shared, addresses })
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
                Event::Wake(future) => list.append(future)?,
            }
        }
        Ok(list)
    }

    /// The bound addresses as `(host, port)`.
    #[getter]
    fn addresses(&self) -> Vec<(String, u16)> {
        self.addresses.iter().map(|a| (a.ip().to_string(), a.port())).collect()
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
        let limit = timeout.and_then(seconds).or(if timeout.is_some() { Some(std::time::Duration::ZERO) } else { None });
        crate::runtime::runtime().spawn(async move {
            shared.clone().close(force, limit).await;
            shared.events.push(Event::Wake(future));
        });
    }

    /// `(total, active, idle, closing)` connection counts.
    fn connections_info(&self) -> (usize, usize, usize, usize) {
        self.shared.stats.snapshot()
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
    }
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
