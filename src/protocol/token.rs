//! The token: TSTInfo inside CMS SignedData (RFC 5652), signed attributes per RFC 3161 and
//! RFC 5816. Everything that does not change between tokens is encoded once, in
//! [`TokenTemplate::new`]; each token encodes only its TSTInfo and messageDigest.

use der::asn1::{IntRef, ObjectIdentifier, OctetStringRef};
use der::{AnyRef, Decode, Encode, Tag};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::Certificate;

use super::asn1::{
    Accuracy, EssCertId, EssCertIdV2, IssuerSerial, SigningCertificate, SigningCertificateV2,
    TstInfo,
};
use super::gentime::{GenTime, Precision};
use super::request::Request;
use super::response::{FailInfo, Rejection};
use super::tlv;
use crate::alg::{oid, DigestAlgorithm, SignatureAlgorithm};

/// A serialNumber: a positive INTEGER of at most 20 octets (RFC 3161, RFC 5280 4.1.2.2),
/// kept as its minimal DER content.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Serial(Vec<u8>);

impl Serial {
    /// From an unsigned big-endian magnitude; `None` for zero or more than 20 octets once
    /// encoded (a leading 0x00 is added when the high bit is set).
    pub fn from_unsigned(bytes: &[u8]) -> Option<Self> {
        let start = bytes.iter().position(|&b| b != 0)?;
        let magnitude = &bytes[start..];
        let mut der = Vec::with_capacity(magnitude.len() + 1);
        if magnitude[0] & 0x80 != 0 {
            der.push(0);
        }
        der.extend_from_slice(magnitude);
        (der.len() <= 20).then_some(Self(der))
    }

    /// The INTEGER's content octets.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The time and identity of one token, as read by the caller just before signing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub gen_time: GenTime,
    pub accuracy: Accuracy,
    pub serial: Serial,
}

impl Stamp {
    /// genTime is the reading truncated to `precision` (never ahead of the clock); the
    /// accuracy covers the clock's error bound plus what truncation removed, rounded up to
    /// whole microseconds, so that `genTime ± accuracy` holds the true time of the reading.
    pub fn new(unix_ns: u64, bound_ns: u64, precision: Precision, serial: Serial) -> Self {
        let gen_time = GenTime::truncated(unix_ns, precision);
        let lost = unix_ns - gen_time.unix_ns();
        Self {
            gen_time,
            accuracy: Accuracy::covering_ns(bound_ns + lost),
            serial,
        }
    }
}

/// Choices that shape every token.
#[derive(Clone, Debug, Default)]
pub struct TemplateOptions {
    /// Put the signing certificate's subject in TSTInfo's `tsa` field.
    pub include_tsa_name: bool,
    /// Add the legacy ESSCertID (SHA-1) attribute beside ESSCertIDv2, for old verifiers.
    pub ess_cert_id_v1: bool,
    /// How many fractional digits genTime carries.
    pub precision: Precision,
}

/// What must be signed for one token, and what is needed to assemble it afterwards.
#[derive(Clone, Debug)]
pub struct ToBeSigned {
    tst_info: Vec<u8>,
    /// The signed attributes with their SET OF tag, as RFC 5652 5.4 says they are signed.
    signed_attrs: Vec<u8>,
    /// Where the attributes begin after that tag and length.
    attrs_start: usize,
    cert_req: bool,
}

impl ToBeSigned {
    /// The octets the signer signs (hashing them with the signature algorithm's digest).
    pub fn message(&self) -> &[u8] {
        &self.signed_attrs
    }

    pub fn tst_info(&self) -> &[u8] {
        &self.tst_info
    }
}

