//! Where the relay's control protocol is served: [`ControlAddress`].
//!
//! A daemon on the relay's host uses the Unix socket; a daemon on the other
//! host of the pair (colo-proxyd primary when the relay runs on the
//! secondary host) connects over TCP on the replication link. Both carry the
//! same protocol. TCP has no authentication: see "Transports" in
//! `docs/control-protocol.md`.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// An address of the relay's control protocol.
///
/// Written `unix:PATH`, `tcp:HOST:PORT` (an IPv6 host in brackets:
/// `tcp:[fd00::2]:7010`) or, for compatibility with the `--control PATH`
/// options that came before TCP, a bare absolute path (a Unix socket).
/// [`fmt::Display`] writes the `unix:`/`tcp:` form, which parses back to the
/// same address.
///
/// ```
/// use colo_control::ControlAddress;
///
/// let tcp: ControlAddress = "tcp:192.168.77.2:7010".parse().unwrap();
/// assert_eq!(tcp, ControlAddress::tcp("192.168.77.2", 7010));
/// let unix: ControlAddress = "/run/colo/relay.sock".parse().unwrap();
/// assert_eq!(unix.to_string(), "unix:/run/colo/relay.sock");
/// assert!("192.168.77.2:7010".parse::<ControlAddress>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ControlAddress {
    /// A Unix stream socket (the relay's own host).
    Unix(PathBuf),
    /// A TCP address (the other host, over the replication link).
    Tcp {
        /// Host name or IP address, without brackets.
        host: String,
        /// TCP port.
        port: u16,
    },
}

/// A string that is not a [`ControlAddress`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid control address {input:?}: {reason}")]
pub struct AddressError {
    /// What was given.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

/// The accepted forms, for error messages and help texts.
pub const ADDRESS_FORMS: &str = "unix:PATH, tcp:HOST:PORT or an absolute path";

impl ControlAddress {
    /// A Unix socket address.
    pub fn unix(path: impl Into<PathBuf>) -> ControlAddress {
        ControlAddress::Unix(path.into())
    }

    /// A TCP address.
    pub fn tcp(host: impl Into<String>, port: u16) -> ControlAddress {
        ControlAddress::Tcp {
            host: host.into(),
            port,
        }
    }

    /// Parses `HOST:PORT` (without the `tcp:` prefix, which is accepted too),
    /// as a TCP listen or connect address is often written.
    pub fn parse_host_port(s: &str) -> Result<ControlAddress, AddressError> {
        let fail = |reason: &str| AddressError {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let hp = s.strip_prefix("tcp:").unwrap_or(s);
        let (host, port) = hp
            .rsplit_once(':')
            .ok_or_else(|| fail("expected HOST:PORT"))?;
        let host = match host.strip_prefix('[') {
            Some(rest) => rest
                .strip_suffix(']')
                .ok_or_else(|| fail("an IPv6 host must be written [ADDR]"))?,
            None if host.contains(':') => {
                return Err(fail(
                    "an IPv6 host must be written in brackets: [ADDR]:PORT",
                ));
            }
            None => host,
        };
        if host.is_empty() {
            return Err(fail("the host is empty (HOST:PORT)"));
        }
        if host.contains(|c: char| c.is_whitespace() || c == '/') {
            return Err(fail("the host contains a space or '/'"));
        }
        let port = port.parse::<u16>().map_err(|_| {
            fail(&format!(
                "the port {port:?} is not a number from 0 to 65535"
            ))
        })?;
        Ok(ControlAddress::tcp(host, port))
    }

    /// The socket path of a Unix address.
    pub fn unix_path(&self) -> Option<&Path> {
        match self {
            ControlAddress::Unix(p) => Some(p),
            ControlAddress::Tcp { .. } => None,
        }
    }

    /// True for a TCP address.
    pub fn is_tcp(&self) -> bool {
        matches!(self, ControlAddress::Tcp { .. })
    }
}

impl FromStr for ControlAddress {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<ControlAddress, AddressError> {
        let fail = |reason: String| AddressError {
            input: s.to_string(),
            reason,
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(fail("the path after unix: is empty".into()));
            }
            return Ok(ControlAddress::Unix(path.into()));
        }
        if s.starts_with("tcp:") {
            return ControlAddress::parse_host_port(s);
        }
        if s.starts_with('/') {
            return Ok(ControlAddress::Unix(s.into()));
        }
        if s.is_empty() {
            return Err(fail(format!("empty; expected {ADDRESS_FORMS}")));
        }
        let hint = if ControlAddress::parse_host_port(s).is_ok() {
            format!("expected {ADDRESS_FORMS}; for TCP write tcp:{s}")
        } else {
            format!("expected {ADDRESS_FORMS} (a relative path needs the unix: prefix)")
        };
        Err(fail(hint))
    }
}

impl fmt::Display for ControlAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ControlAddress::Unix(p) => write!(f, "unix:{}", p.display()),
            ControlAddress::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp:[{host}]:{port}")
            }
            ControlAddress::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

impl TryFrom<String> for ControlAddress {
    type Error = AddressError;

