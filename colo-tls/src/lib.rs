//! Mutual TLS between the two hosts of a COLO pair (`docs/security.md`).
//!
//! * [`HostIdentity`]: a host's identity directory, in the layout of QEMU's `tls-creds-x509`
//!   object (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
//!   `client-key.pem`), so one directory serves QEMU and colo's daemons. A host's name is the
//!   dNSName of its certificates. Loading checks every file and says which one is wrong.
//! * [`HostIdentity::server_config`] / [`HostIdentity::client_config`]: rustls configs that
//!   require the peer's certificate, signed by the pair's CA, **for one of the allowed names**
//!   (a certificate of the same CA for another host is refused during the handshake).
//! * [`PeerAcceptor`] / [`PeerConnector`]: the handshake over any tokio stream, bounded in
//!   time, returning the authenticated peer's name.
//! * [`pki`]: a small CA and one identity directory per host (`qmp-driver pki`).
//!
//! rustls runs with its `ring` provider (docs/dependencies.md).

mod config;
mod error;
mod identity;
pub mod pki;
mod stream;
mod verify;

pub use error::{HandshakeError, TlsError};
pub use identity::{
    CA_CERT, CLIENT_CERT, CLIENT_KEY, HostIdentity, IDENTITY_FILES, SERVER_CERT, SERVER_KEY,
};
pub use stream::{DEFAULT_HANDSHAKE_TIMEOUT, PeerAcceptor, PeerConnector};
/// The TLS streams [`PeerAcceptor`] and [`PeerConnector`] return.
pub use tokio_rustls::{
    client::TlsStream as ClientTlsStream, server::TlsStream as ServerTlsStream,
};

#[cfg(test)]
mod tests;
