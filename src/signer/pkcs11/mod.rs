//! A signing key held in an HSM, used through PKCS#11 (`cryptoki`).
//!
//! The TSA hashes on the host and lets the token sign the digest: `CKM_ECDSA` for P-256 and
//! P-384, `CKM_RSA_PKCS` over the DER `DigestInfo`, or `CKM_RSA_PKCS_PSS` (see [`key`]). A
//! pool of logged-in sessions serves concurrent signatures and recovers from lost sessions,
//! logins and tokens without a restart (see [`pool`]); signers on one module share its library
//! ([`module`]). The PIN comes from a file, an
//! environment variable or a systemd credential ([`pin`]), never from the configuration file.
//! [`token`] has the tooling: a SoftHSM2 token for development, key generation on a token, and
//! CSRs signed by the token key. `hsm/README.md` is the operator's guide.

pub mod key;
pub mod module;
pub mod pin;
pub mod pool;
pub mod token;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

use super::software::RsaPadding;
use super::{SignError, Signer};
use crate::alg::SignatureAlgorithm;
pub use key::{KeyInfo, KeyKind, KeySelector};
pub use pin::PinSource;
pub use pool::TokenSelector;

/// `[signer] kind = "pkcs11"`: see `config/tsa.example.toml`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Config {
    /// The PKCS#11 module: a path, or a bare file name for the dynamic loader to find.
    pub module: PathBuf,
    /// Environment variables set before the module is loaded (`SOFTHSM2_CONF`,
    /// `ChrystokiConfigurationPath`, `YUBIHSM_PKCS11_CONF`, …).
    #[serde(default)]
    pub module_env: BTreeMap<String, String>,
    /// The token's label.
    #[serde(default)]
    pub token_label: Option<String>,
    /// The token's slot id (with `token_label`, both must agree).
    #[serde(default)]
    pub slot: Option<u64>,
    /// The private key's `CKA_LABEL`.
    #[serde(default)]
    pub key_label: Option<String>,
    /// The private key's `CKA_ID`, in hex.
    #[serde(default)]
    pub key_id: Option<String>,
    /// A file holding the user PIN. Refused when others (neither its owner nor its group) have
    /// any access to it, or its group more than reading; the group may read it (mode 0640 for a
    /// service's group), so 0600 or 0640.
    #[serde(default)]
    pub pin_file: Option<PathBuf>,
    /// An environment variable holding the user PIN.
    #[serde(default)]
    pub pin_env: Option<String>,
    /// A systemd credential (`$CREDENTIALS_DIRECTORY/<name>`) holding the user PIN.
    #[serde(default)]
    pub pin_credential: Option<String>,
    /// Never used: present only to refuse a PIN written into the configuration.
    #[serde(default)]
    pub pin: Option<serde::de::IgnoredAny>,
    /// Logged-in sessions in the pool: the most signatures in flight at once.
    #[serde(default = "default_sessions")]
    pub sessions: usize,
    /// RSA keys: PKCS#1 v1.5 or PSS.
    #[serde(default)]
    pub rsa_padding: RsaPadding,
    /// How often an idle pool checks that the token and its sessions are still there.
    #[serde(default = "default_health_check_interval_ms")]
    pub health_check_interval_ms: u64,
    /// How long a signature may stay inside the module before the signer counts the HSM as
    /// hung (readiness 503 until it answers again).
    #[serde(default = "default_sign_timeout_ms")]
    pub sign_timeout_ms: u64,
    /// How long a call may stay inside the module before the TSA exits (status 75) for its
    /// service manager to start it anew: a PKCS#11 call cannot be cancelled, and a module
    /// that does not answer keeps the signer down until a new process loads it. 0: never.
    #[serde(default = "default_exit_after_hung_ms")]
    pub exit_after_hung_ms: u64,
    /// The TSU certificate (PEM); it may be followed by its chain.
    pub certificate: PathBuf,
    /// Further certificates sent when a request sets certReq.
    #[serde(default)]
    pub chain: Vec<PathBuf>,
}

fn default_sessions() -> usize {
    4
}

fn default_health_check_interval_ms() -> u64 {
    5_000
}

fn default_sign_timeout_ms() -> u64 {
    10_000
}

fn default_exit_after_hung_ms() -> u64 {
    60_000
}

