//! `NativeDirectResponse`: a response built once in Rust form. Returning the
//! same object for every request costs one header-map clone and no encoding.

use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Response, StatusCode};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};

use super::request::{header_map, latin1, status_code};
use crate::body::ResponseBody;

#[pyclass(frozen, name = "NativeDirectResponse", module = "server_native._native")]
pub struct DirectResponse {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    stream: Option<Py<PyAny>>,
    /// Its socket-bridge form, built on first use (see `_bridge_payload`).
    bridge: OnceLock<Option<Py<PyBytes>>>,
}

impl DirectResponse {
    pub fn is_stream(&self) -> bool {
        self.stream.is_some()
    }

    pub fn to_response(&self) -> Response<ResponseBody> {
        let mut response = Response::new(ResponseBody::full(self.body.clone()));
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers.clone();
        response
    }
}

/// Text (as UTF-8), bytes, or anything with the buffer protocol
/// (bytearray, memoryview).
fn body_bytes(body: &Bound<'_, PyAny>) -> PyResult<Bytes> {
    if let Ok(text) = body.cast::<PyString>() {
        return Ok(Bytes::copy_from_slice(text.to_str()?.as_bytes()));
    }
    if let Ok(bytes) = body.cast::<PyBytes>() {
        return Ok(Bytes::copy_from_slice(bytes.as_bytes()));
    }
    let copied = body.py().get_type::<PyBytes>().call1((body,))?;
    Ok(Bytes::copy_from_slice(copied.cast::<PyBytes>()?.as_bytes()))
}

fn headers_of(headers: Option<&Bound<'_, PyAny>>) -> PyResult<HeaderMap> {
    headers.map_or_else(|| Ok(HeaderMap::new()), header_map)
}

#[pymethods]
impl DirectResponse {
    /// A whole response; `body` is bytes (or text, sent as UTF-8). Build it
    /// once and return it many times: it is already in wire form.
    #[staticmethod]
    #[pyo3(signature = (status = 200, headers = None, body = None))]
    fn bytes(status: u16, headers: Option<&Bound<'_, PyAny>>, body: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        Ok(DirectResponse {
            status: status_code(status)?,
            headers: headers_of(headers)?,
            body: body.map(body_bytes).transpose()?.unwrap_or_default(),
            stream: None,
            bridge: OnceLock::new(),
        })
    }

    /// A streamed response: `body` is an async iterable of bytes.
    #[staticmethod]
    #[pyo3(signature = (status = 200, headers = None, *, body))]
    fn stream(status: u16, headers: Option<&Bound<'_, PyAny>>, body: Py<PyAny>) -> PyResult<Self> {
        Ok(DirectResponse {
            status: status_code(status)?,
            headers: headers_of(headers)?,
            body: Bytes::new(),
            stream: Some(body),
            bridge: OnceLock::new(),
        })
    }

    #[getter]
    fn status(&self) -> u16 {
        self.status.as_u16()
    }

    #[getter]
    fn headers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for (name, value) in &self.headers {
            list.append(PyTuple::new(py, [name.as_str(), &latin1(value.as_bytes())])?)?;
        }
        Ok(list)
    }

    #[getter]
    fn body<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.body)
    }

    /// The async iterable of a streamed response, else None.
    #[getter]
    fn stream_body(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.stream.as_ref().map(|s| s.clone_ref(py))
    }

    /// The socket bridge's response head payload with the body inline, for
    /// a whole response whose body fits one frame (else None); built once,
    /// so a response returned for every request costs no encoding.
    fn _bridge_payload(&self, py: Python<'_>) -> Option<Py<PyBytes>> {
        let payload = self.bridge.get_or_init(|| {
            if self.stream.is_some() || !crate::bridge::inlines(self.body.len()) {
                return None;
            }
            let mut out = BytesMut::new();
            crate::bridge::put_response_head(
                &mut out,
                None,
                self.status,
                Some(&self.headers),
                b"",
                Some(self.body.len()),
            );
            out.extend_from_slice(&self.body);
            Some(PyBytes::new(py, &out).unbind())
        });
        payload.as_ref().map(|p| p.clone_ref(py))
    }

    fn __repr__(&self) -> String {
        let kind = if self.stream.is_some() { "stream" } else { "bytes" };
        format!("<NativeDirectResponse {} {kind}, {} bytes>", self.status.as_u16(), self.body.len())
    }
}
