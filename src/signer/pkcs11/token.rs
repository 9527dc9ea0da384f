//! Token tooling for `tsa hsm …` and `tsa init --hsm`: a SoftHSM2 token in a directory of its
//! own, key pairs generated on a token (sensitive, never extractable), and the token key as an
//! `rcgen::SigningKey`, so that CSRs and development certificates are signed by the token.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use cryptoki::context::Pkcs11;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;

use super::key::{self, KeyInfo, KeyKind, KeySelector, Scheme};
use super::module::SharedModule;
use super::pin::PinSource;
use super::pool::{self, ckr, TokenSelector};
use crate::alg::SignatureAlgorithm;

/// Where distributions put SoftHSM2's module; `TSA_SOFTHSM_MODULE` overrides.
pub const SOFTHSM_MODULES: [&str; 6] = [
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
];

/// The SoftHSM2 module of this machine.
pub fn softhsm_module() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("TSA_SOFTHSM_MODULE") {
        return Ok(PathBuf::from(path));
    }
    SOFTHSM_MODULES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context(
            "SoftHSM2 is not installed (apt-get install softhsm2); or set TSA_SOFTHSM_MODULE \
             to its libsofthsm2.so",
        )
}

/// Writes `<dir>/softhsm2.conf` with its token directory `<dir>/tokens` (file backend) and
/// returns the configuration's path, for `SOFTHSM2_CONF`.
pub fn write_softhsm_conf(dir: &Path) -> anyhow::Result<PathBuf> {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens)
        .with_context(|| format!("cannot create {}", tokens.display()))?;
    let tokens = tokens
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", tokens.display()))?;
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "# SoftHSM2 for the TSA (tsa hsm softhsm-init); SOFTHSM2_CONF points here.\n\
             directories.tokendir = {}\n\
             objectstore.backend = file\n\
             log.level = ERROR\n\
             slots.removable = false\n",
            tokens.display()
        ),
    )
    .with_context(|| format!("cannot write {}", conf.display()))?;
    conf.canonicalize()
        .with_context(|| format!("cannot resolve {}", conf.display()))
}

/// A loaded module, shared with the signers of the process on the same module (the last user
/// finalizes it).
pub struct Module {
    module: SharedModule,
}

impl Module {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            module: SharedModule::open(path)?,
        })
    }

    pub fn ctx(&self) -> &Pkcs11 {
        self.module.ctx()
    }
}

/// Initializes a fresh token labelled `label` on the first slot without one (SoftHSM2 always
/// offers one), with the SO PIN and the user PIN.
pub fn init_token(
    module: &Module,
    label: &str,
    so_pin: &PinSource,
    user_pin: &PinSource,
) -> anyhow::Result<()> {
    let ctx = module.ctx();
    if label.is_empty() || label.len() > 32 {
        bail!("a token label has 1 to 32 octets");
    }
    let selector = TokenSelector {
        label: Some(label.into()),
        slot: None,
    };
    for slot in ctx
        .get_slots_with_token()
        .context("cannot list the slots")?
    {
        if let Ok(info) = ctx.get_token_info(slot) {
            if info.token_initialized() && info.label().trim_end() == label {
                bail!("a token labelled '{label}' exists already");
            }
        }
    }
    let mut free = None;
    for slot in ctx.get_all_slots().context("cannot list the slots")? {
        if let Ok(info) = ctx.get_token_info(slot) {
            if !info.token_initialized() {
                free = Some(slot);
                break;
            }
        }
    }
    let slot = free.context("the module offers no slot with an uninitialized token")?;
    let so = so_pin.read()?;
    ctx.init_token(slot, &so, label)
        .map_err(|e| anyhow::anyhow!("C_InitToken failed: {}", ckr(&e)))?;
    // SoftHSM2 moves an initialized token to a new slot: look it up again by its label.
    let slot = pool::find_slot(ctx, &selector).map_err(|e| anyhow::anyhow!("{e}"))?;
    let session = ctx
        .open_rw_session(slot)
        .map_err(|e| anyhow::anyhow!("cannot open a session: {}", ckr(&e)))?;
    session
        .login(UserType::So, Some(&so))
        .map_err(|e| anyhow::anyhow!("the SO login failed: {}", ckr(&e)))?;
    drop(so);
    let user: AuthPin = user_pin.read()?;
    session
        .init_pin(&user)
        .map_err(|e| anyhow::anyhow!("C_InitPIN failed: {}", ckr(&e)))?;
    drop(user);
    let _ = session.logout();
    Ok(())
}

