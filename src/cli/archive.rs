//! `tsa archive`: verify, look up, export and prune the token archive (`[archive]` of the
//! configuration). Reading works while the server runs (SQLite's write-ahead log lets readers
//! and the writer go on together).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use tsa::archive::record::{hex, StoredRecord};
use tsa::archive::{self, decode_hex, normalize_serial, serial_hex};
use tsa::config::{ArchiveBackend, Config};
use tsa::protocol::GenTime;
use tsa::signer::certificate::TsuCertificate;

#[derive(Debug, clap::Args)]
pub struct ArchiveArgs {
    /// The configuration file: its [archive] section and the TSU certificate.
    #[arg(long, short, default_value = "state/tsa.toml", global = true)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: ArchiveCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum ArchiveCommand {
    /// Check every instance's hash chain, each record against its token, the signed
    /// checkpoints, and the tokens' signatures after the last checkpoint; report the first
    /// break of each chain (exit status 1 when one is found). What it cannot vouch for (an
    /// empty archive, records no checkpoint signs yet) is a WARNING line: exit status 0, or 2
    /// with --strict.
    Verify {
        /// Further trusted TSU certificates (PEM), for checkpoints signed before a change of
        /// certificate; the configured ones ([signer], and [rollover.signer] when a rollover
        /// is planned) are trusted too, unless --trust is given.
        #[arg(long)]
        cert: Vec<PathBuf>,
        /// Trust only the TSU certificates in these files (PEM), not the configuration's: an
        /// auditor's own copy, as one who could rewrite the archive could replace the
        /// configured certificate too.
        #[arg(long)]
        trust: Vec<PathBuf>,
        /// An instance that must be in the archive (repeatable). The configuration's own is
        /// a warning where it is not (a node not started yet), though others are.
        #[arg(long)]
        instance: Vec<u32>,
        /// A chain head recorded earlier, INSTANCE:SEQ:HASH (as this command prints it on
        /// its `head:` lines, and the server logs it at each checkpoint as an
        /// `archive_checkpoint` event): the chain must still hold it (repeatable). A rollback
        /// of the whole archive to an earlier checkpoint shows only against such a record
        /// kept elsewhere.
        #[arg(long)]
        expect: Vec<archive::verify::Expected>,
        /// An events' head recorded earlier, INSTANCE:SEQ:HASH (this command's `events
        /// head:` lines; the `events` field of the server's `archive_checkpoint` events): the
        /// events must still hold it (repeatable). A checkpoint signed again with later
        /// events (an idle server's) replaces the one before, so events removed from the end
        /// with the checkpoint put back as it was show only against such a record.
        #[arg(long)]
        expect_events: Vec<archive::verify::Expected>,
        /// Warnings fail too, with exit status 2: for a stopped server's archive, whose
        /// head the shutdown signed.
        #[arg(long)]
        strict: bool,
    },
    /// Find a token by serial or by message imprint; print what the archive holds and write
    /// the TimeStampResp (or the bare token) to --out.
    Get {
        /// The serial in hex (as `tsa inspect` prints it).
        #[arg(long, required_unless_present = "imprint", conflicts_with = "imprint")]
        serial: Option<String>,
        /// The hashed message in hex: the tokens with this imprint, the latest first.
        #[arg(long)]
        imprint: Option<String>,
        /// With --imprint, how many tokens to print at most (the latest ones; the others are
        /// counted). An imprint may have been stamped millions of times.
        #[arg(long, default_value_t = 100, requires = "imprint")]
        limit: usize,
        /// With --imprint, only the tokens of this digest (`sha256`, `sha3-256`, … or a
        /// dotted OID): the same octets under two algorithms are two imprints.
        #[arg(long, requires = "imprint")]
        alg: Option<String>,
        /// Write the granted TimeStampResp (DER, `.tsr`) here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Write the bare token (CMS ContentInfo) instead of the TimeStampResp.
        #[arg(long)]
        token: bool,
        /// Replace --out where it exists.
        #[arg(long, requires = "out")]
        force: bool,
    },
    /// Export the tokens whose genTime is in [--from, --to): a directory of
    /// `<serial-hex>.tsr` files (DER TimeStampResp) or one JSON-lines file (one object per
    /// token, the token's DER in hex).
    Export {
        /// RFC 3339 (2026-11-26T13:00:00Z) or Unix seconds.
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        #[arg(long, required_unless_present = "jsonl", conflicts_with = "jsonl")]
        dir: Option<PathBuf>,
        #[arg(long)]
        jsonl: Option<PathBuf>,
        /// Replace files that exist already (a link is replaced, never followed); without it
        /// the export stops at the first one, naming it.
        #[arg(long)]
        force: bool,
    },
    /// Remove the records issued before a time (and the events before it), never past an
    /// instance's last signed checkpoint; each chain keeps the last removed record's hash as
    /// its anchor, so what remains still verifies. A time within the configured
    /// `retention_days` (or any time, where it is 0: keep every record) is refused without
    /// --force.
    Prune {
        /// RFC 3339 or Unix seconds.
        #[arg(long)]
        before: String,
        /// Remove records the configured retention keeps.
        #[arg(long)]
        force: bool,
        /// This instance instead of the configured one (`archive.instance_id`).
        #[arg(long, conflicts_with = "all_instances")]
        instance: Option<u32>,
        /// Every instance in the archive (in a fleet's shared database, the other instances'
        /// anchors are then signed with this instance's key, and cut by its retention).
        #[arg(long)]
        all_instances: bool,
    },
    /// Bring an archive to the layout of new ones. SQLite: move a rows archive's tokens into
    /// a token log beside its database (about half the writer's CPU), with the server
    /// stopped; the copy is read back and compared before the rows go; run `verify` before
    /// and after. PostgreSQL: build the imprint index in the look-ups' order on an archive
    /// made before it, beside the running servers (CREATE INDEX CONCURRENTLY), and drop the
    /// older one.
    Migrate,
    /// Print the clock, key and archive events in [--from, --to).
    Events {
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        to: Option<String>,
    },
}

