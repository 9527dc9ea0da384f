//! Arbitrary bytes into the batch decoder (`tsa::protocol::batch`) and on through the request
//! path's pure part, as the server takes a batch: it must answer (items or one refusal) and
//! never panic.
//!
//! - A refusal encodes as one `TimeStampResp` (`badDataFormat`).
//! - Accepted items are 1 ..= the limit, each a SEQUENCE, borrowed from the input in order and
//!   tiling the outer content exactly; the batch re-encodes to the very same octets.
//! - Each item goes through `parse_request` (the default rules) like a single request; the
//!   answers (a rejection's DER, or the item itself standing in for a granted response) encode
//!   as one response batch that decodes back to the same answers, in order.

use std::sync::OnceLock;
use tsa::alg::{oid, DigestAlgorithm};
use tsa::protocol::{batch, parse_request, RequestRules};

/// The most items taken here; small, so that the limit is reached too.
const MAX_ITEMS: usize = 64;

fn rules() -> &'static RequestRules {
    static RULES: OnceLock<RequestRules> = OnceLock::new();
    RULES.get_or_init(|| RequestRules {
        accepted_digests: DigestAlgorithm::DEFAULT_ACCEPTED.to_vec(),
        default_policy: oid::ETSI_BASELINE_POLICY,
        other_policies: vec![],
        max_len: 8 * 1024,
    })
}

/// One input; panics when a property fails.
pub fn check(data: &[u8]) {
    let items = match batch::decode(data, MAX_ITEMS) {
        Ok(items) => items,
        Err(refusal) => {
            let der = refusal.rejection().to_der();
            assert_eq!(der.first(), Some(&0x30));
            return;
        }
    };
    assert!(!items.is_empty() && items.len() <= MAX_ITEMS);
    let content: usize = items.iter().map(|i| i.len()).sum();
    let mut at = data.len() - content;
    for item in &items {
        assert_eq!(item.first(), Some(&0x30), "an item is a SEQUENCE");
        assert!(
            std::ptr::eq(item.as_ptr(), data[at..].as_ptr()),
            "items tile the content"
        );
        at += item.len();
    }
    assert_eq!(
        batch::encode(&items),
        data,
        "the batch re-encodes to its own octets"
    );

    let answers: Vec<Vec<u8>> = items
        .iter()
        .map(|item| match parse_request(item, rules()) {
            Ok(request) => {
                assert!(rules().accepted_digests.contains(&request.digest));
                assert_eq!(
                    request.message_imprint.hashed_message.as_bytes().len(),
                    request.digest.output_len()
                );
                item.to_vec()
            }
            Err(rejection) => rejection.to_der(),
        })
        .collect();
    let reply = batch::encode(&answers);
    let back = batch::decode(&reply, answers.len()).expect("a response batch decodes");
    assert_eq!(back.len(), answers.len());
    for (back, answer) in back.iter().zip(&answers) {
        assert_eq!(*back, answer.as_slice());
    }
}
