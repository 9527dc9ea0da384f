//! `tsa request`: hash a file (or take a digest), ask a TSA, save the reply; or, with
//! `--batch`, many files and digests in one round trip (`docs/batch.md`).

use std::collections::HashSet;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use const_oid::ObjectIdentifier;
use tsa::alg::DigestAlgorithm;
use tsa::client::verify::{answers_query, verify, Expectation, ValidAt};
use tsa::client::{self, read::Response, Query};

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Batch mode (--batch) stamps many files and digests in one HTTP round trip (docs/batch.md):

  tsa request --batch --url URL invoice-1.xml invoice-2.xml …   # replies invoice-1.xml.tsr, …
  tsa request --batch --digests list.txt --out-dir replies/    # replies replies/<hex>.tsr

Each item is its own RFC 3161 request (its own nonce) and gets its own token. Every reply is
checked against its own request (imprint, nonce, policy, certReq), and with --ca verified
in full (in both modes; a reply that does not answer its request is not saved). The command
fails when any item was not granted; the others are still saved.

Credentials and HTTPS (both modes):

  tsa request --url https://tsa.example/ --cacert ca.pem --api-key-file alice.key --data f
  tsa request --url https://127.0.0.1:3443/ --cacert ca-cert.pem \\
      --cert client-cert.pem --key client-key.pem --data f          # mutual TLS

The API key is sent as 'Authorization: Bearer'; it comes from --api-key-file or TSA_API_KEY,
never from the command line (where every user could read it in the process list), and is
not sent over plain http:// except to a loopback address.")]
pub struct RequestArgs {
    /// The TSA's URL: http:// or https:// (with --cacert).
    #[arg(long, default_value = "http://127.0.0.1:3180/")]
    pub url: String,
    /// The file to stamp.
    #[arg(
        long,
        conflicts_with = "digest",
        required_unless_present_any = ["digest", "batch"]
    )]
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
    /// Replace reply (and request) files that are there already. Without it a stamp whose
    /// reply file exists is not asked for: that file may hold an earlier token, the proof of
    /// an earlier time. A rejection never replaces a file.
    #[arg(long)]
    pub force: bool,

    /// A file holding the API key to send (as 'Authorization: Bearer'; surrounding whitespace
    /// is ignored). Without it, the key in the environment variable TSA_API_KEY, if set.
    #[arg(long, value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Send the API key over plain http:// to a host other than loopback too (anyone on the
    /// way can read it there).
    #[arg(long)]
    pub allow_insecure_key: bool,
    /// Give up on an exchange (connect, TLS, request and whole reply; one batch round trip)
    /// after this many seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout_s: u64,
    /// https://: the CA certificates (PEM) that the TSA's server certificate must chain to;
    /// required for https:// (no system roots are used).
    #[arg(long, value_name = "PEM")]
    pub cacert: Option<PathBuf>,
    /// https://: a client certificate (PEM, with its chain) for mutual TLS; with --key.
    #[arg(long, value_name = "PEM", requires = "key")]
    pub cert: Option<PathBuf>,
    /// https://: the client certificate's private key (PEM); with --cert.
    #[arg(long, value_name = "PEM", requires = "cert")]
    pub key: Option<PathBuf>,

    /// Batch mode: stamp every FILE and every digest of --digests in one round trip (per
    /// --batch-size items).
    #[arg(long, conflicts_with_all = ["data", "digest", "query_out"])]
    pub batch: bool,
    /// Batch mode: the files to stamp; FILE's reply is saved as FILE.tsr (or in --out-dir).
    #[arg(value_name = "FILE", requires = "batch")]
    pub files: Vec<PathBuf>,
    /// Batch mode: a file of hex digests, one per line (blank lines and '#' comments
    /// skipped; '-' reads standard input); each reply is saved as <out-dir>/<digest>.tsr.
    #[arg(long, value_name = "LIST", requires = "batch")]
    pub digests: Option<PathBuf>,
    /// Batch mode: where to save the replies (default: beside each file; the current
    /// directory for digests).
    #[arg(long, requires = "batch")]
    pub out_dir: Option<PathBuf>,
    /// Batch mode: also save each request beside its reply, as .tsq.
    #[arg(long, requires = "batch")]
    pub save_queries: bool,
    /// Batch mode: leave out the items whose reply file is there (the rest of a run that
    /// stopped or failed in part), rather than refuse to start.
    #[arg(long, requires = "batch", conflicts_with = "force")]
    pub skip_existing: bool,
    /// Batch mode: the most requests sent in one round trip (the TSA's
    /// server.max_batch_items); more are sent in several batches.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..), requires = "batch")]
    pub batch_size: u32,
    /// Verify each token in full against these trusted CA certificates (PEM); without them a
    /// reply is checked against its request only. The token must carry its certificate, so not
    /// with --no-cert (verify such a token later: tsa verify --untrusted tsa-cert.pem).
    #[arg(long, value_name = "PEM", conflicts_with = "no_cert")]
    pub ca: Vec<PathBuf>,
}