pub fn run(args: &ArchiveArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    match &args.command {
        ArchiveCommand::Verify {
            cert,
            trust,
            instance,
            expect,
            expect_events,
            strict,
        } => verify(
            &config,
            &Trust {
                extra: cert,
                only: trust,
            },
            instance,
            &expect
                .iter()
                .copied()
                .chain(expect_events.iter().map(|e| e.of_events()))
                .collect::<Vec<_>>(),
            *strict,
        ),
        ArchiveCommand::Get {
            serial,
            imprint,
            limit,
            alg,
            out,
            token,
            force,
        } => get(
            &config,
            serial.as_deref(),
            imprint.as_deref().map(|imprint| (imprint, alg.as_deref())),
            *limit,
            out.as_deref().map(|path| (path, *force)),
            *token,
        ),
        ArchiveCommand::Export {
            from,
            to,
            dir,
            jsonl,
            force,
        } => export(
            &config,
            parse_time(from)?,
            parse_time(to)?,
            dir.as_deref(),
            jsonl.as_deref(),
            *force,
        ),
        ArchiveCommand::Prune {
            before,
            instance,
            all_instances,
            force,
        } => {
            let only = match all_instances {
                true => None,
                false => Some(instance.unwrap_or(config.archive.instance_id)),
            };
            prune(&config, parse_time(before)?, only, *force)
        }
        ArchiveCommand::Migrate => migrate(&config),
        ArchiveCommand::Events { from, to } => events(
            &config,
            from.as_deref().map(parse_time).transpose()?.unwrap_or(0),
            to.as_deref()
                .map(parse_time)
                .transpose()?
                .unwrap_or(i64::MAX as u64),
        ),
    }
}

/// RFC 3339, or whole Unix seconds; nanoseconds since the epoch.
fn parse_time(text: &str) -> anyhow::Result<u64> {
    if let Ok(secs) = text.parse::<u64>() {
        return secs
            .checked_mul(1_000_000_000)
            .context("the time is too far in the future");
    }
    let t = chrono::DateTime::parse_from_rfc3339(text)
        .with_context(|| format!("'{text}' is neither RFC 3339 nor Unix seconds"))?;
    u64::try_from(
        t.timestamp_nanos_opt()
            .context("the time is out of range")?,
    )
    .context("times before 1970 are not supported")
}

