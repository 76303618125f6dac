//! Just enough HPACK (RFC 7541) to judge a request's header block as h2
//! will decode it. h2 cuts a `:path` at `#` and lets the rest through; and a
//! field it cannot convert (a name with an uppercase letter or a byte no
//! name may hold, an unknown pseudo-header, a value with a control byte such
//! as CR, LF or NUL) ends the whole connection, where RFC 9113 sections
//! 8.2.1 and 8.3 make only that request malformed: a stream error. Such a
//! field is rewritten into one h2 takes, `x` repeated to the same decoded
//! lengths, so that both dynamic tables keep the same sizes; the block is
//! then refused.
//!
//! The dynamic table is kept in step with h2's by size alone: each entry
//! keeps its name's length and kind, and why a request that refers to it is
//! refused, not its text. Huffman strings are decoded (httlib-huffman) into
//! one reused buffer. A full decoder (loona-hpack) cost a HashMap per
//! Huffman string; h2's own is private.

use std::collections::VecDeque;

use httlib_huffman::{decode, DecoderSpeed};

/// RFC 7541 Appendix A: the static table's names, from index 1 (their
/// kinds are in `Table::entry`). Its values are all ones h2 takes, none
/// holding a `#`.
const STATIC_NAMES: [&str; 61] = [
    ":authority",
    ":method",
    ":method",
    ":path",
    ":path",
    ":scheme",
    ":scheme",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "accept",
    "access-control-allow-origin",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "content-disposition",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-range",
    "content-type",
    "cookie",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "link",
    "location",
    "max-forwards",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "refresh",
    "retry-after",
    "server",
    "set-cookie",
    "strict-transport-security",
    "transfer-encoding",
    "user-agent",
    "vary",
    "via",
    "www-authenticate",
];
/// What RFC 7541 section 4.1 adds to each entry's size.
const ENTRY_OVERHEAD: usize = 32;
/// The longest name the `http` crate takes.
const MAX_NAME: usize = (1 << 16) - 1;
/// The bytes a name may hold as h2 reads it (the `http` crate's table for
/// HTTP/2: a token's characters, lowercase, and `"`).
const NAME_BYTES: [bool; 256] = byte_set(b"!\"#$%&'*+-.0123456789^_`abcdefghijklmnopqrstuvwxyz|~");
/// The bytes of a method: a token (RFC 9110 section 5.6.2).
const METHOD_BYTES: [bool; 256] =
    byte_set(b"!#$%&'*+-.0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ^_`abcdefghijklmnopqrstuvwxyz|~");

const fn byte_set(bytes: &[u8]) -> [bool; 256] {
    let mut set = [false; 256];
    let mut i = 0;
    while i < bytes.len() {
        set[bytes[i] as usize] = true;
        i += 1;
    }
    set
}

/// A name as h2 converts the value that goes with it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Name {
    Field,
    Path,
    /// `:authority`, `:scheme` and `:protocol`: any UTF-8.
    Text,
    Method,
    Status,
}

#[derive(Clone, Copy)]
struct Entry {
    size: usize,
    name_len: usize,
    name: Name,
    /// Why a request that refers to the whole entry is refused.
    refused: Option<&'static str>,
    /// The entry was rewritten: h2's copy has another name, so a request
    /// that takes only its name is refused too.
    rewritten: bool,
}

/// What h2 would make of a header block.
#[derive(Debug, PartialEq, Eq)]
pub enum Judged {
    /// It takes the request as it is.
    Pass,
    /// The request is to be refused, for this reason; with the block to hand
    /// h2 instead, when h2 would end the connection over the original.
    Refuse(&'static str, Option<Vec<u8>>),
}

pub struct Table {
    /// Newest first, as HPACK indexes them.
    entries: VecDeque<Entry>,
    size: usize,
    max_size: usize,
    /// The largest size an encoder may ask for: the decoder's
    /// SETTINGS_HEADER_TABLE_SIZE.
    max_allowed: usize,
    huffman: Vec<u8>,
}

/// A block being read, and its rewritten copy once a field needs one.
struct Rewrite<'a> {
    block: &'a [u8],
    /// The rewritten block up to `copied` of the original.
    out: Option<Vec<u8>>,
    copied: usize,
}

