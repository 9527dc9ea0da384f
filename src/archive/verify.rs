//! Verification of the archive: every instance's hash chain from its anchor (or the start) to
//! its head, every record against the token it holds, and every signed checkpoint against the
//! chain and a trusted TSU certificate. Reports the first break of each chain.

mod events;

use std::collections::HashMap;
use std::fmt;

use der::{Decode, Encode};
use spki::AlgorithmIdentifierOwned;
use x509_cert::Certificate;

use super::record::{hex, Anchor, ChainHead, Checkpoint, StoredRecord, ZERO_HASH};
use super::serial::layout;
use super::store::{ArchiveStore, StoreError, UnreadTail};
use crate::client::read::Token;
use crate::client::verify::{signer_among, verify_signature, verify_signed_by};

pub use events::{verify_events, EventsReport};

/// Where a chain breaks and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Break {
    /// The record's position (or the checkpoint's).
    pub seq: u64,
    /// The record's serial in hex, when there is a record there.
    pub serial: Option<String>,
    pub what: String,
}

#[derive(Clone, Debug)]
pub struct InstanceReport {
    pub instance_id: u32,
    /// Records present (after the anchor).
    pub records: u64,
    pub anchor: Option<Anchor>,
    pub head: ChainHead,
    pub checkpoints: usize,
    /// The last checkpoint: (position, time).
    pub last_checkpoint: Option<(u64, u64)>,
    pub first_break: Option<Break>,
    /// What verification cannot vouch for, though nothing is broken: records after the last
    /// signed checkpoint, an instance without records.
    pub warnings: Vec<String>,
    /// The certificates that signed its checkpoints: (SHA-256 of the DER in hex, subject).
    pub checkpoint_signers: Vec<(String, String)>,
    /// The last checkpoint's position and head hash.
    pub signed_head: Option<(u64, [u8; 32])>,
    /// The events' head the last checkpoint signs (none before schema 2, or before events).
    pub signed_events: Option<ChainHead>,
    /// Its events (their chain breaks apart from the records').
    pub events: EventsReport,
}

impl InstanceReport {
    /// Neither its records' chain nor its events' is broken.
    pub fn ok(&self) -> bool {
        self.first_break.is_none() && self.events.first_break.is_none()
    }
}

/// A chain head an auditor recorded earlier (from this report's `head` or `events head`
/// line, or from an `archive_checkpoint` event in a log kept elsewhere): the chain must still
/// hold it. Rows and files can be rewritten back to any earlier checkpoint with nothing on the
/// disk to tell; a head kept elsewhere can.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expected {
    pub instance_id: u32,
    pub seq: u64,
    pub hash: [u8; 32],
    /// The records' chain (`--expect`) or the events' (`--expect-events`).
    pub chain: Chain,
}

/// An instance's two chains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chain {
    Records,
    Events,
}

impl Expected {
    /// The same head, of the events' chain.
    pub fn of_events(self) -> Self {
        Self {
            chain: Chain::Events,
            ..self
        }
    }
}

impl std::str::FromStr for Expected {
    type Err = String;

    /// `INSTANCE:SEQ:HASH`, the hash in hex (64 digits).
    fn from_str(text: &str) -> Result<Self, String> {
        let wrong = || format!("'{text}' is not INSTANCE:SEQ:HASH (the hash in 64 hex digits)");
        let mut parts = text.trim().split(':');
        let (Some(instance), Some(seq), Some(hash), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(wrong());
        };
        let hash = crate::archive::decode_hex(hash)
            .and_then(|h| <[u8; 32]>::try_from(h).ok())
            .ok_or_else(wrong)?;
        Ok(Self {
            instance_id: instance.parse().map_err(|_| wrong())?,
            seq: seq.parse().map_err(|_| wrong())?,
            hash,
            chain: Chain::Records,
        })
    }
}

#[derive(Clone, Debug, Default)]
pub struct Report {
    pub instances: Vec<InstanceReport>,
    /// Instances the caller named (`--instance`, `--expect`) that the archive does not hold
    /// at all: a break, as records removed are.
    pub missing: Vec<u32>,
    /// The configuration's own instance, where the archive holds others but nothing of it (a
    /// node not started yet, or one whose records were removed): a warning.
    pub configured_missing: Option<u32>,
}

impl Report {
    /// No chain is broken, and no instance named is missing.
    pub fn ok(&self) -> bool {
        self.missing.is_empty() && self.instances.iter().all(InstanceReport::ok)
    }

    /// What the report warns of (an empty archive, records no checkpoint signs); `tsa archive
    /// verify --strict` fails on them.
    pub fn warnings(&self) -> Vec<String> {
        if self.instances.is_empty() {
            return vec![EMPTY.to_string()];
        }
        self.configured_missing
            .map(configured_missing)
            .into_iter()
            .chain(self.instances.iter().flat_map(|i| {
                i.warnings
                    .iter()
                    .map(move |w| format!("instance {}: {w}", i.instance_id))
            }))
            .collect()
    }
}

fn configured_missing(id: u32) -> String {
    format!(
        "instance {id} (the configuration's) has nothing in the archive: it has not run \
         against it yet, or all of it was removed"
    )
}