/// The exit status of `tsa archive verify --strict` when nothing is broken but there are
/// warnings (1 is a broken chain or an error).
const WARNINGS_EXIT_STATUS: i32 = 2;

/// The certificates `verify` trusts: the configured ones and `extra`, or `only`.
struct Trust<'a> {
    extra: &'a [PathBuf],
    only: &'a [PathBuf],
}

fn verify(
    config: &Config,
    trust: &Trust<'_>,
    named: &[u32],
    expected: &[archive::verify::Expected],
    strict: bool,
) -> anyhow::Result<()> {
    // The configured signer's certificate, and the planned rollover's: checkpoints after the
    // rollover's instant are signed by its key.
    let mut trusted = Vec::new();
    let configured = std::iter::once(("[signer]", &config.signer)).chain(
        config
            .rollover
            .as_ref()
            .map(|r| ("[rollover.signer]", &r.signer)),
    );
    for (what, signer) in configured.filter(|_| trust.only.is_empty()) {
        let (cert, chain) = signer.certificates();
        trusted.push(
            TsuCertificate::load(cert, chain)
                .with_context(|| format!("the certificate of {what}"))?
                .der()
                .to_vec(),
        );
    }
    for file in trust.extra.iter().chain(trust.only) {
        for der in tsa::signer::certificate::read_pem_certificates(file)? {
            // A file with a chain: only the TSU certificates in it sign checkpoints, so only
            // they are trusted to (not its CA, whose key signs certificates).
            let profile =
                TsuCertificate::from_der(der.clone(), Vec::new()).and_then(|c| c.check_profile());
            match profile {
                Ok(()) => trusted.push(der),
                Err(_) => eprintln!(
                    "{}: a certificate that is not a TSU's (a CA, or without \
                     id-kp-timeStamping) is not trusted for checkpoints",
                    file.display()
                ),
            }
        }
    }
    if trusted.is_empty() {
        bail!("no TSU certificate to trust: the files given hold none");
    }
    let mut store = archive::open_read_only(&config.archive)?;
    let report = archive::verify::verify(
        store.as_mut(),
        &trusted,
        named,
        expected,
        Some(config.archive.instance_id),
    )?;
    print!("{report}");
    if config.archive.backend == ArchiveBackend::Sqlite {
        println!("{}", archive::imprints::status(&config.archive.database));
    }
    if !report.ok() {
        bail!("the archive does not verify");
    }
    let warnings = report.warnings();
    if strict && !warnings.is_empty() {
        drop(store);
        eprintln!(
            "tsa: the archive verifies with {} warning(s), which --strict makes a failure",
            warnings.len()
        );
        std::process::exit(WARNINGS_EXIT_STATUS);
    }
    Ok(())
}

fn describe(r: &StoredRecord) -> String {
    let rec = &r.record;
    format!(
        "serial      : {}\ninstance    : {} (record {}, counter {})\ngenTime     : {}\n\
         accuracy    : {} ns\nimprint     : {} {}\npolicy      : {}\nnonce       : {}\n\
         clock       : {} {} (bound {} ns){}\ntoken       : {} octets\nhash        : {}\n",
        serial_hex(r),
        r.instance_id,
        r.seq,
        r.counter,
        GenTime::from_unix_ns(rec.gen_time_ns),
        rec.accuracy_ns,
        rec.imprint_alg,
        hex(&rec.imprint),
        rec.policy,
        rec.nonce.as_deref().map(hex).unwrap_or_else(|| "-".into()),
        rec.clock.source,
        rec.clock.state,
        rec.clock.bound_ns,
        if rec.clock.sources.is_empty() {
            String::new()
        } else {
            format!(", sources {}", rec.clock.sources)
        },
        rec.token.len(),
        hex(&r.hash),
    )
}

