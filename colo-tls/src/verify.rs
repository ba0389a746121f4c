//! The server's check of a client: webpki's chain check against the pair's CA, then the name.
//! A certificate from the same CA for a host not in the allowed list is refused during the
//! handshake, before a byte of the application's protocol is read.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use webpki::EndEntityCert;

/// [`rustls::server::WebPkiClientVerifier`] (chain, validity, client usage), then the name.
#[derive(Debug)]
pub(crate) struct AllowedPeers {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<ServerName<'static>>,
}

impl AllowedPeers {
    pub(crate) fn new(
        inner: Arc<dyn ClientCertVerifier>,
        allowed: Vec<ServerName<'static>>,
    ) -> Self {
        AllowedPeers { inner, allowed }
    }
}

/// The first of `allowed` that `cert` is valid for.
pub(crate) fn allowed_name(
    cert: &CertificateDer<'_>,
    allowed: &[ServerName<'static>],
) -> Option<String> {
    let leaf = EndEntityCert::try_from(cert).ok()?;
    allowed
        .iter()
        .find(|name| leaf.verify_is_valid_for_subject_name(name).is_ok())
        .map(|name| name.to_str().into_owned())
}

impl ClientCertVerifier for AllowedPeers {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        match allowed_name(end_entity, &self.allowed) {
            Some(_) => Ok(verified),
            None => Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
