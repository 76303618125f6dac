//! `NativeRequest`: one exchange as Python sees it. Every method is a short,
//! non-blocking call; waiting happens on asyncio futures that the event queue
//! resolves, except in `read_blocking`/`write_blocking`, where a consumer
//! thread waits natively, without the GIL, on the exchange itself.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HOST};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version};
use hyper::ext::ReasonPhrase;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};

use super::direct::DirectResponse;
use super::queue::Waiter;
use crate::body::{BodyEnd, BodyRead, ResponseBody, ResponseStream, StreamBody, WriteResult};
use crate::errors::{BodyTooLarge, ClientDisconnected};
use crate::exchange::{Exchange, SendError};
use crate::server::ServerShared;
use crate::websocket::{self, Message, Received, Sent, WebSocket};
use yawc::Frame;

#[pyclass(frozen, module = "server_native._native")]
pub struct NativeRequest {
    exchange: Arc<Exchange>,
    server: Arc<ServerShared>,
}

impl NativeRequest {
    fn socket(&self) -> PyResult<&Arc<WebSocket>> {
        self.exchange.websocket().ok_or_else(|| PyRuntimeError::new_err("the WebSocket is not accepted"))
    }

    pub fn new(exchange: Arc<Exchange>, server: Arc<ServerShared>) -> Self {
        NativeRequest { exchange, server }
    }

    fn response(
        &self,
        status: &Bound<'_, PyAny>,
        headers: Option<&Bound<'_, PyAny>>,
        reason: Option<&str>,
        body: ResponseBody,
    ) -> PyResult<Response<ResponseBody>> {
        let status = status_code(status.extract()?)?;
        let mut response = Response::new(body);
        *response.status_mut() = status;
        *response.headers_mut() = match headers {
            Some(headers) => header_map(headers)?,
            None => self.server.default_headers.read().clone(),
        };
        if let Some(reason) = reason {
            let phrase = ReasonPhrase::try_from(reason.as_bytes().to_vec())
                .map_err(|_| PyValueError::new_err(format!("invalid reason phrase {reason:?}")))?;
            response.extensions_mut().insert(phrase);
        }
        Ok(response)
    }

    /// A future-to-be for an operation that may wait. A server whose requests
    /// are taken by threads has no loop to resolve it: those wait natively.
    fn park<'a, 'py>(&self, create_future: &'a Bound<'py, PyAny>) -> PyResult<Parked<'a, 'py>> {
        if self.server.events.is_thread() {
            return Err(PyRuntimeError::new_err(
                "this request was taken by a consumer thread: use read_blocking() / write_blocking()",
            ));
        }
        Ok(Parked::new(create_future))
    }

    /// Sends the response `build` makes; when it cannot make one (a bad
    /// status, header or body from the application), the client gets a 500
    /// instead of nothing, and the application the error.
    fn send_built(&self, build: impl FnOnce() -> PyResult<Response<ResponseBody>>) -> PyResult<bool> {
        match build() {
            Ok(response) => self.send(response),
            Err(error) => {
                let _ = self.exchange.send(internal_error());
                Err(error)
            }
        }
    }

    fn send(&self, response: Response<ResponseBody>) -> PyResult<bool> {
        match self.exchange.send(response) {
            Ok(()) => Ok(true),
            Err(SendError::PeerGone) => Ok(false),
            Err(SendError::AlreadySent) => Err(PyRuntimeError::new_err("the response was already sent")),
        }
    }
}

