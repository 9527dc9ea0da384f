//! PKIStatus, PKIFailureInfo and the rejection response.

use std::borrow::Cow;

use der::asn1::{BitString, Utf8StringRef};
use der::Encode;

use super::asn1::{PkiStatusInfo, TimeStampResp};

/// `PKIStatus` values (RFC 3161 section 2.4.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PkiStatus {
    Granted = 0,
    GrantedWithMods = 1,
    Rejection = 2,
    Waiting = 3,
    RevocationWarning = 4,
    RevocationNotification = 5,
}

/// `PKIFailureInfo` bits, numbered as RFC 3161 numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FailInfo {
    /// Unrecognized or unsupported algorithm identifier.
    BadAlg = 0,
    /// Transaction not permitted or supported.
    BadRequest = 2,
    /// The data submitted has the wrong format.
    BadDataFormat = 5,
    /// The TSA's time source is not available.
    TimeNotAvailable = 14,
    /// The requested TSA policy is not supported by the TSA.
    UnacceptedPolicy = 15,
    /// The requested extension is not supported by the TSA.
    UnacceptedExtension = 16,
    /// The additional information requested could not be understood or is not available.
    AddInfoNotAvailable = 17,
    /// The request cannot be handled due to system failure.
    SystemFailure = 25,
}

impl FailInfo {
    pub const ALL: [FailInfo; 8] = [
        Self::BadAlg,
        Self::BadRequest,
        Self::BadDataFormat,
        Self::TimeNotAvailable,
        Self::UnacceptedPolicy,
        Self::UnacceptedExtension,
        Self::AddInfoNotAvailable,
        Self::SystemFailure,
    ];

    pub fn bit(self) -> u8 {
        self as u8
    }

    pub fn from_bit(bit: usize) -> Option<Self> {
        Self::ALL.into_iter().find(|f| usize::from(f.bit()) == bit)
    }

    /// The name RFC 3161 gives the bit (also used as a bounded metric label).
    pub fn name(self) -> &'static str {
        match self {
            Self::BadAlg => "badAlg",
            Self::BadRequest => "badRequest",
            Self::BadDataFormat => "badDataFormat",
            Self::TimeNotAvailable => "timeNotAvailable",
            Self::UnacceptedPolicy => "unacceptedPolicy",
            Self::UnacceptedExtension => "unacceptedExtension",
            Self::AddInfoNotAvailable => "addInfoNotAvailable",
            Self::SystemFailure => "systemFailure",
        }
    }

    /// The DER named-bit-list encoding: one bit set, trailing zero bits removed.
    fn bit_string(self) -> BitString {
        let bit = usize::from(self.bit());
        let mut bytes = vec![0u8; bit / 8 + 1];
        bytes[bit / 8] = 0x80 >> (bit % 8);
        BitString::new(7 - (bit % 8) as u8, bytes).expect("valid unused-bit count")
    }
}

impl std::fmt::Display for FailInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A request the TSA will not grant: the failInfo that goes on the wire and a short
/// human-readable reason for the statusString.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub fail_info: FailInfo,
    pub reason: Cow<'static, str>,
    /// What only the log is told: an internal failure's own words (an HSM's return code, a
    /// store's error with its paths or hosts), which are no client's business.
    pub detail: Option<String>,
}

impl Rejection {
    pub fn new(fail_info: FailInfo, reason: impl Into<Cow<'static, str>>) -> Self {
        Self {
            fail_info,
            reason: reason.into(),
            detail: None,
        }
    }

    /// A `systemFailure` whose statusString says what failed (`reason`) and whose log line
    /// also says how (`detail`).
    pub fn internal(reason: &'static str, detail: impl std::fmt::Display) -> Self {
        Self {
            detail: Some(detail.to_string()),
            ..Self::new(FailInfo::SystemFailure, reason)
        }
    }

    /// The `TimeStampResp` with status `rejection`, this failInfo and the reason; no token.
    pub fn to_der(&self) -> Vec<u8> {
        let text = Utf8StringRef::new(&*self.reason)
            .or_else(|_| Utf8StringRef::new("rejected"))
            .expect("static text");
        TimeStampResp {
            status: PkiStatusInfo {
                status: PkiStatus::Rejection as u8,
                status_string: Some(vec![text]),
                fail_info: Some(self.fail_info.bit_string()),
            },
            time_stamp_token: None,
        }
        .to_der()
        .expect("a rejection is always encodable")
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.fail_info, self.reason)?;
        match &self.detail {
            Some(detail) => write!(f, " ({detail})"),
            None => Ok(()),
        }
    }
}

impl std::error::Error for Rejection {}

#[cfg(test)]
mod tests {
    use super::*;
    use der::Decode;

    #[test]
    fn every_fail_info_round_trips_through_der() {
        for fail in FailInfo::ALL {
            let der = Rejection::new(fail, "why").to_der();
            let resp = TimeStampResp::from_der(&der).unwrap();
            assert_eq!(resp.status.status, 2);
            assert!(resp.time_stamp_token.is_none());
            let bits = resp.status.fail_info.unwrap();
            let set: Vec<usize> = bits
                .bits()
                .enumerate()
                .filter(|(_, b)| *b)
                .map(|(i, _)| i)
                .collect();
            assert_eq!(set, vec![usize::from(fail.bit())]);
            assert_eq!(resp.status.status_string.unwrap()[0].as_str(), "why");
        }
    }

    #[test]
    fn an_internal_failures_own_words_stay_out_of_the_reply() {
        let r = Rejection::internal(
            "the token could not be archived",
            "database error: connection to 10.0.0.5:5432 refused",
        );
        let der = r.to_der();
        let resp = TimeStampResp::from_der(&der).unwrap();
        assert_eq!(
            resp.status.fail_info,
            Some(FailInfo::SystemFailure.bit_string())
        );
        let text = &resp.status.status_string.unwrap()[0];
        assert_eq!(text.as_str(), "the token could not be archived");
        assert!(
            r.to_string().contains("10.0.0.5:5432"),
            "the log is told: {r}"
        );
    }

    #[test]
    fn fail_info_is_minimal_named_bit_list() {
        // badAlg = bit 0: 03 02 07 80
        let bs = FailInfo::BadAlg.bit_string().to_der().unwrap();
        assert_eq!(bs, [0x03, 0x02, 0x07, 0x80]);
        // timeNotAvailable = bit 14: 03 03 01 00 02
        let bs = FailInfo::TimeNotAvailable.bit_string().to_der().unwrap();
        assert_eq!(bs, [0x03, 0x03, 0x01, 0x00, 0x02]);
        // systemFailure = bit 25: 03 05 06 00 00 00 40
        let bs = FailInfo::SystemFailure.bit_string().to_der().unwrap();
        assert_eq!(bs, [0x03, 0x05, 0x06, 0x00, 0x00, 0x00, 0x40]);
    }
}