impl Rewrite<'_> {
    /// Replaces the original's bytes `start..end` with a literal field of
    /// `x`s, of the same representation (`first`'s top four bits) and
    /// decoded lengths. None when no such field is one h2 takes.
    fn field(&mut self, start: usize, end: usize, first: u8, name_len: usize, value_len: usize) -> Option<()> {
        let indexing = first & 0x40 != 0;
        // A field that is not indexed may change size: only the table's sizes must agree.
        let name_len = if indexing { name_len } else { name_len.clamp(1, MAX_NAME) };
        if !(1..=MAX_NAME).contains(&name_len) {
            return None;
        }
        let out = self.out.get_or_insert_with(|| Vec::with_capacity(self.block.len() + 16));
        out.extend_from_slice(&self.block[self.copied..start]);
        out.push(if indexing { 0x40 } else { first & 0xf0 });
        for len in [name_len, value_len] {
            put_integer(out, 0, 7, len);
            out.resize(out.len() + len, b'x');
        }
        self.copied = end;
        Some(())
    }

    fn finish(self) -> Option<Vec<u8>> {
        let mut out = self.out?;
        out.extend_from_slice(&self.block[self.copied..]);
        Some(out)
    }
}

impl Table {
    pub fn new(max_allowed: usize) -> Self {
        Table { entries: VecDeque::new(), size: 0, max_size: max_allowed, max_allowed, huffman: Vec::new() }
    }

