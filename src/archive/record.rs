//! What the archive keeps of each token and event, and the canonical encodings that the hash
//! chain and the signed checkpoints commit to (`LAYOUT.md` in this folder describes them).

use aws_lc_rs::digest;

/// The clock's state when a token was issued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClockAtIssue {
    /// The time source (`disciplined`, `kernel`, `development`).
    pub source: String,
    /// `synchronized` or `holdover`.
    pub state: String,
    /// The source's error bound at the reading, in nanoseconds.
    pub bound_ns: u64,
    /// The sources the discipline had selected (comma-separated), empty for simple sources.
    pub sources: String,
}

/// One issued token as the request path knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    /// The serialNumber's content octets (positive, at most 20).
    pub serial: Vec<u8>,
    /// genTime as encoded in the token, in nanoseconds since the Unix epoch.
    pub gen_time_ns: u64,
    /// The token's accuracy, in nanoseconds.
    pub accuracy_ns: u64,
    /// The imprint's hash algorithm, as a dotted OID.
    pub imprint_alg: String,
    pub imprint: Vec<u8>,
    /// The policy in the token, as a dotted OID.
    pub policy: String,
    /// The nonce's INTEGER content octets, as the client sent them.
    pub nonce: Option<Vec<u8>>,
    /// The authenticated client (its configured name), when there is one.
    pub client: Option<String>,
    pub clock: ClockAtIssue,
    /// The DER token (ContentInfo with SignedData) as sent inside the TimeStampResp.
    pub token: Vec<u8>,
}

pub type Hash = [u8; 32];

/// The `prev_hash` of an instance's first record (and of a chain with no anchor).
pub const ZERO_HASH: Hash = [0; 32];

/// A token record in its instance's chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRecord {
    pub instance_id: u32,
    /// Position in the instance's chain: 1, 2, 3, … in commit order.
    pub seq: u64,
    /// The serial's counter (see `serial::layout`).
    pub counter: u64,
    pub record: TokenRecord,
    pub prev_hash: Hash,
    pub hash: Hash,
}

impl StoredRecord {
    /// Chains `record` after `prev_hash` at position `seq`.
    pub fn chain(
        instance_id: u32,
        seq: u64,
        counter: u64,
        record: TokenRecord,
        prev_hash: Hash,
    ) -> Self {
        let hash = record_hash(instance_id, seq, counter, &record, &prev_hash);
        Self {
            instance_id,
            seq,
            counter,
            record,
            prev_hash,
            hash,
        }
    }

    /// The hash the fields and `prev_hash` give, to compare with the stored one.
    pub fn computed_hash(&self) -> Hash {
        record_hash(
            self.instance_id,
            self.seq,
            self.counter,
            &self.record,
            &self.prev_hash,
        )
    }

    /// The granted `TimeStampResp` that carried the token.
    pub fn response(&self) -> Vec<u8> {
        response_of_token(&self.record.token)
    }
}

/// A clock, key or archive event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRecord {
    pub instance_id: u32,
    /// Position among the instance's events, from 1.
    pub seq: u64,
    /// System time when the event was captured, in nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// `error`, `warn`, `info`, …
    pub level: String,
    /// The `event` field: `sync_acquired`, `hsm_session_lost`, `key_loaded`, …
    pub kind: String,
    pub message: String,
    /// The other fields, as a JSON object.
    pub fields: String,
    /// The previous event's hash (zeros for the instance's first, or the first chained
    /// after events of an archive written before events were chained). `None` for events
    /// stored unchained (schema 1), as are the two below.
    pub prev_hash: Option<Hash>,
    /// SHA-256 of the message and fields ([`body_hash`]): the event's hash covers it in
    /// their place, so that pruning can empty them (a pruned event keeps its position, time,
    /// level and kind) and the chain still holds every event.
    pub body_hash: Option<Hash>,
    /// SHA-256 of the rest ([`EventRecord::computed_hash`]).
    pub hash: Option<Hash>,
}

impl EventRecord {
    /// The event chained after `prev_hash` (its position and fields as they are).
    pub fn chained(mut self, prev_hash: Hash) -> Self {
        self.prev_hash = Some(prev_hash);
        self.body_hash = Some(body_hash(&self.message, &self.fields));
        self.hash = self.computed_hash();
        self
    }

