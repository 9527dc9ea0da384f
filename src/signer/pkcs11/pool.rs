//! A pool of logged-in sessions on one token, and the recovery that brings it back after the
//! token, a session or the login was lost.
//!
//! Concurrency: a signature borrows one idle session (waiting while all are busy) under a read
//! lock on the library; sessions are only ever lent inside such a read section, so whoever
//! holds the write lock (the recovery) sees every session idle and may close them, log in
//! again, or finalize and re-initialize the library without any thread being inside it (a
//! session whose handle the module freed has left the pool unclosed already; the recovery
//! opens a full pool).
//!
//! Faults: a signature that fails with a handle error (`CKR_OBJECT_HANDLE_INVALID`,
//! `CKR_KEY_HANDLE_INVALID`) first finds the key again in its session, checks with a test
//! signature that it is still the key the TSA started with, and retries once. A session the
//! module no longer knows (`CKR_SESSION_HANDLE_INVALID`, `CKR_SESSION_CLOSED`: a network HSM,
//! or its proxy, closes sessions it finds idle) while the token still answers is replaced by a
//! new one, and the signature retried once in it; so is one with an operation left active
//! (`CKR_OPERATION_ACTIVE`). Every signature goes through the caller's check (it verifies on
//! the host) before its session is lent again: one that fails it has that session make a
//! test signature, and one that fails too, or a second bad signature within a minute, marks
//! the pool down (`hsm_signature_invalid`) for a minute at least. Any other fault that means the session, the login
//! or the token went away (see [`classify`]) marks the pool down: from then on `sign` answers
//! `Unavailable` at once, `health` is an error, and the recovery thread tries, with a bounded
//! exponential backoff, new sessions and a new login, then `C_Finalize` + `C_Initialize` and
//! all of it again, until a probe signature verifies with the key's known public key. The
//! library is re-initialized only by the module's only user in the process (see
//! [`super::module`]): with another signer on the same module, only new sessions and logins
//! are tried. While the pool is up the same thread probes an idle session every
//! `health_check_interval` (`C_GetTokenInfo`, `C_GetSessionInfo`), so that a lost token is
//! noticed without traffic. Sessions are lent and probed in turn (first in, first out), so
//! that none stays unused and unchecked for long under light load.
//!
//! A module that stops answering: every signature's start is recorded, and the health thread
//! marks the pool down when one has been inside the module longer than `sign_timeout` (a hung
//! HSM holds its sessions, so there is no idle one to probe); until then, and when the call
//! that hangs is the probe's own, no new signature is begun. No recovery takes the write lock
//! while such a signature is in flight (it would wait for it for good), and the shutdown waits
//! for the health thread at most `sign_timeout`.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockWriteGuard, TryLockError};
use std::time::{Duration, Instant};

use cryptoki::context::Pkcs11;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::ObjectHandle;
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;

use super::key::{self, FindError, KeyInfo, KeySelector, Scheme};
use super::module::{Reinitialized, SharedModule};
use super::pin::PinSource;
use crate::alg::SignatureAlgorithm;
use crate::log_limit::LogLimit;
use crate::signer::SignError;

/// How long a signature waits for a busy session before it gives up.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// The first pause between recovery attempts, doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Two signatures that fail the host's check within this take the pool down, whatever the
/// test signatures say ([`Pool::signature_invalid`]).
const INVALID_WINDOW: Duration = Duration::from_secs(60);
/// How long a pool that bad signatures took down waits before its recovery tries the module
/// again: its test signature may pass while it keeps faulting now and then, and without the
/// wait the pool would be up again within milliseconds, to refuse the next request it spoils.
#[cfg(not(test))]
const INVALID_HOLD: Duration = INVALID_WINDOW;
#[cfg(test)]
const INVALID_HOLD: Duration = Duration::from_secs(2);
/// What the probe signature signs (recoveries verify it with the known public key).
const PROBE_MESSAGE: &[u8] = b"tsa pkcs11 probe";

/// Which token: by label, by slot id, or both (then they must agree).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenSelector {
    pub label: Option<String>,
    pub slot: Option<u64>,
}

impl std::fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.label, self.slot) {
            (Some(label), Some(slot)) => write!(f, "token '{label}' in slot {slot}"),
            (Some(label), None) => write!(f, "token '{label}'"),
            (None, Some(slot)) => write!(f, "the token in slot {slot}"),
            (None, None) => write!(f, "(no token named)"),
        }
    }
}

/// Everything needed to (re)connect.
#[derive(Clone, Debug)]
pub struct Spec {
    pub module: std::path::PathBuf,
    pub token: TokenSelector,
    pub key: KeySelector,
    pub pin: PinSource,
    pub sessions: usize,
    pub padding: crate::signer::software::RsaPadding,
    pub health_check_interval: Duration,
    /// How long a signature may stay inside the module before the pool counts it as hung.
    pub sign_timeout: Duration,
}

/// The running recovery's current step, for [`Pool::call_running_longer_than`]; none once
/// dropped (also where the recovery panicked).
struct RecoveryStep<'a>(&'a Pool);

impl<'a> RecoveryStep<'a> {
    fn begin(pool: &'a Pool) -> Self {
        let step = RecoveryStep(pool);
        step.next();
        step
    }

    /// The next step begins now.
    fn next(&self) {
        self.0.state().recovery_step = Some(Instant::now());
    }
}

impl Drop for RecoveryStep<'_> {
    fn drop(&mut self) {
        self.0.state().recovery_step = None;
    }
}

/// What a failed PKCS#11 call means for the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The object handle is stale: find the key again.
    Handle,
    /// The session, the login, the token or the library is gone: recover.
    Lost,
    /// This operation failed; the pool is fine.
    Operation,
}

pub fn classify(error: &CkError) -> Fault {
    match error {
        CkError::Pkcs11(rv, _) => match rv {
            RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid => Fault::Handle,
            RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::UserNotLoggedIn
            | RvError::DeviceRemoved
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::GeneralError
            | RvError::DeviceError
            | RvError::DeviceMemory
            | RvError::CryptokiNotInitialized
            | RvError::SlotIdInvalid
            | RvError::PinExpired
            | RvError::PinLocked => Fault::Lost,
            _ => Fault::Operation,
        },
        _ => Fault::Operation,
    }
}

/// Whether `error` says that the module has freed the session's handle (it no longer knows
/// the session): a handle it may give to the next session opened.
fn handle_freed(error: &CkError) -> bool {
    matches!(
        error,
        CkError::Pkcs11(RvError::SessionHandleInvalid | RvError::SessionClosed, _)
    )
}

/// The `CKR_…` name of a PKCS#11 error (`ObjectHandleInvalid` → `CKR_OBJECT_HANDLE_INVALID`),
/// or the error itself when it is not a return value.
pub fn ckr(error: &CkError) -> String {
    match error {
        CkError::Pkcs11(rv, _) => rv_name(rv),
        other => other.to_string(),
    }
}

