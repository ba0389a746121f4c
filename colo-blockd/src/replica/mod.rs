//! The secondary's disk replica: the base image S, the PVM log P and the
//! SVM overlay A, with the epoch steps the checkpoint-barrier relay
//! drives (see `docs/control-protocol.md`).
//!
//! * S is a raw image file: the last adopted checkpoint.
//! * P holds this epoch's writes of the primary VM, which its quorum's NBD
//!   child sends to the `replica` view. They become part of S only when the
//!   secondary adopts the checkpoint that contains them.
//! * A holds this epoch's writes of the secondary VM (the `svm` view). The
//!   SVM reads A over S and never sees P: its disk must match its memory,
//!   which is the last checkpoint plus its own run since.
//!
//! Both layers keep data in memory up to a budget and spill into a file
//! next to S beyond it ([`ReplicaConfig`]), so a write is never refused or
//! held for lack of memory. When P passes its budget the replica raises
//! [`Replica::checkpoint_wanted`]: the caller asks the primary for a
//! checkpoint, which empties P.
//!
//! Epoch steps:
//!
//! * [`Replica::svm_epoch_closed`]: new SVM requests wait (they do not fail)
//!   until the next step is done, because the SVM may already run the next
//!   epoch and must see the committed S;
//! * [`Replica::checkpoint_adopted`]: A is emptied, P committed durably
//!   (journaled; written into S in the background, read over S until then),
//!   the held SVM requests go on;
//! * [`Replica::failover`]: P is dropped, A merged into S durably; from then
//!   on the `svm` view writes S directly and the `replica` view refuses
//!   writes.
//!
//! Commits go through a write-ahead journal (format and protocol in the
//! [`journal`] module): after a crash at any moment, [`Replica::open`]
//! brings S to exactly the old or the new checkpoint.
//!
//! Files next to the image `disk.raw`: `disk.raw.colo-journal` (kept,
//! invalidated between commits); the spill files `disk.raw.pvm-spill-0`
//! and `-1` (the PVM log alternates between them, because the committed log
//! is read until it is in S) and `disk.raw.svm-spill`, all emptied on open
//! and when their epoch ends.

mod disk;
mod extents;
pub mod journal;
mod layer;
mod pending;
mod store;
mod view;

pub use journal::{CommitTiming, Recovery};
pub use view::{ReplicaView, ViewKind};

/// The failover marker of `image` (`<image>.colo-failed-over`): present once a failover made
/// the image the VM's disk, so that it holds the newest data of the pair.
pub fn failover_marker(image: &Path) -> PathBuf {
    store::sibling(image, store::FAILOVER_MARKER)
}

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedRwLockWriteGuard, RwLock, watch};

use crate::metrics::Metrics;
use store::Store;

/// Default memory budget of each layer: the paper's 10 MB log buffer.
pub const DEFAULT_MEMORY_BUDGET: u64 = 10 * 1024 * 1024;

/// Memory budgets of the two layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaConfig {
    /// Bytes of PVM-log data kept in memory; past them writes spill to a
    /// file and a checkpoint is wanted.
    pub pvm_memory_budget: u64,
    /// Bytes of SVM-overlay data kept in memory; past them writes spill.
    pub svm_memory_budget: u64,
}

impl Default for ReplicaConfig {
    fn default() -> ReplicaConfig {
        ReplicaConfig {
            pvm_memory_budget: DEFAULT_MEMORY_BUDGET,
            svm_memory_budget: DEFAULT_MEMORY_BUDGET,
        }
    }
}

/// How much one layer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerStats {
    /// Data bytes in memory.
    pub memory_bytes: u64,
    /// Bytes written to the spill file this epoch (overwritten ones too).
    pub spilled_bytes: u64,
}

/// A snapshot of the replica's fill, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaStats {
    /// The PVM log P.
    pub pvm_log: LayerStats,
    /// The SVM overlay A.
    pub svm_overlay: LayerStats,
    /// [`Replica::failover`] has run.
    pub failed_over: bool,
    /// The last commit that wrote anything (checkpoint or failover merge)
    /// and is entirely in S.
    pub last_commit: Option<CommitTiming>,
}

/// What one [`Replica::checkpoint_adopted`] committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointCommit {
    /// Data bytes of the PVM log committed (zeroed ranges not counted);
    /// 0 when the primary wrote nothing this epoch.
    pub data_bytes: u64,
    /// Bytes written to the journal (0 for an empty log).
    pub journal_bytes: u64,
    /// The whole step, up to the commit point: what the ack waits for.
    pub duration: Duration,
}

/// The replica; cheap to clone (all clones share one state).
#[derive(Debug, Clone)]
pub struct Replica {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Mutex<Store>,
    size: u64,
    recovery: Recovery,
    /// SVM requests run under a read guard; `svm_epoch_closed` takes the
    /// write guard and parks it in `held`, so new SVM requests queue (tokio's
    /// lock is fair: waiting readers do not overtake a writer) until the
    /// epoch step drops it.
    svm_gate: Arc<RwLock<()>>,
    held: Mutex<Option<OwnedRwLockWriteGuard<()>>>,
    checkpoint_wanted: watch::Sender<bool>,
    metrics: Metrics,
}

impl Replica {
    /// Opens the replica over the raw image `image`, first bringing it to a
    /// checkpoint if a commit was interrupted (see [`Replica::recovery`]).
    /// The layers start empty.
    pub fn open(image: &Path, config: ReplicaConfig) -> io::Result<Replica> {
        Replica::open_with_metrics(image, config, Metrics::new())
    }