#[pymethods]
impl NativeRequest {
    #[getter]
    fn method<'py>(&self, py: Python<'py>) -> Bound<'py, PyString> {
        method_name(py, &self.exchange.head.method)
    }

    /// The path as sent, still percent-encoded.
    #[getter]
    fn path(&self) -> &str {
        self.exchange.head.uri.path()
    }

    /// The query string as sent, without `?`; empty when there is none.
    #[getter]
    fn query(&self) -> &str {
        self.exchange.head.uri.query().unwrap_or("")
    }

    #[getter]
    fn scheme<'py>(&self, py: Python<'py>) -> Bound<'py, PyString> {
        scheme_name(py, self.exchange.conn.tls).clone()
    }

    /// `:authority` (HTTP/2), the absolute-form target, or the Host header.
    #[getter]
    fn authority(&self) -> Option<String> {
        let head = &self.exchange.head;
        if let Some(authority) = head.uri.authority() {
            return Some(authority.as_str().to_owned());
        }
        head.headers.get(HOST).map(|v| latin1(v.as_bytes()))
    }

    #[getter]
    fn http_version(&self) -> &'static str {
        version_names(self.exchange.head.version).0
    }

    /// The client's address and port; None over a Unix socket.
    #[getter]
    fn remote_addr(&self) -> Option<(String, u16)> {
        self.exchange.conn.addresses.remote()
    }

    /// The server's address and port; over a Unix socket its path and None.
    #[getter]
    fn local_addr(&self) -> (String, Option<u16>) {
        self.exchange.conn.addresses.local()
    }

    #[getter]
    fn tls(&self) -> bool {
        self.exchange.conn.tls
    }

    /// The client's certificate (DER) when it sent one.
    #[getter]
    fn peer_certificate<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.exchange.conn.peer_certificate.as_ref().map(|c| PyBytes::new(py, c.as_ref()))
    }

    /// Request headers as `(name, value)` pairs in order, names lowercase,
    /// values decoded as latin-1.
    fn headers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for (name, value) in &self.exchange.head.headers {
            list.append(PyTuple::new(py, [name.as_str(), &latin1(value.as_bytes())])?)?;
        }
        Ok(list)
    }

    /// Request headers as `(name, value)` byte pairs, as ASGI wants them.
    fn raw_headers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for (name, value) in &self.exchange.head.headers {
            let pair = (PyBytes::new(py, name.as_str().as_bytes()), PyBytes::new(py, value.as_bytes()));
            list.append(pair)?;
        }
        Ok(list)
    }

    /// The ASGI `http` scope: `base` updated with this request's keys and a
    /// copy of `state` (see `asgi::scope`).
    fn asgi_scope<'py>(
        &self,
        py: Python<'py>,
        base: &Bound<'py, PyDict>,
        state: &Bound<'py, PyDict>,
    ) -> PyResult<Bound<'py, PyDict>> {
        super::asgi::exchange_scope(py, &self.exchange, base, state)
    }

    /// Whether the request carries any header a proxy reports the client
    /// with (`Forwarded`, `X-Forwarded-For`, `X-Forwarded-Proto`): without
    /// one, there is nothing for `--proxy-headers` to resolve.
    #[getter]
    fn has_proxy_headers(&self) -> bool {
        let headers = &self.exchange.head.headers;
        headers.contains_key(http::header::FORWARDED)
            || headers.contains_key("x-forwarded-for")
            || headers.contains_key("x-forwarded-proto")
    }

    /// The WSGI environ: `base` updated with this request's variables (see
    /// `wsgi::environ`).
    fn wsgi_environ<'py>(&self, py: Python<'py>, base: &Bound<'py, PyDict>) -> PyResult<Bound<'py, PyDict>> {
        super::wsgi::environ(py, &self.exchange, base)
    }

    /// The first value of a header, by case-insensitive name.
    fn header(&self, name: &str) -> Option<String> {
        self.exchange.head.headers.get(name.to_ascii_lowercase().as_str()).map(|v| latin1(v.as_bytes()))
    }

    #[getter]
    fn content_length(&self) -> Option<u64> {
        let value = self.exchange.head.headers.get(CONTENT_LENGTH)?;
        value.to_str().ok()?.trim().parse().ok()
    }

    /// The next body chunk; `b""` at the end; or, when nothing has arrived yet,
    /// a future made by `create_future` that resolves when it is worth asking
    /// again (None without `create_future`: just "not yet").
    #[pyo3(signature = (create_future = None))]
    fn read<'py>(
        &self,
        py: Python<'py>,
        create_future: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        let mut future = create_future.map(|f| self.park(f)).transpose()?;
        let step = self.exchange.body.read(|| future.as_mut().map(Parked::make));
        match step {
            BodyRead::Pending => future.map(Parked::take).transpose(),
            step => body_chunk(py, step).map(|chunk| Some(chunk.into_any())),
        }
    }

    /// The next body chunk, `b""` at the end; when nothing has arrived yet,
    /// blocks this thread (without the GIL) until something does. For
    /// consumer threads (WSGI): no other thread has to run for it to return.
    fn read_blocking<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let body = &self.exchange.body;
        let step = match body.read(|| None) {
            BodyRead::Pending => py.detach(|| self.server.events.while_blocked(|| body.read_blocking())),
            step => step,
        };
        body_chunk(py, step)
    }

    /// Sends a whole response at once. `headers=None` sends the server's
    /// default headers. Returns False when the client is already gone.
    /// `body` is bytes or another bytes-like object.
    #[pyo3(signature = (status, headers, body, reason = None))]
    fn respond(
        &self,
        status: &Bound<'_, PyAny>,
        headers: Option<&Bound<'_, PyAny>>,
        body: &Bound<'_, PyAny>,
        reason: Option<&str>,
    ) -> PyResult<bool> {
        self.send_built(|| {
            let body = ResponseBody::full(bytes_like(body)?);
            self.response(status, headers, reason, body)
        })
    }

    /// Sends the response head; the body follows with `write` and `finish`.
    #[pyo3(signature = (status, headers, reason = None))]
    fn start(
        &self,
        status: &Bound<'_, PyAny>,
        headers: Option<&Bound<'_, PyAny>>,
        reason: Option<&str>,
    ) -> PyResult<bool> {
        self.send_built(|| {
            let stream = ResponseStream::new(self.server.events.clone());
            let response = self.response(
                status,
                headers,
                reason,
                ResponseBody::Stream(StreamBody::new(stream.clone(), &self.exchange)),
            )?;
            self.exchange.set_stream(stream);
            Ok(response)
        })
    }

    /// Queues a body chunk. Returns None when more may be written at once, or
    /// a future to await first (the client is reading slower than we write).
    fn write<'py>(&self, data: &[u8], create_future: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let stream = self.exchange.stream().ok_or_else(|| PyRuntimeError::new_err("write() before start()"))?;
        let mut future = self.park(create_future)?;
        let result = stream.write(Bytes::copy_from_slice(data), || future.make());
        match result {
            WriteResult::Ready => Ok(None),
            WriteResult::Wait => future.take().map(Some),
            WriteResult::PeerGone => Err(ClientDisconnected::new_err("the client disconnected")),
        }
    }

    /// Queues a body chunk; when the client reads slower than we write,
    /// blocks this thread (without the GIL) until it has caught up. For
    /// consumer threads (WSGI): no other thread has to run for it to return.
    fn write_blocking(&self, py: Python<'_>, data: &[u8]) -> PyResult<()> {
        let stream =
            self.exchange.stream().ok_or_else(|| PyRuntimeError::new_err("write_blocking() before start()"))?;
        let sent = match stream.write_nowait(Bytes::copy_from_slice(data)) {
            WriteResult::Ready => true,
            WriteResult::Wait => py.detach(|| self.server.events.while_blocked(|| stream.wait_drained())),
            WriteResult::PeerGone => false,
        };
        if sent {
            Ok(())
        } else {
            Err(ClientDisconnected::new_err("the client disconnected"))
        }
    }

    /// Sends a `NativeDirectResponse` (a whole one; streamed ones go through
    /// `start`/`write`). Returns False when the client is already gone.
    fn send_direct(&self, response: &Bound<'_, DirectResponse>) -> PyResult<bool> {
        self.send(response.get().to_response())
    }

    /// None when the client is already gone, else a future (made by
    /// `create_future`) resolved when it goes.
    fn wait_disconnect<'py>(&self, create_future: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let mut future = self.park(create_future)?;
        if self.exchange.watch_disconnect(|| future.make()) {
            future.take().map(Some)
        } else {
            Ok(None)
        }
    }

    /// Ends a streamed body.
    fn finish(&self) {
        if let Some(stream) = self.exchange.stream() {
            stream.end(false);
        }
    }

    /// Gives up on the response: a streamed body is cut off (the client sees
    /// an error, not a short success); an unsent one becomes a 500.
    fn abort(&self) {
        match self.exchange.stream() {
            Some(stream) => stream.end(true),
            None => {
                let _ = self.exchange.send(internal_error());
            }
        }
    }

    /// Whether this request asks for a WebSocket (HTTP/1.1 upgrade or
    /// HTTP/2 extended CONNECT).
    #[getter]
    fn websocket(&self) -> bool {
        self.exchange.wants_websocket()
    }

    /// Accepts the WebSocket: 101 (HTTP/1.1) or 200 (HTTP/2) with `headers`
    /// and the chosen `subprotocol`. False when the client already left.
    #[pyo3(signature = (subprotocol = None, headers = None))]
    fn accept_websocket(&self, subprotocol: Option<&str>, headers: Option<&Bound<'_, PyAny>>) -> PyResult<bool> {
        let mut map = headers.map_or_else(|| Ok(HeaderMap::new()), header_map)?;
        if let Some(subprotocol) = subprotocol {
            let value = HeaderValue::from_str(subprotocol)
                .map_err(|_| PyValueError::new_err(format!("invalid subprotocol {subprotocol:?}")))?;
            map.insert(http::header::SEC_WEBSOCKET_PROTOCOL, value);
        }
        let head = &self.exchange.head;
        let (status, handshake) = websocket::accept_head(head.version, &head.headers, &mut map, &self.server.config);
        let mut response = Response::new(ResponseBody::empty());
        *response.status_mut() = status;
        *response.headers_mut() = map;
        if !self.exchange.wants_websocket() {
            return Err(PyRuntimeError::new_err("not a WebSocket request"));
        }
        Ok(self.exchange.accept_websocket(response, handshake, &self.server).is_some())
    }

    /// The next message: `("text", str)`, `("bytes", bytes)` or
    /// `("close", (code, reason))`; or a future to await first.
    fn ws_receive<'py>(&self, py: Python<'py>, create_future: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let socket = self.socket()?;
        let mut future = self.park(create_future)?;
        let item = match socket.recv(|| future.make()) {
            // Checked UTF-8: the lossy view borrows without copying or replacing.
            Received::Message(Message::Text(text)) => {
                ("text", String::from_utf8_lossy(&text)).into_pyobject(py)?.into_any()
            }
            Received::Message(Message::Binary(data)) => {
                ("bytes", PyBytes::new(py, &data)).into_pyobject(py)?.into_any()
            }
            Received::Closed(code, reason) => ("close", (code, reason)).into_pyobject(py)?.into_any(),
            Received::Pending => return future.take(),
        };
        Ok(item)
    }

    /// Queues a text (str) or binary (bytes) message. None, or a future to
    /// await before sending more; raises ClientDisconnected once closed.
    fn ws_send<'py>(
        &self,
        data: &Bound<'py, PyAny>,
        create_future: &Bound<'py, PyAny>,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        let socket = self.socket()?;
        let message = if let Ok(text) = data.cast::<PyString>() {
            Frame::text(Bytes::copy_from_slice(text.to_str()?.as_bytes()))
        } else {
            Frame::binary(Bytes::copy_from_slice(data.extract::<&[u8]>()?))
        };
        let mut future = self.park(create_future)?;
        match socket.send(message, || future.make()) {
            Sent::Queued => Ok(None),
            Sent::Wait => future.take().map(Some),
            Sent::Closed => Err(ClientDisconnected::new_err("the WebSocket is closed")),
        }
    }

    /// Starts the closing handshake (no-op once closed).
    #[pyo3(signature = (code = 1000, reason = ""))]
    fn ws_close(&self, py: Python<'_>, code: u16, reason: &str) -> PyResult<()> {
        let socket = self.socket()?;
        socket.send(websocket::close_frame(code, reason), || Waiter::new(py.None()));
        Ok(())
    }

    #[getter]
    fn head_sent(&self) -> bool {
        self.exchange.head_sent()
    }
}

