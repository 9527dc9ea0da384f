//! The token: TSTInfo inside CMS SignedData (RFC 5652), signed attributes per RFC 3161 and
//! RFC 5816. Everything that does not change between tokens is encoded once, in
//! [`TokenTemplate::new`]; each token encodes only its TSTInfo and messageDigest.

use der::asn1::{IntRef, ObjectIdentifier, OctetStringRef};
use der::{Decode, Encode, Tag};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::Certificate;

use super::asn1::{
    Accuracy, EssCertId, EssCertIdV2, IssuerSerial, SigningCertificate, SigningCertificateV2,
};
use super::gentime::{GenTime, Precision};
use super::request::Request;
use super::response::Rejection;
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
    /// TSTInfo's `tsa` field whole: `[0]` around the GeneralName `directoryName` of the
    /// signer's subject.
    tsa_field: Option<Vec<u8>>,
    /// contentType and signingCertificate(V2) attributes.
    fixed_attrs: Vec<Vec<u8>>,
    /// Where messageDigest goes among `fixed_attrs` in DER's SET OF order (the order depends
    /// only on the attributes' lengths and OIDs, so it is the same for every token).
    message_digest_at: usize,
    /// The messageDigest attribute up to its digest: SEQUENCE, OID, SET and OCTET STRING
    /// headers (the digest's length is the signature algorithm's).
    message_digest_head: Vec<u8>,
    /// `digestAlgorithms` SET.
    digest_algorithms: Vec<u8>,
    /// `[0] IMPLICIT CertificateSet`: the signer's certificate and the configured chain, in DER
    /// order.
    certificates: Vec<u8>,
    /// SignerInfo's version, sid and digestAlgorithm.
    signer_info_head: Vec<u8>,
    signature_algorithm_id: Vec<u8>,
}

