pub mod alg;
pub mod archive;
pub mod clock;
pub mod protocol;
pub mod signer;
