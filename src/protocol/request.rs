//! Strict parsing and checking of a `TimeStampReq`.

use const_oid::ObjectIdentifier;
use der::asn1::{IntRef, OctetStringRef};
use der::{
    AnyRef, Decode, DecodeValue, EncodeValue, FixedTag, Header, Length, Reader, Sequence, Tag,
    Writer,
};

use super::asn1::{MessageImprint, TimeStampReq};
use super::response::{FailInfo, Rejection};
use crate::alg::DigestAlgorithm;

/// What the TSA accepts: the operator's choices, fixed at start-up.
#[derive(Clone, Debug)]
pub struct RequestRules {
    /// Imprint algorithms that are accepted; anything else gets `badAlg`.
    pub accepted_digests: Vec<DigestAlgorithm>,
    /// The policy of tokens whose request names none.
    pub default_policy: ObjectIdentifier,
    /// Policies a request may name besides the default; anything else gets `unacceptedPolicy`.
    pub other_policies: Vec<ObjectIdentifier>,
    /// The longest request taken, in octets; a longer one gets `badDataFormat`. The HTTP
    /// layer refuses a longer single body with 413 before reading it; this bounds each
    /// element of a batch, whose body is allowed to be much larger, the same way.
    pub max_len: usize,
}

impl RequestRules {
    pub fn accepts_policy(&self, policy: &ObjectIdentifier) -> bool {
        *policy == self.default_policy || self.other_policies.contains(policy)
    }
}

/// A request that passed every check; it borrows the request body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub message_imprint: MessageImprint<'a>,
    pub digest: DigestAlgorithm,
    /// The policy the token will carry: the requested one, or the default.
    pub policy: ObjectIdentifier,
    /// Echoed byte for byte.
    pub nonce: Option<IntRef<'a>>,
    pub cert_req: bool,
}

/// The answer to a request that `TimeStampReq` refused for an OBJECT IDENTIFIER that DER
/// allows but `const-oid` cannot hold: an arc over 2^32 − 1 (a UUID arc under 2.25 is 128
/// bits), a second arc over 47 under 2 (2.999, the example arc), or more than 39 octets. No
/// configuration can name such an OID, so it is one this TSA does not know: the request, read
/// as a `LenientRequest` (a `TimeStampReq` with its OIDs undecoded), goes through the same
/// checks in the same order as any other (`check`), which give it the failInfo of an unknown
/// OID (`badAlg`, `unacceptedPolicy`, `unacceptedExtension`) or whatever an earlier check
/// finds first. `None`, and the refusal as not DER stands, unless the request is a
/// `LenientRequest` whose OIDs are each one `const-oid` reads or a well-formed one past it.
/// Read on the error path only (and by `tsa inspect`).
pub fn unknown_oid(der: &[u8], rules: &RequestRules) -> Option<Rejection> {
    let request = LenientRequest::from_der(der).ok()?;
    // An arc padded with 0x80 is not DER even where `const-oid` reads it.
    let oid = |raw: RawOid<'_>| match ObjectIdentifier::from_bytes(raw.0) {
        _ if !well_formed_oid(raw.0) => None,
        Ok(oid) => Some(Oid::Read(oid)),
        Err(_) => Some(Oid::Past(dotted(raw.0))),
    };
    let imprint = &request.message_imprint;
    let extensions = match &request.extensions {
        None => None,
        Some(all) => {
            // Each extension's id must be an OID, though only the first is named.
            let ids = all
                .iter()
                .map(|e| oid(e.extn_id))
                .collect::<Option<Vec<_>>>()?;
            Some(ids.into_iter().next())
        }
    };
    let fields = Fields {
        version: request.version.as_bytes(),
        algorithm: oid(imprint.hash_algorithm.oid)?,
        parameters: imprint.hash_algorithm.parameters,
        hashed_message: imprint.hashed_message.as_bytes(),
        policy: match request.req_policy {
            None => None,
            Some(policy) => Some(oid(policy)?),
        },
        extensions,
    };
    check(&fields, rules).err()
}

/// A request's OBJECT IDENTIFIER as its checks see it.
enum Oid {
    /// One `const-oid` reads, as every OID a configuration names is.
    Read(ObjectIdentifier),
    /// A well-formed one past `const-oid`'s limits, dotted: none this TSA knows.
    Past(String),
}

impl std::fmt::Display for Oid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Read(oid) => write!(f, "{oid}"),
            Self::Past(dotted) => f.write_str(dotted),
        }
    }
}