impl Pkcs11Config {
    /// Makes relative paths relative to `base` (the configuration's directory). A module
    /// given as a bare file name is left to the dynamic loader.
    pub fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if self.module.components().count() > 1 {
            resolve(&mut self.module);
        }
        if let Some(pin_file) = &mut self.pin_file {
            resolve(pin_file);
        }
        resolve(&mut self.certificate);
        self.chain.iter_mut().for_each(resolve);
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.pin.is_some() {
            bail!(
                "signer.pin: the PIN is never read from the configuration file; use pin_file, \
                 pin_env or pin_credential"
            );
        }
        self.pin_source()?;
        self.key_selector()?;
        if self.token_label.is_none() && self.slot.is_none() {
            bail!("signer: name the token by token_label or slot");
        }
        if self.sessions == 0 || self.sessions > 256 {
            bail!("signer.sessions must be between 1 and 256");
        }
        if self.health_check_interval_ms < 10 {
            bail!("signer.health_check_interval_ms must be at least 10");
        }
        if self.sign_timeout_ms < 100 {
            bail!("signer.sign_timeout_ms must be at least 100");
        }
        if self.exit_after_hung_ms != 0 && self.exit_after_hung_ms < self.sign_timeout_ms {
            bail!(
                "signer.exit_after_hung_ms must be 0 (never) or at least sign_timeout_ms ({})",
                self.sign_timeout_ms
            );
        }
        Ok(())
    }

    pub fn pin_source(&self) -> anyhow::Result<PinSource> {
        match (&self.pin_file, &self.pin_env, &self.pin_credential) {
            (Some(file), None, None) => Ok(PinSource::File(file.clone())),
            (None, Some(env), None) => Ok(PinSource::Env(env.clone())),
            (None, None, Some(name)) => Ok(PinSource::Credential(name.clone())),
            (None, None, None) => {
                bail!("signer: give the PIN's source: pin_file, pin_env or pin_credential")
            }
            _ => bail!("signer: give one of pin_file, pin_env and pin_credential, not several"),
        }
    }

    pub fn key_selector(&self) -> anyhow::Result<KeySelector> {
        let id = self
            .key_id
            .as_deref()
            .map(|hex| decode_hex(hex).with_context(|| format!("signer.key_id '{hex}' is not hex")))
            .transpose()?;
        if self.key_label.is_none() && id.is_none() {
            bail!("signer: name the key by key_label, key_id or both");
        }
        if id.as_ref().is_some_and(Vec::is_empty) {
            bail!("signer.key_id is empty");
        }
        Ok(KeySelector {
            label: self.key_label.clone(),
            id,
        })
    }

    pub fn token_selector(&self) -> TokenSelector {
        TokenSelector {
            label: self.token_label.clone(),
            slot: self.slot,
        }
    }

    /// Sets `module_env` in the process environment (before the module is loaded), leaving
    /// alone what holds its value already. Changing the environment while other threads run
    /// is unsound (they may read it meanwhile, the module's own threads included): call this,
    /// or [`apply_module_envs`] for all signers, before any thread starts.
    pub fn apply_module_env(&self) {
        for (name, value) in &self.module_env {
            if std::env::var_os(name).is_none_or(|current| current != value.as_str()) {
                std::env::set_var(name, value);
            }
        }
    }

    pub fn spec(&self) -> anyhow::Result<pool::Spec> {
        self.validate()?;
        Ok(pool::Spec {
            module: self.module.clone(),
            token: self.token_selector(),
            key: self.key_selector()?,
            pin: self.pin_source()?,
            sessions: self.sessions,
            padding: self.rsa_padding,
            health_check_interval: Duration::from_millis(self.health_check_interval_ms),
            sign_timeout: Duration::from_millis(self.sign_timeout_ms),
        })
    }
}

/// Applies the `module_env` of every signer (before any thread starts), refusing two signers
/// that want one variable to hold different values: a process has one environment.
pub fn apply_module_envs<'a>(
    configs: impl IntoIterator<Item = (&'a str, &'a Pkcs11Config)>,
) -> anyhow::Result<()> {
    let configs: Vec<_> = configs.into_iter().collect();
    module_env_conflict(&configs)?;
    for (_, config) in configs {
        config.apply_module_env();
    }
    Ok(())
}

fn module_env_conflict(configs: &[(&str, &Pkcs11Config)]) -> anyhow::Result<()> {
    let mut seen: BTreeMap<&str, (&str, &str)> = BTreeMap::new();
    for (section, config) in configs {
        for (name, value) in &config.module_env {
            match seen.get(name.as_str()) {
                Some((other, earlier)) if earlier != value => bail!(
                    "{other}.module_env and {section}.module_env set {name} differently; the \
                     process has one environment: give both signers the same value"
                ),
                Some(_) => {}
                None => {
                    seen.insert(name, (section, value));
                }
            }
        }
    }
    Ok(())
}

