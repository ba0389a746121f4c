//! Exports: named backends with the sizes and flags clients see.

use std::sync::Arc;

use crate::backend::BlockBackend;
use crate::proto::consts::transmission_flags as tf;
use crate::proto::{BlockSizes, ExportLimits};

/// Block sizes every export advertises: any byte offset works (minimum 1),
/// 4 KiB avoids read-modify-write in a page-cached file, and 32 MiB is the
/// largest payload (QEMU's own NBD server uses the same maximum).
pub const DEFAULT_BLOCK_SIZES: BlockSizes = BlockSizes {
    minimum: 1,
    preferred: 4096,
    maximum: 32 * 1024 * 1024,
};

/// One named export.
#[derive(Debug)]
pub struct Export<B> {
    name: String,
    description: String,
    backend: Arc<B>,
    block_sizes: BlockSizes,
}

impl<B: BlockBackend> Export<B> {
    /// An export called `name` (the name clients put in their URI).
    pub fn new(name: impl Into<String>, backend: B) -> Export<B> {
        Export {
            name: name.into(),
            description: String::new(),
            backend: Arc::new(backend),
            block_sizes: DEFAULT_BLOCK_SIZES,
        }
    }

    /// Adds a human-readable description (shown by `nbdinfo --list`).
    pub fn with_description(mut self, description: impl Into<String>) -> Export<B> {
        self.description = description.into();
        self
    }

    /// The export's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The export's description (may be empty).
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The storage.
    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    /// Advertised block sizes.
    pub fn block_sizes(&self) -> BlockSizes {
        self.block_sizes
    }

    /// Transmission flags sent in `NBD_INFO_EXPORT`. `SEND_FAST_ZERO` is
    /// always set: it promises only that a zeroing which would be slow
    /// fails at once with `ENOTSUP`, which the server guarantees through
    /// the backend contract.
    pub fn transmission_flags(&self) -> u16 {
        let caps = self.backend.capabilities();
        let mut flags = tf::HAS_FLAGS
            | tf::SEND_FLUSH
            | tf::SEND_FUA
            | tf::SEND_TRIM
            | tf::SEND_WRITE_ZEROES
            | tf::SEND_FAST_ZERO;
        if caps.read_only {
            flags |= tf::READ_ONLY;
        }
        if caps.multi_conn {
            flags |= tf::CAN_MULTI_CONN;
        }
        flags
    }

    /// What requests are checked against.
    pub fn limits(&self) -> ExportLimits {
        ExportLimits {
            size: self.backend.size(),
            max_length: self.block_sizes.maximum,
            read_only: self.backend.capabilities().read_only,
        }
    }
}

/// The exports one server offers. The first is the default export, which a
/// client gets by asking for the empty name.
#[derive(Debug)]
pub struct ExportSet<B> {
    exports: Vec<Arc<Export<B>>>,
}

impl<B: BlockBackend> ExportSet<B> {
    /// A set of exports. Names must be unique; a duplicate would be
    /// unreachable, so it is refused.
    pub fn new(exports: Vec<Export<B>>) -> Result<ExportSet<B>, DuplicateExport> {
        for (i, e) in exports.iter().enumerate() {
            if exports[..i].iter().any(|o| o.name == e.name) {
                return Err(DuplicateExport(e.name.clone()));
            }
        }
        Ok(ExportSet {
            exports: exports.into_iter().map(Arc::new).collect(),
        })
    }

    /// The export a client asked for by name; `""` is the default export.
    pub fn find(&self, name: &str) -> Option<&Arc<Export<B>>> {
        if name.is_empty() {
            return self.exports.first();
        }
        self.exports.iter().find(|e| e.name == name)
    }

    /// Every export, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Export<B>>> {
        self.exports.iter()
    }
}

/// Two exports with one name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("export name {0:?} is used twice")]
pub struct DuplicateExport(pub String);
