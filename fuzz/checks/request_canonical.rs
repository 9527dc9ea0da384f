//! Strictness of the DER reader: what `TimeStampReq::from_der` accepts re-encodes to the very
//! same octets, except for the one BER form the parser tolerates on purpose (certReq written
//! as an explicit FALSE, which DER omits).

use der::asn1::AnyRef;
use der::{Decode, Encode, Reader, SliceReader, Tag};
use tsa::protocol::asn1::TimeStampReq;

/// One input; panics when a property fails.
pub fn check(data: &[u8]) {
    let Ok(request) = TimeStampReq::from_der(data) else {
        return;
    };
    let encoded = request.to_der().expect("a decoded TimeStampReq encodes");
    if encoded == data {
        return;
    }
    // The tolerated form: the DER encoding with `01 01 00` (BOOLEAN FALSE) where certReq
    // goes, before the extensions ([0]) if any, and the outer length made for it (one octet
    // longer where it passes 127).
    let with_false = explicit_false(&encoded);
    assert!(
        !request.cert_req && with_false.as_deref() == Some(data),
        "accepted a non-DER encoding: {data:02x?} re-encodes as {encoded:02x?}"
    );
}

/// `encoded` (a DER TimeStampReq) with certReq written as an explicit FALSE.
fn explicit_false(encoded: &[u8]) -> Option<Vec<u8>> {
    let content = AnyRef::from_der(encoded).ok()?.value();
    let mut reader = SliceReader::new(content).ok()?;
    let mut fields = Vec::new();
    let mut at = 0usize;
    while !reader.is_finished() {
        let field = AnyRef::decode(&mut reader).ok()?;
        let end = usize::try_from(u32::from(reader.position())).ok()?;
        fields.push((der::Tagged::tag(&field), &content[at..end]));
        at = end;
    }
    let mut with = Vec::with_capacity(content.len() + 3);
    let mut inserted = false;
    for (tag, octets) in fields {
        if !inserted && tag.is_context_specific() {
            with.extend_from_slice(&[0x01, 0x01, 0x00]);
            inserted = true;
        }
        with.extend_from_slice(octets);
    }
    if !inserted {
        with.extend_from_slice(&[0x01, 0x01, 0x00]);
    }
    AnyRef::new(Tag::Sequence, &with).ok()?.to_der().ok()
}