const EMPTY: &str = "the archive is empty: no instance has a record, an anchor, a reservation or \
                     a checkpoint (a new archive, or one emptied)";

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for id in &self.missing {
            writeln!(
                f,
                "instance {id}: BROKEN: the archive holds nothing of it (no record, anchor, \
                 reservation or checkpoint): it never ran against this archive, or all of it \
                 was removed"
            )?;
        }
        if self.instances.is_empty() {
            return writeln!(f, "WARNING: {EMPTY}");
        }
        if let Some(id) = self.configured_missing {
            writeln!(f, "WARNING: {}", configured_missing(id))?;
        }
        for i in &self.instances {
            write!(
                f,
                "instance {}: {} records verified, up to {}",
                i.instance_id, i.records, i.head.seq
            )?;
            if let Some(a) = &i.anchor {
                write!(f, ", pruned up to {} (anchor {})", a.seq, hex(&a.hash[..8]))?;
            }
            match i.last_checkpoint {
                Some((seq, time_ns)) => write!(
                    f,
                    ", {} signed checkpoints, the last at {seq} ({})",
                    i.checkpoints,
                    crate::protocol::GenTime::from_unix_ns(time_ns)
                )?,
                None => write!(f, ", no signed checkpoint")?,
            }
            if let Some((seq, _)) = i.last_checkpoint {
                if i.head.seq > seq {
                    write!(f, ", {} records after it", i.head.seq - seq)?;
                }
            }
            match &i.first_break {
                None => writeln!(f, ": OK")?,
                Some(b) => writeln!(
                    f,
                    "\n  BROKEN at record {}{}: {}",
                    b.seq,
                    b.serial
                        .as_ref()
                        .map(|s| format!(" (serial {s})"))
                        .unwrap_or_default(),
                    b.what
                )?,
            }
            if let Some((seq, hash)) = i.signed_head.filter(|_| i.first_break.is_none()) {
                // To keep elsewhere and give back as --expect: a rollback to an earlier
                // checkpoint leaves nothing on this disk to tell. The last checkpoint's, which
                // is durable (a running server's last frames may not be yet).
                writeln!(f, "  head: {}:{seq}:{}", i.instance_id, hex(&hash))?;
            }
            for (sha256, subject) in &i.checkpoint_signers {
                writeln!(f, "  checkpoints signed by {subject} (SHA-256 {sha256})")?;
            }
            let e = &i.events;
            write!(f, "  events: {} read, up to {}", e.events, e.last_seq)?;
            if e.unchained > 0 {
                write!(
                    f,
                    ", {} of them stored before events were chained (nothing vouches for \
                     those)",
                    e.unchained
                )?;
            }
            if e.pruned > 0 {
                write!(f, ", {} emptied by pruning", e.pruned)?;
            }
            if e.unsigned > 0 {
                write!(f, ", {} after the last checkpoint", e.unsigned)?;
            }
            match &e.first_break {
                None => writeln!(f, ": OK")?,
                Some((seq, what)) => writeln!(f, "\n  BROKEN at event {seq}: {what}")?,
            }
            if let Some(head) = i.signed_events.filter(|_| i.ok()) {
                // The same for the events (--expect-events): a checkpoint signed again with
                // later events replaces the one before.
                writeln!(
                    f,
                    "  events head: {}:{}:{}",
                    i.instance_id,
                    head.seq,
                    hex(&head.hash)
                )?;
            }
            for w in &i.warnings {
                writeln!(f, "  WARNING: {w}")?;
            }
        }
        Ok(())
    }
}

/// Verifies every instance in `store`; checkpoints, the tokens at their positions and the
/// tokens after the last one must be signed by one of `trusted` (DER certificates: the TSU
/// certificate, and older ones after a key change). Each of `named` must be in the archive,
/// and each of `expected` in its chain; `configured` (the configuration's instance) is a
/// warning where it is not, though others are.
pub fn verify(
    store: &mut dyn ArchiveStore,
    trusted: &[Vec<u8>],
    named: &[u32],
    expected: &[Expected],
    configured: Option<u32>,
) -> Result<Report, StoreError> {
    let mut report = Report::default();
    let signers: Vec<Certificate> = trusted
        .iter()
        .filter_map(|der| Certificate::from_der(der).ok())
        .collect();
    let present = store.instances()?;
    for instance_id in &present {
        let (records, events): (Vec<Expected>, Vec<Expected>) = expected
            .iter()
            .filter(|e| e.instance_id == *instance_id)
            .partition(|e| e.chain == Chain::Records);
        let events: Vec<ChainHead> = events
            .iter()
            .map(|e| ChainHead {
                seq: e.seq,
                hash: e.hash,
            })
            .collect();
        report.instances.push(verify_instance(
            store,
            *instance_id,
            trusted,
            &signers,
            &records,
            &events,
        )?);
    }
    let mut missing: Vec<u32> = named
        .iter()
        .chain(expected.iter().map(|e| &e.instance_id))
        .filter(|id| !present.contains(id))
        .copied()
        .collect();
    missing.sort_unstable();
    missing.dedup();
    report.missing = missing;
    report.configured_missing =
        configured.filter(|id| !present.is_empty() && !present.contains(id));
    Ok(report)
}

