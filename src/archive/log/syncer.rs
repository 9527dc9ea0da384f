//! The thread that makes a commit durable while the writer prepares the next one.
//!
//! The writer's time per record is its CPU (chaining, framing, the `pwrite`) plus its share
//! of the commit's `fdatasync`. Here the appender hands a written commit to this thread,
//! which syncs the segment, writes the commit's index entries, answers its requests and
//! reports back; meanwhile the writer takes and chains the next batch. At most one commit is
//! in flight: the appender waits for it before it writes the next, so each commit is still
//! written only after the one before is durable (what the start's reading of a torn tail
//! relies on, see `appender.rs`), and no two syncs of a segment ever run at once (a
//! writeback error is reported once per file description: a second sync could take the
//! error of the first one's frames).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::appender::cut_back;
use crate::archive::store::{Durable, StoreError};

/// A commit whose frames are written, to be made durable.
pub struct Job {
    pub segment: Arc<File>,
    /// Where the commit's frames begin: the segment is cut back to it if the sync fails.
    pub cut_to: u64,
    /// The segment's index and where the commit's entries go in it (`None`: not kept).
    pub index: Option<(Arc<File>, u64)>,
    pub entries: Vec<u8>,
    /// Told once the frames are durable (after the index entries are written), or not.
    pub durable: Durable,
    /// The sync is reported as failed (for tests of what follows).
    #[cfg(test)]
    pub fail: bool,
}

/// What came of a [`Job`].
pub struct Done {
    pub synced: io::Result<()>,
    /// After a failed sync: whether the commit's frames were cut off (and the cut synced).
    pub cut: bool,
    /// The index entries could not be written (the frames are durable all the same).
    pub index_failed: Option<io::Error>,
}

/// The thread, or where it could not be started (or ended), the caller's thread.
pub struct Syncer {
    thread: Option<Thread>,
    /// The outcome of a job done on the caller's thread.
    inline: Option<Done>,
}

struct Thread {
    jobs: mpsc::Sender<Job>,
    done: mpsc::Receiver<Done>,
    handle: JoinHandle<()>,
}

impl Syncer {
    pub fn start() -> Self {
        let (jobs, queued) = mpsc::channel::<Job>();
        let (report, done) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("tsa-log-sync".into())
            .spawn(move || {
                for job in queued {
                    if report.send(run(job)).is_err() {
                        return;
                    }
                }
            });
        let thread = match spawned {
            Ok(handle) => Some(Thread { jobs, done, handle }),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "the token log's sync thread cannot be started; the writer syncs its commits itself"
                );
                None
            }
        };
        Self {
            thread,
            inline: None,
        }
    }

    /// Hands `job` to the thread (or does it here, if the thread is gone). Each job's outcome
    /// must be taken by [`Syncer::wait`] before the next job.
    pub fn send(&mut self, job: Job) {
        let job = match &self.thread {
            Some(thread) => match thread.jobs.send(job) {
                Ok(()) => return,
                Err(returned) => returned.0,
            },
            None => job,
        };
        self.thread = None;
        self.inline = Some(run(job));
    }

    /// Waits for the outcome of the job sent last.
    pub fn wait(&mut self) -> Done {
        if let Some(done) = self.inline.take() {
            return done;
        }
        let received = self.thread.as_ref().map(|t| t.done.recv());
        // Only a panic in the thread's own code ends it before it reports (the answer's is
        // caught): the sync was not reached.
        received.and_then(Result::ok).unwrap_or_else(|| Done {
            synced: Err(io::Error::other(
                "the token log's sync thread ended before its commit was durable",
            )),
            cut: false,
            index_failed: None,
        })
    }
}

impl Drop for Syncer {
    /// Lets the thread finish its job (its requests are answered) and end.
    fn drop(&mut self) {
        if let Some(Thread { jobs, done, handle }) = self.thread.take() {
            drop(jobs);
            drop(done);
            let _ = handle.join();
        }
    }
}

fn run(job: Job) -> Done {
    let Job {
        segment,
        cut_to,
        index,
        entries,
        durable,
        #[cfg(test)]
        fail,
    } = job;
    let synced = segment.sync_data();
    #[cfg(test)]
    let synced = synced.and_then(|()| match fail {
        true => Err(io::Error::other("the sync failed (a test's)")),
        false => Ok(()),
    });
    if let Err(e) = &synced {
        // Cut off before the requests are refused: none of their records may be found, or
        // taken as committed at the next start.
        let cut = cut_back(&segment, cut_to).is_ok();
        tell(durable, Err(&StoreError::new(e)));
        return Done {
            synced,
            cut,
            index_failed: None,
        };
    }
    // The index only ever lists durable frames: an entry past them stops the start.
    let index_failed = index.and_then(|(index, at)| index.write_all_at(&entries, at).err());
    tell(durable, Ok(()));
    Done {
        synced,
        cut: false,
        index_failed,
    }
}

/// Calls `durable`; a panic in it is logged, and the thread goes on reporting (its commit's
/// outcome stands whatever became of the answer).
fn tell(durable: Durable, outcome: Result<(), &StoreError>) {
    let told = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| durable(outcome)));
    if told.is_err() {
        tracing::error!("answering a token log commit panicked");
    }
}