fn rv_name(rv: &RvError) -> String {
    let camel = format!("{rv:?}");
    let mut name = String::from("CKR");
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

/// The PKCS#11 function of an error, for logs.
pub fn function(error: &CkError) -> String {
    match error {
        CkError::Pkcs11(_, function) => format!("C_{function:?}"),
        _ => String::new(),
    }
}

struct Library {
    module: SharedModule,
    slot: Slot,
}

impl Library {
    fn ctx(&self) -> &Pkcs11 {
        self.module.ctx()
    }
}

struct Pooled {
    session: Session,
    key: ObjectHandle,
    /// The signature it is lent for, in [`InFlight`].
    signing: Option<u64>,
}

/// When each signature in flight started.
#[derive(Default)]
pub struct InFlight {
    next: u64,
    started: std::collections::BTreeMap<u64, Instant>,
}

impl InFlight {
    pub fn begin(&mut self, now: Instant) -> u64 {
        let id = self.next;
        self.next += 1;
        self.started.insert(id, now);
        id
    }

    pub fn end(&mut self, id: u64) {
        self.started.remove(&id);
    }

    pub fn len(&self) -> usize {
        self.started.len()
    }

    pub fn is_empty(&self) -> bool {
        self.started.is_empty()
    }

    /// How long the oldest signature in flight has run, if it has run longer than `bound`:
    /// the module does not answer.
    pub fn stuck(&self, now: Instant, bound: Duration) -> Option<Duration> {
        // Ids grow with time: the first is the oldest.
        let (_, started) = self.started.first_key_value()?;
        let running = now.saturating_duration_since(*started);
        (running > bound).then_some(running)
    }
}

enum Health {
    Up,
    Down { reason: String, since: Instant },
}

struct State {
    /// The least recently used first.
    idle: VecDeque<Pooled>,
    in_flight: InFlight,
    health: Health,
    shutdown: bool,
    /// The health thread has returned.
    watcher_done: bool,
    /// When a signature last failed the caller's check ([`Pool::sign_checked`]).
    last_invalid: Option<Instant>,
    /// Bad signatures took the pool down: no recovery before this ([`INVALID_HOLD`]).
    hold_until: Option<Instant>,
    /// When the running recovery's current step began (a session closed, or opened and
    /// logged in; the key found and probed; the library re-initialized): its calls into the
    /// module may hang too.
    recovery_step: Option<Instant>,
}

pub struct Pool {
    spec: Spec,
    info: KeyInfo,
    scheme: Scheme,
    algorithm: SignatureAlgorithm,
    lib: RwLock<Library>,
    state: Mutex<State>,
    /// A session became idle, or the health changed.
    idle_cv: Condvar,
    /// Wakes the recovery thread.
    wake_cv: Condvar,
    /// The health thread, joined by [`Pool::shutdown`].
    watcher: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The token's refusal of the PIN, once one came. Held by each login that replaces a
    /// session, so that those go one at a time (each reads the token's PIN flags after the
    /// one before) and none after a refusal; the recovery then stops without a login. A PIN
    /// changed on the HSM would otherwise be sent by every session replaced at once (all of
    /// them, where the HSM closed the application's sessions and so its login), and lock
    /// the token's user.
    pin_refused: Mutex<Option<ConnectError>>,
}

/// Why a connection failed; the message is for operators.
#[derive(Clone, Debug)]
pub struct ConnectError {
    pub message: String,
    /// The PKCS#11 return value, if one caused it.
    pub ckr: Option<String>,
    /// The configuration's to fix (the PIN's source does not give it): a start refused for
    /// it exits as [`crate::config::Misconfigured`].
    pub configuration: bool,
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A recovery's log line, as an archived event (`event = KIND`) where `archived`, else as a
/// plain log line (the events layer takes only lines with an `event`).
macro_rules! recovery_event {
    ($level:ident, $archived:expr, $kind:literal, $($rest:tt)*) => {
        if $archived {
            tracing::$level!(event = $kind, $($rest)*)
        } else {
            tracing::$level!($($rest)*)
        }
    };
}

/// The token's flag that the next wrong PIN locks the user: the TSA does not try one then.
const FINAL_TRY: &str = "CKF_USER_PIN_FINAL_TRY";

/// Why a login is not tried, from the token's flags: the user PIN locked, or one more wrong
/// PIN would lock it. A low count alone (a wrong PIN was given since the last good one) is
/// tried, with a warning: an operator's typo must not keep the TSA down.
fn login_refusal(locked: bool, final_try: bool, count_low: bool) -> Option<ConnectError> {
    if locked {
        return Some(ConnectError {
            message: "the token's user PIN is locked after too many wrong PINs; unlock it with \
                      the SO PIN"
                .into(),
            ckr: Some("CKR_PIN_LOCKED".into()),
            configuration: false,
        });
    }
    if final_try {
        return Some(ConnectError {
            message: "the token allows one more PIN attempt before it locks the user \
                      (CKF_USER_PIN_FINAL_TRY): the TSA does not try its PIN, which may be the \
                      wrong one that brought the token there; check the PIN file, log in once \
                      with the right PIN (pkcs11-tool --login --test) to reset the count, and \
                      start the TSA again"
                .into(),
            ckr: Some(FINAL_TRY.into()),
            configuration: false,
        });
    }
    if count_low {
        tracing::warn!(
            "the token counts wrong PINs since the last good one (CKF_USER_PIN_COUNT_LOW); \
             logging in"
        );
    }
    None
}

/// A start refused because the token refused the PIN (or would lock it on the next wrong
/// one): the process exits with [`PinRefused::EXIT_STATUS`], which the systemd units do not
/// restart on (each restart would try the PIN again, and lock the token's user).
#[derive(Debug)]
pub struct PinRefused;

impl PinRefused {
    /// `EX_CONFIG` (sysexits.h): listed in the units' `RestartPreventExitStatus`.
    pub const EXIT_STATUS: u8 = 78;
}

impl std::fmt::Display for PinRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "the token refused the PIN, or would lock on a wrong one: not to be tried again \
             until it is fixed",
        )
    }
}

impl std::error::Error for PinRefused {}

enum Recovery {
    Recovered,
    Failed,
    /// Not tried: bad signatures took the pool down, and the module is left alone until then.
    Held(Instant),
    /// The PIN was refused: no more attempts.
    Halted,
}

impl ConnectError {
    /// The token refused the PIN (wrong, locked or expired), or the TSA did not try it
    /// because the next wrong one would lock it.
    pub fn pin_refused(&self) -> bool {
        matches!(
            self.ckr.as_deref(),
            Some(
                "CKR_PIN_INCORRECT"
                    | "CKR_PIN_LOCKED"
                    | "CKR_PIN_EXPIRED"
                    | "CKR_PIN_INVALID"
                    | "CKR_PIN_LEN_RANGE"
                    | FINAL_TRY
            )
        )
    }

    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            ckr: None,
            configuration: false,
        }
    }

    fn pkcs11(what: impl std::fmt::Display, error: &CkError) -> Self {
        Self {
            message: format!("{what}: {} ({})", ckr(error), function(error)),
            ckr: Some(ckr(error)),
            configuration: false,
        }
    }
}

/// The slot of the selected token; an error when several tokens fit it (two with its label),
/// as for two keys with one label.
pub fn find_slot(ctx: &Pkcs11, selector: &TokenSelector) -> Result<Slot, ConnectError> {
    let slots = ctx
        .get_slots_with_token()
        .map_err(|e| ConnectError::pkcs11("cannot list the module's slots", &e))?;
    let mut labels = Vec::new();
    let mut found = Vec::new();
    for slot in slots {
        let info = match ctx.get_token_info(slot) {
            Ok(info) => info,
            Err(e) => {
                if selector.slot == Some(slot.id()) {
                    return Err(ConnectError::pkcs11(
                        format!("the token in slot {} does not answer", slot.id()),
                        &e,
                    ));
                }
                continue;
            }
        };
        let label = info.label().trim_end().to_string();
        let shown = if info.token_initialized() {
            format!("'{label}' (slot {})", slot.id())
        } else {
            format!("an uninitialized token (slot {})", slot.id())
        };
        let slot_ok = selector.slot.is_none_or(|id| id == slot.id());
        let label_ok = selector.label.as_ref().is_none_or(|l| *l == label);
        if slot_ok && label_ok {
            if !info.token_initialized() {
                return Err(ConnectError::new(format!("{selector} is not initialized")));
            }
            found.push(slot);
        }
        labels.push(shown);
    }
    match found.as_slice() {
        [slot] => return Ok(*slot),
        [] => {}
        many => {
            let ids: Vec<String> = many.iter().map(|s| s.id().to_string()).collect();
            return Err(ConnectError::new(format!(
                "{} tokens have the label '{}' (slots {}); name the token by slot as well",
                many.len(),
                selector.label.as_deref().unwrap_or(""),
                ids.join(", ")
            )));
        }
    }
    Err(ConnectError::new(format!(
        "{selector} is not present; the module has {}",
        if labels.is_empty() {
            "no token".to_string()
        } else {
            labels.join(", ")
        }
    )))
}

/// Opens a session and logs the user in (the PIN is read for this login and wiped after it).
pub fn open_logged_in(
    ctx: &Pkcs11,
    slot: Slot,
    pin: &PinSource,
    read_write: bool,
) -> Result<Session, ConnectError> {
    let session = if read_write {
        ctx.open_rw_session(slot)
    } else {
        ctx.open_ro_session(slot)
    }
    .map_err(|e| ConnectError::pkcs11("cannot open a session", &e))?;
    login(ctx, slot, &session, pin)?;
    Ok(session)
}