/// [`verify_instance_once`], again where it found a break while the anchor moved: a running
/// server's retention pruning moves it in steps while the walk reads, and a walk that started
/// from the anchor before found its first records gone ("record N is missing"). A few times:
/// each step is bounded, and a break that stays is reported.
fn verify_instance(
    store: &mut dyn ArchiveStore,
    instance_id: u32,
    trusted: &[Vec<u8>],
    signers: &[Certificate],
    expected: &[Expected],
    expected_events: &[ChainHead],
) -> Result<InstanceReport, StoreError> {
    const TRIES: usize = 5;
    let mut tries = 0;
    loop {
        let report = verify_instance_once(
            store,
            instance_id,
            trusted,
            signers,
            expected,
            expected_events,
        )?;
        tries += 1;
        // The anchor's row alone (the instance's whole state reads much more).
        let anchor_now = store.signed_anchor(instance_id)?.map(|(a, _)| a.seq);
        if report.ok() || tries == TRIES || anchor_now == report.anchor.map(|a| a.seq) {
            return Ok(report);
        }
    }
}

fn verify_instance_once(
    store: &mut dyn ArchiveStore,
    instance_id: u32,
    trusted: &[Vec<u8>],
    signers: &[Certificate],
    expected: &[Expected],
    expected_events: &[ChainHead],
) -> Result<InstanceReport, StoreError> {
    // Read before the records: a server appending meanwhile only raises what they show.
    let state = store.instance(instance_id)?;
    let checkpoints = store.checkpoints(instance_id)?;
    // The records after the last checkpoint are signed by none: their tokens' own signatures
    // are checked instead.
    let signed_up_to = checkpoints.last().map_or(0, |c| c.seq);
    let mut max_counter = state.anchor.map(|a| a.max_counter);
    let mut counters = Counters::default();
    // The positions whose hashes are compared after the walk: the checkpoints' and the
    // expected heads'.
    let wanted: HashMap<u64, ()> = checkpoints
        .iter()
        .map(|c| c.seq)
        .chain(expected.iter().map(|e| e.seq))
        .map(|seq| (seq, ()))
        .collect();
    // The checkpoints' certificates by position, and whether each signed its own position's
    // token (above the anchor, where the tokens are still there).
    let checkpointed: HashMap<u64, Option<Certificate>> = checkpoints
        .iter()
        .map(|c| (c.seq, Certificate::from_der(&c.certificate).ok()))
        .collect();
    let mut own_token: HashMap<u64, bool> = HashMap::new();
    // Which of `signers` signed the tokens checked above the anchor (by address).
    let mut token_signers = std::collections::HashSet::new();
    let start = state.anchor.map_or(ChainHead::EMPTY, |a| ChainHead {
        seq: a.seq,
        hash: a.hash,
    });
    let mut head = start;
    let mut records = 0u64;
    let mut first_break = None;
    // Pruning deletes the records up to the anchor in the anchor's own transaction: one left
    // at or below it was put back, or the anchor written over records it does not stand
    // for. Either way they are not what the chain goes on from, and look-ups still find them.
    // Without an anchor, a record at position 0 is as out of place (positions begin at 1).
    let below = state.anchor.as_ref().map_or(0, |a| a.seq);
    if let Some(r) = store.kept_below_anchor(instance_id, below)? {
        first_break = Some(Break {
            seq: r.seq,
            serial: Some(hex(&r.record.serial)),
            what: match &state.anchor {
                Some(anchor) => format!(
                    "the record is at or below the anchor ({}): pruning removed every record \
                     up to it, so the anchor does not stand for these",
                    anchor.seq
                ),
                None => "the record is at position 0: positions begin at 1".into(),
            },
        });
    }
    if first_break.is_none() {
        if let Some((r, what)) = store.misplaced_record(instance_id)? {
            first_break = Some(Break {
                seq: r.seq,
                serial: Some(hex(&r.record.serial)),
                what,
            });
        }
    }
    let mut hashes_at: HashMap<u64, [u8; 32]> = HashMap::new();
    if first_break.is_none() {
        store.for_each_record(instance_id, start.seq + 1, &mut |r| {
            if let Some(b) =
                check_record(&r, instance_id, &head).or_else(|| counters.handed_out_twice(&r))
            {
                first_break = Some(b);
                return Ok(false);
            }
            // The tokens no checkpoint signs, and the one at each checkpoint: a checkpoint's
            // key must be one that signs tokens too (a certificate put in the configuration's
            // place, or beside it, and the checkpoints signed again with its key, show; see
            // `keys_that_signed_no_token`).
            let at_checkpoint = checkpointed.get(&r.seq);
            if r.seq > signed_up_to || at_checkpoint.is_some() {
                let token = Token::from_der(&r.record.token);
                if let (Ok(t), Some(own)) = (&token, at_checkpoint) {
                    let own = own
                        .as_ref()
                        .is_some_and(|c| verify_signed_by(t, std::slice::from_ref(c)).is_ok());
                    own_token.insert(r.seq, own);
                }
                let signer = token.and_then(|t| {
                    signer_among(&t, signers).map(|c| std::ptr::from_ref(c) as usize)
                });
                if let Ok(signer) = signer {
                    token_signers.insert(signer);
                }
                if let Err(e) = signer {
                    let what = match r.seq > signed_up_to {
                        true => "no checkpoint signs this record",
                        false => "a signed checkpoint is at this record",
                    };
                    first_break = Some(Break {
                        seq: r.seq,
                        serial: Some(hex(&r.record.serial)),
                        what: format!(
                            "the token's signature does not verify with a trusted certificate \
                             ({e:#}); {what}"
                        ),
                    });
                    return Ok(false);
                }
            }
            max_counter = max_counter.max(Some(r.counter));
            if wanted.contains_key(&r.seq) {
                hashes_at.insert(r.seq, r.hash);
            }
            head = ChainHead {
                seq: r.seq,
                hash: r.hash,
            };
            records += 1;
            Ok(true)
        })?;
    }

    if first_break.is_none() {
        for c in &checkpoints {
            if let Some(what) =
                check_checkpoint(c, trusted, state.anchor.as_ref(), head, &hashes_at)
            {
                first_break = Some(Break {
                    seq: c.seq,
                    serial: None,
                    what,
                });
                break;
            }
        }
    }
    // Each checkpoint's key must have signed tokens too (after the checks above, which say
    // more where a checkpoint's certificate is not trusted at all).
    let mut warnings: Vec<String> = Vec::new();
    if first_break.is_none() {
        match keys_that_signed_no_token(&checkpoints, &own_token) {
            Some((c, true)) => warnings.push(format!(
                "the last checkpoint (at {}) is signed by a certificate that signed no token \
                 checked here (a key rollover just before it?): compare the SHA-256 below with \
                 your TSU certificates' (--trust)",
                c.seq
            )),
            Some((c, false)) => {
                first_break = Some(Break {
                    seq: c.seq,
                    serial: None,
                    what: format!(
                        "the checkpoint at {} is signed by a certificate that signed neither \
                         the token at its position nor one at a later checkpoint: a key that \
                         signs no token signed it",
                        c.seq
                    ),
                })
            }
            None => {}
        }
        // The checkpoint before the first token (at 0) has no token of its own to be checked
        // against: its key is vouched for only by a later checkpoint of the same certificate
        // over its own token. Without one it is a warning (a rollover before the first
        // token, or a certificate put in the configuration's place).
        let vouched = |c: &Checkpoint| {
            checkpoints.iter().any(|l| {
                l.seq > 0 && l.certificate == c.certificate && own_token.get(&l.seq) == Some(&true)
            })
        };
        if checkpoints
            .first()
            .is_some_and(|c| c.seq == 0 && !vouched(c))
        {
            warnings.push(format!(
                "the checkpoint before the first token (at 0) is signed by a certificate that \
                 signed no token checked here{}: compare the SHA-256 below with your TSU \
                 certificates' (--trust)",
                match checkpoints.len() {
                    1 => "",
                    _ => " (a key rollover since?)",
                }
            ));
        }
    }
    // Heads recorded elsewhere: the chain must hold each (a rollback to an earlier checkpoint
    // removes them, and the records after them, with nothing here to tell).
    if first_break.is_none() {
        first_break = expected
            .iter()
            .find_map(|e| check_expected(e, state.anchor.as_ref(), head, &hashes_at));
    }
    // The anchor's hash is the chain's start: only a signed checkpoint at or after it,
    // checked above through the chain from it, says that it is the one pruning kept.
    // Checkpoints below it are checked by their signature alone.
    if let Some(anchor) = state.anchor.filter(|_| first_break.is_none()) {
        if !checkpoints.iter().any(|c| c.seq >= anchor.seq) {
            first_break = Some(Break {
                seq: anchor.seq,
                serial: None,
                what: format!(
                    "no signed checkpoint at or after the anchor ({}): its hash, where the \
                     chain starts, is not signed",
                    anchor.seq
                ),
            });
        }
    }
    // And the anchor itself: at the position the last checkpoint signed (vouched for by it),
    // or above it with a signature of its own by the key that pruned (the checkpoints'). One
    // moved on by hand, the records before it deleted from the start, is neither. Its row is
    // read again with its signature (the server's retention may have moved it on since: that
    // one is checked, as signed).
    if first_break.is_none() {
        let vouched = checkpoints
            .iter()
            .filter(|c| c.events.is_some())
            .map(|c| (c.anchor_seq, c.seq))
            .max();
        let anchor = store.signed_anchor(instance_id)?;
        let wrong = match (&anchor, vouched) {
            (None, Some((at, by))) if at > 0 => Some((
                at,
                format!(
                    "no anchor, though the checkpoint at {by} signed one at {at}: it was removed"
                ),
            )),
            (Some((a, _)), Some((at, by))) if a.seq < at => Some((
                a.seq,
                format!(
                    "the anchor (pruned up to {}) is below the one the checkpoint at {by} signed \
                     ({at}): it was moved back by hand",
                    a.seq
                ),
            )),
            (Some((a, None)), Some((at, _))) if a.seq > at => Some((
                a.seq,
                format!(
                    "the anchor (pruned up to {}) is above the last checkpoint's ({at}) and not \
                     signed: records were deleted from the start and the anchor moved on by hand",
                    a.seq
                ),
            )),
            (Some((a, None)), None) => {
                warnings.push(format!(
                    "the anchor (pruned up to {}) is not signed and no checkpoint of this \
                     version vouches for it: pruned by an earlier version (schema 1; the \
                     server's next checkpoint will), or moved on by hand; records deleted \
                     from the start with it would not show",
                    a.seq
                ));
                None
            }
            (Some((a, Some(signed))), _) => {
                let wrong = if !trusted.contains(&signed.certificate) {
                    Some("is signed by a certificate that is not trusted".to_string())
                } else {
                    signature_check(
                        &signed.certificate,
                        &signed.algorithm,
                        &a.message(),
                        &signed.signature,
                    )
                    .err()
                    .map(|e| format!("has a bad signature ({e:#})"))
                };
                // Its key must be one that signs here: a certificate put into the trusted
                // ones lets its key sign an anchor over records deleted from the start, as it
                // lets it sign checkpoints (see `keys_that_signed_no_token`). After a key
                // rollover with no token of the new key yet, the anchor may be the only thing
                // it signed: a warning, not a break.
                let signed_here = checkpoints
                    .iter()
                    .any(|c| c.seq >= a.seq && c.certificate == signed.certificate)
                    || signers.iter().any(|c| {
                        token_signers.contains(&(std::ptr::from_ref(c) as usize))
                            && c.to_der().is_ok_and(|der| der == signed.certificate)
                    });
                if wrong.is_none() && !signed_here {
                    warnings.push(format!(
                        "the anchor (pruned up to {}) is signed by a key that signed neither a \
                         token kept after it nor a checkpoint at or after it: a key rollover \
                         since, with no token of the new key yet? Else another key moved it \
                         on, the records before it deleted",
                        a.seq
                    ));
                }
                wrong.map(|wrong| {
                    (
                        a.seq,
                        format!(
                            "the anchor (pruned up to {}) {wrong}: it was changed, or moved on \
                             by hand",
                            a.seq
                        ),
                    )
                })
            }
            _ => None,
        };
        first_break = wrong.map(|(seq, what)| Break {
            seq,
            serial: None,
            what,
        });
    }
    // The highest counter the instance archived, as its row keeps it (rows archives and
    // PostgreSQL raise it with each commit; the token log does not keep it): records deleted
    // after the last checkpoint show here.
    if first_break.is_none() && state.max_counter > max_counter {
        first_break = Some(Break {
            seq: head.seq + 1,
            serial: None,
            what: format!(
                "records are missing at the end: the instance archived counter {}, the \
                 highest left is {}",
                state.max_counter.unwrap_or(0),
                max_counter.map_or_else(|| "none".to_string(), |c| c.to_string())
            ),
        });
    }
    warnings.extend(
        store
            .derived_damage(instance_id)?
            .into_iter()
            .map(|d| format!("look-ups may miss records: {d}")),
    );
    for (copy, octets) in store.torn_copies(instance_id)? {
        warnings.push(format!(
            "{} ({octets} octets) is a torn commit a start cut off and kept: it holds tokens \
             only if the disk lost frames it had acknowledged; look at it, then remove it",
            copy.display()
        ));
    }
    // Reads stop at the first frame that does not check; what follows is judged as the start
    // judges it (whose refusal would otherwise be the first sign).
    match store.unread_tail(instance_id)? {
        None => {}
        Some(UnreadTail::Torn { octets }) => warnings.push(format!(
            "a commit that did not complete follows the last record ({octets} octets; its \
             requests were never answered): the next start cuts it off, keeping a copy"
        )),
        Some(UnreadTail::Damaged(why)) if first_break.is_none() => {
            first_break = Some(Break {
                seq: head.seq + 1,
                serial: None,
                what: format!(
                    "after the last record that reads, what no crash leaves: {why}; the server \
                     will not start on it (restore the segment from a backup)"
                ),
            });
        }
        Some(UnreadTail::Damaged(_)) => {}
    }
    if first_break.is_none() {
        if head.seq == 0 {
            warnings.push("no record: it has issued none, or its records were deleted".to_string());
        } else if head.seq > signed_up_to {
            let unsigned = head.seq - signed_up_to.max(start.seq);
            warnings.push(match checkpoints.last() {
                Some(c) => format!(
                    "{unsigned} records after the last signed checkpoint (at {}) are signed \
                     by no checkpoint: their tokens' signatures verify, but records deleted \
                     from the end, or changed outside their tokens, would not show there; a \
                     running server signs its head every checkpoint_interval_s and at shutdown",
                    c.seq
                ),
                None => format!(
                    "no signed checkpoint: the {unsigned} records are signed by none; their \
                     tokens' signatures verify, but records deleted from the end, or changed \
                     outside their tokens, would not show"
                ),
            });
        }
    }
    let mut checkpoint_signers: Vec<(String, String)> = Vec::new();
    for c in &checkpoints {
        let sha256 = hex(&crate::archive::record::sha256(&c.certificate));
        if !checkpoint_signers.iter().any(|(s, _)| *s == sha256) {
            let subject = Certificate::from_der(&c.certificate).map_or_else(
                |_| "a certificate that does not decode".to_string(),
                |cert| cert.tbs_certificate().subject().to_string(),
            );
            checkpoint_signers.push((sha256, subject));
        }
    }
    Ok(InstanceReport {
        instance_id,
        records,
        anchor: state.anchor,
        head,
        checkpoints: checkpoints.len(),
        last_checkpoint: checkpoints.last().map(|c| (c.seq, c.time_ns)),
        first_break,
        warnings,
        checkpoint_signers,
        signed_head: checkpoints.last().map(|c| (c.seq, c.head_hash)),
        signed_events: checkpoints
            .last()
            .and_then(|c| c.events)
            .filter(|e| e.seq > 0),
        events: verify_events(store, instance_id, &checkpoints, expected_events, |store| {
            kept_from(store, instance_id)
        })?,
    })
}

