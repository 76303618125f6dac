//! The ASGI `http` or `websocket` scope of a request, built natively: the
//! part of every ASGI call that is the same for every app. Both transports
//! build it here: the in-process one from its exchange, the socket bridge
//! from the request head it received (`bridge_asgi_scope`).

use http::header::HOST;
use http::{HeaderMap, Method, Version};
use pyo3::exceptions::PyValueError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use super::request::{latin1, method_name, percent_decoded, scheme_name, version_names};
use crate::exchange::Exchange;

/// A request's headers, as a transport holds them.
pub trait Headers {
    /// Each header's name (lowercase) and value, in order.
    fn pairs(&self) -> impl Iterator<Item = (&[u8], &[u8])>;

    fn has_host(&self) -> bool {
        self.pairs().any(|(name, _)| name == b"host")
    }
}

impl Headers for HeaderMap {
    fn pairs(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.iter().map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes()))
    }

    fn has_host(&self) -> bool {
        self.contains_key(HOST)
    }
}

/// What a scope is made of, whichever transport brought the request.
pub struct Request<'a, 'py, H> {
    pub method: &'a Method,
    pub version: Version,
    pub tls: bool,
    /// An HTTP/1.1 upgrade or HTTP/2 extended CONNECT to a WebSocket.
    pub websocket: bool,
    /// The target's path and query as sent: still percent-encoded.
    pub path: &'a [u8],
    pub query: &'a [u8],
    /// The target's own authority (absolute form, `:authority`), not Host.
    pub authority: Option<&'a [u8]>,
    pub headers: &'a H,
    pub client: Bound<'py, PyAny>,
    pub server: Bound<'py, PyAny>,
}

/// The scope of an exchange of the in-process transport.
pub fn exchange_scope<'py>(
    py: Python<'py>,
    exchange: &Exchange,
    base: &Bound<'py, PyDict>,
    state: &Bound<'py, PyDict>,
) -> PyResult<Bound<'py, PyDict>> {
    let head = &exchange.head;
    let request = Request {
        method: &head.method,
        version: head.version,
        tls: exchange.conn.tls,
        websocket: exchange.wants_websocket(),
        path: head.uri.path().as_bytes(),
        query: head.uri.query().unwrap_or("").as_bytes(),
        authority: head.uri.authority().map(|authority| authority.as_str().as_bytes()),
        headers: &head.headers,
        client: exchange.conn.addresses.remote().into_pyobject(py)?.into_any(),
        server: exchange.conn.addresses.local().into_pyobject(py)?.into_any(),
    };
    scope(py, request, base, state)
}

/// The header pairs of a bridge request head: its strings from the ninth.
struct FieldPairs<'a, 'py>(&'a [Bound<'py, PyBytes>]);

impl Headers for FieldPairs<'_, '_> {
    fn pairs(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.0.chunks_exact(2).map(|pair| (pair[0].as_bytes(), pair[1].as_bytes()))
    }
}

/// The scope of a request that came over the socket bridge. `fields` are
/// the strings of its request head (method, scheme, authority, path, query,
/// HTTP version, client ip, local ip, then each header's name and value:
/// see `crate::bridge`), `flags` its flags; `client` and `server` its
/// addresses as the scope holds them.
#[pyfunction]
#[pyo3(signature = (fields, flags, client, server, base, state))]
pub fn bridge_asgi_scope<'py>(
    py: Python<'py>,
    fields: Vec<Bound<'py, PyBytes>>,
    flags: u8,
    client: Bound<'py, PyAny>,
    server: Bound<'py, PyAny>,
    base: &Bound<'py, PyDict>,
    state: &Bound<'py, PyDict>,
) -> PyResult<Bound<'py, PyDict>> {
    if fields.len() < 8 || fields.len() % 2 == 1 {
        return Err(PyValueError::new_err("a request head has eight strings, then header names and values"));
    }
    let method = Method::from_bytes(fields[0].as_bytes()).map_err(|_| PyValueError::new_err("invalid method"))?;
    let version = crate::bridge::version_from_text(fields[5].as_bytes())
        .ok_or_else(|| PyValueError::new_err(format!("invalid HTTP version {:?}", latin1(fields[5].as_bytes()))))?;
    let (tls, websocket) = crate::bridge::head_flags(flags);
    let authority = fields[2].as_bytes();
    let request = Request {
        method: &method,
        version,
        tls,
        websocket,
        path: fields[3].as_bytes(),
        query: fields[4].as_bytes(),
        authority: (!authority.is_empty()).then_some(authority),
        headers: &FieldPairs(&fields[8..]),
        client,
        server,
    };
    scope(py, request, base, state)
}