    /// Whether pruning emptied it: its fields are the empty string, never what an event
    /// stores (a JSON object).
    pub fn pruned(&self) -> bool {
        self.fields.is_empty()
    }

    /// The hash the stored fields, `body_hash` and `prev_hash` give (`None` for an event
    /// stored unchained): "tsa-archive/event/v1" 0x00, the instance, position, time, level
    /// and kind, the body's hash and the previous event's, in the encoding of [`canonical`].
    pub fn computed_hash(&self) -> Option<Hash> {
        let (prev_hash, body_hash) = (self.prev_hash?, self.body_hash?);
        let mut out = Vec::with_capacity(160 + self.level.len() + self.kind.len());
        out.extend_from_slice(EVENT_DOMAIN);
        put_u64(&mut out, self.instance_id.into());
        put_u64(&mut out, self.seq);
        put_u64(&mut out, self.time_ns);
        put_bytes(&mut out, self.level.as_bytes());
        put_bytes(&mut out, self.kind.as_bytes());
        out.extend_from_slice(&body_hash);
        out.extend_from_slice(&prev_hash);
        Some(sha256(&out))
    }

    /// Its position and hash, as the next event chains to it.
    pub fn head(&self) -> ChainHead {
        ChainHead {
            seq: self.seq,
            hash: self.hash.unwrap_or(ZERO_HASH),
        }
    }
}

/// What an event's hash covers of its message and fields: SHA-256 of both as `bytes`.
pub fn body_hash(message: &str, fields: &str) -> Hash {
    let mut out = Vec::with_capacity(8 + message.len() + fields.len());
    put_bytes(&mut out, message.as_bytes());
    put_bytes(&mut out, fields.as_bytes());
    sha256(&out)
}

/// The position and hash of an instance's chain head.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChainHead {
    pub seq: u64,
    pub hash: Hash,
}

impl ChainHead {
    pub const EMPTY: ChainHead = ChainHead {
        seq: 0,
        hash: ZERO_HASH,
    };
}

/// What pruning leaves of the records it removed: the last one's position and hash, from
/// which verification of the rest starts, and the highest counter and genTime removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Anchor {
    pub instance_id: u32,
    pub seq: u64,
    pub hash: Hash,
    pub max_counter: u64,
    pub max_gen_time_ns: u64,
    pub pruned_at_ns: u64,
}

impl Anchor {
    /// What the key that prunes signs of it (as a checkpoint is signed): a domain string,
    /// then every field in the encoding of [`canonical`].
    pub fn message(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ANCHOR_DOMAIN.len() + 72);
        out.extend_from_slice(ANCHOR_DOMAIN);
        put_u64(&mut out, self.instance_id.into());
        put_u64(&mut out, self.seq);
        out.extend_from_slice(&self.hash);
        put_u64(&mut out, self.max_counter);
        put_u64(&mut out, self.max_gen_time_ns);
        put_u64(&mut out, self.pruned_at_ns);
        out
    }
}

/// The signature of an anchor ([`Anchor::message`]) by the TSA's own key, as a checkpoint's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnchorSignature {
    /// The signature's AlgorithmIdentifier (DER).
    pub algorithm: Vec<u8>,
    pub signature: Vec<u8>,
    /// The signing certificate (DER).
    pub certificate: Vec<u8>,
}

/// A signed statement of an instance's chain head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub instance_id: u32,
    /// The head's position, which is also the number of records the chain ever had.
    pub seq: u64,
    pub head_hash: Hash,
    pub time_ns: u64,
    /// The signature's AlgorithmIdentifier (DER), as a SignerInfo would carry it.
    pub algorithm: Vec<u8>,
    /// Over [`checkpoint_message`], as CMS carries it (DER ECDSA-Sig-Value, raw RSA).
    pub signature: Vec<u8>,
    /// The signing certificate (DER).
    pub certificate: Vec<u8>,
    /// The instance's last event stored when it was signed (its position and hash), which
    /// the signature covers too; `None` for checkpoints signed before events were chained
    /// (their message is the first version's).
    pub events: Option<ChainHead>,
    /// The instance's anchor position when it was signed (0: none), which the second
    /// version's signature covers too: an anchor above the last checkpoint's must carry a
    /// signature of its own, one at it is vouched for.
    pub anchor_seq: u64,
}