/// Hex digits (colons and spaces allowed) to bytes.
pub fn decode_hex(text: &str) -> anyhow::Result<Vec<u8>> {
    let digits: Vec<u8> = text.bytes().filter(|b| !matches!(b, b' ' | b':')).collect();
    if digits.len() % 2 != 0 {
        bail!("odd number of hex digits");
    }
    digits
        .chunks(2)
        .map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .context("not a hex digit")
        })
        .collect()
}

/// A TSU key on a PKCS#11 token.
pub struct Pkcs11Signer {
    pool: Arc<pool::Pool>,
    algorithm: SignatureAlgorithm,
    public_key: Vec<u8>,
    sessions: usize,
    /// `exit_after_hung_ms`; `None` for never.
    exit_after_hung: Option<Duration>,
}

impl Pkcs11Signer {
    /// Applies `module_env` (a no-op when [`apply_module_envs`] ran at start-up), loads the
    /// module, logs in, finds the key, checks it with a test
    /// signature and fills the session pool. Refuses with a clear message when the module,
    /// token or key is missing or the PIN is wrong.
    pub fn open(config: &Pkcs11Config) -> anyhow::Result<Self> {
        let spec = config.spec()?;
        config.apply_module_env();
        let pool = pool::Pool::open(spec).context("cannot use the HSM key")?;
        let info = pool.info();
        let spec = pool.spec();
        tracing::info!(
            event = "hsm_key_loaded",
            module = %spec.module.display(),
            token = %spec.token,
            key_label = %info.label,
            key_id = %key::hex(&info.id),
            key = %info.kind.describe(),
            algorithm = pool.algorithm().name(),
            sessions = spec.sessions,
            "HSM key loaded"
        );
        if !info.protection.is_protected() {
            tracing::warn!(
                event = "hsm_key_exportable",
                sensitive = ?info.protection.sensitive,
                extractable = ?info.protection.extractable,
                "the HSM key may leave the token (CKA_SENSITIVE is not true or CKA_EXTRACTABLE \
                 is not false); production keys should be sensitive and non-extractable"
            );
        }
        if !info.protection.never_left_the_token() {
            tracing::warn!(
                event = "hsm_key_not_generated_on_token",
                always_sensitive = ?info.protection.always_sensitive,
                never_extractable = ?info.protection.never_extractable,
                "the token does not vouch that the HSM key never left it (CKA_ALWAYS_SENSITIVE \
                 or CKA_NEVER_EXTRACTABLE is not true): it was imported, or extractable once; \
                 ETSI EN 319 421 asks for TSU keys generated in the HSM (tsa hsm keygen)"
            );
        }
        if !info.protection.other_uses.is_empty() {
            tracing::warn!(
                event = "hsm_key_other_uses",
                uses = %info.protection.other_uses.join(", "),
                "the HSM key allows more than signing; a TSU key should sign only"
            );
        }
        Ok(Self {
            algorithm: pool.algorithm(),
            public_key: info.public_key.clone(),
            pool,
            sessions: config.sessions,
            exit_after_hung: (config.exit_after_hung_ms > 0)
                .then(|| Duration::from_millis(config.exit_after_hung_ms)),
        })
    }

    pub fn key_info(&self) -> &KeyInfo {
        self.pool.info()
    }
}

impl Drop for Pkcs11Signer {
    fn drop(&mut self) {
        self.pool.shutdown();
    }
}

impl Signer for Pkcs11Signer {
    fn algorithm(&self) -> SignatureAlgorithm {
        self.algorithm
    }

    fn public_key(&self) -> &[u8] {
        &self.public_key
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        self.sign_within(message, Duration::MAX)
    }

    fn sign_within(&self, message: &[u8], wait: Duration) -> Result<Vec<u8>, SignError> {
        let digest_alg = self.algorithm.digest();
        let digest = digest_alg
            .digest(message)
            .expect("SHA-2 is computed on the host");
        let scheme = self.pool.scheme();
        // Checked on the host before any token carries it; a module that returns what does
        // not verify is taken out unless a test signature verifies (`Pool::sign_checked`).
        let check = |raw: Vec<u8>| {
            let signature = scheme.output(raw)?;
            key::check(self.algorithm, &self.public_key, message, &signature)?;
            Ok(signature)
        };
        self.pool
            .sign_checked(&scheme.input(digest_alg, &digest), wait, &check)
    }

    fn health(&self) -> Result<(), String> {
        self.pool.health()
    }

    fn stuck(&self) -> bool {
        let bound = self.pool.spec().sign_timeout;
        self.pool.call_running_longer_than(bound).is_some()
    }