/// What the checks of a request read, from `TimeStampReq` or from [`LenientRequest`].
struct Fields<'a> {
    version: &'a [u8],
    algorithm: Oid,
    parameters: Option<AnyRef<'a>>,
    hashed_message: &'a [u8],
    policy: Option<Oid>,
    /// With extensions, the first one's id (`None`: an empty list).
    extensions: Option<Option<Oid>>,
}

impl<'a> Fields<'a> {
    fn of(req: &TimeStampReq<'a>) -> Self {
        let imprint = &req.message_imprint;
        Self {
            version: req.version.as_bytes(),
            algorithm: Oid::Read(imprint.hash_algorithm.oid),
            parameters: imprint.hash_algorithm.parameters,
            hashed_message: imprint.hashed_message.as_bytes(),
            policy: req.req_policy.map(Oid::Read),
            extensions: req
                .extensions
                .as_ref()
                .map(|all| all.first().map(|e| Oid::Read(e.extn_id))),
        }
    }
}

/// The checks of a request against `rules`, in order: its imprint's algorithm and the
/// policy its token will carry when it passes them all.
fn check(
    fields: &Fields<'_>,
    rules: &RequestRules,
) -> Result<(DigestAlgorithm, ObjectIdentifier), Rejection> {
    if fields.version != [1] {
        return Err(Rejection::new(
            FailInfo::BadRequest,
            "unsupported request version (only v1 exists)",
        ));
    }

    let unknown = |oid: &dyn std::fmt::Display| {
        Rejection::new(
            FailInfo::BadAlg,
            format!("unknown message imprint algorithm {oid}"),
        )
    };
    let digest = match &fields.algorithm {
        Oid::Read(oid) => DigestAlgorithm::from_oid(oid).ok_or_else(|| unknown(oid))?,
        past => return Err(unknown(past)),
    };
    if !rules.accepted_digests.contains(&digest) {
        return Err(Rejection::new(
            FailInfo::BadAlg,
            format!(
                "message imprint algorithm {} is not accepted by this TSA",
                digest.name()
            ),
        ));
    }
    if fields.parameters.is_some_and(|p| !p.is_null()) {
        return Err(Rejection::new(
            FailInfo::BadAlg,
            "message imprint algorithm parameters must be absent or NULL",
        ));
    }
    let len = fields.hashed_message.len();
    if len != digest.output_len() {
        return Err(Rejection::new(
            FailInfo::BadDataFormat,
            format!(
                "a {} message imprint is {} octets, not {len}",
                digest.name(),
                digest.output_len()
            ),
        ));
    }

    let policy = match &fields.policy {
        None => rules.default_policy,
        Some(Oid::Read(policy)) if rules.accepts_policy(policy) => *policy,
        Some(policy) => {
            return Err(Rejection::new(
                FailInfo::UnacceptedPolicy,
                format!("policy {policy} is not offered by this TSA"),
            ))
        }
    };

    match &fields.extensions {
        None => {}
        // `Extensions ::= SEQUENCE SIZE (1..MAX) OF Extension`: an empty list is malformed.
        Some(None) => {
            return Err(Rejection::new(
                FailInfo::BadDataFormat,
                "the request's extensions are an empty list (at least one is required)",
            ))
        }
        Some(Some(first)) => {
            return Err(Rejection::new(
                FailInfo::UnacceptedExtension,
                format!("request extensions are not supported ({first})"),
            ))
        }
    }
    Ok((digest, policy))
}

/// An OBJECT IDENTIFIER's content octets, undecoded.
#[derive(Clone, Copy, Debug, Eq, PartialEq, PartialOrd, Ord)]
struct RawOid<'a>(&'a [u8]);

impl FixedTag for RawOid<'_> {
    const TAG: Tag = Tag::ObjectIdentifier;
}

impl<'a> DecodeValue<'a> for RawOid<'a> {
    type Error = der::Error;

    fn decode_value<R: Reader<'a>>(reader: &mut R, header: Header) -> der::Result<Self> {
        Ok(Self(reader.read_slice(header.length())?))
    }
}

impl EncodeValue for RawOid<'_> {
    fn value_len(&self) -> der::Result<Length> {
        Length::try_from(self.0.len())
    }

    fn encode_value(&self, writer: &mut impl Writer) -> der::Result<()> {
        writer.write(self.0)
    }
}