impl Checkpoint {
    pub fn message(&self) -> Vec<u8> {
        checkpoint_message(
            self.instance_id,
            self.seq,
            &self.head_hash,
            self.time_ns,
            self.events.as_ref().map(|e| (e, self.anchor_seq)),
        )
    }
}

/// The first octets of every record's canonical encoding (so of every frame's body).
pub const RECORD_DOMAIN: &[u8] = b"tsa-archive/record/v1\0";
const CHECKPOINT_DOMAIN: &[u8] = b"tsa-archive/checkpoint/v1\0";
const CHECKPOINT_DOMAIN_V2: &[u8] = b"tsa-archive/checkpoint/v2\0";
const ANCHOR_DOMAIN: &[u8] = b"tsa-archive/anchor/v1\0";
const EVENT_DOMAIN: &[u8] = b"tsa-archive/event/v1\0";

/// The canonical encoding of a record: a domain string, then every field in a fixed order,
/// integers as 8 octets big-endian, octet and text strings as a 4-octet big-endian length and
/// the octets, an absent optional field as the length 0xFFFFFFFF alone; then `prev_hash`.
pub fn canonical(
    instance_id: u32,
    seq: u64,
    counter: u64,
    r: &TokenRecord,
    prev_hash: &Hash,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + r.token.len());
    canonical_into(&mut out, instance_id, seq, counter, r, prev_hash);
    out
}

/// [`canonical`], appended to `out`.
pub fn canonical_into(
    out: &mut Vec<u8>,
    instance_id: u32,
    seq: u64,
    counter: u64,
    r: &TokenRecord,
    prev_hash: &Hash,
) {
    out.extend_from_slice(RECORD_DOMAIN);
    put_u64(out, instance_id.into());
    put_u64(out, seq);
    put_bytes(out, &r.serial);
    put_u64(out, counter);
    put_u64(out, r.gen_time_ns);
    put_u64(out, r.accuracy_ns);
    put_bytes(out, r.imprint_alg.as_bytes());
    put_bytes(out, &r.imprint);
    put_bytes(out, r.policy.as_bytes());
    put_opt(out, r.nonce.as_deref());
    put_opt(out, r.client.as_ref().map(String::as_bytes));
    put_bytes(out, r.clock.source.as_bytes());
    put_bytes(out, r.clock.state.as_bytes());
    put_u64(out, r.clock.bound_ns);
    put_bytes(out, r.clock.sources.as_bytes());
    put_bytes(out, &r.token);
    out.extend_from_slice(prev_hash);
}

/// A record back from its [`canonical`] encoding and its hash (which is not checked here:
/// [`StoredRecord::computed_hash`] tells); `None` for octets that are not one.
pub fn decode_canonical(octets: &[u8], hash: Hash) -> Option<StoredRecord> {
    CanonicalRef::parse(octets).map(|c| c.to_record(hash))
}

/// The fields of a [`canonical`] encoding, borrowed from it: what a reader that needs only
/// some of them (a position, an imprint) takes without copying the rest.
#[derive(Clone, Copy, Debug)]
pub struct CanonicalRef<'a> {
    pub instance_id: u32,
    pub seq: u64,
    pub serial: &'a [u8],
    pub counter: u64,
    pub gen_time_ns: u64,
    pub accuracy_ns: u64,
    pub imprint_alg: &'a str,
    pub imprint: &'a [u8],
    pub policy: &'a str,
    pub nonce: Option<&'a [u8]>,
    pub client: Option<&'a str>,
    pub clock_source: &'a str,
    pub clock_state: &'a str,
    pub clock_bound_ns: u64,
    pub clock_sources: &'a str,
    pub token: &'a [u8],
    pub prev_hash: Hash,
}

