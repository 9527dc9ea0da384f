//! The token key: finding it, reading its public half, and turning a host-computed digest into
//! what the mechanism signs and the mechanism's output into what CMS carries.
//!
//! - ECDSA P-256 / P-384: `CKM_ECDSA` over the SHA-256 / SHA-384 digest; the token answers
//!   `r ‖ s`, which becomes a DER `ECDSA-Sig-Value`.
//! - RSA PKCS#1 v1.5: `CKM_RSA_PKCS` over the DER `DigestInfo` (SHA-256).
//! - RSA-PSS: `CKM_RSA_PKCS_PSS` over the SHA-256 digest, MGF1-SHA-256, 32-octet salt.

use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use der::asn1::{ObjectIdentifier, OctetStringRef, UintRef};
use der::{Decode, Encode, Sequence};

use crate::alg::{oid, DigestAlgorithm, SignatureAlgorithm};
use crate::signer::software::RsaPadding;

/// What the key is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    EcP256,
    EcP384,
    Rsa { bits: usize },
}

impl KeyKind {
    pub fn describe(self) -> String {
        match self {
            Self::EcP256 => "ECDSA P-256".into(),
            Self::EcP384 => "ECDSA P-384".into(),
            Self::Rsa { bits } => format!("RSA-{bits}"),
        }
    }

    /// The signature algorithm the TSA signs tokens with, and how.
    pub fn scheme(self, padding: RsaPadding) -> (Scheme, SignatureAlgorithm) {
        match (self, padding) {
            (Self::EcP256, _) => (
                Scheme::Ecdsa { field_len: 32 },
                SignatureAlgorithm::EcdsaP256Sha256,
            ),
            (Self::EcP384, _) => (
                Scheme::Ecdsa { field_len: 48 },
                SignatureAlgorithm::EcdsaP384Sha384,
            ),
            (Self::Rsa { .. }, RsaPadding::Pkcs1) => {
                (Scheme::RsaPkcs1, SignatureAlgorithm::RsaPkcs1Sha256)
            }
            (Self::Rsa { .. }, RsaPadding::Pss) => {
                (Scheme::RsaPss, SignatureAlgorithm::RsaPssSha256)
            }
        }
    }

    /// The namedCurve parameters of an EC key (`CKA_EC_PARAMS`).
    pub fn ec_params(self) -> Option<Vec<u8>> {
        let oid = match self {
            Self::EcP256 => oid::SECP256R1,
            Self::EcP384 => oid::SECP384R1,
            Self::Rsa { .. } => return None,
        };
        Some(oid.to_der().expect("static OID"))
    }
}

/// A host digest in, a CMS signature out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Ecdsa { field_len: usize },
    RsaPkcs1,
    RsaPss,
}

impl Scheme {
    pub fn mechanism(self) -> Mechanism<'static> {
        match self {
            Self::Ecdsa { .. } => Mechanism::Ecdsa,
            Self::RsaPkcs1 => Mechanism::RsaPkcs,
            Self::RsaPss => Mechanism::RsaPkcsPss(PkcsPssParams {
                hash_alg: MechanismType::SHA256,
                mgf: PkcsMgfType::MGF1_SHA256,
                s_len: 32.into(),
            }),
        }
    }

    /// What the mechanism signs: the digest, or for PKCS#1 v1.5 its DER `DigestInfo`.
    pub fn input(self, digest_alg: DigestAlgorithm, digest: &[u8]) -> Vec<u8> {
        match self {
            Self::Ecdsa { .. } | Self::RsaPss => digest.to_vec(),
            Self::RsaPkcs1 => DigestInfo {
                algorithm: digest_alg.algorithm_identifier(),
                digest: OctetStringRef::new(digest).expect("a digest is short"),
            }
            .to_der()
            .expect("DigestInfo encodes"),
        }
    }

    /// The signature as CMS carries it: DER `ECDSA-Sig-Value` for ECDSA, the octets for RSA.
    pub fn output(self, raw: Vec<u8>) -> Result<Vec<u8>, String> {
        match self {
            Self::Ecdsa { field_len } => ecdsa_raw_to_der(&raw, field_len),
            Self::RsaPkcs1 | Self::RsaPss => Ok(raw),
        }
    }
}

