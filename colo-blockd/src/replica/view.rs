//! The two exports of a replica as [`BlockBackend`]s.

use std::io;

use bytes::Bytes;
use tokio::sync::OwnedRwLockReadGuard;

use super::Replica;
use crate::backend::{BlockBackend, Capabilities};
use crate::proto::ZeroMode;

/// Which VM a view serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewKind {
    /// Export `replica`: the primary's writes, into the PVM log. Reads see
    /// the log over S (the primary's quorum reads its local child first,
    /// so they are rare).
    Replica,
    /// Export `svm`: the secondary VM's disk, the SVM overlay over S.
    Svm,
}

/// One view of a [`Replica`]. Both views are this one type so that one
/// [`crate::export::ExportSet`] can offer both exports.
#[derive(Debug, Clone)]
pub struct ReplicaView {
    replica: Replica,
    kind: ViewKind,
}

impl ReplicaView {
    pub(super) fn new(replica: Replica, kind: ViewKind) -> ReplicaView {
        ReplicaView { replica, kind }
    }

    /// Which VM this view serves.
    pub fn kind(&self) -> ViewKind {
        self.kind
    }

    /// SVM requests wait here while an epoch step holds them.
    async fn admit(&self) -> Option<OwnedRwLockReadGuard<()>> {
        match self.kind {
            ViewKind::Svm => Some(
                std::sync::Arc::clone(&self.replica.inner.svm_gate)
                    .read_owned()
                    .await,
            ),
            ViewKind::Replica => None,
        }
    }
}

impl BlockBackend for ReplicaView {
    fn size(&self) -> u64 {
        self.replica.size()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: false,
            // Every connection shares one state.
            multi_conn: true,
        }
    }

    async fn read_at(&self, offset: u64, length: u32) -> io::Result<Bytes> {
        let _admitted = self.admit().await;
        let kind = self.kind;
        self.replica
            .on_store(move |s| s.read(kind, offset, length))
            .await
    }

    async fn write_at(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
        let _admitted = self.admit().await;
        let kind = self.kind;
        let over_budget = self
            .replica
            .on_store(move |s| {
                s.write(kind, offset, data, fua)?;
                Ok(s.pvm_over_budget())
            })
            .await?;
        if kind == ViewKind::Replica && over_budget {
            self.replica
                .inner
                .checkpoint_wanted
                .send_if_modified(|wanted| !std::mem::replace(wanted, true));
        }
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        let _admitted = self.admit().await;
        let kind = self.kind;
        self.replica.on_store(move |s| s.flush(kind)).await
    }

    /// A trimmed range reads as zeroes afterwards, as with
    /// [`crate::backend::FileBackend`]: the model stays one of plain bytes.
    async fn trim(&self, offset: u64, length: u32, fua: bool) -> io::Result<()> {
        let mode = ZeroMode {
            may_trim: true,
            fast_only: false,
        };
        self.write_zeroes(offset, length, fua, mode).await
    }

    /// Zeroing a layer records a range, which is fast; only after failover
    /// (writing S) is it slow and refused with `fast_only`.
    async fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        fua: bool,
        mode: ZeroMode,
    ) -> io::Result<()> {
        let _admitted = self.admit().await;
        let kind = self.kind;
        self.replica
            .on_store(move |s| s.write_zeroes(kind, offset, length, fua, mode.fast_only))
            .await
    }
}