/// Prints what the archive holds of the token with `serial`, or of the latest `limit` tokens
/// with `imprint` (of one digest algorithm where one is named; and how many more there are),
/// and writes the latest to `out`.
fn get(
    config: &Config,
    serial: Option<&str>,
    imprint: Option<(&str, Option<&str>)>,
    limit: usize,
    out: Option<(&Path, bool)>,
    bare_token: bool,
) -> anyhow::Result<()> {
    let alg = match imprint.and_then(|(_, alg)| alg) {
        Some(name) => Some(
            archive::imprint_algorithm(name)
                .with_context(|| format!("--alg: unknown digest '{name}'"))?,
        ),
        None => None,
    };
    // Before the look-up: a mistyped --out (the archive's own database) is not replaced.
    let out = match out {
        Some((path, force)) => Some((
            super::not_replacing(not_the_archive(path, config)?, force)?,
            force,
        )),
        None => None,
    };
    let mut store = archive::open_read_only(&config.archive)?;
    let (records, total) = match (serial, imprint) {
        (Some(serial), _) => {
            // As `tsa inspect` prints it, or `openssl ts -reply -text` (`0x…`); an odd
            // number of digits has its leading zero back.
            let digits = serial.trim();
            let digits = digits
                .strip_prefix("0x")
                .or_else(|| digits.strip_prefix("0X"))
                .unwrap_or(digits);
            let even = match digits.len() % 2 {
                0 => digits.to_string(),
                _ => format!("0{digits}"),
            };
            let bytes = decode_hex(&even).context("--serial is not hex")?;
            let found = store.record_by_serial(&normalize_serial(&bytes))?;
            let total = u64::from(found.is_some());
            (found.into_iter().collect::<Vec<_>>(), total)
        }
        (None, Some((imprint, _))) => {
            let imprint = decode_hex(imprint).context("--imprint is not hex")?;
            // The latest one at least, for --out, even when none is printed.
            let found = store.records_by_imprint_of(alg.as_deref(), &imprint, limit.max(1))?;
            (found.records, found.total)
        }
        (None, None) => bail!("give --serial or --imprint"),
    };
    let Some(latest) = records.first() else {
        bail!("no such token in the archive");
    };
    let mut stdout = std::io::stdout().lock();
    let shown = records.len().min(limit);
    for (i, r) in records[..shown].iter().enumerate() {
        if i > 0 {
            writeln!(stdout)?;
        }
        write!(stdout, "{}", describe(r))?;
    }
    let hidden = total.saturating_sub(shown as u64);
    if hidden > 0 {
        if shown > 0 {
            writeln!(stdout)?;
        }
        writeln!(
            stdout,
            "{hidden} of the {total} tokens with this imprint not shown (--limit N prints the \
             latest N)"
        )?;
    }
    if let Some((out, force)) = out {
        let der = if bare_token {
            latest.record.token.clone()
        } else {
            latest.response()
        };
        // Without --force, not over a file made since the check above either.
        tsa::files::write(out, &der, tsa::files::PUBLIC, force)
            .with_context(|| format!("cannot write {}", out.display()))?;
        writeln!(stdout, "written to {}", out.display())?;
    }
    Ok(())
}

/// `path`, unless it names one of the archive's own files (the database and its journal,
/// the imprint index, the state file, anything in the token log's folder): `--force` replaces
/// what a path names, and a slip of the operator's must not replace the archive.
fn not_the_archive<'a>(path: &'a Path, config: &Config) -> anyhow::Result<&'a Path> {
    // Where a path leads: its folder resolved (links too), then its name.
    let resolved = |p: &Path| -> Option<std::path::PathBuf> {
        let name = p.file_name()?;
        let folder = p.parent().filter(|f| !f.as_os_str().is_empty());
        Some(
            std::fs::canonicalize(folder.unwrap_or(Path::new(".")))
                .ok()?
                .join(name),
        )
    };
    let Some(target) = resolved(path) else {
        return Ok(path);
    };
    let database = &config.archive.database;
    let with_suffix = |p: &Path, suffix: &str| {
        let mut name = p.as_os_str().to_owned();
        name.push(suffix);
        std::path::PathBuf::from(name)
    };
    let imprints = archive::imprints::path_for(database);
    let mut own = vec![config.archive.state_file.clone()];
    for file in [database, &imprints] {
        own.push(file.clone());
        own.extend(["-wal", "-shm", "-journal", ".lock"].map(|s| with_suffix(file, s)));
    }
    let tokens = resolved(&archive::log::segments::dir_for(database));
    let ours = own.iter().filter_map(|p| resolved(p)).any(|p| p == target)
        || tokens.is_some_and(|t| target.starts_with(t));
    if ours {
        bail!(
            "{} is one of the archive's own files: not written there",
            path.display()
        );
    }
    Ok(path)
}