/// `asn1::TimeStampReq` with its OIDs undecoded ([`unknown_oid`]): the same fields, tags and
/// order, so that only a request whose one fault is an OID past `const-oid` decodes as this
/// and not as that.
#[derive(Sequence)]
struct LenientRequest<'a> {
    version: IntRef<'a>,
    message_imprint: LenientImprint<'a>,
    #[asn1(optional = "true")]
    req_policy: Option<RawOid<'a>>,
    #[asn1(optional = "true")]
    nonce: Option<IntRef<'a>>,
    #[asn1(default = "Default::default")]
    cert_req: bool,
    #[asn1(context_specific = "0", tag_mode = "IMPLICIT", optional = "true")]
    extensions: Option<Vec<LenientExtension<'a>>>,
}

#[derive(Sequence)]
struct LenientImprint<'a> {
    hash_algorithm: LenientAlgorithm<'a>,
    hashed_message: &'a OctetStringRef,
}

#[derive(Sequence)]
struct LenientAlgorithm<'a> {
    oid: RawOid<'a>,
    #[asn1(optional = "true")]
    parameters: Option<AnyRef<'a>>,
}

#[derive(Sequence)]
struct LenientExtension<'a> {
    extn_id: RawOid<'a>,
    #[asn1(default = "Default::default")]
    critical: bool,
    extn_value: &'a OctetStringRef,
}

/// Whether `content` is an OBJECT IDENTIFIER's content in DER: base-128 arcs, each ended by
/// an octet under 0x80 and none starting with the padding octet 0x80.
fn well_formed_oid(content: &[u8]) -> bool {
    content.last().is_some_and(|&last| last < 0x80)
        && content
            .iter()
            .zip(std::iter::once(&0).chain(content))
            .all(|(&octet, &before)| octet != 0x80 || before >= 0x80)
}

/// The dotted form of a well-formed OBJECT IDENTIFIER's content; an arc past 128 bits is
/// written `…` (none exists in practice: UUIDs, the largest, have 128), and so is what
/// follows the first [`DOTTED_MAX`] characters (the text goes back in the reply and the log,
/// and a request of a few KiB can hold thousands of arcs).
fn dotted(content: &[u8]) -> String {
    let mut arcs = Vec::new();
    let mut arc: Option<u128> = Some(0);
    for &octet in content {
        arc = arc
            .and_then(|a| a.checked_mul(128))
            .map(|a| a | u128::from(octet & 0x7f));
        if octet < 0x80 {
            arcs.push(arc);
            arc = Some(0);
        }
    }
    let text = |arc: Option<u128>| arc.map_or("…".to_string(), |a| a.to_string());
    // The first arc holds the first two: 40 × X + Y, with X ≤ 2.
    let (x, y) = match arcs.first().copied().flatten() {
        Some(first) if first < 80 => (first / 40, Some(first % 40)),
        first => (2, first.map(|f| f - 80)),
    };
    let mut out = String::new();
    let all = std::iter::once(x.to_string())
        .chain(std::iter::once(text(y)))
        .chain(arcs.into_iter().skip(1).map(text));
    for (i, arc) in all.enumerate() {
        let dot = if i > 0 { "." } else { "" };
        if out.len() + dot.len() + arc.len() > DOTTED_MAX {
            out.push_str(".…");
            break;
        }
        out.push_str(dot);
        out.push_str(&arc);
    }
    out
}

/// The most octets of a [`dotted`] text before it is cut short (and `.…` added).
const DOTTED_MAX: usize = 100;