/// A logged-in read-write session on the selected token.
pub fn open_session(
    module: &Module,
    token: &TokenSelector,
    pin: &PinSource,
) -> anyhow::Result<Session> {
    let slot = pool::find_slot(module.ctx(), token).map_err(|e| anyhow::anyhow!("{e}"))?;
    pool::open_logged_in(module.ctx(), slot, pin, true).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Generates a key pair on the token: the private key sensitive, never extractable, for
/// signing only, private; the public key a token object for verifying, with the same label
/// and id. Refuses when a private or public key with that label or id exists already.
pub fn generate_key_pair(
    session: &Session,
    kind: KeyKind,
    label: &str,
    id: &[u8],
) -> anyhow::Result<(ObjectHandle, ObjectHandle)> {
    for selector in [
        KeySelector {
            label: Some(label.into()),
            id: None,
        },
        KeySelector {
            label: None,
            id: Some(id.to_vec()),
        },
    ] {
        match key::find_private_key(session, &selector) {
            Err(key::FindError::Missing(_)) => {}
            Err(key::FindError::Token(e)) => bail!("cannot search the token: {}", ckr(&e)),
            Ok(_) | Err(key::FindError::Ambiguous(_)) => {
                bail!("the token holds a private key with {selector} already")
            }
        }
        // A public key left behind (its private key deleted) would stand beside the new one
        // with the same label or id, and either could be taken for the pair's.
        let public = session
            .find_objects(&selector.template(ObjectClass::PUBLIC_KEY))
            .map_err(|e| anyhow::anyhow!("cannot search the token: {}", ckr(&e)))?;
        if !public.is_empty() {
            bail!(
                "the token holds a public key with {selector} already (its private key \
                 deleted?): delete it first"
            );
        }
    }
    let common = |class: ObjectClass| {
        vec![
            Attribute::Class(class),
            Attribute::Token(true),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.to_vec()),
        ]
    };
    let mut public = common(ObjectClass::PUBLIC_KEY);
    public.extend([
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
    ]);
    let mut private = common(ObjectClass::PRIVATE_KEY);
    private.extend([
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::SignRecover(false),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
    ]);
    let mechanism = match kind {
        KeyKind::EcP256 | KeyKind::EcP384 => {
            public.push(Attribute::KeyType(KeyType::EC));
            public.push(Attribute::EcParams(kind.ec_params().expect("EC")));
            private.push(Attribute::KeyType(KeyType::EC));
            Mechanism::EccKeyPairGen
        }
        KeyKind::Rsa { bits } => {
            public.push(Attribute::KeyType(KeyType::RSA));
            public.push(Attribute::ModulusBits((bits as u64).into()));
            public.push(Attribute::PublicExponent(vec![0x01, 0x00, 0x01]));
            private.push(Attribute::KeyType(KeyType::RSA));
            Mechanism::RsaPkcsKeyPairGen
        }
    };
    session
        .generate_key_pair(&mechanism, &public, &private)
        .map_err(|e| anyhow::anyhow!("C_GenerateKeyPair failed: {}", ckr(&e)))
}

/// A random 8-octet `CKA_ID`.
pub fn random_id() -> Vec<u8> {
    let mut id = vec![0u8; 8];
    aws_lc_rs::rand::fill(&mut id).expect("the system RNG");
    id
}

/// The token key as an rcgen signing key (CSRs, development certificates). RSA keys sign
/// these with PKCS#1 v1.5 and SHA-256 whatever the TSA's token padding.
pub struct TokenKey<'s> {
    session: &'s Session,
    key: ObjectHandle,
    info: KeyInfo,
    scheme: Scheme,
    algorithm: SignatureAlgorithm,
}

