//! Digest and signature algorithms, with the identifiers that appear on the wire.
//!
//! A leaf module: the protocol encodes these identifiers, the signers implement them, and
//! neither needs to know about the other.

use const_oid::ObjectIdentifier;
use der::{asn1::Null, Encode};
use spki::AlgorithmIdentifierOwned;

/// Object identifiers used across the crate, in one place.
pub mod oid {
    use const_oid::ObjectIdentifier as Oid;

    pub const MD5: Oid = Oid::new_unwrap("1.2.840.113549.2.5");
    pub const SHA1: Oid = Oid::new_unwrap("1.3.14.3.2.26");
    pub const SHA224: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.2.4");
    pub const SHA256: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.2.1");
    pub const SHA384: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.2.2");
    pub const SHA512: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.2.3");
    pub const SHA3_256: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.2.8");
    pub const SHA3_384: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.2.9");
    pub const SHA3_512: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.2.10");

    pub const EC_PUBLIC_KEY: Oid = Oid::new_unwrap("1.2.840.10045.2.1");
    pub const SECP256R1: Oid = Oid::new_unwrap("1.2.840.10045.3.1.7");
    pub const SECP384R1: Oid = Oid::new_unwrap("1.3.132.0.34");
    pub const ECDSA_WITH_SHA256: Oid = Oid::new_unwrap("1.2.840.10045.4.3.2");
    pub const ECDSA_WITH_SHA384: Oid = Oid::new_unwrap("1.2.840.10045.4.3.3");
    pub const ECDSA_WITH_SHA512: Oid = Oid::new_unwrap("1.2.840.10045.4.3.4");
    pub const RSA_ENCRYPTION: Oid = Oid::new_unwrap("1.2.840.113549.1.1.1");
    pub const RSASSA_PSS: Oid = Oid::new_unwrap("1.2.840.113549.1.1.10");
    pub const MGF1: Oid = Oid::new_unwrap("1.2.840.113549.1.1.8");
    pub const SHA256_WITH_RSA: Oid = Oid::new_unwrap("1.2.840.113549.1.1.11");
    pub const SHA384_WITH_RSA: Oid = Oid::new_unwrap("1.2.840.113549.1.1.12");
    pub const SHA512_WITH_RSA: Oid = Oid::new_unwrap("1.2.840.113549.1.1.13");

    pub const SIGNED_DATA: Oid = Oid::new_unwrap("1.2.840.113549.1.7.2");
    pub const CT_TST_INFO: Oid = Oid::new_unwrap("1.2.840.113549.1.9.16.1.4");
    pub const CONTENT_TYPE: Oid = Oid::new_unwrap("1.2.840.113549.1.9.3");
    pub const MESSAGE_DIGEST: Oid = Oid::new_unwrap("1.2.840.113549.1.9.4");
    pub const SIGNING_TIME: Oid = Oid::new_unwrap("1.2.840.113549.1.9.5");
    pub const SIGNING_CERTIFICATE: Oid = Oid::new_unwrap("1.2.840.113549.1.9.16.2.12");
    pub const SIGNING_CERTIFICATE_V2: Oid = Oid::new_unwrap("1.2.840.113549.1.9.16.2.47");

    pub const KP_TIME_STAMPING: Oid = Oid::new_unwrap("1.3.6.1.5.5.7.3.8");
    pub const EXT_KEY_USAGE: Oid = Oid::new_unwrap("2.5.29.37");
    pub const KEY_USAGE: Oid = Oid::new_unwrap("2.5.29.15");
    pub const BASIC_CONSTRAINTS: Oid = Oid::new_unwrap("2.5.29.19");

    /// ETSI EN 319 421 baseline time-stamp policy.
    pub const ETSI_BASELINE_POLICY: Oid = Oid::new_unwrap("0.4.0.2023.1.1");
    /// The policy of tokens stamped with the development clock. It lives under enterprise
    /// number 32473, which RFC 5612 reserves for documentation and examples and which never
    /// names a real organisation, so no relying party can mistake it for a production policy.
    pub const DEVELOPMENT_POLICY: Oid = Oid::new_unwrap("1.3.6.1.4.1.32473.3161.1");
}