    /// Reads one whole header block as h2 will. None when it is not valid
    /// HPACK, or holds a field no rewrite keeps in step (h2 ends the
    /// connection for those).
    pub fn judge(&mut self, whole: &[u8]) -> Option<Judged> {
        let mut block = whole;
        let mut rewrite = Rewrite { block: whole, out: None, copied: 0 };
        let mut refused = None;
        let mut may_resize = true;
        while let Some(&first) = block.first() {
            let start = whole.len() - block.len();
            if first & 0x80 != 0 {
                let entry = self.entry(integer(&mut block, 7)?)?;
                refused = refused.or(entry.refused);
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
            let (name_len, name, mut field_refused) = match index {
                0 => {
                    let name = literal(&mut block, 7, &mut self.huffman)?;
                    (name.len(), name_kind(name), None)
                }
                _ => {
                    let entry = self.entry(index)?;
                    (entry.name_len, Ok(entry.name), entry.refused.filter(|_| entry.rewritten))
                }
            };
            let value = literal(&mut block, 7, &mut self.huffman)?;
            let value_len = value.len();
            let fault = name.and_then(|name| value_fault(name, value).map_or(Ok(name), Err));
            let name = match fault {
                Ok(name) => {
                    if name == Name::Path && value.contains(&b'#') {
                        field_refused = field_refused.or(Some("a fragment in :path"));
                    }
                    name
                }
                Err(reason) => {
                    rewrite.field(start, whole.len() - block.len(), first, name_len, value_len)?;
                    field_refused = Some(reason);
                    Name::Field
                }
            };
            refused = refused.or(field_refused);
            if indexing {
                let size = name_len + value_len + ENTRY_OVERHEAD;
                self.insert(Entry { size, name_len, name, refused: field_refused, rewritten: fault.is_err() });
            }
        }
        Some(match refused {
            None => Judged::Pass,
            Some(reason) => Judged::Refuse(reason, rewrite.finish()),
        })
    }

    fn entry(&self, index: usize) -> Option<Entry> {
        match index {
            0 => None,
            1..=61 => {
                let name = match index {
                    1 | 6 | 7 => Name::Text,
                    2 | 3 => Name::Method,
                    4 | 5 => Name::Path,
                    8..=14 => Name::Status,
                    _ => Name::Field,
                };
                let name_len = STATIC_NAMES[index - 1].len();
                Some(Entry { size: 0, name_len, name, refused: None, rewritten: false })
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
}

/// How h2 reads a literal name; why it ends the connection over one.
fn name_kind(name: &[u8]) -> Result<Name, &'static str> {
    match name {
        b":path" => Ok(Name::Path),
        b":authority" | b":scheme" | b":protocol" => Ok(Name::Text),
        b":method" => Ok(Name::Method),
        b":status" => Ok(Name::Status),
        [b':', ..] => Err("an unknown pseudo-header field"),
        [] => Err("an empty field name"),
        _ if name.len() <= MAX_NAME && name.iter().all(|&b| NAME_BYTES[b as usize]) => Ok(Name::Field),
        _ if name.iter().any(u8::is_ascii_uppercase) => Err("an uppercase letter in a field name"),
        _ => Err("a byte a field name may not hold"),
    }
}

/// Why h2 ends the connection over this value for this name, if it does.
fn value_fault(name: Name, value: &[u8]) -> Option<&'static str> {
    let fine = match name {
        // RFC 9113 section 8.2.1 names NUL, CR and LF; the `http` crate refuses every control byte but tab.
        Name::Field => value.iter().all(|&b| (b >= 0x20 && b != 0x7f) || b == b'\t'),
        Name::Path | Name::Text => std::str::from_utf8(value).is_ok(),
        Name::Method => !value.is_empty() && value.iter().all(|&b| METHOD_BYTES[b as usize]),
        Name::Status => matches!(value, [b'1'..=b'9', b'0'..=b'9', b'0'..=b'9']),
    };
    match (fine, name) {
        (true, _) => None,
        (false, Name::Field) => Some("a control byte in a field value"),
        (false, Name::Path | Name::Text) => Some("a pseudo-header field that is not UTF-8"),
        (false, Name::Method) => Some("a :method that is not a token"),
        (false, Name::Status) => Some("a :status that is not three digits"),
    }
}

/// Writes an integer with an N-bit prefix (RFC 7541 section 5.1) after the
/// bits `first` sets above it.
fn put_integer(out: &mut Vec<u8>, first: u8, prefix_bits: u32, mut value: usize) {
    let mask = (1usize << prefix_bits) - 1;
    if value < mask {
        out.push(first | value as u8);
        return;
    }
    out.push(first | mask as u8);
    value -= mask;
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
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
pub fn literal<'a: 'c, 'b: 'c, 'c>(
    block: &mut &'a [u8],
    prefix_bits: u32,
    scratch: &'b mut Vec<u8>,
) -> Option<&'c [u8]> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A string literal, Huffman-coded when `huffman`.
    fn string(text: &[u8], huffman: bool) -> Vec<u8> {
        let mut out = Vec::new();
        if huffman {
            let mut coded = Vec::new();
            httlib_huffman::encode(text, &mut coded).unwrap();
            put_integer(&mut out, 0x80, 7, coded.len());
            out.extend_from_slice(&coded);
        } else {
            put_integer(&mut out, 0, 7, text.len());
            out.extend_from_slice(text);
        }
        out
    }

    /// A literal field with a literal name: `first` is 0x40 (indexed), 0x00
    /// (not indexed) or 0x10 (never indexed).
    fn field(first: u8, name: &[u8], value: &[u8], huffman: bool) -> Vec<u8> {
        [vec![first], string(name, huffman), string(value, huffman)].concat()
    }

    /// `:method: GET`, `:scheme: http`, `:path: /`, `:authority: x` (not indexed).
    const REQUEST: &[u8] = b"\x82\x86\x84\x01\x01x";

    fn judged(table: &mut Table, fields: &[u8]) -> Judged {
        table.judge(&[REQUEST, fields].concat()).expect("valid HPACK")
    }

    #[test]
    fn a_plain_request_passes() {
        let mut table = Table::new(4096);
        assert_eq!(judged(&mut table, &field(0x40, b"x-fine", b"a\tb\x80", true)), Judged::Pass);
        assert_eq!(judged(&mut table, b"\xbe"), Judged::Pass);
    }

    #[test]
    fn a_fragment_refuses_without_a_rewrite() {
        let mut table = Table::new(4096);
        let block = [b"\x82\x86\x01\x01x".as_slice(), &[0x44], &string(b"/a#b", true)].concat();
        assert_eq!(table.judge(&block), Some(Judged::Refuse("a fragment in :path", None)));
        // indexed: a reference to the whole entry is refused, one to its name is not
        assert_eq!(table.judge(b"\x82\x86\x01\x01x\xbe"), Some(Judged::Refuse("a fragment in :path", None)));
        assert_eq!(table.judge(b"\x82\x86\x01\x01x\x0f\x2f\x02/b"), Some(Judged::Pass));
    }

    #[test]
    fn fields_h2_cannot_convert_are_rewritten_to_the_same_lengths() {
        let cases: [(&[u8], &[u8], &str); 8] = [
            (b"X-Upper", b"v", "an uppercase letter in a field name"),
            (b"x-bad", b"a\r\nb", "a control byte in a field value"),
            (b"x-bad", b"a\x00", "a control byte in a field value"),
            (b"x-bad", b"\x7f", "a control byte in a field value"),
            (b":foo", b"bar", "an unknown pseudo-header field"),
            (b"a b", b"c", "a byte a field name may not hold"),
            (b":path", b"/\xff", "a pseudo-header field that is not UTF-8"),
            (b":method", b"G T", "a :method that is not a token"),
        ];
        for (name, value, reason) in cases {
            for first in [0x40, 0x00, 0x10] {
                for huffman in [false, true] {
                    let mut table = Table::new(4096);
                    let rewritten = [
                        REQUEST,
                        &field(
                            first,
                            &"x".repeat(name.len()).into_bytes(),
                            &"x".repeat(value.len()).into_bytes(),
                            false,
                        ),
                    ]
                    .concat();
                    let fields = field(first, name, value, huffman);
                    assert_eq!(
                        judged(&mut table, &fields),
                        Judged::Refuse(reason, Some(rewritten)),
                        "{name:?} {value:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_value_h2_cannot_convert_after_an_indexed_name_is_rewritten() {
        let mut table = Table::new(4096);
        // literal with indexing, name `user-agent` (static 58)
        let fields = [vec![0x40 | 58], string(b"a\nb", true)].concat();
        let rewritten = [REQUEST, &field(0x40, b"xxxxxxxxxx", b"xxx", false)].concat();
        assert_eq!(judged(&mut table, &fields), Judged::Refuse("a control byte in a field value", Some(rewritten)));
        assert_eq!(table.size, 10 + 3 + ENTRY_OVERHEAD);
    }

    #[test]
    fn references_to_a_rewritten_entry_are_refused() {
        let mut table = Table::new(4096);
        let reason = "an uppercase letter in a field name";
        assert!(
            matches!(judged(&mut table, &field(0x40, b"X-Bad", b"v", true)), Judged::Refuse(r, Some(_)) if r == reason)
        );
        let good = field(0x40, b"x-good", b"v", false);
        assert_eq!(judged(&mut table, &good), Judged::Pass);
        // the whole entry (now 63), then only its name with a new value
        assert_eq!(judged(&mut table, b"\xbf"), Judged::Refuse(reason, None));
        assert_eq!(
            judged(&mut table, &[vec![0x0f, 63 - 15], string(b"w", false)].concat()),
            Judged::Refuse(reason, None)
        );
        assert_eq!(judged(&mut table, b"\xbe"), Judged::Pass);
        // a new value h2 cannot take after the rewritten name: rewritten as well
        let fields = [vec![0x0f, 63 - 15], string(b"\r", false)].concat();
        assert_eq!(
            judged(&mut table, &fields),
            Judged::Refuse(
                "a control byte in a field value",
                Some([REQUEST, &field(0, b"xxxxx", b"x", false)].concat())
            )
        );
    }

    #[test]
    fn the_table_keeps_its_sizes_through_rewrites_and_evictions() {
        let mut table = Table::new(4096);
        let big = vec![b'v'; 3000];
        judged(&mut table, &field(0x40, b"x-first", &big, false));
        judged(&mut table, &field(0x40, b"X-Second", &big, true));
        // the second evicted the first
        assert_eq!((table.entries.len(), table.size), (1, 8 + 3000 + ENTRY_OVERHEAD));
        assert!(matches!(judged(&mut table, b"\xbe"), Judged::Refuse(..)));
        assert_eq!(table.judge(&[REQUEST, b"\xbf"].concat()), None);
    }

    #[test]
    fn a_field_no_rewrite_keeps_in_step_is_left_to_h2() {
        let mut table = Table::new(4096);
        // an empty name, indexed: no valid name has its length
        assert_eq!(table.judge(&[REQUEST, &field(0x40, b"", b"v", false)].concat()), None);
        // not indexed, its length does not matter
        let rewritten = [REQUEST, &field(0, b"x", b"x", false)].concat();
        assert_eq!(
            judged(&mut table, &field(0, b"", b"v", false)),
            Judged::Refuse("an empty field name", Some(rewritten))
        );
    }

    #[test]
    fn integers_round_trip() {
        for value in [0, 1, 30, 31, 126, 127, 128, 255, 16_384, 1 << 20] {
            for prefix_bits in [4, 5, 6, 7] {
                let mut out = Vec::new();
                put_integer(&mut out, 0, prefix_bits, value);
                let mut read = &out[..];
                assert_eq!(integer(&mut read, prefix_bits), Some(value));
                assert!(read.is_empty());
            }
        }
    }
}