/// The constant parts of every token, encoded once at start-up.
#[derive(Clone, Debug)]
pub struct TokenTemplate {
    signature_algorithm: SignatureAlgorithm,
    options: TemplateOptions,
    /// TSTInfo `tsa`: the GeneralName `directoryName` of the signer's subject.
    tsa_name: Option<Vec<u8>>,
    /// contentType and signingCertificate(V2) attributes.
    fixed_attrs: Vec<Vec<u8>>,
    /// `digestAlgorithms` SET.
    digest_algorithms: Vec<u8>,
    /// `[0] IMPLICIT CertificateSet`: the signer's certificate and the configured chain.
    certificates: Vec<u8>,
    /// SignerInfo's version, sid and digestAlgorithm.
    signer_info_head: Vec<u8>,
    signature_algorithm_id: Vec<u8>,
}

impl TokenTemplate {
    /// `certificate` is the TSU certificate (DER); `chain` the certificates sent with it when a
    /// request asks for certificates (intermediates and, if the operator wishes, the root).
    pub fn new(
        certificate: &[u8],
        chain: &[Vec<u8>],
        signature_algorithm: SignatureAlgorithm,
        options: TemplateOptions,
    ) -> der::Result<Self> {
        let cert = Certificate::from_der(certificate)?;
        let tbs = &cert.tbs_certificate();
        let digest = signature_algorithm.digest();

        let tsa_name = options
            .include_tsa_name
            .then(|| GeneralName::DirectoryName(tbs.subject().clone()).to_der())
            .transpose()?;

        let issuer_serial = IssuerSerial {
            issuer: vec![GeneralName::DirectoryName(tbs.issuer().clone())],
            serial_number: tbs.serial_number().clone(),
        };
        let sha256 = DigestAlgorithm::Sha256
            .digest(certificate)
            .expect("SHA-256 is computed");
        let v2 = SigningCertificateV2 {
            certs: vec![EssCertIdV2 {
                hash_algorithm: None,
                cert_hash: OctetStringRef::new(&sha256)?,
                issuer_serial: Some(issuer_serial.clone()),
            }],
        };
        let mut fixed_attrs = vec![
            attribute(oid::CONTENT_TYPE, &oid::CT_TST_INFO.to_der()?),
            attribute(oid::SIGNING_CERTIFICATE_V2, &v2.to_der()?),
        ];
        if options.ess_cert_id_v1 {
            let sha1 = DigestAlgorithm::Sha1
                .digest(certificate)
                .expect("SHA-1 is computed");
            let v1 = SigningCertificate {
                certs: vec![EssCertId {
                    cert_hash: OctetStringRef::new(&sha1)?,
                    issuer_serial: Some(issuer_serial),
                }],
            };
            fixed_attrs.push(attribute(oid::SIGNING_CERTIFICATE, &v1.to_der()?));
        }

        let digest_algorithm_id = digest.algorithm_identifier().to_der()?;
        let digest_algorithms = tlv::tlv(Tag::Set, &[&digest_algorithm_id]);

        // CertificateSet is `[0] IMPLICIT SET OF`: DER sorts the elements by their encoding.
        let mut certs: Vec<&[u8]> = std::iter::once(certificate)
            .chain(chain.iter().map(Vec::as_slice))
            .collect();
        for der in &certs {
            Certificate::from_der(der)?;
        }
        certs.sort_unstable();
        certs.dedup();
        let certificates = tlv::tlv(tlv::context(0, true), &certs);

        let sid = cms::cert::IssuerAndSerialNumber {
            issuer: tbs.issuer().clone(),
            serial_number: tbs.serial_number().clone(),
        };
        let mut signer_info_head = 1u8.to_der()?;
        signer_info_head.extend(sid.to_der()?);
        signer_info_head.extend(&digest_algorithm_id);

        Ok(Self {
            signature_algorithm,
            tsa_name,
            fixed_attrs,
            digest_algorithms,
            certificates,
            signer_info_head,
            signature_algorithm_id: signature_algorithm.algorithm_identifier().to_der()?,
            options,
        })
    }

    pub fn signature_algorithm(&self) -> SignatureAlgorithm {
        self.signature_algorithm
    }

    pub fn precision(&self) -> Precision {
        self.options.precision
    }

