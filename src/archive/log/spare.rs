//! The next segment, written ahead: a file of zeros that a thread of its own writes and syncs
//! while the open segment fills, so that a roll finds the new segment's room made and no
//! commit waits for zeros (`LAYOUT.md`, "Room").
//!
//! Zeros written by the writer itself, a step at a time after a commit, held every request
//! that came during the step: on the development VM's disk a step of 1 MiB takes about 2 ms,
//! twenty commits' worth. Here the writer only renames a finished file. The thread writes a
//! step, syncs it and then rests about as long as that took, so it takes roughly half of the
//! disk's time at most; it runs at nice 10 (a lower CPU priority, and the I/O priority Linux
//! derives from it where the I/O scheduler honours one).
//! It stops, removing what it wrote, where less than two segments' worth of the disk (and no
//! less than the archive needs to recover from a full disk) would stay free: a finished spare
//! then never holds space the open segment still needs, unless something else fills the disk.
//! A spare that is not finished when the roll comes is left to finish for the roll after; that
//! segment makes its room as before.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Instant;

use crate::archive::writer::ROOM_TO_RECOVER;

/// The spare's name in an instance's folder; not a segment's (theirs end in `.log`).
pub const NAME: &str = "next-segment.zeros";

/// The thread's priority (`nice`): below the requests' and the writer's.
const NICE: i32 = 10;

const NOT_WRITTEN: &str =
    "the next segment could not be written ahead; it makes its room as it fills";

/// One spare: being written, finished and not taken yet, or (`thread` gone) taken or failed.
pub struct Spare {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<File>>>,
}

impl Spare {
    /// Starts writing `len` zeros, `step` octets at a time, into `dir`'s spare file (replacing
    /// what an earlier run left there).
    pub fn start(dir: &Path, len: u64, step: u64) -> io::Result<Self> {
        let path = dir.join(NAME);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = thread::Builder::new().name("tsa-log-spare".into()).spawn({
            let (dir, path, stop) = (dir.to_owned(), path.clone(), Arc::clone(&stop));
            move || {
                crate::archive::background::set_nice(NICE);
                let written = write_zeros(&dir, &path, len, step, &stop);
                if written.is_err() {
                    let _ = fs::remove_file(&path);
                }
                written
            }
        })?;
        Ok(Self {
            path,
            stop,
            thread: Some(thread),
        })
    }

    /// The spare file and its path once it is written whole and synced; `None` while it is
    /// being written, and once it failed (said here, and its file removed).
    pub fn take(&mut self) -> Option<(PathBuf, File)> {
        if !self.thread.as_ref()?.is_finished() {
            return None;
        }
        match self.thread.take()?.join() {
            Ok(Ok(file)) => Some((self.path.clone(), file)),
            Ok(Err(e)) => {
                let expected = matches!(
                    e.kind(),
                    io::ErrorKind::StorageFull | io::ErrorKind::Interrupted
                );
                if expected {
                    tracing::debug!(file = %self.path.display(), error = %e, "{NOT_WRITTEN}");
                } else {
                    tracing::warn!(file = %self.path.display(), error = %e, "{NOT_WRITTEN}");
                }
                None
            }
            Err(_) => {
                let _ = fs::remove_file(&self.path);
                tracing::warn!(file = %self.path.display(), "{NOT_WRITTEN}: its thread panicked");
                None
            }
        }
    }

    /// Whether it is still being written, or written and not taken yet.
    pub fn is_pending(&self) -> bool {
        self.thread.is_some()
    }

    /// Waits until the spare is written or has failed (for tests).
    #[cfg(test)]
    pub fn wait(&self) {
        while self.thread.as_ref().is_some_and(|t| !t.is_finished()) {
            thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

impl Drop for Spare {
    /// Stops the thread after the step it is in; a partial spare is removed, a whole one left
    /// (the next start writes it again).
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.stop.store(true, Ordering::Relaxed);
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

fn write_zeros(
    dir: &Path,
    path: &Path,
    len: u64,
    step: u64,
    stop: &AtomicBool,
) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let zeros = vec![0u8; step as usize];
    let mut at = 0;
    while at < len {
        if stop.load(Ordering::Relaxed) {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "stopped"));
        }
        let n = step.min(len - at);
        let keep = (2 * len).max(ROOM_TO_RECOVER);
        if let Some(free) = crate::files::free_space(dir).filter(|&f| f < n + keep) {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!("{free} octets free; the spare leaves {keep}"),
            ));
        }
        let started = Instant::now();
        file.write_all_at(&zeros[..n as usize], at)?;
        file.sync_data()?;
        at += n;
        // Unparked early by a stop.
        thread::park_timeout(started.elapsed());
    }
    Ok(file)
}
