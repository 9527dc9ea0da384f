//! The lease on an instance id in the shared database: a row of `instance_leases` that a
//! live process holds, renewed by a keeper thread and by every commit of the writer, so that
//! two processes never issue with the same instance id (serials would repeat).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use postgres::Client;

use super::connection::{connect, connection, Connection};
use crate::archive::store::StoreError;
use crate::config::ArchiveConfig;

/// The lease table: one row per instance id that a live process holds.
pub(super) const LEASE_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS instance_leases (
    instance_id BIGINT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);";

/// The lease on this process's instance id: a row (instance_id, holder, expires_at) that a
/// thread of its own renews every third of `lease_ttl_s` on a connection of its own, and
/// deletes when dropped (a process killed leaves it to expire). Start-up is refused while
/// another holder's row has not expired; the database's clock decides.
///
/// The writer's store also renews it inside every append's transaction ([`super::PostgresStore::fence`]):
/// a commit goes in only while this process holds the row. Once a renewal or an append finds
/// the row gone or held by another process, the lease is lost for good: nothing more is
/// committed, so no token leaves (`systemFailure`), and readiness fails until a restart.
pub struct Lease {
    stop: Mutex<Option<mpsc::Sender<()>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    instance_id: i64,
    holder: String,
    ttl: Duration,
    state: Arc<LeaseState>,
}

/// What the keeper thread and the appends found.
#[derive(Default)]
struct LeaseState {
    /// Another process holds the row, or it was deleted: sticky.
    lost: AtomicBool,
    /// The last renewal failed (the database cannot be reached).
    unreachable: AtomicBool,
}

impl LeaseState {
    fn lose(&self, instance_id: i64) {
        if !self.lost.swap(true, Ordering::Relaxed) {
            tracing::error!(
                event = "archive_lease_lost",
                instance = instance_id,
                "this instance id's lease is gone or held by another process: this process \
                 stops issuing (restart it once the id is its own again)"
            );
        }
    }
}

/// The lease as the writer's store checks it: see [`super::PostgresStore::fence`].
pub(super) struct Fence {
    instance_id: i64,
    holder: String,
    ttl: Duration,
    state: Arc<LeaseState>,
}

impl Fence {
    /// Renews the lease inside `tx` (locking its row until the commit), or fails when it is
    /// lost.
    pub(super) fn hold(
        &self,
        tx: &mut postgres::Transaction<'_>,
        instance_id: u32,
    ) -> Result<(), StoreError> {
        let lost = || {
            StoreError(format!(
                "this process no longer holds the lease of archive.instance_id = {}",
                self.instance_id
            ))
        };
        if self.state.lost.load(Ordering::Relaxed) || instance_id as i64 != self.instance_id {
            return Err(lost());
        }
        if tx.execute(
            RENEW,
            &[&self.instance_id, &self.holder, &self.ttl.as_secs_f64()],
        )? == 1
        {
            return Ok(());
        }
        self.state.lose(self.instance_id);
        Err(lost())
    }
}

/// Renews a lease that is still its holder's (even past its expiry: nobody took it then).
const RENEW: &str = "UPDATE instance_leases \
     SET expires_at = clock_timestamp() + make_interval(secs => $3) \
     WHERE instance_id = $1 AND holder = $2";

impl Lease {
    /// What the writer's store checks and renews in each append's transaction.
    pub(super) fn fence(&self) -> Fence {
        Fence {
            instance_id: self.instance_id,
            holder: self.holder.clone(),
            ttl: self.ttl,
            state: self.state.clone(),
        }
    }

