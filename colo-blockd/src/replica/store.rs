//! The replica's state and its synchronous operations: the base image S,
//! the two epoch layers, the committed PVM log still being written into S,
//! and what each view and each epoch step does to them. [`super::Replica`]
//! runs these on tokio's blocking pool under one lock; the lock is never
//! held across an `await`.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::disk::{CrashHook, Disk};
use super::journal::{self, CommitTiming, Recovery};
use super::layer::Layer;
use super::pending::{BackgroundApply, Files, Pending, lock};
use super::{LayerStats, ReplicaConfig, ReplicaStats, ViewKind};
use crate::metrics::Metrics;

/// Where the replica stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Buffering both VMs' epochs over S.
    Replicating,
    /// The SVM took over: S is its disk, written through; the primary is
    /// gone and may not write any more.
    FailedOver,
}

#[derive(Debug)]
pub(crate) struct Store {
    files: Arc<Files>,
    pvm: Layer,
    /// The PVM log alternates between two spill files: the committed one
    /// may still be read while the next epoch's log fills the other.
    pvm_spill_paths: [PathBuf; 2],
    pvm_spill_index: usize,
    pvm_memory_budget: u64,
    /// The last committed PVM log, until it is in S.
    pending: Option<Arc<Pending>>,
    svm: Layer,
    mode: Mode,
    /// [`FAILOVER_MARKER`] next to S: present once a failover made S the SVM's disk.
    failover_marker: PathBuf,
    crash: Arc<Mutex<CrashHook>>,
    last_commit: Option<CommitTiming>,
    /// Set when a commit failed half-way: S is then only known to be
    /// consistent after the recovery that `Replica::open` runs, so every
    /// request is refused until a restart.
    broken: bool,
    /// Writes of the primary's running epoch that could not be kept (the spill file's disk is
    /// full, an I/O error), and the first error. The primary's quorum completed those writes on
    /// its own disk, so adopting this epoch would leave S without them: the checkpoint is
    /// refused instead (COLO ends, the primary serves on) until a failover drops the log or a
    /// restart starts over.
    pvm_lost: Option<(u64, String)>,
    /// Where the layers' fill is published after every change.
    metrics: Metrics,
}

/// What [`Store::checkpoint`] did.
#[derive(Debug)]
pub(crate) struct Checkpointed {
    /// Writing the committed log into S, for the background (`None` when
    /// the log was empty).
    pub(crate) apply: Option<BackgroundApply>,
    /// Data bytes of the committed log (zeroed ranges not counted).
    pub(crate) data_bytes: u64,
    /// Bytes written to the journal.
    pub(crate) journal_bytes: u64,
}

/// The file next to S that says a failover made S the SVM's disk (`disk.raw.colo-failed-over`).
pub const FAILOVER_MARKER: &str = ".colo-failed-over";

/// `<image><suffix>`, next to the image.
pub(crate) fn sibling(image: &Path, suffix: &str) -> PathBuf {
    let mut name = OsString::from(image.as_os_str());
    name.push(suffix);
    PathBuf::from(name)
}