impl<'a> CanonicalRef<'a> {
    /// `None` for octets that are not a whole canonical encoding.
    pub fn parse(octets: &'a [u8]) -> Option<Self> {
        let mut r = Reader(octets.strip_prefix(RECORD_DOMAIN)?);
        let parsed = Self {
            instance_id: u32::try_from(r.u64()?).ok()?,
            seq: r.u64()?,
            serial: r.bytes()?,
            counter: r.u64()?,
            gen_time_ns: r.u64()?,
            accuracy_ns: r.u64()?,
            imprint_alg: r.text()?,
            imprint: r.bytes()?,
            policy: r.text()?,
            nonce: r.optional()?,
            client: match r.optional()? {
                Some(b) => Some(std::str::from_utf8(b).ok()?),
                None => None,
            },
            clock_source: r.text()?,
            clock_state: r.text()?,
            clock_bound_ns: r.u64()?,
            clock_sources: r.text()?,
            token: r.bytes()?,
            prev_hash: Hash::try_from(r.0).ok()?,
        };
        Some(parsed)
    }

    /// The record, with `hash` as its stored hash.
    pub fn to_record(&self, hash: Hash) -> StoredRecord {
        StoredRecord {
            instance_id: self.instance_id,
            seq: self.seq,
            counter: self.counter,
            record: TokenRecord {
                serial: self.serial.to_vec(),
                gen_time_ns: self.gen_time_ns,
                accuracy_ns: self.accuracy_ns,
                imprint_alg: self.imprint_alg.into(),
                imprint: self.imprint.to_vec(),
                policy: self.policy.into(),
                nonce: self.nonce.map(<[u8]>::to_vec),
                client: self.client.map(Into::into),
                clock: ClockAtIssue {
                    source: self.clock_source.into(),
                    state: self.clock_state.into(),
                    bound_ns: self.clock_bound_ns,
                    sources: self.clock_sources.into(),
                },
                token: self.token.to_vec(),
            },
            prev_hash: self.prev_hash,
            hash,
        }
    }
}

/// Reads the fields of [`canonical`] in order.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }

    fn optional(&mut self) -> Option<Option<&'a [u8]>> {
        let len = u32::from_be_bytes(self.take(4)?.try_into().ok()?);
        if len == u32::MAX {
            return Some(None);
        }
        self.take(len as usize).map(Some)
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        self.optional()?
    }

    fn text(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.bytes()?).ok()
    }
}

/// SHA-256 over [`canonical`].
pub fn record_hash(
    instance_id: u32,
    seq: u64,
    counter: u64,
    r: &TokenRecord,
    prev_hash: &Hash,
) -> Hash {
    sha256(&canonical(instance_id, seq, counter, r, prev_hash))
}

/// What a checkpoint signs: a domain string, the instance, the head's position (the record
/// count), the head's hash and the time, in the encoding of [`canonical`]; then, in the
/// second version (`events` given), the last event's position and hash and the anchor's
/// position.
pub fn checkpoint_message(
    instance_id: u32,
    seq: u64,
    head_hash: &Hash,
    time_ns: u64,
    events: Option<(&ChainHead, u64)>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(CHECKPOINT_DOMAIN_V2.len() + 96);
    out.extend_from_slice(match events {
        Some(_) => CHECKPOINT_DOMAIN_V2,
        None => CHECKPOINT_DOMAIN,
    });
    put_u64(&mut out, instance_id.into());
    put_u64(&mut out, seq);
    out.extend_from_slice(head_hash);
    put_u64(&mut out, time_ns);
    if let Some((events, anchor_seq)) = events {
        put_u64(&mut out, events.seq);
        out.extend_from_slice(&events.hash);
        put_u64(&mut out, anchor_seq);
    }
    out
}