#[derive(Sequence)]
struct DigestInfo<'a> {
    algorithm: spki::AlgorithmIdentifierOwned,
    digest: &'a OctetStringRef,
}

#[derive(Sequence)]
struct EcdsaSigValue<'a> {
    r: UintRef<'a>,
    s: UintRef<'a>,
}

#[derive(Sequence)]
struct RsaPublicKey<'a> {
    modulus: UintRef<'a>,
    public_exponent: UintRef<'a>,
}

/// `r ‖ s` (each `field_len` octets, big-endian) to DER `ECDSA-Sig-Value`.
pub fn ecdsa_raw_to_der(raw: &[u8], field_len: usize) -> Result<Vec<u8>, String> {
    if raw.len() != 2 * field_len {
        return Err(format!(
            "the token returned a {}-octet ECDSA signature, expected {}",
            raw.len(),
            2 * field_len
        ));
    }
    let (r, s) = raw.split_at(field_len);
    let value = EcdsaSigValue {
        r: UintRef::new(r).map_err(|e| e.to_string())?,
        s: UintRef::new(s).map_err(|e| e.to_string())?,
    };
    value.to_der().map_err(|e| e.to_string())
}

/// Which key to use: by label, by id, or both.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeySelector {
    pub label: Option<String>,
    pub id: Option<Vec<u8>>,
}

impl std::fmt::Display for KeySelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.label, &self.id) {
            (Some(label), Some(id)) => write!(f, "label '{label}' and id {}", hex(id)),
            (Some(label), None) => write!(f, "label '{label}'"),
            (None, Some(id)) => write!(f, "id {}", hex(id)),
            (None, None) => write!(f, "(no label or id)"),
        }
    }
}

impl KeySelector {
    pub(super) fn template(&self, class: ObjectClass) -> Vec<Attribute> {
        let mut template = vec![Attribute::Class(class)];
        if let Some(label) = &self.label {
            template.push(Attribute::Label(label.as_bytes().to_vec()));
        }
        if let Some(id) = &self.id {
            template.push(Attribute::Id(id.clone()));
        }
        template
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why the key was not found.
#[derive(Debug)]
pub enum FindError {
    /// No private key matches.
    Missing(String),
    /// Several do; the selector must be narrower.
    Ambiguous(String),
    /// The token failed.
    Token(cryptoki::error::Error),
}

impl std::fmt::Display for FindError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing(m) | Self::Ambiguous(m) => f.write_str(m),
            Self::Token(e) => write!(f, "{e}"),
        }
    }
}

/// The one private key that `selector` names (the session must be logged in).
pub fn find_private_key(
    session: &Session,
    selector: &KeySelector,
) -> Result<ObjectHandle, FindError> {
    let found = session
        .find_objects(&selector.template(ObjectClass::PRIVATE_KEY))
        .map_err(FindError::Token)?;
    match found.as_slice() {
        [key] => Ok(*key),
        [] => Err(FindError::Missing(format!(
            "the token holds no private key with {selector}"
        ))),
        many => Err(FindError::Ambiguous(format!(
            "{} private keys have {selector}; name the key by key_label and key_id together",
            many.len()
        ))),
    }
}

/// A key's protection attributes, for the operator (`None`: the token did not say).
#[derive(Clone, Debug, Default)]
pub struct Protection {
    pub sensitive: Option<bool>,
    pub extractable: Option<bool>,
    pub always_sensitive: Option<bool>,
    pub never_extractable: Option<bool>,
    pub sign: Option<bool>,
    pub private: Option<bool>,
    /// What the key also allows besides signing (`CKA_DECRYPT`, `CKA_UNWRAP`, `CKA_DERIVE`,
    /// `CKA_SIGN_RECOVER` true).
    pub other_uses: Vec<&'static str>,
}