/// A message digest: what a request's imprint was made with, or what the TSA hashes with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DigestAlgorithm {
    Md5,
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
    Sha3_256,
    Sha3_384,
    Sha3_512,
}

impl DigestAlgorithm {
    pub const ALL: [DigestAlgorithm; 9] = [
        Self::Md5,
        Self::Sha1,
        Self::Sha224,
        Self::Sha256,
        Self::Sha384,
        Self::Sha512,
        Self::Sha3_256,
        Self::Sha3_384,
        Self::Sha3_512,
    ];

    /// The digests a production TSA accepts in requests unless configured otherwise.
    pub const DEFAULT_ACCEPTED: [DigestAlgorithm; 6] = [
        Self::Sha256,
        Self::Sha384,
        Self::Sha512,
        Self::Sha3_256,
        Self::Sha3_384,
        Self::Sha3_512,
    ];

    pub fn oid(self) -> ObjectIdentifier {
        match self {
            Self::Md5 => oid::MD5,
            Self::Sha1 => oid::SHA1,
            Self::Sha224 => oid::SHA224,
            Self::Sha256 => oid::SHA256,
            Self::Sha384 => oid::SHA384,
            Self::Sha512 => oid::SHA512,
            Self::Sha3_256 => oid::SHA3_256,
            Self::Sha3_384 => oid::SHA3_384,
            Self::Sha3_512 => oid::SHA3_512,
        }
    }

    pub fn from_oid(oid: &ObjectIdentifier) -> Option<Self> {
        Self::ALL.into_iter().find(|alg| alg.oid() == *oid)
    }

    /// Length of the digest in octets.
    pub fn output_len(self) -> usize {
        match self {
            Self::Md5 => 16,
            Self::Sha1 => 20,
            Self::Sha224 => 28,
            Self::Sha256 | Self::Sha3_256 => 32,
            Self::Sha384 | Self::Sha3_384 => 48,
            Self::Sha512 | Self::Sha3_512 => 64,
        }
    }

    /// The name used in configuration files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Md5 => "md5",
            Self::Sha1 => "sha1",
            Self::Sha224 => "sha224",
            Self::Sha256 => "sha256",
            Self::Sha384 => "sha384",
            Self::Sha512 => "sha512",
            Self::Sha3_256 => "sha3-256",
            Self::Sha3_384 => "sha3-384",
            Self::Sha3_512 => "sha3-512",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        let name = name.to_ascii_lowercase().replace('_', "-");
        Self::ALL.into_iter().find(|alg| alg.name() == name)
    }

    /// Hashes `data`; `None` for the algorithms the TSA only recognises but never computes.
    pub fn digest(self, data: &[u8]) -> Option<Vec<u8>> {
        use aws_lc_rs::digest;
        let alg = match self {
            Self::Sha1 => &digest::SHA1_FOR_LEGACY_USE_ONLY,
            Self::Sha224 => &digest::SHA224,
            Self::Sha256 => &digest::SHA256,
            Self::Sha384 => &digest::SHA384,
            Self::Sha512 => &digest::SHA512,
            Self::Sha3_256 => &digest::SHA3_256,
            Self::Sha3_384 => &digest::SHA3_384,
            Self::Sha3_512 => &digest::SHA3_512,
            Self::Md5 => return None,
        };
        Some(digest::digest(alg, data).as_ref().to_vec())
    }

    /// Whether collisions of this digest can be made (MD5, SHA-1): a stamp of such an imprint
    /// binds no single document.
    pub fn is_broken(self) -> bool {
        matches!(self, Self::Md5 | Self::Sha1)
    }

    /// The AlgorithmIdentifier with NULL parameters: the form PKCS#1's `DigestInfo` requires
    /// (RFC 8017, § 9.2) and RFC 4055's identifiers inside RSASSA-PSS parameters use.
    pub fn algorithm_identifier(self) -> AlgorithmIdentifierOwned {
        AlgorithmIdentifierOwned {
            oid: self.oid(),
            parameters: Some(Null.into()),
        }
    }

    /// The AlgorithmIdentifier as a CMS `DigestAlgorithmIdentifier`: parameters absent, as RFC
    /// 5754 § 2 has writers generate for SHA-2 (readers must accept both forms).
    pub fn cms_identifier(self) -> AlgorithmIdentifierOwned {
        AlgorithmIdentifierOwned {
            oid: self.oid(),
            parameters: None,
        }
    }
}

