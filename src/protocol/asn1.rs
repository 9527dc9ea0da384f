//! The RFC 3161 structures, on the `der` 0.8 line.
//!
//! Borrowed forms (`…Ref`, `&'a OctetStringRef`) so that a request is parsed without copying
//! and its imprint and nonce are echoed byte for byte.

use der::asn1::{BitString, IntRef, ObjectIdentifier, OctetStringRef, Utf8StringRef};
use der::{AnyRef, Sequence};
use spki::AlgorithmIdentifierRef;
use x509_cert::ext::Extensions;

use super::gentime::GenTime;

/// ```text
/// MessageImprint ::= SEQUENCE {
///      hashAlgorithm                AlgorithmIdentifier,
///      hashedMessage                OCTET STRING  }
/// ```
#[derive(Clone, Debug, Eq, PartialEq, Sequence)]
pub struct MessageImprint<'a> {
    pub hash_algorithm: AlgorithmIdentifierRef<'a>,
    pub hashed_message: &'a OctetStringRef,
}

/// ```text
/// TimeStampReq ::= SEQUENCE  {
///    version                      INTEGER  { v1(1) },
///    messageImprint               MessageImprint,
///    reqPolicy             TSAPolicyId              OPTIONAL,
///    nonce                 INTEGER                  OPTIONAL,
///    certReq               BOOLEAN                  DEFAULT FALSE,
///    extensions            [0] IMPLICIT Extensions  OPTIONAL  }
/// ```
#[derive(Clone, Debug, Eq, PartialEq, Sequence)]
pub struct TimeStampReq<'a> {
    pub version: IntRef<'a>,
    pub message_imprint: MessageImprint<'a>,
    #[asn1(optional = "true")]
    pub req_policy: Option<ObjectIdentifier>,
    #[asn1(optional = "true")]
    pub nonce: Option<IntRef<'a>>,
    #[asn1(default = "Default::default")]
    pub cert_req: bool,
    #[asn1(context_specific = "0", tag_mode = "IMPLICIT", optional = "true")]
    pub extensions: Option<Extensions>,
}

/// ```text
/// Accuracy ::= SEQUENCE {
///       seconds        INTEGER              OPTIONAL,
///       millis     [0] INTEGER  (1..999)    OPTIONAL,
///       micros     [1] INTEGER  (1..999)    OPTIONAL  }
/// ```
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq, Sequence)]
pub struct Accuracy {
    #[asn1(optional = "true")]
    pub seconds: Option<u32>,
    #[asn1(context_specific = "0", tag_mode = "IMPLICIT", optional = "true")]
    pub millis: Option<u16>,
    #[asn1(context_specific = "1", tag_mode = "IMPLICIT", optional = "true")]
    pub micros: Option<u16>,
}

impl Accuracy {
    /// The smallest Accuracy (in whole microseconds) that covers `ns` nanoseconds, and never
    /// less than a microsecond: with every field absent it would claim an exact time.
    pub fn covering_ns(ns: u64) -> Self {
        let micros_total = ns.div_ceil(1_000).max(1);
        let nonzero = |v: u64| (v != 0).then_some(v);
        Self {
            seconds: nonzero(micros_total / 1_000_000).map(|s| s.min(u64::from(u32::MAX)) as u32),
            millis: nonzero(micros_total / 1_000 % 1_000).map(|v| v as u16),
            micros: nonzero(micros_total % 1_000).map(|v| v as u16),
        }
    }

    /// `millis` and `micros` within 1..999 when present (RFC 3161); another TSA's token may
    /// break it.
    pub fn is_in_range(&self) -> bool {
        let ok = |v: Option<u16>| v.is_none_or(|v| (1..=999).contains(&v));
        ok(self.millis) && ok(self.micros)
    }

    pub fn as_ns(&self) -> u64 {
        u64::from(self.seconds.unwrap_or(0)) * 1_000_000_000
            + u64::from(self.millis.unwrap_or(0)) * 1_000_000
            + u64::from(self.micros.unwrap_or(0)) * 1_000
    }
}