impl Protection {
    /// Whether the key can never leave the token in the clear.
    pub fn is_protected(&self) -> bool {
        self.sensitive == Some(true) && self.extractable == Some(false)
    }

    /// Whether the token vouches that the key never left it in the clear since it was made
    /// there (`CKA_ALWAYS_SENSITIVE` and `CKA_NEVER_EXTRACTABLE` true): a key imported, or once
    /// extractable, is not. ETSI EN 319 421 asks for TSU keys generated in the HSM.
    pub fn never_left_the_token(&self) -> bool {
        self.always_sensitive == Some(true) && self.never_extractable == Some(true)
    }
}

/// The key as found on the token.
#[derive(Clone, Debug)]
pub struct KeyInfo {
    pub kind: KeyKind,
    /// The `subjectPublicKey` as a certificate carries it.
    pub public_key: Vec<u8>,
    pub label: String,
    pub id: Vec<u8>,
    pub protection: Protection,
}

/// Reads the kind, public key and attributes of the private key `key`.
pub fn read_key_info(session: &Session, key: ObjectHandle) -> anyhow::Result<KeyInfo> {
    use anyhow::{bail, Context};
    let attrs = session
        .get_attributes(
            key,
            &[
                AttributeType::KeyType,
                AttributeType::Label,
                AttributeType::Id,
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::AlwaysSensitive,
                AttributeType::NeverExtractable,
                AttributeType::Sign,
                AttributeType::Private,
                AttributeType::Decrypt,
                AttributeType::Unwrap,
                AttributeType::Derive,
                AttributeType::SignRecover,
                AttributeType::EcParams,
                AttributeType::Modulus,
                AttributeType::PublicExponent,
                AttributeType::AlwaysAuthenticate,
            ],
        )
        .context("cannot read the private key's attributes")?;
    let mut key_type = None;
    let (mut label, mut id) = (String::new(), Vec::new());
    let mut protection = Protection::default();
    let (mut ec_params, mut modulus, mut exponent) = (None, None, None);
    for attr in attrs {
        match attr {
            Attribute::KeyType(t) => key_type = Some(t),
            Attribute::Label(l) => label = String::from_utf8_lossy(&l).into_owned(),
            Attribute::Id(i) => id = i,
            Attribute::Sensitive(b) => protection.sensitive = Some(b),
            Attribute::Extractable(b) => protection.extractable = Some(b),
            Attribute::AlwaysSensitive(b) => protection.always_sensitive = Some(b),
            Attribute::NeverExtractable(b) => protection.never_extractable = Some(b),
            Attribute::Sign(b) => protection.sign = Some(b),
            Attribute::Private(b) => protection.private = Some(b),
            Attribute::Decrypt(true) => protection.other_uses.push("CKA_DECRYPT"),
            Attribute::Unwrap(true) => protection.other_uses.push("CKA_UNWRAP"),
            Attribute::Derive(true) => protection.other_uses.push("CKA_DERIVE"),
            Attribute::SignRecover(true) => protection.other_uses.push("CKA_SIGN_RECOVER"),
            Attribute::EcParams(p) => ec_params = Some(p),
            Attribute::Modulus(m) => modulus = Some(m),
            Attribute::PublicExponent(e) => exponent = Some(e),
            Attribute::AlwaysAuthenticate(true) => bail!(
                "the private key '{label}' needs the PIN again before each signature \
                 (CKA_ALWAYS_AUTHENTICATE), which a server signing thousands of tokens a \
                 second does not give: generate the TSU key without it"
            ),
            _ => {}
        }
    }
    if protection.sign == Some(false) {
        bail!("the private key '{label}' does not allow signing (CKA_SIGN is false)");
    }
    // The public key object of the private key's label and id; where none has both, the one
    // of its CKA_ID (the PKCS#11 convention: the labels of a pair may differ).
    let public = KeySelector {
        label: (!label.is_empty()).then(|| label.clone()),
        id: (!id.is_empty()).then(|| id.clone()),
    };
    let by_id = KeySelector {
        label: None,
        id: public.id.clone(),
    };
    let public_of = |attribute| match public_attribute(session, &public, attribute)? {
        None if public.label.is_some() && by_id.id.is_some() => {
            public_attribute(session, &by_id, attribute)
        }
        found => Ok(found),
    };
    let (kind, public_key) = match key_type {
        Some(t) if t == KeyType::EC => {
            let params = match ec_params {
                Some(p) => p,
                None => public_of(AttributeType::EcParams)?
                    .context("the EC key has no CKA_EC_PARAMS")?,
            };
            let kind = curve(&params)?;
            let point = public_of(AttributeType::EcPoint)?.with_context(|| {
                format!(
                    "no public key object with {public} beside the private key; the TSA \
                         reads the EC point (CKA_EC_POINT) from it"
                )
            })?;
            let field_len = if kind == KeyKind::EcP256 { 32 } else { 48 };
            (kind, ec_point(&point, field_len)?)
        }
        Some(t) if t == KeyType::RSA => {
            let modulus = match modulus {
                Some(m) => m,
                None => {
                    public_of(AttributeType::Modulus)?.context("the RSA key has no CKA_MODULUS")?
                }
            };
            let exponent = match exponent {
                Some(e) => e,
                None => public_of(AttributeType::PublicExponent)?
                    .context("the RSA key has no CKA_PUBLIC_EXPONENT")?,
            };
            let bits = significant_bits(&modulus);
            if !(2048..=4096).contains(&bits) {
                bail!("RSA keys of 2048 to 4096 bits are supported, this one has {bits}");
            }
            let der = RsaPublicKey {
                modulus: UintRef::new(&modulus)?,
                public_exponent: UintRef::new(&exponent)?,
            }
            .to_der()?;
            (KeyKind::Rsa { bits }, der)
        }
        Some(t) => {
            bail!("the key is of type {t}; the TSA signs with EC (P-256, P-384) or RSA keys")
        }
        None => bail!("the token does not tell the key's type (CKA_KEY_TYPE)"),
    };
    Ok(KeyInfo {
        kind,
        public_key,
        label,
        id,
        protection,
    })
}