/// The genTime of the first record above the anchor (none: no record is kept). Pruning
/// empties only events older than the oldest record it keeps, which is no older than this.
fn kept_from(store: &mut dyn ArchiveStore, instance_id: u32) -> Result<Option<u64>, StoreError> {
    // The anchor's row alone (the instance's whole state reads the token log's last segments).
    let anchor = store.signed_anchor(instance_id)?.map_or(0, |(a, _)| a.seq);
    let mut first = None;
    store.for_each_record(instance_id, anchor + 1, &mut |r| {
        first = Some(r.record.gen_time_ns);
        Ok(false)
    })?;
    Ok(first)
}

/// The first checkpoint whose certificate signed no token it can be checked against, and
/// whether it is the last one. Each checkpoint's certificate must have signed the token at its
/// position (`own_token`, false where it did not), or, as the first checkpoint after a key
/// rollover may be over a token the old key signed, the token at a later checkpoint of the
/// same certificate. The last checkpoint has no later one, so there it is a warning.
fn keys_that_signed_no_token<'c>(
    checkpoints: &'c [Checkpoint],
    own_token: &HashMap<u64, bool>,
) -> Option<(&'c Checkpoint, bool)> {
    let signed_own = |c: &Checkpoint| own_token.get(&c.seq) == Some(&true);
    checkpoints.iter().enumerate().find_map(|(i, c)| {
        let later = &checkpoints[i + 1..];
        let fails = own_token.get(&c.seq) == Some(&false)
            && !later
                .iter()
                .any(|l| l.certificate == c.certificate && signed_own(l));
        fails.then_some((c, later.is_empty()))
    })
}

