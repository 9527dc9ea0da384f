//! One loaded PKCS#11 library per module in the process, shared by all its users.
//!
//! A PKCS#11 library is initialized once per process: a second `C_Initialize` answers
//! `CKR_CRYPTOKI_ALREADY_INITIALIZED`, and one `C_Finalize` ends it for every user, with their
//! sessions (calling into it meanwhile is undefined; SoftHSM2 frees what another thread is
//! using). Two signers on one module (a key and its rollover key, two tokens of one HSM) and
//! the tooling therefore share a [`SharedModule`]: the first user loads and initializes the
//! library, the last one to go finalizes it (if it was initialized here), and a re-initialization
//! (the recovery's last resort) is allowed only to a module's only user.
//!
//! Modules are told apart by their canonical path (a bare file name left to the dynamic loader
//! by that name): name one module the same way in every signer. A library that some other
//! code of the process had initialized already is never finalized or re-initialized from here;
//! nor, from then on, is any module of the registry, since the one initialized already may be
//! one of them named another way (a bare name beside a path).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};

use super::pool::ckr;

struct Entry {
    ctx: Pkcs11,
    users: usize,
    /// Whether `C_Initialize` succeeded here (rather than finding the library initialized).
    owns_init: bool,
}

static LOADED: Mutex<Option<HashMap<PathBuf, Entry>>> = Mutex::new(None);

fn loaded() -> MutexGuard<'static, Option<HashMap<PathBuf, Entry>>> {
    LOADED.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a module is named in the registry.
fn key(module: &Path) -> PathBuf {
    if module.components().count() > 1 {
        module
            .canonicalize()
            .unwrap_or_else(|_| module.to_path_buf())
    } else {
        module.to_path_buf()
    }
}

/// `C_Initialize` with OS locking; `Ok(false)` if the library was initialized already.
fn initialize(ctx: &Pkcs11) -> Result<bool, CkError> {
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => Ok(true),
        Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// What [`SharedModule::reinitialize`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Reinitialized {
    /// `C_Finalize` and `C_Initialize`: every session of the module is gone.
    Done,
    /// Nothing: other users (`others` of them, or code outside the registry) rely on the library.
    Shared { others: usize },
}

/// One user's hold on a loaded, initialized module.
pub struct SharedModule {
    key: PathBuf,
    ctx: Pkcs11,
}

impl SharedModule {
    /// Loads and initializes the module, or joins the users of the one loaded already.
    pub fn open(module: &Path) -> anyhow::Result<Self> {
        let key = key(module);
        let mut loaded = loaded();
        let map = loaded.get_or_insert_with(HashMap::new);
        if let Some(entry) = map.get_mut(&key) {
            entry.users += 1;
            return Ok(Self {
                key,
                ctx: entry.ctx.clone(),
            });
        }
        let ctx = Pkcs11::new(module).map_err(|e| {
            anyhow::anyhow!("cannot load the PKCS#11 module {}: {e}", module.display())
        })?;
        let owns_init = initialize(&ctx).map_err(|e| {
            anyhow::anyhow!(
                "the PKCS#11 module {} does not initialize: {} ({e})",
                module.display(),
                ckr(&e)
            )
        })?;
        if !owns_init {
            // Initialized already: by code outside the registry, or by an entry of this
            // registry that names the same library another way (a bare name beside a path,
            // a hard link). Which one cannot be told, so none of them finalizes it any more:
            // that would pull it from under the others' sessions.
            for entry in map.values_mut() {
                entry.owns_init = false;
            }
        }
        map.insert(
            key.clone(),
            Entry {
                ctx: ctx.clone(),
                users: 1,
                owns_init,
            },
        );
        Ok(Self { key, ctx })
    }

    pub fn ctx(&self) -> &Pkcs11 {
        &self.ctx
    }

    /// `C_Finalize` + `C_Initialize`, only when this is the module's only user and the library
    /// was initialized here; otherwise nothing (finalizing would pull the library from under
    /// the other users' sessions and calls).
    pub fn reinitialize(&self) -> Result<Reinitialized, CkError> {
        let mut loaded = loaded();
        let entry = loaded
            .as_mut()
            .and_then(|map| map.get_mut(&self.key))
            .expect("a module stays registered while it has users");
        if let Some(others) = may_reinitialize(entry.users, entry.owns_init) {
            return Ok(Reinitialized::Shared { others });
        }
        let finalized = match self.ctx.clone().finalize() {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(ckr = %ckr(&e), "C_Finalize failed");
                false
            }
        };
        // The registry stays locked: no new user joins a library between the two calls.
        let initialized_here = initialize(&self.ctx)?;
        entry.owns_init = owned_after_reinitializing(finalized, initialized_here);
        Ok(Reinitialized::Done)
    }
}

/// Whether the library is still this process's to re-initialize after a try: yes when
/// `C_Initialize` initialized it, and also when `C_Finalize` failed, which leaves it
/// initialized by this process's earlier call (`C_Initialize` then answers "already
/// initialized"); otherwise the next recovery would take it for another user's and never
/// try again.
fn owned_after_reinitializing(finalized: bool, initialized_here: bool) -> bool {
    initialized_here || !finalized
}

/// `None` when a re-initialization is safe (the only user, and the library initialized here);
/// otherwise how many other users there are.
pub fn may_reinitialize(users: usize, owns_init: bool) -> Option<usize> {
    if users == 1 && owns_init {
        None
    } else {
        Some(users.saturating_sub(1))
    }
}

impl Drop for SharedModule {
    fn drop(&mut self) {
        let mut loaded = loaded();
        let Some(map) = loaded.as_mut() else {
            return;
        };
        let Some(entry) = map.get_mut(&self.key) else {
            return;
        };
        entry.users -= 1;
        if entry.users == 0 {
            let entry = map.remove(&self.key).expect("present");
            if entry.owns_init {
                let _ = entry.ctx.finalize();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_only_user_of_a_library_it_initialized_may_reinitialize_it() {
        assert_eq!(may_reinitialize(1, true), None);
        assert_eq!(may_reinitialize(2, true), Some(1));
        assert_eq!(may_reinitialize(1, false), Some(0));
        assert_eq!(may_reinitialize(3, false), Some(2));
    }

    #[test]
    fn a_library_that_would_not_finalize_stays_ours_to_reinitialize() {
        assert!(owned_after_reinitializing(true, true));
        assert!(owned_after_reinitializing(false, false));
        assert!(!owned_after_reinitializing(true, false));
    }

    #[test]
    fn modules_are_named_by_their_canonical_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("module.so");
        std::fs::write(&file, b"").unwrap();
        let indirect = dir.path().join(".").join("module.so");
        assert_eq!(key(&indirect), key(&file));
        assert_eq!(
            key(Path::new("libsofthsm2.so")),
            Path::new("libsofthsm2.so")
        );
    }
}
