//! The handshake over a tokio stream, bounded in time, returning the authenticated peer.

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use crate::config::server_name;
use crate::error::{HandshakeError, TlsError};
use crate::identity::HostIdentity;
use crate::verify::allowed_name;

/// A bound for a handshake between two hosts on the same network: generous for a round trip
/// or two, short enough that a stalled stranger holds a slot briefly.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts connections from the allowed peers only.
#[derive(Clone)]
pub struct PeerAcceptor {
    acceptor: TlsAcceptor,
    allowed: Arc<Vec<ServerName<'static>>>,
    timeout: Duration,
}

impl std::fmt::Debug for PeerAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerAcceptor")
            .field("allowed", &self.allowed)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl PeerAcceptor {
    /// The server side of `identity`, accepting client certificates of the pair's CA for one
    /// of `allowed_peers`, with a handshake bound of `timeout`.
    pub fn new(
        identity: &HostIdentity,
        allowed_peers: &[String],
        timeout: Duration,
    ) -> Result<PeerAcceptor, TlsError> {
        Ok(PeerAcceptor {
            acceptor: TlsAcceptor::from(identity.server_config(allowed_peers)?),
            allowed: Arc::new(identity.allowed_names(allowed_peers)?),
            timeout,
        })
    }

    /// The handshake on `io`; the TLS stream and the peer's name (one of the allowed).
    pub async fn accept<IO>(
        &self,
        io: IO,
    ) -> Result<(server::TlsStream<IO>, String), HandshakeError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let stream = tokio::time::timeout(self.timeout, self.acceptor.accept(io))
            .await
            .map_err(|_| HandshakeError::Timeout(self.timeout))?
            .map_err(HandshakeError::Failed)?;
        let name = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|leaf| allowed_name(leaf, &self.allowed))
            .ok_or(HandshakeError::NoAllowedName)?;
        Ok((stream, name))
    }
}

/// Connects to one named peer.
#[derive(Clone)]
pub struct PeerConnector {
    connector: TlsConnector,
    peer: ServerName<'static>,
    timeout: Duration,
}

impl std::fmt::Debug for PeerConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerConnector")
            .field("peer", &self.peer)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl PeerConnector {
    /// The client side of `identity`, accepting only a server certificate of the pair's CA for
    /// `peer`, with a handshake bound of `timeout`.
    pub fn new(
        identity: &HostIdentity,
        peer: &str,
        timeout: Duration,
    ) -> Result<PeerConnector, TlsError> {
        Ok(PeerConnector {
            connector: TlsConnector::from(identity.client_config()?),
            peer: server_name(peer)?,
            timeout,
        })
    }

    /// The peer's name, as its certificate must carry it.
    pub fn peer(&self) -> String {
        self.peer.to_str().into_owned()
    }

    /// The handshake on `io` (a connected stream); the TLS stream and the peer's name.
    pub async fn connect<IO>(
        &self,
        io: IO,
    ) -> Result<(client::TlsStream<IO>, String), HandshakeError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let stream =
            tokio::time::timeout(self.timeout, self.connector.connect(self.peer.clone(), io))
                .await
                .map_err(|_| HandshakeError::Timeout(self.timeout))?
                .map_err(HandshakeError::Failed)?;
        Ok((stream, self.peer()))
    }
}
