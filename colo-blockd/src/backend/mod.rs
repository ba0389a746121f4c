//! Where an export's bytes live. The server checks every request against the
//! export's size and flags before it reaches a backend, so a backend sees
//! only in-range, well-formed operations.
//!
//! [`FileBackend`] serves a raw image file. The secondary replica's two views
//! (PVM log and SVM overlay over the base image) are the other implementation,
//! in [`crate::replica`].

mod file;

pub use file::FileBackend;

use std::future::Future;
use std::io;

use bytes::Bytes;

use crate::proto::ZeroMode;

/// What a backend can promise; the server turns it into transmission flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Refuse writes, trims and zeroing.
    pub read_only: bool,
    /// A flush on one connection makes writes completed on *every*
    /// connection durable (`NBD_FLAG_CAN_MULTI_CONN`).
    pub multi_conn: bool,
}

/// The storage behind one export. Methods take `&self` because a connection
/// runs many requests at once; the NBD client, not the backend, orders
/// overlapping requests (the protocol gives no ordering between requests in
/// flight).
pub trait BlockBackend: Send + Sync + 'static {
    /// Export size in bytes; fixed for the life of the export.
    fn size(&self) -> u64;

    /// What the backend can promise.
    fn capabilities(&self) -> Capabilities;

    /// Reads `length` bytes at `offset`.
    fn read_at(&self, offset: u64, length: u32) -> impl Future<Output = io::Result<Bytes>> + Send;

    /// Writes `data` at `offset`; with `fua` it is durable before returning.
    fn write_at(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// Makes every completed write durable.
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send;

    /// The range may be discarded; what it reads afterwards is up to the
    /// backend.
    fn trim(
        &self,
        offset: u64,
        length: u32,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// The range reads back as zeroes afterwards. `ErrorKind::Unsupported`
    /// when `mode.fast_only` and zeroing would be slow.
    fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        fua: bool,
        mode: ZeroMode,
    ) -> impl Future<Output = io::Result<()>> + Send;
}