/// The asyncio future a parked operation hands back: made by the caller's
/// `create_future` only when the operation really has to wait.
struct Parked<'a, 'py> {
    create_future: &'a Bound<'py, PyAny>,
    made: Option<PyResult<Bound<'py, PyAny>>>,
}

impl<'a, 'py> Parked<'a, 'py> {
    fn new(create_future: &'a Bound<'py, PyAny>) -> Self {
        Parked { create_future, made: None }
    }

    /// The handle the native side keeps (None if making the future failed;
    /// the failure is raised by `take`).
    fn make(&mut self) -> Waiter {
        let made = self.create_future.call0();
        let handle = made.as_ref().map_or_else(|_| self.create_future.py().None(), |f| f.clone().unbind());
        self.made = Some(made);
        Waiter::new(handle)
    }

    fn take(self) -> PyResult<Bound<'py, PyAny>> {
        self.made.expect("the operation parked, so it made a future")
    }
}

/// What the client gets when the application fails before its response.
fn internal_error() -> Response<ResponseBody> {
    crate::service::error_response(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error")
}

/// A response status an application may send: 200-599 (1xx are the
/// server's own, 101 included).
pub fn status_code(status: u16) -> PyResult<StatusCode> {
    StatusCode::from_u16(status)
        .ok()
        .filter(|s| (200..=599).contains(&s.as_u16()))
        .ok_or_else(|| PyValueError::new_err(format!("invalid response status {status}: must be 200-599")))
}

/// The bytes of a bytes-like object (bytes, bytearray, memoryview); text is
/// refused, as ASGI and WSGI refuse it.
pub fn bytes_like(data: &Bound<'_, PyAny>) -> PyResult<Bytes> {
    if let Ok(bytes) = data.cast::<PyBytes>() {
        return Ok(Bytes::copy_from_slice(bytes.as_bytes()));
    }
    if data.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err("a response body must be bytes, not str"));
    }
    let copied = data.py().get_type::<PyBytes>().call1((data,))?;
    Ok(Bytes::copy_from_slice(copied.cast::<PyBytes>()?.as_bytes()))
}