impl TokenTemplate {
    /// `certificate` is the TSU certificate (DER); `chain` the certificates sent with it when a
    /// request asks for certificates (intermediates and, if the operator wishes, the root), in
    /// the token together with the TSU certificate in DER order.
    pub fn new(
        certificate: &[u8],
        chain: &[Vec<u8>],
        signature_algorithm: SignatureAlgorithm,
        options: TemplateOptions,
    ) -> der::Result<Self> {
        let cert = Certificate::from_der(certificate)?;
        let tbs = &cert.tbs_certificate();
        let digest = signature_algorithm.digest();

        let tsa_field = options
            .include_tsa_name
            .then(|| GeneralName::DirectoryName(tbs.subject().clone()).to_der())
            .transpose()?
            .map(|name| tlv::tlv(tlv::context(0, true), &[&name]));

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
            policies: None,
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
                policies: None,
            };
            fixed_attrs.push(attribute(oid::SIGNING_CERTIFICATE, &v1.to_der()?));
        }

        let digest_len = digest.output_len();
        let message_digest_head = {
            let sample = attribute(
                oid::MESSAGE_DIGEST,
                &tlv::tlv(Tag::OctetString, &[&vec![0; digest_len]]),
            );
            sample[..sample.len() - digest_len].to_vec()
        };
        // DER orders a SET OF by its encoded elements.
        fixed_attrs.sort_unstable();
        let message_digest_at = {
            let mut sample = message_digest_head.clone();
            sample.resize(message_digest_head.len() + digest_len, 0);
            // The OIDs differ before any digest octet, so any digest sorts the same.
            fixed_attrs
                .iter()
                .filter(|a| a.as_slice() < sample.as_slice())
                .count()
        };

        let digest_algorithm_id = digest.cms_identifier().to_der()?;
        let digest_algorithms = tlv::tlv(Tag::Set, &[&digest_algorithm_id]);

        // CertificateSet is a SET OF, which DER sorts by encoding (X.690 § 11.6), and the
        // reply is DER (RFC 3161 § 3.4). Strict parsers refuse another order (rust-asn1, so
        // rfc3161-client and sigstore: InvalidSetOrdering; Windows' Authenticode checks), so
        // the TSU's certificate is wherever its encoding puts it, each certificate once: the
        // signer is named exactly by its SignerInfo's sid and the ESS attribute, and a client
        // that takes the first certificate for the signer's may find a CA there.
        let mut certs: Vec<&[u8]> = vec![certificate];
        certs.extend(chain.iter().map(Vec::as_slice));
        certs.sort_unstable();
        certs.dedup();
        for der in &certs {
            Certificate::from_der(der)?;
        }
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
            tsa_field,
            fixed_attrs,
            message_digest_at,
            message_digest_head,
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

    /// The DER TSTInfo (`asn1::TstInfo`): each field encoded by `der` into one buffer, the
    /// precomputed `tsa` field copied, and the SEQUENCE written around them once. (The
    /// derived encoder of the whole structure computes the nested lengths again at each level
    /// and needs the `tsa` name parsed back: 2.7 % of a P-256 token's CPU on the server,
    /// against 2.2 % this way.)
    fn tst_info(&self, request: &Request<'_>, stamp: &Stamp) -> der::Result<Vec<u8>> {
        let mut fields = Vec::with_capacity(TST_INFO_FIELDS);
        1u8.encode_to_vec(&mut fields)?;
        request.policy.encode_to_vec(&mut fields)?;
        request.message_imprint.encode_to_vec(&mut fields)?;
        IntRef::new(stamp.serial.as_bytes())?.encode_to_vec(&mut fields)?;
        stamp.gen_time.encode_to_vec(&mut fields)?;
        stamp.accuracy.encode_to_vec(&mut fields)?;
        // ordering: FALSE, its DEFAULT, so absent.
        if let Some(nonce) = request.nonce {
            nonce.encode_to_vec(&mut fields)?;
        }
        if let Some(tsa) = &self.tsa_field {
            fields.extend_from_slice(tsa);
        }
        Ok(tlv::tlv(Tag::Sequence, &[&fields]))
    }

    /// Builds TSTInfo and the signed attributes over it.
    pub fn to_be_signed(
        &self,
        request: &Request<'_>,
        stamp: &Stamp,
    ) -> Result<ToBeSigned, Rejection> {
        let internal = |e: der::Error| Rejection::internal("the token could not be encoded", e);
        let tst_info = self.tst_info(request, stamp).map_err(internal)?;

        let digest = self
            .signature_algorithm
            .digest()
            .digest(&tst_info)
            .expect("signature digests are computed");

        // SET OF Attribute in DER order, messageDigest at its precomputed place.
        let message_digest_len = self.message_digest_head.len() + digest.len();
        let content: usize =
            self.fixed_attrs.iter().map(Vec::len).sum::<usize>() + message_digest_len;
        let mut signed_attrs = Vec::with_capacity(tlv::size(content));
        tlv::header(&mut signed_attrs, Tag::Set, content);
        let attrs_start = signed_attrs.len();
        let (before, after) = self.fixed_attrs.split_at(self.message_digest_at);
        for attr in before {
            signed_attrs.extend_from_slice(attr);
        }
        signed_attrs.extend_from_slice(&self.message_digest_head);
        signed_attrs.extend_from_slice(&digest);
        for attr in after {
            signed_attrs.extend_from_slice(attr);
        }

        Ok(ToBeSigned {
            tst_info,
            signed_attrs,
            attrs_start,
            cert_req: request.cert_req,
        })
    }

    /// The granted `TimeStampResp` around TSTInfo, the signed attributes and the signature,
    /// written front to back into one buffer of the exact size: the lengths are computed
    /// first, innermost out.
    pub fn assemble(&self, tbs: &ToBeSigned, signature: &[u8]) -> Vec<u8> {
        use tlv::size;
        const GRANTED: [u8; 5] = [0x30, 0x03, 0x02, 0x01, 0x00];
        const CMS_VERSION_3: [u8; 3] = [0x02, 0x01, 0x03]; // eContentType is not id-data
        let ctx0 = tlv::context(0, true);
        // In the SignerInfo the attributes carry `[0] IMPLICIT` instead of the SET tag.
        let attrs = &tbs.signed_attrs[tbs.attrs_start..];
        let certificates: &[u8] = if tbs.cert_req {
            &self.certificates
        } else {
            &[]
        };

        let signer_info = self.signer_info_head.len()
            + size(attrs.len())
            + self.signature_algorithm_id.len()
            + size(signature.len());
        let econtent = size(tbs.tst_info.len()); // OCTET STRING
        let encap = CT_TST_INFO_DER.len() + size(econtent); // eContentType, [0]
        let signer_infos = size(signer_info); // SET OF one SignerInfo
        let signed_data = CMS_VERSION_3.len()
            + self.digest_algorithms.len()
            + size(encap)
            + certificates.len()
            + size(signer_infos);
        let content_info = SIGNED_DATA_DER.len() + size(size(signed_data));
        let response = GRANTED.len() + size(content_info);

        let mut out = Vec::with_capacity(size(response));
        tlv::header(&mut out, Tag::Sequence, response);
        out.extend_from_slice(&GRANTED);
        tlv::header(&mut out, Tag::Sequence, content_info);
        out.extend_from_slice(SIGNED_DATA_DER);
        tlv::header(&mut out, ctx0, size(signed_data));
        tlv::header(&mut out, Tag::Sequence, signed_data);
        out.extend_from_slice(&CMS_VERSION_3);
        out.extend_from_slice(&self.digest_algorithms);
        tlv::header(&mut out, Tag::Sequence, encap);
        out.extend_from_slice(CT_TST_INFO_DER);
        tlv::header(&mut out, ctx0, econtent);
        tlv::header(&mut out, Tag::OctetString, tbs.tst_info.len());
        out.extend_from_slice(&tbs.tst_info);
        out.extend_from_slice(certificates);
        tlv::header(&mut out, Tag::Set, signer_infos);
        tlv::header(&mut out, Tag::Sequence, signer_info);
        out.extend_from_slice(&self.signer_info_head);
        tlv::header(&mut out, ctx0, attrs.len());
        out.extend_from_slice(attrs);
        out.extend_from_slice(&self.signature_algorithm_id);
        tlv::header(&mut out, Tag::OctetString, signature.len());
        out.extend_from_slice(signature);
        debug_assert_eq!(out.len(), size(response));
        out
    }
}

