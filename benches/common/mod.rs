//! What the archive benchmarks share: a real token, and chains of records made from it as the
//! request path hands them to the archive's writer.

use std::process::Command;

use tsa::alg::DigestAlgorithm;
use tsa::archive::record::{ClockAtIssue, Hash, StoredRecord, TokenRecord, ZERO_HASH};
use tsa::archive::serial::layout;
use tsa::client::read::Response;
use tsa::client::Query;
use tsa::config::Config;

const TSA_BIN: &str = env!("CARGO_BIN_EXE_tsa");
pub const INSTANCE: u32 = 1;

/// A granted token's DER from a TSA of a fresh development PKI.
pub fn real_token() -> Vec<u8> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let out = Command::new(TSA_BIN)
        .args(["init", "--algorithm", "p256", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {TSA_BIN}: {e}"));
    assert!(
        out.status.success(),
        "tsa init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = Config::load(&dir.path().join("tsa.toml")).expect("the init configuration");
    let tsa = tsa::server::build(&config).expect("server::build");
    let query = Query::for_data(DigestAlgorithm::Sha256, b"invoice 42").expect("a query");
    let reply = tsa
        .issue(&query.to_der().expect("DER"))
        .expect("the TSA grants the request");
    let response = Response::from_der(&reply).expect("a TimeStampResp");
    response.token.expect("a token").der
}

/// Makes the records of one chain, as the request path hands them to the writer.
pub struct Records {
    token: Vec<u8>,
    counter: u64,
    head: (u64, Hash),
}

impl Records {
    /// A chain of records of `token`, from its first position.
    pub fn new(token: Vec<u8>) -> Self {
        Self {
            token,
            counter: 0,
            head: (0, ZERO_HASH),
        }
    }

    pub fn next_record(&mut self) -> TokenRecord {
        self.counter += 1;
        let n = self.counter;
        let mut imprint = [0u8; 32];
        for (i, b) in imprint.iter_mut().enumerate() {
            // Spread like real imprints, so the imprint index takes random pages.
            *b = (n.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> ((i % 8) * 8)) as u8 ^ i as u8;
        }
        TokenRecord {
            serial: layout::encode(INSTANCE, n, [7; 7]).to_vec(),
            gen_time_ns: 1_795_000_000_000_000_000 + n * 1_000,
            accuracy_ns: 1_000_000,
            imprint_alg: "2.16.840.1.101.3.4.2.1".into(),
            imprint: imprint.to_vec(),
            policy: "1.3.6.1.4.1.32473.3161.1".into(),
            nonce: Some(n.to_be_bytes().to_vec()),
            client: None,
            clock: ClockAtIssue {
                source: "development".into(),
                state: "synchronized".into(),
                bound_ns: 1_000_000,
                sources: String::new(),
            },
            token: self.token.clone(),
        }
    }

    /// The next `n` records, chained after the head.
    pub fn chained(&mut self, n: usize) -> Vec<StoredRecord> {
        self.chained_with(n, |_, _| {})
    }

    /// [`Records::chained`], each record changed by `adjust(counter, record)` before it is
    /// chained.
    pub fn chained_with(
        &mut self,
        n: usize,
        mut adjust: impl FnMut(u64, &mut TokenRecord),
    ) -> Vec<StoredRecord> {
        (0..n)
            .map(|_| {
                let mut record = self.next_record();
                let counter = self.counter;
                adjust(counter, &mut record);
                let stored =
                    StoredRecord::chain(INSTANCE, self.head.0 + 1, counter, record, self.head.1);
                self.head = (stored.seq, stored.hash);
                stored
            })
            .collect()
    }
}
