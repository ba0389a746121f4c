//! The kinds of value the sections share (addresses, QEMU ids, ports, paths, ...): one check
//! per kind, each saying what is wrong with a value as a [`Problem`]. The section that owns
//! the key attaches it ([`At::at`]), and [`super::PairConfig::from_toml`] the file's name.

use colo_types::{Address, AddressError};
use std::path::PathBuf;

/// What is wrong with the value of one key. [`super::ConfigError::Invalid`] puts it after the
/// file's name and the key, so each message reads `FILE: KEY: PROBLEM`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Problem {
    /// A required key or section is absent.
    #[error("missing: {0}")]
    Missing(&'static str),
    /// Not an address (`unix:PATH`, `tcp:HOST:PORT`).
    #[error(transparent)]
    Address(#[from] AddressError),
    /// A TCP address others connect to has port 0.
    #[error("{0} has port 0, which nothing can connect to")]
    PortZero(Address),
    /// 0 where at least 1 is needed.
    #[error("0 is not allowed: {0}")]
    Zero(&'static str),
    /// Not a QEMU object id.
    #[error(
        "{0:?} is not a QEMU id: it starts with a letter and has only letters, digits, '-', '.' \
         and '_'"
    )]
    NotQemuId(String),
    /// Not a host name or IP address.
    #[error("{0:?} is not a host name or IP address (no spaces, ',', '=' or '/')")]
    NotHost(String),
    /// The pair's name, which names files, has other characters.
    #[error(
        "{0:?} is not a pair name: use letters, digits, '-', '.' and '_' only (it names files)"
    )]
    NotPairName(String),
    /// A relative path where QEMU, libvirt or a daemon needs an absolute one.
    #[error("{0:?} is not an absolute path (QEMU and libvirt do not run in this directory)")]
    NotAbsolute(PathBuf),
    /// A path with a comma, where QEMU's option syntax would need it doubled.
    #[error("{0:?} has a ',': QEMU's option syntax would split it; use a path without one")]
    Comma(PathBuf),
    /// Not a DNS name (a host's TLS identity).
    #[error(
        "{0:?} is not a DNS name: labels of letters, digits and '-' separated by '.', not an IP \
         address (the name in the host's certificates, as `qmp-driver pki --host` gave it)"
    )]
    NotDnsName(String),
    /// A hook that is only blanks.
    #[error("empty: remove the key, or give a shell command")]
    EmptyHook,
    /// Not a network interface name.
    #[error("{0:?} is not an interface name: 1 to 15 letters, digits, '-', '.' or '_'")]
    NotInterfaceName(String),
    /// Not a MAC address.
    #[error(
        "{0:?} is not a MAC address: give six hex pairs separated by ':', e.g. 52:54:00:12:34:56"
    )]
    NotMac(String),
    /// A key of a backend that is not the configured one.
    #[error("only used with {0}")]
    OnlyWith(&'static str),
    /// The same value as another key's, where each needs its own.
    #[error("{value} is also {other}")]
    SameAs {
        /// The value, as written in the message.
        value: String,
        /// The other key, or what the value is already.
        other: String,
    },
    /// Two filter sockets on one port.
    #[error("{port} is also {other}: every filter socket needs its own port")]
    PortTaken {
        /// The port.
        port: u16,
        /// The key that has it too.
        other: &'static str,
    },
    /// `migration.primary_target` is the secondary's own address although a relay runs.
    #[error(
        "{target} is migration.secondary_incoming although a [relay] is configured: the primary \
         would bypass the relay; point it at the relay's listen address ({listen})"
    )]
    BypassesRelay {
        /// `migration.primary_target`.
        target: Address,
        /// `relay.listen`.
        listen: Address,
    },
}

/// A [`Problem`] with the dotted key it is about.
#[derive(Debug)]
pub(super) struct FieldError {
    pub(super) key: String,
    pub(super) problem: Problem,
}

/// Attaches the key to a check's result.
pub(super) trait At<T> {
    /// `self`, its problem (if any) about `key`.
    fn at(self, key: impl Into<String>) -> Result<T, FieldError>;
}

impl<T> At<T> for Result<T, Problem> {
    fn at(self, key: impl Into<String>) -> Result<T, FieldError> {
        self.map_err(|problem| FieldError {
            key: key.into(),
            problem,
        })
    }
}

/// A required value; `what` says what to give.
pub(super) fn required<T>(value: Option<T>, what: &'static str) -> Result<T, Problem> {
    value.ok_or(Problem::Missing(what))
}

/// An address something connects to (port 0 is refused).
pub(super) fn endpoint(value: String) -> Result<Address, Problem> {
    match listen_endpoint(value)? {
        a @ Address::Tcp { port: 0, .. } => Err(Problem::PortZero(a)),
        a => Ok(a),
    }
}

/// An address the relay binds (port 0 lets the system pick one).
pub(super) fn listen_endpoint(value: String) -> Result<Address, Problem> {
    Ok(value.parse::<Address>()?)
}

/// A QEMU id (`-drive id=`, `-netdev id=`, node names): a letter, then letters, digits, `-`,
/// `.`, `_`.
pub(super) fn qemu_id(value: Option<String>, default: &str) -> Result<String, Problem> {
    let id = value.unwrap_or_else(|| default.to_string());
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || "-._".contains(c)) {
        return Err(Problem::NotQemuId(id));
    }
    Ok(id)
}

/// A TCP port others connect to.
pub(super) fn port(value: Option<u16>, default: u16) -> Result<u16, Problem> {
    match value.unwrap_or(default) {
        0 => Err(Problem::Zero("give a TCP port from 1 to 65535")),
        p => Ok(p),
    }
}

/// A host name or IP address, as it goes into QEMU's `host=` options.
pub(super) fn host(host: String) -> Result<String, Problem> {
    if host.is_empty()
        || host
            .chars()
            .any(|c| c.is_whitespace() || c == ',' || c == '=' || c == '/')
    {
        return Err(Problem::NotHost(host));
    }
    Ok(host)
}

/// An absolute path.
pub(super) fn abs_path(path: PathBuf) -> Result<PathBuf, Problem> {
    if !path.is_absolute() {
        return Err(Problem::NotAbsolute(path));
    }
    Ok(path)
}

/// An optional shell command (not blank when given).
pub(super) fn hook(value: Option<String>) -> Result<Option<String>, Problem> {
    match value {
        Some(cmd) if cmd.trim().is_empty() => Err(Problem::EmptyHook),
        other => Ok(other),
    }
}

/// A network interface name (Linux: at most 15 bytes).
pub(super) fn tap(tap: String) -> Result<String, Problem> {
    let ok = !tap.is_empty()
        && tap.len() <= 15
        && tap
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
    if !ok {
        return Err(Problem::NotInterfaceName(tap));
    }
    Ok(tap)
}

/// A MAC address, `52:54:00:12:34:56`.
pub(super) fn mac(mac: String) -> Result<String, Problem> {
    let parts: Vec<&str> = mac.split(':').collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()));
    if !ok {
        return Err(Problem::NotMac(mac));
    }
    Ok(mac)
}

/// A number that must not be 0; `hint` says what to give.
pub(super) fn nonzero<T: PartialEq + Default>(value: T, hint: &'static str) -> Result<T, Problem> {
    if value == T::default() {
        return Err(Problem::Zero(hint));
    }
    Ok(value)
}
