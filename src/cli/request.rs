//! `tsa request`: hash a file (or take a digest), ask a TSA, save the reply.

use std::path::PathBuf;

use anyhow::{bail, Context};
use const_oid::ObjectIdentifier;
use tsa::alg::DigestAlgorithm;
use tsa::client::{self, read::Response, Query};

#[derive(Debug, clap::Args)]
pub struct RequestArgs {
    /// The TSA's URL.
    #[arg(long, default_value = "http://127.0.0.1:3180/")]
    pub url: String,
    /// The file to stamp.
    #[arg(long, conflicts_with = "digest", required_unless_present = "digest")]
    pub data: Option<PathBuf>,
    /// The digest to stamp, in hex.
    #[arg(long)]
    pub digest: Option<String>,
    /// The imprint algorithm (sha256, sha384, sha512, sha3-256, …).
    #[arg(long, default_value = "sha256")]
    pub hash: String,
    /// Ask for this policy.
    #[arg(long)]
    pub policy: Option<String>,
    /// Send no nonce.
    #[arg(long)]
    pub no_nonce: bool,
    /// Do not ask for the TSA's certificate in the token.
    #[arg(long)]
    pub no_cert: bool,
    /// Where to save the reply.
    #[arg(long, short, default_value = "reply.tsr")]
    pub out: PathBuf,
    /// Also save the request (for `tsa verify --query` or `openssl ts -verify -queryfile`).
    #[arg(long)]
    pub query_out: Option<PathBuf>,
}

pub fn run(args: &RequestArgs) -> anyhow::Result<()> {
    let digest = DigestAlgorithm::from_name(&args.hash)
        .with_context(|| format!("unknown hash '{}'", args.hash))?;
    let mut query = match (&args.data, &args.digest) {
        (Some(path), _) => {
            let data =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            Query::for_data(digest, &data)?
        }
        (None, Some(hex)) => {
            let hashed_message = super::hex_decode(hex)?;
            if hashed_message.len() != digest.output_len() {
                bail!(
                    "a {} digest is {} octets, this one {}",
                    digest.name(),
                    digest.output_len(),
                    hashed_message.len()
                );
            }
            Query {
                digest,
                hashed_message,
                policy: None,
                nonce: Some(client::random_nonce()?),
                cert_req: true,
            }
        }
        (None, None) => bail!("give --data or --digest"),
    };
    if args.no_nonce {
        query.nonce = None;
    }
    query.cert_req = !args.no_cert;
    query.policy = args
        .policy
        .as_deref()
        .map(|p| ObjectIdentifier::new(p).with_context(|| format!("'{p}' is not an OID")))
        .transpose()?;
    let der = query.to_der()?;
    if let Some(path) = &args.query_out {
        std::fs::write(path, &der).with_context(|| format!("cannot write {}", path.display()))?;
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let reply = runtime.block_on(client::post(&args.url, der))?;
    std::fs::write(&args.out, &reply)
        .with_context(|| format!("cannot write {}", args.out.display()))?;

    let response = Response::from_der(&reply)?;
    if let Some(token) = &response.token {
        let tst = token.tst_info();
        println!(
            "granted: genTime {} serial {}; saved to {}",
            tst.gen_time,
            tst.serial_number
                .as_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>(),
            args.out.display()
        );
        Ok(())
    } else {
        bail!(
            "rejected: {} ({})",
            response
                .fail_info()
                .map(|f| f.name())
                .unwrap_or("unspecified"),
            response.status_text.join("; ")
        )
    }
}
