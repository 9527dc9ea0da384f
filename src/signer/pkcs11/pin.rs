//! Where the user PIN comes from: a file, an environment variable or a systemd credential,
//! never the configuration file. It is read again at every login (start-up and recoveries), held
//! in zeroizing buffers while it is read and as cryptoki's `AuthPin` (a `secrecy::SecretString`)
//! while it is used, and wiped when the login returns. It is never logged or printed.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

/// The longest PIN accepted (PKCS#11 tokens take far shorter ones).
const MAX_PIN: usize = 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinSource {
    /// A file holding the PIN (a trailing newline is ignored). Others (neither the owner nor
    /// the group) must have no access to it; the group's bits are not checked, so that a
    /// service's group may read it (0640).
    File(PathBuf),
    /// An environment variable.
    Env(String),
    /// A systemd credential: `$CREDENTIALS_DIRECTORY/<name>` (`LoadCredential=`,
    /// `LoadCredentialEncrypted=` or `SetCredentialEncrypted=` in the unit).
    Credential(String),
}

impl std::fmt::Display for PinSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(path) => write!(f, "the PIN file {}", path.display()),
            Self::Env(name) => write!(f, "the environment variable {name}"),
            Self::Credential(name) => write!(f, "the systemd credential '{name}'"),
        }
    }
}

impl PinSource {
    /// Reads the PIN. The caller drops the returned `AuthPin` right after `C_Login`.
    pub fn read(&self) -> anyhow::Result<AuthPin> {
        match self {
            Self::File(path) => read_pin_file(path, true),
            Self::Credential(name) => {
                if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                    bail!("'{name}' is not a systemd credential name");
                }
                let dir = std::env::var_os("CREDENTIALS_DIRECTORY").with_context(|| {
                    format!(
                        "the PIN is the systemd credential '{name}', but CREDENTIALS_DIRECTORY is \
                         not set (LoadCredential={name}:… in the unit)"
                    )
                })?;
                // systemd makes the directory private to the service; the file's own mode is
                // systemd's business.
                read_pin_file(&Path::new(&dir).join(name), false)
            }
            Self::Env(name) => {
                let value = Zeroizing::new(std::env::var(name).map_err(|e| match e {
                    std::env::VarError::NotPresent => {
                        anyhow::anyhow!("the PIN's environment variable {name} is not set")
                    }
                    std::env::VarError::NotUnicode(_) => {
                        anyhow::anyhow!("the PIN's environment variable {name} is not UTF-8")
                    }
                })?);
                to_pin(value.as_bytes(), self)
            }
        }
    }
}

fn read_pin_file(path: &Path, check_mode: bool) -> anyhow::Result<AuthPin> {
    let source = PinSource::File(path.to_path_buf());
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {source}"))?;
    if check_mode {
        crate::files::ensure_private(&file, &source)?;
    }
    // One fixed buffer, so that no reallocation leaves a copy of the PIN behind.
    let mut buf = Zeroizing::new([0u8; MAX_PIN + 1]);
    let mut len = 0;
    loop {
        let n = file
            .read(&mut buf[len..])
            .with_context(|| format!("cannot read {source}"))?;
        if n == 0 {
            break;
        }
        len += n;
        if len > MAX_PIN {
            bail!("{source} is longer than {MAX_PIN} octets; it should hold the PIN only");
        }
    }
    to_pin(&buf[..len], &source)
}

/// Strips one trailing newline (`\n` or `\r\n`) and wraps the PIN.
fn to_pin(bytes: &[u8], source: &PinSource) -> anyhow::Result<AuthPin> {
    let bytes = bytes
        .strip_suffix(b"\n")
        .map(|b| b.strip_suffix(b"\r").unwrap_or(b))
        .unwrap_or(bytes);
    if bytes.is_empty() {
        bail!("{source} is empty");
    }
    let text = std::str::from_utf8(bytes).with_context(|| format!("{source} is not UTF-8"))?;
    // `From<&str>` copies into a box of the exact size, which the secret zeroizes on drop.
    Ok(AuthPin::from(text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_pin_file_loses_one_newline_and_must_not_be_world_readable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        std::fs::write(&path, "12 34\r\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let pin = PinSource::File(path.clone()).read().unwrap();
        assert_eq!(pin.expose_secret(), "12 34");

        for refused in [0o644, 0o602, 0o601] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(refused)).unwrap();
            let err = PinSource::File(path.clone()).read().unwrap_err();
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "\n").unwrap();
        assert!(PinSource::File(path).read().is_err());
    }

    #[test]
    fn credentials_and_environment_variables() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tsa-pin"), "9876\n").unwrap();
        // Names of this test only: the environment is shared by the test threads.
        std::env::set_var("TSA_TEST_PIN_SOURCE_ENV", "5555");
        let pin = PinSource::Env("TSA_TEST_PIN_SOURCE_ENV".into())
            .read()
            .unwrap();
        assert_eq!(pin.expose_secret(), "5555");
        assert!(PinSource::Env("TSA_TEST_PIN_SOURCE_UNSET".into())
            .read()
            .is_err());
        assert!(PinSource::Credential("../etc/passwd".into())
            .read()
            .is_err());
        // CREDENTIALS_DIRECTORY itself is not set in tests (and setting it here would race
        // with other tests); the file path logic is the PIN file's.
        if std::env::var_os("CREDENTIALS_DIRECTORY").is_none() {
            let err = PinSource::Credential("tsa-pin".into()).read().unwrap_err();
            assert!(err.to_string().contains("CREDENTIALS_DIRECTORY"), "{err}");
        }
        let pin = read_pin_file(&dir.path().join("tsa-pin"), false).unwrap();
        assert_eq!(pin.expose_secret(), "9876");
    }
}
