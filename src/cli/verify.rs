//! `tsa verify`: check a token against data (or a digest), a request and a CA.

use std::path::PathBuf;

use anyhow::{bail, Context};
use tsa::client::read::{Response, Token};
use tsa::client::verify::{verify, Expectation, ValidAt};
use x509_cert::Certificate;

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The time-stamp response (.tsr) or a bare token (--token).
    #[arg(long = "in")]
    pub input: PathBuf,
    /// The input is a bare token (ContentInfo), not a TimeStampResp.
    #[arg(long)]
    pub token: bool,
    /// The data that was stamped.
    #[arg(long, conflicts_with = "digest")]
    pub data: Option<PathBuf>,
    /// The digest that was stamped, in hex.
    #[arg(long)]
    pub digest: Option<String>,
    /// The request: its nonce, policy and certReq are checked too.
    #[arg(long)]
    pub query: Option<PathBuf>,
    /// Trusted CA certificates (PEM).
    #[arg(long = "ca", required = true)]
    pub ca: Vec<PathBuf>,
    /// Further certificates (PEM), for a token issued without its certificate.
    #[arg(long)]
    pub untrusted: Vec<PathBuf>,
    /// CRLs (PEM or DER), one per issuer, each current now (before its nextUpdate, whatever
    /// --at says): the signer's certificate must have its status in one of them and not be
    /// revoked, and no CA certificate on its path may be revoked by one of them. Without any,
    /// revocation is not checked.
    #[arg(long)]
    pub crl: Vec<PathBuf>,
    /// When the signer's certificate path must be valid: "now" (as `openssl ts -verify`
    /// checks), "gen-time" (the token's own genTime, for a token whose certificate has expired
    /// since: this takes the token's word for its time, and CRLs no longer list expired
    /// certificates), or an RFC 3339 time.
    #[arg(long, default_value = "now", value_parser = parse_at)]
    pub at: ValidAt,
}

fn parse_at(text: &str) -> Result<ValidAt, String> {
    match text {
        "now" => Ok(ValidAt::Now),
        "gen-time" => Ok(ValidAt::GenTime),
        _ => chrono::DateTime::parse_from_rfc3339(text)
            .map(|t| ValidAt::Time(t.into()))
            .map_err(|e| format!("not \"now\", \"gen-time\" or an RFC 3339 time: {e}")),
    }
}

pub fn run(args: &VerifyArgs) -> anyhow::Result<()> {
    let input = std::fs::read(&args.input)
        .with_context(|| format!("cannot read {}", args.input.display()))?;
    let token = if args.token {
        Token::from_der(&input)?
    } else {
        let response = Response::from_der(&input)?;
        match response.token {
            Some(token) => token,
            None => bail!(
                "the response is a rejection: {} ({})",
                response
                    .fail_info()
                    .map(|f| f.name())
                    .unwrap_or("unspecified"),
                tsa::client::printable(&response.status_text.join("; "))
            ),
        }
    };
    let data = args
        .data
        .as_ref()
        .map(std::fs::read)
        .transpose()
        .context("cannot read the data")?;
    let digest = args.digest.as_deref().map(super::hex_decode).transpose()?;
    let query = args
        .query
        .as_ref()
        .map(std::fs::read)
        .transpose()
        .context("cannot read the query")?;
    let expect = Expectation {
        data: data.as_deref(),
        digest: digest.as_deref(),
        query: query.as_deref(),
        trusted: load_all(&args.ca)?,
        untrusted: load_all(&args.untrusted)?,
        crls: load_crls(&args.crl)?,
        at: args.at,
    };
    let verified = verify(&token, &expect)?;
    println!(
        "Verification: OK\n  genTime  {}\n  accuracy {}\n  serial   {}\n  policy   {}\n  signer   {}",
        verified.gen_time,
        verified.accuracy_ns.map(tsa::clock::fmt_ns).unwrap_or_else(|| "unspecified".into()),
        verified.serial_hex,
        verified.policy,
        verified.signer
    );
    Ok(())
}

/// CRLs from files of PEM `X509 CRL` blocks or of one DER CRL.
fn load_crls(paths: &[PathBuf]) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut crls = Vec::new();
    for path in paths {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        if bytes.first() == Some(&0x30) {
            crls.push(bytes);
        } else {
            let pem = tsa::pem::crls(path)?;
            if pem.is_empty() {
                bail!("{} holds no CRL", path.display());
            }
            crls.extend(pem.into_iter().map(|c| c.to_vec()));
        }
    }
    Ok(crls)
}

pub(super) fn load_all(paths: &[PathBuf]) -> anyhow::Result<Vec<Certificate>> {
    let mut certs = Vec::new();
    for path in paths {
        let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let loaded = Certificate::load_pem_chain(&pem)
            .with_context(|| format!("{} is not PEM certificates", path.display()))?;
        // An empty file (a download that failed) would otherwise turn a check off.
        if loaded.is_empty() {
            bail!("{} holds no certificate", path.display());
        }
        certs.extend(loaded);
    }
    Ok(certs)
}
