//! A PVM log past its commit point whose writing into S goes on in the
//! background. The checkpoint is durable once the journal is (the commit
//! point), so the relay's barrier need not wait for S: the SVM reads this
//! log over S until it is written, and the next epoch step finishes it
//! first if it is still running. This keeps the primary's pause at one
//! journal write and sync instead of two (the journal's and S's).

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::disk::{CrashHook, Disk};
use super::journal::{self, CommitTiming};
use super::layer::Layer;

/// The files a commit writes.
#[derive(Debug)]
pub(crate) struct Files {
    pub(crate) base: File,
    pub(crate) journal: File,
    pub(crate) size: u64,
}

#[derive(Debug)]
enum State {
    Waiting,
    Applied(CommitTiming),
    Failed,
}

/// A journaled PVM log on its way into S.
#[derive(Debug)]
pub(crate) struct Pending {
    layer: Layer,
    journal_time: Duration,
    journal_bytes: u64,
    state: Mutex<State>,
    /// Readable without waiting for a running apply (which holds `state`).
    failed: AtomicBool,
}

impl Pending {
    pub(crate) fn new(layer: Layer, journal_time: Duration, journal_bytes: u64) -> Pending {
        Pending {
            layer,
            journal_time,
            journal_bytes,
            state: Mutex::new(State::Waiting),
            failed: AtomicBool::new(false),
        }
    }

    pub(crate) fn layer(&self) -> &Layer {
        &self.layer
    }

    pub(crate) fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Writes the log into S and invalidates the journal (commit steps 3
    /// and 4), once: a second caller waits for the first and gets its
    /// outcome.
    pub(crate) fn finish(
        &self,
        files: &Files,
        crash: &Mutex<CrashHook>,
    ) -> io::Result<CommitTiming> {
        let mut state = lock(&self.state);
        match *state {
            State::Applied(timing) => return Ok(timing),
            State::Failed => return Err(apply_failed()),
            State::Waiting => {}
        }
        let mut hook = lock(crash);
        let result = journal::apply_committed(
            &mut Disk::new(&mut hook),
            &files.journal,
            &files.base,
            &self.layer,
        );
        // An injected crash is for one commit only.
        hook.disarm();
        match result {
            Ok((image, invalidate)) => {
                let timing = CommitTiming {
                    journal: self.journal_time,
                    image,
                    invalidate,
                    journal_bytes: self.journal_bytes,
                };
                *state = State::Applied(timing);
                Ok(timing)
            }
            Err(err) => {
                *state = State::Failed;
                self.failed.store(true, Ordering::Release);
                Err(err)
            }
        }
    }
}

/// What the background task runs.
#[derive(Debug)]
pub(crate) struct BackgroundApply {
    pub(crate) pending: Arc<Pending>,
    pub(crate) files: Arc<Files>,
    pub(crate) crash: Arc<Mutex<CrashHook>>,
}

impl BackgroundApply {
    pub(crate) fn run(&self) -> io::Result<CommitTiming> {
        self.pending.finish(&self.files, &self.crash)
    }
}

pub(crate) fn apply_failed() -> io::Error {
    io::Error::other(
        "writing a committed PVM log into the image failed; restart to replay it from the journal",
    )
}

/// The guarded values stay consistent across a panic (a state enum, the
/// crash hook), so a poisoned lock is used as is.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
