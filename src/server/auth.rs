//! Who is asking, and how many tokens they may take.
//!
//! A request names its client with an API key in the `Authorization` header (`Bearer <key>`,
//! or `Basic` with the key as the password and an empty user name or the client's own name),
//! with a TLS client certificate that the HTTPS listener verified against `server.tls.client_ca`
//! (mapped by its SHA-256 fingerprint, or by its subject together with its issuer's), or with
//! both when they agree. A subject is matched only with the name of the CA that signed the
//! certificate (which the handshake verified): any CA of `client_ca` can put any subject in a
//! certificate it issues, so a subject alone would let every trusted CA speak for the client. A
//! credential that is presented but wrong is refused (401), never taken as anonymous; a request
//! with none is the anonymous client when `auth.anonymous` allows it.
//!
//! API keys are random 256-bit strings, so the configuration keeps their SHA-256 only (a slow
//! password hash would add nothing against guessing and cost every request). Quotas are token
//! buckets, one per configured client and one shared by all anonymous callers, so that memory
//! stays bounded whoever calls; a batch takes one token before its body is read, and once its
//! n items are counted that one back and n at once (it keeps the one when refused before
//! then). A reload keeps the bucket, spent or not, of every client whose rate and burst it leaves unchanged (and the
//! anonymous one likewise), and a client whose quota changed starts owing the tokens it owed,
//! so that reloading forgives no client its debt.
//!
//! Everything here is pure: the HTTP layer hands in the header and the verified certificate and
//! turns a [`Refusal`] or a wait into its reply.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lc_rs::constant_time::verify_slices_are_equal;
use aws_lc_rs::digest::{digest, SHA256};
use base64::Engine;

use super::Client;
use crate::config::{sha256_hex, AuthConfig};

/// Why a request was not authenticated; the HTTP layer answers 401.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No credential, and anonymous access is off.
    Unauthenticated,
    /// A credential was presented and is wrong (or two of them disagree); the reason is for
    /// the server's log, never for the client.
    InvalidCredentials(&'static str),
}

/// What a request's connection tells about its client: whether it is TLS, and the client
/// certificate its handshake verified.
#[derive(Clone, Copy, Debug, Default)]
pub struct Link<'a> {
    pub tls: bool,
    pub certificate: Option<&'a PeerCertificate>,
    /// The TLS configuration was reloaded since the handshake and refuses that certificate
    /// now (a CRL revoked it, its CA was dropped), or requires one where none was presented.
    pub certificate_refused: bool,
}

/// A distinguished name as clients are matched by it: its RDNs in order, each its (attribute
/// type, value) pairs sorted, string values as text whatever their ASN.1 string type, others
/// as their DER. So one name written as `openssl x509 -nameopt RFC2253`
/// prints it (`emailAddress=`, non-ASCII escaped as `\C3\A1`) and as a certificate encodes it
/// (a PrintableString, a UTF8String) compare equal; values compare exactly (case included).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NameKey(Vec<Vec<(der::asn1::ObjectIdentifier, Value)>>);

/// An attribute's value as compared: a string's text, or the DER of anything else.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Value {
    Text(String),
    Der(Vec<u8>),
}

impl NameKey {
    pub fn of(name: &x509_cert::name::Name) -> Self {
        Self(
            name.iter_rdn()
                .map(|rdn| {
                    let mut pairs: Vec<_> =
                        rdn.iter().map(|a| (a.oid, value_of(&a.value))).collect();
                    pairs.sort();
                    pairs
                })
                .collect(),
        )
    }

    /// From RFC 4514 text (`CN=…,O=…,C=…`).
    pub fn parse(text: &str) -> Option<Self> {
        text.parse::<x509_cert::name::Name>()
            .ok()
            .map(|name| Self::of(&name))
    }
}

fn value_of(value: &der::Any) -> Value {
    use der::{Encode, Tag, Tagged};
    let text = match value.tag() {
        Tag::Utf8String
        | Tag::PrintableString
        | Tag::Ia5String
        | Tag::VisibleString
        | Tag::TeletexString => std::str::from_utf8(value.value()).ok().map(str::to_owned),
        Tag::BmpString => {
            let units: Option<Vec<u16>> = value
                .value()
                .chunks(2)
                .map(|c| <[u8; 2]>::try_from(c).ok().map(u16::from_be_bytes))
                .collect();
            units.and_then(|u| String::from_utf16(&u).ok())
        }
        _ => None,
    };
    match text {
        Some(text) => Value::Text(text),
        None => Value::Der(value.to_der().unwrap_or_default()),
    }
}

/// The identity of a verified TLS client certificate, computed once per connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerCertificate {
    /// SHA-256 of the certificate's DER.
    pub sha256: [u8; 32],
    /// Its issuer (the subject of the CA that signed it) and its subject, as clients are
    /// matched by them; `None` when they cannot be read, or when no client CA issued it
    /// directly (its issuer's name then says nothing of who vouches for its subject).
    pub names: Option<(NameKey, NameKey)>,
    /// The end of its validity, Unix seconds: checked at every request, since a resumed TLS
    /// session restores the certificate without verifying it again, and a connection lives
    /// for many requests. `None` where it, or a CA certificate of its chain, cannot be read
    /// here (webpki is more lenient than RFC 5280: a serial of more than 20 octets, a
    /// non-minimal INTEGER): its end, or theirs, would go unchecked, so it is refused.
    pub not_after_s: Option<u64>,
    /// The ends of the other certificates the client presented (its CA certificates), in
    /// order: as each passes, the connection's chain is verified again (a CA certificate
    /// expired refuses it; one the client sent and the path does not use does not, and once
    /// a verification after its end accepted the chain it is not asked again).
    pub cas_not_after_s: Vec<u64>,
    /// The chain the handshake verified, the client's certificate first: verified again
    /// when the TLS configuration is reloaded while the connection lives.
    pub chain: Vec<rustls::pki_types::CertificateDer<'static>>,
}

