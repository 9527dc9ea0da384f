//! Raw HTTP/1.1 over `std::net::TcpStream` ([`http1`]), for tests that need control
//! over the bytes on the wire (keep-alive, slow clients, pipelining), and the checks on what
//! comes back.
#![allow(dead_code)]

#[path = "http1.rs"]
mod http1;
pub use http1::*;

use tsa::alg::DigestAlgorithm;
use tsa::client::read::Response;
use tsa::client::Query;
use tsa::protocol::FailInfo;

use crate::common::Server;

/// A fresh query for `data`, made with the crate's client (SHA-256, 64-bit nonce, certReq).
pub fn query_for(data: &[u8]) -> Query {
    Query::for_data(DigestAlgorithm::Sha256, data).unwrap()
}

pub fn decode(reply: &Reply) -> Response {
    assert_eq!(reply.header("content-type"), Some(REPLY_TYPE));
    Response::from_der(&reply.body).expect("a DER TimeStampResp")
}

pub fn assert_rejection(reply: &Reply, expected: FailInfo) {
    let response = decode(reply);
    assert_eq!(response.status, 2);
    assert_eq!(response.fail_info(), Some(expected), "{reply:?}");
    assert!(response.token.is_none());
    assert!(!response.status_text.is_empty());
}

/// A stamp path that still works: the unchanged query is granted.
pub fn assert_serves(server: &Server) {
    let (_, path) = split_url(&server.url);
    let reply = Conn::open(&server.url).post(&path, &query_for(b"control").to_der().unwrap());
    assert_eq!(reply.status, 200);
    assert!(decode(&reply).granted());
}