/// A new file at `path` for an export: made here (`O_CREAT | O_EXCL`), never through a link,
/// so nothing that exists is truncated or written through, the archive's own files included.
/// With `force`, what `path` names is removed first (a link itself, not its target).
fn create_export_file(path: &Path, force: bool) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    if force {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(tsa::files::PUBLIC)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "{} exists already (a file or a link): not replaced; remove it, or give \
                         --force",
                        path.display()
                    ),
                )
            } else {
                std::io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display()))
            }
        })
}

fn export(
    config: &Config,
    from: u64,
    to: u64,
    dir: Option<&Path>,
    jsonl: Option<&Path>,
    force: bool,
) -> anyhow::Result<()> {
    let mut store = archive::open_read_only(&config.archive)?;
    let mut count = 0u64;
    match (dir, jsonl) {
        (Some(dir), _) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let written = store.for_each_in_time(from, to, &mut |r| {
                let path = dir.join(format!("{}.tsr", serial_hex(&r)));
                create_export_file(&path, force)
                    .and_then(|mut f| f.write_all(&r.response()))
                    .map_err(|e| {
                        tsa::archive::store::StoreError(format!("{}: {e}", path.display()))
                    })?;
                count += 1;
                Ok(true)
            });
            // What was written is made durable, even when the export stopped half way.
            let synced = tsa::files::sync_file_system(dir)
                .with_context(|| format!("cannot sync {}", dir.display()));
            written.with_context(|| {
                format!(
                    "the export stopped after {count} tokens written to {}",
                    dir.display()
                )
            })?;
            synced?;
            println!("{count} tokens written to {}", dir.display());
        }
        (None, Some(file)) => {
            let f = create_export_file(not_the_archive(file, config)?, force)?;
            let mut w = std::io::BufWriter::new(f);
            let written = store
                .for_each_in_time(from, to, &mut |r| {
                    let line = json_line(&r);
                    writeln!(w, "{line}")
                        .map_err(|e| tsa::archive::store::StoreError(e.to_string()))?;
                    count += 1;
                    Ok(true)
                })
                .map_err(anyhow::Error::from)
                .and_then(|()| {
                    // The file, then its name in the directory.
                    let f = w.into_inner().map_err(|e| e.into_error())?;
                    f.sync_all()?;
                    tsa::files::sync_directory(tsa::files::directory_of(file))?;
                    Ok(())
                });
            if let Err(e) = written {
                // Made by this export: a partial file is not left as if it were one.
                let _ = std::fs::remove_file(file);
                return Err(e.context(format!("cannot write {}", file.display())));
            }
            println!("{count} tokens written to {}", file.display());
        }
        (None, None) => bail!("give --dir or --jsonl"),
    }
    Ok(())
}

/// One exported token as a JSON object.
pub fn json_line(r: &StoredRecord) -> serde_json::Value {
    let rec = &r.record;
    serde_json::json!({
        "serial": serial_hex(r),
        "instance_id": r.instance_id,
        "seq": r.seq,
        "counter": r.counter,
        "gen_time": GenTime::from_unix_ns(rec.gen_time_ns).to_string(),
        "gen_time_ns": rec.gen_time_ns,
        "accuracy_ns": rec.accuracy_ns,
        "imprint_alg": rec.imprint_alg,
        "imprint": hex(&rec.imprint),
        "policy": rec.policy,
        "nonce": rec.nonce.as_deref().map(hex),
        "client": rec.client,
        "clock": {
            "source": rec.clock.source,
            "state": rec.clock.state,
            "bound_ns": rec.clock.bound_ns,
            "sources": rec.clock.sources,
        },
        "prev_hash": hex(&r.prev_hash),
        "hash": hex(&r.hash),
        "token": hex(&rec.token),
    })
}

/// Refuses a cut that would remove records the configured retention keeps: one after
/// `now_ns` less `retention_days`, or any where that is 0 (keep every record).
fn within_retention(
    config: &tsa::config::ArchiveConfig,
    before_ns: u64,
    now_ns: u64,
) -> anyhow::Result<()> {
    let days = config.retention_days;
    anyhow::ensure!(
        days > 0,
        "archive.retention_days is 0: the configuration keeps every record (--force to prune \
         anyway)"
    );
    let kept_from = now_ns.saturating_sub(days.saturating_mul(86_400_000_000_000));
    anyhow::ensure!(
        before_ns <= kept_from,
        "{} is within archive.retention_days ({days} days): records issued since {} are kept \
         (--force to prune anyway)",
        GenTime::from_unix_ns(before_ns),
        GenTime::from_unix_ns(kept_from)
    );
    Ok(())
}

