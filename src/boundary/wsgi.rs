//! The WSGI environ of a request (PEP 3333), built natively: the per-request
//! part of a WSGI call that is the same for every app.

use http::header::{CONTENT_LENGTH, CONTENT_TYPE, COOKIE};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::request::{latin1, method_name, percent_decoded, scheme_name, version_names};
use crate::exchange::Exchange;

/// `base` (the server's constant keys) updated with the request's CGI
/// variables and headers. What depends on the server's settings (proxy
/// headers, a Unix socket's SERVER_NAME, `wsgi.input`) is left to the caller.
pub fn environ<'py>(py: Python<'py>, exchange: &Exchange, base: &Bound<'py, PyDict>) -> PyResult<Bound<'py, PyDict>> {
    let environ = base.copy()?;
    let head = &exchange.head;
    environ.set_item(intern!(py, "REQUEST_METHOD"), method_name(py, &head.method))?;
    environ.set_item(intern!(py, "PATH_INFO"), latin1(&percent_decoded(head.uri.path().as_bytes())))?;
    environ.set_item(intern!(py, "QUERY_STRING"), head.uri.query().unwrap_or(""))?;
    environ.set_item(intern!(py, "SERVER_PROTOCOL"), version_names(head.version).1)?;
    match exchange.conn.addresses.remote() {
        Some((address, port)) => {
            environ.set_item(intern!(py, "REMOTE_ADDR"), address)?;
            environ.set_item(intern!(py, "REMOTE_PORT"), port.to_string())?;
        }
        // A Unix socket peer has no address: gunicorn's empty REMOTE_ADDR.
        None => environ.set_item(intern!(py, "REMOTE_ADDR"), "")?,
    }
    environ.set_item(intern!(py, "wsgi.url_scheme"), scheme_name(py, exchange.conn.tls))?;
    let mut key = String::with_capacity(32);
    for (name, value) in &head.headers {
        let value = latin1(value.as_bytes());
        if name == CONTENT_TYPE {
            environ.set_item(intern!(py, "CONTENT_TYPE"), value)?;
            continue;
        }
        if name == CONTENT_LENGTH {
            environ.set_item(intern!(py, "CONTENT_LENGTH"), value)?;
            continue;
        }
        key.clear();
        key.push_str("HTTP_");
        key.extend(name.as_str().chars().map(|c| if c == '-' { '_' } else { c.to_ascii_uppercase() }));
        match environ.get_item(&key)? {
            // HTTP/2 splits cookies into fields; they rejoin with "; ".
            Some(earlier) => {
                let separator = if name == COOKIE { "; " } else { "," };
                environ.set_item(&key, format!("{}{separator}{value}", earlier.extract::<String>()?))?
            }
            None => environ.set_item(&key, value)?,
        }
    }
    if !environ.contains(intern!(py, "HTTP_HOST"))? {
        if let Some(authority) = head.uri.authority() {
            environ.set_item(intern!(py, "HTTP_HOST"), authority.as_str())?;
        }
    }
    Ok(environ)
}
