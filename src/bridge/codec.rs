//! The bridge's wire format: frame headers, the request head it writes and
//! the response head it reads (the frame table is in `mod.rs`).

use super::*;

pub const VERSION: u8 = 2;
/// Largest body chunk in one frame.
pub const CHUNK: usize = 64 * 1024;
/// Largest frame either side accepts (heads carry every header).
pub const MAX_FRAME: usize = 16 * 1024 * 1024;
/// What follows the length in every frame: version, type, stream id.
pub(super) const HEADER: usize = 6;
/// Frames gathered into one vectored write, at most.
pub(super) const WRITE_SLICES: usize = 256;
/// How much the reader asks the socket for at once.
pub(super) const READ_SIZE: usize = 64 * 1024;
pub mod kind {
    pub const HELLO: u8 = 0;
    pub const REQUEST_HEAD: u8 = 1;
    pub const REQUEST_CHUNK: u8 = 2;
    pub const REQUEST_END: u8 = 3;
    pub const RESPONSE_HEAD: u8 = 4;
    pub const RESPONSE_CHUNK: u8 = 5;
    pub const RESPONSE_END: u8 = 6;
    pub const ABORT: u8 = 7;
    pub const WS_ACCEPT: u8 = 8;
    pub const WS_MESSAGE: u8 = 9;
    pub const WS_CLOSE: u8 = 10;
    pub const WINDOW: u8 = 11;
}

/// Why Rust gives up on a request (the payload of its abort frame).
pub(super) const ABORT_CLIENT_GONE: u8 = 1;
pub(super) const ABORT_TOO_LARGE: u8 = 2;
pub(super) const ABORT_DISCARDED: u8 = 3;

/// Response head flags.
pub(super) const FLAG_DEFAULT_HEADERS: u8 = 1;
pub(super) const FLAG_WHOLE_BODY: u8 = 2;
pub(super) const FLAG_INLINE_BODY: u8 = 4;
/// Request head flags.
pub(super) const HEAD_TLS: u8 = 1;
pub(super) const HEAD_WEBSOCKET: u8 = 2;
pub(super) const HEAD_END: u8 = 4;
pub(super) const HEAD_UNIX: u8 = 8;
/// WebSocket message flags.
pub(super) const WS_TEXT: u8 = 1;
pub(super) const WS_BINARY: u8 = 2;
pub(super) const WS_MORE: u8 = 4;
/// 1006: the connection ended without a close frame; 1011: server error.
pub(super) const WS_ABNORMAL: u16 = 1006;
pub(super) const WS_SERVER_ERROR: u16 = 1011;

// ------------------------------------------------------------------ address

/// What can go wrong on the bridge; all of it is the application end's fault
/// (or absence) and becomes a 502.
#[derive(Clone, Debug)]
pub enum BridgeError {
    Io(Arc<io::Error>),
    /// The other end closed the connection mid-exchange.
    Closed,
    /// A length, version or payload that does not parse.
    Malformed(&'static str),
    /// A frame that has no business at this point.
    UnexpectedFrame(u8),
    InvalidStatus(u16),
}

impl From<io::Error> for BridgeError {
    fn from(error: io::Error) -> Self {
        BridgeError::Io(Arc::new(error))
    }
}

impl std::fmt::Display for BridgeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BridgeError::Io(error) => write!(f, "bridge I/O error: {error}"),
            BridgeError::Closed => f.write_str("the application end of the bridge closed the connection"),
            BridgeError::Malformed(what) => write!(f, "malformed bridge frame: {what}"),
            BridgeError::UnexpectedFrame(kind) => write!(f, "unexpected bridge frame type {kind}"),
            BridgeError::InvalidStatus(status) => write!(f, "invalid response status {status} on the bridge"),
        }
    }
}

pub struct FrameIn {
    pub kind: u8,
    pub stream: u32,
    pub payload: Bytes,
}

/// Appends one frame header for a payload of `len` bytes.
pub(super) fn put_header(out: &mut BytesMut, kind: u8, stream: u32, len: usize) {
    out.put_u32((len + HEADER) as u32);
    out.put_u8(VERSION);
    out.put_u8(kind);
    out.put_u32(stream);
}

pub(super) fn frame(kind: u8, stream: u32, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(4 + HEADER + payload.len());
    put_header(&mut out, kind, stream, payload.len());
    out.extend_from_slice(payload);
    out.freeze()
}

