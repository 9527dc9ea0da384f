//! Writing a TLV around content that is already DER, for the parts of a token the template
//! precomputed. Lengths are written by `der` itself.

use der::{Encode, Header, Length, Tag};

/// Appends `tag` and the DER length `len`.
pub(super) fn header(out: &mut Vec<u8>, tag: Tag, len: usize) {
    let length = Length::try_from(len).expect("token parts are far below 4 GiB");
    Header::new(tag, length)
        .encode(out)
        .expect("writing to a Vec cannot fail");
}

/// Appends `tag`, the DER length of all `parts` together, and the parts.
pub(super) fn write(out: &mut Vec<u8>, tag: Tag, parts: &[&[u8]]) {
    header(out, tag, parts.iter().map(|p| p.len()).sum());
    for part in parts {
        out.extend_from_slice(part);
    }
}

/// The encoded size of a TLV whose content is `len` octets.
pub(super) fn size(len: usize) -> usize {
    let header = match len {
        0..=0x7f => 2,
        0x80..=0xff => 3,
        0x100..=0xffff => 4,
        0x1_0000..=0xff_ffff => 5,
        _ => 6,
    };
    header + len
}

pub(super) fn tlv(tag: Tag, parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(size(parts.iter().map(|p| p.len()).sum()));
    write(&mut out, tag, parts);
    out
}

pub(super) fn context(number: u32, constructed: bool) -> Tag {
    Tag::ContextSpecific {
        constructed,
        number: der::TagNumber(number),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_is_the_written_length_at_every_length_form() {
        for len in [
            0, 0x7f, 0x80, 0xff, 0x100, 0xffff, 0x1_0000, 0xff_ffff, 0x100_0000,
        ] {
            let content = vec![0u8; len];
            assert_eq!(
                tlv(Tag::OctetString, &[&content]).len(),
                size(len),
                "content of {len} octets"
            );
        }
    }
}