/// An attribute of the public key object that goes with the private key. Public key objects
/// of `selector` that disagree on it are refused: which one a token finds first is its own
/// choice (a public key left behind by a key pair whose private key was deleted, say).
fn public_attribute(
    session: &Session,
    selector: &KeySelector,
    attribute: AttributeType,
) -> anyhow::Result<Option<Vec<u8>>> {
    if selector.label.is_none() && selector.id.is_none() {
        return Ok(None);
    }
    let mut value = None;
    let found = session.find_objects(&selector.template(ObjectClass::PUBLIC_KEY))?;
    for object in found {
        for attr in session.get_attributes(object, &[attribute])? {
            let this = match attr {
                Attribute::EcParams(v)
                | Attribute::EcPoint(v)
                | Attribute::Modulus(v)
                | Attribute::PublicExponent(v) => v,
                _ => continue,
            };
            if value.as_ref().is_some_and(|v| *v != this) {
                anyhow::bail!(
                    "the token holds public key objects with {selector} that differ ({attribute}): \
                     which one goes with the private key is not known; delete the stale one"
                );
            }
            value = Some(this);
        }
    }
    Ok(value)
}

fn curve(params: &[u8]) -> anyhow::Result<KeyKind> {
    let oid = ObjectIdentifier::from_der(params).map_err(|_| {
        anyhow::anyhow!("the EC key's CKA_EC_PARAMS is not a named curve; P-256 or P-384 needed")
    })?;
    match oid {
        o if o == oid::SECP256R1 => Ok(KeyKind::EcP256),
        o if o == oid::SECP384R1 => Ok(KeyKind::EcP384),
        o => anyhow::bail!("the EC key is on curve {o}; the TSA signs with P-256 or P-384"),
    }
}