/// What is wrong with the chain for an expected head, if anything.
fn check_expected(
    e: &Expected,
    anchor: Option<&Anchor>,
    head: ChainHead,
    hashes_at: &HashMap<u64, [u8; 32]>,
) -> Option<Break> {
    if e.seq > head.seq {
        return Some(Break {
            seq: head.seq + 1,
            serial: None,
            what: format!(
                "records are missing at the end: the chain ends at {}, before the expected \
                 head {} (rolled back?)",
                head.seq, e.seq
            ),
        });
    }
    match chain_at(e.seq, anchor, hashes_at) {
        // Pruned since: nothing is left to compare.
        ChainAt::Pruned => None,
        ChainAt::Hash(h) if h == e.hash => None,
        _ => Some(Break {
            seq: e.seq,
            serial: None,
            what: format!(
                "the chain at {} is not the expected head {}: records up to it were changed \
                 and their hashes recomputed",
                e.seq,
                hex(&e.hash[..8])
            ),
        }),
    }
}

/// The first thing wrong with `r` as the record after `prev` in the chain of `instance_id`.
fn check_record(r: &StoredRecord, instance_id: u32, prev: &ChainHead) -> Option<Break> {
    let serial = Some(hex(&r.record.serial));
    let at = |what: String| {
        Some(Break {
            seq: r.seq,
            serial: serial.clone(),
            what,
        })
    };
    if r.seq != prev.seq + 1 {
        return Some(Break {
            seq: prev.seq + 1,
            serial: None,
            what: format!(
                "record {} is missing (the next one present is {})",
                prev.seq + 1,
                r.seq
            ),
        });
    }
    // The instance a record was chained in is in its hash (and its serial): a store keeps
    // each instance's records apart (the token log in a folder per instance), and a record
    // of another's there, whole, is a copy, not this instance's chain.
    if r.instance_id != instance_id {
        return at(format!(
            "the record was chained in instance {}, not in this one: it is stored among \
             instance {instance_id}'s records (a copy of another instance's?)",
            r.instance_id
        ));
    }
    let differences = token_differences(r);
    if r.computed_hash() != r.hash {
        let what = if !differences.is_empty() {
            format!(
                "the stored hash does not match the record: {}",
                differences.join("; ")
            )
        } else if r.prev_hash != prev.hash {
            "prev_hash was changed (it is not the previous record's hash)".to_string()
        } else {
            "the stored hash does not match the record: a column outside the token \
             (clock state, clock sources, client, counter), the token's certificate set or \
             the hash itself was changed"
                .to_string()
        };
        return at(what);
    }
    if r.prev_hash != prev.hash {
        return at(if prev.seq == 0 && prev.hash == ZERO_HASH {
            "the first record does not start the chain".to_string()
        } else {
            format!(
                "the record does not chain to record {} (prev_hash {} instead of {})",
                prev.seq,
                hex(&r.prev_hash[..8]),
                hex(&prev.hash[..8])
            )
        });
    }
    if !differences.is_empty() {
        return at(format!(
            "the record disagrees with its token: {}",
            differences.join("; ")
        ));
    }
    None
}

