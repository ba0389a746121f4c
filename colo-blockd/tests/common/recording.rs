//! A backend wrapper that records every operation reaching the backend, so a
//! test can prove that a client's command arrived as the NBD command (and
//! with the flags) it claims, rather than being emulated by the client.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use colo_blockd::backend::{BlockBackend, Capabilities, FileBackend};
use colo_blockd::proto::ZeroMode;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read {
        offset: u64,
        length: u32,
    },
    Write {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Zero {
        offset: u64,
        length: u32,
        fua: bool,
        mode: ZeroMode,
    },
}

#[derive(Debug, Clone)]
pub struct Recording {
    inner: FileBackend,
    ops: Arc<Mutex<Vec<Op>>>,
    in_flight: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl Recording {
    pub fn new(inner: FileBackend) -> Recording {
        Recording {
            inner,
            ops: Arc::default(),
            in_flight: Arc::default(),
            peak: Arc::default(),
        }
    }

    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap().clone()
    }

    /// Most operations that were inside the backend at the same time.
    pub fn peak_in_flight(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }

    async fn record<T>(&self, op: Op, run: impl Future<Output = T>) -> T {
        self.ops.lock().unwrap().push(op);
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        let out = run.await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        out
    }
}

impl BlockBackend for Recording {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn read_at(&self, offset: u64, length: u32) -> std::io::Result<Bytes> {
        self.record(
            Op::Read { offset, length },
            self.inner.read_at(offset, length),
        )
        .await
    }

    async fn write_at(&self, offset: u64, data: Bytes, fua: bool) -> std::io::Result<()> {
        let op = Op::Write {
            offset,
            length: data.len() as u32,
            fua,
        };
        self.record(op, self.inner.write_at(offset, data, fua))
            .await
    }

    async fn flush(&self) -> std::io::Result<()> {
        self.record(Op::Flush, self.inner.flush()).await
    }

    async fn trim(&self, offset: u64, length: u32, fua: bool) -> std::io::Result<()> {
        let op = Op::Trim {
            offset,
            length,
            fua,
        };
        self.record(op, self.inner.trim(offset, length, fua)).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        fua: bool,
        mode: ZeroMode,
    ) -> std::io::Result<()> {
        let op = Op::Zero {
            offset,
            length,
            fua,
            mode,
        };
        self.record(op, self.inner.write_zeroes(offset, length, fua, mode))
            .await
    }
}