/// Logs the user in, unless the token says that the PIN is locked, or that the next wrong PIN
/// locks it (`CKF_USER_PIN_FINAL_TRY`): a wrong PIN in a file, tried again by each restart or
/// recovery, would lock the token's user (which only the SO PIN undoes, or on some HSMs
/// nothing). Then nothing is tried, and the refusal is a refused PIN
/// ([`ConnectError::pin_refused`]).
fn login(ctx: &Pkcs11, slot: Slot, session: &Session, pin: &PinSource) -> Result<(), ConnectError> {
    // The application is logged in already (another signer on the token): no PIN is sent.
    if matches!(
        session.get_session_info().map(|i| i.session_state()),
        Ok(SessionState::RoUser | SessionState::RwUser)
    ) {
        return Ok(());
    }
    if let Ok(token) = ctx.get_token_info(slot) {
        if let Some(refusal) = login_refusal(
            token.user_pin_locked(),
            token.user_pin_final_try(),
            token.user_pin_count_low(),
        ) {
            return Err(refusal);
        }
    }
    let secret = pin.read().map_err(|e| ConnectError {
        configuration: true,
        ..ConnectError::new(format!("cannot read the PIN: {e:#}"))
    })?;
    let result = session.login(UserType::User, Some(&secret));
    drop(secret);
    match result {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(e @ CkError::Pkcs11(RvError::PinIncorrect, _)) => Err(ConnectError::pkcs11(
            format!("the PIN from {pin} is wrong; the token refused the login"),
            &e,
        )),
        Err(e @ CkError::Pkcs11(RvError::PinLocked, _)) => Err(ConnectError::pkcs11(
            "the user PIN is locked after too many wrong PINs; unlock it with the SO PIN",
            &e,
        )),
        Err(e) => Err(ConnectError::pkcs11("the login failed", &e)),
    }
}

/// Logs in, finds the key, reads it, and opens the other sessions. `expect` is the public key
/// a reconnection must find again. `step` is called before each session is opened and
/// before the key is looked for (a recovery times each step: [`RecoveryStep`]).
fn connect(
    lib: &Library,
    spec: &Spec,
    expect: Option<&KeyInfo>,
    step: &dyn Fn(),
) -> Result<(Vec<Pooled>, KeyInfo), ConnectError> {
    step();
    let first = open_logged_in(lib.ctx(), lib.slot, &spec.pin, false)?;
    step();
    let key = key::find_private_key(&first, &spec.key).map_err(|e| match e {
        FindError::Token(e) => ConnectError::pkcs11("cannot search the token", &e),
        other => ConnectError::new(other.to_string()),
    })?;
    let info = key::read_key_info(&first, key).map_err(|e| ConnectError::new(format!("{e:#}")))?;
    if let Some(expect) = expect {
        if expect.public_key != info.public_key {
            return Err(ConnectError::new(format!(
                "the key with {} on the token is no longer the key the TSA started with; \
                 restart the TSA with a certificate for the new key",
                spec.key
            )));
        }
    }
    let (scheme, algorithm) = info.kind.scheme(spec.padding);
    probe_signature(&first, key, scheme, algorithm, &info.public_key)?;

    let mut sessions = Vec::with_capacity(spec.sessions);
    sessions.push(Pooled {
        session: first,
        key,
        signing: None,
    });
    while sessions.len() < spec.sessions {
        step();
        let session = lib
            .ctx()
            .open_ro_session(lib.slot)
            .map_err(|e| ConnectError::pkcs11("cannot open another session", &e))?;
        // The login is the application's, shared by its sessions (`login` sends no PIN then);
        // a token that wants one per session gets it here.
        login(lib.ctx(), lib.slot, &session, &spec.pin)?;
        sessions.push(Pooled {
            session,
            key,
            signing: None,
        });
    }
    Ok((sessions, info))
}

/// Signs [`PROBE_MESSAGE`] and verifies the signature with the public key on the host: the
/// private key works and is the key the public key (and so the certificate) belongs to.
fn probe_signature(
    session: &Session,
    key: ObjectHandle,
    scheme: Scheme,
    algorithm: SignatureAlgorithm,
    public_key: &[u8],
) -> Result<(), ConnectError> {
    let digest = algorithm
        .digest()
        .digest(PROBE_MESSAGE)
        .expect("SHA-2 is computed on the host");
    let raw = session
        .sign(
            &scheme.mechanism(),
            key,
            &scheme.input(algorithm.digest(), &digest),
        )
        .map_err(|e| ConnectError::pkcs11("the test signature failed", &e))?;
    let signature = scheme.output(raw).map_err(ConnectError::new)?;
    if !key::verify(algorithm, public_key, PROBE_MESSAGE, &signature) {
        return Err(ConnectError::new(
            "the test signature does not verify with the key's public key: the private and \
             public key objects with that label/id are not one key pair",
        ));
    }
    Ok(())
}

impl Pool {
    /// Loads the module, finds the token and key, logs in, opens `sessions` sessions, checks
    /// the key pair with a test signature, and starts the recovery thread.
    pub fn open(spec: Spec) -> anyhow::Result<Arc<Pool>> {
        if spec.sessions == 0 {
            anyhow::bail!("signer.sessions must be at least 1");
        }
        // On failure the module is let go (and finalized if this was its last user).
        let module = SharedModule::open(&spec.module)?;
        let slot = find_slot(module.ctx(), &spec.token).map_err(|e| anyhow::anyhow!(e.message))?;
        let lib = Library { module, slot };
        let (sessions, info) = connect(&lib, &spec, None, &|| {}).map_err(|e| {
            let message = format!("{} ({}): {e}", spec.token, spec.module.display());
            match (e.pin_refused(), e.configuration) {
                (true, _) => anyhow::Error::new(PinRefused).context(message),
                (false, true) => anyhow::anyhow!(message).context(crate::config::Misconfigured),
                (false, false) => anyhow::anyhow!(message),
            }
        })?;
        let (scheme, algorithm) = info.kind.scheme(spec.padding);
        let pool = Arc::new(Pool {
            spec,
            info,
            scheme,
            algorithm,
            lib: RwLock::new(lib),
            state: Mutex::new(State {
                idle: sessions.into(),
                in_flight: InFlight::default(),
                health: Health::Up,
                shutdown: false,
                watcher_done: false,
                last_invalid: None,
                hold_until: None,
                recovery_step: None,
            }),
            idle_cv: Condvar::new(),
            wake_cv: Condvar::new(),
            watcher: Mutex::new(None),
            pin_refused: Mutex::new(None),
        });
        let thread_pool = Arc::clone(&pool);
        let watcher = std::thread::Builder::new()
            .name("pkcs11-health".into())
            .spawn(move || {
                Arc::clone(&thread_pool).watch();
                thread_pool.state().watcher_done = true;
                thread_pool.idle_cv.notify_all();
            })
            .map_err(|e| anyhow::anyhow!("cannot start the PKCS#11 health thread: {e}"))?;
        *pool.watcher.lock().unwrap_or_else(|p| p.into_inner()) = Some(watcher);
        Ok(pool)
    }

    pub fn info(&self) -> &KeyInfo {
        &self.info
    }