    /// Builds TSTInfo and the signed attributes over it.
    pub fn to_be_signed(
        &self,
        request: &Request<'_>,
        stamp: &Stamp,
    ) -> Result<ToBeSigned, Rejection> {
        let internal = |e: der::Error| {
            Rejection::new(
                FailInfo::SystemFailure,
                format!("token encoding failed: {e}"),
            )
        };
        let tsa = self
            .tsa_name
            .as_deref()
            .map(AnyRef::try_from)
            .transpose()
            .map_err(internal)?;
        let tst_info = TstInfo {
            version: 1,
            policy: request.policy,
            message_imprint: request.message_imprint.clone(),
            serial_number: IntRef::new(stamp.serial.as_bytes()).map_err(internal)?,
            gen_time: stamp.gen_time,
            accuracy: Some(stamp.accuracy),
            ordering: false,
            nonce: request.nonce,
            tsa,
            extensions: None,
        }
        .to_der()
        .map_err(internal)?;

        let digest = self
            .signature_algorithm
            .digest()
            .digest(&tst_info)
            .expect("signature digests are computed");
        let digest = tlv::tlv(Tag::OctetString, &[&digest]);
        let message_digest = attribute(oid::MESSAGE_DIGEST, &digest);

        let mut attrs: Vec<&[u8]> = self.fixed_attrs.iter().map(Vec::as_slice).collect();
        attrs.push(&message_digest);
        // DER orders a SET OF by its encoded elements.
        attrs.sort_unstable();
        let signed_attrs = tlv::tlv(Tag::Set, &attrs);
        let attrs_start = signed_attrs.len() - attrs.iter().map(|a| a.len()).sum::<usize>();

        Ok(ToBeSigned {
            tst_info,
            signed_attrs,
            attrs_start,
            cert_req: request.cert_req,
        })
    }

    /// The granted `TimeStampResp` around TSTInfo, the signed attributes and the signature.
    pub fn assemble(&self, tbs: &ToBeSigned, signature: &[u8]) -> Vec<u8> {
        let ctx0 = tlv::context(0, true);
        // In the SignerInfo the attributes carry `[0] IMPLICIT` instead of the SET tag.
        let signed_attrs_body = &tbs.signed_attrs[tbs.attrs_start..];
        let signer_info = tlv::tlv(
            Tag::Sequence,
            &[
                &self.signer_info_head,
                &tlv::tlv(ctx0, &[signed_attrs_body]),
                &self.signature_algorithm_id,
                &tlv::tlv(Tag::OctetString, &[signature]),
            ],
        );
        let encap = tlv::tlv(
            Tag::Sequence,
            &[
                &oid_der(oid::CT_TST_INFO),
                &tlv::tlv(ctx0, &[&tlv::tlv(Tag::OctetString, &[&tbs.tst_info])]),
            ],
        );
        let certificates: &[u8] = if tbs.cert_req {
            &self.certificates
        } else {
            &[]
        };
        let signed_data = tlv::tlv(
            Tag::Sequence,
            &[
                &[0x02, 0x01, 0x03], // CMSVersion 3: eContentType is not id-data
                &self.digest_algorithms,
                &encap,
                certificates,
                &tlv::tlv(Tag::Set, &[&signer_info]),
            ],
        );
        let content_info = tlv::tlv(
            Tag::Sequence,
            &[&oid_der(oid::SIGNED_DATA), &tlv::tlv(ctx0, &[&signed_data])],
        );
        const GRANTED: [u8; 5] = [0x30, 0x03, 0x02, 0x01, 0x00];
        tlv::tlv(Tag::Sequence, &[&GRANTED, &content_info])
    }
}

/// `Attribute ::= SEQUENCE { attrType OBJECT IDENTIFIER, attrValues SET OF AttributeValue }`
/// with a single value that is already DER.
fn attribute(attr_type: ObjectIdentifier, value: &[u8]) -> Vec<u8> {
    tlv::tlv(
        Tag::Sequence,
        &[&oid_der(attr_type), &tlv::tlv(Tag::Set, &[value])],
    )
}

fn oid_der(oid: ObjectIdentifier) -> Vec<u8> {
    oid.to_der().expect("an OID is always encodable")
}