pub fn sha256(data: &[u8]) -> Hash {
    let d = digest::digest(&digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    let len = u32::try_from(b.len()).expect("archive fields are far below 4 GiB");
    assert!(len != u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(b);
}

fn put_opt(out: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        Some(b) => put_bytes(out, b),
        None => out.extend_from_slice(&u32::MAX.to_be_bytes()),
    }
}

/// The status part of every granted response: `PKIStatusInfo { status granted }`.
const GRANTED: [u8; 5] = [0x30, 0x03, 0x02, 0x01, 0x00];

/// The token inside a granted DER `TimeStampResp` (`SEQUENCE { status, token }`).
pub fn token_of_response(response: &[u8]) -> Option<&[u8]> {
    let (tag, rest) = response.split_first()?;
    if *tag != 0x30 {
        return None;
    }
    let (len, body) = der_length(rest)?;
    if body.len() != len {
        return None;
    }
    body.strip_prefix(&GRANTED[..])
}

/// The granted DER `TimeStampResp` around `token`.
pub fn response_of_token(token: &[u8]) -> Vec<u8> {
    let len = GRANTED.len() + token.len();
    let mut out = Vec::with_capacity(len + 6);
    out.push(0x30);
    match len {
        0..=0x7f => out.push(len as u8),
        0x80..=0xff => out.extend_from_slice(&[0x81, len as u8]),
        0x100..=0xffff => out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]),
        _ => out.extend_from_slice(&[0x83, (len >> 16) as u8, (len >> 8) as u8, len as u8]),
    }
    out.extend_from_slice(&GRANTED);
    out.extend_from_slice(token);
    out
}

/// A DER definite length: (length, the octets after it).
fn der_length(b: &[u8]) -> Option<(usize, &[u8])> {
    let (first, rest) = b.split_first()?;
    if first & 0x80 == 0 {
        return Some((usize::from(*first), rest));
    }
    let n = usize::from(first & 0x7f);
    if n == 0 || n > 4 || rest.len() < n {
        return None;
    }
    let len = rest[..n]
        .iter()
        .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
    Some((len, &rest[n..]))
}

/// One DER TLV at the start of `b` (single-octet tags): (tag, header length, content length).
fn tlv_at(b: &[u8]) -> Option<(u8, usize, usize)> {
    let (&tag, rest) = b.split_first()?;
    let (len, after) = der_length(rest)?;
    let header = b.len() - after.len();
    (after.len() >= len).then_some((tag, header, len))
}

/// `tag`, the minimal DER length of `content_len`, appended to `out`.
fn put_header(out: &mut Vec<u8>, tag: u8, content_len: usize) {
    out.push(tag);
    let bytes = content_len.to_be_bytes();
    match content_len {
        0..=0x7f => out.push(content_len as u8),
        _ => {
            let skip = bytes.iter().take_while(|&&b| b == 0).count();
            out.push(0x80 | (bytes.len() - skip) as u8);
            out.extend_from_slice(&bytes[skip..]);
        }
    }
}

/// The elements of a token's SignedData, and its content type OID.
fn signed_data_parts(token: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let (tag, h, len) = tlv_at(token)?;
    if tag != 0x30 || h + len != token.len() {
        return None;
    }
    let body = &token[h..];
    let (tag, h, len) = tlv_at(body)?;
    if tag != 0x06 {
        return None;
    }
    let (oid, rest) = body.split_at(h + len);
    let (tag, h, len) = tlv_at(rest)?;
    if tag != 0xa0 || h + len != rest.len() {
        return None;
    }
    let explicit = &rest[h..];
    let (tag, h, len) = tlv_at(explicit)?;
    if tag != 0x30 || h + len != explicit.len() {
        return None;
    }
    let mut content = &explicit[h..];
    let mut elements = Vec::new();
    while !content.is_empty() {
        let (_, h, len) = tlv_at(content)?;
        let (element, rest) = content.split_at(h + len);
        elements.push(element);
        content = rest;
    }
    Some((oid, elements))
}

fn rebuild(oid: &[u8], elements: &[&[u8]]) -> Vec<u8> {
    let sd_len: usize = elements.iter().map(|e| e.len()).sum();
    let mut sd = Vec::with_capacity(sd_len + 6);
    put_header(&mut sd, 0x30, sd_len);
    for e in elements {
        sd.extend_from_slice(e);
    }
    let mut explicit = Vec::with_capacity(sd.len() + 6);
    put_header(&mut explicit, 0xa0, sd.len());
    explicit.extend_from_slice(&sd);
    let mut out = Vec::with_capacity(oid.len() + explicit.len() + 6);
    put_header(&mut out, 0x30, oid.len() + explicit.len());
    out.extend_from_slice(oid);
    out.extend_from_slice(&explicit);
    out
}

