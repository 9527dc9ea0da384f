//! Soundness of the `TimeStampReq` codec: whatever `from_der` accepts must re-encode, and the
//! re-encoding must be a fixed point (decode it again, encode again: the same octets).

use der::{Decode, Encode};
use tsa::protocol::asn1::TimeStampReq;

/// One input; panics when a property fails.
pub fn check(data: &[u8]) {
    let Ok(request) = TimeStampReq::from_der(data) else {
        return;
    };
    let first = request
        .to_der()
        .expect("a decoded TimeStampReq must encode again");
    let again = TimeStampReq::from_der(&first).expect("its own encoding must decode");
    let second = again.to_der().expect("and encode");
    assert_eq!(first, second, "re-encoding is not stable");
    assert_eq!(request, again, "decode(encode(x)) != x");
}