/// The uncompressed point from `CKA_EC_POINT`: a DER OCTET STRING around it (PKCS#11), or the
/// bare point (some modules).
fn ec_point(value: &[u8], field_len: usize) -> anyhow::Result<Vec<u8>> {
    let len = 1 + 2 * field_len;
    if value.len() == len && value[0] == 0x04 {
        return Ok(value.to_vec());
    }
    let inner = der::asn1::OctetString::from_der(value)
        .map_err(|e| anyhow::anyhow!("CKA_EC_POINT is not an OCTET STRING: {e}"))?;
    let point = inner.as_bytes();
    if point.len() != len || point[0] != 0x04 {
        anyhow::bail!("CKA_EC_POINT is not an uncompressed point of the key's curve");
    }
    Ok(point.to_vec())
}

fn significant_bits(big_endian: &[u8]) -> usize {
    let mut bytes = big_endian.iter().skip_while(|b| **b == 0);
    match bytes.next() {
        None => 0,
        Some(first) => (8 - first.leading_zeros() as usize) + 8 * bytes.count(),
    }
}

/// Checks a signature from the token, as CMS carries it, before it is used: for RSA exactly
/// as long as the modulus, and for every scheme valid under the public key (`RSAPublicKey` DER
/// or the uncompressed EC point). A faulty module must not make a granted token that does not
/// verify, and a faulty RSA-CRT signature, once published, reveals the key's factors (faults
/// in an ECDSA computation can leak key bits too). Verifying costs the host a few tens of µs
/// beside the token's signature.
pub fn check(
    algorithm: SignatureAlgorithm,
    public_key: &[u8],
    message: &[u8],
    signature: &[u8],
) -> Result<(), String> {
    if algorithm.is_rsa() {
        let modulus_len = RsaPublicKey::from_der(public_key)
            .map(|key| key.modulus.as_bytes().len())
            .map_err(|e| format!("the RSA public key does not parse: {e}"))?;
        if signature.len() != modulus_len {
            return Err(format!(
                "the token returned a {}-octet RSA signature, expected {modulus_len}",
                signature.len()
            ));
        }
    }
    if !verify(algorithm, public_key, message, signature) {
        return Err(format!(
            "the token's {} signature does not verify with the key's public key",
            algorithm.name()
        ));
    }
    Ok(())
}