fn prune(config: &Config, before: u64, only: Option<u32>, force: bool) -> anyhow::Result<()> {
    let mut store = archive::open_writable(&config.archive)?;
    let instances = match only {
        Some(id) => vec![id],
        None => store.instances()?,
    };
    if !force {
        // Counted back from the latest genTime archived too, as the server's retention is:
        // a step forward of this host's clock must not make a cut look old enough.
        let mut latest = 0;
        for id in &instances {
            latest = latest.max(store.instance(*id)?.max_gen_time_ns);
        }
        let now = tsa::clock::system_unix_ns().min(latest);
        within_retention(&config.archive, before, now)?;
    }
    // The anchors a prune leaves are signed with the TSU key, before each step locks the
    // instance: the signer first, so that nothing is pruned without it.
    let signer = tsa::server::archive_signer(config)
        .context("tsa archive prune signs the anchor it leaves with the TSU key: nothing pruned")?;
    let sign = archive::anchor_signer(&signer);
    for id in instances {
        // A call removes a bounded step (the token log: some segments); until nothing is left.
        // The server's own retention may be pruning the instance: its turn is short.
        let mut last = None;
        let mut busy = 0;
        loop {
            match store.prune_signed(id, before, &sign) {
                Ok(Some(anchor)) => last = Some(anchor),
                Ok(None) => break,
                Err(e) if e.0.contains(archive::state::PRUNED_ELSEWHERE) && busy < 30 => {
                    busy += 1;
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
                Err(e) => return Err(e.into()),
            }
        }
        match last {
            Some(anchor) => println!(
                "instance {id}: records up to {} removed; anchor {} (signed)",
                anchor.seq,
                hex(&anchor.hash)
            ),
            None => println!(
                "instance {id}: nothing to remove (pruning stops at the last signed checkpoint)"
            ),
        }
    }
    Ok(())
}

fn migrate(config: &Config) -> anyhow::Result<()> {
    let a = &config.archive;
    if a.backend == tsa::config::ArchiveBackend::Postgres {
        let mut store = archive::postgres::PostgresStore::open_existing(a)?;
        match store.build_imprint_index()? {
            true => {
                println!("the imprint index (imprint, genTime) is built; the older one is gone")
            }
            false => println!("the imprint index (imprint, genTime) was there already"),
        }
        return Ok(());
    }
    let _lock = archive::state::Lock::acquire(&a.state_file)
        .context("the archive is in use: stop the server first")?;
    // Every instance's rows move: no server of any instance may run meanwhile.
    let _database = archive::state::Lock::whole_database(&a.database)
        .context("the archive is in use: stop its servers first")?;
    let migrated = archive::log::migrate::migrate(
        &a.database,
        std::time::Duration::from_millis(a.busy_timeout_ms),
        a.log_segment_mib << 20,
    )?;
    for (id, records) in &migrated {
        println!("instance {id}: {records} records moved into the token log");
    }
    println!(
        "{} now keeps its tokens in {}; `VACUUM` it to give back the space the rows took",
        a.database.display(),
        archive::log::segments::dir_for(&a.database).display()
    );
    Ok(())
}

fn events(config: &Config, from: u64, to: u64) -> anyhow::Result<()> {
    let mut store = archive::open_read_only(&config.archive)?;
    let mut stdout = std::io::stdout().lock();
    for e in store.events(from, to)? {
        let (message, fields) = match e.pruned() {
            true => ("(pruned: its message and fields were removed)", ""),
            false => (e.message.as_str(), e.fields.as_str()),
        };
        writeln!(
            stdout,
            "{} instance {} #{} {:<5} {:<24} {} {}",
            GenTime::from_unix_ns(e.time_ns),
            e.instance_id,
            e.seq,
            e.level,
            e.kind,
            message,
            fields
        )?;
    }
    Ok(())
}