/// A body step other than `Pending` as Python sees it: bytes (`b""` at the
/// end) or the exception that ended the body.
fn body_chunk(py: Python<'_>, step: BodyRead) -> PyResult<Bound<'_, PyBytes>> {
    match step {
        BodyRead::Data(chunk) => Ok(PyBytes::new(py, &chunk)),
        BodyRead::End => Ok(PyBytes::new(py, b"")),
        BodyRead::Error(BodyEnd::TooLarge) => Err(BodyTooLarge::new_err("request body exceeds max_body_size")),
        BodyRead::Error(BodyEnd::Disconnected) => Err(ClientDisconnected::new_err("the client disconnected")),
        BodyRead::Error(BodyEnd::Complete) => unreachable!("a complete body reads as End"),
        BodyRead::Pending => unreachable!("callers handle Pending themselves"),
    }
}

/// A request method as Python text, the common ones interned.
pub fn method_name<'py>(py: Python<'py>, method: &Method) -> Bound<'py, PyString> {
    match *method {
        Method::GET => intern!(py, "GET").clone(),
        Method::POST => intern!(py, "POST").clone(),
        Method::HEAD => intern!(py, "HEAD").clone(),
        Method::PUT => intern!(py, "PUT").clone(),
        Method::DELETE => intern!(py, "DELETE").clone(),
        _ => PyString::new(py, method.as_str()),
    }
}