/// Parses a DER `TimeStampReq` and checks it against `rules`.
///
/// The failInfo follows OpenSSL's TSA where RFC 3161 leaves room: an unsupported version is
/// `badRequest`; a digest whose length does not match its algorithm is `badDataFormat`.
/// `certReq` written out as an explicit FALSE (BER, not DER) is tolerated, since several
/// clients write it; everything else must be DER, with no trailing bytes.
pub fn parse_request<'a>(der: &'a [u8], rules: &RequestRules) -> Result<Request<'a>, Rejection> {
    if der.len() > rules.max_len {
        return Err(Rejection::new(
            FailInfo::BadDataFormat,
            format!(
                "the request is {} octets long; this TSA takes at most {}",
                der.len(),
                rules.max_len
            ),
        ));
    }
    let req = TimeStampReq::from_der(der).map_err(|e| {
        unknown_oid(der, rules).unwrap_or_else(|| {
            Rejection::new(
                FailInfo::BadDataFormat,
                format!("the request is not a DER TimeStampReq ({})", e.kind()),
            )
        })
    })?;
    // `const-oid` reads an arc padded with 0x80, which DER forbids; such an OID matches none
    // this TSA knows, but the request is malformed before it is unknown.
    let mut oids = std::iter::once(&req.message_imprint.hash_algorithm.oid)
        .chain(&req.req_policy)
        .chain(req.extensions.iter().flatten().map(|e| &e.extn_id));
    if oids.any(|oid| !well_formed_oid(oid.as_bytes())) {
        return Err(Rejection::new(
            FailInfo::BadDataFormat,
            "the request is not DER (an OBJECT IDENTIFIER's arc is padded with 0x80)",
        ));
    }
    let (digest, policy) = check(&Fields::of(&req), rules)?;

    Ok(Request {
        message_imprint: req.message_imprint,
        digest,
        policy,
        nonce: req.nonce,
        cert_req: req.cert_req,
    })
}

#[cfg(test)]
mod tests {
    use der::Tag;

    use super::super::tlv::{context, tlv};
    use super::*;

    /// An OBJECT IDENTIFIER's TLV from its arcs, of any size.
    fn oid(arcs: &[u128]) -> Vec<u8> {
        let mut content = Vec::new();
        let first = arcs[0] * 40 + arcs[1];
        for &arc in std::iter::once(&first).chain(&arcs[2..]) {
            let mut septets = vec![(arc & 0x7f) as u8];
            let mut rest = arc >> 7;
            while rest > 0 {
                septets.push((rest & 0x7f) as u8 | 0x80);
                rest >>= 7;
            }
            content.extend(septets.iter().rev());
        }
        tlv(Tag::ObjectIdentifier, &[&content])
    }

    /// A TimeStampReq for a SHA-256 imprint, with the hash algorithm's OID, the policy and
    /// an extension's OID as given.
    fn request(hash: &[u8], policy: Option<&[u8]>, extension: Option<&[u8]>) -> Vec<u8> {
        let algorithm = tlv(Tag::Sequence, &[hash, &[0x05, 0x00]]);
        let imprint = tlv(
            Tag::Sequence,
            &[&algorithm, &tlv(Tag::OctetString, &[&[7; 32]])],
        );
        let extensions = extension.map(|id| {
            let one = tlv(Tag::Sequence, &[id, &tlv(Tag::OctetString, &[&[5, 0]])]);
            tlv(context(0, true), &[&one])
        });
        let mut fields: Vec<&[u8]> = vec![&[0x02, 0x01, 0x01], &imprint];
        fields.extend(policy);
        fields.push(&[0x02, 0x01, 0x2a]); // nonce
        fields.extend(extensions.as_deref());
        tlv(Tag::Sequence, &fields)
    }

    fn rules() -> RequestRules {
        RequestRules {
            accepted_digests: vec![DigestAlgorithm::Sha256],
            default_policy: crate::alg::oid::DEVELOPMENT_POLICY,
            other_policies: Vec::new(),
            max_len: 10_000,
        }
    }

    fn refused(der: &[u8]) -> Rejection {
        parse_request(der, &rules()).unwrap_err()
    }

    const UUID: u128 = 329_800_735_698_586_629_295_641_978_511_506_172_918;

    #[test]
    fn oids_past_const_oid_get_the_fail_info_of_an_unknown_one() {
        let sha256 = oid(&[2, 16, 840, 1, 101, 3, 4, 2, 1]);
        let uuid = oid(&[2, 25, UUID]);
        let arc_over_32_bits = oid(&[1, 3, 6, 1, 4, 1, 1 << 32]);
        let long: Vec<u128> = [1, 3].into_iter().chain([1; 40]).collect();
        let long = oid(&long);
        assert!(long.len() > 2 + 39);
        let dev_policy = tlv(
            Tag::ObjectIdentifier,
            &[crate::alg::oid::DEVELOPMENT_POLICY.as_bytes()],
        );
        assert!(parse_request(&request(&sha256, Some(&dev_policy), None), &rules()).is_ok());

        let r = refused(&request(&uuid, None, None));
        assert_eq!(r.fail_info, FailInfo::BadAlg);
        assert!(r.reason.contains(&format!("2.25.{UUID}")), "{}", r.reason);
        let r = refused(&request(&oid(&[2, 999, 3]), None, None));
        assert_eq!(r.fail_info, FailInfo::BadAlg);
        assert!(r.reason.contains("2.999.3"), "{}", r.reason);

        for (policy, dotted) in [
            (&uuid, format!("2.25.{UUID}")),
            (&arc_over_32_bits, "1.3.6.1.4.1.4294967296".into()),
            (&long, format!("1.3{}", ".1".repeat(40))),
        ] {
            let r = refused(&request(&sha256, Some(policy), None));
            assert_eq!(r.fail_info, FailInfo::UnacceptedPolicy, "{dotted}");
            assert!(r.reason.contains(&dotted), "{}", r.reason);
        }

        let r = refused(&request(&sha256, None, Some(&arc_over_32_bits)));
        assert_eq!(r.fail_info, FailInfo::UnacceptedExtension);
        assert!(r.reason.contains("1.3.6.1.4.1.4294967296"), "{}", r.reason);
    }

