//! Serial numbers and the durable token archive.
//!
//! Without the archive, serials are random ([`serial::RandomSerials`]). With it
//! (`[archive] enabled = true`), [`Archive::open`] starts a writer thread over a storage
//! backend ([`store::ArchiveStore`]; SQLite in [`sqlite`], PostgreSQL in [`postgres`]) and
//! hands out structured serials ([`serial::BlockSerials`]: instance id, a counter reserved
//! durably in blocks, random octets). Every token is recorded ([`Archive::record`]) before
//! its response leaves; the records form a hash chain per instance, signed at checkpoints;
//! clock and key events are stored beside them ([`events`]). [`verify`] checks it all.
//! `LAYOUT.md` in this folder describes the serial layout, the state file, the schema and the
//! encodings.

mod background;
mod checkpointer;
pub mod events;
pub mod imprints;
pub mod log;
pub mod postgres;
mod queue;
pub mod record;
pub mod serial;
pub mod sqlite;
pub mod state;
pub mod store;
pub mod verify;
mod writer;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::config::{ArchiveBackend, ArchiveConfig};
use queue::Queue;
use record::{hex, ChainHead, StoredRecord, TokenRecord};
use serial::{layout, BlockSerials};
use sqlite::SqliteStore;
use state::{Lock, SavedState, StateFile};
use store::{ArchiveStore, ImprintMatches};
use writer::{Msg, Writer};

/// How long a request waits for the commit of its token: far beyond any commit of a working
/// disk or database (milliseconds; a full disk is answered at once), short of a client's
/// patience.
const COMMIT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Why a token could not be archived (the client gets systemFailure).
#[derive(Clone, Debug, thiserror::Error)]
#[error("{0}")]
pub struct ArchiveError(pub String);

/// Signs a message (hashing it with the key's digest); the signature as CMS carries it.
pub type SignFn = Box<dyn Fn(&[u8]) -> Result<Vec<u8>, String> + Send + Sync>;

/// Signs checkpoints with the TSA's own key.
pub struct CheckpointSigner {
    pub sign: SignFn,
    /// The signature's AlgorithmIdentifier (DER).
    pub algorithm: Vec<u8>,
    /// The TSU certificate (DER).
    pub certificate: Vec<u8>,
}

impl CheckpointSigner {
    /// Takes `der` as the certificate checkpoints carry where it certifies this signer's key
    /// (a certificate renewed by a reload). One of another key is left: a reload just past a
    /// planned rollover's instant sends the new key's certificate before the rollover's own
    /// message brings the key ([`Archive::set_checkpoint_signer`]), and checkpoints would
    /// name one certificate while the other key signed them. Answers whether it was taken.
    pub fn renew_certificate(&mut self, der: Vec<u8>) -> bool {
        use der::{Decode, Encode};
        let key = |der: &[u8]| {
            x509_cert::Certificate::from_der(der)
                .ok()
                .and_then(|c| c.tbs_certificate().subject_public_key_info().to_der().ok())
        };
        let same = key(&der).is_some_and(|new| key(&self.certificate) == Some(new));
        if same {
            self.certificate = der;
        }
        same
    }
}

/// What signs the anchors a prune leaves ([`store::ArchiveStore::prune_signed`]): the
/// checkpoints' key, so that verification tells an anchor from one written by hand.
pub fn anchor_signer(
    signer: &CheckpointSigner,
) -> impl Fn(&record::Anchor) -> Result<Option<record::AnchorSignature>, String> + Sync + '_ {
    move |anchor| {
        let signature = (signer.sign)(&anchor.message())
            .map_err(|e| format!("the anchor cannot be signed: {e}"))?;
        Ok(Some(record::AnchorSignature {
            algorithm: signer.algorithm.clone(),
            signature,
            certificate: signer.certificate.clone(),
        }))
    }
}

/// The result of an admin look-up.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// A DER `TimeStampResp`, and how many tokens matched (an imprint may have several; the
    /// one with the latest genTime is returned).
    Found(Vec<u8>, u64),
    NotFound,
    BadRequest(String),
    Failed(String),
}

/// The clock's selected sources in words, refreshed at most once a second (the discipline
/// updates far less often), so that a token's record costs no lock on the clock.
struct SourcesCache {
    value: arc_swap::ArcSwap<(std::time::Instant, String)>,
}