    pub fn acquire(config: &ArchiveConfig) -> Result<Lease, StoreError> {
        let pg = connection(config)?;
        if config.postgres_tls_insecure {
            tracing::warn!(
                "archive.postgres_tls_insecure: the PostgreSQL server's certificate is not \
                 verified (set postgres_ca)"
            );
        }
        let instance_id = config.instance_id as i64;
        let ttl = Duration::from_secs(config.lease_ttl_s.max(1));
        let holder = format!(
            "{}:{}:{:016x}",
            hostname(),
            std::process::id(),
            crate::clock::system_unix_ns()
        );
        let (ready_tx, ready) = mpsc::channel();
        let (stop, stopped) = mpsc::channel::<()>();
        let state = Arc::new(LeaseState::default());
        let keeper_state = state.clone();
        let keeper_holder = holder.clone();
        let thread = std::thread::Builder::new()
            .name("tsa-archive-lease".into())
            .spawn(move || {
                let (state, holder) = (keeper_state, keeper_holder);
                let mut client = match take(&pg, instance_id, &holder, ttl) {
                    Ok(client) => {
                        let _ = ready_tx.send(Ok(()));
                        client
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(ttl / 3) {
                    if state.lost.load(Ordering::Relaxed) {
                        continue;
                    }
                    match renew(&mut client, instance_id, &holder, ttl) {
                        Ok(true) => {
                            if state.unreachable.swap(false, Ordering::Relaxed) {
                                tracing::info!(
                                    instance = instance_id,
                                    "archive lease renewed again"
                                );
                            }
                        }
                        Ok(false) => state.lose(instance_id),
                        Err(e) => {
                            if !state.unreachable.swap(true, Ordering::Relaxed) {
                                tracing::warn!(event = "archive_lease_renewal_failed", error = %e);
                            }
                            if let Ok(c) = connect(&pg) {
                                client = c;
                            }
                        }
                    }
                }
                let _ = client.execute(
                    "DELETE FROM instance_leases WHERE instance_id = $1 AND holder = $2",
                    &[&instance_id, &holder],
                );
            })
            .map_err(StoreError::new)?;
        match ready.recv() {
            Ok(Ok(())) => Ok(Lease {
                stop: Mutex::new(Some(stop)),
                thread: Mutex::new(Some(thread)),
                instance_id,
                holder,
                ttl,
                state,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(StoreError("the lease thread stopped".into()))
            }
        }
    }

    /// Whether a renewal or an append found the lease gone or held by another process.
    pub fn lost(&self) -> bool {
        self.state.lost.load(Ordering::Relaxed)
    }

    /// Whether the last renewal failed (the database could not be reached).
    pub fn unreachable(&self) -> bool {
        self.state.unreachable.load(Ordering::Relaxed)
    }

    /// Gives the instance id back now (the keeper deletes its row), waiting for the database
    /// at most `wait`: for a process about to end without dropping its archive, whose next
    /// start would otherwise be refused until the row expires. A commit of a writer still
    /// running would find the row gone, and fail (the writer's fence).
    pub fn release(&self, wait: Duration) {
        drop(self.stop.lock().unwrap_or_else(|p| p.into_inner()).take());
        let mut thread = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = Instant::now() + wait;
        while thread.as_ref().is_some_and(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if thread.as_ref().is_some_and(|t| t.is_finished()) {
            let _ = thread.take().map(JoinHandle::join);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        drop(
            self.stop
                .get_mut()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        if let Some(t) = self
            .thread
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = t.join();
        }
    }
}

fn take(
    pg: &Connection,
    instance_id: i64,
    holder: &str,
    ttl: Duration,
) -> Result<Client, StoreError> {
    let mut client = connect(pg)?;
    {
        let mut tx = client.transaction()?;
        tx.batch_execute("SELECT pg_advisory_xact_lock(3161)")?;
        tx.batch_execute(LEASE_SCHEMA)?;
        tx.commit()?;
    }
    let taken = client.execute(
        "INSERT INTO instance_leases (instance_id, holder, expires_at) \
         VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3)) \
         ON CONFLICT (instance_id) DO UPDATE SET holder = excluded.holder, \
         expires_at = excluded.expires_at \
         WHERE instance_leases.expires_at < clock_timestamp() \
         OR instance_leases.holder = excluded.holder",
        &[&instance_id, &holder, &ttl.as_secs_f64()],
    )?;
    if taken == 1 {
        return Ok(client);
    }
    let other = client.query_opt(
        "SELECT holder, GREATEST(EXTRACT(EPOCH FROM expires_at - clock_timestamp()), 0)::FLOAT8 \
         FROM instance_leases WHERE instance_id = $1",
        &[&instance_id],
    )?;
    let (who, left) = match other {
        Some(r) => (r.try_get::<_, String>(0)?, r.try_get::<_, f64>(1)?),
        None => (String::from("?"), 0.0),
    };
    Err(StoreError(format!(
        "archive.instance_id = {instance_id} is held by another live instance ({who}; its \
         lease expires in {left:.1} s unless renewed): every instance needs its own id"
    )))
}

fn renew(
    client: &mut Client,
    instance_id: i64,
    holder: &str,
    ttl: Duration,
) -> Result<bool, StoreError> {
    Ok(client.execute(RENEW, &[&instance_id, &holder, &ttl.as_secs_f64()])? == 1)
}

/// This host's name, from uname(2) (the service's sandbox may hide /proc/sys: ProcSubset=pid).
fn hostname() -> String {
    // SAFETY: `utsname` is plain data that uname fills.
    let mut names: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut names) } != 0 {
        return "localhost".into();
    }
    let bytes: Vec<u8> = names
        .nodename
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    match String::from_utf8_lossy(&bytes).trim() {
        "" => "localhost".into(),
        name => name.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_host_name_is_the_kernels() {
        let expected = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(super::hostname(), expected.trim());
    }
}