/// Room for a TSTInfo's fields: a SHA-512 imprint, a 20-octet nonce and a long `tsa` name fit.
const TST_INFO_FIELDS: usize = 384;

/// `id-ct-TSTInfo` (1.2.840.113549.1.9.16.1.4) and `id-signedData` (1.2.840.113549.1.7.2), DER.
const CT_TST_INFO_DER: &[u8] = &[
    0x06, 0x0b, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x10, 0x01, 0x04,
];
const SIGNED_DATA_DER: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x02,
];

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::asn1::{MessageImprint, TstInfo};

    /// The TSTInfo written field by field is octet for octet what `der`'s derived encoder
    /// writes for `asn1::TstInfo`, with and without each optional field.
    #[test]
    fn tst_info_is_the_derived_encoding() {
        use crate::pki::{DevPki, KeyAlgorithm};
        use der::{AnyRef, DecodePem};
        use spki::AlgorithmIdentifierRef;

        let pki = DevPki::generate(KeyAlgorithm::P256).unwrap();
        let cert = Certificate::from_pem(pki.tsu_cert_pem.as_bytes()).unwrap();
        let subject = GeneralName::DirectoryName(cert.tbs_certificate().subject().clone())
            .to_der()
            .unwrap();
        let imprint = [0xab; 64];
        let nonce = [0x00, 0x80, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88];
        for include_tsa_name in [false, true] {
            let options = TemplateOptions {
                include_tsa_name,
                ..TemplateOptions::default()
            };
            let template = TokenTemplate::new(
                &cert.to_der().unwrap(),
                &[],
                SignatureAlgorithm::EcdsaP256Sha256,
                options,
            )
            .unwrap();
            for (with_nonce, parameters, bound_ns) in [
                (false, None, 0),
                (true, Some(AnyRef::NULL), 2_500_000_123),
                (true, None, 999_000),
            ] {
                let request = Request {
                    message_imprint: MessageImprint {
                        hash_algorithm: AlgorithmIdentifierRef {
                            oid: oid::SHA512,
                            parameters,
                        },
                        hashed_message: OctetStringRef::new(&imprint).unwrap(),
                    },
                    digest: DigestAlgorithm::Sha512,
                    policy: ObjectIdentifier::new_unwrap("1.3.6.1.4.1.99999.1.2"),
                    nonce: with_nonce.then(|| IntRef::new(&nonce[1..]).unwrap()),
                    cert_req: false,
                };
                let serial = Serial::from_unsigned(&[0x7f; 20]).unwrap();
                let stamp = Stamp::new(
                    1_764_166_669_123_456_789,
                    bound_ns,
                    Precision::Micros,
                    serial,
                );
                let derived = TstInfo {
                    version: 1,
                    policy: request.policy,
                    message_imprint: request.message_imprint.clone(),
                    serial_number: IntRef::new(stamp.serial.as_bytes()).unwrap(),
                    gen_time: stamp.gen_time,
                    accuracy: Some(stamp.accuracy),
                    ordering: false,
                    nonce: request.nonce,
                    tsa: include_tsa_name.then(|| AnyRef::from_der(&subject).unwrap()),
                    extensions: None,
                }
                .to_der()
                .unwrap();
                assert_eq!(
                    template.tst_info(&request, &stamp).unwrap(),
                    derived,
                    "tsa name {include_tsa_name}, nonce {with_nonce}, bound {bound_ns} ns"
                );
            }
        }
    }

    #[test]
    fn the_oid_constants_are_the_oids() {
        assert_eq!(CT_TST_INFO_DER, oid_der(oid::CT_TST_INFO));
        assert_eq!(SIGNED_DATA_DER, oid_der(oid::SIGNED_DATA));
    }
}