impl SourcesCache {
    fn get(&self, clock: &crate::clock::IssuingClock) -> String {
        let cached = self.value.load();
        if cached.0.elapsed() < Duration::from_secs(1) {
            return cached.1.clone();
        }
        let names = clock
            .views()
            .map(|v| {
                v.sources
                    .iter()
                    .filter(|s| s.selection == crate::clock::discipline::Selection::Selected)
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        self.value
            .store(Arc::new((std::time::Instant::now(), names.clone())));
        names
    }
}

/// The open archive of one instance.
pub struct Archive {
    sources: SourcesCache,
    queue: Arc<Queue>,
    serials: BlockSerials,
    instance_id: u32,
    gen_time_floor_ns: u64,
    reader: Mutex<Box<dyn ArchiveStore>>,
    /// The writer's last durable head: a look-up answers none of this instance's records past
    /// it (the token log's readers see a commit's frames before its sync, which may fail).
    durable: Arc<Mutex<ChainHead>>,
    healthy: Arc<AtomicBool>,
    /// A token waited [`COMMIT_WAIT`] for its commit, or found too many waiting, since the
    /// last durable commit (the writer clears it): the disk or database hangs.
    stalled: Arc<AtomicBool>,
    writer: Mutex<Option<JoinHandle<()>>>,
    held: Held,
    stats: Arc<CommitStats>,
    /// The SQLite archive's imprint index, filled beside the writer (rows only).
    indexer: Option<imprints::Indexer>,
    /// A token log, whose imprints are indexed as they are committed.
    log: bool,
    /// The SQLite archive's log checkpoints, beside the writer.
    checkpointer: Option<checkpointer::Checkpointer>,
}

/// How the writer's commits went, for the metrics: each commit's duration (transaction and
/// fsync) and how many records it took.
#[derive(Debug)]
pub struct CommitStats {
    pub duration: prometheus_client::metrics::histogram::Histogram,
    pub records: prometheus_client::metrics::histogram::Histogram,
}

impl Default for CommitStats {
    fn default() -> Self {
        use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
        Self {
            // 50 µs to about 3.3 s; 1 to 2048 records.
            duration: Histogram::new(exponential_buckets(50e-6, 2.0, 17)),
            records: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
        }
    }
}

impl Archive {
    /// Opens the archive: locks the state directory, reads the instance's state from the
    /// database and the state file, takes the highest counter and genTime of both, reserves
    /// the first block of serials durably, and starts the writer. At most `max_queued` token
    /// records wait for the writer at once; more are refused (`Queue::send`).
    pub fn open(
        config: &ArchiveConfig,
        signer: CheckpointSigner,
        max_queued: usize,
    ) -> anyhow::Result<Self> {
        let (store, reader, lock, checkpointer, layout) = open_stores(config)?;
        // The imprint index is derived data: without it tokens are still archived and found,
        // look-ups by imprint only read the whole archive. The token log keeps sorted imprint
        // files of its own, per segment; PostgreSQL indexes `tokens`.
        let log = layout == Some(sqlite::Layout::Log);
        let indexer = match layout {
            Some(sqlite::Layout::Rows) => imprints::Indexer::start(&config.database)
                .inspect_err(|e| {
                    tracing::error!(
                        event = "imprint_index_failed",
                        error = %e,
                        "the imprint index cannot be kept; look-ups by imprint read the archive"
                    )
                })
                .ok(),
            Some(sqlite::Layout::Log) | None => None,
        };
        let mut store = store;
        let instance_id = config.instance_id;
        let db = store
            .instance(instance_id)
            .context("cannot read the archive")?;
        // The chain must reach the head its last signed checkpoint saw: records below it were
        // committed, and their tokens sent.
        let last_checkpoint = store
            .checkpoints(instance_id)
            .context("cannot read the archive")?
            .pop();
        if let Some(checkpoint) = &last_checkpoint {
            let head = db.head.unwrap_or(ChainHead::EMPTY);
            if head.seq < checkpoint.seq
                || (head.seq == checkpoint.seq && head.hash != checkpoint.head_hash)
            {
                bail!(
                    "the archive of instance {instance_id} ends at record {} but its last signed \
                     checkpoint covers {} records (head hash {}): committed records are missing \
                     or were altered. Nothing was changed; keep the database and the token log as \
                     they are for forensics, run `tsa archive verify`, and restore the archive \
                     from a backup",
                    head.seq,
                    checkpoint.seq,
                    hex(&checkpoint.head_hash)
                );
            }
        }
        let state_file = StateFile::new(&config.state_file);
        let saved = state_file.read()?;
        if let Some(saved) = &saved {
            if saved.instance_id != instance_id {
                bail!(
                    "the state file {} belongs to instance {}, not to archive.instance_id = {}",
                    config.state_file.display(),
                    saved.instance_id,
                    instance_id
                );
            }
        } else if db.head.is_some() {
            tracing::warn!(
                event = "archive_state_missing",
                state_file = %config.state_file.display(),
                "the archive state file is missing; continuing from the database"
            );
        }
        let next = [
            1,
            db.reserved_until,
            // Saturating: at the last counter the block below finds the counter exhausted.
            db.max_counter.map_or(0, |c| c.saturating_add(1)),
            saved.map_or(0, |s| s.reserved_until),
        ]
        .into_iter()
        .max()
        .unwrap_or(1);
        let gen_time_floor_ns = db.max_gen_time_ns.max(saved.map_or(0, |s| s.gen_time_ns));
        let until = next
            .checked_add(config.serial_block)
            .filter(|u| *u <= layout::MAX_COUNTER)
            .context("the serial counter is exhausted")?;
        // The first block, durably in both places, before any serial is handed out.
        store
            .reserve(instance_id, until, gen_time_floor_ns)
            .context("cannot reserve serial numbers")?;
        state_file
            .write(&SavedState {
                instance_id,
                reserved_until: until,
                gen_time_ns: gen_time_floor_ns,
            })
            .with_context(|| format!("cannot write {}", config.state_file.display()))?;
        let head = db.head.unwrap_or(ChainHead::EMPTY);
        let last_checkpoint_seq = last_checkpoint.as_ref().map_or(0, |c| c.seq);
        let (backend, location) = location(config);
        // The start itself is an event, committed before the first token.
        let opened = record::EventRecord {
            instance_id,
            seq: db.last_event.seq + 1,
            time_ns: crate::clock::system_unix_ns(),
            level: "info".into(),
            kind: "archive_opened".into(),
            message: "archive opened".into(),
            fields: serde_json::json!({
                "first_counter": next,
                "reserved_until": until,
                "gen_time_floor_ns": gen_time_floor_ns,
                "head_seq": head.seq,
                "backend": backend,
                "database": location,
            })
            .to_string(),
            prev_hash: None,
            body_hash: None,
            hash: None,
        }
        .chained(db.last_event.hash);
        store
            .append(instance_id, &[], std::slice::from_ref(&opened))
            .context("cannot write to the archive")?;
        tracing::info!(
            instance = instance_id,
            first_counter = next,
            head_seq = head.seq,
            gen_time_floor_ns,
            backend,
            database = %location,
            "archive open"
        );

        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let commit_delay = config.commit_delay(cores);
        tracing::info!(
            cores,
            commit_delay_us = commit_delay.as_micros() as u64,
            configured = config.commit_delay_us.is_some(),
            "archive group commit"
        );
        let queue = Arc::new(Queue::new(commit_delay, max_queued));
        let reservations = queue.clone();
        let serials = BlockSerials::new(
            instance_id,
            next,
            until,
            config.serial_block,
            Box::new(move |until| {
                let _ = reservations.send(Msg::Reserve(until));
            }),
        );
        let healthy = Arc::new(AtomicBool::new(true));
        let stalled = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(CommitStats::default());
        let durable = Arc::new(Mutex::new(head));
        let writer = Writer {
            stats: stats.clone(),
            store,
            instance_id,
            head,
            last_event: opened.head(),
            max_gen_time_ns: gen_time_floor_ns,
            reserved_until: until,
            serials: serials.clone(),
            state: state_file,
            signer,
            planned: None,
            signer_is_rollover: false,
            last_checkpoint_seq,
            signed_events_seq: 0,
            last_checkpoint_certificate: last_checkpoint.map(|c| c.certificate),
            // The opening is one to sign, though no token comes after it.
            events_to_sign: opened.seq,
            checkpoint_interval: Duration::from_secs(config.checkpoint_interval_s.max(1)),
            retention: (config.retention_days > 0)
                .then(|| Duration::from_secs(config.retention_days * 86_400)),
            max_batch: config.max_batch.max(1),
            healthy: healthy.clone(),
            stalled: stalled.clone(),
            queue: queue.clone(),
            refused: Default::default(),
            durable: durable.clone(),
            outage: None,
            pending_events: Vec::new(),
            prune_again: None,
        };
        let handle = std::thread::Builder::new()
            .name("tsa-archive".into())
            .spawn(move || writer.run())
            .context("cannot start the archive writer")?;
        events::attach(queue.clone());
        Ok(Self {
            sources: SourcesCache {
                value: arc_swap::ArcSwap::from_pointee((
                    std::time::Instant::now() - Duration::from_secs(2),
                    String::new(),
                )),
            },
            queue,
            serials,
            instance_id,
            gen_time_floor_ns,
            reader: Mutex::new(reader),
            durable,
            healthy,
            stalled,
            writer: Mutex::new(Some(handle)),
            held: lock,
            stats,
            indexer,
            log,
            checkpointer,
        })
    }

    /// The serial allocator of this instance (the request path's `SerialAllocator`).
    pub fn serials(&self) -> BlockSerials {
        self.serials.clone()
    }

    pub fn instance_id(&self) -> u32 {
        self.instance_id
    }

    /// The latest genTime this instance issued before this start: the issuing clock's floor.
    pub fn gen_time_floor_ns(&self) -> u64 {
        self.gen_time_floor_ns
    }

    fn send(&self, msg: Msg) -> Result<(), ArchiveError> {
        self.queue
            .send(msg)
            .map_err(|_| ArchiveError("the archive is closed".into()))
    }

    fn enqueue(
        &self,
        record: TokenRecord,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<(), ArchiveError>>, ArchiveError> {
        // Another process may use this instance id now: nothing more may leave (the writer's
        // commits check the lease too, in their transaction).
        if matches!(&self.held, Held::Lease(lease) if lease.lost()) {
            return Err(ArchiveError(
                "the token could not be archived: this process lost its instance id's lease".into(),
            ));
        }
        let (reply, done) = tokio::sync::oneshot::channel();
        if self
            .queue
            .send(Msg::Record(Box::new(record), reply))
            .is_err()
        {
            if self.queue.is_closed() {
                return Err(ArchiveError("the archive is closed".into()));
            }
            self.stalled.store(true, Ordering::Relaxed);
            return Err(ArchiveError(
                "the token could not be archived: too many tokens wait for the archive's writer"
                    .into(),
            ));
        }
        Ok(done)
    }

    /// The record of a token just assembled: the request's imprint, policy and nonce, the
    /// stamp, the clock's state at the reading, and the token out of `response`.
    pub fn token_record(
        &self,
        request: &crate::protocol::Request<'_>,
        stamp: &crate::protocol::Stamp,
        time: &crate::clock::TrustedTime,
        clock: &crate::clock::IssuingClock,
        response: &[u8],
        client: &crate::server::Client,
    ) -> Result<TokenRecord, ArchiveError> {
        let token = record::token_of_response(response)
            .ok_or_else(|| ArchiveError("the response holds no token".into()))?;
        Ok(TokenRecord {
            serial: stamp.serial.as_bytes().to_vec(),
            gen_time_ns: stamp.gen_time.unix_ns(),
            accuracy_ns: stamp.accuracy.as_ns(),
            imprint_alg: dotted(&request.message_imprint.hash_algorithm.oid),
            imprint: request.message_imprint.hashed_message.as_bytes().to_vec(),
            policy: dotted(&request.policy),
            nonce: request.nonce.map(|n| n.as_bytes().to_vec()),
            client: client.name.as_deref().map(str::to_owned),
            clock: record::ClockAtIssue {
                source: clock.source_name().to_string(),
                state: time.state.name().to_string(),
                bound_ns: time.bound_ns,
                sources: self.sources.get(clock),
            },
            token: token.to_vec(),
        })
    }

    /// Records a token durably; returns once the commit that holds it returned, or with an
    /// error after `COMMIT_WAIT` (a disk or a database that hangs: the token is withheld,
    /// though the commit may still go in, as when an answer is lost with the connection).
    pub async fn record(&self, record: TokenRecord) -> Result<(), ArchiveError> {
        let commit = self.enqueue(record)?;
        match tokio::time::timeout(COMMIT_WAIT, commit).await {
            Ok(answer) => {
                answer.unwrap_or_else(|_| Err(ArchiveError("the archive writer stopped".into())))
            }
            Err(_) => {
                self.stalled.store(true, Ordering::Relaxed);
                Err(ArchiveError(format!(
                    "the archive did not commit the token within {} s",
                    COMMIT_WAIT.as_secs()
                )))
            }
        }
    }

    /// [`Archive::record`] for a thread that may block (not an async worker).
    pub fn record_blocking(&self, record: TokenRecord) -> Result<(), ArchiveError> {
        self.enqueue(record)?
            .blocking_recv()
            .unwrap_or_else(|_| Err(ArchiveError("the archive writer stopped".into())))
    }

    /// Whether the last write succeeded (readiness).
    pub fn health(&self) -> Result<(), String> {
        if let Held::Lease(lease) = &self.held {
            if lease.lost() {
                return Err(
                    "this process lost its instance id's lease: it issues nothing more \
                            (restart it)"
                        .into(),
                );
            }
            if lease.unreachable() {
                return Err(
                    "the archive's database cannot be reached (lease renewal failed)".into(),
                );
            }
        }
        if !self.healthy.load(Ordering::Relaxed) {
            return Err("the archive's last write failed".into());
        }
        if self.stalled.load(Ordering::Relaxed) {
            return Err(format!(
                "the archive has committed nothing since a token waited {} s for it or found \
                 too many waiting (its disk or database hangs)",
                COMMIT_WAIT.as_secs()
            ));
        }
        Ok(())
    }

    /// Checkpoints signed by the first key (`rollover` false) or a planned rollover's carry
    /// this certificate from now on, where it certifies that key (after a reload that replaced
    /// the certificate; see [`CheckpointSigner::renew_certificate`]).
    pub fn set_certificate(&self, der: Vec<u8>, rollover: bool) {
        let _ = self.send(Msg::Certificate(der, rollover));
    }

    /// Where the writer learns how many requests the server holds, to commit larger batches
    /// when many more wait than the last commit took (`queue.rs`).
    pub fn set_load(&self, load: Box<dyn Fn() -> usize + Send + Sync>) {
        self.queue.set_load(load);
    }

    /// Records and events waiting for the writer's next commit.
    pub fn queue_depth(&self) -> usize {
        self.queue.depth()
    }

    /// The writer's commits so far.
    pub fn commit_stats(&self) -> &CommitStats {
        &self.stats
    }

    /// Checkpoints from now on are signed with this key and certificate (a planned rollover).
    pub fn set_checkpoint_signer(&self, signer: CheckpointSigner) {
        let _ = self.send(Msg::Signer(Box::new(signer)));
    }

    /// A planned rollover's key for the checkpoints, and its instant: it signs them from the
    /// first one after a token of a genTime at or past the instant (which it signed), if
    /// [`Archive::set_checkpoint_signer`] has not handed it over before.
    pub fn plan_checkpoint_signer(&self, at_ns: u64, signer: CheckpointSigner) {
        let _ = self.send(Msg::Planned(at_ns, Box::new(signer)));
    }

    /// Signs a checkpoint of the chain head now (if it moved since the last one, or events
    /// came: see `Writer::checkpoint`).
    pub fn checkpoint(&self) -> Result<(), ArchiveError> {
        let (reply, done) = mpsc::channel();
        self.send(Msg::Checkpoint(reply))?;
        done.recv()
            .unwrap_or_else(|_| Err(ArchiveError("the archive writer stopped".into())))
    }

    /// Archived token records the imprint index has not reached yet (look-ups by imprint read
    /// them from the archive itself): always 0 for a token log, which indexes its imprints as
    /// it commits them; `None` where the backend keeps its own index.
    pub fn imprint_index_behind(&self) -> Option<u64> {
        match &self.indexer {
            Some(indexer) => Some(indexer.behind()),
            None => self.log.then_some(0),
        }
    }

    /// Commits what is queued, signs a last checkpoint, writes the state file and stops the
    /// writer, the imprint indexer and the checkpointer. Records sent later fail.
    pub fn close(&self) {
        self.close_within(None);
    }

    /// [`Archive::close`], waiting for the writer at most `wait` (it may be inside a signer
    /// that does not answer, signing a checkpoint), for a process about to end without
    /// dropping the archive: the instance id's lease, where one is held, is given back too.
    /// False where it gave up on the writer, and the process must end: the records not
    /// committed were never answered, and the next start recovers the archive as after a
    /// crash.
    pub fn close_within(&self, wait: Option<Duration>) -> bool {
        let closed = self.close_writer(wait);
        if let (Some(wait), Held::Lease(lease)) = (wait, &self.held) {
            lease.release(wait);
        }
        closed
    }

    fn close_writer(&self, wait: Option<Duration>) -> bool {
        if let Some(indexer) = &self.indexer {
            indexer.stop();
        }
        let Some(handle) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return true;
        };
        // Events go on to the writer until it closes its queue (the last checkpoint's among
        // them); those that come later wait in a buffer.
        let (done, finished) = mpsc::channel();
        if self.send(Msg::Close(done)).is_ok() {
            let closed = match wait {
                Some(wait) => finished.recv_timeout(wait),
                None => finished
                    .recv()
                    .map_err(|_| mpsc::RecvTimeoutError::Disconnected),
            };
            if matches!(closed, Err(mpsc::RecvTimeoutError::Timeout)) {
                tracing::error!(
                    waited_ms = wait.unwrap_or_default().as_millis() as u64,
                    "the archive's writer did not close (inside the signer?); going on without \
                     it: the next start recovers the archive"
                );
                return false;
            }
        }
        let _ = handle.join();
        events::detach();
        if let Some(checkpointer) = &self.checkpointer {
            checkpointer.stop();
        }
        true
    }

    /// Answers `GET /archive/serial/<hex>` and `GET /archive/imprint/<hex>[?alg=<digest>]`
    /// (the path after `/archive/`, and the query).
    pub fn lookup_path(&self, path: &str, query: Option<&str>) -> Lookup {
        let (kind, value) = path.split_once('/').unwrap_or((path, ""));
        let Some(bytes) = decode_hex(value) else {
            return Lookup::BadRequest(format!("'{value}' is not hex"));
        };
        let mut alg = None;
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("alg", name)) if kind == "imprint" && alg.is_none() => {
                    match imprint_algorithm(name) {
                        Some(oid) => alg = Some(oid),
                        None => return Lookup::BadRequest(format!("unknown digest '{name}'")),
                    }
                }
                _ => {
                    return Lookup::BadRequest(format!(
                        "'{pair}': a look-up by imprint takes alg=<digest> once, by serial \
                         nothing"
                    ))
                }
            }
        }
        let alg = alg.as_deref();
        let mut reader = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        // Read after the records: whatever it covers was durable when they were read.
        let durable = || DurableEnd {
            instance_id: self.instance_id,
            seq: self.durable.lock().unwrap_or_else(|p| p.into_inner()).seq,
        };
        let found = match kind {
            "serial" => reader
                .record_by_serial(&normalize_serial(&bytes))
                .map(|r| (r.filter(|r| durable().holds(r)), 1)),
            // The newest durable one is answered; the others are only counted. Records not
            // durable yet are one commit's at most: a few are read, and a commit's more where
            // those few are all of it.
            "imprint" => {
                const FEW: usize = 4;
                reader
                    .records_by_imprint_of(alg, &bytes, FEW)
                    .and_then(|m| {
                        let all = m.records.len() as u64 == m.total;
                        let mut found = durable().only(m);
                        if found.records.is_empty() && !all {
                            let commit = crate::config::MAX_COMMIT_RECORDS;
                            found = durable().only(reader.records_by_imprint_of(
                                alg,
                                &bytes,
                                FEW + commit,
                            )?);
                        }
                        Ok((found.records.into_iter().next(), found.total))
                    })
            }
            _ => return Lookup::NotFound,
        };
        match found {
            Ok((Some(r), matches)) => Lookup::Found(r.response(), matches),
            Ok((None, _)) => Lookup::NotFound,
            Err(e) => Lookup::Failed(e.to_string()),
        }
    }
}

