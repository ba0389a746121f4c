//! What can go wrong loading an identity or authenticating a peer.

use std::path::PathBuf;
use std::time::Duration;

/// An identity directory or a configuration that cannot be used; each names the file and the
/// problem.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file is missing or unreadable.
    #[error("{path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// A private key that its owner's group or others may read.
    #[error(
        "{path}: the key is readable by group or others (mode {mode:04o}); `chmod 600 {path}` \
         (keys must be readable by their owner only)"
    )]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A file without the PEM content expected.
    #[error("{path}: not a PEM {what}: {error}")]
    NotPem {
        /// The file.
        path: PathBuf,
        /// "certificate" or "private key".
        what: &'static str,
        /// The parser's words.
        error: String,
    },
    /// A certificate that does not chain to the pair's CA, is expired, or not for its use.
    #[error("{path}: {problem}")]
    BadCertificate {
        /// The certificate file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// The server and client certificates name different hosts, or none.
    #[error("{dir}: {problem}")]
    Identity {
        /// The identity directory.
        dir: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A peer name that is not a DNS name.
    #[error("{name:?} is not a valid host name for a certificate: {error}")]
    BadName {
        /// The name.
        name: String,
        /// Why.
        error: String,
    },
    /// rustls refused the configuration (a key that does not match its certificate, say).
    #[error("{what}: {error}")]
    Config {
        /// Which configuration.
        what: String,
        /// rustls's words.
        error: String,
    },
}

/// A peer that did not authenticate.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The handshake did not complete in time.
    #[error("no TLS handshake within {0:?}")]
    Timeout(Duration),
    /// The handshake failed (the peer's certificate was refused, or ours, or the bytes are not
    /// TLS); rustls's words.
    #[error("TLS handshake failed: {0}")]
    Failed(std::io::Error),
    /// The handshake completed without a name we allow (cannot happen with this crate's
    /// configs: the verifier refuses such a certificate during the handshake).
    #[error("the peer's certificate names no allowed host")]
    NoAllowedName,
}