    /// A request with an OID past `const-oid` goes through the checks in their order: what an
    /// earlier check finds comes first, as for any request.
    #[test]
    fn past_oids_are_checked_in_the_order_of_every_request() {
        let sha256 = oid(&[2, 16, 840, 1, 101, 3, 4, 2, 1]);
        let sha1 = oid(&[1, 3, 14, 3, 2, 26]);
        let uuid = oid(&[2, 25, UUID]);
        let other_policy = oid(&[1, 2, 3, 4]);

        let mut v2 = request(&sha256, Some(&uuid), None);
        assert_eq!(&v2[2..5], &[0x02, 0x01, 0x01]);
        v2[4] = 2;
        assert_eq!(refused(&v2).fail_info, FailInfo::BadRequest);
        // SHA-1 is known, and not accepted by these rules.
        let r = refused(&request(&sha1, Some(&uuid), None));
        assert_eq!(r.fail_info, FailInfo::BadAlg, "{}", r.reason);
        // The policy before the extensions, whichever is past const-oid.
        let r = refused(&request(&sha256, Some(&other_policy), Some(&uuid)));
        assert_eq!(r.fail_info, FailInfo::UnacceptedPolicy, "{}", r.reason);
        let r = refused(&request(&sha256, Some(&uuid), Some(&other_policy)));
        assert_eq!(r.fail_info, FailInfo::UnacceptedPolicy, "{}", r.reason);
        assert!(r.reason.contains(&UUID.to_string()), "{}", r.reason);
        // An imprint of the wrong length is found before the policy.
        let mut short = request(&sha256, Some(&uuid), None);
        let at = short
            .windows(2)
            .position(|w| w == [0x04, 0x20])
            .expect("the imprint");
        short[at + 1] = 0x1f;
        short.remove(at + 2);
        // The outer SEQUENCE's length, and the imprint's after the version's three octets.
        assert_eq!(short[5], 0x30);
        short[1] -= 1;
        short[6] -= 1;
        let r = refused(&short);
        assert_eq!(r.fail_info, FailInfo::BadDataFormat, "{}", r.reason);
        assert!(r.reason.contains("octets, not 31"), "{}", r.reason);
    }

    #[test]
    fn an_empty_list_of_extensions_is_bad_data_format() {
        let sha256 = oid(&[2, 16, 840, 1, 101, 3, 4, 2, 1]);
        let with_one = request(&sha256, None, Some(&oid(&[1, 3, 6, 1, 4, 1, 32473, 1])));
        assert_eq!(refused(&with_one).fail_info, FailInfo::UnacceptedExtension);
        let mut empty = request(&sha256, None, None);
        empty.extend([0xa0, 0x00]);
        empty[1] += 2;
        assert_eq!(refused(&empty).fail_info, FailInfo::BadDataFormat);
    }