    /// Like [`Replica::open`], publishing the layers' fill, commits and
    /// failovers in `metrics` ([`Replica::metrics`] hands it on to the
    /// daemon's other parts).
    pub fn open_with_metrics(
        image: &Path,
        config: ReplicaConfig,
        metrics: Metrics,
    ) -> io::Result<Replica> {
        let (store, recovery) = Store::open(image, &config, metrics.clone())?;
        if store.stats().failed_over {
            tracing::warn!(
                image = %image.display(),
                marker = %store::sibling(image, store::FAILOVER_MARKER).display(),
                "this image was failed over to the secondary: it is the VM's disk, the svm \
                 export writes it directly and the replica export refuses writes (remove the \
                 marker only to make the image a replica again, after a fresh copy)"
            );
        }
        Ok(Replica {
            inner: Arc::new(Inner {
                size: store.size(),
                store: Mutex::new(store),
                recovery,
                svm_gate: Arc::new(RwLock::new(())),
                held: Mutex::new(None),
                checkpoint_wanted: watch::Sender::new(false),
                metrics,
            }),
        })
    }

    /// What [`Replica::open`] found in the journal.
    pub fn recovery(&self) -> Recovery {
        self.inner.recovery
    }

    /// The metrics this replica updates.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The image size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// The view the primary's quorum child writes into (export `replica`).
    pub fn replica_view(&self) -> ReplicaView {
        ReplicaView::new(self.clone(), ViewKind::Replica)
    }

    /// The secondary VM's disk (export `svm`).
    pub fn svm_view(&self) -> ReplicaView {
        ReplicaView::new(self.clone(), ViewKind::Svm)
    }

    /// True while the PVM log is past its memory budget; goes back to
    /// false when a checkpoint (or failover) empties it.
    pub fn checkpoint_wanted(&self) -> watch::Receiver<bool> {
        self.inner.checkpoint_wanted.subscribe()
    }

    /// The relay's `svm-epoch-closed`: waits for SVM requests in flight,
    /// then holds new ones until [`Replica::checkpoint_adopted`] or
    /// [`Replica::failover`]. Calling it again while holding does nothing.
    pub async fn svm_epoch_closed(&self) {
        if self.held().is_some() {
            return;
        }
        let guard = Arc::clone(&self.inner.svm_gate).write_owned().await;
        *self.held() = Some(guard);
    }

    /// The relay's `checkpoint-adopted`: empties A, commits P durably,
    /// then releases held SVM requests. Acknowledge the event only after
    /// this returns `Ok`. It returns at the commit point (P durable in the
    /// journal): writing P into S goes on in the background while the SVM
    /// reads P over S, and the next epoch step waits for it
    /// ([`Replica::settle`] waits for it at once). After an error, here or
    /// in the background, the replica refuses every request; reopening it
    /// brings S to a checkpoint.
    pub async fn checkpoint_adopted(&self) -> io::Result<CheckpointCommit> {
        let start = Instant::now();
        let result = self.on_store(Store::checkpoint).await;
        self.finish_epoch_step(result.is_ok());
        let done = result?;
        let commit = CheckpointCommit {
            data_bytes: done.data_bytes,
            journal_bytes: done.journal_bytes,
            duration: start.elapsed(),
        };
        let m = self.metrics();
        m.commit_duration.observe(commit.duration.as_secs_f64());
        m.checkpoints_committed.inc();
        m.committed_bytes.inc_by(commit.data_bytes);
        if let Some(apply) = done.apply {
            tokio::task::spawn_blocking(move || {
                if let Err(err) = apply.run() {
                    tracing::error!(%err, "writing the committed PVM log into the image failed");
                }
            });
        }
        Ok(commit)
    }

    /// Waits until the last adopted checkpoint is in S itself, not only in
    /// the journal (for a clean shutdown, or to look at S).
    pub async fn settle(&self) -> io::Result<()> {
        self.on_store(Store::settle).await
    }

    /// Failover to the secondary: drops P, merges A into S durably, then
    /// releases held SVM requests; S is the SVM's disk from then on.
    pub async fn failover(&self) -> io::Result<()> {
        let result = self.on_store(Store::failover).await;
        self.finish_epoch_step(result.is_ok());
        if result? {
            self.metrics().failovers.inc();
        }
        Ok(())
    }

    /// How much each layer holds now.
    pub fn stats(&self) -> io::Result<ReplicaStats> {
        Ok(self.inner.lock_store()?.stats())
    }

    /// **Testing only**: simulates a `kill -9` during the next commit (or
    /// none, if that commit needs fewer operations), after
    /// `operations` more file operations of it (journal and image writes,
    /// syncs); the one it stops at is torn (half written).
    /// The replica then refuses every request; drop it and reopen the image.
    pub fn inject_crash_after(&self, operations: u64) -> io::Result<()> {
        self.inner.lock_store()?.arm_crash(operations);
        Ok(())
    }

    fn finish_epoch_step(&self, emptied_pvm_log: bool) {
        // Held requests go on even after a failure: they get the error of
        // the broken replica instead of waiting forever.
        self.held().take();
        if emptied_pvm_log {
            self.inner.checkpoint_wanted.send_replace(false);
        }
    }

    /// Runs `op` on the blocking pool: it may read or write files.
    async fn on_store<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut Store) -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || op(&mut *inner.lock_store()?))
            .await
            .map_err(io::Error::other)?
    }

    fn held(&self) -> MutexGuard<'_, Option<OwnedRwLockWriteGuard<()>>> {
        // An Option cannot be left half-updated, so a poisoned lock is fine.
        self.inner
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Inner {
    fn lock_store(&self) -> io::Result<MutexGuard<'_, Store>> {
        self.store
            .lock()
            .map_err(|_| io::Error::other("replica state lost: a request panicked"))
    }
}
