//! A signing key held in a PKCS#8 file, used through aws-lc-rs.

use std::path::Path;

use anyhow::{bail, Context};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};

use super::{SignError, Signer};
use crate::alg::SignatureAlgorithm;

enum Key {
    Ecdsa(EcdsaKeyPair),
    Rsa(RsaKeyPair, &'static dyn signature::RsaEncoding),
}

/// The RSA padding to sign with; EC keys ignore it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RsaPadding {
    #[default]
    Pkcs1,
    Pss,
}

pub struct SoftwareSigner {
    key: Key,
    algorithm: SignatureAlgorithm,
    public_key: Vec<u8>,
    rng: SystemRandom,
}

impl SoftwareSigner {
    /// Loads an unencrypted PKCS#8 key (PEM `PRIVATE KEY` or DER). EC keys on P-256 sign with
    /// SHA-256, on P-384 with SHA-384; RSA keys (2048 to 4096 bits) with SHA-256 and `padding`.
    /// A key file that other users may read or write is refused (the service's group may read
    /// it, as the systemd units have it).
    pub fn load(path: &Path, padding: RsaPadding) -> anyhow::Result<Self> {
        use std::io::Read;
        let cannot_read = || format!("cannot read the signing key {}", path.display());
        let mut file = std::fs::File::open(path).with_context(cannot_read)?;
        crate::files::ensure_private(&file, &format_args!("the signing key {}", path.display()))?;
        // The key's copies read here are wiped when dropped (aws-lc keeps its own), the
        // buffer sized once so that no copy is left behind by its growth.
        let size = file.metadata().map_or(0, |m| m.len() as usize);
        let mut bytes = zeroize::Zeroizing::new(Vec::with_capacity(size.saturating_add(1)));
        file.read_to_end(&mut bytes).with_context(cannot_read)?;
        let der = if bytes.starts_with(b"-----BEGIN") {
            let (label, der) = der::pem::decode_vec(&bytes)
                .with_context(|| format!("{} is not a PEM file", path.display()))?;
            let der = zeroize::Zeroizing::new(der);
            if label != "PRIVATE KEY" {
                bail!(
                    "{} holds a PEM '{label}'; the TSA needs an unencrypted PKCS#8 'PRIVATE KEY'",
                    path.display()
                );
            }
            der
        } else {
            bytes
        };
        Self::from_pkcs8(&der, padding)
            .with_context(|| format!("cannot use the signing key {}", path.display()))
    }

    pub fn from_pkcs8(der: &[u8], padding: RsaPadding) -> anyhow::Result<Self> {
        use signature::{ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING};
        if let Ok(key) = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der) {
            return Ok(Self::new(
                Key::Ecdsa(key),
                SignatureAlgorithm::EcdsaP256Sha256,
            ));
        }
        if let Ok(key) = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_ASN1_SIGNING, der) {
            return Ok(Self::new(
                Key::Ecdsa(key),
                SignatureAlgorithm::EcdsaP384Sha384,
            ));
        }
        let key = RsaKeyPair::from_pkcs8(der)
            .map_err(|e| anyhow::anyhow!("not a P-256, P-384 or RSA PKCS#8 key ({e})"))?;
        let bits = key.public_modulus_len() * 8;
        if !(2048..=4096).contains(&bits) {
            bail!("RSA keys of 2048 to 4096 bits are supported, this one has {bits}");
        }
        let (encoding, algorithm): (&'static dyn signature::RsaEncoding, _) = match padding {
            RsaPadding::Pkcs1 => (
                &signature::RSA_PKCS1_SHA256,
                SignatureAlgorithm::RsaPkcs1Sha256,
            ),
            RsaPadding::Pss => (&signature::RSA_PSS_SHA256, SignatureAlgorithm::RsaPssSha256),
        };
        Ok(Self::new(Key::Rsa(key, encoding), algorithm))
    }

    fn new(key: Key, algorithm: SignatureAlgorithm) -> Self {
        let public_key = match &key {
            Key::Ecdsa(k) => k.public_key().as_ref().to_vec(),
            Key::Rsa(k, _) => k.public_key().as_ref().to_vec(),
        };
        Self {
            key,
            algorithm,
            public_key,
            rng: SystemRandom::new(),
        }
    }
}

impl Signer for SoftwareSigner {
    fn algorithm(&self) -> SignatureAlgorithm {
        self.algorithm
    }

    fn public_key(&self) -> &[u8] {
        &self.public_key
    }

    /// ECDSA in software takes tens of microseconds (P-256 ≈ 16 µs, P-384 ≈ 100 µs here): it
    /// signs in place. RSA takes 0.3 ms (2048) to several ms (4096).
    fn may_block(&self) -> bool {
        self.algorithm.is_rsa()
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        let failed = |e: aws_lc_rs::error::Unspecified| SignError::Failed(e.to_string());
        match &self.key {
            Key::Ecdsa(key) => Ok(key
                .sign(&self.rng, message)
                .map_err(failed)?
                .as_ref()
                .to_vec()),
            Key::Rsa(key, encoding) => {
                let mut signature = vec![0; key.public_modulus_len()];
                key.sign(*encoding, &self.rng, message, &mut signature)
                    .map_err(failed)?;
                Ok(signature)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_key_file_open_to_other_users_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tsa-key.pem");
        let pki = crate::pki::DevPki::generate(crate::pki::KeyAlgorithm::P256).unwrap();
        std::fs::write(&path, &pki.tsu_key_pem).unwrap();
        let load = |mode: u32| {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            SoftwareSigner::load(&path, RsaPadding::Pkcs1)
        };
        load(0o600).unwrap();
        load(0o640).unwrap();
        // Others may read it, or the group change it.
        for open in [0o644, 0o602, 0o604, 0o660, 0o620, 0o650] {
            let Err(error) = load(open) else {
                panic!("mode {open:o} accepted");
            };
            let error = error.to_string();
            assert!(error.contains("open to other users"), "{error}");
        }
    }
}
