//! What Python's end of the socket bridge sends, encoded here: the checks
//! and the encoding of a response head cost far less in Rust than in Python.

use bytes::BytesMut;
use hyper::ext::ReasonPhrase;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::request::{header_map, status_code};

/// A response head frame for `stream`, checked as the in-process transport
/// checks a response (ValueError). With `body_size`, the whole response:
/// when the body fits one frame, the frame counts it and the body's bytes
/// must follow the returned head at once (sent as they are, not copied into
/// it); else its chunk frames must follow (with the response end).
/// `headers=None` asks for the server's default headers.
#[pyfunction]
#[pyo3(signature = (stream, status, headers, reason, body_size))]
pub fn bridge_response_head<'py>(
    py: Python<'py>,
    stream: u32,
    status: u16,
    headers: Option<&Bound<'py, PyAny>>,
    reason: Option<&str>,
    body_size: Option<usize>,
) -> PyResult<Bound<'py, PyBytes>> {
    let status = status_code(status)?;
    let headers = headers.map(header_map).transpose()?;
    let reason = reason.unwrap_or_default();
    if !reason.is_empty() && ReasonPhrase::try_from(reason.as_bytes()).is_err() {
        return Err(PyValueError::new_err(format!("invalid reason phrase {reason:?}")));
    }
    let mut out = BytesMut::new();
    crate::bridge::put_response_head(&mut out, Some(stream), status, headers.as_ref(), reason.as_bytes(), body_size);
    Ok(PyBytes::new(py, &out))
}