pub fn run(args: &RequestArgs) -> anyhow::Result<()> {
    if args.batch {
        return run_batch(args);
    }
    let endpoint = endpoint(args)?;
    let digest = digest_algorithm(args)?;
    let mut query = match (&args.data, &args.digest) {
        (Some(path), _) => {
            let data =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            Query::for_data(digest, &data)?
        }
        (None, Some(hex)) => digest_query(digest, hex)?,
        (None, None) => bail!("give --data or --digest"),
    };
    apply_options(args, &mut query)?;
    let der = query.to_der()?;
    let outputs = [Some(args.out.as_path()), args.query_out.as_deref()];
    refuse_overwriting_inputs(args.data.as_deref(), outputs.into_iter().flatten())?;
    refuse_replacing(outputs.into_iter().flatten(), args.force)?;
    let trusted = super::verify::load_all(&args.ca)?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let reply = runtime.block_on(client::post(&endpoint, der.clone()))?;
    let item = Item {
        label: args.out.display().to_string(),
        query,
        der,
        reply: args.out.clone(),
    };
    save_reply(&item, &reply, false, args.force, &trusted)?;
    // Beside the reply it answers, once that is saved: a refused or failed exchange leaves
    // an earlier pair (--force) as it was.
    if let Some(path) = &args.query_out {
        write(path, &item.der, args.force)?;
    }
    let response = Response::from_der(&reply)?;
    let token = response.token.as_ref().expect("a granted reply was saved");
    let tst = token.tst_info();
    println!(
        "granted: genTime {} serial {}; {}saved to {}",
        tst.gen_time,
        hex(tst.serial_number.as_bytes()),
        if trusted.is_empty() { "" } else { "verified, " },
        args.out.display()
    );
    Ok(())
}

/// The URL with its credentials and TLS settings, checked before anything is sent.
fn endpoint(args: &RequestArgs) -> anyhow::Result<client::Endpoint> {
    let options = client::Options {
        api_key: client::transport::api_key(args.api_key_file.as_deref())?,
        allow_insecure_key: args.allow_insecure_key,
        ca_certs: args.cacert.clone(),
        client_cert: args.cert.clone().zip(args.key.clone()),
        timeout: Some(std::time::Duration::from_secs(args.timeout_s)),
    };
    client::Endpoint::new(&args.url, &options)
}

fn digest_algorithm(args: &RequestArgs) -> anyhow::Result<DigestAlgorithm> {
    let digest = DigestAlgorithm::from_name(&args.hash)
        .with_context(|| format!("unknown hash '{}'", args.hash))?;
    // Its token would prove nothing about one document, and every verifier refuses it.
    if digest.is_broken() {
        bail!(
            "{} is broken (collisions): stamp a SHA-2 or SHA-3 digest",
            digest.name()
        );
    }
    Ok(digest)
}

/// A query for a digest given in hex, with a fresh nonce, asking for the certificate.
fn digest_query(digest: DigestAlgorithm, hex: &str) -> anyhow::Result<Query> {
    let hashed_message = super::hex_decode(hex)?;
    if hashed_message.len() != digest.output_len() {
        bail!(
            "a {} digest is {} octets, this one {}",
            digest.name(),
            digest.output_len(),
            hashed_message.len()
        );
    }
    Ok(Query {
        digest,
        hashed_message,
        policy: None,
        nonce: Some(client::random_nonce()?),
        cert_req: true,
    })
}