/// How the TSA signs tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SignatureAlgorithm {
    EcdsaP256Sha256,
    EcdsaP384Sha384,
    RsaPkcs1Sha256,
    RsaPkcs1Sha384,
    RsaPkcs1Sha512,
    RsaPssSha256,
    RsaPssSha384,
    RsaPssSha512,
}

impl SignatureAlgorithm {
    /// The digest over the signed attributes; also the digest of the messageDigest attribute.
    pub fn digest(self) -> DigestAlgorithm {
        match self {
            Self::EcdsaP256Sha256 | Self::RsaPkcs1Sha256 | Self::RsaPssSha256 => {
                DigestAlgorithm::Sha256
            }
            Self::EcdsaP384Sha384 | Self::RsaPkcs1Sha384 | Self::RsaPssSha384 => {
                DigestAlgorithm::Sha384
            }
            Self::RsaPkcs1Sha512 | Self::RsaPssSha512 => DigestAlgorithm::Sha512,
        }
    }

    pub fn is_rsa(self) -> bool {
        !matches!(self, Self::EcdsaP256Sha256 | Self::EcdsaP384Sha384)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::EcdsaP256Sha256 => "ecdsa-p256-sha256",
            Self::EcdsaP384Sha384 => "ecdsa-p384-sha384",
            Self::RsaPkcs1Sha256 => "rsa-pkcs1-sha256",
            Self::RsaPkcs1Sha384 => "rsa-pkcs1-sha384",
            Self::RsaPkcs1Sha512 => "rsa-pkcs1-sha512",
            Self::RsaPssSha256 => "rsa-pss-sha256",
            Self::RsaPssSha384 => "rsa-pss-sha384",
            Self::RsaPssSha512 => "rsa-pss-sha512",
        }
    }

    /// The signatureAlgorithm of a SignerInfo. ECDSA identifiers carry no parameters
    /// (RFC 5758); PKCS#1 v1.5 carries NULL (RFC 4055); PSS names its hash, MGF1 with the same
    /// hash and a salt as long as the hash (RFC 4055 section 3.1).
    pub fn algorithm_identifier(self) -> AlgorithmIdentifierOwned {
        let (oid, parameters) = match self {
            Self::EcdsaP256Sha256 => (oid::ECDSA_WITH_SHA256, None),
            Self::EcdsaP384Sha384 => (oid::ECDSA_WITH_SHA384, None),
            Self::RsaPkcs1Sha256 => (oid::SHA256_WITH_RSA, Some(Null.into())),
            Self::RsaPkcs1Sha384 => (oid::SHA384_WITH_RSA, Some(Null.into())),
            Self::RsaPkcs1Sha512 => (oid::SHA512_WITH_RSA, Some(Null.into())),
            Self::RsaPssSha256 | Self::RsaPssSha384 | Self::RsaPssSha512 => {
                (oid::RSASSA_PSS, Some(self.pss_parameters()))
            }
        };
        AlgorithmIdentifierOwned { oid, parameters }
    }

    fn pss_parameters(self) -> der::Any {
        let digest = self.digest();
        let hash = digest
            .algorithm_identifier()
            .to_der()
            .expect("static encoding");
        let mgf = AlgorithmIdentifierOwned {
            oid: oid::MGF1,
            parameters: Some(
                der::Any::encode_from(&digest.algorithm_identifier()).expect("static"),
            ),
        }
        .to_der()
        .expect("static encoding");
        let salt = der::asn1::Int::new(&[digest.output_len() as u8])
            .expect("small")
            .to_der()
            .expect("static encoding");
        // RSASSA-PSS-params ::= SEQUENCE { hashAlgorithm [0], maskGenAlgorithm [1],
        //                                  saltLength [2], trailerField [3] DEFAULT 1 }
        let mut body = Vec::new();
        for (tag, inner) in [(0xa0u8, hash), (0xa1, mgf), (0xa2, salt)] {
            body.push(tag);
            body.push(inner.len() as u8);
            body.extend_from_slice(&inner);
        }
        der::Any::new(der::Tag::Sequence, body).expect("short sequence")
    }
}
