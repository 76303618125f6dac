//! HTTP/1 framing, followed so the guard knows where each request head
//! starts: Content-Length and chunked bodies are skipped; after an upgrade or
//! anything it does not follow (a head hyper will refuse anyway) it stands
//! aside. A head hyper would take but should not has its first byte
//! spoiled, so hyper itself answers 400 and closes: one whose target holds a
//! byte no URI has ([`target_fault`]), one with both Content-Length and
//! Transfer-Encoding (hyper drops the length; RFC 9112 lets a server refuse,
//! and refusing stops request smuggling through a proxy), and one whose
//! Transfer-Encoding is anything but a single `chunked` (hyper takes
//! `chunked, chunked` and `gzip, chunked` as chunked).
//!
//! Knowing where heads start also gives the header read timeout its clock
//! ([`PendingHead`]) without a timer per request.

use std::mem::MaybeUninit;
use std::sync::Arc;

use super::{PendingHead, Refusal, Verdict};

/// The longest chunk-size or trailer line followed before giving up.
const MAX_LINE: usize = 4096;
/// Heads with more header lines are left to hyper (which refuses them with
/// 431 under the default `max_headers`).
const MAX_HEADERS: usize = 128;
/// What an HTTP/2 client sends first (RFC 9113 section 3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

enum State {
    Head,
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd,
    Trailers { line_len: usize },
    Off,
}

pub struct Framing {
    state: State,
    /// No head has been seen yet: the HTTP/2 preface may come instead.
    first: bool,
    /// A chunk-size line that arrived in pieces.
    line: Vec<u8>,
    max_head: usize,
    pending: Arc<PendingHead>,
}

impl Framing {
    pub fn new(max_head: usize, pending: Arc<PendingHead>) -> Self {
        Framing { state: State::Head, first: true, line: Vec::new(), max_head, pending }
    }

    /// A request has been seen, and every byte since belongs to it.
    pub fn between_requests(&self) -> bool {
        !self.first && matches!(self.state, State::Head)
    }

    /// Follows the framing through freshly read bytes, spoiling refused heads.
    pub fn inspect(&mut self, data: &[u8]) -> Verdict {
        let mut pos = 0;
        while pos < data.len() {
            pos += match self.state {
                State::Off => return Verdict::Pass,
                State::Head if self.first && PREFACE.starts_with(&data[pos..data.len().min(pos + PREFACE.len())]) => {
                    if data.len() - pos < PREFACE.len() {
                        return Verdict::Hold(pos);
                    }
                    return Verdict::Http2(pos);
                }
                State::Head => match self.head(&data[pos..]) {
                    Some(Ok(len)) => len,
                    // A NUL first byte is no method: hyper answers 400 and closes.
                    Some(Err(reason)) => {
                        let _ = self.pending.refused.set(reason);
                        return Verdict::Refuse(Refusal { range: pos..pos + 1, spoiled: vec![0], reason });
                    }
                    None => {
                        self.pending.start();
                        return Verdict::Hold(pos);
                    }
                },
                State::Body(left) => {
                    let take = left.min((data.len() - pos) as u64);
                    self.state = if take == left { State::Head } else { State::Body(left - take) };
                    take as usize
                }
                State::ChunkSize => self.chunk_size(&data[pos..]),
                State::ChunkData(left) => {
                    let take = left.min((data.len() - pos) as u64);
                    self.state = if take == left { State::ChunkDataEnd } else { State::ChunkData(left - take) };
                    take as usize
                }
                State::ChunkDataEnd => match data[pos..].iter().position(|&b| b == b'\n') {
                    Some(at) => {
                        self.state = State::ChunkSize;
                        at + 1
                    }
                    None => data.len() - pos,
                },
                State::Trailers { line_len } => self.trailers(&data[pos..], line_len),
            };
        }
        Verdict::Pass
    }

    /// Judges the head at the start of `data`: its length, or None while it
    /// is incomplete.
    fn head(&mut self, data: &[u8]) -> Option<Result<usize, &'static str>> {
        let mut headers = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
        let mut request = httparse::Request::new(&mut []);
        let (len, next) = match request.parse_with_uninit_headers(data, &mut headers) {
            Ok(httparse::Status::Complete(len)) => {
                self.pending.finish();
                (len, judge(&request))
            }
            Ok(httparse::Status::Partial) if data.len() <= self.max_head => return None,
            // Too long or malformed: hyper refuses it on its own.
            _ => (data.len(), Next::Off),
        };
        self.first = false;
        self.state = match next {
            Next::Refuse(_) | Next::Off => State::Off,
            Next::Body(0) => State::Head,
            Next::Body(length) => State::Body(length),
            Next::Chunked => State::ChunkSize,
        };
        match next {
            Next::Refuse(reason) => Some(Err(reason)),
            _ => Some(Ok(len)),
        }
    }

    fn chunk_size(&mut self, data: &[u8]) -> usize {
        let Some(at) = data.iter().position(|&b| b == b'\n') else {
            self.line.extend_from_slice(data);
            if self.line.len() > MAX_LINE {
                self.state = State::Off;
            }
            return data.len();
        };
        self.line.extend_from_slice(&data[..=at]);
        self.state = match httparse::parse_chunk_size(&self.line) {
            Ok(httparse::Status::Complete((_, 0))) => State::Trailers { line_len: 0 },
            Ok(httparse::Status::Complete((_, size))) => State::ChunkData(size),
            _ => State::Off,
        };
        self.line.clear();
        at + 1
    }

    fn trailers(&mut self, data: &[u8], mut line_len: usize) -> usize {
        for (i, &byte) in data.iter().enumerate() {
            match byte {
                b'\n' if line_len == 0 => {
                    self.state = State::Head;
                    return i + 1;
                }
                b'\n' => line_len = 0,
                b'\r' => {}
                _ => line_len += 1,
            }
        }
        self.state = if line_len > MAX_LINE { State::Off } else { State::Trailers { line_len } };
        data.len()
    }
}