/// --no-nonce, --no-cert and --policy.
fn apply_options(args: &RequestArgs, query: &mut Query) -> anyhow::Result<()> {
    if args.no_nonce {
        query.nonce = None;
    }
    query.cert_req = !args.no_cert;
    query.policy = args
        .policy
        .as_deref()
        .map(|p| ObjectIdentifier::new(p).with_context(|| format!("'{p}' is not an OID")))
        .transpose()?;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A rejection's failInfo and statusString, the server's text with its control characters
/// escaped (it must not move the terminal's cursor or forge lines).
fn rejection_text(response: &Response) -> String {
    format!(
        "{} ({})",
        response
            .fail_info()
            .map(|f| f.name())
            .unwrap_or("unspecified"),
        client::printable(&response.status_text.join("; "))
    )
}

/// One item of a batch: what it stamps, its request and where its reply goes.
struct Item {
    /// The file, or the digest in hex.
    label: String,
    query: Query,
    der: Vec<u8>,
    reply: PathBuf,
}

fn run_batch(args: &RequestArgs) -> anyhow::Result<()> {
    let endpoint = endpoint(args)?;
    let digest = digest_algorithm(args)?;
    let mut items = Vec::new();
    for path in &args.files {
        let data =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let name = path
            .file_name()
            .with_context(|| format!("{} names no file", path.display()))?;
        let mut reply_name = name.to_os_string();
        reply_name.push(".tsr");
        let reply = match &args.out_dir {
            Some(dir) => dir.join(reply_name),
            None => path.with_file_name(reply_name),
        };
        let query = Query::for_data(digest, &data)?;
        items.push((path.display().to_string(), query, reply));
    }
    if let Some(list) = &args.digests {
        let dir = args.out_dir.clone().unwrap_or_else(|| PathBuf::from("."));
        for (number, line) in read_list(list)?.into_iter().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let query = digest_query(digest, line)
                .with_context(|| format!("{} line {}", list.display(), number + 1))?;
            let name = hex(&query.hashed_message);
            items.push((name.clone(), query, dir.join(format!("{name}.tsr"))));
        }
    }
    if items.is_empty() {
        bail!("--batch needs files to stamp or --digests with at least one digest");
    }
    let mut replies = HashSet::new();
    let items = items
        .into_iter()
        .map(|(label, mut query, reply)| {
            if !replies.insert(reply.clone()) {
                bail!(
                    "{label}: its reply {} would overwrite another item's (stamped twice?)",
                    reply.display()
                );
            }
            apply_options(args, &mut query)?;
            let der = query.to_der()?;
            Ok(Item {
                label,
                query,
                der,
                reply,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let listed = items.len();
    let trusted = super::verify::load_all(&args.ca)?;
    // --skip-existing: an item whose reply file holds its token is left out; one whose file
    // holds a rejection is asked again, and that file (and its .tsq) replaced.
    let mut again = HashSet::new();
    let items: Vec<Item> = match args.skip_existing {
        true => items
            .into_iter()
            .filter(|item| match Saved::of(item, &trusted) {
                Saved::Token => false,
                Saved::Rejection => {
                    again.insert(item.reply.clone());
                    again.insert(item.reply.with_extension("tsq"));
                    true
                }
                Saved::Nothing | Saved::Other => true,
            })
            .collect(),
        false => items,
    };
    if listed > items.len() {
        eprintln!(
            "{} of {listed} items left out: their replies hold their tokens (--skip-existing)",
            listed - items.len()
        );
    }
    if items.is_empty() {
        println!("nothing to stamp: every reply holds its token");
        return Ok(());
    }
    let tsq = |item: &Item| item.reply.with_extension("tsq");
    let queries: Vec<PathBuf> = match args.save_queries {
        true => items.iter().map(tsq).collect(),
        false => Vec::new(),
    };
    let lists = args
        .digests
        .iter()
        .filter(|l| l.as_path() != Path::new("-"));
    let outputs = || {
        items
            .iter()
            .map(|i| i.reply.as_path())
            .chain(queries.iter().map(PathBuf::as_path))
    };
    refuse_overwriting_inputs(
        args.files.iter().chain(lists).map(PathBuf::as_path),
        outputs(),
    )?;
    refuse_replacing(outputs().filter(|p| !again.contains(*p)), args.force)?;
    if let Some(dir) = &args.out_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut granted, mut failed, mut failed_in_a_row) = (0usize, 0usize, 0);
    for (sent, chunk) in items.chunks(args.batch_size as usize).enumerate() {
        // Round trips that all fail (refused credentials, a TSA that is down) are not
        // repeated for every chunk of a long list.
        if failed_in_a_row == GIVE_UP_AFTER {
            let left = items.len() - sent * args.batch_size as usize;
            failed += left;
            eprintln!("{left} items not sent: {GIVE_UP_AFTER} round trips in a row failed");
            break;
        }
        let requests: Vec<Vec<u8>> = chunk.iter().map(|item| item.der.clone()).collect();
        // A batch refused or lost as a whole fails its items; the next batches are still
        // sent (the replies saved meanwhile let a later run with --skip-existing finish).
        let replies = match runtime.block_on(client::post_batch(&endpoint, &requests)) {
            Ok(replies) => {
                failed_in_a_row = 0;
                replies
            }
            Err(e) => {
                failed_in_a_row += 1;
                failed += chunk.len();
                let (first, last) = (&chunk[0].label, &chunk[chunk.len() - 1].label);
                match chunk.len() {
                    1 => eprintln!("{}: {e:#}", client::printable(first)),
                    n => eprintln!(
                        "{} … {} ({n} items): {e:#}",
                        client::printable(first),
                        client::printable(last)
                    ),
                }
                continue;
            }
        };
        for (item, reply) in chunk.iter().zip(replies) {
            // What is there is replaced only with --force, or where --skip-existing found the
            // rejection it asks again for.
            let replacing = args.force || again.contains(&item.reply);
            match save_reply(item, &reply, args.save_queries, replacing, &trusted) {
                Ok(()) => granted += 1,
                Err(e) => {
                    failed += 1;
                    eprintln!("{}: {e:#}", item.label);
                }
            }
        }
    }
    let total = granted + failed;
    let batches = total.div_ceil(args.batch_size as usize);
    let checked = match trusted.is_empty() {
        true => "checked against their requests",
        false => "verified",
    };
    println!(
        "{granted} of {total} granted and {checked} ({batches} batch{}); replies saved as .tsr",
        if batches == 1 { "" } else { "es" }
    );
    if failed > 0 {
        bail!(
            "{failed} of {total} items were not granted or did not verify (--skip-existing \
             asks again for those without a reply)"
        );
    }
    Ok(())
}

/// After this many failed batch round trips in a row, the rest are not sent.
const GIVE_UP_AFTER: usize = 3;

/// What an item's reply file holds, for --skip-existing.
enum Saved {
    Nothing,
    /// A granted reply whose token stamps the item's digest as this run asks: its policy
    /// where one is asked for, its certificate where certReq is set, and verified with the
    /// trusted CAs where they are given.
    Token,
    /// A reply without a token: the TSA's refusal of an earlier run.
    Rejection,
    /// Anything else (another item's token? one this run's options would not take?): not
    /// replaced without --force.
    Other,
}

impl Saved {
    fn of(item: &Item, trusted: &[x509_cert::Certificate]) -> Saved {
        let Ok(der) = std::fs::read(&item.reply) else {
            return match item.reply.symlink_metadata() {
                Ok(_) => Saved::Other,
                Err(_) => Saved::Nothing,
            };
        };
        let Ok(response) = Response::from_der(&der) else {
            return Saved::Other;
        };
        match &response.token {
            None => Saved::Rejection,
            Some(token) => {
                let imprint = &token.tst_info().message_imprint;
                let stamps_it = DigestAlgorithm::from_oid(&imprint.hash_algorithm.oid)
                    == Some(item.query.digest)
                    && imprint.hashed_message.as_bytes() == item.query.hashed_message.as_slice();
                let policy = item
                    .query
                    .policy
                    .is_none_or(|asked| asked == token.tst_info().policy);
                let certificate = !item.query.cert_req
                    || token
                        .signed_data
                        .certificates
                        .as_ref()
                        .is_some_and(|set| !set.0.is_empty());
                let verified = trusted.is_empty()
                    || verify(
                        token,
                        &Expectation {
                            digest: Some(&item.query.hashed_message),
                            trusted: trusted.to_vec(),
                            // As it stood when it was saved: a TSU certificate expired since
                            // does not make the run replace the older proof.
                            at: ValidAt::GenTime,
                            ..Default::default()
                        },
                    )
                    .is_ok();
                match stamps_it && policy && certificate && verified {
                    true => Saved::Token,
                    false => Saved::Other,
                }
            }
        }
    }
}

/// Checks one item's reply against its request (and in full with trusted CAs), then saves
/// it; a rejection is saved too (as the single mode does) and reported as an error.
fn save_reply(
    item: &Item,
    reply: &[u8],
    save_query: bool,
    replacing: bool,
    trusted: &[x509_cert::Certificate],
) -> anyhow::Result<()> {
    let response = Response::from_der(reply).context("the reply does not decode")?;
    if let Some(token) = &response.token {
        answers_query(token, &item.der).context("the reply does not answer this item")?;
        if !trusted.is_empty() {
            verify(
                token,
                &Expectation {
                    digest: Some(&item.query.hashed_message),
                    query: Some(&item.der),
                    trusted: trusted.to_vec(),
                    ..Default::default()
                },
            )
            .context("the token does not verify")?;
        }
    }
    // A rejection is saved for a look at it, but never over a file that is there: that may
    // be an earlier token, the only proof of time its owner has.
    let kept = response.token.is_none() && item.reply.exists();
    if !kept {
        write(&item.reply, reply, replacing)?;
        if save_query {
            write(&item.reply.with_extension("tsq"), &item.der, replacing)?;
        }
    }
    match (&response.token, kept) {
        (Some(_), _) => Ok(()),
        (None, false) => bail!("rejected: {}", rejection_text(&response)),
        (None, true) => bail!(
            "rejected: {} (not saved: {} is kept as it was)",
            rejection_text(&response),
            item.reply.display()
        ),
    }
}

/// Without `force`, refuses outputs that are there already (before anything is sent).
fn refuse_replacing<'a>(
    outputs: impl IntoIterator<Item = &'a Path>,
    force: bool,
) -> anyhow::Result<()> {
    if force {
        return Ok(());
    }
    let there: Vec<&Path> = outputs.into_iter().filter(|p| p.exists()).collect();
    if let Some(first) = there.first() {
        bail!(
            "{} exists already{} (an earlier token?): not replaced, nothing sent; remove it, \
             or give --force",
            first.display(),
            match there.len() {
                1 => String::new(),
                n => format!(", and {} more files", n - 1),
            }
        );
    }
    Ok(())
}

/// Refuses outputs that would replace an input: a file stamped beside its own reply (`doc`
/// and `doc.tsr` in one batch), `--out` naming `--data`. An output that does not exist yet
/// is no input.
fn refuse_overwriting_inputs<'a>(
    inputs: impl IntoIterator<Item = &'a Path>,
    outputs: impl IntoIterator<Item = &'a Path>,
) -> anyhow::Result<()> {
    let inputs: HashSet<PathBuf> = inputs
        .into_iter()
        .filter_map(|p| std::fs::canonicalize(p).ok())
        .collect();
    for output in outputs {
        if std::fs::canonicalize(output).is_ok_and(|o| inputs.contains(&o)) {
            bail!(
                "{} is both stamped and where a reply or request would be saved: it would be \
                 replaced",
                output.display()
            );
        }
    }
    Ok(())
}

/// Saves a request or a reply whole and durably: a token may be the only proof of time its
/// owner has. Over a file there only where `replace` (--force, or a rejection
/// --skip-existing asks again for): otherwise a file that appeared since the check at start
/// (another run, a name the file system takes for another item's) is an error, and left as
/// it is.
fn write(path: &Path, bytes: &[u8], replace: bool) -> anyhow::Result<()> {
    tsa::files::write(path, bytes, tsa::files::PUBLIC, replace).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => anyhow::anyhow!(
            "{} appeared since the start (another run, or a name the file system takes for \
             another item's): kept as it is (--force replaces it)",
            path.display()
        ),
        _ => anyhow::Error::new(e).context(format!("cannot write {}", path.display())),
    })
}

/// The lines of a file, or of standard input for `-`.
fn read_list(path: &Path) -> anyhow::Result<Vec<String>> {
    let read = |r: &mut dyn BufRead| r.lines().collect::<std::io::Result<Vec<_>>>();
    if path == Path::new("-") {
        read(&mut std::io::stdin().lock()).context("cannot read the digests from standard input")
    } else {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        read(&mut std::io::BufReader::new(file))
            .with_context(|| format!("cannot read {}", path.display()))
    }
}
