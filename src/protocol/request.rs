//! Strict parsing and checking of a `TimeStampReq`.

use const_oid::ObjectIdentifier;
use der::asn1::IntRef;
use der::Decode;

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
        Rejection::new(
            FailInfo::BadDataFormat,
            format!("the request is not a DER TimeStampReq ({})", e.kind()),
        )
    })?;

    if req.version.as_bytes() != [1] {
        return Err(Rejection::new(
            FailInfo::BadRequest,
            "unsupported request version (only v1 exists)",
        ));
    }

    let imprint = &req.message_imprint;
    let oid = imprint.hash_algorithm.oid;
    let digest = DigestAlgorithm::from_oid(&oid).ok_or_else(|| {
        Rejection::new(
            FailInfo::BadAlg,
            format!("unknown message imprint algorithm {oid}"),
        )
    })?;
    if !rules.accepted_digests.contains(&digest) {
        return Err(Rejection::new(
            FailInfo::BadAlg,
            format!(
                "message imprint algorithm {} is not accepted by this TSA",
                digest.name()
            ),
        ));
    }
    if let Some(params) = imprint.hash_algorithm.parameters {
        if !params.is_null() {
            return Err(Rejection::new(
                FailInfo::BadAlg,
                "message imprint algorithm parameters must be absent or NULL",
            ));
        }
    }
    let len = imprint.hashed_message.as_bytes().len();
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

    let policy = match req.req_policy {
        None => rules.default_policy,
        Some(policy) if rules.accepts_policy(&policy) => policy,
        Some(policy) => {
            return Err(Rejection::new(
                FailInfo::UnacceptedPolicy,
                format!("policy {policy} is not offered by this TSA"),
            ))
        }
    };

    if let Some(extensions) = &req.extensions {
        let first = extensions
            .first()
            .map(|e| e.extn_id.to_string())
            .unwrap_or_else(|| "(empty)".into());
        return Err(Rejection::new(
            FailInfo::UnacceptedExtension,
            format!("request extensions are not supported ({first})"),
        ));
    }

    Ok(Request {
        message_imprint: req.message_imprint,
        digest,
        policy,
        nonce: req.nonce,
        cert_req: req.cert_req,
    })
}
