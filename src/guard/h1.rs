//! HTTP/1 framing, followed so the guard knows where each request head
//! starts: Content-Length and chunked bodies are skipped; after an upgrade or
//! anything it does not follow (a head hyper will refuse anyway) it stands
//! aside. A head with a `#` in its target, or with both Content-Length and
//! Transfer-Encoding (hyper drops the length; RFC 9112 lets a server refuse,
//! and refusing stops request smuggling through a proxy), has its first byte
//! spoiled, so hyper itself answers 400 and closes.
//!
//! Knowing where heads start also gives the header read timeout its clock
//! ([`PendingHead`]) without a timer per request.

use std::mem::MaybeUninit;
use std::sync::Arc;

use super::{PendingHead, Verdict};

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

    /// Follows the framing through freshly read bytes, spoiling refused heads.
    pub fn inspect(&mut self, data: &mut [u8]) -> Verdict {
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
                State::Head => match self.head(&mut data[pos..]) {
                    Some(len) => len,
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
    fn head(&mut self, data: &mut [u8]) -> Option<usize> {
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
            Next::Refuse => {
                data[0] = 0;
                State::Off
            }
            Next::Off => State::Off,
            Next::Body(0) => State::Head,
            Next::Body(length) => State::Body(length),
            Next::Chunked => State::ChunkSize,
        };
        Some(len)
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

enum Next {
    Refuse,
    Off,
    Body(u64),
    Chunked,
}

fn judge(request: &httparse::Request<'_, '_>) -> Next {
    if request.path.is_some_and(|p| p.contains('#')) {
        return Next::Refuse;
    }
    let mut length = None;
    let mut chunked = false;
    let mut upgrade = false;
    for header in request.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            let Some(value) = std::str::from_utf8(header.value).ok().and_then(|v| v.trim().parse::<u64>().ok())
            else {
                return Next::Off;
            };
            length = Some(value);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = true;
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    if chunked && length.is_some() {
        return Next::Refuse;
    }
    if upgrade || request.method.is_some_and(|m| m.eq_ignore_ascii_case("CONNECT")) {
        return Next::Off;
    }
    if chunked {
        Next::Chunked
    } else {
        Next::Body(length.unwrap_or(0))
    }
}