/// Reads frames from one connection: large reads, every complete frame in
/// the buffer taken before the next read.
pub(super) struct FrameReader {
    pub(super) io: ReadHalf,
    pub(super) buf: BytesMut,
}

impl FrameReader {
    pub(super) fn new(io: ReadHalf) -> Self {
        FrameReader { io, buf: BytesMut::with_capacity(READ_SIZE) }
    }

    /// A complete frame from the buffer; Err(n) when n more bytes must come first.
    pub(super) fn take(&mut self) -> Result<Result<FrameIn, usize>, BridgeError> {
        if self.buf.len() < 4 {
            return Ok(Err(4 + HEADER - self.buf.len()));
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if !(HEADER..=MAX_FRAME).contains(&len) {
            return Err(BridgeError::Malformed("frame length out of range"));
        }
        if self.buf.len() < 4 + len {
            return Ok(Err(4 + len - self.buf.len()));
        }
        let mut frame = self.buf.split_to(4 + len);
        frame.advance(4);
        if frame[0] != VERSION {
            return Err(BridgeError::Malformed("unknown frame version"));
        }
        let kind = frame[1];
        let stream = u32::from_be_bytes([frame[2], frame[3], frame[4], frame[5]]);
        frame.advance(HEADER);
        Ok(Ok(FrameIn { kind, stream, payload: frame.freeze() }))
    }

    /// The next frame; None at a clean end of stream (between frames).
    pub(super) async fn next(&mut self) -> Result<Option<FrameIn>, BridgeError> {
        loop {
            let missing = match self.take()? {
                Ok(frame) => return Ok(Some(frame)),
                Err(missing) => missing,
            };
            self.buf.reserve(missing.max(READ_SIZE));
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() { Ok(None) } else { Err(BridgeError::Closed) };
            }
        }
    }
}

/// A cursor over a frame payload.
pub(super) struct Fields {
    pub(super) payload: Bytes,
}

impl Fields {
    pub(super) fn u8(&mut self) -> Result<u8, BridgeError> {
        if self.payload.remaining() < 1 {
            return Err(BridgeError::Malformed("truncated payload"));
        }
        Ok(self.payload.get_u8())
    }

    pub(super) fn u16(&mut self) -> Result<u16, BridgeError> {
        if self.payload.remaining() < 2 {
            return Err(BridgeError::Malformed("truncated payload"));
        }
        Ok(self.payload.get_u16())
    }

    pub(super) fn u32(&mut self) -> Result<u32, BridgeError> {
        if self.payload.remaining() < 4 {
            return Err(BridgeError::Malformed("truncated payload"));
        }
        Ok(self.payload.get_u32())
    }

    pub(super) fn bytes(&mut self) -> Result<Bytes, BridgeError> {
        let len = self.u32()? as usize;
        if self.payload.remaining() < len {
            return Err(BridgeError::Malformed("string runs past the payload"));
        }
        Ok(self.payload.split_to(len))
    }
}

// ------------------------------------------------------------------ heads

pub(super) fn version_text(version: Version) -> &'static [u8] {
    match version {
        Version::HTTP_2 => b"2",
        Version::HTTP_3 => b"3",
        Version::HTTP_10 => b"1.0",
        Version::HTTP_09 => b"0.9",
        _ => b"1.1",
    }
}

/// The version a request head names (`version_text`'s inverse).
pub fn version_from_text(text: &[u8]) -> Option<Version> {
    [Version::HTTP_11, Version::HTTP_2, Version::HTTP_3, Version::HTTP_10, Version::HTTP_09]
        .into_iter()
        .find(|&version| version_text(version) == text)
}

/// Whether a request head's flags say TLS, and a WebSocket request.
pub fn head_flags(flags: u8) -> (bool, bool) {
    (flags & HEAD_TLS != 0, flags & HEAD_WEBSOCKET != 0)
}

