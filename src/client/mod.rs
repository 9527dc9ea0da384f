//! The client side: making requests, posting them, reading and verifying responses.
//! Used by `tsa request`, `tsa inspect` and `tsa verify`, and by the tests.

pub mod read;
pub mod transport;
pub mod verify;

pub use transport::{Endpoint, Options};

use anyhow::{bail, Context};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use bytes::Bytes;
use const_oid::ObjectIdentifier;
use der::asn1::{IntRef, OctetStringRef};
use der::Encode;
use spki::AlgorithmIdentifierRef;

use crate::alg::DigestAlgorithm;
use crate::protocol::asn1::{MessageImprint, TimeStampReq};
use crate::protocol::batch;

/// What to ask for.
#[derive(Clone, Debug)]
pub struct Query {
    pub digest: DigestAlgorithm,
    pub hashed_message: Vec<u8>,
    pub policy: Option<ObjectIdentifier>,
    /// The nonce's INTEGER content octets.
    pub nonce: Option<Vec<u8>>,
    pub cert_req: bool,
}

impl Query {
    /// A query for `data` with a fresh 64-bit nonce, asking for the certificate.
    pub fn for_data(digest: DigestAlgorithm, data: &[u8]) -> anyhow::Result<Self> {
        let hashed_message = digest
            .digest(data)
            .with_context(|| format!("{} cannot be computed here", digest.name()))?;
        Ok(Self {
            digest,
            hashed_message,
            policy: None,
            nonce: Some(random_nonce()?),
            cert_req: true,
        })
    }

    /// The DER `TimeStampReq`.
    pub fn to_der(&self) -> anyhow::Result<Vec<u8>> {
        let null = der::asn1::Null;
        let null_any = der::AnyRef::from(null);
        let request = TimeStampReq {
            version: IntRef::new(&[1])?,
            message_imprint: MessageImprint {
                hash_algorithm: AlgorithmIdentifierRef {
                    oid: self.digest.oid(),
                    parameters: Some(null_any),
                },
                hashed_message: OctetStringRef::new(&self.hashed_message)?,
            },
            req_policy: self.policy,
            nonce: self.nonce.as_deref().map(IntRef::new).transpose()?,
            cert_req: self.cert_req,
            extensions: None,
        };
        Ok(request.to_der()?)
    }
}

/// A positive 64-bit nonce as INTEGER content octets.
pub fn random_nonce() -> anyhow::Result<Vec<u8>> {
    let mut bytes = [0u8; 8];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("the system random generator failed"))?;
    bytes[0] = (bytes[0] & 0x7f).max(1);
    Ok(bytes.to_vec())
}

/// The longest reply read for one request: a token with its certificate path is a few KB.
const MAX_REPLY: usize = 1 << 20;
/// The longest reply read per request of a batch: a token with a chain of RSA-4096
/// certificates is some 8 KB (a server that sends more is not answering a batch, and 10,000
/// items at this stay within some 300 MiB, twice that while the replies are split).
const MAX_BATCH_REPLY_ITEM: usize = 32 << 10;

/// The most a batch reply may hold, whatever its number of items: a TSA (or anyone on the
/// way over http://) cannot make the client hold more.
const MAX_BATCH_REPLY: usize = 512 << 20;

/// POSTs a DER request to a TSA and returns the body of its reply.
pub async fn post(endpoint: &Endpoint, request: Vec<u8>) -> anyhow::Result<Vec<u8>> {
    let (status, content_type, body) = endpoint.exchange(QUERY_TYPE, request, MAX_REPLY).await?;
    if content_type != REPLY_TYPE {
        bail!("the TSA answered HTTP {status} with '{content_type}', not a time-stamp reply");
    }
    Ok(body.to_vec())
}

/// POSTs DER requests as one batch (`application/timestamp-query-batch`, `docs/batch.md`)
/// and returns each one's DER `TimeStampResp`, in the requests' order (slices of the one
/// reply body, not copies of it). A batch the TSA refused as a whole (malformed, too large,
/// overloaded) is an error with its reason.
pub async fn post_batch(endpoint: &Endpoint, requests: &[Vec<u8>]) -> anyhow::Result<Vec<Bytes>> {
    if requests.is_empty() {
        bail!("a batch holds at least one request");
    }
    let body = batch::encode(requests);
    let max_reply = MAX_BATCH_REPLY_ITEM
        .saturating_mul(requests.len())
        .saturating_add(MAX_REPLY)
        .min(MAX_BATCH_REPLY);
    let (status, content_type, body) = endpoint
        .exchange(batch::QUERY_MEDIA_TYPE, body, max_reply)
        .await?;
    if content_type == REPLY_TYPE {
        let refusal = read::Response::from_der(&body)
            .context("the TSA's refusal of the batch does not decode")?;
        bail!(
            "the TSA refused the batch (HTTP {status}): {} ({})",
            refusal
                .fail_info()
                .map(|f| f.name())
                .unwrap_or("unspecified"),
            printable(&refusal.status_text.join("; "))
        );
    }
    if content_type != batch::REPLY_MEDIA_TYPE {
        bail!("the TSA answered HTTP {status} with '{content_type}', not a batch reply");
    }
    let replies = batch::decode(&body, requests.len())
        .with_context(|| format!("the TSA's batch reply to {} requests", requests.len()))?;
    if replies.len() != requests.len() {
        bail!(
            "the TSA answered {} of {} requests in its batch reply",
            replies.len(),
            requests.len()
        );
    }
    Ok(replies.into_iter().map(|r| body.slice_ref(r)).collect())
}

/// Text from a server, fit for a terminal: control characters (escape sequences, new lines)
/// and the format characters that reorder or break what follows (bidirectional overrides and
/// isolates, line and paragraph separators) escaped.
pub fn printable(text: &str) -> String {
    let reorders = |c: char| {
        matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
            || matches!(c, '\u{2028}' | '\u{2029}')
    };
    text.chars()
        .map(|c| match c.is_control() || reorders(c) {
            true => c.escape_default().to_string(),
            false => c.to_string(),
        })
        .collect()
}

const QUERY_TYPE: &str = "application/timestamp-query";
const REPLY_TYPE: &str = "application/timestamp-reply";

#[cfg(test)]
mod tests {
    #[test]
    fn server_text_is_printed_with_its_control_characters_escaped() {
        assert_eq!(
            super::printable("bad policy\n\u{1b}[1Agranted: ok"),
            "bad policy\\n\\u{1b}[1Agranted: ok"
        );
        assert_eq!(super::printable("Thời gian không có"), "Thời gian không có");
        assert_eq!(
            super::printable("a\u{202e}b\u{2028}"),
            "a\\u{202e}b\\u{2028}"
        );
    }
}