    fn needs_restart(&self) -> Option<String> {
        let bound = self.exit_after_hung?;
        let running = self.pool.call_running_longer_than(bound)?;
        Some(format!(
            "a call has been inside the PKCS#11 module {} for {} s (signer.exit_after_hung_ms \
             = {}); a PKCS#11 call cannot be cancelled, and only a new process loads the \
             module anew",
            self.pool.spec().module.display(),
            running.as_secs(),
            bound.as_millis()
        ))
    }

    /// One signature per session: a network HSM's latency is hidden by many sessions.
    fn max_in_flight(&self) -> Option<usize> {
        Some(self.sessions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> anyhow::Result<Pkcs11Config> {
        let text = format!(
            "module = \"/usr/lib/softhsm/libsofthsm2.so\"\ncertificate = \"c.pem\"\n{extra}"
        );
        let config: Pkcs11Config = toml::from_str(&text)?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn settings_are_checked() {
        let ok = parse("token_label = \"t\"\nkey_label = \"k\"\npin_file = \"pin\"\n").unwrap();
        assert_eq!(ok.sessions, 4);
        assert_eq!(ok.sign_timeout_ms, 10_000);
        assert_eq!(ok.exit_after_hung_ms, 60_000);
        assert_eq!(ok.pin_source().unwrap(), PinSource::File("pin".into()));
        let with_id = parse("slot = 3\nkey_id = \"0a:1B\"\npin_env = \"PIN\"\n").unwrap();
        assert_eq!(with_id.key_selector().unwrap().id, Some(vec![0x0a, 0x1b]));

        let err = |extra: &str| parse(extra).unwrap_err().to_string();
        assert!(
            err("token_label = \"t\"\nkey_label = \"k\"\npin = \"1234\"\n")
                .contains("never read from the configuration")
        );
        assert!(err("token_label = \"t\"\nkey_label = \"k\"\n").contains("PIN's source"));
        assert!(
            err("token_label = \"t\"\nkey_label = \"k\"\npin_env = \"A\"\npin_file = \"f\"\n")
                .contains("not several")
        );
        assert!(err("token_label = \"t\"\npin_env = \"A\"\n").contains("key_label"));
        assert!(err("key_label = \"k\"\npin_env = \"A\"\n").contains("token_label or slot"));
        assert!(err("token_label = \"t\"\nkey_id = \"xyz\"\npin_env = \"A\"\n").contains("hex"));
        assert!(
            err("token_label = \"t\"\nkey_label = \"k\"\npin_env = \"A\"\nsessions = 0\n")
                .contains("sessions")
        );
        let hung = |ms: u64| {
            format!("token_label = \"t\"\nkey_label = \"k\"\npin_env = \"A\"\nexit_after_hung_ms = {ms}\n")
        };
        assert!(err(&hung(9_999)).contains("exit_after_hung_ms must be 0 (never) or at least"));
        parse(&hung(0)).expect("0: never");
        parse(&hung(10_000)).expect("as long as sign_timeout_ms");
        assert!(
            err("token_label = \"t\"\nkey_label = \"k\"\npin_env = \"A\"\ntypo = 1\n")
                .contains("unknown field")
        );
    }

    #[test]
    fn two_signers_may_not_set_one_module_variable_differently() {
        let with = |value: &str| {
            parse(&format!(
                "token_label = \"t\"\nkey_label = \"k\"\npin_env = \"P\"\n\
                 module_env = {{ TSA_TEST_MODULE_CONF = \"{value}\" }}\n"
            ))
            .unwrap()
        };
        let (a, b, c) = (with("/a"), with("/a"), with("/b"));
        module_env_conflict(&[("signer", &a), ("rollover.signer", &b)]).unwrap();
        let err = module_env_conflict(&[("signer", &a), ("rollover.signer", &c)]).unwrap_err();
        assert!(
            err.to_string().contains(
                "signer.module_env and rollover.signer.module_env set TSA_TEST_MODULE_CONF"
            ),
            "{err}"
        );
    }

    #[test]
    fn relative_paths_follow_the_configuration_but_bare_module_names_do_not() {
        let mut config =
            parse("token_label = \"t\"\nkey_label = \"k\"\npin_file = \"pin\"\n").unwrap();
        config.module = "libsofthsm2.so".into();
        config.resolve_paths(Path::new("/etc/tsa"));
        assert_eq!(config.module, PathBuf::from("libsofthsm2.so"));
        assert_eq!(config.pin_file, Some(PathBuf::from("/etc/tsa/pin")));
        assert_eq!(config.certificate, PathBuf::from("/etc/tsa/c.pem"));
        config.module = "lib/module.so".into();
        config.resolve_paths(Path::new("/etc/tsa"));
        assert_eq!(config.module, PathBuf::from("/etc/tsa/lib/module.so"));
    }
}
