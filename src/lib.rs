//! An RFC 3161 Time-Stamp Authority.
//!
//! Modules, from the bottom up (arrows only point down; see `docs/architecture.md`):
//! - [`alg`]: digest and signature algorithms and their identifiers;
//! - [`protocol`]: RFC 3161 / RFC 5652 without I/O;
//! - [`clock`]: what time it is and how sure we are, and the issuing gate;
//! - [`signer`]: one trait for signing keys: software (aws-lc-rs) and PKCS#11 (cryptoki);
//! - [`archive`]: structured serial numbers and the durable, hash-chained token record;
//! - [`server`]: HTTP listeners and the request path that composes the others.

pub mod alg;
pub mod archive;
pub mod client;
pub mod clock;
pub mod config;
pub mod files;
mod log_limit;
pub mod pem;
pub mod pki;
pub mod protocol;
pub mod server;
pub mod signer;
