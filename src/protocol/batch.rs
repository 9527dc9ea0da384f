//! Batches: many `TimeStampReq`s in one body, each answered by its own `TimeStampResp`.
//!
//! This project's own format (`docs/batch.md`; RFC 3161 defines none), over RFC 3161's types:
//!
//! ```asn1
//! BatchRequest  ::= SEQUENCE SIZE (1..MAX) OF TimeStampReq
//! BatchResponse ::= SEQUENCE OF TimeStampResp                -- same order, same count
//! ```
//!
//! Only the outer SEQUENCE is this module's business: [`decode`] checks its DER framing and
//! hands out each element as a slice of the input (nothing is copied), which the caller then
//! checks as a request of its own with [`super::parse_request`], so that a bad element gets its
//! own rejection and spoils nothing else. An element must be a well-framed SEQUENCE, so that a
//! lone `TimeStampReq` sent as a batch (whose first element is the version INTEGER) is refused
//! as a whole instead of being answered element by element; what is inside an element is that
//! element's business: one that is not a `TimeStampReq` gets its own `badDataFormat`.
//!
//! [`encode`] writes the outer SEQUENCE around elements that are already DER, in one pass: the
//! length is summed first, then the octets are copied once into a buffer of the exact size.
//! The same two functions serve the client, which encodes requests and decodes responses.
//! `docs/batch.md` describes the HTTP binding.

use super::response::{FailInfo, Rejection};

/// The media type of a `BatchRequest` body.
pub const QUERY_MEDIA_TYPE: &str = "application/timestamp-query-batch";
/// The media type of a `BatchResponse` body.
pub const REPLY_MEDIA_TYPE: &str = "application/timestamp-reply-batch";

/// The universal, constructed SEQUENCE tag.
const SEQUENCE: u8 = 0x30;

/// Why a batch as a whole is refused (its elements are not looked at).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// The outer structure is not one DER SEQUENCE of well-framed SEQUENCEs.
    #[error("the batch is not a DER SEQUENCE OF TimeStampReq: {what} at octet {at}")]
    Malformed { what: &'static str, at: usize },
    /// `SIZE (1..MAX)`: an empty batch is not a batch.
    #[error("the batch holds no request")]
    Empty,
    /// More elements than the TSA takes in one batch.
    #[error("the batch holds more than {max} requests")]
    TooMany { max: usize },
}

impl BatchError {
    /// The single `TimeStampResp` that answers a refused batch.
    pub fn rejection(&self) -> Rejection {
        Rejection::new(FailInfo::BadDataFormat, self.to_string())
    }
}

/// Splits a DER `SEQUENCE OF SEQUENCE` into its elements (each a complete TLV, borrowed from
/// `der`). Refuses anything but exactly one SEQUENCE with a definite, minimally encoded
/// length and no trailing octets, whose content is SEQUENCEs framed alike; refuses zero
/// elements, and more than `max_items` (counted as they are read: a huge batch is refused
/// without being split further).
pub fn decode(der: &[u8], max_items: usize) -> Result<Vec<&[u8]>, BatchError> {
    let outer = read_sequence(der, 0)?;
    if outer.end != der.len() {
        return Err(BatchError::Malformed {
            what: "trailing octets after the SEQUENCE",
            at: outer.end,
        });
    }
    let mut items = Vec::new();
    let mut at = outer.content;
    while at < outer.end {
        let item = read_sequence(&der[..outer.end], at)?;
        if items.len() == max_items {
            return Err(BatchError::TooMany { max: max_items });
        }
        items.push(&der[at..item.end]);
        at = item.end;
    }
    if items.is_empty() {
        return Err(BatchError::Empty);
    }
    Ok(items)
}

/// The DER `SEQUENCE OF` whose elements are `items` (each already DER), in their order.
pub fn encode<T: AsRef<[u8]>>(items: &[T]) -> Vec<u8> {
    let content: usize = items.iter().map(|i| i.as_ref().len()).sum();
    let (header, header_len) = header(content);
    let mut out = Vec::with_capacity(header_len + content);
    out.extend_from_slice(&header[..header_len]);
    for item in items {
        out.extend_from_slice(item.as_ref());
    }
    out
}

