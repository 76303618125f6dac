//! Just enough HPACK (RFC 7541) to see a `#` in a request's `:path`. The
//! dynamic table is kept in step with h2's by size alone: each entry keeps
//! its name's length, whether it is a `:path` and whether its value holds a
//! `#`, not its text. Huffman strings are decoded (httlib-huffman) only where
//! their text or length is needed: a literal `:path`, a literal name, an
//! entry being indexed. A full decoder (loona-hpack) cost a HashMap per
//! Huffman string; h2's own is private.

use std::collections::VecDeque;

use httlib_huffman::{decode, DecoderSpeed};

/// RFC 7541 Appendix A: the static table's names, from index 1. None of its
/// values holds a `#`.
const STATIC_NAMES: [&str; 61] = [
    ":authority", ":method", ":method", ":path", ":path", ":scheme", ":scheme", ":status", ":status", ":status",
    ":status", ":status", ":status", ":status", "accept-charset", "accept-encoding", "accept-language",
    "accept-ranges", "accept", "access-control-allow-origin", "age", "allow", "authorization", "cache-control",
    "content-disposition", "content-encoding", "content-language", "content-length", "content-location",
    "content-range", "content-type", "cookie", "date", "etag", "expect", "expires", "from", "host", "if-match",
    "if-modified-since", "if-none-match", "if-range", "if-unmodified-since", "last-modified", "link", "location",
    "max-forwards", "proxy-authenticate", "proxy-authorization", "range", "referer", "refresh", "retry-after",
    "server", "set-cookie", "strict-transport-security", "transfer-encoding", "user-agent", "vary", "via",
    "www-authenticate",
];
/// What RFC 7541 section 4.1 adds to each entry's size.
const ENTRY_OVERHEAD: usize = 32;

#[derive(Clone, Copy)]
struct Entry {
    size: usize,
    name_len: usize,
    path: bool,
    fragment: bool,
}

pub struct PathWatch {
    /// Newest first, as HPACK indexes them.
    entries: VecDeque<Entry>,
    size: usize,
    max_size: usize,
    /// The largest size an encoder may ask for: the decoder's
    /// SETTINGS_HEADER_TABLE_SIZE.
    max_allowed: usize,
    huffman: Vec<u8>,
}

/// What a string literal says, when it was looked at.
struct Text {
    len: usize,
    is_path: bool,
    has_hash: bool,
}

impl PathWatch {
    pub fn new(max_allowed: usize) -> Self {
        PathWatch { entries: VecDeque::new(), size: 0, max_size: max_allowed, max_allowed, huffman: Vec::new() }
    }

    /// Reads one whole header block: whether its `:path` holds a `#`. None
    /// when it is not valid HPACK (h2 ends the connection for that).
    pub fn fragment_in_path(&mut self, mut block: &[u8]) -> Option<bool> {
        let mut found = false;
        let mut may_resize = true;
        while let Some(&first) = block.first() {
            if first & 0x80 != 0 {
                let entry = self.entry(integer(&mut block, 7)?)?;
                found |= entry.fragment;
                may_resize = false;
                continue;
            }
            if first & 0xe0 == 0x20 {
                let size = integer(&mut block, 5)?;
                if !may_resize || size > self.max_allowed {
                    return None;
                }
                self.max_size = size;
                self.evict(0);
                continue;
            }
            may_resize = false;
            let indexing = first & 0x40 != 0;
            let index = integer(&mut block, if indexing { 6 } else { 4 })?;
            let (name_len, path) = match index {
                0 => {
                    let name = self.text(&mut block, true)?;
                    (name.len, name.is_path)
                }
                _ => {
                    let entry = self.entry(index)?;
                    (entry.name_len, entry.path)
                }
            };
            let value = self.text(&mut block, path || indexing)?;
            let fragment = path && value.has_hash;
            found |= fragment;
            if indexing {
                self.insert(Entry { size: name_len + value.len + ENTRY_OVERHEAD, name_len, path, fragment });
            }
        }
        Some(found)
    }

    fn entry(&self, index: usize) -> Option<Entry> {
        match index {
            0 => None,
            1..=61 => {
                let name = STATIC_NAMES[index - 1];
                Some(Entry { size: 0, name_len: name.len(), path: name == ":path", fragment: false })
            }
            _ => self.entries.get(index - 62).copied(),
        }
    }

    /// Adds an entry, evicting the oldest to make room; one larger than the
    /// whole table empties it and is not added (RFC 7541 section 4.4).
    fn insert(&mut self, entry: Entry) {
        if entry.size > self.max_size {
            self.entries.clear();
            self.size = 0;
            return;
        }
        self.evict(entry.size);
        self.size += entry.size;
        self.entries.push_front(entry);
    }

    fn evict(&mut self, room: usize) {
        while self.size + room > self.max_size {
            let Some(oldest) = self.entries.pop_back() else { break };
            self.size -= oldest.size;
        }
    }

    /// Reads a string literal, looking at its text only when `look`.
    fn text(&mut self, block: &mut &[u8], look: bool) -> Option<Text> {
        if !look {
            let (_, raw) = string(block, 7)?;
            return Some(Text { len: raw.len(), is_path: false, has_hash: false });
        }
        let bytes = literal(block, 7, &mut self.huffman)?;
        Some(Text { len: bytes.len(), is_path: bytes == b":path", has_hash: bytes.contains(&b'#') })
    }
}

/// A string literal whose length has an N-bit prefix, the Huffman flag the
/// bit above it (RFC 7541 section 5.2; QPACK's literal names put it lower):
/// whether it is Huffman-coded, and its bytes as sent.
fn string<'a>(block: &mut &'a [u8], prefix_bits: u32) -> Option<(bool, &'a [u8])> {
    let huffman = block.first()? & (1 << prefix_bits) != 0;
    let len = integer(block, prefix_bits)?;
    let raw = block.get(..len)?;
    *block = &block[len..];
    Some((huffman, raw))
}

/// A string literal's text, decoded into `scratch` when Huffman-coded.
pub fn literal<'a: 'c, 'b: 'c, 'c>(block: &mut &'a [u8], prefix_bits: u32, scratch: &'b mut Vec<u8>) -> Option<&'c [u8]> {
    let (huffman, raw) = string(block, prefix_bits)?;
    if !huffman {
        return Some(raw);
    }
    scratch.clear();
    decode(raw, scratch, DecoderSpeed::FiveBits).ok()?;
    Some(scratch)
}

/// An integer with an N-bit prefix (RFC 7541 section 5.1); None when it is
/// cut short or does not fit.
pub fn integer(block: &mut &[u8], prefix_bits: u32) -> Option<usize> {
    let mask = (1usize << prefix_bits) - 1;
    let (&first, mut rest) = block.split_first()?;
    let mut value = first as usize & mask;
    if value == mask {
        let mut shift = 0;
        loop {
            let (&byte, tail) = rest.split_first()?;
            rest = tail;
            value = value.checked_add(((byte & 0x7f) as usize).checked_shl(shift).filter(|_| shift < 28)?)?;
            if byte & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
    }
    *block = rest;
    Some(value)
}
