//! HTTP/2 frames, followed so the guard sees every header block whole and
//! reads it as h2 will ([`Table`]). A refused request's block is handed on
//! in new frames, with one more field: a second `:path`. That makes the
//! request malformed to h2, which resets the stream (RFC 9113 section
//! 8.1.1) before hyper sees it, and leaves the connection's other streams
//! and both HPACK tables as they were (the field is not indexed).
//!
//! A block's frames are held back until the last one is whole, so all of
//! them can still be replaced. Where h2 ends the connection anyway (a frame
//! over its size limit, more CONTINUATION frames than it takes, another
//! frame inside a block, a block that is not valid HPACK) the guard hands
//! the bytes on at once and stands aside.

use super::h1::PREFACE;
use super::hpack::{Judged, Table};
use super::{Refusal, Verdict};

const FRAME_HEAD: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// SETTINGS_MAX_FRAME_SIZE's least value, which every HTTP/2 endpoint takes:
/// a rebuilt block's frames are no larger.
const MAX_FRAME: usize = 16 << 10;
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
    /// h2 ends this connection itself.
    Off,
}

/// What became of a header block at the start of the bytes read.
enum Block {
    /// Its frames are not all here yet.
    Partial,
    /// Its frames, this long, go on as they are.
    Pass(usize),
    /// Its frames, this long, are replaced.
    Refuse(Refusal),
    /// h2 ends the connection over it.
    Aside,
}

/// What h2 was told to take: SETTINGS_MAX_HEADER_LIST_SIZE and
/// SETTINGS_MAX_FRAME_SIZE.
#[derive(Clone, Copy)]
pub struct Limits {
    pub max_head: usize,
    pub max_frame: usize,
}

pub struct Frames {
    state: State,
    table: Table,
    /// h2 ends a connection whose peer sends a larger frame.
    max_frame: usize,
    /// The most CONTINUATION frames without END_HEADERS h2 takes in a block.
    max_continuations: usize,
    /// The fragments of a block of several frames, joined.
    joined: Vec<u8>,
}

impl Frames {
    /// Frames that start with the client's preface, read within h2's `limits`.
    pub fn new(limits: Limits) -> Self {
        Frames {
            state: State::Skip(PREFACE.len()),
            table: Table::new(HEADER_TABLE_SIZE),
            max_frame: limits.max_frame,
            max_continuations: max_continuations(limits),
            joined: Vec::new(),
        }
    }

