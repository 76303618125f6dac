//! The server owns a response's framing. An application's `Content-Length`
//! is a claim about its body: hyper and h2 frame by the body they are given
//! but write the header as it is, so a wrong claim would let the rest of one
//! body be read as the next response on the connection, or leave the client
//! waiting for bytes that never come. So, on every API and protocol:
//!
//! - a whole body that disagrees with its `Content-Length` is answered 500;
//! - a streamed body is cut off (HTTP/1.1: the connection closes; HTTP/2 and
//!   HTTP/3: the stream is reset) before its first byte beyond the declared
//!   length, or when it ends short of it;
//! - a response to HEAD goes out without its body, with the length the
//!   application gave, or the whole body's (RFC 9110 section 9.3.2); 1xx,
//!   204 and 304 keep hyper's rules.
//!
//! Each decision is logged as an error of the application.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::body::ResponseBody;
use crate::log::{Kind, Level, Source};
use crate::metrics::{Metrics, Refused};
use crate::service::error_response;

/// The request a response answers, as far as its framing depends on it.
pub struct Answering {
    pub method: Method,
    pub uri: Uri,
}

impl Answering {
    fn describe(&self) -> String {
        let target = self.uri.path_and_query().map_or("/", |p| p.as_str());
        format!("{} {}", self.method, target)
    }
}

/// The response as it may go out, framed by its body.
pub fn frame(response: Response<ResponseBody>, request: &Answering, log: Source) -> Response<ResponseBody> {
    let status = response.status();
    let bodiless = status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let declared = match declared_length(response.headers()) {
        Ok(declared) => declared,
        Err(value) => {
            return refuse(log, request, format!("an invalid Content-Length ({value})"));
        }
    };
    // A HEAD response may declare the length of the body it would have had.
    if bodiless || request.method == Method::HEAD {
        return response;
    }
    let Some(declared) = declared else { return response };
    let (parts, body) = response.into_parts();
    let body = match body {
        ResponseBody::Full(bytes) => {
            let actual = bytes.as_ref().map_or(0, |b| b.len() as u64);
            if actual != declared {
                return refuse(log, request, format!("Content-Length {declared} with a body of {actual} bytes"));
            }
            ResponseBody::Full(bytes)
        }
        streamed => ResponseBody::Boxed(DeclaredLength::new(streamed, declared, request.describe(), log).boxed()),
    };
    Response::from_parts(parts, body)
}

/// The `Content-Length` a response declares: None without one, the value
/// when every one agrees, else the offending text.
fn declared_length(headers: &HeaderMap) -> Result<Option<u64>, String> {
    let mut declared = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        let text = value.to_str().map_err(|_| String::from_utf8_lossy(value.as_bytes()).into_owned())?;
        for item in text.split(',') {
            let item = item.trim();
            let length = (!item.is_empty() && item.bytes().all(|b| b.is_ascii_digit()))
                .then(|| item.parse::<u64>().ok())
                .flatten()
                .ok_or_else(|| text.to_owned())?;
            if declared.is_some_and(|d| d != length) {
                return Err(text.to_owned());
            }
            declared = Some(length);
        }
    }
    Ok(declared)
}

fn refuse(log: Source, request: &Answering, problem: String) -> Response<ResponseBody> {
    Metrics::refused_by(log, Refused::ResponseFraming);
    log.report(
        Kind::Response,
        Level::Error,
        format!("the application's response to {} had {problem}: sent 500 instead", request.describe()),
    );
    error_response(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error")
}

/// The response to a HEAD request: the head alone. A whole body still tells its length; a
/// streamed one is read to its end and dropped, so the application writing
/// it is neither blocked nor told the client left.
pub fn without_body(response: Response<ResponseBody>) -> Response<ResponseBody> {
    let (mut parts, body) = response.into_parts();
    match body {
        ResponseBody::Full(bytes) => {
            if let Some(bytes) = bytes {
                parts.headers.entry(CONTENT_LENGTH).or_insert_with(|| HeaderValue::from(bytes.len()));
            }
        }
        streamed => {
            tokio::spawn(async move {
                let mut streamed = streamed;
                while let Some(Ok(_)) = streamed.frame().await {}
            });
        }
    }
    Response::from_parts(parts, ResponseBody::Boxed(HeadOnly.boxed()))
}

/// The body of a HEAD response: over at once, of no known length, so that
/// neither hyper nor h2 adds a `Content-Length: 0` the response never had.
struct HeadOnly;

impl Body for HeadOnly {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        true
    }
}

/// A streamed body held to the length its head declared.
struct DeclaredLength {
    inner: ResponseBody,
    left: u64,
    /// The bytes that complete the body, given out only once the inner body
    /// has ended: hyper stops reading a body its length has filled, and
    /// would never see the bytes that came after.
    last: Option<Bytes>,
    request: String,
    log: Source,
}

impl DeclaredLength {
    fn new(inner: ResponseBody, declared: u64, request: String, log: Source) -> Self {
        DeclaredLength { inner, left: declared, last: None, request, log }
    }

    fn cut(&self, problem: String) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        Metrics::refused_by(self.log, Refused::ResponseFraming);
        self.log.report(
            Kind::Response,
            Level::Error,
            format!("the application's response to {} {problem}: the response was cut off", self.request),
        );
        Poll::Ready(Some(Err(std::io::Error::other("the response body does not match its Content-Length"))))
    }
}

impl Body for DeclaredLength {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        loop {
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    if let Some(last) = this.last.take() {
                        return Poll::Ready(Some(Ok(Frame::data(last))));
                    }
                    if this.left > 0 {
                        let left = this.left;
                        return this.cut(format!("ended {left} bytes short of its Content-Length"));
                    }
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            let Some(data) = frame.data_ref() else { continue };
            let size = data.len() as u64;
            if size == 0 {
                continue;
            }
            if size > this.left || this.last.is_some() {
                return this.cut("went on past its Content-Length".to_owned());
            }
            this.left -= size;
            let data = frame.into_data().unwrap_or_default();
            if this.left > 0 {
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            this.last = Some(data);
        }
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0 && self.last.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left + self.last.as_ref().map_or(0, |b| b.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for value in values {
            map.append(CONTENT_LENGTH, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn content_length_values_must_agree_and_be_digits() {
        assert_eq!(declared_length(&headers(&[])), Ok(None));
        assert_eq!(declared_length(&headers(&["12"])), Ok(Some(12)));
        assert_eq!(declared_length(&headers(&["12", "12"])), Ok(Some(12)));
        assert_eq!(declared_length(&headers(&["12, 12"])), Ok(Some(12)));
        assert!(declared_length(&headers(&["12", "13"])).is_err());
        assert!(declared_length(&headers(&["+12"])).is_err());
        assert!(declared_length(&headers(&["0x5"])).is_err());
        assert!(declared_length(&headers(&[""])).is_err());
        assert!(declared_length(&headers(&["99999999999999999999999"])).is_err());
    }
}