/// Where an instance's records were durable when a look-up read them: its own records past
/// `seq` may be a commit whose sync is still to come, or failed (the token log's readers see
/// its frames before), and a look-up must not hand out a token the archive may lose.
struct DurableEnd {
    instance_id: u32,
    seq: u64,
}

impl DurableEnd {
    fn holds(&self, r: &StoredRecord) -> bool {
        r.instance_id != self.instance_id || r.seq <= self.seq
    }

    /// `m` without the records not durable yet (the count less those among the records read).
    fn only(&self, mut m: ImprintMatches) -> ImprintMatches {
        let read = m.records.len();
        m.records.retain(|r| self.holds(r));
        m.total -= (read - m.records.len()) as u64;
        m
    }
}

impl Drop for Archive {
    fn drop(&mut self) {
        self.close();
    }
}

/// An imprint's digest algorithm as the archive keeps it (a dotted OID), from its name
/// (`sha256`, `sha3-256`, …) or its dotted OID; `None` for one this TSA does not know.
pub fn imprint_algorithm(text: &str) -> Option<String> {
    use crate::alg::DigestAlgorithm;
    let alg = DigestAlgorithm::from_name(text)
        .or_else(|| DigestAlgorithm::from_oid(&const_oid::ObjectIdentifier::new(text).ok()?))?;
    Some(alg.oid().to_string())
}