/// `base` (the server's constant keys: `type`, `asgi`, `root_path`) updated
/// with the request's keys, and a copy of `state`. A WebSocket request gets
/// the `websocket` scope's keys: no `method`, `ws`/`wss`, `subprotocols`,
/// the `websocket.http.response` extension. Proxy headers and the TLS
/// extension are left to the caller.
pub fn scope<'py, H: Headers>(
    py: Python<'py>,
    request: Request<'_, 'py, H>,
    base: &Bound<'py, PyDict>,
    state: &Bound<'py, PyDict>,
) -> PyResult<Bound<'py, PyDict>> {
    let scope = base.copy()?;
    scope.set_item(intern!(py, "http_version"), version_names(request.version).0)?;
    if request.websocket {
        let scheme = if request.tls { intern!(py, "wss") } else { intern!(py, "ws") };
        scope.set_item(intern!(py, "scheme"), scheme)?;
    } else {
        scope.set_item(intern!(py, "method"), method_name(py, request.method))?;
        scope.set_item(intern!(py, "scheme"), scheme_name(py, request.tls))?;
    }
    let root_path = match scope.get_item(intern!(py, "root_path"))? {
        Some(root) => root.extract::<String>()?,
        None => String::new(),
    };
    let path = root_path + &String::from_utf8_lossy(&percent_decoded(request.path));
    scope.set_item(intern!(py, "path"), path)?;
    scope.set_item(intern!(py, "raw_path"), PyBytes::new(py, request.path))?;
    scope.set_item(intern!(py, "query_string"), PyBytes::new(py, request.query))?;
    let headers = PyList::empty(py);
    // An absolute-form target (HTTP/1.1), or `:authority` (HTTP/2, HTTP/3),
    // carries the host; ASGI wants it as the first `host` header.
    if let Some(authority) = request.authority.filter(|_| !request.headers.has_host()) {
        headers.append((PyBytes::new(py, b"host"), PyBytes::new(py, authority)))?;
    }
    for (name, value) in request.headers.pairs() {
        headers.append((PyBytes::new(py, name), PyBytes::new(py, value)))?;
    }
    scope.set_item(intern!(py, "headers"), headers)?;
    scope.set_item(intern!(py, "client"), request.client)?;
    scope.set_item(intern!(py, "server"), request.server)?;
    scope.set_item(intern!(py, "state"), state.copy()?)?;
    let extensions = PyDict::new(py);
    if request.websocket {
        scope.set_item(intern!(py, "subprotocols"), subprotocols(request.headers))?;
        extensions.set_item(intern!(py, "websocket.http.response"), PyDict::new(py))?;
    } else {
        extensions.set_item(intern!(py, "http.response.pathsend"), PyDict::new(py))?;
    }
    scope.set_item(intern!(py, "extensions"), extensions)?;
    Ok(scope)
}

/// The subprotocols the client offers, in its order (`Sec-WebSocket-Protocol`).
fn subprotocols(headers: &impl Headers) -> Vec<String> {
    headers
        .pairs()
        .filter(|(name, _)| *name == b"sec-websocket-protocol")
        .flat_map(|(_, value)| latin1(value).split(',').map(|p| p.trim().to_owned()).collect::<Vec<_>>())
        .filter(|protocol| !protocol.is_empty())
        .collect()
}
