//! Arbitrary bytes into `parse_request` with the default rules: it must answer (a request or a
//! rejection) and never panic. A rejection must also encode as a `TimeStampResp`.

use std::sync::OnceLock;
use tsa::alg::{oid, DigestAlgorithm};
use tsa::protocol::{parse_request, RequestRules};

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
    match parse_request(data, rules()) {
        Ok(request) => {
            // What the parser promises the token builder.
            assert!(rules().accepted_digests.contains(&request.digest));
            assert_eq!(
                request.message_imprint.hashed_message.as_bytes().len(),
                request.digest.output_len()
            );
            assert!(rules().accepts_policy(&request.policy));
        }
        Err(rejection) => {
            let der = rejection.to_der();
            assert!(!der.is_empty());
        }
    }
}
