//! A pair's keys and certificates: a small CA and one identity directory per host, in the
//! layout of [`crate::HostIdentity`] (`qmp-driver pki create`, `qmp-driver pki issue`).
//!
//! ```text
//! OUT/ca/ca-cert.pem  ca-key.pem          the CA; its key never leaves this directory
//! OUT/NAME/ca-cert.pem server-cert.pem server-key.pem client-cert.pem client-key.pem
//! ```
//!
//! Directories are made 0700, keys 0600, certificates 0644. Nothing existing is overwritten:
//! every target is checked before the first file is written.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::identity::{CA_CERT, CLIENT_CERT, CLIENT_KEY, IDENTITY_FILES, SERVER_CERT, SERVER_KEY};

/// The CA directory's name under the output directory.
pub const CA_DIR: &str = "ca";
/// The CA's private key in [`CA_DIR`].
pub const CA_KEY: &str = "ca-key.pem";
/// Validity of the CA certificate.
pub const CA_VALID_DAYS: u32 = 3650;
/// Default validity of a host's certificates.
pub const HOST_VALID_DAYS: u32 = 730;

/// Generating or writing failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A target file is already there.
    #[error("{0} exists; refusing to overwrite it (choose a new --out)")]
    Exists(PathBuf),
    /// A file system error.
    #[error("{path}: {error}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// rcgen refused (a name that is not a DNS name, say).
    #[error("{what}: {error}")]
    Generate {
        /// What was being made.
        what: String,
        /// rcgen's words.
        error: rcgen::Error,
    },
    /// The same host twice, or none, or a name that cannot be a directory.
    #[error("{0}")]
    Hosts(String),
    /// The CA directory's files cannot be used.
    #[error("{path}: {problem}")]
    Ca {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

/// What [`create_pair`] and [`issue`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The CA directory (made by [`create_pair`]; the one used by [`issue`]).
    pub ca_dir: PathBuf,
    /// One identity directory per host, in the order given.
    pub host_dirs: Vec<PathBuf>,
}

/// How long certificates are valid, from now.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Certificates become valid this many days ago (a small margin for clocks).
    pub not_before_days_ago: i64,
    /// ... and stay valid this many days from now (negative: already expired, for tests).
    pub days: i64,
}

impl Validity {
    /// From one day ago to `days` from now.
    pub fn days(days: u32) -> Validity {
        Validity {
            not_before_days_ago: 1,
            days: i64::from(days),
        }
    }

    fn apply(self, params: &mut CertificateParams) {
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(self.not_before_days_ago);
        params.not_after = now + time::Duration::days(self.days);
    }
}

/// A host's address to name in its certificates as well (an `iPAddress` subjectAltName).
///
/// colo's daemons and QEMU's NBD client and migration name the peer they accept
/// (`--tls-peer`, `tls-hostname`); QEMU's chardev sockets cannot: a chardev client checks the
/// server's certificate against the address in its `host=` option (the stock stack's
/// colo-compare sockets, `docs/security.md`). So a host that serves those needs its address
/// in its certificates too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAddress {
    /// The host's name (one of the `hosts`).
    pub host: String,
    /// Its address.
    pub address: IpAddr,
}

impl std::str::FromStr for HostAddress {
    type Err = String;

    /// `NAME=ADDRESS`, as `--address` takes it.
    fn from_str(text: &str) -> Result<Self, String> {
        let (host, address) = text
            .split_once('=')
            .ok_or_else(|| format!("{text:?}: expected NAME=ADDRESS, e.g. hosta=192.168.77.1"))?;
        let address = address
            .parse()
            .map_err(|_| format!("{address:?} is not an IP address"))?;
        Ok(HostAddress {
            host: host.to_string(),
            address,
        })
    }
}