/// Splits the certificates out of a token (SignedData's `[0] IMPLICIT CertificateSet`, the
/// same octets in every token that asked for them): (the token without them, the field). The
/// archive stores each distinct field once. `None` when the token carries none (or is not
/// the DER this TSA writes: [`join_certificates`] must give it back byte for byte).
pub fn split_certificates(token: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let (oid, elements) = signed_data_parts(token)?;
    let at = elements.iter().position(|e| e.first() == Some(&0xa0))?;
    let certificates = elements[at].to_vec();
    let rest: Vec<&[u8]> = elements
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != at)
        .map(|(_, e)| *e)
        .collect();
    let compact = rebuild(oid, &rest);
    (join_certificates(&compact, &certificates).as_deref() == Some(token))
        .then_some((compact, certificates))
}

/// The token again from [`split_certificates`]'s parts: the field goes back after
/// encapContentInfo (SignedData's third element).
pub fn join_certificates(compact: &[u8], certificates: &[u8]) -> Option<Vec<u8>> {
    let (oid, mut elements) = signed_data_parts(compact)?;
    if elements.len() < 3 || elements.iter().any(|e| e.first() == Some(&0xa0)) {
        return None;
    }
    elements.insert(3, certificates);
    Some(rebuild(oid, &elements))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// A token-shaped ContentInfo whose certificate set is `cert_len` octets of `fill`.
    pub(crate) fn token_with_certificates(fill: u8, cert_len: usize) -> Vec<u8> {
        let mut certs = Vec::new();
        put_header(&mut certs, 0xa0, cert_len);
        certs.extend(std::iter::repeat_n(fill, cert_len));
        let mut signer_infos = Vec::new();
        put_header(&mut signer_infos, 0x31, 150);
        signer_infos.extend(std::iter::repeat_n(0x17, 150));
        let parts: [&[u8]; 5] = [
            &[0x02, 0x01, 0x03],
            &[0x31, 0x02, 0x05, 0x00],
            &[0x30, 0x03, 0x06, 0x01, 0x01],
            &certs,
            &signer_infos,
        ];
        rebuild(&[0x06, 0x03, 0x2a, 0x86, 0x48], &parts)
    }

    /// An event of instance 0 at position `seq` and time `time_ns`, a `sync_acquired` unless
    /// `kind` says another, stored unchained (chain it with [`EventRecord::chained`]).
    pub(crate) fn event(seq: u64, time_ns: u64, kind: &str) -> EventRecord {
        EventRecord {
            instance_id: 0,
            seq,
            time_ns,
            level: "info".into(),
            kind: kind.into(),
            message: format!("event {seq}"),
            fields: "{}".into(),
            prev_hash: None,
            body_hash: None,
            hash: None,
        }
    }

    pub(crate) fn sample(token_len: usize) -> TokenRecord {
        TokenRecord {
            serial: vec![1, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 42, 9, 9, 9, 9, 9, 9, 9],
            gen_time_ns: 1_700_000_000_123_456_000,
            accuracy_ns: 100_001_000,
            imprint_alg: "2.16.840.1.101.3.4.2.1".into(),
            imprint: vec![0xab; 32],
            policy: "1.3.6.1.4.1.32473.3161.1".into(),
            nonce: Some(vec![1, 2, 3]),
            client: None,
            clock: ClockAtIssue {
                source: "development".into(),
                state: "synchronized".into(),
                bound_ns: 100_000_000,
                sources: String::new(),
            },
            token: vec![0x30; token_len],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::sample;
    use super::*;

    #[test]
    fn the_canonical_encoding_decodes_to_the_record() {
        let mut with_client = sample(300);
        with_client.client = Some("e-invoice".into());
        with_client.nonce = None;
        for record in [sample(0), sample(1200), with_client] {
            let stored = StoredRecord::chain(7, 3, 42, record, [5; 32]);
            let octets = canonical(7, 3, 42, &stored.record, &stored.prev_hash);
            assert_eq!(
                decode_canonical(&octets, stored.hash).as_ref(),
                Some(&stored)
            );
            // Cut anywhere, or with an octet more, it is not a record.
            for cut in [0, 10, octets.len() / 2, octets.len() - 1] {
                assert_eq!(decode_canonical(&octets[..cut], stored.hash), None, "{cut}");
            }
            let mut longer = octets.clone();
            longer.push(0);
            assert_eq!(decode_canonical(&longer, stored.hash), None);
        }
    }

    #[test]
    fn every_field_changes_the_hash() {
        let base = sample(300);
        let h = |r: &TokenRecord, seq: u64, prev: &Hash| record_hash(7, seq, 42, r, prev);
        let reference = h(&base, 1, &ZERO_HASH);
        let mut variants: Vec<TokenRecord> = Vec::new();
        let mut v = base.clone();
        v.serial[19] ^= 1;
        variants.push(v);
        let mut v = base.clone();
        v.gen_time_ns += 1;
        variants.push(v);
        let mut v = base.clone();
        v.accuracy_ns += 1;
        variants.push(v);
        let mut v = base.clone();
        v.imprint[0] ^= 1;
        variants.push(v);
        let mut v = base.clone();
        v.policy.push('1');
        variants.push(v);
        let mut v = base.clone();
        v.nonce = None;
        variants.push(v);
        let mut v = base.clone();
        v.nonce = Some(vec![]);
        variants.push(v);
        let mut v = base.clone();
        v.client = Some(String::new());
        variants.push(v);
        let mut v = base.clone();
        v.clock.state = "holdover".into();
        variants.push(v);
        let mut v = base.clone();
        v.clock.bound_ns += 1;
        variants.push(v);
        let mut v = base.clone();
        v.token[10] ^= 1;
        variants.push(v);
        for v in &variants {
            assert_ne!(h(v, 1, &ZERO_HASH), reference, "{v:?}");
        }
        assert_ne!(h(&base, 2, &ZERO_HASH), reference);
        assert_ne!(h(&base, 1, &[1; 32]), reference);
        assert_ne!(record_hash(8, 1, 42, &base, &ZERO_HASH), reference);
        assert_ne!(record_hash(7, 1, 43, &base, &ZERO_HASH), reference);
    }

    #[test]
    fn responses_and_tokens_round_trip() {
        for len in [10, 120, 122, 200, 300, 70_000] {
            let token = vec![0x42; len];
            let response = response_of_token(&token);
            assert_eq!(token_of_response(&response), Some(&token[..]), "{len}");
        }
        assert_eq!(token_of_response(&[0x30, 0x03, 0x02, 0x01, 0x02]), None);
    }

    #[test]
    fn certificates_split_off_and_back_byte_for_byte() {
        // ContentInfo { OID, [0] { SignedData { version, digestAlgorithms, encap,
        // [0] certificates, signerInfos } } } with long and short lengths.
        for cert_len in [10usize, 200, 3000] {
            let mut sd = Vec::new();
            sd.extend_from_slice(&[0x02, 0x01, 0x03]);
            sd.extend_from_slice(&[0x31, 0x02, 0x05, 0x00]);
            let encap = vec![0x30, 0x03, 0x06, 0x01, 0x01];
            sd.extend_from_slice(&encap);
            let mut certs = Vec::new();
            put_header(&mut certs, 0xa0, cert_len);
            certs.extend(std::iter::repeat_n(0x42, cert_len));
            let mut signer_infos = Vec::new();
            put_header(&mut signer_infos, 0x31, 150);
            signer_infos.extend(std::iter::repeat_n(0x17, 150));
            let oid = [0x06, 0x03, 0x2a, 0x86, 0x48];
            let parts: Vec<&[u8]> = vec![&sd[..3], &sd[3..7], &sd[7..], &certs, &signer_infos];
            let token_ok = rebuild(&oid, &parts);
            let (compact, split) = split_certificates(&token_ok).unwrap();
            assert_eq!(split, certs);
            assert_eq!(
                compact,
                rebuild(&oid, &[&sd[..3], &sd[3..7], &sd[7..], &signer_infos])
            );
            assert!(compact.len() < token_ok.len());
            assert_eq!(join_certificates(&compact, &split).unwrap(), token_ok);
            // Without certificates there is nothing to split.
            assert_eq!(split_certificates(&compact), None);
        }
    }
}