    /// Follows frames through freshly read bytes.
    pub fn inspect(&mut self, data: &[u8]) -> Verdict {
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
                    let Some(head) = Head::parse(&data[pos..]) else {
                        return Verdict::Hold(pos);
                    };
                    if head.kind != HEADERS {
                        // A CONTINUATION outside a block ends the connection.
                        self.state = if head.kind == CONTINUATION { State::Off } else { State::Skip(head.len) };
                        pos += FRAME_HEAD;
                        continue;
                    }
                    match self.block(head, &data[pos..]) {
                        Block::Partial => return Verdict::Hold(pos),
                        Block::Pass(len) => pos += len,
                        Block::Refuse(refusal) => return Verdict::Refuse(refusal.shifted(pos)),
                        Block::Aside => {
                            self.state = State::Off;
                            return Verdict::Pass;
                        }
                    }
                }
            }
        }
        Verdict::Pass
    }

    /// Reads the header block whose HEADERS frame starts `data`, once all
    /// its frames are here.
    fn block(&mut self, first: Head, data: &[u8]) -> Block {
        if first.stream == 0 {
            return Block::Aside;
        }
        let mut end = 0;
        let mut continuations = 0;
        loop {
            let Some(head) = Head::parse(&data[end..]) else { return Block::Partial };
            if end > 0 && (head.kind != CONTINUATION || head.stream != first.stream) || head.len > self.max_frame {
                return Block::Aside;
            }
            if end > 0 && head.flags & END_HEADERS == 0 {
                continuations += 1;
                if continuations > self.max_continuations {
                    return Block::Aside;
                }
            }
            if data.len() - end < FRAME_HEAD + head.len {
                return Block::Partial;
            }
            end += FRAME_HEAD + head.len;
            if head.flags & END_HEADERS != 0 {
                break;
            }
        }
        let payload = &data[FRAME_HEAD..FRAME_HEAD + first.len];
        let Some((priority, fragment)) = fields(first.flags, payload) else { return Block::Aside };
        if priority.is_some_and(|p| u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & STREAM_MASK == first.stream) {
            // A stream that depends on itself is reset before its block is decoded.
            return Block::Pass(end);
        }
        let judged = if end == FRAME_HEAD + first.len {
            self.table.judge(fragment)
        } else {
            self.joined.clear();
            self.joined.extend_from_slice(fragment);
            let mut rest = &data[FRAME_HEAD + first.len..end];
            while let Some(head) = Head::parse(rest) {
                self.joined.extend_from_slice(&rest[FRAME_HEAD..FRAME_HEAD + head.len]);
                rest = &rest[FRAME_HEAD + head.len..];
            }
            self.table.judge(&self.joined)
        };
        match judged {
            None => Block::Aside,
            Some(Judged::Pass) => Block::Pass(end),
            Some(Judged::Refuse(reason, rewritten)) => {
                let block = match &rewritten {
                    Some(block) => block,
                    None if end == FRAME_HEAD + first.len => fragment,
                    None => &self.joined,
                };
                let spoiled = frames(&data[5..9], first.flags & (END_STREAM | PRIORITY), priority, block);
                Block::Refuse(Refusal { range: 0..end, spoiled, reason })
            }
        }
    }
}

/// The stream identifier's bits (the top one is reserved).
const STREAM_MASK: u32 = 0x7fff_ffff;