/// Makes `out/ca/` (a new CA) and `out/NAME/` for each host, host certificates valid for
/// `host_validity`, naming each host by its DNS name only.
pub fn create_pair(
    out: &Path,
    hosts: &[String],
    host_validity: Validity,
) -> Result<Written, PkiError> {
    create_pair_with_addresses(out, hosts, &[], host_validity)
}

/// [`create_pair`], with `addresses` added to their hosts' certificates.
pub fn create_pair_with_addresses(
    out: &Path,
    hosts: &[String],
    addresses: &[HostAddress],
    host_validity: Validity,
) -> Result<Written, PkiError> {
    check_hosts(hosts)?;
    check_addresses(hosts, addresses)?;
    let ca_dir = out.join(CA_DIR);
    let mut targets = vec![ca_dir.join(CA_CERT), ca_dir.join(CA_KEY)];
    for host in hosts {
        targets.extend(IDENTITY_FILES.iter().map(|f| out.join(host).join(f)));
    }
    refuse_existing(&targets)?;

    let ca_key = generate_key("the CA's key")?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("colo pair CA ({})", hosts.join(", ")),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Validity::days(CA_VALID_DAYS).apply(&mut params);
    let ca_cert = params
        .self_signed(&ca_key)
        .map_err(|error| PkiError::Generate {
            what: "the CA certificate".into(),
            error,
        })?;
    let ca_pem = ca_cert.pem();
    make_dir(out)?;
    make_dir(&ca_dir)?;
    write_new(
        &ca_dir.join(CA_KEY),
        ca_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_new(&ca_dir.join(CA_CERT), ca_pem.as_bytes(), 0o644)?;
    let issuer = Issuer::new(params, ca_key);
    let mut host_dirs = Vec::new();
    for host in hosts {
        host_dirs.push(write_identity(
            &out.join(host),
            host,
            &addresses_of(addresses, host),
            &issuer,
            &ca_pem,
            host_validity,
        )?);
    }
    Ok(Written { ca_dir, host_dirs })
}

/// Issues a new identity for `host` with the CA in `ca_dir` (as [`create_pair`] made it) into
/// `out/NAME/`: for rotation, or a host replaced. `addresses` as in
/// [`create_pair_with_addresses`].
pub fn issue(
    ca_dir: &Path,
    hosts: &[String],
    addresses: &[HostAddress],
    out: &Path,
    host_validity: Validity,
) -> Result<Written, PkiError> {
    check_hosts(hosts)?;
    check_addresses(hosts, addresses)?;
    let targets: Vec<PathBuf> = hosts
        .iter()
        .flat_map(|h| IDENTITY_FILES.iter().map(move |f| out.join(h).join(f)))
        .collect();
    refuse_existing(&targets)?;
    let ca_cert_path = ca_dir.join(CA_CERT);
    let ca_key_path = ca_dir.join(CA_KEY);
    let ca_pem = read_text(&ca_cert_path)?;
    let ca_key = KeyPair::from_pem(&read_text(&ca_key_path)?).map_err(|e| PkiError::Ca {
        path: ca_key_path.clone(),
        problem: format!("not a PEM private key: {e}"),
    })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| PkiError::Ca {
        path: ca_cert_path.clone(),
        problem: format!("not a PEM CA certificate: {e}"),
    })?;
    make_dir(out)?;
    let mut host_dirs = Vec::new();
    for host in hosts {
        host_dirs.push(write_identity(
            &out.join(host),
            host,
            &addresses_of(addresses, host),
            &issuer,
            &ca_pem,
            host_validity,
        )?);
    }
    Ok(Written {
        ca_dir: ca_dir.to_path_buf(),
        host_dirs,
    })
}

fn read_text(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|error| PkiError::Io {
        path: path.to_path_buf(),
        error,
    })
}

