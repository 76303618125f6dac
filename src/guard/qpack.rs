//! Just enough QPACK (RFC 9204) to see a `#` in a request's `:path`. h3
//! offers no dynamic table (it decodes each field section on its own), so a
//! request's fields are all static references and literals, and a section
//! that needs the table is one h3 refuses anyway.

use super::hpack::{integer, literal};

/// RFC 9204 Appendix A: the one static entry named `:path` (its value, `/`,
/// has no `#`).
const STATIC_PATH: usize = 1;

/// Whether the `:path` of one whole field section holds a `#`. None when
/// the section is not one h3 would read (it refuses those itself).
pub fn fragment_in_path(mut section: &[u8], scratch: &mut Vec<u8>) -> Option<bool> {
    let required_insert_count = integer(&mut section, 8)?;
    integer(&mut section, 7)?; // the base, which only dynamic references use
    if required_insert_count != 0 {
        return None;
    }
    let mut found = false;
    while let Some(&first) = section.first() {
        let is_path = if first & 0x80 != 0 {
            // Indexed field line: a static entry (a dynamic one would need
            // the table), whose value has no `#`.
            if first & 0x40 == 0 {
                return None;
            }
            integer(&mut section, 6)?;
            continue;
        } else if first & 0x40 != 0 {
            // Literal with a name reference.
            let is_static = first & 0x10 != 0;
            let index = integer(&mut section, 4)?;
            if !is_static {
                return None;
            }
            index == STATIC_PATH
        } else if first & 0x20 != 0 {
            // Literal with a literal name.
            literal(&mut section, 3, scratch)? == b":path"
        } else {
            // Post-base forms: dynamic references.
            return None;
        };
        found |= literal(&mut section, 7, scratch)?.contains(&b'#') && is_path;
    }
    Some(found)
}

/// A field line that makes the section's request malformed for h3: a second
/// `:path` whose value, a space, is no valid path.
pub const SPOILER: [u8; 3] = [0x50 | STATIC_PATH as u8, 0x01, b' '];