struct Head {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl Head {
    fn parse(data: &[u8]) -> Option<Head> {
        let head = data.get(..FRAME_HEAD)?;
        Some(Head {
            len: u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize,
            kind: head[3],
            flags: head[4],
            stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & STREAM_MASK,
        })
    }
}

/// The priority fields and header block fragment of a HEADERS frame's
/// payload, without the pad length and padding. None when they do not fit
/// (h2 ends the connection).
fn fields(flags: u8, payload: &[u8]) -> Option<(Option<&[u8]>, &[u8])> {
    let (mut start, mut end) = (0, payload.len());
    if flags & PADDED != 0 {
        start = 1;
        end = end.checked_sub(*payload.first()? as usize)?;
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        priority = Some(payload.get(start..start + 5)?);
        start += 5;
    }
    Some((priority, payload.get(start..end)?))
}

/// A refused request's block in new frames: HEADERS with `flags` and
/// `priority`, then CONTINUATION as needed, unpadded, ending in a second
/// `:path`.
fn frames(stream: &[u8], flags: u8, priority: Option<&[u8]>, block: &[u8]) -> Vec<u8> {
    let mut fields = Vec::with_capacity(block.len() + SECOND_PATH.len());
    fields.extend_from_slice(block);
    fields.extend_from_slice(&SECOND_PATH);
    let mut out = Vec::with_capacity(fields.len() + 5 + FRAME_HEAD * (1 + fields.len() / MAX_FRAME));
    let (mut kind, mut flags, mut prefix) = (HEADERS, flags, priority.unwrap_or_default());
    let mut rest = &fields[..];
    loop {
        let take = rest.len().min(MAX_FRAME - prefix.len());
        if take == rest.len() {
            flags |= END_HEADERS;
        }
        out.extend_from_slice(&((prefix.len() + take) as u32).to_be_bytes()[1..]);
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(stream);
        out.extend_from_slice(prefix);
        out.extend_from_slice(&rest[..take]);
        rest = &rest[take..];
        if flags & END_HEADERS != 0 {
            return out;
        }
        kind = CONTINUATION;
        flags = 0;
        prefix = &[];
    }
}

/// h2's bound on CONTINUATION frames in one block: enough for a header list
/// of `max_head` in frames of `max_frame`, and a quarter more, at least 5.
fn max_continuations(Limits { max_head, max_frame }: Limits) -> usize {
    let frames = (max_head / max_frame).max(1);
    frames.saturating_add(frames >> 2).max(5)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// Frames past the preface (and an empty SETTINGS).
    fn after_preface() -> Frames {
        let mut frames = Frames::new(Limits { max_head: 64 << 10, max_frame: MAX_FRAME });
        let start = [PREFACE, &frame(0x4, 0, 0, b"")].concat();
        assert!(matches!(frames.inspect(&start), Verdict::Pass));
        frames
    }

    /// `:method: GET`, `:scheme: http`, `:path: /`, `:authority: x` (not indexed).
    const REQUEST: &[u8] = b"\x82\x86\x84\x01\x01x";
    /// A literal field, not indexed, `Bad: v`: h2 would end the connection.
    const UPPERCASE: &[u8] = b"\x00\x03Bad\x01v";

    #[test]
    fn a_good_block_passes_at_once() {
        let mut frames = after_preface();
        let data = [frame(HEADERS, END_STREAM | END_HEADERS, 1, REQUEST), frame(0x0, 0, 1, b"body")].concat();
        assert!(matches!(frames.inspect(&data), Verdict::Pass));
    }

    #[test]
    fn a_refused_block_is_rebuilt_with_a_second_path() {
        let mut frames = after_preface();
        let block = [REQUEST, UPPERCASE].concat();
        // padded and prioritised, split over a CONTINUATION
        let headers = frame(
            HEADERS,
            END_STREAM | PADDED | PRIORITY,
            3,
            &[&[2][..], &[0, 0, 0, 1, 15], &block[..4], &[0, 0]].concat(),
        );
        let data =
            [headers, frame(CONTINUATION, END_HEADERS, 3, &block[4..]), frame(0x8, 0, 0, &[0, 0, 0, 1])].concat();
        let Verdict::Refuse(refusal) = frames.inspect(&data) else { panic!("refused") };
        assert_eq!(refusal.reason, "an uppercase letter in a field name");
        assert_eq!(refusal.range, 0..data.len() - 13);
        let rewritten = [REQUEST, b"\x00\x03xxx\x01x", &SECOND_PATH].concat();
        let payload = [&[0, 0, 0, 1, 15][..], &rewritten].concat();
        assert_eq!(refusal.spoiled, frame(HEADERS, END_STREAM | PRIORITY | END_HEADERS, 3, &payload));
    }

    #[test]
    fn a_fragment_is_refused_as_sent() {
        let mut frames = after_preface();
        let block = b"\x82\x86\x41\x01x\x04\x04/a#b";
        let Verdict::Refuse(refusal) = frames.inspect(&frame(HEADERS, END_HEADERS, 1, block)) else { panic!() };
        assert_eq!(refusal.spoiled, frame(HEADERS, END_HEADERS, 1, &[&block[..], &SECOND_PATH].concat()));
    }

    #[test]
    fn a_large_refused_block_takes_several_frames() {
        let mut frames = after_preface();
        let mut block = REQUEST.to_vec();
        for i in 0..3 {
            block.extend_from_slice(&[0x00, 0x03, b'x', b'-', b'0' + i, 0x7f, 0xc1, 0x3d]); // a value of 8000 bytes
            block.extend_from_slice(&[b'v'; 8000]);
        }
        block.extend_from_slice(UPPERCASE);
        let data =
            [frame(HEADERS, 0, 1, &block[..16384]), frame(CONTINUATION, END_HEADERS, 1, &block[16384..])].concat();
        let Verdict::Refuse(refusal) = frames.inspect(&data) else { panic!() };
        let spoiled = &refusal.spoiled;
        assert_eq!((spoiled[3], spoiled[4], &spoiled[..3]), (HEADERS, 0, &[0, 0x40, 0][..]));
        let second = &spoiled[FRAME_HEAD + 16384..];
        assert_eq!((second[3], second[4]), (CONTINUATION, END_HEADERS));
        assert!(spoiled.ends_with(&[b"\x00\x03xxx\x01x".as_slice(), &SECOND_PATH].concat()));
    }

    #[test]
    fn frames_as_large_as_h2_takes_are_read() {
        let mut block = REQUEST.to_vec();
        for i in 0..3 {
            block.extend_from_slice(&[0x00, 0x03, b'x', b'-', b'0' + i, 0x7f, 0xc1, 0x3d]); // a value of 8000 bytes
            block.extend_from_slice(&[b'v'; 8000]);
        }
        block.extend_from_slice(UPPERCASE);
        let data = frame(HEADERS, END_HEADERS, 1, &block);
        let start = [PREFACE, &frame(0x4, 0, 0, b"")].concat();
        let mut frames = Frames::new(Limits { max_head: 64 << 10, max_frame: 32 << 10 });
        assert!(matches!(frames.inspect(&start), Verdict::Pass));
        assert!(matches!(frames.inspect(&data), Verdict::Refuse(_)));
        // h2 ends the connection over a frame beyond its limit: the guard stands aside
        assert!(matches!(after_preface().inspect(&data), Verdict::Pass));
    }

    #[test]
    fn a_block_is_held_until_its_last_frame_is_whole() {
        let mut frames = after_preface();
        let block = [REQUEST, UPPERCASE].concat();
        let data = [
            frame(0x8, 0, 0, &[0, 0, 0, 1]),
            frame(HEADERS, 0, 1, &block[..3]),
            frame(CONTINUATION, END_HEADERS, 1, &block[3..]),
        ]
        .concat();
        for cut in 14..data.len() {
            assert!(matches!(frames.inspect(&data[..cut]), Verdict::Hold(13)), "{cut}");
            frames.state = State::FrameHead;
        }
        assert!(matches!(frames.inspect(&data[13..]), Verdict::Refuse(_)));
    }

    #[test]
    fn what_h2_ends_the_connection_over_is_left_to_it() {
        let oversize = frame(HEADERS, END_HEADERS, 1, &[0; MAX_FRAME + 1]);
        let flood: Vec<u8> = [frame(HEADERS, 0, 1, REQUEST)]
            .into_iter()
            .chain(std::iter::repeat_n(frame(CONTINUATION, 0, 1, b""), 6))
            .flatten()
            .collect();
        let other_stream = [frame(HEADERS, 0, 1, REQUEST), frame(CONTINUATION, END_HEADERS, 3, b"")].concat();
        let lone = frame(CONTINUATION, END_HEADERS, 1, UPPERCASE);
        let bad_index = frame(HEADERS, END_HEADERS, 1, b"\xff\x00");
        for data in [&oversize[..FRAME_HEAD], &flood, &other_stream, &lone, &bad_index] {
            let mut frames = after_preface();
            assert!(matches!(frames.inspect(data), Verdict::Pass));
            let after = frame(HEADERS, END_HEADERS, 3, &[REQUEST, UPPERCASE].concat());
            assert!(matches!(frames.inspect(&after), Verdict::Pass), "the guard stands aside");
        }
        // five CONTINUATION frames without END_HEADERS are still a block
        let mut frames = after_preface();
        assert!(matches!(frames.inspect(&flood[..flood.len() - FRAME_HEAD]), Verdict::Hold(0)));
    }

    #[test]
    fn continuation_bound_is_h2s() {
        let limits = |max_head, max_frame| Limits { max_head, max_frame };
        assert_eq!(max_continuations(limits(16 << 10, MAX_FRAME)), 5);
        assert_eq!(max_continuations(limits(64 << 10, MAX_FRAME)), 5);
        assert_eq!(max_continuations(limits(1 << 20, MAX_FRAME)), 80);
        assert_eq!(max_continuations(limits(1 << 20, 64 << 10)), 20);
    }
}