impl PeerCertificate {
    /// The identity of `chain`'s first certificate, the chain kept; its names only where
    /// `issued_by_a_client_ca` (its issuer signed it with its own key, checked by
    /// `tls::Issuers::issued`).
    pub fn from_chain(
        chain: &[rustls::pki_types::CertificateDer<'_>],
        issued_by_a_client_ca: bool,
    ) -> Self {
        use der::Decode;
        let leaf = chain.first().map_or(&[][..], |c| c.as_ref());
        let identity = Self::from_der(leaf);
        let cas_not_after_s: Option<std::collections::BTreeSet<u64>> = chain
            .iter()
            .skip(1)
            .map(|c| {
                x509_cert::Certificate::from_der(c).ok().map(|c| {
                    c.tbs_certificate()
                        .validity()
                        .not_after
                        .to_unix_duration()
                        .as_secs()
                })
            })
            .collect();
        Self {
            chain: chain.iter().map(|c| c.clone().into_owned()).collect(),
            names: identity.names.filter(|_| issued_by_a_client_ca),
            not_after_s: identity.not_after_s.filter(|_| cas_not_after_s.is_some()),
            cas_not_after_s: cas_not_after_s.unwrap_or_default().into_iter().collect(),
            ..identity
        }
    }

    pub fn from_der(der: &[u8]) -> Self {
        use der::Decode;
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(digest(&SHA256, der).as_ref());
        let (names, not_after_s) = x509_cert::Certificate::from_der(der)
            .map(|c| {
                let tbs = c.tbs_certificate();
                let not_after = tbs.validity().not_after.to_unix_duration().as_secs();
                (
                    Some((NameKey::of(tbs.issuer()), NameKey::of(tbs.subject()))),
                    Some(not_after),
                )
            })
            .unwrap_or_default();
        Self {
            sha256,
            names,
            not_after_s,
            cas_not_after_s: Vec::new(),
            chain: Vec::new(),
        }
    }
}

impl super::Tsa {
    /// Replaces the clients of `[auth]` and their quotas (SIGHUP). A client of the same name
    /// whose rate and burst are unchanged keeps its bucket as it is, spent or not, and so do the
    /// anonymous callers; a new client, or one whose quota changed, starts full.
    pub fn reload_clients(&self, mut auth: Auth) {
        let kept = auth.keep_buckets(&self.auth.load());
        tracing::info!(
            event = "clients_reloaded",
            clients = auth.clients.len(),
            quotas_kept = kept,
            anonymous = auth.anonymous,
            "clients and quotas reloaded"
        );
        self.auth.store(Arc::new(auth));
        self.credential_reloads
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// One configured client.
struct Known {
    client: Client,
    api_key_sha256: Option<[u8; 32]>,
    bucket: Option<Arc<Bucket>>,
}

/// The clients of `[auth]` with their quotas. Replaced whole on reload, keeping the buckets of
/// the clients whose quota is unchanged (`Auth::keep_buckets`).
pub struct Auth {
    anonymous: bool,
    keys_over_https_only: bool,
    anonymous_bucket: Option<Arc<Bucket>>,
    clients: Vec<Known>,
    by_key: HashMap<[u8; 32], usize>,
    by_certificate: HashMap<[u8; 32], usize>,
    /// By (issuer, subject).
    by_subject: HashMap<(NameKey, NameKey), usize>,
    by_name: HashMap<Arc<str>, usize>,
    /// The time base of the buckets.
    epoch: Instant,
}

impl Auth {
    /// The clients of a configuration (which `Config::load` has validated).
    pub fn new(config: &AuthConfig) -> anyhow::Result<Self> {
        let mut auth = Self {
            anonymous: config.anonymous,
            keys_over_https_only: config.keys_over_https_only,
            anonymous_bucket: Bucket::new(config.anonymous_rate_per_s, config.anonymous_burst)
                .map(Arc::new),
            clients: Vec::with_capacity(config.client.len()),
            by_key: HashMap::new(),
            by_certificate: HashMap::new(),
            by_subject: HashMap::new(),
            by_name: HashMap::new(),
            epoch: Instant::now(),
        };
        for (i, c) in config.client.iter().enumerate() {
            let client = Client::named(c.name.as_str());
            let name = client.name.clone().expect("a named client");
            if auth.by_name.insert(name, i).is_some() {
                anyhow::bail!("auth.client '{}' is configured twice", c.name);
            }
            let api_key_sha256 = c.api_key_sha256.as_deref().map(sha256_hex).transpose()?;
            if let Some(hash) = api_key_sha256 {
                auth.by_key.insert(hash, i);
            }
            if let Some(hash) = &c.certificate_sha256 {
                auth.by_certificate.insert(sha256_hex(hash)?, i);
            }
            match (&c.certificate_subject, &c.certificate_issuer) {
                (Some(subject), Some(issuer)) => {
                    let name = |text: &str, what| {
                        NameKey::parse(text).ok_or_else(|| {
                            anyhow::anyhow!(
                                "auth.client '{}': {what} {text:?} is not a distinguished name \
                                 in RFC 4514 form (CN=…,O=…,C=…)",
                                c.name
                            )
                        })
                    };
                    let key = (
                        name(issuer, "certificate_issuer")?,
                        name(subject, "certificate_subject")?,
                    );
                    if let Some(other) = auth.by_subject.insert(key, i) {
                        anyhow::bail!(
                            "auth.client '{}' and '{}' name the same certificate subject and \
                             issuer (written differently)",
                            config.client[other].name,
                            c.name
                        );
                    }
                }
                (None, None) => {}
                _ => anyhow::bail!(
                    "auth.client '{}': certificate_subject and certificate_issuer go together",
                    c.name
                ),
            }
            auth.clients.push(Known {
                client,
                api_key_sha256,
                bucket: Bucket::new(c.rate_per_s, c.burst).map(Arc::new),
            });
        }
        Ok(auth)
    }

    /// Takes over from `old`, the configuration in force, the bucket of each client of the
    /// same name whose rate and burst are the same, and the anonymous bucket when its quota is
    /// the same: the very buckets, shared, so that tokens taken through `old` while the reload
    /// is swapped in count too. A bucket whose quota changed starts with what its client had
    /// spent and still owes ([`Bucket::carry_from`]: a large batch's debt is not forgiven
    /// by a new rate). The buckets' time base becomes `old`'s. Answers how many buckets were
    /// kept.
    fn keep_buckets(&mut self, old: &Auth) -> usize {
        self.epoch = old.epoch;
        let now = self.epoch.elapsed().as_nanos() as u64;
        let mut kept = 0;
        let mut keep = |new: &mut Option<Arc<Bucket>>, old: Option<&Arc<Bucket>>| {
            if let (Some(bucket), Some(old)) = (new.as_ref(), old) {
                if bucket.same_quota(old) {
                    *new = Some(Arc::clone(old));
                    kept += 1;
                } else {
                    bucket.carry_from(old, now);
                }
            }
        };
        keep(&mut self.anonymous_bucket, old.anonymous_bucket.as_ref());
        for known in &mut self.clients {
            let name = known.client.name.as_ref().expect("a named client");
            let before = old
                .by_name
                .get(name)
                .and_then(|&i| old.clients[i].bucket.as_ref());
            keep(&mut known.bucket, before);
        }
        kept
    }

    /// The client of a request: from its `Authorization` header (`None` when absent) and
    /// the TLS client certificate its connection presented and the handshake verified.
    pub fn authenticate(
        &self,
        link: Link<'_>,
        authorization: Option<&[u8]>,
    ) -> Result<Client, Refusal> {
        let now_s = crate::clock::system_unix_ns() / 1_000_000_000;
        self.authenticate_at(link, authorization, now_s)
    }

    /// [`Auth::authenticate`] at `now_s` (Unix seconds).
    pub fn authenticate_at(
        &self,
        link: Link<'_>,
        authorization: Option<&[u8]>,
        now_s: u64,
    ) -> Result<Client, Refusal> {
        if authorization.is_some() && !link.tls && self.keys_over_https_only {
            return Err(Refusal::InvalidCredentials(
                "credentials over plain HTTP, which auth.keys_over_https_only refuses",
            ));
        }
        let certificate = link.certificate;
        if link.certificate_refused {
            return Err(Refusal::InvalidCredentials(
                "the TLS configuration in force refuses the connection's client certificate now \
                 (revoked, its CA dropped, a CA certificate of its chain expired, a client CRL \
                 past its nextUpdate), or requires one",
            ));
        }
        if certificate.is_some_and(|c| c.not_after_s.is_none()) {
            return Err(Refusal::InvalidCredentials(
                "the client certificate, or a CA certificate of its chain, cannot be read as \
                 RFC 5280 has it (a serial longer than 20 octets, a non-minimal encoding): its \
                 validity could not be checked",
            ));
        }
        if certificate.is_some_and(|c| c.not_after_s.is_some_and(|end| now_s > end)) {
            return Err(Refusal::InvalidCredentials(
                "the client certificate has expired since its connection's handshake (or the \
                 session's that this one resumed)",
            ));
        }
        let by_key = authorization
            .map(|h| self.by_authorization(h))
            .transpose()?;
        let by_certificate = certificate.map(|c| {
            self.by_certificate
                .get(&c.sha256)
                .or_else(|| {
                    c.names
                        .as_ref()
                        .and_then(|names| self.by_subject.get(names))
                })
                .copied()
        });
        let index = match (by_key, by_certificate) {
            (Some(key), Some(Some(cert))) if key != cert => {
                return Err(Refusal::InvalidCredentials(
                    "the API key and the client certificate belong to different clients",
                ))
            }
            // A certificate beside a key names the same client or none may be there: one of
            // no configured client (a removed client's, say) is refused with or without a key.
            (_, Some(None)) => {
                return Err(Refusal::InvalidCredentials(
                    match certificate.is_some_and(|c| c.names.is_none()) {
                        // What an operator needs to know of a client mapped by subject whose
                        // certificate comes from an intermediate CA.
                        true => {
                            "the client certificate belongs to no configured client: its \
                             SHA-256 names none, and no client CA signed it itself, so its \
                             subject names none either (map a certificate issued under an \
                             intermediate CA by certificate_sha256)"
                        }
                        false => "the client certificate belongs to no configured client",
                    },
                ));
            }
            (Some(key), _) => key,
            (None, Some(Some(cert))) => cert,
            (None, None) if self.anonymous => return Ok(Client::ANONYMOUS),
            (None, None) => return Err(Refusal::Unauthenticated),
        };
        Ok(self.clients[index].client.clone())
    }

    /// The configured client an `Authorization` header names.
    fn by_authorization(&self, header: &[u8]) -> Result<usize, Refusal> {
        const MALFORMED: Refusal = Refusal::InvalidCredentials("malformed Authorization header");
        let header = std::str::from_utf8(header).map_err(|_| MALFORMED)?.trim();
        let (scheme, rest) = header.split_once(' ').ok_or(MALFORMED)?;
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            return self.by_key(rest.as_bytes());
        }
        if !scheme.eq_ignore_ascii_case("basic") {
            return Err(Refusal::InvalidCredentials(
                "unsupported Authorization scheme (Bearer or Basic)",
            ));
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .map_err(|_| MALFORMED)?;
        let colon = decoded.iter().position(|b| *b == b':').ok_or(MALFORMED)?;
        let (user, password) = (&decoded[..colon], &decoded[colon + 1..]);
        // The key as the password (user name empty or the client's own), or as the user name
        // with an empty password, as some clients send it.
        let (user, key) = match password.is_empty() {
            true => (&[][..], user),
            false => (user, password),
        };
        let index = self.by_key(key)?;
        let name = self.clients[index].client.name.as_deref().unwrap_or("");
        if !user.is_empty() && user != name.as_bytes() {
            return Err(Refusal::InvalidCredentials(
                "the Basic user name is not the API key's client",
            ));
        }
        Ok(index)
    }

    fn by_key(&self, key: &[u8]) -> Result<usize, Refusal> {
        const UNKNOWN: Refusal = Refusal::InvalidCredentials("unknown API key");
        if key.is_empty() {
            return Err(UNKNOWN);
        }
        let hash = digest(&SHA256, key);
        // Looking up a hash of a 256-bit random key tells a timing attacker nothing about the
        // key; the comparison of the stored hash is constant-time all the same.
        let hash: [u8; 32] = hash.as_ref().try_into().expect("32 octets");
        let &index = self.by_key.get(&hash).ok_or(UNKNOWN)?;
        let stored = self.clients[index].api_key_sha256.as_ref().ok_or(UNKNOWN)?;
        verify_slices_are_equal(stored, &hash).map_err(|_| UNKNOWN)?;
        Ok(index)
    }

    /// Takes `n` tokens from `client`'s quota; when it does not hold them, nothing is taken and
    /// the answer is how long to wait. A client unknown here (configured before a reload that
    /// removed it) has no quota.
    pub fn take(&self, client: &Client, n: u32) -> Result<Taken, Duration> {
        match self.bucket(client) {
            // Nothing to give back: no time to read.
            None => Ok(Taken { n, at_ns: 0 }),
            Some(bucket) => {
                let at_ns = self.epoch.elapsed().as_nanos() as u64;
                bucket
                    .take(at_ns, n)
                    .map(|()| Taken { n, at_ns })
                    .map_err(Duration::from_nanos)
            }
        }
    }

    /// Gives back tokens taken from `client`'s quota, for a request the server then refused
    /// as overloaded (after its wait for a place, a second or more later): a refusal the
    /// client did not cause (another client's load may have) costs it nothing; and a batch's
    /// one token before its n items are taken. Nothing goes back once the bucket has been
    /// full since the take: it had refilled them already.
    pub fn give_back(&self, client: &Client, taken: Taken) {
        if let Some(bucket) = self.bucket(client) {
            bucket.give_back(taken.n, taken.at_ns);
        }
    }

    /// Gives back, of tokens a batch took for items the server failed on its own
    /// (`systemFailure`, `timeNotAvailable`: [`Outcome::servers_fault`]), those that left
    /// the bucket in debt past empty: a batch answered while the clock was unsynchronized
    /// or the disk full does not keep its client refused for minutes after, while a client
    /// still pays its burst for them (refunded in full, they would let it ask at any rate
    /// for as long as the server fails fast).
    ///
    /// [`Outcome::servers_fault`]: super::Outcome::servers_fault
    pub fn forgive_debt(&self, client: &Client, taken: Taken) {
        if let Some(bucket) = self.bucket(client) {
            let now = self.epoch.elapsed().as_nanos() as u64;
            bucket.forgive_debt(taken.n, taken.at_ns, now);
        }
    }

    /// The anonymous callers' burst (`anonymous_burst`, or one second's worth of their rate
    /// where it is 0), where `client` is anonymous and `n` tokens are more than it: such a
    /// batch is refused (taken from their shared bucket, its debt would refuse every
    /// anonymous caller until paid back at the rate, minutes for a large batch).
    pub fn over_shared_burst(&self, client: &Client, n: u32) -> Option<u64> {
        let bucket = self.anonymous_bucket.as_deref()?;
        let burst = bucket.capacity / bucket.interval;
        (client.name.is_none() && u64::from(n) > burst).then_some(burst)
    }

    /// Whether any client is named: only then do clients have shares of the batch places
    /// (`admission::ClientBatches`).
    pub fn has_named_clients(&self) -> bool {
        !self.clients.is_empty()
    }

    fn bucket(&self, client: &Client) -> Option<&Bucket> {
        match &client.name {
            None => self.anonymous_bucket.as_deref(),
            Some(name) => self
                .by_name
                .get(name)
                .and_then(|&i| self.clients[i].bucket.as_deref()),
        }
    }
}

/// Tokens taken from a client's quota ([`Auth::take`]), to give back
/// ([`Auth::give_back`]) if the server then refuses the request as overloaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub struct Taken {
    n: u32,
    /// When, on the quotas' clock.
    at_ns: u64,
}

impl Taken {
    /// `n` of these tokens (at most all), to give back some of a batch's.
    pub fn part(self, n: u32) -> Taken {
        Taken {
            n: n.min(self.n),
            at_ns: self.at_ns,
        }
    }
}

/// A token bucket as the generic cell rate algorithm: one atomic, the theoretical arrival
/// time (TAT) of the next token; the bucket is full when the TAT is not after now.
struct Bucket {
    /// Nanoseconds per token.
    interval: u64,
    /// Burst × interval: how far the TAT may run ahead of now.
    capacity: u64,
    tat: AtomicU64,
    /// The last time a take found the bucket full: the tokens taken before had refilled, and
    /// that take started the TAT afresh from its own time, so their cost is no longer in it.
    full_at: AtomicU64,
}

impl Bucket {
    /// None for an unlimited rate (0).
    fn new(rate_per_s: f64, burst: u32) -> Option<Self> {
        if rate_per_s <= 0.0 || !rate_per_s.is_finite() {
            return None;
        }
        let interval = (1e9 / rate_per_s).round().max(1.0) as u64;
        let burst = match burst {
            0 => rate_per_s.ceil().max(1.0) as u64,
            b => u64::from(b),
        };
        Some(Self {
            interval,
            capacity: interval.saturating_mul(burst),
            tat: AtomicU64::new(0),
            full_at: AtomicU64::new(0),
        })
    }

