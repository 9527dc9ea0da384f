//! Strictness of the DER reader: what `TimeStampReq::from_der` accepts re-encodes to the very
//! same octets, except for the one BER form the parser tolerates on purpose (certReq written
//! as an explicit FALSE, which DER omits).

use der::{Decode, Encode};
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
    // The tolerated form: the same request with `01 01 00` (BOOLEAN FALSE) in it.
    assert!(
        !request.cert_req && data.len() == encoded.len() + 3,
        "accepted a non-DER encoding: {data:02x?} re-encodes as {encoded:02x?}"
    );
}