/// The counters of an instance's records seen so far: a serial is unique by its instance and
/// counter (the random octets after them aside), so a counter seen twice is a serial handed
/// out twice, or two tokens of which a look-up by serial finds one. The rows layout and
/// PostgreSQL refuse a second one (a unique index); the token log keeps whatever it is given.
///
/// Per block of 2^16 counters, the low 16 bits of those seen: a sorted list while few, then a
/// bit each. Counters are dense (blocks of `serial_block`, a restart skips the rest of one),
/// so 100 million records take about 12 MB; an archive rewritten with counters far apart,
/// about 100 octets each.
#[derive(Default)]
struct Counters(HashMap<u64, Seen>);

enum Seen {
    Few(Vec<u16>),
    Bits(Box<[u64; 1024]>),
}

impl Seen {
    /// Past this many, a bit each (a list of 128 is 256 octets beside the bits' 8 KiB).
    const FEW: usize = 128;

    /// Adds `low`; whether it was there.
    fn insert(&mut self, low: u16) -> bool {
        match self {
            Seen::Few(few) => match few.binary_search(&low) {
                Ok(_) => true,
                Err(at) if few.len() < Self::FEW => {
                    few.insert(at, low);
                    false
                }
                Err(_) => {
                    let mut bits = Box::new([0u64; 1024]);
                    for &l in few.iter().chain([&low]) {
                        bits[usize::from(l >> 6)] |= 1 << (l & 63);
                    }
                    *self = Seen::Bits(bits);
                    false
                }
            },
            Seen::Bits(bits) => {
                let (word, bit) = (usize::from(low >> 6), 1u64 << (low & 63));
                let seen = bits[word] & bit != 0;
                bits[word] |= bit;
                seen
            }
        }
    }
}