/// The request head: the fixed fields and the certificate, then every
/// string with a NUL byte between them — so the Python end takes them apart
/// with one `split`. False (nothing written) when a string holds a NUL,
/// which neither a URI nor a header value may.
pub(super) fn encode_request_head(
    out: &mut BytesMut,
    stream: u32,
    head: &Parts,
    info: &ConnInfo,
    websocket: bool,
    end: bool,
) -> bool {
    let (peer_ip, peer_port) = info.addresses.remote().unwrap_or_default();
    let (local_ip, local_port) = info.addresses.local();
    let authority = match head.uri.authority() {
        Some(authority) => authority.as_str().as_bytes(),
        None => head.headers.get(HOST).map_or(&b""[..], |v| v.as_bytes()),
    };
    let fixed: [&[u8]; 8] = [
        head.method.as_str().as_bytes(),
        if info.tls { b"https" } else { b"http" },
        authority,
        head.uri.path().as_bytes(),
        head.uri.query().unwrap_or("").as_bytes(),
        version_text(head.version),
        peer_ip.as_bytes(),
        local_ip.as_bytes(),
    ];
    let certificate = info.peer_certificate.as_ref().map_or(&b""[..], |c| c.as_ref());
    let strings = || {
        fixed
            .iter()
            .copied()
            .chain(head.headers.iter().flat_map(|(name, value)| [name.as_str().as_bytes(), value.as_bytes()]))
    };
    let mut bytes = 0;
    for string in strings() {
        if string.contains(&0) {
            return false;
        }
        bytes += string.len() + 1;
    }
    put_header(out, kind::REQUEST_HEAD, stream, 9 + certificate.len() + bytes - 1);
    out.put_u16(peer_port);
    out.put_u16(local_port.unwrap_or(0));
    let unix = if local_port.is_none() { HEAD_UNIX } else { 0 };
    out.put_u8(
        if info.tls { HEAD_TLS } else { 0 }
            | if websocket { HEAD_WEBSOCKET } else { 0 }
            | if end { HEAD_END } else { 0 }
            | unix,
    );
    out.put_u32(certificate.len() as u32);
    out.extend_from_slice(certificate);
    for (index, string) in strings().enumerate() {
        if index > 0 {
            out.put_u8(0);
        }
        out.extend_from_slice(string);
    }
    true
}

pub(super) struct ResponseHead {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) reason: Option<ReasonPhrase>,
    pub(super) body: BodyShape,
}

/// How the response body follows its head.
pub(super) enum BodyShape {
    /// Chunk frames, passed on as they come.
    Streamed,
    /// Chunk frames, collected before the head goes out.
    Whole,
    /// In the head frame itself; the response is complete.
    Inline(Bytes),
}

pub(super) fn decode_response_head(payload: Bytes, defaults: &HeaderMap) -> Result<ResponseHead, BridgeError> {
    let mut fields = Fields { payload };
    let code = fields.u16()?;
    let status = StatusCode::from_u16(code)
        .ok()
        .filter(|s| (200..=599).contains(&s.as_u16()))
        .ok_or(BridgeError::InvalidStatus(code))?;
    let flags = fields.u8()?;
    let reason = fields.bytes()?;
    let reason = if reason.is_empty() {
        None
    } else {
        Some(ReasonPhrase::try_from(reason).map_err(|_| BridgeError::Malformed("invalid reason phrase"))?)
    };
    let count = fields.u32()?;
    let mut headers = if flags & FLAG_DEFAULT_HEADERS != 0 { defaults.clone() } else { HeaderMap::new() };
    for _ in 0..count {
        let name = fields.bytes()?;
        let value = fields.bytes()?;
        let name = HeaderName::from_bytes(&name).map_err(|_| BridgeError::Malformed("invalid header name"))?;
        let value =
            HeaderValue::from_maybe_shared(value).map_err(|_| BridgeError::Malformed("invalid header value"))?;
        headers.append(name, value);
    }
    let body = if flags & FLAG_INLINE_BODY != 0 {
        BodyShape::Inline(fields.payload)
    } else if fields.payload.has_remaining() {
        return Err(BridgeError::Malformed("bytes after the response head"));
    } else if flags & FLAG_WHOLE_BODY != 0 {
        BodyShape::Whole
    } else {
        BodyShape::Streamed
    };
    Ok(ResponseHead { status, headers, reason, body })
}