/// The identifier and length octets of the reply's `SEQUENCE OF` around `content` octets of
/// answers: what [`encode`] puts before them.
pub fn reply_header(content: usize) -> Vec<u8> {
    let (header, len) = header(content);
    header[..len].to_vec()
}

/// The identifier and length octets of a SEQUENCE with `len` content octets: the definite
/// form with the fewest length octets (X.690 10.1).
fn header(len: usize) -> ([u8; 2 + size_of::<usize>()], usize) {
    let mut out = [0u8; 2 + size_of::<usize>()];
    out[0] = SEQUENCE;
    if len < 0x80 {
        out[1] = len as u8;
        return (out, 2);
    }
    let octets = len.to_be_bytes();
    let skip = octets.iter().take_while(|&&b| b == 0).count();
    let n = octets.len() - skip;
    out[1] = 0x80 | n as u8;
    out[2..2 + n].copy_from_slice(&octets[skip..]);
    (out, 2 + n)
}

/// Where a TLV's content starts and where the TLV ends, as offsets into the input.
struct Tlv {
    content: usize,
    end: usize,
}

/// Reads the SEQUENCE at `start` of `der` under DER's framing rules: a definite length in the
/// fewest octets (at most four length octets: 4 GiB) and content that fits in `der`.
fn read_sequence(der: &[u8], start: usize) -> Result<Tlv, BatchError> {
    let malformed = |what, at| Err(BatchError::Malformed { what, at });
    let mut at = start;
    match der.get(at) {
        None => return malformed("missing identifier octet", at),
        Some(&SEQUENCE) => at += 1,
        Some(_) if start == 0 => return malformed("the outer tag is not SEQUENCE", at),
        Some(_) => return malformed("an element is not a SEQUENCE", at),
    }
    let Some(&first) = der.get(at) else {
        return malformed("missing length octet", at);
    };
    let length_at = at;
    at += 1;
    let len = match first {
        0..=0x7f => usize::from(first),
        0x80 => return malformed("indefinite length (BER, not DER)", length_at),
        0x81..=0x84 => {
            let n = usize::from(first & 0x7f);
            let Some(octets) = der.get(at..at + n) else {
                return malformed("truncated length", at);
            };
            at += n;
            if octets[0] == 0 || (n == 1 && octets[0] < 0x80) {
                return malformed("length not minimally encoded", length_at);
            }
            octets
                .iter()
                .fold(0usize, |l, &b| (l << 8) | usize::from(b))
        }
        _ => return malformed("length too large", length_at),
    };
    match at.checked_add(len) {
        Some(end) if end <= der.len() => Ok(Tlv { content: at, end }),
        _ => malformed("content runs past the end", at),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use der::{Decode, Encode};
    use proptest::prelude::*;

    /// A DER OCTET STRING of `len` octets.
    fn octets(len: usize, fill: u8) -> Vec<u8> {
        der::asn1::OctetString::new(vec![fill; len])
            .unwrap()
            .to_der()
            .unwrap()
    }

    /// A SEQUENCE of `parts` OCTET STRINGs of `len` octets: a well-framed element of any size.
    fn element(len: usize, fill: u8, parts: usize) -> Vec<u8> {
        let inner = octets(len, fill);
        let content = inner.repeat(parts);
        let (h, n) = header(content.len());
        [&h[..n], &content].concat()
    }

    #[test]
    fn splits_without_copying_and_round_trips() {
        let items = [
            element(0, 0, 0),
            element(1, 1, 1),
            element(200, 2, 2),
            element(70_000, 3, 1),
        ];
        let der = encode(&items);
        let got = decode(&der, 10).unwrap();
        assert_eq!(got.len(), 4);
        for (got, want) in got.iter().zip(&items) {
            assert_eq!(*got, want.as_slice());
            // A view into the body, not a copy.
            assert!(der.as_ptr_range().contains(&got.as_ptr()));
        }
        assert_eq!(encode(&got), der);
        // der's own decoder reads the same SEQUENCE OF.
        let any: Vec<der::AnyRef<'_>> = Vec::from_der(&der).unwrap();
        assert_eq!(any.len(), 4);
        assert_eq!(any[3].to_der().unwrap(), items[3]);
    }

    #[test]
    fn headers_use_the_fewest_length_octets() {
        for (len, want) in [
            (0usize, vec![0x30, 0x00]),
            (0x7f, vec![0x30, 0x7f]),
            (0x80, vec![0x30, 0x81, 0x80]),
            (0xff, vec![0x30, 0x81, 0xff]),
            (0x100, vec![0x30, 0x82, 0x01, 0x00]),
            (0x01_0000, vec![0x30, 0x83, 0x01, 0x00, 0x00]),
            (0x0100_0000, vec![0x30, 0x84, 0x01, 0x00, 0x00, 0x00]),
        ] {
            let (h, n) = header(len);
            assert_eq!(&h[..n], want.as_slice(), "length {len}");
            let length = der::Length::try_from(len).unwrap();
            let theirs = der::Header::new(der::Tag::Sequence, length);
            assert_eq!(theirs.to_der().unwrap(), want, "length {len}");
        }
    }

    #[test]
    fn refuses_bad_framing() {
        let item = [0x30, 0x03, 0x04, 0x01, 0x09]; // SEQUENCE { OCTET STRING 09 }
        let good = encode(&[&item]);
        assert_eq!(decode(&good, 1).unwrap(), [item]);
        let malformed = |der: &[u8]| match decode(der, 100) {
            Err(BatchError::Malformed { what, .. }) => what,
            other => panic!("{der:02x?}: {other:?}"),
        };
        assert_eq!(malformed(&[]), "missing identifier octet");
        assert_eq!(malformed(&[0x30]), "missing length octet");
        // A SET, an OCTET STRING, an element that is not a SEQUENCE.
        assert_eq!(malformed(&[0x31, 0x00]), "the outer tag is not SEQUENCE");
        assert_eq!(malformed(&octets(3, 9)), "the outer tag is not SEQUENCE");
        assert_eq!(
            malformed(&encode(&[octets(3, 9)])),
            "an element is not a SEQUENCE"
        );
        assert_eq!(
            malformed(&encode(&[&item[..], &octets(3, 9)])),
            "an element is not a SEQUENCE"
        );
        // A lone TimeStampReq: its first element is the version INTEGER.
        let lone = crate::client::Query {
            digest: crate::alg::DigestAlgorithm::Sha256,
            hashed_message: vec![7; 32],
            policy: None,
            nonce: Some(vec![1, 2, 3]),
            cert_req: true,
        }
        .to_der()
        .unwrap();
        assert_eq!(malformed(&lone), "an element is not a SEQUENCE");
        assert_eq!(decode(&encode(&[&lone]), 1).unwrap(), [lone.as_slice()]);

        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(malformed(&trailing), "trailing octets after the SEQUENCE");
        assert_eq!(
            malformed(&[0x30, 0x80, 0x30, 0x00, 0x00, 0x00]),
            "indefinite length (BER, not DER)"
        );
        assert_eq!(
            malformed(&[0x30, 0x81, 0x05, 0x30, 0x03, 4, 1, 9]),
            "length not minimally encoded"
        );
        assert_eq!(
            malformed(&[0x30, 0x82, 0x00, 0x05, 0x30, 0x03, 4, 1, 9]),
            "length not minimally encoded"
        );
        assert_eq!(
            malformed(&[0x30, 0x04, 0x30, 0x81, 0x01, 0x00]),
            "length not minimally encoded"
        );
        assert_eq!(malformed(&[0x30, 0x85, 1, 0, 0, 0, 0]), "length too large");
        assert_eq!(malformed(&[0x30, 0xff]), "length too large");
        assert_eq!(malformed(&[0x30, 0x82, 0x01]), "truncated length");
        assert_eq!(
            malformed(&[0x30, 0x06, 0x30, 0x03]),
            "content runs past the end"
        );
        assert_eq!(
            malformed(&[0x30, 0x03, 0x30, 0x03, 4]),
            "content runs past the end"
        );
        // An element that runs past the SEQUENCE (though not past the input).
        assert_eq!(
            malformed(&[0x30, 0x03, 0x30, 0x03, 4, 1, 9]),
            "trailing octets after the SEQUENCE"
        );
        assert_eq!(malformed(&[0x30, 0x01, 0x30]), "missing length octet");
        // An empty SEQUENCE is an element (its request check refuses it).
        assert_eq!(
            decode(&[0x30, 0x02, 0x30, 0x00], 1).unwrap(),
            [[0x30, 0x00]]
        );

        assert_eq!(decode(&[0x30, 0x00], 100), Err(BatchError::Empty));
        let three = encode(&[&item, &item, &item]);
        assert_eq!(decode(&three, 2), Err(BatchError::TooMany { max: 2 }));
        assert_eq!(decode(&three, 3).unwrap().len(), 3);
    }

    #[test]
    fn a_refused_batch_is_one_bad_data_format_rejection() {
        let rejection = BatchError::TooMany { max: 5 }.rejection();
        assert_eq!(rejection.fail_info, FailInfo::BadDataFormat);
        assert_eq!(rejection.reason, "the batch holds more than 5 requests");
        let der = rejection.to_der();
        let resp = super::super::asn1::TimeStampResp::from_der(&der).unwrap();
        assert_eq!(resp.status.status, 2);
    }

    fn any_element() -> impl Strategy<Value = Vec<u8>> {
        (0usize..300, any::<u8>(), 0usize..3)
            .prop_map(|(len, fill, parts)| element(len, fill, parts))
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(mut bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes, 50);
            // With a SEQUENCE header around them and a SEQUENCE tag first, the bytes reach
            // the elements' framing.
            if let Some(first) = bytes.first_mut() {
                *first = SEQUENCE;
            }
            let wrapped = encode(&[bytes.as_slice()]);
            if let Ok(items) = decode(&wrapped, 1_000) {
                let total: usize = items.iter().map(|i| i.len()).sum();
                prop_assert_eq!(total, bytes.len());
                prop_assert_eq!(encode(&items), wrapped.clone());
            }
        }

        #[test]
        fn encode_then_decode_gives_the_elements(items in prop::collection::vec(any_element(), 1..40)) {
            let der = encode(&items);
            let got = decode(&der, items.len()).unwrap();
            prop_assert_eq!(got.len(), items.len());
            for (got, want) in got.iter().zip(&items) {
                prop_assert_eq!(*got, want.as_slice());
            }
            prop_assert_eq!(encode(&got), der.clone());
            if items.len() > 1 {
                prop_assert_eq!(
                    decode(&der, items.len() - 1),
                    Err(BatchError::TooMany { max: items.len() - 1 })
                );
            }
            // Cut anywhere, it is refused (and never panics).
            for cut in [1, der.len() / 2, der.len() - 1] {
                prop_assert!(decode(&der[..cut], 100).is_err());
            }
        }

        /// Whatever `der` reads as a non-empty SEQUENCE OF SEQUENCE, this reads alike.
        #[test]
        fn agrees_with_the_der_crate(mut bytes in prop::collection::vec(any::<u8>(), 0..120)) {
            if let Some(first) = bytes.first_mut() {
                *first = SEQUENCE;
            }
            let wrapped = encode(&[bytes.as_slice()]);
            for input in [&bytes, &wrapped] {
                if let Ok(any) = Vec::<der::AnyRef<'_>>::from_der(input) {
                    if any.is_empty() || any.iter().any(|a| der::Tagged::tag(a) != der::Tag::Sequence) {
                        continue;
                    }
                    let ours = decode(input, 1_000).unwrap();
                    prop_assert_eq!(ours.len(), any.len());
                    for (ours, theirs) in ours.iter().zip(&any) {
                        prop_assert_eq!(ours.to_vec(), theirs.to_der().unwrap());
                    }
                }
            }
        }
    }
}
