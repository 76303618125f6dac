//! The ASGI `http` or `websocket` scope of a request, built natively: the
//! part of every ASGI call that is the same for every app.

use http::header::HOST;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use super::request::{method_name, percent_decoded, scheme_name, version_names};
use crate::exchange::Exchange;

/// `base` (the server's constant keys: `type`, `asgi`, `root_path`) updated
/// with the request's keys, and a copy of `state`. A WebSocket request gets
/// the `websocket` scope's keys: no `method`, `ws`/`wss`, `subprotocols`,
/// the `websocket.http.response` extension. Proxy headers and the TLS
/// extension are left to the caller.
pub fn scope<'py>(
    py: Python<'py>,
    exchange: &Exchange,
    base: &Bound<'py, PyDict>,
    state: &Bound<'py, PyDict>,
) -> PyResult<Bound<'py, PyDict>> {
    let scope = base.copy()?;
    let head = &exchange.head;
    let websocket = exchange.wants_websocket();
    scope.set_item(intern!(py, "http_version"), version_names(head.version).0)?;
    if websocket {
        let scheme = if exchange.conn.tls { intern!(py, "wss") } else { intern!(py, "ws") };
        scope.set_item(intern!(py, "scheme"), scheme)?;
    } else {
        scope.set_item(intern!(py, "method"), method_name(py, &head.method))?;
        scope.set_item(intern!(py, "scheme"), scheme_name(py, exchange.conn.tls))?;
    }
    let raw_path = head.uri.path();
    let root_path = match scope.get_item(intern!(py, "root_path"))? {
        Some(root) => root.extract::<String>()?,
        None => String::new(),
    };
    let path = root_path + &String::from_utf8_lossy(&percent_decoded(raw_path.as_bytes()));
    scope.set_item(intern!(py, "path"), path)?;
    scope.set_item(intern!(py, "raw_path"), PyBytes::new(py, raw_path.as_bytes()))?;
    scope.set_item(intern!(py, "query_string"), PyBytes::new(py, head.uri.query().unwrap_or("").as_bytes()))?;
    let headers = PyList::empty(py);
    // HTTP/2 and HTTP/3 carry the host as `:authority`; ASGI wants it as the
    // first `host` header.
    if let Some(authority) = head.uri.authority().filter(|_| !head.headers.contains_key(HOST)) {
        headers.append((PyBytes::new(py, b"host"), PyBytes::new(py, authority.as_str().as_bytes())))?;
    }
    for (name, value) in &head.headers {
        headers.append((PyBytes::new(py, name.as_str().as_bytes()), PyBytes::new(py, value.as_bytes())))?;
    }
    scope.set_item(intern!(py, "headers"), headers)?;
    scope.set_item(intern!(py, "client"), exchange.conn.addresses.remote())?;
    scope.set_item(intern!(py, "server"), exchange.conn.addresses.local())?;
    scope.set_item(intern!(py, "state"), state.copy()?)?;
    let extensions = PyDict::new(py);
    if websocket {
        scope.set_item(intern!(py, "subprotocols"), subprotocols(&head.headers))?;
        extensions.set_item(intern!(py, "websocket.http.response"), PyDict::new(py))?;
    } else {
        extensions.set_item(intern!(py, "http.response.pathsend"), PyDict::new(py))?;
    }
    scope.set_item(intern!(py, "extensions"), extensions)?;
    Ok(scope)
}

/// The subprotocols the client offers, in its order (`Sec-WebSocket-Protocol`).
fn subprotocols(headers: &http::HeaderMap) -> Vec<String> {
    headers
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .flat_map(|value| super::request::latin1(value.as_bytes()).split(',').map(|p| p.trim().to_owned()).collect::<Vec<_>>())
        .filter(|protocol| !protocol.is_empty())
        .collect()
}