impl Counters {
    /// Notes `r`'s counter; the break if an earlier record had it.
    fn handed_out_twice(&mut self, r: &StoredRecord) -> Option<Break> {
        let seen = self
            .0
            .entry(r.counter >> 16)
            .or_insert_with(|| Seen::Few(Vec::new()))
            .insert(r.counter as u16);
        seen.then(|| Break {
            seq: r.seq,
            serial: Some(hex(&r.record.serial)),
            what: format!(
                "counter {} is an earlier record's too: the instance handed it out twice",
                r.counter
            ),
        })
    }
}

/// The columns that disagree with the token the record holds.
fn token_differences(r: &StoredRecord) -> Vec<String> {
    let rec = &r.record;
    let mut out = Vec::new();
    match layout::decode(&rec.serial) {
        Some((instance, counter)) => {
            if instance != r.instance_id {
                out.push(format!(
                    "column instance_id is {} but the serial names {instance}",
                    r.instance_id
                ));
            }
            if counter != r.counter {
                out.push(format!(
                    "column counter is {} but the serial holds {counter}",
                    r.counter
                ));
            }
        }
        None => out.push("column serial is not a structured serial".into()),
    }
    let token = match Token::from_der(&rec.token) {
        Ok(t) => t,
        Err(e) => {
            out.push(format!("column token does not decode ({e})"));
            return out;
        }
    };
    let tst = token.tst_info();
    if tst.serial_number.as_bytes() != rec.serial.as_slice() {
        out.push("column serial differs from the token's".into());
    }
    if tst.gen_time.unix_ns() != rec.gen_time_ns {
        out.push(format!(
            "column gen_time_ns differs from the token's genTime {}",
            tst.gen_time
        ));
    }
    if tst.accuracy.map(|a| a.as_ns()) != Some(rec.accuracy_ns) {
        out.push("column accuracy_ns differs from the token's accuracy".into());
    }
    if tst.message_imprint.hash_algorithm.oid.to_string() != rec.imprint_alg {
        out.push("column imprint_alg differs from the token's".into());
    }
    if tst.message_imprint.hashed_message.as_bytes() != rec.imprint.as_slice() {
        out.push("column imprint differs from the token's".into());
    }
    if tst.policy.to_string() != rec.policy {
        out.push("column policy differs from the token's".into());
    }
    if tst.nonce.map(|n| n.as_bytes().to_vec()) != rec.nonce {
        out.push("column nonce differs from the token's".into());
    }
    out
}

fn check_checkpoint(
    c: &Checkpoint,
    trusted: &[Vec<u8>],
    anchor: Option<&Anchor>,
    head: ChainHead,
    hashes_at: &HashMap<u64, [u8; 32]>,
) -> Option<String> {
    if !trusted.contains(&c.certificate) {
        return Some(format!(
            "the checkpoint at {} is signed by a certificate that is not trusted",
            c.seq
        ));
    }
    if let Err(e) = check_signature(c) {
        return Some(format!(
            "the checkpoint at {} has a bad signature ({e:#})",
            c.seq
        ));
    }
    if c.seq > head.seq {
        return Some(format!(
            "records are missing at the end: a checkpoint signed at {} covers {} records, the \
             chain ends at {}",
            crate::protocol::GenTime::from_unix_ns(c.time_ns),
            c.seq,
            head.seq
        ));
    }
    match chain_at(c.seq, anchor, hashes_at) {
        // Pruned: the signature alone is left to check.
        ChainAt::Pruned => None,
        ChainAt::Hash(h) if h == c.head_hash => None,
        ChainAt::Hash(_) => Some(format!(
            "the chain at {} differs from the checkpoint signed at {}: records up to it were \
             changed and their hashes recomputed",
            c.seq,
            crate::protocol::GenTime::from_unix_ns(c.time_ns)
        )),
        ChainAt::Missing => Some(format!("no record at the checkpoint's position {}", c.seq)),
    }
}

