//! rustls configurations from a [`HostIdentity`], with the `ring` provider.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;

use crate::error::TlsError;
use crate::identity::HostIdentity;
use crate::verify::AllowedPeers;

/// The provider every config of this crate uses (not the process default, so another crate
/// installing one changes nothing here).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    // rustls deprecates the ring provider because it lacks the post-quantum key exchange
    // (X25519MLKEM768) that aws-lc-rs has; aws-lc-rs needs cmake and a long C build
    // (docs/dependencies.md). Key exchange is X25519 / P-256 here.
    #[allow(deprecated)]
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `name` as a DNS name for certificates.
pub(crate) fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    match ServerName::try_from(name.to_owned()) {
        Ok(n @ ServerName::DnsName(_)) => Ok(n),
        Ok(_) => Err(TlsError::BadName {
            name: name.into(),
            error: "an IP address; hosts are named by DNS names".into(),
        }),
        Err(e) => Err(TlsError::BadName {
            name: name.into(),
            error: e.to_string(),
        }),
    }
}

fn config_error(what: &str) -> impl Fn(rustls::Error) -> TlsError + '_ {
    move |e| TlsError::Config {
        what: what.into(),
        error: e.to_string(),
    }
}

impl HostIdentity {
    /// A server config presenting this host's server certificate and **requiring** a client
    /// certificate signed by the pair's CA for one of `allowed_peers` (at least one).
    pub fn server_config(&self, allowed_peers: &[String]) -> Result<Arc<ServerConfig>, TlsError> {
        let allowed = self.allowed_names(allowed_peers)?;
        let webpki = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Config {
                what: "the client verifier".into(),
                error: e.to_string(),
            })?;
        let what = format!("{}'s server config", self.dir().display());
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_error(&what))?
            .with_client_cert_verifier(Arc::new(AllowedPeers::new(webpki, allowed)))
            .with_single_cert(self.server.chain.clone(), self.server.key.clone_key())
            .map_err(config_error(&what))?;
        Ok(Arc::new(config))
    }

    /// A client config presenting this host's client certificate and verifying the server
    /// against the pair's CA (the expected name is given at each connect: [`crate::PeerConnector`]).
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let what = format!("{}'s client config", self.dir().display());
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_error(&what))?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.client.chain.clone(), self.client.key.clone_key())
            .map_err(config_error(&what))?;
        Ok(Arc::new(config))
    }

    pub(crate) fn allowed_names(
        &self,
        allowed_peers: &[String],
    ) -> Result<Vec<ServerName<'static>>, TlsError> {
        if allowed_peers.is_empty() {
            return Err(TlsError::BadName {
                name: String::new(),
                error: "no peer allowed: name at least one".into(),
            });
        }
        allowed_peers.iter().map(|n| server_name(n)).collect()
    }
}
