//! `tsa check`: the configured signer checked as a start checks it, one signature, and with
//! `--signatures` its raw signing rate (what `scripts/load.sh` compares the server's CPU per
//! token with: the signature as the server makes it, through the same library).

use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::Context;
use tsa::config::Config;
use tsa::signer::certificate::TsuCertificate;

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    #[arg(long, short, default_value = "state/tsa.toml")]
    pub config: PathBuf,
    /// Signatures to time after the checks (0: none).
    #[arg(long, default_value_t = 0)]
    pub signatures: usize,
    /// Threads signing at once while timing.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

pub fn run(args: &CheckArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    let signer = tsa::server::open_signer(&config.signer)?;
    let (certificate, chain) = config.signer.certificates();
    let certificate = TsuCertificate::load(certificate, chain)?;
    certificate
        .check(signer.as_ref(), Some(SystemTime::now()))
        .context("the TSU certificate cannot be used")?;
    println!(
        "signer: {} with the certificate of {}, which matches the key, the TSU profile and its \
         chain",
        signer.algorithm().name(),
        certificate.subject()
    );
    signer.sign(b"tsa check")?;
    println!("signature: made");
    if args.signatures > 0 {
        let (total, elapsed) = super::time_signatures(&signer, args.signatures, args.threads)?;
        let per_s = total as f64 / elapsed.as_secs_f64();
        println!(
            "rate: {total} signatures on {} thread(s) in {:.2} s = {per_s:.0}/s = {:.2} µs each",
            args.threads.max(1),
            elapsed.as_secs_f64(),
            1e6 / per_s
        );
    }
    Ok(())
}