    /// Whether `other` has the same rate and burst.
    fn same_quota(&self, other: &Bucket) -> bool {
        (self.interval, self.capacity) == (other.interval, other.capacity)
    }

    /// A new bucket for the quota `old` had until `now`: it starts with what `old` had
    /// spent, as far as its own burst goes (a burst lowered from 10,000 to 100 leaves an
    /// empty bucket, not 10,000 tokens owed), and with any debt `old` ran up past empty (a
    /// batch taken past the burst), tokens counted as tokens whatever the new rate. Refunds
    /// of takes before it go no further than a full bucket would have (`full_at`).
    fn carry_from(&self, old: &Bucket, now: u64) {
        let ahead = old.tat.load(Ordering::SeqCst).saturating_sub(now);
        if ahead == 0 {
            return;
        }
        // In the new bucket's time: ns ahead in old tokens, times the new interval.
        let rescale = |ns: u64| {
            (u128::from(ns) * u128::from(self.interval) / u128::from(old.interval))
                .min(u128::from(u64::MAX)) as u64
        };
        let spent = rescale(ahead.min(old.capacity)).min(self.capacity);
        let debt = rescale(ahead.saturating_sub(old.capacity));
        let tat = now.saturating_add(spent).saturating_add(debt);
        self.tat.store(tat, Ordering::SeqCst);
        self.full_at.store(now, Ordering::SeqCst);
    }

