//! Signing keys behind one trait.
//!
//! A [`Signer`] signs the DER of a token's signed attributes, hashing them itself with its
//! algorithm's digest (on the host for HSM keys). It may fail (an HSM goes away) and may be
//! slow, so the server never calls it on an async worker. [`certificate`] holds the TSU
//! certificate and refuses one that does not fit the key or the ETSI EN 319 422 profile.

pub mod certificate;
pub mod pkcs11;
pub mod software;

use crate::alg::SignatureAlgorithm;

/// Why a signature could not be made. The client gets `systemFailure` either way.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The key cannot be reached now (an HSM session lost); it may come back.
    #[error("signing key unavailable: {0}")]
    Unavailable(String),
    /// The signature operation failed.
    #[error("signing failed: {0}")]
    Failed(String),
    /// The signature could not begin within the time it was given (every HSM session busy):
    /// it would have come too late for the token's declared accuracy.
    #[error("no signature within {0:?}: every session stayed busy")]
    Late(std::time::Duration),
}

pub trait Signer: Send + Sync + 'static {
    fn algorithm(&self) -> SignatureAlgorithm;

    /// The key's `subjectPublicKey` as a certificate carries it: the uncompressed point for EC,
    /// the DER `RSAPublicKey` for RSA.
    fn public_key(&self) -> &[u8];

    /// Signs `message` (hashing it with [`SignatureAlgorithm::digest`]) and returns the
    /// signature as CMS carries it: DER `ECDSA-Sig-Value` for ECDSA, the raw octets for RSA.
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError>;

    /// [`Signer::sign`], given up with [`SignError::Late`] where the signature cannot begin
    /// within `wait` (a signer that waits for a session of its own; the others sign at once).
    fn sign_within(&self, message: &[u8], wait: std::time::Duration) -> Result<Vec<u8>, SignError> {
        let _ = wait;
        self.sign(message)
    }

    /// Whether the key can sign now (an HSM signer is down while its token or session is lost
    /// and recovering). Readiness reports it.
    fn health(&self) -> Result<(), String> {
        Ok(())
    }

    /// Why only a new process can make this signer sign again, if so: a call inside an HSM
    /// module that has not returned for the signer's `exit_after_hung_ms` (a PKCS#11 call
    /// cannot be cancelled). The server then stops and exits for its service manager to start
    /// it anew (`tsa serve`, exit status 75).
    fn needs_restart(&self) -> Option<String> {
        None
    }

    /// Whether a call has been inside the signer longer than its bound for an answer (an
    /// HSM's `sign_timeout_ms`): a thread is inside a module that does not answer, and the
    /// process must not wait for it, nor run the module's exit handlers under it.
    fn stuck(&self) -> bool {
        false
    }

    /// Whether a signature can take long enough (an HSM round trip, an RSA private-key
    /// operation: hundreds of microseconds and more) that it must not run on an async worker.
    /// The server then issues on the blocking pool, a bounded number at a time; a fast signer
    /// (ECDSA in software, tens of microseconds) signs in place and saves the two thread
    /// hand-offs.
    fn may_block(&self) -> bool {
        true
    }

    /// How many signatures can usefully be in flight at once (an HSM's session pool); `None`
    /// for as many as there are cores. Bounds the server's blocking lane.
    fn max_in_flight(&self) -> Option<usize> {
        None
    }
}