    pub fn algorithm(&self) -> SignatureAlgorithm {
        self.algorithm
    }

    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// Stops the health thread and waits for it (it holds the pool; the signer calls this
    /// when dropped). Without the wait, the thread could still be in the module while the
    /// process exits and the module's exit handlers tear it down: SoftHSM2 then crashed in
    /// `pkcs11-health` (SIGSEGV) after `tsa hsm check` had done its work. A module that does
    /// not answer is waited for at most `sign_timeout`: the process then exits without it.
    pub fn shutdown(&self) {
        let mut state = self.state();
        state.shutdown = true;
        self.wake_cv.notify_all();
        self.idle_cv.notify_all();
        let watcher = self
            .watcher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(watcher) = watcher else {
            return;
        };
        if watcher.thread().id() == std::thread::current().id() {
            return;
        }
        let deadline = Instant::now() + self.spec.sign_timeout;
        while !state.watcher_done {
            let now = Instant::now();
            if now >= deadline {
                tracing::error!(
                    event = "hsm_shutdown_stuck",
                    waited_ms = self.spec.sign_timeout.as_millis() as u64,
                    signatures_in_flight = state.in_flight.len(),
                    "the PKCS#11 module does not answer: its health thread is still inside it; \
                     going on without waiting for it"
                );
                return;
            }
            state = self
                .idle_cv
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        drop(state);
        let _ = watcher.join();
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn health(&self) -> Result<(), String> {
        let state = self.state();
        match &state.health {
            // Told here too, not only by the health thread: a module that hangs every call
            // may hold that thread in its probe.
            Health::Up => match state
                .in_flight
                .stuck(Instant::now(), self.spec.sign_timeout)
            {
                Some(running) => Err(format!(
                    "an HSM call has not returned for {} ms",
                    running.as_millis()
                )),
                None => Ok(()),
            },
            Health::Down { reason, since } => Err(format!(
                "the HSM key is unavailable since {} ms: {reason}",
                since.elapsed().as_millis()
            )),
        }
    }

    /// How long the oldest call in flight (a signature, the health check's probe, a
    /// recovery) has been inside the module, where that is longer than `bound`.
    pub fn call_running_longer_than(&self, bound: Duration) -> Option<Duration> {
        let state = self.state();
        let now = Instant::now();
        let recovery = state
            .recovery_step
            .map(|started| now.saturating_duration_since(started))
            .filter(|running| *running > bound);
        state.in_flight.stuck(now, bound).max(recovery)
    }

    /// Signs `data` (what the mechanism takes) with the key; the raw mechanism output,
    /// unchecked (`Pkcs11Signer` signs through [`Pool::sign_checked`]).
    pub fn sign(&self, data: &[u8]) -> Result<Vec<u8>, SignError> {
        self.sign_checked(data, ACQUIRE_TIMEOUT, &|raw| Ok(raw))
    }

    /// `sign`, waiting at most `wait` for a session (and never more than the pool's own
    /// session wait, 5 s): [`SignError::Late`] when `wait` ran out first. `check` takes the
    /// raw output to what the caller uses, or says why it is not a good signature (it does
    /// not verify with the key's public key): that session then makes a test signature
    /// before it is lent again (`Pool::signature_invalid`).
    pub fn sign_checked(
        &self,
        data: &[u8],
        wait: Duration,
        check: &dyn Fn(Vec<u8>) -> Result<Vec<u8>, String>,
    ) -> Result<Vec<u8>, SignError> {
        if let Health::Down { reason, .. } = &self.state().health {
            return Err(SignError::Unavailable(reason.clone()));
        }
        // A recovery holds the write lock: answer now rather than wait for it.
        let lib = match self.lib.try_read() {
            Ok(guard) => guard,
            Err(TryLockError::WouldBlock) => {
                return Err(SignError::Unavailable(
                    "the HSM is being reconnected".into(),
                ))
            }
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
        };
        let pooled = self.acquire(wait)?;
        let signing = pooled.signing;
        // A panic inside (the module's binding on an answer it did not expect, the caller's
        // check) must not leave the signature counted in flight for good: the health thread
        // would take the module for hung, and no recovery ever starts while a signature is in
        // flight. Its session went with the panic: the pool goes down and recovers in full.
        let signed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.sign_with(&lib, pooled, data, check)
        }));
        drop(lib);
        signed.unwrap_or_else(|_| {
            if let Some(id) = signing {
                self.state().in_flight.end(id);
            }
            let reason = "a signature panicked in the signer (an answer of the module the \
                          binding did not expect, or a fault here); its session is gone";
            self.mark_down_as(
                "hsm_signature_panicked",
                reason.into(),
                None,
                Some("C_Sign".into()),
            );
            Err(SignError::Failed(reason.into()))
        })
    }

    /// Borrows an idle session, waiting while all are busy (at most `wait`, and at most
    /// [`ACQUIRE_TIMEOUT`], after which the request is refused as the HSM unavailable).
    fn acquire(&self, wait: Duration) -> Result<Pooled, SignError> {
        let deadline = Instant::now() + wait.min(ACQUIRE_TIMEOUT);
        let mut state = self.state();
        loop {
            if let Health::Down { reason, .. } = &state.health {
                return Err(SignError::Unavailable(reason.clone()));
            }
            // A call that hangs in the module (the health thread's own probe, say, which then
            // cannot mark the pool down): no new signature goes in after it.
            if let Some(running) = state
                .in_flight
                .stuck(Instant::now(), self.spec.sign_timeout)
            {
                return Err(SignError::Unavailable(format!(
                    "an HSM call has not returned for {} ms",
                    running.as_millis()
                )));
            }
            if let Some(mut pooled) = state.idle.pop_front() {
                pooled.signing = Some(state.in_flight.begin(Instant::now()));
                return Ok(pooled);
            }
            let now = Instant::now();
            if now >= deadline && wait < ACQUIRE_TIMEOUT {
                return Err(SignError::Late(wait));
            }
            if now >= deadline {
                return Err(SignError::Unavailable(format!(
                    "all {} HSM sessions stayed busy for {} s",
                    self.spec.sessions,
                    ACQUIRE_TIMEOUT.as_secs()
                )));
            }
            state = self
                .idle_cv
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// [`Pool::release`], unless `error` says that the module has freed the session's handle:
    /// then the session leaves the pool without being closed (the recovery opens a full pool
    /// again), since a freed handle may already be another session's, this pool's or another
    /// signer's on the same module, which closing it would close.
    fn put_back(&self, mut pooled: Pooled, error: &CkError) {
        if !handle_freed(error) {
            return self.release(pooled);
        }
        if let Some(id) = pooled.signing.take() {
            self.state().in_flight.end(id);
        }
        std::mem::forget(pooled.session);
        self.idle_cv.notify_one();
    }

    fn release(&self, mut pooled: Pooled) {
        let mut state = self.state();
        if let Some(id) = pooled.signing.take() {
            state.in_flight.end(id);
        }
        state.idle.push_back(pooled);
        drop(state);
        self.idle_cv.notify_one();
    }

    /// Signs with a borrowed session (under the read lock) and gives it back.
    fn sign_with(
        &self,
        lib: &Library,
        mut pooled: Pooled,
        data: &[u8],
        check: &dyn Fn(Vec<u8>) -> Result<Vec<u8>, String>,
    ) -> Result<Vec<u8>, SignError> {
        let mechanism = self.scheme.mechanism();
        let mut error = match pooled.session.sign(&mechanism, pooled.key, data) {
            Ok(raw) => return self.checked(pooled, raw, check),
            Err(e) => e,
        };
        pooled = match self.replace_session(lib, pooled, &error) {
            Ok(fresh) => {
                let retried = fresh.session.sign(&mechanism, fresh.key, data);
                match retried {
                    Ok(raw) => return self.checked(fresh, raw, check),
                    Err(e) => error = e,
                }
                fresh
            }
            Err(dead) => dead,
        };
        let error = match classify(&error) {
            Fault::Operation => {
                self.release(pooled);
                return Err(SignError::Failed(format!(
                    "{} ({})",
                    ckr(&error),
                    function(&error)
                )));
            }
            Fault::Lost => error,
            Fault::Handle => {
                // First step: the key's handle went stale; find the key again and retry once.
                tracing::warn!(
                    event = "hsm_key_handle_invalid",
                    ckr = %ckr(&error),
                    function = %function(&error),
                    "the key's handle is no longer valid; finding the key again"
                );
                let found = key::find_private_key(&pooled.session, &self.spec.key);
                if let Ok(handle) = found {
                    // Whatever now has the label/id must still be the certified key: a test
                    // signature verifies with the public key the TSA started with.
                    if let Err(e) = probe_signature(
                        &pooled.session,
                        handle,
                        self.scheme,
                        self.algorithm,
                        &self.info.public_key,
                    ) {
                        self.release(pooled);
                        // A test signature that verifies with another public key: another
                        // key. One that failed in the module says nothing of the key.
                        let (event, reason) = match &e.ckr {
                            None => (
                                "hsm_key_replaced",
                                format!(
                                    "the HSM key was replaced: {} ({}), and the key found \
                                     again with {} is not the key the TSA started with (its \
                                     certificate's): {e}",
                                    ckr(&error),
                                    function(&error),
                                    self.spec.key
                                ),
                            ),
                            Some(_) => (
                                "hsm_session_lost",
                                format!(
                                    "{} ({}), and the test signature with the key found again \
                                     failed: {e}",
                                    ckr(&error),
                                    function(&error)
                                ),
                            ),
                        };
                        self.mark_down_as(
                            event,
                            reason.clone(),
                            e.ckr.clone().or_else(|| Some(ckr(&error))),
                            Some(function(&error)),
                        );
                        return Err(SignError::Unavailable(reason));
                    }
                }
                match found {
                    Ok(handle) => match pooled.session.sign(&mechanism, handle, data) {
                        Ok(raw) => {
                            tracing::info!(
                                event = "hsm_key_refound",
                                "the key was found again and signs"
                            );
                            pooled.key = handle;
                            return self.checked(pooled, raw, check);
                        }
                        Err(e) if classify(&e) == Fault::Operation => {
                            pooled.key = handle;
                            self.release(pooled);
                            return Err(SignError::Failed(format!(
                                "{} ({})",
                                ckr(&e),
                                function(&e)
                            )));
                        }
                        Err(e) => e,
                    },
                    // A search that failed as an operation does (not a session, login or
                    // token lost): this request is refused, the signer stays up, and the
                    // next signature finds the key again if its handle is still stale.
                    Err(FindError::Token(e)) if classify(&e) == Fault::Operation => {
                        self.release(pooled);
                        return Err(SignError::Failed(format!(
                            "{} ({}), and the key could not be searched for again: {} ({})",
                            ckr(&error),
                            function(&error),
                            ckr(&e),
                            function(&e)
                        )));
                    }
                    Err(FindError::Token(e)) => e,
                    Err(other) => {
                        self.release(pooled);
                        let reason = format!("{} ({}), and {other}", ckr(&error), function(&error));
                        self.mark_down(
                            format!("the HSM key was lost: {reason}"),
                            Some(ckr(&error)),
                            Some(function(&error)),
                        );
                        return Err(SignError::Unavailable(reason));
                    }
                }
            }
        };
        // The session, login or token is gone: the recovery thread takes over.
        self.put_back(pooled, &error);
        let reason = format!("{} ({})", ckr(&error), function(&error));
        self.mark_down(
            format!("the HSM session was lost: {reason}"),
            Some(ckr(&error)),
            Some(function(&error)),
        );
        Err(SignError::Unavailable(reason))
    }

    /// A new logged-in session for `dead`, when `error` says that the module no longer knows
    /// that session while the token still answers: only the session was lost (a network HSM,
    /// or its proxy, closes sessions it finds idle), not the token or the application's login;
    /// or that an operation is still active in it (a module that left one behind after a
    /// failed `C_Sign`), which would refuse every signature in it. The new session takes over
    /// `dead`'s place in the pool and its signature in flight. `Err(dead)` where no
    /// replacement applies or none could be opened.
    fn replace_session(
        &self,
        lib: &Library,
        dead: Pooled,
        error: &CkError,
    ) -> Result<Pooled, Pooled> {
        if !handle_freed(error) && !matches!(error, CkError::Pkcs11(RvError::OperationActive, _)) {
            return Err(dead);
        }
        if lib.ctx().get_token_info(lib.slot).is_err() {
            return Err(dead);
        }
        let opened = lib
            .ctx()
            .open_ro_session(lib.slot)
            .map_err(|e| ConnectError::pkcs11("cannot open a session", &e))
            .and_then(|session| {
                // The login is the application's, shared by its sessions (`login` sends no PIN
                // then); a token that wants one per session gets it here.
                self.login_unless_refused(lib, &session)?;
                Ok(session)
            });
        let session = match opened {
            Ok(session) => session,
            Err(e) => {
                tracing::warn!(
                    ckr = e.ckr.as_deref().unwrap_or(""),
                    error = %e,
                    "a lost HSM session could not be replaced"
                );
                return Err(dead);
            }
        };
        tracing::warn!(
            event = "hsm_session_replaced",
            ckr = %ckr(error),
            function = %function(error),
            "one of the pool's sessions cannot sign (the HSM no longer knows it, or an \
             operation is left active in it); a new one replaces it"
        );
        let Pooled {
            session: old,
            key,
            signing,
        } = dead;
        if handle_freed(error) {
            // A handle the module has freed may already be another session's (the new one's,
            // another thread's replacement, another signer's): closing it would close that
            // one. Never closed (what cryptoki keeps of it is a reference to the library, which
            // is finalized explicitly, not when the last reference goes).
            std::mem::forget(old);
        } else {
            // Still the module's: closed (ending its operation), its handle not reused meanwhile.
            drop(old);
        }
        Ok(Pooled {
            session,
            key,
            signing,
        })
    }

    /// [`login`] for a session that replaces one, one at a time, and not once the token
    /// refused the PIN (`pin_refused`).
    fn login_unless_refused(&self, lib: &Library, session: &Session) -> Result<(), ConnectError> {
        let mut refused = self.pin_refused.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(refusal) = refused.as_ref() {
            return Err(refusal.clone());
        }
        let result = login(lib.ctx(), lib.slot, session, &self.spec.pin);
        if let Err(e) = &result {
            if e.pin_refused() {
                *refused = Some(e.clone());
            }
        }
        result
    }

    /// `raw` through the caller's check; one that fails it has the same session make a test
    /// signature, still in flight, before the session is lent again.
    fn checked(
        &self,
        pooled: Pooled,
        raw: Vec<u8>,
        check: &dyn Fn(Vec<u8>) -> Result<Vec<u8>, String>,
    ) -> Result<Vec<u8>, SignError> {
        let why = match check(raw) {
            Ok(signature) => {
                self.release(pooled);
                return Ok(signature);
            }
            Err(why) => why,
        };
        let tested = probe_signature(
            &pooled.session,
            pooled.key,
            self.scheme,
            self.algorithm,
            &self.info.public_key,
        )
        .map_err(|e| e.to_string());
        self.release(pooled);
        self.signature_invalid(&why, tested);
        Err(SignError::Failed(why))
    }

    /// A signature from the module that did not verify with the key's public key (checked on
    /// the host before any token carries it): the module or its key is faulty (a fault in an
    /// RSA signature can even give the key away), and `tested` is what a test signature in
    /// the same session then gave. One that verified, and no other bad signature within
    /// [`INVALID_WINDOW`], is a passing fault: that request alone was refused, and the event
    /// archived (at most once a second). Otherwise the pool goes down, for [`INVALID_HOLD`]
    /// at least, until a recovery's test signature verifies, and a module that keeps
    /// faulting, however seldom the test catches it, keeps the signer down rather than refuse
    /// request after request.
    fn signature_invalid(&self, why: &str, tested: Result<(), String>) {
        let again = {
            let mut state = self.state();
            let now = Instant::now();
            let again = state
                .last_invalid
                .is_some_and(|last| now.saturating_duration_since(last) < INVALID_WINDOW);
            state.last_invalid = Some(now);
            again
        };
        let reason = match (tested, again) {
            (Ok(()), false) => {
                static LOG: LogLimit = LogLimit::new();
                if let Some(left_out) = LOG.allow() {
                    tracing::error!(
                        event = "hsm_signature_invalid",
                        reason = why,
                        left_out,
                        "a signature from the HSM did not verify with the key's public key and \
                         was not used; a test signature in the same session then verified, so \
                         the key goes on signing"
                    );
                }
                return;
            }
            (Ok(()), true) => format!(
                "signatures from the HSM did not verify with the key's public key twice within \
                 {} s ({why})",
                INVALID_WINDOW.as_secs()
            ),
            (Err(e), _) => format!(
                "a signature from the HSM did not verify with the key's public key ({why}), nor \
                 did a test signature in the same session: {e}"
            ),
        };
        self.state().hold_until = Some(Instant::now() + INVALID_HOLD);
        self.mark_down_as("hsm_signature_invalid", reason, None, Some("C_Sign".into()));
    }

    fn mark_down(&self, reason: String, ckr: Option<String>, function: Option<String>) {
        self.mark_down_as("hsm_session_lost", reason, ckr, function);
    }

    fn mark_down_as(
        &self,
        event: &'static str,
        reason: String,
        ckr: Option<String>,
        function: Option<String>,
    ) {
        let mut state = self.state();
        if matches!(state.health, Health::Up) {
            tracing::error!(
                event,
                ckr = ckr.as_deref().unwrap_or(""),
                function = function.as_deref().unwrap_or(""),
                reason = %reason,
                "the HSM key is unavailable; signing stops until the recovery brings it back"
            );
            state.health = Health::Down {
                reason,
                since: Instant::now(),
            };
        }
        drop(state);
        self.idle_cv.notify_all();
        self.wake_cv.notify_all();
    }

    /// The health thread: probes while up, recovers while down, until shutdown.
    fn watch(self: Arc<Self>) {
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 0u32;
        loop {
            // Wait for a fault, the next probe, or the shutdown.
            {
                let mut state = self.state();
                loop {
                    if state.shutdown {
                        return;
                    }
                    if matches!(state.health, Health::Down { .. }) {
                        break;
                    }
                    let (guard, timeout) = self
                        .wake_cv
                        .wait_timeout(state, self.spec.health_check_interval)
                        .unwrap_or_else(|p| p.into_inner());
                    state = guard;
                    if timeout.timed_out() && !state.shutdown && matches!(state.health, Health::Up)
                    {
                        let stuck = state
                            .in_flight
                            .stuck(Instant::now(), self.spec.sign_timeout);
                        drop(state);
                        match stuck {
                            Some(running) => self.mark_stuck(running),
                            None => self.probe(),
                        }
                        state = self.state();
                    }
                }
            }
            attempt += 1;
            match self.recover(attempt) {
                Recovery::Held(until) => {
                    // Not an attempt: wait out the hold (interruptible by the shutdown).
                    attempt -= 1;
                    let mut state = self.state();
                    while !state.shutdown && Instant::now() < until {
                        let left = until.saturating_duration_since(Instant::now());
                        state = self
                            .wake_cv
                            .wait_timeout(state, left)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    }
                    if state.shutdown {
                        return;
                    }
                }
                Recovery::Recovered => {
                    backoff = FIRST_BACKOFF;
                    attempt = 0;
                }
                Recovery::Halted => {
                    // Wait for the shutdown only: no more logins with a refused PIN.
                    let mut state = self.state();
                    while !state.shutdown {
                        state = self.wake_cv.wait(state).unwrap_or_else(|p| p.into_inner());
                    }
                    return;
                }
                Recovery::Failed => {
                    let state = self.state();
                    if state.shutdown {
                        return;
                    }
                    // Sleep (interruptible by the shutdown), then try again.
                    let _ = self.wake_cv.wait_timeout(state, backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// A signature has been inside the module longer than `sign_timeout`.
    fn mark_stuck(&self, running: Duration) {
        self.mark_down_as(
            "hsm_sign_timeout",
            format!(
                "a signature has been inside the PKCS#11 module for {} ms (sign_timeout_ms = \
                 {}): the HSM does not answer",
                running.as_millis(),
                self.spec.sign_timeout.as_millis()
            ),
            None,
            Some("C_Sign".into()),
        );
    }

    /// The library's write lock for a recovery, once no signature is in flight; `None` while
    /// one has been inside the module longer than `sign_timeout` (it may never return, and a
    /// blocking `write()` would wait with it) or when the pool shuts down.
    fn write_for_recovery(&self) -> Option<RwLockWriteGuard<'_, Library>> {
        loop {
            match self.lib.try_write() {
                Ok(lib) => return Some(lib),
                Err(TryLockError::Poisoned(p)) => return Some(p.into_inner()),
                Err(TryLockError::WouldBlock) => {}
            }
            let state = self.state();
            if state.shutdown {
                return None;
            }
            if let Some(running) = state
                .in_flight
                .stuck(Instant::now(), self.spec.sign_timeout)
            {
                drop(state);
                if let Health::Down { reason, .. } = &mut self.state().health {
                    *reason = format!(
                        "a signature has been inside the PKCS#11 module for {} ms: the HSM \
                         does not answer; the recovery waits for it to return",
                        running.as_millis()
                    );
                }
                return None;
            }
            // Signatures in flight end within `sign_timeout`, or count as stuck.
            let _ = self
                .idle_cv
                .wait_timeout(state, Duration::from_millis(10))
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Checks the least recently used idle session without signing: the token answers and the
    /// session is still logged in; one the module no longer knows, while the token answers,
    /// is replaced (`replace_session`). A pool with signatures in flight is not probed (its
    /// signatures are the probe). The probe counts as a call in flight, so that one that hangs
    /// is seen as stuck.
    fn probe(&self) {
        let Ok(lib) = self.lib.try_read() else {
            return;
        };
        let (pooled, probing) = {
            let mut state = self.state();
            if !state.in_flight.is_empty() {
                return;
            }
            let Some(pooled) = state.idle.pop_front() else {
                return;
            };
            let probing = state.in_flight.begin(Instant::now());
            (pooled, probing)
        };
        let checked = lib
            .ctx()
            .get_token_info(lib.slot)
            .and_then(|_| pooled.session.get_session_info());
        let error = match checked {
            Ok(info)
                if matches!(
                    info.session_state(),
                    SessionState::RoUser | SessionState::RwUser
                ) =>
            {
                self.state().in_flight.end(probing);
                self.release(pooled);
                return;
            }
            Ok(info) => {
                self.state().in_flight.end(probing);
                self.release(pooled);
                self.mark_down(
                    format!(
                        "the HSM session is no longer logged in ({:?})",
                        info.session_state()
                    ),
                    None,
                    Some("C_GetSessionInfo".into()),
                );
                return;
            }
            Err(e) => e,
        };
        // Still counted in flight: a replacement that hangs in the module is seen as stuck.
        let replaced = self.replace_session(&lib, pooled, &error);
        self.state().in_flight.end(probing);
        let pooled = match replaced {
            Ok(fresh) => {
                self.release(fresh);
                return;
            }
            Err(dead) => dead,
        };
        self.put_back(pooled, &error);
        if classify(&error) != Fault::Operation {
            self.mark_down(
                format!(
                    "the HSM health check failed: {} ({})",
                    ckr(&error),
                    function(&error)
                ),
                Some(ckr(&error)),
                Some(function(&error)),
            );
        } else {
            tracing::warn!(
                event = "hsm_probe_failed",
                ckr = %ckr(&error),
                function = %function(&error),
                "the HSM health check failed"
            );
        }
    }

    /// One recovery attempt: new sessions and login; failing that, `C_Finalize` +
    /// `C_Initialize`, the slot found again, new sessions and login.
    fn recover(&self, attempt: u32) -> Recovery {
        let Some(mut lib) = self.write_for_recovery() else {
            return Recovery::Failed;
        };
        // Each step timed as a call in flight is: one that does not return is the hung module
        // it is (`Pkcs11Signer::needs_restart`); a slow one that returns is not.
        let step = RecoveryStep::begin(self);
        self.recover_locked(&mut lib, attempt, &step)
    }

    fn recover_locked(&self, lib: &mut Library, attempt: u32, step: &RecoveryStep) -> Recovery {
        // Bad signatures took it down: the module is left alone a while first (read under
        // the write lock, so that a hold set by a signature that held the read lock until
        // now is seen).
        let hold = self
            .state()
            .hold_until
            .filter(|until| *until > Instant::now());
        if let Some(until) = hold {
            return Recovery::Held(until);
        }
        // A replaced session's login was refused: no PIN is sent again.
        let refused = self
            .pin_refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(refusal) = refused {
            return self.halt(attempt, &refusal);
        }
        // Under the write lock no session is lent: close them all.
        let old = std::mem::take(&mut self.state().idle);
        for pooled in old {
            step.next();
            drop(pooled);
        }

        let outage = |state: &State| match &state.health {
            Health::Down { since, .. } => since.elapsed().as_millis() as u64,
            Health::Up => 0,
        };
        // Every attempt is logged; the archive (which keeps each `event`) takes the 1st, 2nd,
        // 4th, 8th…: a long outage tried every 5 s would otherwise add some 35,000 events a
        // day to the events' chain. The attempt's number says how many came between.
        let archived = attempt.is_power_of_two();
        recovery_event!(
            info,
            archived,
            "hsm_recovery_attempt",
            attempt,
            level = "sessions",
            "opening new HSM sessions and logging in again"
        );
        let sessions_error = match connect(lib, &self.spec, Some(&self.info), &|| step.next()) {
            Ok((sessions, _)) => {
                self.install(sessions, attempt, "sessions", outage);
                return Recovery::Recovered;
            }
            Err(e) => e,
        };
        if sessions_error.pin_refused() {
            return self.halt(attempt, &sessions_error);
        }
        recovery_event!(
            warn,
            archived,
            "hsm_recovery_failed",
            attempt,
            level = "sessions",
            ckr = sessions_error.ckr.as_deref().unwrap_or(""),
            error = %sessions_error,
            "new sessions did not help"
        );

        step.next();
        let result = match lib.module.reinitialize() {
            Ok(Reinitialized::Done) => {
                recovery_event!(
                    info,
                    archived,
                    "hsm_recovery_attempt",
                    attempt,
                    level = "library",
                    "the PKCS#11 library was finalized and initialized again"
                );
                step.next();
                find_slot(lib.ctx(), &self.spec.token).and_then(|slot| {
                    lib.slot = slot;
                    connect(lib, &self.spec, Some(&self.info), &|| step.next())
                })
            }
            Ok(Reinitialized::Shared { others }) => {
                if attempt == 1 {
                    tracing::warn!(
                        event = "hsm_library_shared",
                        attempt,
                        others,
                        module = %self.spec.module.display(),
                        "the PKCS#11 library is shared with other users in this process \
                         (another signer on the same module): it is not finalized under them, \
                         so this recovery tries new sessions and logins only; a module that \
                         needs a new library context comes back after a restart"
                    );
                }
                Err(ConnectError {
                    message: format!(
                        "{sessions_error}; the shared PKCS#11 library is not re-initialized"
                    ),
                    ckr: sessions_error.ckr.clone(),
                    configuration: false,
                })
            }
            Err(e) => Err(ConnectError::pkcs11("C_Initialize failed", &e)),
        };
        match result {
            Ok((sessions, _)) => {
                self.install(sessions, attempt, "library", outage);
                Recovery::Recovered
            }
            Err(e) if e.pin_refused() => self.halt(attempt, &e),
            Err(e) => {
                let state = self.state();
                recovery_event!(
                    warn,
                    archived,
                    "hsm_recovery_failed",
                    attempt,
                    level = "library",
                    ckr = e.ckr.as_deref().unwrap_or(""),
                    outage_ms = outage(&state),
                    error = %e,
                    "the HSM is still unavailable"
                );
                // Keep the reason current for health().
                drop(state);
                if let Health::Down { reason, .. } = &mut self.state().health {
                    *reason = format!("recovering (attempt {attempt}): {e}");
                }
                Recovery::Failed
            }
        }
    }

    /// Stops recovering: another login with a refused PIN could lock the token's user.
    fn halt(&self, attempt: u32, error: &ConnectError) -> Recovery {
        *self.pin_refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.clone());
        tracing::error!(
            event = "hsm_recovery_stopped",
            attempt,
            ckr = error.ckr.as_deref().unwrap_or(""),
            error = %error,
            "the token refused the PIN; the recovery stops so as not to lock the PIN; fix the \
             PIN and restart the TSA"
        );
        if let Health::Down { reason, .. } = &mut self.state().health {
            *reason = format!("the recovery stopped, restart needed: {error}");
        }
        Recovery::Halted
    }

    fn install(
        &self,
        sessions: Vec<Pooled>,
        attempt: u32,
        level: &str,
        outage: impl Fn(&State) -> u64,
    ) {
        let mut state = self.state();
        let outage_ms = outage(&state);
        state.idle = sessions.into();
        state.health = Health::Up;
        state.hold_until = None;
        drop(state);
        tracing::info!(
            event = "hsm_recovered",
            attempt,
            level,
            outage_ms,
            sessions = self.spec.sessions,
            "the HSM key is available again"
        );
        self.idle_cv.notify_all();
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Sessions first (they close themselves), then the module (`lib`, dropped after this),
        // which its last user finalizes.
        self.state
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .idle
            .clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cryptoki::context::Function;

    #[test]
    fn a_signature_in_flight_longer_than_the_bound_counts_as_stuck() {
        let bound = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut in_flight = InFlight::default();
        assert_eq!(in_flight.stuck(t0 + bound * 2, bound), None);
        let first = in_flight.begin(t0);
        let second = in_flight.begin(t0 + Duration::from_secs(1));
        assert_eq!(in_flight.len(), 2);
        assert_eq!(in_flight.stuck(t0 + Duration::from_secs(5), bound), None);
        assert_eq!(in_flight.stuck(t0 + bound, bound), None);
        // The oldest decides, whatever finished after it.
        let at = t0 + Duration::from_secs(11);
        assert_eq!(in_flight.stuck(at, bound), Some(Duration::from_secs(11)));
        in_flight.end(first);
        assert_eq!(in_flight.stuck(at, bound), None);
        assert_eq!(
            in_flight.stuck(at + Duration::from_secs(1), bound),
            Some(Duration::from_secs(11))
        );
        in_flight.end(second);
        assert!(in_flight.is_empty());
        assert_eq!(in_flight.stuck(at + bound, bound), None);
        // An instant before the start (another clock reading) is not a negative duration.
        in_flight.begin(at);
        assert_eq!(in_flight.stuck(t0, bound), None);
    }

    /// Closes a session of the module at `module` behind cryptoki's back, as a network HSM
    /// (or its proxy) closes a session it finds idle.
    fn close_session_underneath(module: &std::path::Path, handle: libc::c_ulong) {
        use std::ffi::CString;
        let path = CString::new(module.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: the module is loaded already (RTLD_NOLOAD only looks it up); C_CloseSession
        // has this signature in PKCS#11, and the handle is one of the module's sessions.
        unsafe {
            let library = libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
            assert!(!library.is_null(), "the module is loaded");
            let symbol = libc::dlsym(library, c"C_CloseSession".as_ptr());
            assert!(!symbol.is_null());
            // CK_RV C_CloseSession(CK_SESSION_HANDLE): both CK_ULONG; CKR_OK is 0.
            let close: extern "C" fn(libc::c_ulong) -> libc::c_ulong = std::mem::transmute(symbol);
            assert_eq!(close(handle), 0, "CKR_OK");
            libc::dlclose(library);
        }
    }

    /// The pool under faults, on a SoftHSM2 token (one test: the process has one SoftHSM2
    /// configuration once the module is initialized).
    #[test]
    fn a_pool_replaces_lost_sessions_and_holds_off_after_hung_calls_and_bad_signatures() {
        use super::super::key::KeyKind;
        use super::super::token;
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let conf = token::write_softhsm_conf(dir.path()).unwrap();
        std::env::set_var("SOFTHSM2_CONF", &conf);
        let module_path = token::softhsm_module().expect("SoftHSM2 (scripts/test.sh installs it)");
        let pin_path = dir.path().join("pin");
        std::fs::write(&pin_path, "4711\n").unwrap();
        std::fs::set_permissions(&pin_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let pin = PinSource::File(pin_path);
        let selector = TokenSelector {
            label: Some("pool".into()),
            slot: None,
        };
        let module = token::Module::load(&module_path).unwrap();
        token::init_token(&module, "pool", &pin, &pin).unwrap();
        let session = token::open_session(&module, &selector, &pin).unwrap();
        token::generate_key_pair(&session, KeyKind::EcP256, "tsu", &[7]).unwrap();
        drop(session);
        let pool = Pool::open(Spec {
            module: module_path.clone(),
            token: selector,
            key: KeySelector {
                label: Some("tsu".into()),
                id: None,
            },
            pin,
            sessions: 3,
            padding: Default::default(),
            // No probe during the test but those it makes itself.
            health_check_interval: Duration::from_secs(3600),
            sign_timeout: Duration::from_secs(2),
        })
        .unwrap();
        drop(module);
        let digest = [0x5a; 32];
        let input = pool.scheme().input(pool.algorithm().digest(), &digest);
        let up = |pool: &Pool| matches!(pool.state().health, Health::Up);

        // A session closed underneath: the signature that finds it is made in a new one, and
        // the pool stays up; so do the other sessions' signatures.
        let front = pool.state().idle.front().unwrap().session.handle();
        close_session_underneath(&module_path, front);
        for i in 0..4 {
            pool.sign(&input)
                .unwrap_or_else(|e| panic!("signature {i}: {e}"));
        }
        assert!(up(&pool));
        // The health check takes the least recently used session: the idle ones in turn.
        let next = pool.state().idle.front().unwrap().session.handle();
        close_session_underneath(&module_path, next);
        pool.probe();
        assert!(up(&pool));
        let handles: Vec<_> = pool
            .state()
            .idle
            .iter()
            .map(|p| p.session.handle())
            .collect();
        assert_eq!(handles.len(), 3);
        assert!(!handles.contains(&next), "replaced");
        pool.sign(&input)
            .expect("signed after the probe's replacement");
        // A session with an operation left active in it (as a failed C_Sign of a faulty
        // module leaves one): replaced too, rather than lent again to fail every time.
        {
            let state = pool.state();
            let front = state.idle.front().unwrap();
            front
                .session
                .sign_init(&pool.scheme().mechanism(), front.key)
                .unwrap();
        }
        for i in 0..4 {
            pool.sign(&input)
                .unwrap_or_else(|e| panic!("signature {i} after an active operation: {e}"));
        }

        // A stale key handle (a session object's, gone with its session): the key is found
        // again, and the signature made with it goes through the caller's check like any.
        let stale = {
            let lib = pool.lib.read().unwrap();
            let session = lib.ctx().open_rw_session(lib.slot).unwrap();
            let object = session
                .create_object(&[
                    cryptoki::object::Attribute::Class(cryptoki::object::ObjectClass::DATA),
                    cryptoki::object::Attribute::Token(false),
                    cryptoki::object::Attribute::Value(vec![1]),
                ])
                .unwrap();
            drop(session);
            object
        };
        let key = pool.state().idle.front().unwrap().key;
        pool.state().idle.front_mut().unwrap().key = stale;
        let checks = std::sync::atomic::AtomicUsize::new(0);
        let count = |raw: Vec<u8>| {
            checks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(raw)
        };
        pool.sign_checked(&input, ACQUIRE_TIMEOUT, &count)
            .expect("signed with the key found again");
        assert_eq!(checks.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert!(pool.state().idle.iter().all(|p| p.key == key));

        // A call that has not returned for longer than sign_timeout (here one begun 3 s ago):
        // no signature goes in after it, though the pool is still up.
        let hung = pool
            .state()
            .in_flight
            .begin(Instant::now() - Duration::from_secs(3));
        assert!(matches!(pool.sign(&input), Err(SignError::Unavailable(_))));
        let running = pool.call_running_longer_than(Duration::from_secs(2));
        assert!(running >= Some(Duration::from_secs(3)), "{running:?}");
        assert_eq!(pool.call_running_longer_than(Duration::from_secs(4)), None);
        pool.state().in_flight.end(hung);
        assert_eq!(pool.call_running_longer_than(Duration::from_secs(2)), None);
        pool.sign(&input).expect("signed once it returned");
        // A recovery's calls are timed as well (here one begun 5 s ago, on its own).
        pool.state().recovery_step = Some(Instant::now() - Duration::from_secs(5));
        let running = pool.call_running_longer_than(Duration::from_secs(2));
        assert!(running >= Some(Duration::from_secs(5)), "{running:?}");
        pool.state().recovery_step = None;
        assert_eq!(pool.call_running_longer_than(Duration::from_secs(2)), None);

        // A check that panics: the signature is refused, nothing stays in flight, and the
        // pool, down, recovers in full.
        let panicking = |_: Vec<u8>| -> Result<Vec<u8>, String> { panic!("a test's check") };
        let refused = pool.sign_checked(&input, ACQUIRE_TIMEOUT, &panicking);
        assert!(matches!(refused, Err(SignError::Failed(_))), "{refused:?}");
        assert!(pool.state().in_flight.is_empty());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(up(&pool) && pool.state().idle.len() == 3) {
            assert!(Instant::now() < deadline, "recovered");
            std::thread::sleep(Duration::from_millis(20));
        }
        pool.sign(&input).expect("signed after the recovery");

        // A signature that fails the caller's check, then a test signature in the same
        // session that verifies: a passing fault, the pool stays up and signs on.
        let refuse = |_: Vec<u8>| Err("refused by the test".to_string());
        let refused = pool.sign_checked(&input, ACQUIRE_TIMEOUT, &refuse);
        assert!(matches!(refused, Err(SignError::Failed(_))), "{refused:?}");
        assert!(up(&pool));
        pool.sign(&input).expect("signed after a passing fault");
        // Another within the window: the pool goes down (held down here by a read of the
        // library, which the recovery waits for), and the recovery's test signature brings
        // it back.
        {
            let _reading = pool.lib.read().unwrap();
            let refused = pool.sign_checked(&input, ACQUIRE_TIMEOUT, &refuse);
            assert!(matches!(refused, Err(SignError::Failed(_))), "{refused:?}");
            let down = pool.health().unwrap_err();
            assert!(down.contains("twice within 60 s"), "{down}");
        }
        // Left alone a while first (a module that keeps faulting stays down).
        std::thread::sleep(INVALID_HOLD / 10);
        assert!(!up(&pool), "recovered before the hold");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !up(&pool) {
            assert!(Instant::now() < deadline, "recovered");
            std::thread::sleep(Duration::from_millis(20));
        }
        // One whose test signature fails too: down at once, window or not.
        pool.state().last_invalid = None;
        {
            let _reading = pool.lib.read().unwrap();
            pool.signature_invalid("a test", Err("the test signature failed".into()));
            let down = pool.health().unwrap_err();
            assert!(down.contains("nor did a test signature"), "{down}");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !up(&pool) {
            assert!(Instant::now() < deadline, "recovered");
            std::thread::sleep(Duration::from_millis(20));
        }
        pool.sign(&input).expect("signed after the recovery");
        pool.shutdown();
    }

    /// Locked, or one wrong PIN from locked: the login is not tried, and the refusal stops
    /// the recovery and a restart as a refused PIN does. A low count alone is tried.
    #[test]
    fn a_login_that_could_lock_the_token_is_not_tried() {
        let locked = login_refusal(true, false, true).expect("refused");
        assert!(locked.pin_refused() && locked.message.contains("locked"));
        let final_try = login_refusal(false, true, true).expect("refused");
        assert!(final_try.pin_refused());
        assert!(final_try.message.contains("CKF_USER_PIN_FINAL_TRY"));
        assert!(login_refusal(false, false, true).is_none());
        assert!(login_refusal(false, false, false).is_none());
    }

    #[test]
    fn return_values_are_named_and_classified() {
        let e = CkError::Pkcs11(RvError::ObjectHandleInvalid, Function::Sign);
        assert_eq!(ckr(&e), "CKR_OBJECT_HANDLE_INVALID");
        assert_eq!(function(&e), "C_Sign");
        assert_eq!(classify(&e), Fault::Handle);
        for rv in [
            RvError::SessionHandleInvalid,
            RvError::SessionClosed,
            RvError::UserNotLoggedIn,
            RvError::DeviceRemoved,
            RvError::TokenNotPresent,
            RvError::GeneralError,
            RvError::DeviceError,
        ] {
            assert_eq!(classify(&CkError::Pkcs11(rv, Function::Sign)), Fault::Lost);
        }
        let e = CkError::Pkcs11(RvError::GeneralError, Function::GetTokenInfo);
        assert_eq!(ckr(&e), "CKR_GENERAL_ERROR");
        assert_eq!(
            classify(&CkError::Pkcs11(RvError::DataLenRange, Function::Sign)),
            Fault::Operation
        );
    }
}