/// ```text
/// TSTInfo ::= SEQUENCE  {
///    version                      INTEGER  { v1(1) },
///    policy                       TSAPolicyId,
///    messageImprint               MessageImprint,
///    serialNumber                 INTEGER,
///    genTime                      GeneralizedTime,
///    accuracy                     Accuracy                 OPTIONAL,
///    ordering                     BOOLEAN             DEFAULT FALSE,
///    nonce                        INTEGER                  OPTIONAL,
///    tsa                          [0] GeneralName          OPTIONAL,
///    extensions                   [1] IMPLICIT Extensions   OPTIONAL  }
/// ```
///
/// `tsa` stays an undecoded GeneralName (its whole TLV) so that the issuing path writes the
/// precomputed name without re-encoding it.
#[derive(Clone, Debug, Eq, PartialEq, Sequence)]
pub struct TstInfo<'a> {
    pub version: u8,
    pub policy: ObjectIdentifier,
    pub message_imprint: MessageImprint<'a>,
    pub serial_number: IntRef<'a>,
    pub gen_time: GenTime,
    #[asn1(optional = "true")]
    pub accuracy: Option<Accuracy>,
    #[asn1(default = "Default::default")]
    pub ordering: bool,
    #[asn1(optional = "true")]
    pub nonce: Option<IntRef<'a>>,
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT", optional = "true")]
    pub tsa: Option<AnyRef<'a>>,
    #[asn1(context_specific = "1", tag_mode = "IMPLICIT", optional = "true")]
    pub extensions: Option<Extensions>,
}

/// ```text
/// PKIStatusInfo ::= SEQUENCE {
///     status        PKIStatus,
///     statusString  PKIFreeText     OPTIONAL,
///     failInfo      PKIFailureInfo  OPTIONAL  }
/// ```
#[derive(Clone, Debug, Eq, PartialEq, Sequence)]
pub struct PkiStatusInfo<'a> {
    pub status: u8,
    #[asn1(optional = "true")]
    pub status_string: Option<Vec<Utf8StringRef<'a>>>,
    #[asn1(optional = "true")]
    pub fail_info: Option<BitString>,
}

/// ```text
/// TimeStampResp ::= SEQUENCE  {
///      status                  PKIStatusInfo,
///      timeStampToken          TimeStampToken     OPTIONAL  }
/// ```
/// The token is left as its TLV; [`cms::content_info::ContentInfo`] decodes it.
#[derive(Clone, Debug, Eq, PartialEq, Sequence)]
pub struct TimeStampResp<'a> {
    pub status: PkiStatusInfo<'a>,
    #[asn1(optional = "true")]
    pub time_stamp_token: Option<AnyRef<'a>>,
}

/// ```text
/// ESSCertIDv2 ::= SEQUENCE {
///     hashAlgorithm   AlgorithmIdentifier DEFAULT {algorithm id-sha256},
///     certHash        Hash,
///     issuerSerial    IssuerSerial OPTIONAL }
/// IssuerSerial ::= SEQUENCE { issuer GeneralNames, serialNumber CertificateSerialNumber }
/// ```
/// `hashAlgorithm` is omitted for SHA-256, as DER requires for a DEFAULT value.
#[derive(Clone, Debug, Eq, PartialEq, Sequence)]
pub struct EssCertIdV2<'a> {
    #[asn1(optional = "true")]
    pub hash_algorithm: Option<AlgorithmIdentifierRef<'a>>,
    pub cert_hash: &'a OctetStringRef,
    #[asn1(optional = "true")]
    pub issuer_serial: Option<IssuerSerial>,
}

/// `ESSCertID ::= SEQUENCE { certHash Hash (SHA-1), issuerSerial IssuerSerial OPTIONAL }`
#[derive(Clone, Debug, Eq, PartialEq, Sequence)]
pub struct EssCertId<'a> {
    pub cert_hash: &'a OctetStringRef,
    #[asn1(optional = "true")]
    pub issuer_serial: Option<IssuerSerial>,
}

#[derive(Clone, Debug, Eq, PartialEq, Sequence)]
pub struct IssuerSerial {
    pub issuer: Vec<x509_cert::ext::pkix::name::GeneralName>,
    pub serial_number: x509_cert::serial_number::SerialNumber,
}

/// `SigningCertificateV2 ::= SEQUENCE { certs SEQUENCE OF ESSCertIDv2, policies … OPTIONAL }`
#[derive(Clone, Debug, Eq, PartialEq, Sequence)]
pub struct SigningCertificateV2<'a> {
    pub certs: Vec<EssCertIdV2<'a>>,
    /// `SEQUENCE OF PolicyInformation`: never written here, read (and not checked) in
    /// other TSAs' tokens.
    #[asn1(optional = "true")]
    pub policies: Option<AnyRef<'a>>,
}

/// `SigningCertificate ::= SEQUENCE { certs SEQUENCE OF ESSCertID, policies … OPTIONAL }`
#[derive(Clone, Debug, Eq, PartialEq, Sequence)]
pub struct SigningCertificate<'a> {
    pub certs: Vec<EssCertId<'a>>,
    /// As in [`SigningCertificateV2`].
    #[asn1(optional = "true")]
    pub policies: Option<AnyRef<'a>>,
}