/// A serial as an INTEGER's content octets: leading zeros dropped (keeping one before a high
/// bit), so that `0001…` and `01…` find the same token.
pub fn normalize_serial(bytes: &[u8]) -> Vec<u8> {
    let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    let mut out = bytes[start..].to_vec();
    if out.first().is_some_and(|b| b & 0x80 != 0) {
        out.insert(0, 0);
    }
    out
}

pub fn decode_hex(text: &str) -> Option<Vec<u8>> {
    let text: Vec<u8> = text.bytes().filter(|b| !matches!(b, b':' | b' ')).collect();
    // `from_str_radix` alone would take a sign ("+a").
    if text.is_empty() || text.len() % 2 != 0 || !text.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    text.chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok())
        .collect()
}

/// What keeps a second process off this instance id while the archive is open: the state
/// directory's lock and the database's lock of the instance (SQLite), or the lease in the
/// database (PostgreSQL).
#[allow(dead_code)]
enum Held {
    Lock(Lock, Lock),
    Lease(postgres::Lease),
}

type Stores = (
    Box<dyn ArchiveStore>,
    Box<dyn ArchiveStore>,
    Held,
    Option<checkpointer::Checkpointer>,
    Option<sqlite::Layout>,
);

/// The writer's store, the readers' store, the lock or lease, SQLite's checkpointer and the
/// SQLite archive's layout, for the configured backend.
fn open_stores(config: &ArchiveConfig) -> anyhow::Result<Stores> {
    if config.backend == ArchiveBackend::Postgres {
        let lease = postgres::Lease::acquire(config).context("cannot start the archive")?;
        let mut store = postgres::PostgresStore::open(config).context("cannot open the archive")?;
        store.fence(&lease);
        let reader =
            postgres::PostgresStore::open_existing(config).context("cannot open the archive")?;
        return Ok((
            Box::new(store),
            Box::new(reader),
            Held::Lease(lease),
            None,
            None,
        ));
    }
    let lock = Lock::acquire(&config.state_file)?;
    // The state file may be configured apart from the database: the instance of the database
    // is locked too, or two servers would chain and number the same instance.
    let instance_lock = Lock::for_instance(&config.database, config.instance_id)
        .context("cannot open the archive")?;
    let busy = Duration::from_millis(config.busy_timeout_ms);
    let mut store = SqliteStore::open(&config.database, busy).context("cannot open the archive")?;
    let layout = store
        .settle_layout(config.layout)
        .context("cannot open the archive")?;
    if layout != config.layout {
        tracing::warn!(
            archive = %config.database.display(),
            ?layout,
            configured = ?config.layout,
            "the archive keeps the layout it was made with; archive.layout applies to new ones"
        );
    }
    let reader = open_sqlite_read_only(&config.database).context("cannot open the archive")?;
    // The checkpointer copies the rows' write-ahead log beside the writer (without it, the
    // writer checkpoints as often as SQLite's default). A token log's database takes a few
    // rows a second (events, reservations): SQLite's own checkpoints are enough there.
    let checkpointer = match layout {
        sqlite::Layout::Log => None,
        sqlite::Layout::Rows => match checkpointer::Checkpointer::start(&config.database) {
            Ok(checkpointer) => {
                store
                    .set_autocheckpoint(checkpointer::WRITER_PAGES)
                    .context("cannot open the archive")?;
                Some(checkpointer)
            }
            Err(e) => {
                tracing::warn!(error = %e, "archive checkpoints stay in the writer's commits");
                None
            }
        },
    };
    let store: Box<dyn ArchiveStore> = match layout {
        sqlite::Layout::Rows => Box::new(store),
        sqlite::Layout::Log => {
            Box::new(log::LogStore::open(store).with_segment_limit(config.log_segment_mib << 20))
        }
    };
    Ok((
        store,
        reader,
        Held::Lock(lock, instance_lock),
        checkpointer,
        Some(layout),
    ))
}

/// The backend's name and where its data is (never a password), for the logs.
fn location(config: &ArchiveConfig) -> (&'static str, String) {
    match config.backend {
        ArchiveBackend::Sqlite => ("sqlite", config.database.display().to_string()),
        ArchiveBackend::Postgres => ("postgres", postgres::describe(config)),
    }
}

/// Opens the configured archive for reading (the CLI; works while the server runs).
pub fn open_read_only(config: &ArchiveConfig) -> anyhow::Result<Box<dyn ArchiveStore>> {
    if config.backend == ArchiveBackend::Postgres {
        return Ok(Box::new(postgres::PostgresStore::open_existing(config)?));
    }
    Ok(open_sqlite_read_only(&config.database)?)
}

/// Opens an existing SQLite archive for reading, in its layout.
pub fn open_sqlite_read_only(
    database: &std::path::Path,
) -> Result<Box<dyn ArchiveStore>, store::StoreError> {
    let db = SqliteStore::open_read_only(database)?;
    Ok(match sqlite::layout_of(db.connection())? {
        sqlite::Layout::Rows => Box::new(db),
        sqlite::Layout::Log => Box::new(log::LogStore::open_read_only(db)),
    })
}

