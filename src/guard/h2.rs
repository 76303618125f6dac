//! HTTP/2 frames, followed so the guard sees every header block whole. h2
//! builds a request's URI with the `http` crate, which cuts a `:path` at `#`
//! and lets the rest through; so each block is read here too ([`PathWatch`]),
//! with a dynamic table kept in step with h2's, and a block whose `:path` holds a `#`
//! gets one more field: a second `:path`. That makes the request malformed
//! to h2, which resets the stream (RFC 9113 section 8.1.1) before hyper sees
//! it, and leaves the connection's other streams and both HPACK tables as
//! they were (the field is not indexed).
//!
//! A block's frames are held back until each is whole, so the last one's
//! END_HEADERS flag can still be moved to the added CONTINUATION frame.

use super::h1::PREFACE;
use super::hpack::PathWatch;
use super::Verdict;

const FRAME_HEAD: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The dynamic table size h2 advertises (SETTINGS_HEADER_TABLE_SIZE is left
/// at its default).
const HEADER_TABLE_SIZE: usize = 4096;
/// A field h2 refuses after the request's own `:path`: literal, not
/// indexed, name `:path` (static index 4), value "/".
const SECOND_PATH: [u8; 3] = [0x04, 0x01, b'/'];

enum State {
    /// Bytes to pass before the next frame head: the preface, or the rest of
    /// a frame that holds no header block.
    Skip(usize),
    FrameHead,
    /// Decoding failed or a block grew past h2's limits: h2 ends such a
    /// connection itself.
    Off,
}

pub struct Frames {
    state: State,
    /// The header block so far, from HEADERS and CONTINUATION frames.
    block: Vec<u8>,
    paths: PathWatch,
    /// h2 ends a connection whose header block grows past its header list
    /// limit by more than a frame; past this the guard stands aside.
    max_block: usize,
}

impl Frames {
    /// Frames that start with the client's preface.
    pub fn new(max_head: usize) -> Self {
        Frames {
            state: State::Skip(PREFACE.len()),
            block: Vec::new(),
            paths: PathWatch::new(HEADER_TABLE_SIZE),
            max_block: max_head + (64 << 10),
        }
    }

    /// Follows frames through freshly read bytes.
    pub fn inspect(&mut self, data: &mut [u8]) -> Verdict {
        let mut pos = 0;
        while pos < data.len() {
            match self.state {
                State::Off => return Verdict::Pass,
                State::Skip(left) => {
                    let take = left.min(data.len() - pos);
                    self.state = if take == left { State::FrameHead } else { State::Skip(left - take) };
                    pos += take;
                }
                State::FrameHead => {
                    let rest = &data[pos..];
                    if rest.len() < FRAME_HEAD {
                        return Verdict::Hold(pos);
                    }
                    let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
                    let (kind, flags) = (rest[3], rest[4]);
                    if kind != HEADERS && kind != CONTINUATION {
                        self.state = State::Skip(len);
                        pos += FRAME_HEAD;
                        continue;
                    }
                    if self.block.len() + len > self.max_block {
                        self.state = State::Off;
                        return Verdict::Pass;
                    }
                    if rest.len() < FRAME_HEAD + len {
                        return Verdict::Hold(pos);
                    }
                    let Some(fragment) = fragment(kind, flags, &rest[FRAME_HEAD..FRAME_HEAD + len]) else {
                        self.state = State::Off;
                        return Verdict::Pass;
                    };
                    let judged = if flags & END_HEADERS == 0 {
                        self.block.extend_from_slice(fragment);
                        pos += FRAME_HEAD + len;
                        continue;
                    } else if self.block.is_empty() {
                        self.paths.fragment_in_path(fragment)
                    } else {
                        self.block.extend_from_slice(fragment);
                        let judged = self.paths.fragment_in_path(&self.block);
                        self.block.clear();
                        judged
                    };
                    let frame = pos;
                    pos += FRAME_HEAD + len;
                    match judged {
                        Some(false) => {}
                        Some(true) => {
                            data[frame + 4] &= !END_HEADERS;
                            let mut refusal = vec![0, 0, SECOND_PATH.len() as u8, CONTINUATION, END_HEADERS];
                            refusal.extend_from_slice(&data[frame + 5..frame + FRAME_HEAD]);
                            refusal.extend_from_slice(&SECOND_PATH);
                            return Verdict::Insert(pos, refusal);
                        }
                        None => {
                            self.state = State::Off;
                            return Verdict::Pass;
                        }
                    }
                }
            }
        }
        Verdict::Pass
    }
}

/// The header block fragment of a HEADERS or CONTINUATION frame's payload:
/// without the pad length, priority fields and padding. None when the
/// padding does not fit.
fn fragment(kind: u8, flags: u8, payload: &[u8]) -> Option<&[u8]> {
    if kind == CONTINUATION {
        return Some(payload);
    }
    let (mut start, mut end) = (0, payload.len());
    if flags & PADDED != 0 {
        start = 1;
        end = end.checked_sub(*payload.first()? as usize)?;
    }
    if flags & PRIORITY != 0 {
        start += 5;
    }
    payload.get(start..end)
}