    #[test]
    fn malformed_oids_and_other_damage_stay_bad_data_format() {
        let sha256 = oid(&[2, 16, 840, 1, 101, 3, 4, 2, 1]);
        let uuid = oid(&[2, 25, UUID]);
        // The last arc never ends.
        let unended = [0x06, 0x02, 0x2a, 0x81];
        let r = refused(&request(&sha256, Some(&unended), None));
        assert_eq!(r.fail_info, FailInfo::BadDataFormat);
        // 0x80 pads an arc: not DER, wherever the OID is (`const-oid` reads it, as 1.2.1
        // here); a padded big arc is no OID at all.
        let padded = [0x06, 0x04, 0x2a, 0x80, 0x80, 0x01];
        let r = refused(&request(&sha256, Some(&padded), None));
        assert_eq!(r.fail_info, FailInfo::BadDataFormat);
        let padded_sha256 = [
            0x06, 0x0a, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x80, 0x01,
        ];
        let r = refused(&request(&padded_sha256, None, None));
        assert_eq!(r.fail_info, FailInfo::BadDataFormat, "{}", r.reason);
        // Also beside an OID past `const-oid` (read leniently, on the error path).
        let r = refused(&request(&padded_sha256, None, Some(&uuid)));
        assert_eq!(r.fail_info, FailInfo::BadDataFormat, "{}", r.reason);
        let r = refused(&request(&sha256, None, Some(&padded)));
        assert_eq!(r.fail_info, FailInfo::BadDataFormat, "{}", r.reason);
        let mut padded_uuid = uuid.clone();
        padded_uuid.insert(3, 0x80);
        padded_uuid[1] += 1;
        let r = refused(&request(&sha256, Some(&padded_uuid), None));
        assert_eq!(r.fail_info, FailInfo::BadDataFormat);
        // A big policy in a request that is not DER for another reason too: the outer length
        // is wrong, so nothing is read of it.
        let mut broken = request(&sha256, Some(&uuid), None);
        broken[1] += 1;
        assert_eq!(refused(&broken).fail_info, FailInfo::BadDataFormat);
        // The request's shape is checked around the OID: a hashedMessage that is an INTEGER,
        // or the policy after the nonce, is no TimeStampReq, whatever its OIDs.
        let mut integer_imprint = request(&sha256, Some(&uuid), None);
        let at = integer_imprint
            .windows(2)
            .position(|w| w == [0x04, 0x20])
            .expect("the imprint's OCTET STRING");
        integer_imprint[at] = 0x02;
        assert_eq!(refused(&integer_imprint).fail_info, FailInfo::BadDataFormat);
        let plain = request(&sha256, None, None);
        assert!(plain[1] < 0x80, "a short outer length");
        let (head, nonce) = plain[2..].split_at(plain.len() - 2 - 3);
        let swapped = tlv(Tag::Sequence, &[head, nonce, &uuid]);
        assert_eq!(
            refused(&tlv(Tag::Sequence, &[head, &uuid, nonce])).fail_info,
            FailInfo::UnacceptedPolicy,
            "the same fields in their order"
        );
        assert_eq!(refused(&swapped).fail_info, FailInfo::BadDataFormat);
        // A malformed OID anywhere: not DER, whatever OID past const-oid comes with it.
        let r = refused(&request(&unended, Some(&uuid), None));
        assert_eq!(r.fail_info, FailInfo::BadDataFormat, "{}", r.reason);
        let r = refused(&request(&sha256, None, Some(&unended)));
        assert_eq!(r.fail_info, FailInfo::BadDataFormat, "{}", r.reason);
        assert!(!well_formed_oid(&[]));
        assert!(well_formed_oid(&[0x2a, 0x86, 0x48]));
        assert!(!well_formed_oid(&[0x2a, 0x80, 0x01]));
        assert!(well_formed_oid(&[0x2a, 0x81, 0x80, 0x01]));
    }

    #[test]
    fn dotted_reads_the_first_two_arcs_from_one() {
        for arcs in [
            &[0, 39][..],
            &[1, 2, 840, 113549],
            &[2, 999, 3],
            &[2, 25, UUID],
        ] {
            let der = oid(arcs);
            let expected: Vec<String> = arcs.iter().map(u128::to_string).collect();
            assert_eq!(dotted(&der[2..]), expected.join("."));
        }
        let too_big = [0x81; 20].into_iter().chain([0x01]).collect::<Vec<_>>();
        assert_eq!(dotted(&[&[0x2a][..], &too_big].concat()), "1.2.…");
        // Thousands of arcs: the text stops after DOTTED_MAX characters.
        // (Arcs of two and three digits: the dots count too.)
        for arc in [0x2a_u8, 0x7f] {
            let many = dotted(&[arc; 4000]);
            assert!(
                many.starts_with("1.2.") || many.starts_with("2.47."),
                "{many}"
            );
            assert!(many.ends_with(".…"), "{many}");
            assert!(
                many.len() <= DOTTED_MAX + ".…".len(),
                "{} octets",
                many.len()
            );
        }
    }
}
