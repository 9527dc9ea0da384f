//! `tsa inspect`: a request, response or token in words, like `openssl ts -text`.

use std::fmt::Write;
use std::path::PathBuf;

use anyhow::Context;
use der::{Decode, Encode};
use tsa::alg::DigestAlgorithm;
use tsa::client::read::{Response, Token};
use tsa::protocol::asn1::{TimeStampReq, TstInfo};
use tsa::protocol::{FailInfo, RequestRules};
use x509_cert::ext::pkix::name::GeneralName;

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// A DER time-stamp request (.tsq), response (.tsr) or token.
    pub file: PathBuf,
}

pub fn run(args: &InspectArgs) -> anyhow::Result<()> {
    let der = std::fs::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let text = if let Ok(response) = Response::from_der(&der) {
        response_text(&response)
    } else if let Ok(req) = TimeStampReq::from_der(&der) {
        request_text(&req)
    } else if let Some(rejection) = tsa::protocol::unknown_oid(&der, &default_rules()) {
        anyhow::bail!(
            "a time-stamp request with an OID past what this TSA reads, which it refuses (with \
             the default settings) with {}: {}",
            rejection.fail_info.name(),
            rejection.reason
        );
    } else {
        let token =
            Token::from_der(&der).context("neither a time-stamp request, response nor token")?;
        token_text(&token)
    };
    print!("{text}");
    Ok(())
}

/// The rules of a TSA with the default configuration.
fn default_rules() -> RequestRules {
    RequestRules {
        accepted_digests: DigestAlgorithm::DEFAULT_ACCEPTED.to_vec(),
        default_policy: tsa::alg::oid::ETSI_BASELINE_POLICY,
        other_policies: Vec::new(),
        max_len: usize::MAX,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn digest_name(oid: &const_oid::ObjectIdentifier) -> String {
    DigestAlgorithm::from_oid(oid)
        .map(|d| d.name().to_string())
        .unwrap_or_else(|| oid.to_string())
}

fn request_text(req: &TimeStampReq<'_>) -> String {
    let mut s = String::from("Time-stamp request\n");
    let _ = writeln!(s, "Version: {}", hex(req.version.as_bytes()));
    let _ = writeln!(
        s,
        "Hash Algorithm: {}",
        digest_name(&req.message_imprint.hash_algorithm.oid)
    );
    let _ = writeln!(
        s,
        "Message data: {}",
        hex(req.message_imprint.hashed_message.as_bytes())
    );
    let _ = writeln!(
        s,
        "Policy OID: {}",
        req.req_policy
            .map(|p| p.to_string())
            .unwrap_or_else(|| "unspecified".into())
    );
    let _ = writeln!(
        s,
        "Nonce: {}",
        req.nonce
            .map(|n| format!("0x{}", hex(n.as_bytes())))
            .unwrap_or_else(|| "unspecified".into())
    );
    let _ = writeln!(
        s,
        "Certificate required: {}",
        if req.cert_req { "yes" } else { "no" }
    );
    let _ = writeln!(
        s,
        "Extensions: {}",
        req.extensions.as_ref().map(|e| e.len()).unwrap_or(0)
    );
    s
}

fn response_text(response: &Response) -> String {
    let mut s = String::from("Status info:\n");
    let status = match response.status {
        0 => "Granted.",
        1 => "Granted with modifications.",
        2 => "Rejected.",
        3 => "Waiting.",
        4 => "Revocation warning.",
        5 => "Revoked.",
        _ => "unknown",
    };
    let _ = writeln!(s, "Status: {status}");
    let text = if response.status_text.is_empty() {
        "unspecified".into()
    } else {
        tsa::client::printable(&response.status_text.join("; "))
    };
    let _ = writeln!(s, "Status description: {text}");
    let fail: Vec<String> = response
        .fail_bits
        .iter()
        .map(|b| {
            FailInfo::from_bit(*b)
                .map(|f| f.name().to_string())
                .unwrap_or_else(|| format!("bit {b}"))
        })
        .collect();
    let _ = writeln!(
        s,
        "Failure info: {}\n",
        if fail.is_empty() {
            "unspecified".into()
        } else {
            fail.join(", ")
        }
    );
    match &response.token {
        Some(token) => s.push_str(&token_text(token)),
        None => s.push_str("TST info: not included\n"),
    }
    s
}

fn token_text(token: &Token) -> String {
    let tst: TstInfo<'_> = token.tst_info();
    let mut s = String::from("TST info:\n");
    let _ = writeln!(s, "Version: {}", tst.version);
    let _ = writeln!(s, "Policy OID: {}", tst.policy);
    let _ = writeln!(
        s,
        "Hash Algorithm: {}",
        digest_name(&tst.message_imprint.hash_algorithm.oid)
    );
    let _ = writeln!(
        s,
        "Message data: {}",
        hex(tst.message_imprint.hashed_message.as_bytes())
    );
    let _ = writeln!(s, "Serial number: 0x{}", hex(tst.serial_number.as_bytes()));
    let _ = writeln!(
        s,
        "Time stamp: {} ({})",
        tst.gen_time,
        tst.gen_time
            .to_datetime()
            .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
    );
    let accuracy = tst.accuracy.map(|a| {
        format!(
            "{} seconds, {} millis, {} micros",
            a.seconds.unwrap_or(0),
            a.millis.unwrap_or(0),
            a.micros.unwrap_or(0)
        )
    });
    let _ = writeln!(
        s,
        "Accuracy: {}",
        accuracy.unwrap_or_else(|| "unspecified".into())
    );
    let _ = writeln!(s, "Ordering: {}", if tst.ordering { "yes" } else { "no" });
    let _ = writeln!(
        s,
        "Nonce: {}",
        tst.nonce
            .map(|n| format!("0x{}", hex(n.as_bytes())))
            .unwrap_or_else(|| "unspecified".into())
    );
    let tsa = tst
        .tsa
        .and_then(|any| any.to_der().ok())
        .and_then(|d| GeneralName::from_der(&d).ok())
        .map(|n| match n {
            GeneralName::DirectoryName(name) => format!("DirName:{name}"),
            other => format!("{other:?}"),
        });
    let _ = writeln!(s, "TSA: {}", tsa.unwrap_or_else(|| "unspecified".into()));
    let _ = writeln!(
        s,
        "Extensions: {}",
        tst.extensions.as_ref().map(|e| e.len()).unwrap_or(0)
    );
    if let Some(si) = tsa::client::verify::signer_info(token) {
        let _ = writeln!(s, "\nSigner:");
        let _ = writeln!(s, "Digest algorithm: {}", digest_name(&si.digest_alg.oid));
        let _ = writeln!(s, "Signature algorithm: {}", si.signature_algorithm.oid);
        let attrs: Vec<String> = si
            .signed_attrs
            .iter()
            .flat_map(|set| set.iter())
            .map(|a| a.oid.to_string())
            .collect();
        let _ = writeln!(s, "Signed attributes: {}", attrs.join(", "));
    }
    let certs = token
        .signed_data
        .certificates
        .as_ref()
        .map(|c| c.0.len())
        .unwrap_or(0);
    let _ = writeln!(s, "Certificates included: {certs}");
    s
}