/// Opens the configured archive for writing (the CLI's prune).
pub fn open_writable(config: &ArchiveConfig) -> anyhow::Result<Box<dyn ArchiveStore>> {
    if config.backend == ArchiveBackend::Postgres {
        return Ok(Box::new(postgres::PostgresStore::open_existing(config)?));
    }
    if !config.database.exists() {
        bail!("{} does not exist", config.database.display());
    }
    Ok(log::open_for_maintenance(
        &config.database,
        Duration::from_millis(config.busy_timeout_ms),
    )?)
}

/// An OID in dotted form, as records keep it. Requests name a handful of digests and
/// policies, so each thread remembers the last few it wrote out (formatting one costs more
/// than the rest of the record's copying).
fn dotted(oid: &const_oid::ObjectIdentifier) -> String {
    use std::cell::RefCell;
    thread_local! {
        static SEEN: RefCell<Vec<(const_oid::ObjectIdentifier, String)>> =
            const { RefCell::new(Vec::new()) };
    }
    SEEN.with_borrow_mut(|seen| {
        if let Some((_, name)) = seen.iter().find(|(o, _)| o == oid) {
            return name.clone();
        }
        let name = oid.to_string();
        if seen.len() == 8 {
            seen.remove(0);
        }
        seen.push((*oid, name.clone()));
        name
    })
}