/// Takes the exclusive lock on the base image (`flock`), or says who holds it.
fn lock_image(base: &File, image: &Path) -> io::Result<()> {
    match base.try_lock() {
        Ok(()) => Ok(()),
        Err(std::fs::TryLockError::WouldBlock) => Err(io::Error::new(
            io::ErrorKind::ResourceBusy,
            format!(
                "{} is in use by another colo-blockd (it holds the image's lock); this one \
                 touches neither the image nor its journal and spill files",
                image.display()
            ),
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(io::Error::new(
            e.kind(),
            format!("cannot lock {}: {e}", image.display()),
        )),
    }
}

impl Store {
    pub(crate) fn open(
        image: &Path,
        config: &ReplicaConfig,
        metrics: Metrics,
    ) -> io::Result<(Store, Recovery)> {
        let base = OpenOptions::new().read(true).write(true).open(image)?;
        // One replica per image: a second colo-blockd on the same S would recover the journal
        // and truncate the spill files under the running one, which then commits zeros over
        // writes it acknowledged. The lock is taken before anything next to S is touched and
        // held as long as `base` is open (the kernel drops it when the process dies).
        lock_image(&base, image)?;
        let size = base.metadata()?.len();
        let journal_path = sibling(image, ".colo-journal");
        let journal_is_new = !journal_path.exists();
        let journal = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&journal_path)?;
        if journal_is_new {
            // The journal's directory entry must be durable before the
            // first commit relies on finding it after a power cut.
            sync_parent_dir(&journal_path)?;
        }
        let mut crash = CrashHook::default();
        let recovery = journal::recover(&mut Disk::new(&mut crash), &journal, &base, size)?;
        // A failover is final for this image: restarted after it, the daemon must keep
        // writing the SVM's writes straight into S (an overlay would lose them at the next
        // restart, since nothing would ever commit it).
        let failover_marker = sibling(image, FAILOVER_MARKER);
        let mode = if failover_marker.exists() {
            Mode::FailedOver
        } else {
            Mode::Replicating
        };
        let pvm_spill_paths = [
            sibling(image, ".pvm-spill-0"),
            sibling(image, ".pvm-spill-1"),
        ];
        let store = Store {
            pvm: Layer::create(&pvm_spill_paths[0], config.pvm_memory_budget)?,
            pvm_spill_paths,
            pvm_spill_index: 0,
            pvm_memory_budget: config.pvm_memory_budget,
            pending: None,
            svm: Layer::create(&sibling(image, ".svm-spill"), config.svm_memory_budget)?,
            files: Arc::new(Files {
                base,
                journal,
                size,
            }),
            mode,
            failover_marker,
            crash: Arc::new(Mutex::new(crash)),
            last_commit: None,
            broken: false,
            pvm_lost: None,
            metrics,
        };
        store.publish_fill();
        Ok((store, recovery))
    }

    pub(crate) fn size(&self) -> u64 {
        self.files.size
    }

    pub(crate) fn read(&self, view: ViewKind, offset: u64, length: u32) -> io::Result<Bytes> {
        self.check(offset, u64::from(length))?;
        let mut buf = BytesMut::zeroed(length as usize);
        let checkpoint = |at: u64, out: &mut [u8]| self.read_checkpoint(at, out);
        match (self.mode, view) {
            (Mode::Replicating, ViewKind::Replica) => {
                self.pvm.read_over(&checkpoint, offset, &mut buf)?
            }
            (Mode::Replicating, ViewKind::Svm) => {
                self.svm.read_over(&checkpoint, offset, &mut buf)?
            }
            (Mode::FailedOver, _) => checkpoint(offset, &mut buf)?,
        }
        Ok(buf.freeze())
    }

    /// The last adopted checkpoint: the committed PVM log over S while it
    /// is still being written into S, else S.
    fn read_checkpoint(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let base = |at: u64, out: &mut [u8]| self.files.base.read_exact_at(out, at);
        match &self.pending {
            Some(pending) => pending.layer().read_over(&base, offset, buf),
            None => base(offset, buf),
        }
    }

    pub(crate) fn write(
        &mut self,
        view: ViewKind,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> io::Result<()> {
        self.check(offset, data.len() as u64)?;
        match (self.mode, view) {
            // The epoch layers are volatile by design, so FUA has nothing
            // to make durable: the primary's own disk holds its writes
            // until the commit, and the SVM's overlay dies with its epoch.
            (Mode::Replicating, ViewKind::Replica) => {
                let written = self.pvm.write(offset, data);
                self.publish_fill();
                if let Err(err) = &written {
                    self.lose_pvm_write(err);
                }
                written
            }
            (Mode::Replicating, ViewKind::Svm) => {
                let written = self.svm.write(offset, data);
                self.publish_fill();
                written
            }
            (Mode::FailedOver, ViewKind::Svm) => {
                self.files.base.write_all_at(&data, offset)?;
                if fua {
                    self.files.base.sync_data()
                } else {
                    Ok(())
                }
            }
            (Mode::FailedOver, ViewKind::Replica) => Err(primary_is_gone()),
        }
    }

    pub(crate) fn write_zeroes(
        &mut self,
        view: ViewKind,
        offset: u64,
        length: u32,
        fua: bool,
        fast_only: bool,
    ) -> io::Result<()> {
        let length = u64::from(length);
        self.check(offset, length)?;
        match (self.mode, view) {
            (Mode::Replicating, ViewKind::Replica) => {
                self.pvm.write_zeroes(offset, length);
                self.publish_fill();
            }
            (Mode::Replicating, ViewKind::Svm) => {
                self.svm.write_zeroes(offset, length);
                self.publish_fill();
            }
            (Mode::FailedOver, ViewKind::Svm) => {
                if fast_only {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        "zeroing the image writes every byte",
                    ));
                }
                // Not a commit: the crash hook does not apply.
                let mut no_crash = CrashHook::default();
                let mut disk = Disk::new(&mut no_crash);
                disk.write_zeroes_at(&self.files.base, offset, length)?;
                if fua {
                    disk.sync(&self.files.base)?;
                }
            }
            (Mode::FailedOver, ViewKind::Replica) => return Err(primary_is_gone()),
        }
        Ok(())
    }

    pub(crate) fn flush(&self, view: ViewKind) -> io::Result<()> {
        self.alive()?;
        match (self.mode, view) {
            (Mode::FailedOver, ViewKind::Svm) => self.files.base.sync_data(),
            // See `write`: nothing in a layer is meant to be durable.
            _ => Ok(()),
        }
    }

    /// `checkpoint-adopted`: the SVM overlay is dropped and the PVM log is
    /// committed: journaled durably, so the checkpoint is decided, and
    /// handed back to be written into S in the background.
    pub(crate) fn checkpoint(&mut self) -> io::Result<Checkpointed> {
        self.alive()?;
        if self.mode == Mode::FailedOver {
            return Err(primary_is_gone());
        }
        if let Some((count, first)) = &self.pvm_lost {
            return Err(io::Error::other(format!(
                "{count} write(s) of the primary's epoch could not be kept (first: {first}); \
                 refusing to adopt a checkpoint the image would lack: COLO ends, the primary \
                 serves on; free the disk under the image and re-protect"
            )));
        }
        // The journal holds one commit at a time.
        self.settle()?;
        let dropped = self.svm.reset();
        self.publish_fill();
        dropped?;
        if self.pvm.is_empty() {
            lock(&self.crash).disarm();
            return Ok(Checkpointed {
                apply: None,
                data_bytes: 0,
                journal_bytes: 0,
            });
        }
        let (_, data_bytes) = self.pvm.extents_and_data_bytes();
        let next_index = 1 - self.pvm_spill_index;
        let next = Layer::create(&self.pvm_spill_paths[next_index], self.pvm_memory_budget)?;
        let start = Instant::now();
        let journaled = {
            let mut hook = lock(&self.crash);
            let result = journal::write_journal(
                &mut Disk::new(&mut hook),
                &self.files.journal,
                self.files.size,
                &self.pvm,
            );
            if result.is_err() {
                hook.disarm();
            }
            result
        };
        let journal_bytes = journaled.inspect_err(|_| self.broken = true)?;
        let committed = std::mem::replace(&mut self.pvm, next);
        self.pvm_spill_index = next_index;
        self.publish_fill();
        let pending = Arc::new(Pending::new(committed, start.elapsed(), journal_bytes));
        self.pending = Some(Arc::clone(&pending));
        Ok(Checkpointed {
            apply: Some(BackgroundApply {
                pending,
                files: Arc::clone(&self.files),
                crash: Arc::clone(&self.crash),
            }),
            data_bytes,
            journal_bytes,
        })
    }

    /// Waits until the last committed PVM log is in S, writing it here if
    /// the background task has not begun.
    pub(crate) fn settle(&mut self) -> io::Result<()> {
        if let Some(pending) = &self.pending {
            let timing = pending
                .finish(&self.files, &self.crash)
                .inspect_err(|_| self.broken = true)?;
            self.last_commit = Some(timing);
            self.pending = None;
        }
        Ok(())
    }

    /// Failover: the PVM's unadopted epoch is dropped and the SVM's own
    /// writes are merged into S, which becomes the SVM's disk. Returns
    /// false when it had failed over already.
    pub(crate) fn failover(&mut self) -> io::Result<bool> {
        self.alive()?;
        if self.mode == Mode::FailedOver {
            return Ok(false);
        }
        self.settle()?;
        let dropped = self.pvm.reset();
        // The log is dropped at failover: its lost writes no longer matter.
        self.pvm_lost = None;
        self.publish_fill();
        dropped?;
        let result = {
            let mut hook = lock(&self.crash);
            let result = journal::commit(
                &mut Disk::new(&mut hook),
                &self.files.journal,
                &self.files.base,
                self.files.size,
                &self.svm,
            );
            // An injected crash is for one commit only.
            hook.disarm();
            result
        };
        let timing = result.inspect_err(|_| self.broken = true)?;
        self.last_commit = timing.or(self.last_commit);
        let merged = self.svm.reset();
        self.publish_fill();
        merged?;
        // Durable before any SVM write goes straight into S.
        write_durably(
            &self.failover_marker,
            b"colo-blockd: this image was failed over to the secondary; it is the VM's disk now\n",
        )
        .inspect_err(|_| self.broken = true)?;
        self.mode = Mode::FailedOver;
        Ok(true)
    }

    pub(crate) fn pvm_over_budget(&self) -> bool {
        self.pvm.over_budget()
    }

    pub(crate) fn arm_crash(&mut self, operations: u64) {
        lock(&self.crash).arm(operations);
    }

    pub(crate) fn stats(&self) -> ReplicaStats {
        let of = |l: &Layer| LayerStats {
            memory_bytes: l.memory_bytes(),
            spilled_bytes: l.spilled_bytes(),
        };
        ReplicaStats {
            pvm_log: of(&self.pvm),
            svm_overlay: of(&self.svm),
            failed_over: self.mode == Mode::FailedOver,
            last_commit: self.last_commit,
        }
    }

    /// Sets the fill gauges: four relaxed stores, cheap enough for every
    /// write.
    fn publish_fill(&self) {
        let m = &self.metrics;
        m.pvm_log_memory_bytes.set(self.pvm.memory_bytes());
        m.pvm_log_spilled_bytes.set(self.pvm.spilled_bytes());
        m.svm_overlay_memory_bytes.set(self.svm.memory_bytes());
        m.svm_overlay_spilled_bytes.set(self.svm.spilled_bytes());
    }

    /// Counts a write of the primary's epoch the log could not keep; the first one is logged.
    fn lose_pvm_write(&mut self, err: &io::Error) {
        match &mut self.pvm_lost {
            Some((count, _)) => *count += 1,
            None => {
                tracing::error!(
                    %err,
                    "a write of the primary's epoch could not be kept in the PVM log; the next \
                     checkpoint will be refused (COLO ends) rather than adopted without it"
                );
                self.pvm_lost = Some((1, err.to_string()));
            }
        }
    }

    fn alive(&self) -> io::Result<()> {
        if self.broken || self.pending.as_ref().is_some_and(|p| p.failed()) {
            return Err(io::Error::other(
                "a commit failed half-way; restart to recover the image from its journal",
            ));
        }
        Ok(())
    }

    /// The server validates ranges already; this keeps a direct caller of
    /// the library from writing past the image.
    fn check(&self, offset: u64, length: u64) -> io::Result<()> {
        self.alive()?;
        if offset
            .checked_add(length)
            .is_none_or(|end| end > self.files.size)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range beyond the end of the image",
            ));
        }
        Ok(())
    }
}

fn primary_is_gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "the replica failed over: the primary's writes are no longer accepted",
    )
}

/// Writes `contents` to `path` and makes both the file and its directory entry durable.
fn write_durably(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut file = File::create(path)?;
    std::io::Write::write_all(&mut file, contents)?;
    file.sync_all()?;
    sync_parent_dir(path)
}

fn sync_parent_dir(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}