/// A response head frame as Python's end sends it — built here, where the
/// headers are already checked (`_native.bridge_response_head`,
/// `NativeDirectResponse._bridge_payload`). With `body_size`, the whole
/// response: inline when it fits one frame (see `inlines`), its bytes
/// counted in the frame's length but left to the caller to append, so that
/// a large body is not copied into the frame; else announced as a whole body
/// whose chunk frames follow. Without, the head of a streamed body.
/// `headers` None: the server's default headers. `stream` None: the payload
/// alone, without the frame header.
pub fn put_response_head(
    out: &mut BytesMut,
    stream: Option<u32>,
    status: StatusCode,
    headers: Option<&HeaderMap>,
    reason: &[u8],
    body_size: Option<usize>,
) {
    let inline = body_size.filter(|&size| inlines(size));
    let mut flags = match (body_size, inline) {
        (Some(_), Some(_)) => FLAG_INLINE_BODY,
        (Some(_), None) => FLAG_WHOLE_BODY,
        (None, _) => 0,
    };
    if headers.is_none() {
        flags |= FLAG_DEFAULT_HEADERS;
    }
    let header_bytes: usize = headers.map_or(0, |h| h.iter().map(|(n, v)| 8 + n.as_str().len() + v.len()).sum());
    let size = 2 + 1 + 4 + reason.len() + 4 + header_bytes + inline.unwrap_or(0);
    out.reserve(4 + HEADER + size - inline.unwrap_or(0));
    if let Some(stream) = stream {
        put_header(out, kind::RESPONSE_HEAD, stream, size);
    }
    out.put_u16(status.as_u16());
    out.put_u8(flags);
    out.put_u32(reason.len() as u32);
    out.extend_from_slice(reason);
    out.put_u32(headers.map_or(0, HeaderMap::len) as u32);
    for (name, value) in headers.into_iter().flatten() {
        out.put_u32(name.as_str().len() as u32);
        out.extend_from_slice(name.as_str().as_bytes());
        out.put_u32(value.len() as u32);
        out.extend_from_slice(value.as_bytes());
    }
}

/// Whether a whole body of `size` bytes goes inline in its head frame.
pub fn inlines(size: usize) -> bool {
    size <= CHUNK
}

pub(super) fn build_response(head: ResponseHead, body: ResponseBody) -> Response<ResponseBody> {
    let mut response = Response::new(body);
    *response.status_mut() = head.status;
    *response.headers_mut() = head.headers;
    if let Some(reason) = head.reason {
        response.extensions_mut().insert(reason);
    }
    response
}

// ------------------------------------------------------------------ the connection

#[cfg(test)]
mod tests {
    use super::*;

    fn head(status: u16, headers: Option<&HeaderMap>, reason: &[u8], body_size: Option<usize>) -> Bytes {
        let mut out = BytesMut::new();
        put_response_head(&mut out, None, StatusCode::from_u16(status).unwrap(), headers, reason, body_size);
        out.freeze()
    }

    #[test]
    fn a_response_head_comes_back_as_it_went() {
        let mut headers = HeaderMap::new();
        headers.append("x-one", HeaderValue::from_static("1"));
        headers.append("x-one", HeaderValue::from_static("again"));
        let mut payload = BytesMut::from(&head(201, Some(&headers), b"Made", Some(4))[..]);
        payload.extend_from_slice(b"body");
        let decoded = decode_response_head(payload.freeze(), &HeaderMap::new()).unwrap();
        assert_eq!(decoded.status, StatusCode::CREATED);
        assert_eq!(decoded.reason.as_ref().map(|r| r.as_bytes()), Some(&b"Made"[..]));
        let values: Vec<_> = decoded.headers.get_all("x-one").iter().collect();
        assert_eq!(values, ["1", "again"]);
        assert!(matches!(decoded.body, BodyShape::Inline(body) if body == "body"));
    }

    #[test]
    fn default_headers_and_body_shapes_follow_the_flags() {
        let mut defaults = HeaderMap::new();
        defaults.insert("content-type", HeaderValue::from_static("text/plain"));
        let streamed = decode_response_head(head(200, None, b"", None), &defaults).unwrap();
        assert_eq!(streamed.headers.get("content-type").unwrap(), "text/plain");
        assert!(matches!(streamed.body, BodyShape::Streamed));
        let whole = decode_response_head(head(200, Some(&HeaderMap::new()), b"", Some(CHUNK + 1)), &defaults).unwrap();
        assert!(whole.headers.is_empty());
        assert!(matches!(whole.body, BodyShape::Whole));
    }

    #[test]
    fn a_bad_head_is_an_error_not_a_response() {
        let mut status = head(200, None, b"", None).to_vec();
        status[..2].copy_from_slice(&999u16.to_be_bytes());
        assert!(decode_response_head(Bytes::from(status), &HeaderMap::new()).is_err());
        let cut = head(200, Some(&HeaderMap::new()), b"Reason", None);
        assert!(decode_response_head(cut.slice(..cut.len() - 3), &HeaderMap::new()).is_err());
        let mut trailing = head(200, Some(&HeaderMap::new()), b"", None).to_vec();
        trailing.push(0);
        assert!(decode_response_head(Bytes::from(trailing), &HeaderMap::new()).is_err());
    }
}
