//! The error type shared by every QMP operation.

use std::time::Duration;

/// Everything that can go wrong talking to QEMU over QMP.
///
/// The variants separate "QEMU said no" ([`QmpError::Qemu`]), which leaves
/// the connection usable, from the connection-level failures, after which
/// every further call fails too.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// An I/O error other than the peer closing the connection.
    #[error("QMP I/O error on {peer}: {source}")]
    Io {
        /// Socket path or address of the QMP server.
        peer: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// No answer within the allowed time. The connection stays open; a late
    /// reply is dropped.
    #[error("QMP `{command}` on {peer} timed out after {after:?}")]
    Timeout {
        /// Socket path or address of the QMP server.
        peer: String,
        /// What was being waited for: a command name, `greeting`,
        /// `connect`, or `event NAME` for [`crate::EventStream::wait_for`].
        command: String,
        /// The timeout that expired.
        after: Duration,
    },
    /// The peer closed the connection (EOF, reset, or EOF in the middle of a
    /// line), before or while waiting for a reply.
    #[error("QMP connection to {peer} is closed")]
    Disconnected {
        /// Socket path or address of the QMP server.
        peer: String,
    },
    /// QEMU answered with `{"error": {"class": .., "desc": ..}}`.
    #[error("QEMU rejected `{command}`: {class}: {desc}")]
    Qemu {
        /// The command QEMU rejected.
        command: String,
        /// QEMU's error class, e.g. `GenericError`, `CommandNotFound`.
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },
    /// The peer violated the protocol in a way that cannot be skipped:
    /// malformed greeting, a line longer than the configured limit.
    #[error("QMP protocol error on {peer}: {detail}")]
    Protocol {
        /// Socket path or address of the QMP server.
        peer: String,
        /// What was wrong.
        detail: String,
    },
    /// Out-of-band execution was requested but was not negotiated (QEMU did
    /// not offer it, or [`crate::ConnectOptions::enable_oob`] was off).
    #[error("out-of-band execution is not enabled on this QMP connection")]
    OobUnavailable,
    /// QEMU's reply did not have the shape the typed wrapper expects.
    #[error("cannot decode reply to `{command}`: {detail}")]
    Decode {
        /// The command whose reply was undecodable.
        command: String,
        /// The serde error.
        detail: String,
    },
}

impl QmpError {
    /// True for [`QmpError::Disconnected`]: lets callers treat "QEMU went
    /// away" differently from "QEMU refused".
    pub fn is_disconnected(&self) -> bool {
        matches!(self, QmpError::Disconnected { .. })
    }

    /// QEMU's error class for [`QmpError::Qemu`], `None` otherwise.
    pub fn qemu_class(&self) -> Option<&str> {
        match self {
            QmpError::Qemu { class, .. } => Some(class),
            _ => None,
        }
    }
}

/// Result alias used throughout the QMP client.
pub type Result<T> = std::result::Result<T, QmpError>;