    /// The TAT after `n` more tokens from `tat` at `now`, or how long until they fit.
    fn after(&self, tat: u64, now: u64, n: u32) -> Result<u64, u64> {
        let cost = self.interval.saturating_mul(u64::from(n));
        let next = tat.max(now).saturating_add(cost);
        let fits = next - now <= self.capacity || (cost > self.capacity && tat <= now);
        match (fits, cost > self.capacity) {
            (true, _) => Ok(next),
            (false, true) => Err(tat - now),
            (false, false) => Err(next - now - self.capacity),
        }
    }

    /// Returns `n` tokens taken at `taken_at` (ns): the TAT moves back by their cost, while it
    /// still holds it. A take left the TAT that cost further on, and each take after it moved
    /// the TAT on from there, unless it found the bucket full: only such a take drops what the
    /// TAT held (it starts afresh from its own time). So until one has, the cost is all there
    /// (a TAT moved back before now is a full bucket, no fuller); after one, nothing is
    /// returned rather than tokens the bucket had already refilled (to other callers).
    ///
    /// A take that finds the bucket full notes it before it moves the TAT, and the TAT is
    /// moved back only by a change whose `full_at` was read after the TAT it replaces
    /// (sequentially consistent): a take that started the TAT afresh is always seen, never
    /// given the tokens before it.
    fn give_back(&self, n: u32, taken_at: u64) {
        let cost = self.interval.saturating_mul(u64::from(n));
        let _ = self
            .tat
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |tat| {
                (self.full_at.load(Ordering::SeqCst) <= taken_at).then(|| tat.saturating_sub(cost))
            });
    }

    /// [`Bucket::give_back`], of at most what holds the TAT past a bucket that is empty at
    /// `now`.
    fn forgive_debt(&self, n: u32, taken_at: u64, now: u64) {
        let cost = self.interval.saturating_mul(u64::from(n));
        let _ = self
            .tat
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |tat| {
                let debt = tat.saturating_sub(now).saturating_sub(self.capacity);
                (self.full_at.load(Ordering::SeqCst) <= taken_at && debt > 0)
                    .then(|| tat - cost.min(debt))
            });
    }

    /// Takes `n` tokens at `now` (ns), or answers the wait in ns. More than the burst at once
    /// (a large batch) is taken from a full bucket, which then stays empty until the debt is
    /// paid back at the rate.
    fn take(&self, now: u64, n: u32) -> Result<(), u64> {
        let mut tat = self.tat.load(Ordering::SeqCst);
        loop {
            let next = self.after(tat, now, n)?;
            // Noted before the TAT moves (see `give_back`); noted and then not taken (another
            // take came first), it only withholds a refund, never grants one.
            if tat <= now {
                self.full_at.fetch_max(now, Ordering::SeqCst);
            }
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return Ok(()),
                Err(current) => tat = current,
            }
        }
    }
}

/// A new API key: `tsa_` and 32 random octets in URL-safe base64, with its SHA-256 in hex.
pub fn new_api_key() -> (String, String) {
    let mut random = [0u8; 32];
    aws_lc_rs::rand::fill(&mut random).expect("the system RNG");
    let key = format!(
        "tsa_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random)
    );
    let hash = api_key_sha256(&key);
    (key, hash)
}

