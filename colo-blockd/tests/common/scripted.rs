//! Read-only test backends defined by their read behaviour alone (waiting at
//! a barrier, panicking, ...): [`Scripted`] supplies the rest of
//! [`BlockBackend`].

use std::future::Future;

use bytes::Bytes;
use colo_blockd::backend::{BlockBackend, Capabilities};
use colo_blockd::proto::ZeroMode;

/// How a scripted backend reads.
pub trait ReadScript: std::fmt::Debug + Send + Sync + 'static {
    fn read(&self, offset: u64, length: u32)
    -> impl Future<Output = std::io::Result<Bytes>> + Send;
}

/// A read-only backend of `size` bytes that reads as `script` says.
#[derive(Debug)]
pub struct Scripted<S> {
    pub size: u64,
    pub script: S,
}

impl<S: ReadScript> BlockBackend for Scripted<S> {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: true,
            multi_conn: false,
        }
    }

    fn read_at(
        &self,
        offset: u64,
        length: u32,
    ) -> impl Future<Output = std::io::Result<Bytes>> + Send {
        self.script.read(offset, length)
    }

    async fn write_at(&self, _: u64, _: Bytes, _: bool) -> std::io::Result<()> {
        unreachable!("the server refuses writes to a read-only export")
    }

    async fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }

    async fn trim(&self, _: u64, _: u32, _: bool) -> std::io::Result<()> {
        unreachable!("the server refuses trims on a read-only export")
    }

    async fn write_zeroes(&self, _: u64, _: u32, _: bool, _: ZeroMode) -> std::io::Result<()> {
        unreachable!("the server refuses zeroing on a read-only export")
    }
}