fn check_hosts(hosts: &[String]) -> Result<(), PkiError> {
    if hosts.is_empty() {
        return Err(PkiError::Hosts(
            "name at least one host (--host NAME)".into(),
        ));
    }
    for (i, host) in hosts.iter().enumerate() {
        if hosts[..i].contains(host) {
            return Err(PkiError::Hosts(format!("host {host:?} given twice")));
        }
        if host == CA_DIR || host.is_empty() || host.contains('/') || host.starts_with('.') {
            return Err(PkiError::Hosts(format!(
                "{host:?} cannot be a host's directory name (nor `{CA_DIR}`)"
            )));
        }
        crate::config::server_name(host).map_err(|e| PkiError::Hosts(e.to_string()))?;
    }
    Ok(())
}

/// Every address belongs to a host being made.
fn check_addresses(hosts: &[String], addresses: &[HostAddress]) -> Result<(), PkiError> {
    match addresses.iter().find(|a| !hosts.contains(&a.host)) {
        Some(a) => Err(PkiError::Hosts(format!(
            "--address {}={}: {:?} is not one of the hosts (--host)",
            a.host, a.address, a.host
        ))),
        None => Ok(()),
    }
}

fn addresses_of(addresses: &[HostAddress], host: &str) -> Vec<IpAddr> {
    addresses
        .iter()
        .filter(|a| a.host == host)
        .map(|a| a.address)
        .collect()
}

fn refuse_existing(targets: &[PathBuf]) -> Result<(), PkiError> {
    match targets.iter().find(|t| t.symlink_metadata().is_ok()) {
        Some(t) => Err(PkiError::Exists(t.clone())),
        None => Ok(()),
    }
}

fn generate_key(what: &str) -> Result<KeyPair, PkiError> {
    KeyPair::generate().map_err(|error| PkiError::Generate {
        what: what.into(),
        error,
    })
}

/// A host's directory: the CA certificate, a server and a client certificate for `host` (and
/// its `addresses`).
fn write_identity(
    dir: &Path,
    host: &str,
    addresses: &[IpAddr],
    issuer: &Issuer<'_, KeyPair>,
    ca_pem: &str,
    validity: Validity,
) -> Result<PathBuf, PkiError> {
    make_dir(dir)?;
    write_new(&dir.join(CA_CERT), ca_pem.as_bytes(), 0o644)?;
    for (cert_file, key_file, usage) in [
        (SERVER_CERT, SERVER_KEY, ExtendedKeyUsagePurpose::ServerAuth),
        (CLIENT_CERT, CLIENT_KEY, ExtendedKeyUsagePurpose::ClientAuth),
    ] {
        let what = format!("{host}'s {cert_file}");
        let key = generate_key(&what)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::DnsName(host.try_into().map_err(|error| {
            PkiError::Generate {
                what: what.clone(),
                error,
            }
        })?)];
        params
            .subject_alt_names
            .extend(addresses.iter().map(|&a| SanType::IpAddress(a)));
        // keyEncipherment too: QEMU's tls-creds-x509 refuses a host certificate whose (critical)
        // keyUsage lacks it, whatever the key type (crypto/tlscredsx509.c).
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        validity.apply(&mut params);
        let cert = params
            .signed_by(&key, issuer)
            .map_err(|error| PkiError::Generate { what, error })?;
        write_new(&dir.join(key_file), key.serialize_pem().as_bytes(), 0o600)?;
        write_new(&dir.join(cert_file), cert.pem().as_bytes(), 0o644)?;
    }
    Ok(dir.to_path_buf())
}

/// A directory owner-only; an existing one is used as it is.
fn make_dir(dir: &Path) -> Result<(), PkiError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|error| PkiError::Io {
            path: dir.to_path_buf(),
            error,
        })
}

/// A new file with `mode` (never an existing one: `create_new`).
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    let io = |error| PkiError::Io {
        path: path.to_path_buf(),
        error,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => PkiError::Exists(path.to_path_buf()),
            _ => io(e),
        })?;
    file.write_all(data).map_err(io)?;
    file.sync_all().map_err(io)
}