/// The hex SHA-256 of an API key, as `api_key_sha256` holds it.
pub fn api_key_sha256(key: &str) -> String {
    hex(digest(&SHA256, key.as_bytes()).as_ref())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_over_plain_http_are_refused_when_configured() {
        let plain = Link::default();
        let open = Auth::new(&config(true)).unwrap();
        assert_eq!(
            name(open.authenticate(plain, Some(&bearer(ALICE_KEY)))),
            Ok(Some("alice".into()))
        );
        let strict = Auth::new(&AuthConfig {
            keys_over_https_only: true,
            ..config(true)
        })
        .unwrap();
        assert!(matches!(
            strict.authenticate(plain, Some(&bearer(ALICE_KEY))),
            Err(Refusal::InvalidCredentials(why)) if why.contains("plain HTTP")
        ));
        // Over TLS the key is taken; without credentials plain HTTP stays anonymous.
        assert_eq!(
            name(strict.authenticate(link(None), Some(&bearer(ALICE_KEY)))),
            Ok(Some("alice".into()))
        );
        assert_eq!(name(strict.authenticate(plain, None)), Ok(None));
    }

    /// A TLS connection with `certificate` (keys over plain HTTP are tested on their own).
    fn link(certificate: Option<&PeerCertificate>) -> Link<'_> {
        Link {
            tls: true,
            certificate,
            certificate_refused: false,
        }
    }
    use crate::config::ClientConfig;

    const ALICE_KEY: &str = "tsa_alice-key-for-tests-only-000000000000000";
    const BOB_KEY: &str = "tsa_bob-key-for-tests-only-00000000000000000";

    fn client(name: &str) -> ClientConfig {
        ClientConfig {
            name: name.into(),
            api_key_sha256: None,
            certificate_sha256: None,
            certificate_subject: None,
            certificate_issuer: None,
            rate_per_s: 0.0,
            burst: 0,
        }
    }

    fn config(anonymous: bool) -> AuthConfig {
        AuthConfig {
            anonymous,
            anonymous_rate_per_s: 0.0,
            anonymous_burst: 0,
            keys_over_https_only: false,
            client: vec![
                ClientConfig {
                    api_key_sha256: Some(api_key_sha256(ALICE_KEY)),
                    ..client("alice")
                },
                ClientConfig {
                    api_key_sha256: Some(api_key_sha256(BOB_KEY).to_uppercase()),
                    certificate_sha256: Some(
                        [0xb0u8; 32]
                            .iter()
                            .map(|b| format!("{b:02X}"))
                            .collect::<Vec<_>>()
                            .join(":"),
                    ),
                    ..client("bob")
                },
                ClientConfig {
                    certificate_subject: Some("CN=carol,O=Example,C=VN".into()),
                    certificate_issuer: Some("CN=Client CA A".into()),
                    ..client("carol")
                },
            ],
        }
    }

    fn basic(user: &str, password: &str) -> Vec<u8> {
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        format!("Basic {encoded}").into_bytes()
    }

    fn bearer(key: &str) -> Vec<u8> {
        format!("Bearer {key}").into_bytes()
    }

    fn cert(sha256: [u8; 32], subject: &str) -> PeerCertificate {
        PeerCertificate {
            sha256,
            names: NameKey::parse("CN=Client CA A").zip(NameKey::parse(subject)),
            not_after_s: Some(4_102_444_800),
            cas_not_after_s: Vec::new(),
            chain: Vec::new(),
        }
    }

    fn name(result: Result<Client, Refusal>) -> Result<Option<String>, Refusal> {
        result.map(|c| c.name.as_deref().map(str::to_owned))
    }

    #[test]
    fn api_keys_name_their_client_by_bearer_and_basic() {
        let auth = Auth::new(&config(false)).unwrap();
        let alice = Ok(Some("alice".to_string()));
        for header in [
            bearer(ALICE_KEY),
            format!("bearer   {ALICE_KEY} ").into_bytes(),
            basic("", ALICE_KEY),
            basic("alice", ALICE_KEY),
            basic(ALICE_KEY, ""),
        ] {
            assert_eq!(name(auth.authenticate(link(None), Some(&header))), alice);
        }
        assert_eq!(
            name(auth.authenticate(link(None), Some(&bearer(BOB_KEY)))),
            Ok(Some("bob".into())),
            "an upper-case hash in the configuration"
        );
    }

    #[test]
    fn wrong_credentials_are_refused_even_when_anonymous_is_allowed() {
        let auth = Auth::new(&config(true)).unwrap();
        let invalid = |header: &[u8]| {
            matches!(
                auth.authenticate(link(None), Some(header)),
                Err(Refusal::InvalidCredentials(_))
            )
        };
        assert!(invalid(&bearer("tsa_not-a-key")));
        assert!(invalid(&bearer(&ALICE_KEY[..ALICE_KEY.len() - 1])));
        assert!(invalid(b"Bearer "));
        assert!(invalid(b"Bearer"));
        assert!(invalid(&basic("bob", ALICE_KEY)), "another client's name");
        assert!(invalid(&basic("", "")));
        assert!(invalid(b"Basic not base64!"));
        assert!(invalid(b"Basic YWxpY2U="), "no colon");
        assert!(invalid(format!("Digest {ALICE_KEY}").as_bytes()));
        assert!(invalid(&[0xff, 0xfe]));
        // Anonymous without credentials.
        assert_eq!(name(auth.authenticate(link(None), None)), Ok(None));
    }

    #[test]
    fn without_anonymous_access_a_credential_is_needed() {
        let auth = Auth::new(&config(false)).unwrap();
        assert_eq!(
            auth.authenticate(link(None), None),
            Err(Refusal::Unauthenticated)
        );
    }

    #[test]
    fn client_certificates_map_by_fingerprint_or_subject_and_must_agree_with_a_key() {
        let auth = Auth::new(&config(false)).unwrap();
        let bob = cert([0xb0; 32], "CN=whoever");
        let carol = cert([0xc0; 32], "CN=carol,O=Example,C=VN");
        let stranger = cert([0x50; 32], "CN=stranger");
        assert_eq!(
            name(auth.authenticate(link(Some(&bob)), None)),
            Ok(Some("bob".into()))
        );
        assert_eq!(
            name(auth.authenticate(link(Some(&carol)), None)),
            Ok(Some("carol".into()))
        );
        assert!(matches!(
            auth.authenticate(link(Some(&stranger)), None),
            Err(Refusal::InvalidCredentials(_))
        ));
        // Carol's subject from another CA is nobody.
        let other_ca = PeerCertificate {
            names: NameKey::parse("CN=Client CA B").zip(NameKey::parse("CN=carol,O=Example,C=VN")),
            ..carol.clone()
        };
        assert!(matches!(
            auth.authenticate(link(Some(&other_ca)), None),
            Err(Refusal::InvalidCredentials(_))
        ));
        // A certificate no client CA signed itself (its names dropped by the handshake) and
        // of no configured SHA-256: the reason says why a subject did not map it.
        let under_an_intermediate = PeerCertificate {
            names: None,
            ..other_ca.clone()
        };
        assert!(matches!(
            auth.authenticate(link(Some(&under_an_intermediate)), None),
            Err(Refusal::InvalidCredentials(why)) if why.contains("intermediate CA")
        ));
        // Key and certificate: the same client; a certificate of no configured client is
        // refused beside a good key too.
        assert_eq!(
            name(auth.authenticate(link(Some(&bob)), Some(&bearer(BOB_KEY)))),
            Ok(Some("bob".into()))
        );
        assert!(matches!(
            auth.authenticate(link(Some(&stranger)), Some(&bearer(ALICE_KEY))),
            Err(Refusal::InvalidCredentials(_))
        ));
        assert!(matches!(
            auth.authenticate(link(Some(&bob)), Some(&bearer(ALICE_KEY))),
            Err(Refusal::InvalidCredentials(_))
        ));
        // A wrong key is not saved by a good certificate.
        assert!(matches!(
            auth.authenticate(link(Some(&bob)), Some(&bearer("tsa_wrong"))),
            Err(Refusal::InvalidCredentials(_))
        ));
        // A certificate that expired after the handshake (a resumed session, a long
        // connection) names nobody any more, not even beside a good key.
        let end = bob.not_after_s.unwrap();
        assert_eq!(
            name(auth.authenticate_at(link(Some(&bob)), None, end)),
            Ok(Some("bob".into()))
        );
        for key in [None, Some(bearer(BOB_KEY))] {
            assert!(matches!(
                auth.authenticate_at(link(Some(&bob)), key.as_deref(), end + 1),
                Err(Refusal::InvalidCredentials(_))
            ));
        }
        // One whose validity cannot be read (a chain webpki took that RFC 5280 does not):
        // refused, its end unknown, even where its hash names a client.
        let unreadable = PeerCertificate {
            not_after_s: None,
            ..bob.clone()
        };
        for key in [None, Some(bearer(BOB_KEY))] {
            assert!(matches!(
                auth.authenticate_at(link(Some(&unreadable)), key.as_deref(), 0),
                Err(Refusal::InvalidCredentials(why)) if why.contains("cannot be read")
            ));
        }
    }

    #[test]
    fn one_certificate_name_written_two_ways_for_two_clients_is_refused() {
        let mut two = config(false);
        two.client.push(ClientConfig {
            certificate_subject: Some("CN=carol,O=Example,C=VN".into()),
            certificate_issuer: Some("CN=Client CA A".into()),
            ..client("dave")
        });
        // The same name as carol's, written with an escape.
        two.client[3].certificate_subject = Some(r"CN=c\61rol,O=Example,C=VN".into());
        let error = Auth::new(&two).err().expect("refused").to_string();
        assert!(error.contains("'carol' and 'dave'"), "{error}");
        two.client[3].certificate_subject = Some("CN=dave,O=Example,C=VN".into());
        Auth::new(&two).unwrap();
    }

    #[test]
    fn names_compare_by_their_attributes_whatever_their_text() {
        // As `openssl x509 -noout -subject -nameopt RFC2253` prints a Vietnamese subject with
        // an e-mail address, and as this crate writes it.
        let openssl =
            r"emailAddress=an@example.vn,CN=Nguy\E1\BB\85n V\C4\83n An,O=C\C3\B4ng ty,C=VN";
        let ours = "EMAILADDRESS=an@example.vn,CN=Nguyễn Văn An,O=Công ty,C=VN";
        let key = NameKey::parse(openssl).expect("RFC 4514");
        assert_eq!(NameKey::parse(ours), Some(key.clone()));
        let name: x509_cert::name::Name = ours.parse().unwrap();
        assert_eq!(NameKey::of(&name), key);
        assert_eq!(
            name.to_string()
                .parse::<x509_cert::name::Name>()
                .map(|n| NameKey::of(&n)),
            Ok(key.clone())
        );
        // Another value, another order of the RDNs, another case: another name.
        for other in [
            "emailAddress=an@example.vn,CN=Nguyen Van An,O=Công ty,C=VN",
            "CN=Nguyễn Văn An,emailAddress=an@example.vn,O=Công ty,C=VN",
            "emailAddress=an@example.vn,CN=nguyễn văn an,O=Công ty,C=VN",
        ] {
            assert_ne!(NameKey::parse(other), Some(key.clone()), "{other}");
        }
        assert_eq!(NameKey::parse("not a name"), None);
    }

    #[test]
    fn a_bucket_gives_its_burst_then_the_rate() {
        let ms = 1_000_000u64;
        let bucket = Bucket::new(5.0, 5).unwrap();
        for _ in 0..5 {
            assert_eq!(bucket.take(0, 1), Ok(()));
        }
        assert_eq!(bucket.take(0, 1), Err(200 * ms), "one token every 200 ms");
        assert_eq!(bucket.take(199 * ms, 1), Err(ms));
        assert_eq!(bucket.take(200 * ms, 1), Ok(()));
        assert_eq!(bucket.take(200 * ms, 1), Err(200 * ms));
        // After a long pause the bucket is full again, not fuller.
        assert_eq!(bucket.take(10_000 * ms, 5), Ok(()));
        assert_eq!(bucket.take(10_000 * ms, 1), Err(200 * ms));
        // Several at once: all or nothing.
        assert_eq!(bucket.take(10_400 * ms, 3), Err(200 * ms));
        assert_eq!(bucket.take(10_400 * ms, 2), Ok(()));
    }

    #[test]
    fn a_batch_larger_than_the_burst_takes_a_full_bucket_and_leaves_a_debt() {
        let ms = 1_000_000u64;
        let bucket = Bucket::new(10.0, 0).unwrap(); // burst: one second's worth
        assert_eq!(bucket.capacity, 1_000 * ms);
        assert_eq!(bucket.take(0, 1), Ok(()));
        assert_eq!(bucket.take(0, 30), Err(100 * ms), "only from a full bucket");
        assert_eq!(bucket.take(100 * ms, 30), Ok(()));
        // 30 tokens at 10/s: 3 s of debt. One token again once the debt is down to the
        // burst less one token; another large batch once the bucket is full again.
        assert_eq!(bucket.take(100 * ms, 1), Err(2_100 * ms));
        assert_eq!(bucket.take(3_000 * ms, 30), Err(100 * ms));
        assert_eq!(bucket.take(3_100 * ms, 30), Ok(()));
        // Given back (the batch was refused after all), the debt is gone again.
        bucket.give_back(30, 3_100 * ms);
        assert_eq!(bucket.take(3_100 * ms, 10), Ok(()));
        assert!(bucket.take(3_100 * ms, 1).is_err());
    }

    #[test]
    fn tokens_go_back_after_a_wait_unless_the_bucket_was_full_since() {
        let ms = 1_000_000u64;
        let tat = |bucket: &Bucket| bucket.tat.load(Ordering::Relaxed) / ms;
        let bucket = Bucket::new(10.0, 0).unwrap(); // 100 ms a token, burst 10
        assert_eq!(bucket.take(10_000 * ms, 5), Ok(())); // from a full bucket
        assert_eq!(bucket.take(10_200 * ms, 5), Ok(()));
        assert_eq!(tat(&bucket), 11_000);
        // The first request refused after its wait for a place (1 s and more, longer than
        // its tokens' cost): no take found the bucket full since, so the cost is all there.
        bucket.give_back(5, 10_000 * ms);
        assert_eq!(tat(&bucket), 10_500);
        // Full again at 20 s: the second request's tokens had refilled, and that take
        // started afresh; giving them back would give tokens the bucket never held.
        assert_eq!(bucket.take(20_000 * ms, 10), Ok(()));
        bucket.give_back(5, 10_200 * ms);
        assert_eq!(tat(&bucket), 21_000);
        // The 20 s take's own tokens go back.
        bucket.give_back(10, 20_000 * ms);
        assert_eq!(tat(&bucket), 20_000);
        assert_eq!(bucket.take(20_500 * ms, 10), Ok(()), "full");
    }

    #[test]
    fn a_connections_chain_is_due_again_at_its_ca_certificates_earliest_end() {
        // A certificate of `name`, a CA or not, ending in `until` (a year).
        let params = |name: &str, ca: bool, until: Option<i32>| {
            let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
            p.distinguished_name.push(rcgen::DnType::CommonName, name);
            if ca {
                p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            }
            if let Some(year) = until {
                p.not_after = rcgen::date_time_ymd(year, 1, 1);
            }
            p
        };
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = params("Client CA", true, None);
        let inter_key = rcgen::KeyPair::generate().unwrap();
        let inter = params("Issuing CA", true, Some(2030));
        let inter_der = inter
            .signed_by(&inter_key, &rcgen::Issuer::new(ca, &ca_key))
            .unwrap()
            .der()
            .clone();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf_der = params("carol", false, Some(2035))
            .signed_by(&leaf_key, &rcgen::Issuer::new(inter, &inter_key))
            .unwrap()
            .der()
            .clone();
        let (end_2030, end_2035) = (1_893_456_000, 2_051_222_400);
        assert_eq!(
            PeerCertificate::from_der(&leaf_der).not_after_s,
            Some(end_2035)
        );
        let peer = PeerCertificate::from_chain(&[leaf_der, inter_der], false);
        assert_eq!(
            peer.not_after_s,
            Some(end_2035),
            "the client certificate's own"
        );
        assert_eq!(
            peer.cas_not_after_s,
            [end_2030],
            "from then the chain is verified again"
        );
        // A serial of 22 octets (webpki takes it, RFC 5280 allows 20): its end, or that of
        // the CA certificate beside it, cannot be read, and so is known to be unknown.
        let mut long = params("dave", false, Some(2035));
        long.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x11; 22]));
        let long_der = long.self_signed(&leaf_key).unwrap().der().clone();
        assert_eq!(PeerCertificate::from_der(&long_der).not_after_s, None);
        let leaf_der = params("erin", false, Some(2035))
            .self_signed(&leaf_key)
            .unwrap()
            .der()
            .clone();
        let peer = PeerCertificate::from_chain(&[leaf_der, long_der], false);
        assert_eq!(
            peer.not_after_s, None,
            "a CA certificate that cannot be read"
        );
    }

    #[test]
    fn unlimited_clients_and_quotas_by_name() {
        let mut config = config(true);
        config.client[0].rate_per_s = 1.0;
        config.client[0].burst = 2;
        config.anonymous_rate_per_s = 1.0;
        config.anonymous_burst = 1;
        let auth = Auth::new(&config).unwrap();
        let alice = Client::named("alice");
        assert!(auth.take(&alice, 2).is_ok());
        let wait = auth.take(&alice, 1).unwrap_err();
        assert!(wait > Duration::from_millis(900) && wait <= Duration::from_secs(1));
        // Bob has no limit; the anonymous callers share one bucket; unknown names are free.
        for _ in 0..1000 {
            assert!(auth.take(&Client::named("bob"), 1).is_ok());
        }
        assert!(auth.take(&Client::ANONYMOUS, 1).is_ok());
        assert!(auth.take(&Client::ANONYMOUS, 1).is_err());
        assert!(auth.take(&Client::named("removed"), 100).is_ok());
        assert!(Bucket::new(0.0, 5).is_none());
        // A named client may run into debt with a large batch; the anonymous callers, who
        // share their bucket, may not.
        assert_eq!(auth.over_shared_burst(&Client::ANONYMOUS, 1), None);
        assert_eq!(auth.over_shared_burst(&Client::ANONYMOUS, 2), Some(1));
        assert_eq!(auth.over_shared_burst(&alice, 2), None);
    }

    #[test]
    fn a_reload_keeps_the_buckets_of_unchanged_quotas() {
        // 100 s a token: nothing refills during the test, however slow the machine.
        let mut first = config(true);
        first.client[0].rate_per_s = 0.01;
        first.client[0].burst = 1;
        first.client[1].rate_per_s = 0.01;
        first.client[1].burst = 1;
        first.anonymous_rate_per_s = 0.01;
        first.anonymous_burst = 1;
        let old = Auth::new(&first).unwrap();
        let (alice, bob) = (Client::named("alice"), Client::named("bob"));
        for client in [&alice, &bob, &Client::ANONYMOUS] {
            assert!(old.take(client, 1).is_ok());
            assert!(old.take(client, 1).is_err());
        }
        // Bob's burst changes; carol gets a quota; alice and the anonymous one stay.
        let mut second = first.clone();
        second.client[1].burst = 2;
        second.client[2].rate_per_s = 0.01;
        let mut new = Auth::new(&second).unwrap();
        assert_eq!(new.keep_buckets(&old), 2);
        assert!(new.take(&alice, 1).is_err(), "still spent");
        assert!(new.take(&Client::ANONYMOUS, 1).is_err(), "still spent");
        // Bob's new bucket of 2 starts with the one he owes taken.
        assert!(new.take(&bob, 1).is_ok(), "the new quota's second token");
        assert!(new.take(&bob, 1).is_err(), "the debt carried over");
        assert!(new.take(&Client::named("carol"), 1).is_ok());
        // Shared: what the old configuration hands out counts in the new one.
        let mut third = Auth::new(&second).unwrap();
        third.keep_buckets(&new);
        assert!(new.take(&Client::named("carol"), 1).is_err());
        assert!(third.take(&Client::named("carol"), 1).is_err());

        // A batch's debt past the burst (carol: 1 + 50 tokens at 100 s each) is not forgiven
        // by a new rate: at ten times the rate she owes 50 tokens of 10 s.
        assert!(
            third.take(&Client::named("carol"), 50).is_err(),
            "not from an empty bucket"
        );
        let mut fresh = Auth::new(&second).unwrap();
        let carol = Client::named("carol");
        assert!(
            fresh.take(&carol, 50).is_ok(),
            "past the burst from a full bucket"
        );
        let mut faster = second.clone();
        faster.client[2].rate_per_s = 0.1;
        let mut fourth = Auth::new(&faster).unwrap();
        fourth.keep_buckets(&fresh);
        let wait = fourth.take(&carol, 1).unwrap_err();
        assert!(wait > Duration::from_secs(480), "{wait:?}");
        // A burst lowered below what was spent within the old one leaves the bucket empty,
        // not in debt: alice spends 10 of 10 at 0.01/s, then gets a burst of 2 at 1/s.
        let mut big = first.clone();
        big.client[0].burst = 10;
        let before = Auth::new(&big).unwrap();
        assert!(before.take(&alice, 10).is_ok());
        let mut small = big.clone();
        small.client[0].burst = 2;
        small.client[0].rate_per_s = 1.0;
        let mut after = Auth::new(&small).unwrap();
        after.keep_buckets(&before);
        let wait = after.take(&alice, 1).unwrap_err();
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
        // An unchanged bucket that is full stays full under a new quota.
        let mut again = faster.clone();
        again.client[0].rate_per_s = 0.02;
        fresh = Auth::new(&again).unwrap();
        fresh.keep_buckets(&Auth::new(&first).unwrap());
        assert!(fresh.take(&alice, 1).is_ok());
    }

    #[test]
    fn a_batchs_debt_for_the_servers_failures_is_forgiven_down_to_an_empty_bucket() {
        // 100 s a token, a burst of 2: nothing refills during the test.
        let mut quota = config(true);
        quota.client[0].rate_per_s = 0.01;
        quota.client[0].burst = 2;
        let auth = Auth::new(&quota).unwrap();
        let alice = Client::named("alice");
        // 6 items past the burst from a full bucket: 4 tokens of debt, 500 s before one more.
        let taken = auth.take(&alice, 6).unwrap();
        let wait = auth.take(&alice, 1).unwrap_err();
        assert!(wait > Duration::from_secs(490), "{wait:?}");
        // 5 of them failed on the server's side: the debt goes, the burst stays spent.
        auth.forgive_debt(&alice, taken.part(5));
        let wait = auth.take(&alice, 1).unwrap_err();
        assert!(
            wait > Duration::from_secs(90) && wait <= Duration::from_secs(100),
            "{wait:?}"
        );
        // Nothing more to forgive once the bucket is no longer in debt.
        auth.forgive_debt(&alice, taken);
        assert!(auth.take(&alice, 1).is_err());
        // A single request within the burst is never in debt: nothing given back.
        let bob = Client::named("bob");
        quota.client[1].rate_per_s = 0.01;
        quota.client[1].burst = 1;
        let auth = Auth::new(&quota).unwrap();
        let one = auth.take(&bob, 1).unwrap();
        auth.forgive_debt(&bob, one);
        assert!(auth.take(&bob, 1).is_err());
    }

    #[test]
    fn new_keys_are_random_and_match_their_hash() {
        let (a, hash_a) = new_api_key();
        let (b, _) = new_api_key();
        assert_ne!(a, b);
        assert!(a.starts_with("tsa_") && a.len() == 4 + 43, "{a}");
        assert_eq!(hash_a, api_key_sha256(&a));
        let mut config = config(false);
        config.client[0].api_key_sha256 = Some(hash_a);
        let auth = Auth::new(&config).unwrap();
        assert_eq!(
            name(auth.authenticate(link(None), Some(&bearer(&a)))),
            Ok(Some("alice".into()))
        );
    }

    #[test]
    fn the_configuration_is_checked() {
        use crate::config::Config;
        let base = "[signer]\nkind = \"software\"\nkey = \"k\"\ncertificate = \"c\"\n";
        let parse = |extra: &str| {
            toml::from_str::<Config>(&format!("{base}{extra}"))
                .map_err(|e| e.to_string())
                .and_then(|c| c.validate().map_err(|e| format!("{e:#}")))
        };
        let hash = api_key_sha256(ALICE_KEY);
        parse(&format!(
            "[auth]\nanonymous = false\nanonymous_rate_per_s = 2\n\
             [[auth.client]]\nname = \"alice\"\napi_key_sha256 = \"{hash}\"\nrate_per_s = 0.5\nburst = 3\n"
        ))
        .unwrap();
        // One subject from two CAs: two clients.
        parse(
            "[server.tls]\nclient_ca = [\"ca.pem\"]\n\
             [[auth.client]]\nname = \"a\"\ncertificate_subject = \"CN=a\"\ncertificate_issuer = \"CN=CA 1\"\n\
             [[auth.client]]\nname = \"b\"\ncertificate_subject = \"CN=a\"\ncertificate_issuer = \"CN=CA 2\"\n",
        )
        .unwrap();
        for bad in [
            format!(
                "[[auth.client]]\nname = \"a\"\napi_key_sha256 = \"{}\"\n",
                &hash[1..]
            ),
            format!(
                "[[auth.client]]\nname = \"a\"\napi_key_sha256 = \"{}x\"\n",
                &hash[1..]
            ),
            "[[auth.client]]\nname = \"a\"\n".into(),
            format!("[[auth.client]]\nname = \"\"\napi_key_sha256 = \"{hash}\"\n"),
            format!(
                "[[auth.client]]\nname = \"a\"\napi_key_sha256 = \"{hash}\"\n\
                 [[auth.client]]\nname = \"b\"\napi_key_sha256 = \"{hash}\"\n"
            ),
            format!(
                "[[auth.client]]\nname = \"a\"\napi_key_sha256 = \"{hash}\"\n\
                 [[auth.client]]\nname = \"a\"\ncertificate_subject = \"CN=a\"\n"
            ),
            format!(
                "[[auth.client]]\nname = \"a\"\napi_key_sha256 = \"{hash}\"\nrate_per_s = -1\n"
            ),
            format!("[[auth.client]]\nname = \"a\"\napi_key_sha256 = \"{hash}\"\ncolor = 1\n"),
            // A subject without its issuer, an issuer without a subject.
            "[server.tls]\nclient_ca = [\"ca.pem\"]\n\
             [[auth.client]]\nname = \"a\"\ncertificate_subject = \"CN=a\"\n"
                .into(),
            "[server.tls]\nclient_ca = [\"ca.pem\"]\n\
             [[auth.client]]\nname = \"a\"\ncertificate_issuer = \"CN=CA\"\n"
                .into(),
            // The same subject and issuer for two clients.
            "[server.tls]\nclient_ca = [\"ca.pem\"]\n\
             [[auth.client]]\nname = \"a\"\ncertificate_subject = \"CN=a\"\ncertificate_issuer = \"CN=CA\"\n\
             [[auth.client]]\nname = \"b\"\ncertificate_subject = \"CN=a\"\ncertificate_issuer = \"CN=CA\"\n"
                .into(),
            // Certificates without a client CA, HTTPS without its files.
            "[[auth.client]]\nname = \"a\"\ncertificate_subject = \"CN=a\"\ncertificate_issuer = \"CN=CA\"\n".into(),
            "[server]\nhttps_listen = \"127.0.0.1:0\"\n".into(),
            "[server.tls]\nrequire_client_certificate = true\n".into(),
            "[server.tls]\nclient_crl = [\"crl.pem\"]\n".into(),
        ] {
            assert!(parse(&bad).is_err(), "accepted: {bad}");
        }
    }
}