    fn try_from(s: String) -> Result<ControlAddress, AddressError> {
        s.parse()
    }
}

impl From<ControlAddress> for String {
    fn from(a: ControlAddress) -> String {
        a.to_string()
    }
}

// A path is a Unix socket, as every control address was before TCP: the
// client functions keep taking `&Path`/`PathBuf` unchanged. There is no
// `From<&str>`: a string is parsed (`"tcp:...".parse()`), never guessed.
impl From<PathBuf> for ControlAddress {
    fn from(p: PathBuf) -> ControlAddress {
        ControlAddress::Unix(p)
    }
}

impl From<&PathBuf> for ControlAddress {
    fn from(p: &PathBuf) -> ControlAddress {
        ControlAddress::Unix(p.clone())
    }
}

impl From<&Path> for ControlAddress {
    fn from(p: &Path) -> ControlAddress {
        ControlAddress::Unix(p.to_path_buf())
    }
}

impl From<&ControlAddress> for ControlAddress {
    fn from(a: &ControlAddress) -> ControlAddress {
        a.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_parses_and_displays_back() {
        for (input, want, shown) in [
            (
                "unix:/run/colo/relay.sock",
                ControlAddress::unix("/run/colo/relay.sock"),
                "unix:/run/colo/relay.sock",
            ),
            (
                "unix:relay.sock",
                ControlAddress::unix("relay.sock"),
                "unix:relay.sock",
            ),
            (
                "/run/colo/relay.sock",
                ControlAddress::unix("/run/colo/relay.sock"),
                "unix:/run/colo/relay.sock",
            ),
            (
                "tcp:192.168.77.2:7010",
                ControlAddress::tcp("192.168.77.2", 7010),
                "tcp:192.168.77.2:7010",
            ),
            (
                "tcp:relay.example:7010",
                ControlAddress::tcp("relay.example", 7010),
                "tcp:relay.example:7010",
            ),
            (
                "tcp:[fd00::2]:7010",
                ControlAddress::tcp("fd00::2", 7010),
                "tcp:[fd00::2]:7010",
            ),
        ] {
            let a: ControlAddress = input.parse().unwrap();
            assert_eq!(a, want, "{input}");
            assert_eq!(a.to_string(), shown, "{input}");
            assert_eq!(shown.parse::<ControlAddress>().unwrap(), want, "{shown}");
        }
        assert_eq!(
            ControlAddress::parse_host_port("0.0.0.0:0").unwrap(),
            ControlAddress::tcp("0.0.0.0", 0)
        );
        assert_eq!(
            ControlAddress::parse_host_port("tcp:[::1]:9").unwrap(),
            ControlAddress::tcp("::1", 9)
        );
    }

    #[test]
    fn bad_strings_say_what_is_expected() {
        for (input, needle) in [
            ("", "empty"),
            ("unix:", "path after unix: is empty"),
            ("tcp:", "expected HOST:PORT"),
            ("tcp:7010", "expected HOST:PORT"),
            ("tcp::7010", "host is empty"),
            ("tcp:host:", "is not a number"),
            (
                "tcp:host:70000",
                "\"70000\" is not a number from 0 to 65535",
            ),
            ("tcp:fd00::2:7010", "brackets"),
            ("tcp:[fd00::2:7010", "[ADDR]"),
            ("192.168.77.2:7010", "write tcp:192.168.77.2:7010"),
            ("relay.sock", "a relative path needs the unix: prefix"),
            (
                "udp:1.2.3.4:5",
                "unix:PATH, tcp:HOST:PORT or an absolute path",
            ),
        ] {
            let e = input.parse::<ControlAddress>().unwrap_err().to_string();
            assert!(e.contains(needle), "{input:?}: {e}");
            assert!(e.contains(&format!("{input:?}")), "{input:?}: {e}");
        }
    }

    #[test]
    fn paths_convert_to_unix_addresses() {
        let p = PathBuf::from("/run/r.sock");
        let want = ControlAddress::unix("/run/r.sock");
        assert_eq!(ControlAddress::from(p.as_path()), want);
        assert_eq!(ControlAddress::from(&p), want);
        assert_eq!(ControlAddress::from(p), want);
        assert_eq!(want.unix_path(), Some(Path::new("/run/r.sock")));
        assert!(!want.is_tcp() && ControlAddress::tcp("h", 1).is_tcp());
    }

    #[test]
    fn serde_uses_the_string_form() {
        #[derive(Deserialize, Serialize, Debug, PartialEq)]
        struct File {
            control: ControlAddress,
        }
        let f: File = serde_json::from_str(r#"{"control":"tcp:10.0.0.2:7010"}"#).unwrap();
        assert_eq!(f.control, ControlAddress::tcp("10.0.0.2", 7010));
        assert_eq!(
            serde_json::to_string(&f).unwrap(),
            r#"{"control":"tcp:10.0.0.2:7010"}"#
        );
        let e = serde_json::from_str::<File>(r#"{"control":"10.0.0.2:7010"}"#).unwrap_err();
        assert!(e.to_string().contains("tcp:10.0.0.2:7010"), "{e}");
    }
}
