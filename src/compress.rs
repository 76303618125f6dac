//! `auto_compress`: gzip for clients that accept it, done on tokio threads so
//! the loop thread never spends time compressing.

use std::io::Write;

use flate2::write::GzEncoder;
use flate2::Compression;
use http::header::{ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH, VARY};
use http::{HeaderMap, HeaderValue, Response};

use crate::body::ResponseBody;

/// True when `Accept-Encoding` lists gzip (or `*`) with a non-zero quality.
pub fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers.get_all(ACCEPT_ENCODING).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(|item| {
        let mut parts = item.split(';').map(str::trim);
        let coding = parts.next().unwrap_or("");
        let refused = parts.any(|p| p.strip_prefix("q=").and_then(|q| q.parse::<f32>().ok()) == Some(0.0));
        (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !refused
    })
}

/// Compresses a full body unless it is empty or already encoded. Streamed
/// bodies pass through unchanged.
pub fn gzip(response: Response<ResponseBody>) -> Response<ResponseBody> {
    let (mut parts, body) = response.into_parts();
    let ResponseBody::Full(Some(bytes)) = &body else {
        return Response::from_parts(parts, body);
    };
    if parts.headers.contains_key(CONTENT_ENCODING) {
        return Response::from_parts(parts, body);
    }
    let mut encoder = GzEncoder::new(Vec::with_capacity(bytes.len() / 2 + 32), Compression::fast());
    if encoder.write_all(bytes).is_err() {
        return Response::from_parts(parts, body);
    }
    let Ok(compressed) = encoder.finish() else {
        return Response::from_parts(parts, body);
    };
    parts.headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    parts.headers.remove(CONTENT_LENGTH);
    parts.headers.append(VARY, HeaderValue::from_static("accept-encoding"));
    Response::from_parts(parts, ResponseBody::full(compressed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepts(value: &str) -> bool {
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT_ENCODING, HeaderValue::from_str(value).unwrap());
        accepts_gzip(&headers)
    }

    #[test]
    fn gzip_is_accepted_unless_refused_with_q_zero() {
        assert!(accepts("gzip"));
        assert!(accepts("br, GZIP;q=0.5"));
        assert!(accepts("*"));
        assert!(!accepts("gzip;q=0"));
        assert!(!accepts("br, deflate"));
        assert!(!accepts("identity"));
    }
}