/// `http` or `https`, interned.
pub fn scheme_name(py: Python<'_>, tls: bool) -> &Bound<'_, PyString> {
    if tls {
        intern!(py, "https")
    } else {
        intern!(py, "http")
    }
}

/// `%XX` sequences decoded to bytes; a `%` not followed by two hex digits
/// stays as it is (Python's `unquote_to_bytes`).
pub fn percent_decoded(path: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if !path.contains(&b'%') {
        return path.into();
    }
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        if path[i] == b'%' {
            if let (Some(high), Some(low)) =
                (path.get(i + 1).and_then(|&b| hex(b)), path.get(i + 2).and_then(|&b| hex(b)))
            {
                out.push(high << 4 | low);
                i += 3;
                continue;
            }
        }
        out.push(path[i]);
        i += 1;
    }
    out.into()
}

/// An HTTP version as ASGI names it (`"1.1"`) and as CGI does (`"HTTP/1.1"`).
pub fn version_names(version: Version) -> (&'static str, &'static str) {
    match version {
        Version::HTTP_2 => ("2", "HTTP/2"),
        Version::HTTP_3 => ("3", "HTTP/3"),
        Version::HTTP_10 => ("1.0", "HTTP/1.0"),
        Version::HTTP_09 => ("0.9", "HTTP/0.9"),
        _ => ("1.1", "HTTP/1.1"),
    }
}

