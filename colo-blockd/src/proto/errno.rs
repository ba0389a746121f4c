//! The error numbers NBD carries on the wire. They are not the host's errno
//! values (the protocol fixes its own), so a backend's `io::Error` is mapped
//! here, once.

use std::io;

/// An error a request can end with, as sent to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NbdErrno {
    /// Operation not permitted (a write to a read-only export).
    Perm,
    /// I/O error in the backend.
    Io,
    /// Out of memory.
    NoMem,
    /// Invalid request: bad flags, out of range, unknown command.
    Inval,
    /// No space left: a write beyond the end of the export.
    NoSpc,
    /// Value too large: a read longer than the maximum block size.
    Overflow,
    /// Not supported, e.g. `FAST_ZERO` when zeroing would be slow.
    NotSup,
    /// The server is shutting down.
    Shutdown,
}

impl NbdErrno {
    /// The number on the wire.
    pub fn code(self) -> u32 {
        match self {
            NbdErrno::Perm => 1,
            NbdErrno::Io => 5,
            NbdErrno::NoMem => 12,
            NbdErrno::Inval => 22,
            NbdErrno::NoSpc => 28,
            NbdErrno::Overflow => 75,
            NbdErrno::NotSup => 95,
            NbdErrno::Shutdown => 108,
        }
    }

    /// The errno for a wire number; unknown numbers mean `EINVAL` (the
    /// specification tells clients to treat them so).
    pub fn from_code(code: u32) -> Option<NbdErrno> {
        Some(match code {
            0 => return None,
            1 => NbdErrno::Perm,
            5 => NbdErrno::Io,
            12 => NbdErrno::NoMem,
            28 => NbdErrno::NoSpc,
            75 => NbdErrno::Overflow,
            95 => NbdErrno::NotSup,
            108 => NbdErrno::Shutdown,
            _ => NbdErrno::Inval,
        })
    }

    /// How a backend's error is reported. Unrecognised errors become `EIO`:
    /// the client must not mistake a failed write for a bad request.
    pub fn from_io(err: &io::Error) -> NbdErrno {
        match err.kind() {
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => NbdErrno::Perm,
            io::ErrorKind::OutOfMemory => NbdErrno::NoMem,
            io::ErrorKind::InvalidInput => NbdErrno::Inval,
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => NbdErrno::NoSpc,
            io::ErrorKind::FileTooLarge => NbdErrno::Overflow,
            io::ErrorKind::Unsupported => NbdErrno::NotSup,
            _ => NbdErrno::Io,
        }
    }
}

impl std::fmt::Display for NbdErrno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NbdErrno::Perm => "EPERM",
            NbdErrno::Io => "EIO",
            NbdErrno::NoMem => "ENOMEM",
            NbdErrno::Inval => "EINVAL",
            NbdErrno::NoSpc => "ENOSPC",
            NbdErrno::Overflow => "EOVERFLOW",
            NbdErrno::NotSup => "ENOTSUP",
            NbdErrno::Shutdown => "ESHUTDOWN",
        })
    }
}