/// Verifies `signature` (as CMS carries it) over `message` with the public key, on the host.
pub fn verify(
    algorithm: SignatureAlgorithm,
    public_key: &[u8],
    message: &[u8],
    signature: &[u8],
) -> bool {
    use aws_lc_rs::signature as sig;
    let alg: &dyn sig::VerificationAlgorithm = match algorithm {
        SignatureAlgorithm::EcdsaP256Sha256 => &sig::ECDSA_P256_SHA256_ASN1,
        SignatureAlgorithm::EcdsaP384Sha384 => &sig::ECDSA_P384_SHA384_ASN1,
        SignatureAlgorithm::RsaPkcs1Sha256 => &sig::RSA_PKCS1_2048_8192_SHA256,
        SignatureAlgorithm::RsaPssSha256 => &sig::RSA_PSS_2048_8192_SHA256,
        _ => return false,
    };
    sig::UnparsedPublicKey::new(alg, public_key)
        .verify(message, signature)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_ecdsa_signatures_become_minimal_der_integers() {
        let mut raw = vec![0u8; 64];
        raw[0] = 0x80; // r needs a leading zero octet
        raw[63] = 1; // s is 1
        let der = ecdsa_raw_to_der(&raw, 32).unwrap();
        assert_eq!(&der[..4], &[0x30, 0x26, 0x02, 0x21]);
        assert_eq!(der[4], 0);
        assert_eq!(&der[der.len() - 3..], &[0x02, 0x01, 0x01]);
        assert!(ecdsa_raw_to_der(&raw, 48).is_err());
    }

    #[test]
    fn pkcs1_input_is_the_sha256_digest_info() {
        let digest = [0xab; 32];
        let input = Scheme::RsaPkcs1.input(DigestAlgorithm::Sha256, &digest);
        let prefix = [
            0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x01, 0x05, 0x00, 0x04, 0x20,
        ];
        assert_eq!(&input[..prefix.len()], &prefix);
        assert_eq!(&input[prefix.len()..], &digest);
        assert_eq!(
            Scheme::RsaPss.input(DigestAlgorithm::Sha256, &digest),
            digest
        );
    }

    #[test]
    fn rsa_signatures_that_do_not_verify_or_have_the_wrong_length_are_refused() {
        use aws_lc_rs::rsa::{KeyPair, KeySize};
        use aws_lc_rs::signature::{KeyPair as _, RSA_PKCS1_SHA256, RSA_PSS_SHA256};
        let key = KeyPair::generate(KeySize::Rsa2048).expect("an RSA key");
        let public = key.public_key().as_ref().to_vec();
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let message = b"the signed attributes";
        for (algorithm, padding) in [
            (SignatureAlgorithm::RsaPkcs1Sha256, &RSA_PKCS1_SHA256),
            (SignatureAlgorithm::RsaPssSha256, &RSA_PSS_SHA256),
        ] {
            let mut signature = vec![0; key.public_modulus_len()];
            key.sign(padding, &rng, message, &mut signature)
                .expect("a signature");
            check(algorithm, &public, message, &signature).expect("a good signature");

            let mut faulty = signature.clone();
            faulty[100] ^= 0x01;
            let refused = check(algorithm, &public, message, &faulty).unwrap_err();
            assert!(refused.contains("does not verify"), "{refused}");
            let other = check(algorithm, &public, b"another message", &signature);
            assert!(other.is_err());

            let short = check(algorithm, &public, message, &signature[1..]).unwrap_err();
            assert!(short.contains("255-octet"), "{short}");
            let mut long = signature.clone();
            long.insert(0, 0);
            assert!(check(algorithm, &public, message, &long).is_err());
        }
    }

    #[test]
    fn ecdsa_signatures_that_do_not_verify_are_refused() {
        use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_ASN1_SIGNING};
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref())
            .expect("a P-256 key");
        let public = key.public_key().as_ref().to_vec();
        let message = b"the signed attributes";
        let signature = key
            .sign(&rng, message)
            .expect("a signature")
            .as_ref()
            .to_vec();
        let algorithm = SignatureAlgorithm::EcdsaP256Sha256;
        check(algorithm, &public, message, &signature).expect("a good signature");

        let mut faulty = signature.clone();
        let last = faulty.len() - 1;
        faulty[last] ^= 0x01;
        let refused = check(algorithm, &public, message, &faulty).unwrap_err();
        assert!(
            refused.contains("ecdsa-p256-sha256 signature does not verify"),
            "{refused}"
        );
        assert!(check(algorithm, &public, b"another message", &signature).is_err());
    }

    #[test]
    fn ec_points_with_and_without_the_octet_string() {
        let mut point = vec![0x04];
        point.extend([7u8; 64]);
        let mut wrapped = vec![0x04, 65];
        wrapped.extend(&point);
        assert_eq!(ec_point(&point, 32).unwrap(), point);
        assert_eq!(ec_point(&wrapped, 32).unwrap(), point);
        assert!(ec_point(&wrapped, 48).is_err());
        assert_eq!(significant_bits(&[0, 0x01, 0xff]), 9);
        assert_eq!(significant_bits(&[0x80, 0]), 16);
    }
}