/// The hex of a record's serial, as look-ups and file names use it.
pub fn serial_hex(record: &StoredRecord) -> String {
    hex(&record.record.serial)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use const_oid::ObjectIdentifier;

    use super::record::tests_support::{event, sample};
    use super::record::{Checkpoint, EventRecord, StoredRecord, ZERO_HASH};
    use super::store::ArchiveStore;
    use super::*;

    #[test]
    fn look_ups_leave_out_this_instances_records_past_its_durable_end() {
        let stored =
            |instance, seq| StoredRecord::chain(instance, seq, seq, sample(10), record::ZERO_HASH);
        let end = DurableEnd {
            instance_id: 1,
            seq: 10,
        };
        assert!(end.holds(&stored(1, 10)));
        assert!(!end.holds(&stored(1, 11)), "written, not synced yet");
        assert!(
            end.holds(&stored(2, 11)),
            "another instance's, committed in its store"
        );
        let found = end.only(ImprintMatches {
            records: vec![stored(1, 12), stored(2, 40), stored(1, 11), stored(1, 9)],
            total: 7,
        });
        let kept: Vec<_> = found
            .records
            .iter()
            .map(|r| (r.instance_id, r.seq))
            .collect();
        assert_eq!(kept, [(2, 40), (1, 9)]);
        assert_eq!(found.total, 5);
    }

    /// An archive in `dir` (the token log), its state file `state`.
    pub(super) fn config(dir: &Path, state: &str) -> ArchiveConfig {
        ArchiveConfig {
            enabled: true,
            database: dir.join("archive.sqlite"),
            state_file: dir.join(state),
            checkpoint_interval_s: 3600,
            ..ArchiveConfig::default()
        }
    }

    pub(super) fn signer() -> CheckpointSigner {
        CheckpointSigner {
            sign: Box::new(|_| Ok(vec![1])),
            algorithm: vec![0x30, 0x00],
            certificate: vec![0x30, 0x00],
        }
    }

    /// `n` records of instance 0 from position 1 on.
    fn records(n: u64) -> Vec<StoredRecord> {
        records_of(n, 300)
    }

    /// `n` records of instance 0 from position 1 on, each with a token of `token_len` octets.
    fn records_of(n: u64, token_len: usize) -> Vec<StoredRecord> {
        records_with(n, token_len, |_, _| {})
    }

    /// [`records`], the record at position `seq` with its genTime at `seq` seconds.
    pub(super) fn records_a_second_apart(n: u64) -> Vec<StoredRecord> {
        records_with(n, 300, |seq, r| r.gen_time_ns = seq * 1_000_000_000)
    }

    /// [`records_of`], each record set by `set` (given its position) before it is chained.
    fn records_with(
        n: u64,
        token_len: usize,
        set: impl Fn(u64, &mut record::TokenRecord),
    ) -> Vec<StoredRecord> {
        let mut prev = record::ZERO_HASH;
        (1..=n)
            .map(|seq| {
                let mut r = sample(token_len);
                r.serial = layout::encode(0, seq, [7; 7]).to_vec();
                set(seq, &mut r);
                let stored = StoredRecord::chain(0, seq, seq, r, prev);
                prev = stored.hash;
                stored
            })
            .collect()
    }

    #[test]
    fn a_chain_that_ends_below_its_last_signed_checkpoint_does_not_start() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), "archive.state");
        let records = records(3);
        {
            let mut db = SqliteStore::open(&config.database, Duration::from_secs(1)).unwrap();
            db.settle_layout(sqlite::Layout::Log).unwrap();
            let mut store = log::LogStore::open(db);
            store.append(0, &records, &[]).unwrap();
            store
                .add_checkpoint(&Checkpoint {
                    instance_id: 0,
                    seq: 3,
                    head_hash: records[2].hash,
                    time_ns: 1,
                    algorithm: vec![],
                    signature: vec![1],
                    certificate: vec![],
                    events: None,
                    anchor_seq: 0,
                })
                .unwrap();
        }
        // The last record is lost with its index entry (a segment restored from an older
        // copy, say): the log alone looks whole, ending at record 2.
        let segment = log::segments::segments(&log::segments::instance_dir(
            &log::segments::dir_for(&config.database),
            0,
        ))
        .unwrap()
        .pop()
        .unwrap();
        let third = log::segments::offset_of(&segment, 3).unwrap().unwrap();
        std::fs::remove_file(segment.index_path()).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&segment.path)
            .unwrap()
            .set_len(third)
            .unwrap();

        let error = Archive::open(&config, signer(), 16)
            .err()
            .expect("must not start");
        let text = format!("{error:#}");
        assert!(text.contains("checkpoint"), "{text}");
        assert_eq!(
            std::fs::metadata(&segment.path).unwrap().len(),
            third,
            "left as it was"
        );
    }

    /// A sector of the last checkpointed frame reads as zeros and its index entry is lost (a
    /// disk that lost a sector of acknowledged frames): it looks like a torn commit, yet a
    /// signed checkpoint covers it. The start refuses before it cuts or copies anything.
    #[test]
    fn a_checkpointed_frame_that_looks_torn_is_not_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), "archive.state");
        // Frames of some 2 KB: the third holds a whole sector.
        let records = records_of(3, 2_000);
        {
            let mut db = SqliteStore::open(&config.database, Duration::from_secs(1)).unwrap();
            db.settle_layout(sqlite::Layout::Log).unwrap();
            let mut store = log::LogStore::open(db);
            store.append(0, &records, &[]).unwrap();
            store.add_checkpoint(&checkpoint_of(&records[2])).unwrap();
        }
        let folder = log::segments::instance_dir(&log::segments::dir_for(&config.database), 0);
        let segment = log::segments::segments(&folder).unwrap().pop().unwrap();
        let third = log::segments::offset_of(&segment, 3).unwrap().unwrap();
        std::fs::remove_file(segment.index_path()).unwrap();
        let sector = (third + 4).div_ceil(512) * 512;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&segment.path)
            .unwrap();
        use std::os::unix::fs::FileExt;
        file.write_all_at(&[0; 512], sector).unwrap();
        drop(file);
        let octets = std::fs::read(&segment.path).unwrap();
        assert!(
            sector + 512 < octets.len() as u64,
            "the sector is inside the frame"
        );
        let names = |folder: &Path| {
            let mut names: Vec<_> = std::fs::read_dir(folder)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            names
        };
        let before = names(&folder);

        let error = Archive::open(&config, signer(), 16)
            .err()
            .expect("must not start");
        let text = format!("{error:#}");
        assert!(text.contains("checkpoint"), "{text}");
        assert!(
            std::fs::read(&segment.path).unwrap() == octets,
            "the segment was changed"
        );
        assert_eq!(names(&folder), before, "files were made or removed");
        assert!(text.contains(&segment.path.display().to_string()), "{text}");
    }

    /// Index entries are derived data: a garbled one (a far-future genTime, the last counter)
    /// is no floor for the counters and genTimes the start hands out.
    #[test]
    fn garbled_index_entries_set_no_floor() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), "archive.state");
        let mut records = records(3);
        let mut prev = record::ZERO_HASH;
        for (r, second) in records.iter_mut().zip(1..) {
            let mut token = r.record.clone();
            token.gen_time_ns = 1_700_000_000_000_000_000 + second * 1_000_000_000;
            *r = StoredRecord::chain(0, r.seq, r.counter, token, prev);
            prev = r.hash;
        }
        {
            let mut db = SqliteStore::open(&config.database, Duration::from_secs(1)).unwrap();
            db.settle_layout(sqlite::Layout::Log).unwrap();
            let mut store = log::LogStore::open(db);
            store.append(0, &records, &[]).unwrap();
        }
        let folder = log::segments::instance_dir(&log::segments::dir_for(&config.database), 0);
        let segment = log::segments::segments(&folder).unwrap().pop().unwrap();
        // Entry 0's genTime in the year 2200, entry 1's counter the last there is; their
        // positions and offsets as they were.
        let index = std::fs::OpenOptions::new()
            .write(true)
            .open(segment.index_path())
            .unwrap();
        use std::os::unix::fs::FileExt;
        let year_2200_ns = 7_258_118_400_000_000_000u64;
        index.write_all_at(&year_2200_ns.to_be_bytes(), 24).unwrap();
        index
            .write_all_at(
                &u64::MAX.to_be_bytes(),
                log::segments::ENTRY_LEN as u64 + 16,
            )
            .unwrap();
        drop(index);

        let archive = Archive::open(&config, signer(), 16).unwrap();
        assert_eq!(archive.gen_time_floor_ns(), records[2].record.gen_time_ns);
        assert_eq!(archive.serials().position().0, 4, "the next counter");
        archive.close();
        let saved = StateFile::new(&config.state_file).read().unwrap().unwrap();
        assert_eq!(saved.gen_time_ns, records[2].record.gen_time_ns);
    }

    /// A checkpoint of instance 0 signing `record` as its head.
    pub(super) fn checkpoint_of(record: &StoredRecord) -> Checkpoint {
        Checkpoint {
            instance_id: 0,
            seq: record.seq,
            head_hash: record.hash,
            time_ns: 1,
            algorithm: vec![],
            signature: vec![1],
            certificate: vec![],
            events: None,
            anchor_seq: 0,
        }
    }

    /// A new archive of `layout` in `dir`; the token log's segments small (a few records each).
    fn store_of(layout: sqlite::Layout, dir: &Path) -> Box<dyn ArchiveStore> {
        let database = dir.join("archive.sqlite");
        let mut db = SqliteStore::open(&database, Duration::from_secs(1)).unwrap();
        db.settle_layout(layout).unwrap();
        match layout {
            sqlite::Layout::Rows => Box::new(db),
            sqlite::Layout::Log => Box::new(log::LogStore::open(db).with_segment_limit(1024)),
        }
    }

    #[test]
    fn pruning_never_goes_past_the_last_signed_checkpoint() {
        for layout in [sqlite::Layout::Rows, sqlite::Layout::Log] {
            let dir = tempfile::tempdir().unwrap();
            let mut store = store_of(layout, dir.path());
            let records = records(10);
            // No signed checkpoint yet: nothing is pruned.
            store.append(0, &records[..5], &[]).unwrap();
            assert_eq!(store.prune(0, u64::MAX).unwrap(), None, "{layout:?}");
            store.add_checkpoint(&checkpoint_of(&records[4])).unwrap();
            // Five more records that no checkpoint signs (its signature failed, say).
            for r in &records[5..] {
                store.append(0, std::slice::from_ref(r), &[]).unwrap();
            }
            let anchor = store.prune(0, u64::MAX).unwrap().expect("pruned");
            assert!(anchor.seq <= 5, "{layout:?}: anchor at {}", anchor.seq);
            assert_eq!(anchor.hash, records[anchor.seq as usize - 1].hash);
            let mut kept = Vec::new();
            store
                .for_each_record(0, 1, &mut |r| {
                    kept.push(r.seq);
                    Ok(true)
                })
                .unwrap();
            assert_eq!(
                kept,
                (anchor.seq + 1..=10).collect::<Vec<_>>(),
                "{layout:?}"
            );
            assert_eq!(store.instance(0).unwrap().head.unwrap().seq, 10);
        }
    }

    /// The latest genTime of a segment's records, not of its index entries, decides whether it
    /// is pruned: an entry garbled to an early genTime does not make it look old enough.
    #[test]
    fn pruning_takes_no_gen_time_from_a_garbled_index() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = store_of(sqlite::Layout::Log, dir.path());
        let second = 1_000_000_000u64;
        let records = records_a_second_apart(10);
        for r in &records {
            store.append(0, std::slice::from_ref(r), &[]).unwrap();
        }
        store.add_checkpoint(&checkpoint_of(&records[9])).unwrap();
        let folder = log::segments::instance_dir(
            &log::segments::dir_for(&dir.path().join("archive.sqlite")),
            0,
        );
        let all = log::segments::segments(&folder).unwrap();
        assert!(all.len() > 2, "{} segments", all.len());
        let first = &all[0];
        // The entry of the first segment's last record (its latest genTime) says 0.
        let entries =
            std::fs::metadata(first.index_path()).unwrap().len() / log::segments::ENTRY_LEN as u64;
        let last_seq = first.first_seq + entries - 1;
        assert_eq!(
            last_seq + 1,
            all[1].first_seq,
            "the index lists every record"
        );
        let index = std::fs::OpenOptions::new()
            .write(true)
            .open(first.index_path())
            .unwrap();
        use std::os::unix::fs::FileExt;
        let at = (entries - 1) * log::segments::ENTRY_LEN as u64 + 24;
        index.write_all_at(&0u64.to_be_bytes(), at).unwrap();
        drop(index);

        // Up to that record's genTime, excluded: it stays, and so does its segment.
        assert_eq!(store.prune(0, last_seq * second).unwrap(), None);
        assert!(first.path.exists());
        // Past it, the segment goes.
        let anchor = store
            .prune(0, last_seq * second + 1)
            .unwrap()
            .expect("pruned");
        assert_eq!(anchor.seq, last_seq);
        assert_eq!(anchor.max_gen_time_ns, last_seq * second);
    }

    /// A segment removed by a prune while a look-up goes over the segments (listed before):
    /// the records of the others are still found, by imprint and by serial.
    #[test]
    fn a_segment_pruned_during_a_look_up_leaves_the_others_found() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = store_of(sqlite::Layout::Log, dir.path());
        // Every record of the same imprint, in segments of a few records each.
        let records = records_a_second_apart(10);
        for r in &records {
            store.append(0, std::slice::from_ref(r), &[]).unwrap();
        }
        let folder = log::segments::instance_dir(
            &log::segments::dir_for(&dir.path().join("archive.sqlite")),
            0,
        );
        let all = log::segments::segments(&folder).unwrap();
        assert!(all.len() > 2, "{} segments", all.len());
        let first_kept = all[1].first_seq;
        // Listed, then gone when opened: a link to nothing stands for the race.
        std::fs::remove_file(&all[0].path).unwrap();
        std::os::unix::fs::symlink(dir.path().join("gone"), &all[0].path).unwrap();
        let found = store
            .records_by_imprint(&records[0].record.imprint, 100)
            .unwrap();
        let mut seqs: Vec<u64> = found.records.iter().map(|r| r.seq).collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (first_kept..=10).collect::<Vec<_>>());
        let serial = &records[0].record.serial;
        assert!(store.record_by_serial(serial).unwrap().is_none());
        let last = &records[9].record.serial;
        assert_eq!(
            store.record_by_serial(last).unwrap().map(|r| r.seq),
            Some(10)
        );
    }

    #[test]
    fn rows_are_pruned_in_bounded_steps() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = store_of(sqlite::Layout::Rows, dir.path());
        let records = records(10);
        store.append(0, &records, &[]).unwrap();
        store.add_checkpoint(&checkpoint_of(&records[9])).unwrap();
        let mut anchors = Vec::new();
        while let Some(anchor) = store.prune(0, u64::MAX).unwrap() {
            anchors.push(anchor.seq);
        }
        // PRUNE_ROWS is 3 in tests: each step one transaction of at most three records.
        assert_eq!(anchors, [3, 6, 9, 10]);
        assert_eq!(store.instance(0).unwrap().anchor.unwrap().seq, 10);
    }

    #[test]
    fn checkpoints_take_a_reloaded_certificate_only_of_their_own_key() {
        use der::Encode;
        let der = |pki: &crate::pki::DevPki| {
            x509_cert::Certificate::load_pem_chain(pki.tsu_cert_pem.as_bytes()).unwrap()[0]
                .to_der()
                .unwrap()
        };
        let (a, b) = (
            der(&crate::pki::DevPki::generate(crate::pki::KeyAlgorithm::P256).unwrap()),
            der(&crate::pki::DevPki::generate(crate::pki::KeyAlgorithm::P256).unwrap()),
        );
        let mut signer = CheckpointSigner {
            sign: Box::new(|_| Ok(Vec::new())),
            algorithm: Vec::new(),
            certificate: a.clone(),
        };
        // The rollover's certificate (another key), sent by a reload before its key came.
        assert!(!signer.renew_certificate(b.clone()));
        assert!(!signer.renew_certificate(b"not a certificate".to_vec()));
        assert_eq!(signer.certificate, a);
        assert!(signer.renew_certificate(a.clone()));
        assert_eq!(signer.certificate, a);
    }

    #[test]
    fn a_prune_signs_its_anchor_before_it_locks_the_instance() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = store_of(sqlite::Layout::Rows, dir.path());
        let records = records(10);
        store.append(0, &records, &[]).unwrap();
        store.add_checkpoint(&checkpoint_of(&records[9])).unwrap();
        // While the anchor is signed (an HSM may take seconds), another process can write:
        // the server's commits do not wait for the signer.
        let database = dir.path().join("archive.sqlite");
        let written = std::sync::Mutex::new(Vec::new());
        let sign = |anchor: &record::Anchor| {
            let other = rusqlite::Connection::open(&database).unwrap();
            other.busy_timeout(Duration::ZERO).unwrap();
            let wrote = other.execute_batch("BEGIN IMMEDIATE; COMMIT;").is_ok();
            written.lock().unwrap().push((anchor.seq, wrote));
            Ok(None)
        };
        let anchor = store.prune_signed(0, u64::MAX, &sign).unwrap().unwrap();
        assert_eq!(anchor.seq, 3);
        assert_eq!(*written.lock().unwrap(), [(3, true)]);
    }

    #[test]
    fn a_prune_whose_cut_moved_while_it_signed_signs_the_new_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = store_of(sqlite::Layout::Rows, dir.path());
        let records = records(10);
        store.append(0, &records, &[]).unwrap();
        store.add_checkpoint(&checkpoint_of(&records[9])).unwrap();
        // A second prune (another process) takes the first step while the first one signs
        // it: the first one then signs and stores the next step, never the anchor it signed
        // first over records already gone.
        let signed = std::sync::Mutex::new(Vec::new());
        let sign = |anchor: &record::Anchor| {
            let mut signed = signed.lock().unwrap();
            if signed.is_empty() {
                let mut other = store_of(sqlite::Layout::Rows, dir.path());
                assert_eq!(other.prune(0, u64::MAX).unwrap().unwrap().seq, anchor.seq);
            }
            signed.push(anchor.seq);
            Ok(None)
        };
        let anchor = store.prune_signed(0, u64::MAX, &sign).unwrap().unwrap();
        assert_eq!(*signed.lock().unwrap(), [3, 6]);
        assert_eq!(anchor.seq, 6);
        let state = store.instance(0).unwrap();
        assert_eq!(
            state.anchor.map(|a| (a.seq, a.hash)),
            Some((6, records[5].hash))
        );
    }

    #[test]
    fn pruning_keeps_the_events_of_the_records_it_keeps() {
        for layout in [sqlite::Layout::Rows, sqlite::Layout::Log] {
            let dir = tempfile::tempdir().unwrap();
            let mut store = store_of(layout, dir.path());
            // Records one second apart, and an event at each one's genTime: the key loaded
            // first, then the clock's sync lost and acquired in turns.
            let second = 1_000_000_000u64;
            let records = records_a_second_apart(10);
            let kind = |seq: u64| match seq {
                1 => "key_loaded",
                s if s % 2 == 0 => "sync_lost",
                _ => "sync_acquired",
            };
            let events: Vec<EventRecord> = (1..=10u64)
                .map(|seq| event(seq, seq * second, kind(seq)))
                .collect();
            for (r, e) in records.iter().zip(&events) {
                store
                    .append(0, std::slice::from_ref(r), std::slice::from_ref(e))
                    .unwrap();
            }
            let events_left = |store: &mut Box<dyn ArchiveStore>| -> Vec<u64> {
                let all = store.events(0, u64::MAX).unwrap();
                all.iter().map(|e| e.time_ns / second).collect()
            };
            // No checkpoint: no record goes, and none of their events either.
            assert_eq!(store.prune(0, u64::MAX).unwrap(), None, "{layout:?}");
            assert_eq!(
                events_left(&mut store),
                (1..=10).collect::<Vec<_>>(),
                "{layout:?}"
            );
            // Signed up to 7: the records up to the anchor go, and the events before the
            // oldest record kept, but for the last of each kind (the key loaded, the clock's
            // last state before it), under which the records kept were issued.
            store.add_checkpoint(&checkpoint_of(&records[6])).unwrap();
            let mut anchor = store.prune(0, u64::MAX).unwrap().expect("pruned");
            // Rows go in bounded steps.
            while let Some(further) = store.prune(0, u64::MAX).unwrap() {
                anchor = further;
            }
            assert!(anchor.seq >= 4, "{layout:?}: anchor at {}", anchor.seq);
            let last_of = |k: &str| (1..=anchor.seq).rev().find(|&s| kind(s) == k).unwrap();
            let mut kept = vec![
                last_of("key_loaded"),
                last_of("sync_lost"),
                last_of("sync_acquired"),
            ];
            kept.sort_unstable();
            kept.extend(anchor.seq + 1..=10);
            assert_eq!(
                events_left(&mut store),
                kept,
                "{layout:?}: anchor at {}",
                anchor.seq
            );
        }
    }

    #[test]
    fn pruning_leaves_a_chain_of_events_that_verifies() {
        for layout in [sqlite::Layout::Rows, sqlite::Layout::Log] {
            let dir = tempfile::tempdir().unwrap();
            let mut store = store_of(layout, dir.path());
            // Records one second apart, an event at each one's genTime, chained.
            let second = 1_000_000_000u64;
            let records = records_a_second_apart(10);
            let kind = |seq: u64| {
                if seq % 2 == 0 {
                    "sync_lost"
                } else {
                    "sync_acquired"
                }
            };
            let mut prev = ZERO_HASH;
            let events: Vec<EventRecord> = (1..=10u64)
                .map(|seq| {
                    let e = event(seq, seq * second, kind(seq)).chained(prev);
                    prev = e.hash.unwrap();
                    e
                })
                .collect();
            for (r, e) in records.iter().zip(&events) {
                store
                    .append(0, std::slice::from_ref(r), std::slice::from_ref(e))
                    .unwrap();
            }
            // The checkpoint at record 7 signed the events up to the third (pruning empties
            // it: it stays, its hash as signed).
            let checkpoint = Checkpoint {
                events: Some(events[2].head()),
                ..checkpoint_of(&records[6])
            };
            store.add_checkpoint(&checkpoint).unwrap();
            let mut anchor = store.prune(0, u64::MAX).unwrap().expect("pruned");
            while let Some(further) = store.prune(0, u64::MAX).unwrap() {
                anchor = further;
            }
            // Old enough are the events before the oldest record kept; they are emptied but
            // for the last of each kind, and stay in the chain.
            let last_of = |k: &str| (1..=anchor.seq).rev().find(|&s| kind(s) == k);
            let emptied = |seq: u64| seq <= anchor.seq && Some(seq) != last_of(kind(seq));
            let left = store.events(0, u64::MAX).unwrap();
            let seqs: Vec<u64> = left.iter().map(|e| e.seq).collect();
            assert_eq!(seqs, (1..=10).collect::<Vec<_>>(), "{layout:?}");
            let pruned: Vec<u64> = left.iter().filter(|e| e.pruned()).map(|e| e.seq).collect();
            let expected: Vec<u64> = (1..=10).filter(|&s| emptied(s)).collect();
            assert_eq!(pruned, expected, "{layout:?}: anchor at {}", anchor.seq);
            if layout == sqlite::Layout::Rows {
                assert_eq!(pruned, [1, 2, 3, 4, 5]);
            }
            assert!(left.iter().all(|e| !e.pruned() || e.message.is_empty()));
            let kept_from = records[anchor.seq as usize].record.gen_time_ns;
            let report =
                verify::verify_events(&mut *store, 0, &[checkpoint], &[], |_| Ok(Some(kept_from)))
                    .unwrap();
            assert_eq!(report.first_break, None, "{layout:?}");
        }
    }

    #[test]
    fn one_process_per_instance_of_a_database_whatever_its_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let first = Archive::open(&config(dir.path(), "a.state"), signer(), 16).unwrap();
        let error = Archive::open(&config(dir.path(), "b.state"), signer(), 16)
            .err()
            .expect("a second process on the same instance must not start");
        let text = format!("{error:#}");
        assert!(text.contains("instance 0"), "{text}");
        assert!(text.contains("locked"), "{text}");
        // Another instance of the same database has a lock of its own.
        let other = ArchiveConfig {
            instance_id: 1,
            ..config(dir.path(), "c.state")
        };
        Archive::open(&other, signer(), 16).unwrap().close();
        first.close();
        drop(first);
        Archive::open(&config(dir.path(), "b.state"), signer(), 16)
            .unwrap()
            .close();
    }

    #[test]
    fn a_checkpoint_at_a_signed_position_with_another_head_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut db =
            SqliteStore::open(&dir.path().join("archive.sqlite"), Duration::from_secs(1)).unwrap();
        let checkpoint = Checkpoint {
            instance_id: 0,
            seq: 3,
            head_hash: [3; 32],
            time_ns: 1,
            algorithm: vec![],
            signature: vec![1],
            certificate: vec![],
            events: None,
            anchor_seq: 0,
        };
        db.add_checkpoint(&checkpoint).unwrap();
        db.add_checkpoint(&checkpoint).unwrap();
        let other = Checkpoint {
            head_hash: [4; 32],
            ..checkpoint.clone()
        };
        let error = db.add_checkpoint(&other).unwrap_err();
        assert!(error.to_string().contains("another head"), "{error}");
        assert_eq!(db.checkpoints(0).unwrap(), [checkpoint]);
    }

    #[test]
    fn dotted_names_come_back_right_past_what_a_thread_remembers() {
        // More OIDs than a thread keeps, twice over: each is its own dotted form every time.
        let oids: Vec<String> = (1..=12).map(|n| format!("1.3.6.1.4.1.32473.{n}")).collect();
        for _ in 0..2 {
            for text in &oids {
                let oid = ObjectIdentifier::new(text).unwrap();
                assert_eq!(&super::dotted(&oid), text);
            }
        }
    }

    #[test]
    fn an_archive_of_schema_1_is_migrated_and_its_events_chained_after_the_old_ones() {
        use crate::archive::serial::SerialAllocator;
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path(), "archive.state");
        config.layout = sqlite::Layout::Rows;
        let old = |seq: u64| event(seq, seq, "sync_acquired");
        {
            let mut db = SqliteStore::open(&config.database, Duration::from_secs(1)).unwrap();
            db.append(0, &[], &[old(1), old(2)]).unwrap();
            // What schema 1 was.
            db.connection()
                .execute_batch(&crate::archive::store::back_to_1_for_tests())
                .unwrap();
        }
        // Read as it is (a backup an auditor verifies).
        let mut read = SqliteStore::open_read_only(&config.database).unwrap();
        assert_eq!(read.events_from(0, 0, 10).unwrap(), [old(1), old(2)]);
        drop(read);

        // A server opens it: migrated, the events after the old ones chained from zeros, and
        // the checkpoint at its close signs the last one stored before it.
        let archive = Archive::open(&config, signer(), 16).unwrap();
        let serials = archive.serials();
        let mut record = sample(300);
        record.serial = serials.next().unwrap().as_bytes().to_vec();
        archive.record_blocking(record).unwrap();
        archive.close();
        let mut store = SqliteStore::open_read_only(&config.database).unwrap();
        let version: String = store
            .connection()
            .query_row(
                "SELECT value FROM archive_meta WHERE name = 'schema'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(version, store::SCHEMA_VERSION);
        let events = store.events_from(0, 0, 100).unwrap();
        assert_eq!(events[2].kind, "archive_opened");
        assert_eq!(events[2].prev_hash, Some(ZERO_HASH));
        let checkpoints = store.checkpoints(0).unwrap();
        let signed = checkpoints.last().unwrap().events.unwrap();
        let at = events.iter().find(|e| e.seq == signed.seq).unwrap();
        assert_eq!(at.hash, Some(signed.hash));
        let report = verify::verify_events(&mut store, 0, &checkpoints, &[], |_| Ok(None)).unwrap();
        assert_eq!(report.first_break, None, "{events:#?}");
        assert_eq!(report.unchained, 2);
        // The checkpoint at close signed the last event (no `tracing` layer here: the
        // checkpoint's own event is not archived).
        assert_eq!((report.events, report.unsigned), (3, 0), "{report:?}");
    }

    #[test]
    fn a_writer_that_hangs_fails_readiness_until_it_writes_again() {
        use crate::archive::serial::SerialAllocator;
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path(), "archive.state");
        config.layout = sqlite::Layout::Rows;
        config.busy_timeout_ms = 1_000;
        let archive = Archive::open(&config, signer(), 2).unwrap();
        let serials = archive.serials();
        let record = || {
            let mut r = sample(300);
            r.serial = serials.next().unwrap().as_bytes().to_vec();
            r
        };
        assert!(archive.health().is_ok());
        // Another process holds the database: the writer's commit waits for it.
        let locker = rusqlite::Connection::open(&config.database).unwrap();
        locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
        let mut waiting = Vec::new();
        let mut refused = None;
        for _ in 0..10 {
            match archive.enqueue(record()) {
                Ok(done) => waiting.push(done),
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let refused = refused.expect("the queue of two filled while the writer waited");
        assert!(refused.0.contains("too many tokens wait"), "{}", refused.0);
        let not_ready = archive.health().unwrap_err();
        assert!(not_ready.contains("hangs"), "{not_ready}");
        // The lock outlasts the writer's busy timeout: its commit fails. Once the database is
        // free, the archive is ready again by itself: the writer's recovery writes again (no
        // request needs to come: a balancer sends none to an instance that is not ready).
        std::thread::sleep(Duration::from_millis(1_500));
        locker.execute_batch("ROLLBACK").unwrap();
        drop(waiting);
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while let Err(e) = archive.health() {
            assert!(std::time::Instant::now() < deadline, "{e}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let committed = archive.enqueue(record()).unwrap().blocking_recv().unwrap();
        assert!(committed.is_ok(), "{committed:?}");
        archive.close();
    }
}
