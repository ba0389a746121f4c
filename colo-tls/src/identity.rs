//! A host's identity directory: QEMU's `tls-creds-x509` layout, checked file by file.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use webpki::{EndEntityCert, KeyUsage};

use crate::error::TlsError;

/// The pair's CA certificate(s): what a peer's certificate must chain to.
pub const CA_CERT: &str = "ca-cert.pem";
/// The certificate this host presents when it accepts a connection (its chain, leaf first).
pub const SERVER_CERT: &str = "server-cert.pem";
/// The server certificate's key.
pub const SERVER_KEY: &str = "server-key.pem";
/// The certificate this host presents when it connects.
pub const CLIENT_CERT: &str = "client-cert.pem";
/// The client certificate's key.
pub const CLIENT_KEY: &str = "client-key.pem";
/// Every file of an identity directory.
pub const IDENTITY_FILES: [&str; 5] = [CA_CERT, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY];

/// One certificate chain and its key.
#[derive(Debug)]
pub(crate) struct CertifiedKey {
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
}

impl Clone for CertifiedKey {
    fn clone(&self) -> Self {
        CertifiedKey {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// A host's identity, loaded from its directory: the pair's CA, and the host's server and
/// client certificates with their keys, both for the same host name.
#[derive(Debug, Clone)]
pub struct HostIdentity {
    dir: PathBuf,
    name: String,
    pub(crate) roots: Arc<rustls::RootCertStore>,
    pub(crate) server: CertifiedKey,
    pub(crate) client: CertifiedKey,
}

impl HostIdentity {
    /// Loads and checks `dir`: every file present and PEM, the keys readable by their owner
    /// only, both certificates signed by the CA, valid now, for their use (server, client
    /// authentication), and naming the same host.
    pub fn load(dir: impl AsRef<Path>) -> Result<HostIdentity, TlsError> {
        let dir = dir.as_ref().to_path_buf();
        let ca_path = dir.join(CA_CERT);
        let cas = read_certs(&ca_path)?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in &cas {
            roots
                .add(ca.clone())
                .map_err(|e| TlsError::BadCertificate {
                    path: ca_path.clone(),
                    problem: format!("not a usable CA certificate: {e}"),
                })?;
        }
        let anchors: Vec<_> = cas
            .iter()
            .filter_map(|c| webpki::anchor_from_trusted_cert(c).ok())
            .collect();
        let server = read_certified(&dir, SERVER_CERT, SERVER_KEY)?;
        let client = read_certified(&dir, CLIENT_CERT, CLIENT_KEY)?;
        let now = UnixTime::now();
        check_chain(
            &dir.join(SERVER_CERT),
            &server,
            &anchors,
            now,
            KeyUsage::server_auth(),
        )?;
        check_chain(
            &dir.join(CLIENT_CERT),
            &client,
            &anchors,
            now,
            KeyUsage::client_auth(),
        )?;
        let server_name = dns_name(&dir.join(SERVER_CERT), &server.chain[0])?;
        let client_name = dns_name(&dir.join(CLIENT_CERT), &client.chain[0])?;
        if server_name != client_name {
            return Err(TlsError::Identity {
                dir,
                problem: format!(
                    "{SERVER_CERT} is for {server_name:?} but {CLIENT_CERT} for {client_name:?}; \
                     a host's two certificates name the same host"
                ),
            });
        }
        Ok(HostIdentity {
            dir,
            name: server_name,
            roots: Arc::new(roots),
            server,
            client,
        })
    }

    /// This host's name (the dNSName of its certificates).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The directory it was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Reads a file, naming it in the error.
fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|error| TlsError::Read {
        path: path.to_path_buf(),
        error,
    })
}

/// Every certificate of a PEM file (at least one).
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let not_pem = |error: String| TlsError::NotPem {
        path: path.to_path_buf(),
        what: "certificate",
        error,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| not_pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(not_pem("no CERTIFICATE block".into()));
    }
    Ok(certs)
}

/// A private key, refused when its group or others may read it.
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let meta = fs::metadata(path).map_err(|error| TlsError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TlsError::KeyPermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::NotPem {
        path: path.to_path_buf(),
        what: "private key",
        error: e.to_string(),
    })
}

fn read_certified(dir: &Path, cert: &str, key: &str) -> Result<CertifiedKey, TlsError> {
    Ok(CertifiedKey {
        chain: read_certs(&dir.join(cert))?,
        key: read_key(&dir.join(key))?,
    })
}

/// The certificate chains to one of `anchors`, is valid `now`, and allows `usage`.
fn check_chain(
    path: &Path,
    certified: &CertifiedKey,
    anchors: &[rustls_pki_types::TrustAnchor<'_>],
    now: UnixTime,
    usage: KeyUsage,
) -> Result<(), TlsError> {
    let bad = |problem: String| TlsError::BadCertificate {
        path: path.to_path_buf(),
        problem,
    };
    let leaf = EndEntityCert::try_from(&certified.chain[0])
        .map_err(|e| bad(format!("not a usable certificate: {e}")))?;
    leaf.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        anchors,
        &certified.chain[1..],
        now,
        usage,
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| {
        bad(match e {
            webpki::Error::UnknownIssuer => format!("not signed by the CA in {CA_CERT}"),
            webpki::Error::CertExpired { .. } => "the certificate has expired".to_string(),
            webpki::Error::CertNotValidYet { .. } => "the certificate is not valid yet".into(),
            other => format!("refused against {CA_CERT}: {other}"),
        })
    })
}

/// The certificate's one dNSName subject alternative name: the host's name.
pub(crate) fn dns_name(path: &Path, cert: &CertificateDer<'_>) -> Result<String, TlsError> {
    let bad = |problem: String| TlsError::BadCertificate {
        path: path.to_path_buf(),
        problem,
    };
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| bad(format!("not a parsable certificate: {e}")))?;
    let names: Vec<String> = parsed
        .subject_alternative_name()
        .map_err(|e| bad(format!("bad subjectAltName: {e}")))?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match names.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(bad(
            "no dNSName subjectAltName: a host's certificate names the host".into(),
        )),
        many => Err(bad(format!(
            "{} dNSNames ({}): a host's certificate names one host",
            many.len(),
            many.join(", ")
        ))),
    }
}