/// What the walk knows of the chain at a position.
enum ChainAt {
    /// The hash of the record there (the anchor's, at the anchor).
    Hash([u8; 32]),
    /// No record there.
    Missing,
    /// Below the anchor: pruned.
    Pruned,
}

/// The chain at `seq`: from the walk's `hashes_at` above the anchor, the anchor's own hash at
/// it, pruned below.
fn chain_at(seq: u64, anchor: Option<&Anchor>, hashes_at: &HashMap<u64, [u8; 32]>) -> ChainAt {
    if seq == 0 && anchor.is_none() {
        // The empty chain (a checkpoint of an instance before its first token).
        return ChainAt::Hash(ZERO_HASH);
    }
    let anchor_seq = anchor.map_or(0, |a| a.seq);
    let hash = if seq > anchor_seq {
        hashes_at.get(&seq).copied()
    } else if seq == anchor_seq {
        anchor.map(|a| a.hash)
    } else {
        return ChainAt::Pruned;
    };
    hash.map_or(ChainAt::Missing, ChainAt::Hash)
}

fn check_signature(c: &Checkpoint) -> anyhow::Result<()> {
    signature_check(&c.certificate, &c.algorithm, &c.message(), &c.signature)
}

/// Whether `signature` (as CMS carries it, of `algorithm`) over `message` verifies with the
/// key of `certificate` (DER).
fn signature_check(
    certificate: &[u8],
    algorithm: &[u8],
    message: &[u8],
    signature: &[u8],
) -> anyhow::Result<()> {
    let cert = Certificate::from_der(certificate)?;
    let alg = AlgorithmIdentifierOwned::from_der(algorithm)?;
    verify_signature(
        cert.tbs_certificate().subject_public_key_info(),
        &alg,
        None,
        message,
        signature,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(seq: u64, certificate: &[u8]) -> Checkpoint {
        Checkpoint {
            instance_id: 0,
            seq,
            head_hash: [0; 32],
            time_ns: 0,
            algorithm: Vec::new(),
            signature: Vec::new(),
            certificate: certificate.to_vec(),
            events: None,
            anchor_seq: 0,
        }
    }

    #[test]
    fn a_counter_seen_twice_is_a_break() {
        let records = crate::archive::tests::records_a_second_apart(3);
        let mut counters = Counters::default();
        for r in &records {
            assert_eq!(counters.handed_out_twice(r), None);
        }
        // Far apart, in blocks of their own, and next to one another.
        for counter in [1 << 40, (1 << 40) + 63, (1 << 40) + 64, u64::MAX >> 1] {
            let r = StoredRecord {
                counter,
                ..records[0].clone()
            };
            assert_eq!(counters.handed_out_twice(&r), None, "{counter}");
        }
        let again = StoredRecord {
            seq: 4,
            ..records[1].clone()
        };
        let b = counters.handed_out_twice(&again).expect("counter 2 again");
        assert_eq!(b.seq, 4);
        assert!(
            b.what.contains("counter 2 is an earlier record's too"),
            "{}",
            b.what
        );
        let far = StoredRecord {
            counter: (1 << 40) + 64,
            ..records[0].clone()
        };
        assert!(counters.handed_out_twice(&far).is_some());
        // Past a block's short list, in its bits: the earlier ones still count.
        let at = |counter: u64| StoredRecord {
            counter,
            ..records[0].clone()
        };
        for counter in (4..300).rev() {
            assert_eq!(counters.handed_out_twice(&at(counter)), None, "{counter}");
        }
        for counter in [1, 150, 299] {
            assert!(
                counters.handed_out_twice(&at(counter)).is_some(),
                "{counter}"
            );
        }
    }

    /// After a key rollover the first checkpoint of the next key may sit over a token of the
    /// old one; a later checkpoint of the next key over its own token vouches for it. A key
    /// that signed no token breaks, or is a warning on the last checkpoint alone.
    #[test]
    fn a_checkpoints_key_must_have_signed_a_token() {
        let (old, next) = (b"old".as_slice(), b"next".as_slice());
        let own = |pairs: &[(u64, bool)]| pairs.iter().copied().collect::<HashMap<_, _>>();
        let rollover = [
            checkpoint(4, old),
            checkpoint(8, next),
            checkpoint(12, next),
        ];
        let found = |c: &[Checkpoint], o: &HashMap<u64, bool>| {
            keys_that_signed_no_token(c, o).map(|(c, last)| (c.seq, last))
        };
        assert_eq!(
            found(&rollover, &own(&[(4, true), (8, false), (12, true)])),
            None
        );
        // The next key's only checkpoint is the last: a warning.
        assert_eq!(
            found(&rollover[..2], &own(&[(4, true), (8, false)])),
            Some((8, true))
        );
        // A key that signed none of the tokens at its checkpoints.
        assert_eq!(
            found(&rollover, &own(&[(4, true), (8, false), (12, false)])),
            Some((8, false))
        );
        assert_eq!(
            found(&rollover, &own(&[(4, false), (8, true), (12, true)])),
            Some((4, false))
        );
        // Checkpoints whose tokens were pruned are not judged.
        assert_eq!(found(&rollover, &own(&[(12, true)])), None);
    }
}
