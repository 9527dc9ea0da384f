//! RFC 3161 without I/O: DER request in, DER response out.
//!
//! Nothing here reads a clock, a key or a socket. The issuing path is split so that the caller
//! decides where each step runs:
//!
//! 1. [`parse_request`] checks a `TimeStampReq` and yields a [`Request`] or a [`Rejection`]
//!    that already carries its failInfo;
//! 2. [`TokenTemplate::to_be_signed`] builds the TSTInfo from the request and a [`Stamp`]
//!    (time, accuracy, serial: values the caller read) and the signed attributes over it;
//! 3. the caller signs [`ToBeSigned::message`];
//! 4. [`TokenTemplate::assemble`] wraps TSTInfo, attributes and signature into a granted
//!    `TimeStampResp`, around constant DER that the template encoded once.
//!
//! Every failure is a `TimeStampResp` too: [`Rejection::to_der`]. [`batch`] frames many
//! requests (and their responses) in one `SEQUENCE OF`.

pub mod asn1;
pub mod batch;
mod gentime;
mod request;
mod response;
mod tlv;
mod token;

pub use asn1::Accuracy;
pub use gentime::{GenTime, Precision};
pub use request::{parse_request, unknown_oid, Request, RequestRules};
pub use response::{FailInfo, PkiStatus, Rejection};
pub use token::{Serial, Stamp, TemplateOptions, ToBeSigned, TokenTemplate};