#[derive(Clone, Copy)]
enum Next {
    Refuse(&'static str),
    Off,
    Body(u64),
    Chunked,
}

fn judge(request: &httparse::Request<'_, '_>) -> Next {
    if let Some(reason) = request.path.and_then(|target| target_fault(target.as_bytes())) {
        return Next::Refuse(reason);
    }
    let mut length = None;
    let mut codings = 0;
    let mut last_chunked = false;
    let mut upgrade = false;
    for header in request.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            let Some(value) = std::str::from_utf8(header.value).ok().and_then(|v| v.trim().parse::<u64>().ok()) else {
                return Next::Off;
            };
            length = Some(value);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            for coding in header.value.split(|&b| b == b',') {
                codings += 1;
                last_chunked = coding.trim_ascii().eq_ignore_ascii_case(b"chunked");
            }
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    if codings > 0 {
        if codings > 1 || !last_chunked {
            return Next::Refuse(TRANSFER_CODING);
        }
        if length.is_some() {
            return Next::Refuse("a request with both Content-Length and Transfer-Encoding");
        }
    }
    if upgrade || request.method.is_some_and(|m| m.eq_ignore_ascii_case("CONNECT")) {
        return Next::Off;
    }
    if codings > 0 {
        Next::Chunked
    } else {
        Next::Body(length.unwrap_or(0))
    }
}

/// Why a request whose transfer codings are not exactly `chunked` is
/// refused: its length cannot be known when chunked is not the last (RFC
/// 9112 section 6.3), a sender may not apply chunked twice (section 6.1),
/// and the server decodes no other coding (h11 answers 501 for any).
const TRANSFER_CODING: &str = "a Transfer-Encoding other than a single chunked";

/// What is wrong with a request target that httparse and the `http` crate
/// let through: a `#` (the fragment would be dropped silently), a byte
/// above 0x7f (RFC 3986 has none; the `http` crate takes UTF-8), or `"`,
/// `<`, `>`. The other printable bytes RFC 3986 leaves out of a URI (`[`,
/// `]`, `{`, `}`, `|`, `\`, `^`, `` ` ``) pass, as in h11 and httptools:
/// browsers send them raw (the WHATWG URL Standard's percent-encode sets).
fn target_fault(target: &[u8]) -> Option<&'static str> {
    target.iter().find_map(|&byte| match byte {
        b'#' => Some("a fragment in the request target"),
        0x80.. => Some("a byte above 0x7f in the request target"),
        b'"' | b'<' | b'>' => Some("a byte RFC 3986 leaves out of a request target"),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Why the framing refuses this one whole head, or None when it passes.
    fn refusal(head: &[u8]) -> Option<&'static str> {
        let mut framing = Framing::new(64 << 10, Arc::new(PendingHead::new()));
        match framing.inspect(head) {
            Verdict::Pass => None,
            Verdict::Refuse(Refusal { range, spoiled, reason }) => {
                assert_eq!((range, spoiled), (0..1, vec![0]));
                Some(reason)
            }
            _ => panic!("a whole head is judged"),
        }
    }

    fn post(transfer_encoding: &[&str]) -> Vec<u8> {
        let fields: String = transfer_encoding.iter().map(|value| format!("Transfer-Encoding: {value}\r\n")).collect();
        format!("POST / HTTP/1.1\r\nHost: x\r\n{fields}\r\n0\r\n\r\n").into_bytes()
    }

    #[test]
    fn one_chunked_coding_passes() {
        assert_eq!(refusal(&post(&["chunked"])), None);
        assert_eq!(refusal(&post(&[" Chunked "])), None);
    }

    #[test]
    fn any_other_transfer_coding_is_refused() {
        for codings in [
            &["chunked, chunked"][..],
            &["chunked", "chunked"],
            &["gzip, chunked"],
            &["gzip"],
            &["chunked, gzip"],
            &["chunked,"],
            &[""],
            &["chunked;q=1"],
        ] {
            assert_eq!(refusal(&post(codings)), Some(TRANSFER_CODING), "{codings:?}");
        }
    }

    #[test]
    fn length_with_chunked_is_refused() {
        let head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(refusal(head).is_some());
    }

    #[test]
    fn target_bytes() {
        for target in ["/a#b", "/\u{e9}", "/a?q=\"", "/a<b>"] {
            let head = format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n");
            assert!(refusal(head.as_bytes()).is_some(), "{target}");
        }
        let head = "GET /caf\u{e9} HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(refusal(head.as_bytes()), Some("a byte above 0x7f in the request target"));
        for target in
            ["/a/b;c=d?e=f&g=%20h~!$'()*+,:@", "http://example.test:80/abs?q=1", "[::1]:443", "*", "/a[1]{2}^`\\"]
        {
            let head = format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n");
            assert_eq!(refusal(head.as_bytes()), None, "{target}");
        }
    }

    #[test]
    fn refusal_follows_a_body() {
        let mut framing = Framing::new(64 << 10, Arc::new(PendingHead::new()));
        let data =
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET /\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n";
        let Verdict::Refuse(refusal) = framing.inspect(data) else { panic!("the second head is refused") };
        assert_eq!(refusal.range, 50..51);
    }
}
