//! The small state file beside the archive: the instance's last reserved counter and genTime
//! floor, written atomically and fsynced (temporary file, fsync, rename, fsync of the
//! directory). With the archive it guards against reuse after either one is lost or restored
//! from an older backup: at start the TSA takes the maximum of both.
//!
//! ```text
//! tsa-archive-state v1
//! instance_id 7
//! reserved_until 120000
//! gen_time_ns 1764166669123456000
//! ```
//!
//! The lock file beside it (`<state file>.lock`, `flock`) keeps two servers from using the same
//! state directory at once, and one beside the SQLite database per instance
//! (`<database>.instance-<id>.lock`) two servers from using the same instance of it with
//! different state files, and `<database>.prune-<id>.lock` two processes from pruning one
//! instance at once; the kernel drops a lock when the process dies, even by kill -9.

use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

const HEADER: &str = "tsa-archive-state v1";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SavedState {
    pub instance_id: u32,
    pub reserved_until: u64,
    pub gen_time_ns: u64,
}

pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved state; `None` when there is no file. A file that does not parse is an error:
    /// the operator must look at it rather than have the TSA guess.
    pub fn read(&self) -> anyhow::Result<Option<SavedState>> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", self.path.display()))
            }
        };
        parse(&text)
            .with_context(|| format!("the archive state file {} is damaged", self.path.display()))
            .map(Some)
    }

    /// Replaces the file atomically and durably.
    pub fn write(&self, state: &SavedState) -> std::io::Result<()> {
        let text = format!(
            "{HEADER}\ninstance_id {}\nreserved_until {}\ngen_time_ns {}\n",
            state.instance_id, state.reserved_until, state.gen_time_ns
        );
        crate::files::replace(&self.path, text.as_bytes(), crate::files::PUBLIC)
    }
}

fn parse(text: &str) -> anyhow::Result<SavedState> {
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        bail!("the first line is not '{HEADER}'");
    }
    let (mut instance_id, mut reserved_until, mut gen_time_ns) = (None, None, None);
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let (key, value) = line
            .split_once(' ')
            .with_context(|| format!("bad line '{line}'"))?;
        match key {
            "instance_id" => instance_id = Some(value.parse()?),
            "reserved_until" => reserved_until = Some(value.parse()?),
            "gen_time_ns" => gen_time_ns = Some(value.parse()?),
            _ => bail!("unknown key '{key}'"),
        }
    }
    Ok(SavedState {
        instance_id: instance_id.context("instance_id is missing")?,
        reserved_until: reserved_until.context("reserved_until is missing")?,
        gen_time_ns: gen_time_ns.context("gen_time_ns is missing")?,
    })
}

/// Locks on files (flock), held while the value lives.
pub struct Lock {
    _files: Vec<File>,
}

/// What the error of [`Lock::for_pruning`] says when another process prunes the instance:
/// `tsa archive prune` waits for its turn on it.
pub const PRUNED_ELSEWHERE: &str = "is being pruned by another process";

impl Lock {
    /// The state directory's lock: `<state file>.lock`.
    pub fn acquire(state_path: &Path) -> anyhow::Result<Self> {
        Self::take(&with_suffix(state_path, ".lock"), || {
            "another tsa serves from this state directory".into()
        })
    }

    /// The lock of one instance of the SQLite archive `database`:
    /// `<database>.instance-<id>.lock` beside it, whatever state file a server has, so two
    /// processes never append to the same instance's chain nor hand out its serials; and a
    /// shared lock on `<database>.lock`, which [`Lock::whole_database`] waits for.
    pub fn for_instance(database: &Path, instance_id: u32) -> anyhow::Result<Self> {
        let shared = Self::flock(&with_suffix(database, ".lock"), libc::LOCK_SH, || {
            format!(
                "the archive {} is being migrated (tsa archive migrate)",
                database.display()
            )
        })?;
        let own = Self::flock(
            &with_suffix(database, &format!(".instance-{instance_id}.lock")),
            libc::LOCK_EX,
            || {
                format!(
                    "another tsa serves instance {instance_id} of the archive {}",
                    database.display()
                )
            },
        )?;
        Ok(Self {
            _files: vec![shared, own],
        })
    }

    /// Pruning one instance of the token log beside the SQLite archive `database`
    /// (`<database>.prune-<id>.lock`): the server's retention and `tsa archive prune` take
    /// turns, so that neither writes an anchor below the other's, nor removes its segments
    /// under it.
    pub fn for_pruning(database: &Path, instance_id: u32) -> anyhow::Result<Self> {
        let file = Self::flock(
            &with_suffix(database, &format!(".prune-{instance_id}.lock")),
            libc::LOCK_EX,
            || format!("instance {instance_id} {PRUNED_ELSEWHERE}"),
        )?;
        Ok(Self { _files: vec![file] })
    }

    /// The SQLite archive `database` as a whole, for a command that rewrites every instance's
    /// records (`tsa archive migrate`): no server of any instance may hold it.
    pub fn whole_database(database: &Path) -> anyhow::Result<Self> {
        let file = Self::flock(&with_suffix(database, ".lock"), libc::LOCK_EX, || {
            format!(
                "a tsa serves an instance of the archive {}",
                database.display()
            )
        })?;
        Ok(Self { _files: vec![file] })
    }

    fn take(path: &Path, holder: impl Fn() -> String) -> anyhow::Result<Self> {
        let file = Self::flock(path, libc::LOCK_EX, holder)?;
        Ok(Self { _files: vec![file] })
    }

    /// `path` (created if missing) locked in `mode` without waiting. An existing lock file is
    /// opened for reading only (`flock` needs no more): one that an administrator's command
    /// created as root, readable by all, still serves the service's own user.
    fn flock(path: &Path, mode: libc::c_int, holder: impl Fn() -> String) -> anyhow::Result<File> {
        let file = match File::open(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path),
            opened => opened,
        }
        .with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: flock on a descriptor this function owns.
        let rc = unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                bail!("{} is locked: {}", path.display(), holder());
            }
            return Err(e).with_context(|| format!("cannot lock {}", path.display()));
        }
        Ok(file)
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(&dir.path().join("archive.state"));
        assert_eq!(file.read().unwrap(), None);
        let state = SavedState {
            instance_id: 7,
            reserved_until: 120_000,
            gen_time_ns: 1_764_166_669_123_456_000,
        };
        file.write(&state).unwrap();
        assert_eq!(file.read().unwrap(), Some(state));
        std::fs::write(file.path(), "tsa-archive-state v1\ninstance_id 7\n").unwrap();
        assert!(file.read().is_err());
    }

    #[test]
    fn instances_share_a_database_that_migration_takes_whole() {
        let dir = tempfile::tempdir().unwrap();
        let database = dir.path().join("archive.sqlite");
        let zero = Lock::for_instance(&database, 0).unwrap();
        let one = Lock::for_instance(&database, 1).unwrap();
        assert!(
            Lock::for_instance(&database, 1).is_err(),
            "one process per instance"
        );
        assert!(Lock::whole_database(&database).is_err());
        drop(zero);
        assert!(
            Lock::whole_database(&database).is_err(),
            "instance 1 still runs"
        );
        drop(one);
        let whole = Lock::whole_database(&database).unwrap();
        assert!(Lock::for_instance(&database, 2).is_err());
        drop(whole);
        Lock::for_instance(&database, 2).unwrap();
    }

    #[test]
    fn one_lock_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("archive.state");
        let lock = Lock::acquire(&path).unwrap();
        assert!(Lock::acquire(&path).is_err());
        drop(lock);
        Lock::acquire(&path).unwrap();
    }
}
