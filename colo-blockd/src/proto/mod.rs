//! The NBD wire protocol (fixed newstyle), without I/O: parsing of untrusted
//! client bytes and encoding of server messages. The server in
//! [`crate::server`] moves these between sockets and backends.
//!
//! * [`consts`]: the protocol's numbers.
//! * [`handshake`]: greeting, client flags, options and their replies.
//! * [`request`]: request headers, the request decoder and the check of a
//!   request against its export.
//! * [`reply`]: simple and structured replies.
//! * [`errno`]: the error numbers sent to clients.

pub mod consts;
pub mod errno;
pub mod handshake;
pub mod reply;
pub mod request;

pub use errno::NbdErrno;
pub use handshake::{BlockSizes, ClientFlags, ClientOption, InfoRequest, OptionHeader};
pub use reply::{Reply, ReplyStyle};
pub use request::{Command, ExportLimits, RawRequest, RequestDecoder, RequestHeader, ZeroMode};

/// Bytes from a client that cannot be understood; the connection ends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The input stopped inside a message.
    #[error("truncated message: needed {need} bytes, got {have}")]
    Truncated {
        /// Bytes the message needs.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// A message did not start with its magic number.
    #[error("bad magic number {found:#x} (expected {expected:#x})")]
    BadMagic {
        /// The magic the message must start with.
        expected: u64,
        /// What arrived.
        found: u64,
    },
    /// The client set flags this server does not know.
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// An option's data is longer than the server reads.
    #[error("option data of {0} bytes exceeds the limit")]
    OptionTooLong(u32),
    /// A write's payload is longer than the maximum block size.
    #[error("write payload of {length} bytes (handle {handle:#x}) exceeds the maximum block size")]
    PayloadTooLarge {
        /// The client's cookie.
        handle: u64,
        /// The announced payload length.
        length: u32,
    },
    /// Reading the socket failed (needed by the stream decoder's contract).
    #[error("I/O error: {message}")]
    Io {
        /// The error's kind.
        kind: std::io::ErrorKind,
        /// The error's text.
        message: String,
    },
}

impl From<std::io::Error> for ProtoError {
    fn from(err: std::io::Error) -> ProtoError {
        ProtoError::Io {
            kind: err.kind(),
            message: err.to_string(),
        }
    }
}
