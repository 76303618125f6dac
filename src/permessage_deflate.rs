//! permessage-deflate (RFC 7692) negotiation: which of the client's offers
//! the server takes, and the `Sec-WebSocket-Extensions` answer that says so.
//! The compression itself is yawc's, run with that answer.

use http::header::SEC_WEBSOCKET_EXTENSIONS;
use http::HeaderMap;

const EXTENSION: &str = "permessage-deflate";
/// RFC 7692 allows windows of 2^8 to 2^15 bytes, but zlib cannot deflate
/// with 2^8 (it silently uses 2^9): an offer that insists on 8 for the
/// server is declined rather than answered with a window we would not keep.
const SMALLEST_SERVER_WINDOW_BITS: u8 = 9;

/// The answer to the first permessage-deflate offer we can honour, in the
/// client's order of preference; None when there is none (no compression).
pub fn negotiate(request_headers: &HeaderMap) -> Option<String> {
    request_headers
        .get_all(SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|value| value.to_str().ok())
        // Offers are comma-separated; permessage-deflate's parameter values
        // are digits, so no quoted string of ours holds a comma.
        .flat_map(|value| value.split(','))
        .find_map(accept)
}

/// The answer to one offer (`permessage-deflate; name; name=value`), or None
/// to decline it: another extension, an unknown or repeated parameter, or a
/// value out of range (RFC 7692 section 7.1).
fn accept(offer: &str) -> Option<String> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case(EXTENSION) {
        return None;
    }
    let mut answer = String::from(EXTENSION);
    let mut seen: Vec<&str> = Vec::new();
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
            None => (param, None),
        };
        if seen.contains(&name) {
            return None;
        }
        seen.push(name);
        match (name, value) {
            // We can start every message afresh, and say so.
            ("server_no_context_takeover", None) => answer.push_str("; server_no_context_takeover"),
            // The client will; our inflater then forgets between messages too.
            ("client_no_context_takeover", None) => answer.push_str("; client_no_context_takeover"),
            ("server_max_window_bits", Some(bits)) => {
                let bits = window_bits(bits)?;
                if bits < SMALLEST_SERVER_WINDOW_BITS {
                    return None;
                }
                answer.push_str(&format!("; server_max_window_bits={bits}"));
            }
            // The client may shrink its own window: our inflater reads any
            // window, so the answer leaves the choice to the client.
            ("client_max_window_bits", None) => {}
            ("client_max_window_bits", Some(bits)) => {
                window_bits(bits)?;
            }
            _ => return None,
        }
    }
    Some(answer)
}

/// A window size parameter: 8 to 15, digits without a leading zero.
fn window_bits(value: &str) -> Option<u8> {
    if value.starts_with('0') || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().filter(|bits| (8..=15).contains(bits))
}