/// Header values as Python text: bytes map to code points one to one.
pub fn latin1(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) if text.is_ascii() => text.to_owned(),
        _ => bytes.iter().map(|&b| b as char).collect(),
    }
}

/// Text for the wire: latin-1 when every character fits, else UTF-8.
fn header_bytes(value: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    if let Ok(bytes) = value.cast::<PyBytes>() {
        return Ok(bytes.as_bytes().to_vec());
    }
    let text = value.cast::<PyString>()?.to_str()?;
    if text.is_ascii() || text.chars().any(|c| c as u32 > 0xFF) {
        return Ok(text.as_bytes().to_vec());
    }
    Ok(text.chars().map(|c| c as u8).collect())
}

/// Builds a header map from an iterable of `(name, value)` pairs of str or bytes.
pub fn header_map(headers: &Bound<'_, PyAny>) -> PyResult<HeaderMap> {
    let mut map = HeaderMap::new();
    for item in headers.try_iter()? {
        // Pairs may be tuples or (as some ASGI apps send them) lists.
        let item = item?;
        let (name, value) = (item.get_item(0)?, item.get_item(1)?);
        let name = header_bytes(&name)?;
        let value = header_bytes(&value)?;
        let name = HeaderName::from_bytes(&name)
            .map_err(|_| PyValueError::new_err(format!("invalid header name {:?}", String::from_utf8_lossy(&name))))?;
        let value = HeaderValue::from_bytes(&value).map_err(|_| {
            PyValueError::new_err(format!("invalid value for header {name}: {:?}", String::from_utf8_lossy(&value)))
        })?;
        map.append(name, value);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_escapes_are_decoded_and_broken_ones_kept() {
        assert_eq!(&*percent_decoded(b"/plain"), b"/plain");
        assert_eq!(&*percent_decoded(b"/caf%C3%A9"), "/café".as_bytes());
        assert_eq!(&*percent_decoded(b"/a%2Fb%20c"), b"/a/b c");
        assert_eq!(&*percent_decoded(b"/100%"), b"/100%");
        assert_eq!(&*percent_decoded(b"/%zz%4"), b"/%zz%4");
    }

    #[test]
    fn header_bytes_map_to_code_points_one_to_one() {
        assert_eq!(latin1(b"ascii"), "ascii");
        assert_eq!(latin1(b"caf\xe9"), "café");
        assert_eq!(latin1("é".as_bytes()), "\u{c3}\u{a9}");
    }
}