impl<'s> TokenKey<'s> {
    /// Finds the key `selector` names in the logged-in `session`.
    pub fn find(session: &'s Session, selector: &KeySelector) -> anyhow::Result<Self> {
        let key = key::find_private_key(session, selector).map_err(|e| anyhow::anyhow!("{e}"))?;
        let info = key::read_key_info(session, key)?;
        let (scheme, algorithm) = info.kind.scheme(crate::signer::software::RsaPadding::Pkcs1);
        Ok(Self {
            session,
            key,
            info,
            scheme,
            algorithm,
        })
    }

    pub fn info(&self) -> &KeyInfo {
        &self.info
    }

    /// Signs `message` as the TSA would (host digest, token mechanism, CMS encoding).
    pub fn sign_message(&self, message: &[u8]) -> anyhow::Result<Vec<u8>> {
        let digest_alg = self.algorithm.digest();
        let digest = digest_alg.digest(message).expect("SHA-2");
        let raw = self
            .session
            .sign(
                &self.scheme.mechanism(),
                self.key,
                &self.scheme.input(digest_alg, &digest),
            )
            .map_err(|e| anyhow::anyhow!("the token did not sign: {}", ckr(&e)))?;
        self.scheme.output(raw).map_err(|e| anyhow::anyhow!(e))
    }

    pub fn algorithm(&self) -> SignatureAlgorithm {
        self.algorithm
    }
}

impl rcgen::PublicKeyData for TokenKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        &self.info.public_key
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match self.info.kind {
            KeyKind::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyKind::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyKind::Rsa { .. } => &rcgen::PKCS_RSA_SHA256,
        }
    }
}

impl rcgen::SigningKey for TokenKey<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.sign_message(msg).map_err(|e| {
            tracing::error!(error = %e, "the token key did not sign");
            rcgen::Error::RemoteKeyError
        })
    }
}

/// A PEM certificate signing request for the token key, with the TSU profile's extensions
/// (digitalSignature; id-kp-timeStamping only, critical) and `subject`.
pub fn csr_pem(key: &TokenKey<'_>, subject: rcgen::DistinguishedName) -> anyhow::Result<String> {
    let mut params = crate::pki::tsu_certificate_params()?;
    params.distinguished_name = subject;
    let csr = params
        .serialize_request(key)
        .context("cannot make the certificate signing request")?;
    Ok(csr.pem()?)
}

/// `C=VN,O=Example TSA,CN=Example TSU` (RFC 4514 order or not; commas cannot be escaped) to a
/// distinguished name; C, ST, L, O, OU and CN are understood.
pub fn parse_subject(text: &str) -> anyhow::Result<rcgen::DistinguishedName> {
    use rcgen::DnType;
    let mut dn = rcgen::DistinguishedName::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, value) = part
            .split_once('=')
            .with_context(|| format!("'{part}' is not NAME=value"))?;
        let value = value.trim();
        let kind = match name.trim().to_ascii_uppercase().as_str() {
            "C" => {
                dn.push(DnType::CountryName, crate::pki::country(value)?);
                continue;
            }
            "ST" => DnType::StateOrProvinceName,
            "L" => DnType::LocalityName,
            "O" => DnType::OrganizationName,
            "OU" => DnType::OrganizationalUnitName,
            "CN" => DnType::CommonName,
            other => bail!("unknown attribute '{other}' in the subject (C, ST, L, O, OU, CN)"),
        };
        dn.push(kind, value);
    }
    if dn.iter().next().is_none() {
        bail!("the subject is empty");
    }
    Ok(dn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_parse() {
        let dn = parse_subject("C=VN, O=Example TSA ,CN=Example TSU").unwrap();
        assert_eq!(dn.iter().count(), 3);
        assert!(parse_subject("X=1").is_err());
        assert!(parse_subject("CN").is_err());
        assert!(parse_subject("").is_err());
        // countryName is a PrintableString of two letters (RFC 5280 X520countryName).
        assert!(matches!(
            dn.get(&rcgen::DnType::CountryName),
            Some(rcgen::DnValue::PrintableString(c)) if c.as_str() == "VN"
        ));
        assert!(parse_subject("C=Viet Nam,CN=x").is_err());
        assert!(parse_subject("C=V1,CN=x").is_err());
    }
}
